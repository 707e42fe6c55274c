"""params.yaml, validated: schema (sections per stage), sweep expansion, loading with
``-S`` overrides, one-line error messages, strategy checks and the evaluation plan."""
