"""What compression methods share: the calibration pass, integer grids, sparsity masks."""
