"""Reading params.yaml: the file, then any ``-S key.path=value`` overrides, validated.

Validation happens in two passes, both before any heavy work:

1. :func:`load_params` checks the structure (unknown keys, types, ranges) of the file
   plus any overrides, against :mod:`unbottle.core.config.schema`.
2. :func:`unbottle.core.config.strategy_checks.check_strategies` resolves every strategy
   name against the installed plugins and validates its options with the strategy's own
   config model.

Every failure is a :class:`ConfigError` whose message is one line naming the key, the
value and what is allowed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from unbottle.core.config.overrides import apply_override
from unbottle.core.config.schema import Params
from unbottle.core.config.validation_errors import one_line
from unbottle.core.contract.errors import ConfigError, echo
from unbottle.core.store.artifacts import path_kind, read_utf8


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_params(path: Path | None = None, overrides: Sequence[str] = ()) -> Params:
    """Read params.yaml (or the defaults when ``path`` is None), apply overrides, validate."""
    tree: dict[str, Any] = {}
    if path is not None:
        if path_kind(path, "params file", ConfigError) is None:
            raise ConfigError(f"params file {echo(str(path))} does not exist")
        try:
            loaded = yaml.safe_load(read_utf8(Path(path), "params file", ConfigError))
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            at = f" at line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{path}: not valid YAML{at}") from None
        except RecursionError:
            raise ConfigError(
                f"{path}: nested too deeply to be params (params are a few levels of mappings)"
            ) from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        tree = loaded
    # Overrides apply to the defaults merged with the file, so `-S a.b.c=v` works for
    # keys the file leaves out (including the options of a default strategy).
    tree = _deep_merge(Params().model_dump(mode="json"), tree) if overrides else tree
    for text in overrides:
        apply_override(tree, text)
    try:
        return Params.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(one_line(e, Params)) from None
    except RecursionError:
        raise ConfigError("params: a value is nested too deeply to be a param") from None


def dump_params(params: Params) -> dict[str, Any]:
    """Params as plain YAML-able data (paths as strings)."""
    return params.model_dump(mode="json")
