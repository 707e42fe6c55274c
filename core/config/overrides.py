"""``-S key.path=value`` overrides of params, applied to the params tree before validation."""

from __future__ import annotations

from typing import Any

import yaml

from unbottle.core.contract.errors import ConfigError, echo, shorten


def _parse_override(text: str) -> tuple[list[str], Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {echo(text)} is not of the form key.path=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    except RecursionError:
        raise ConfigError(
            f"override {echo(text)}: the value is nested too deeply to be a param"
        ) from None
    return key.strip().split("."), value


def apply_override(tree: dict[str, Any], text: str) -> None:
    """Set ``key.path=value`` in a params tree; integer segments index lists."""
    path, value = _parse_override(text)
    node: Any = tree
    for i, part in enumerate(path):
        last = i == len(path) - 1
        where = ".".join(path[: i + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(
                    f"override {echo(text)}: {shorten(where)} is not an index of a list of "
                    f"{len(node)}"
                )
            index = int(part)
            if last:
                node[index] = value
            else:
                node = node[index]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                child = node.get(part)
                if isinstance(child, str) and not last:
                    # `-S pretrain.train.optimizer.lr=...` on the string shorthand.
                    child = node[part] = {"name": child}
                if child is None:  # absent, or an optional section left at None
                    child = node[part] = {}
                node = child
        else:
            raise ConfigError(
                f"override {echo(text)}: {shorten(where)} goes inside a {type(node).__name__}"
            )
