"""Models in and out: loading and saving, pretrained sources, runtimes, the low-bit format."""
