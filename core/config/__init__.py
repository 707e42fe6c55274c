"""params.yaml: the schema, overrides and strategy references."""
