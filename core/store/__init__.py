"""Artifacts on disk: atomic writes, manifests, content fingerprints, provenance."""
