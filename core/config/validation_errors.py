"""A pydantic ValidationError as one line: the full key path, the value, what is allowed."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ValidationError

from unbottle.core.contract.errors import echo, shorten


def _format_loc(loc: Sequence[Any]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("function-after", "function-before") or str(part).startswith(
            ("function-", "list[", "dict[")
        ):
            continue
        else:
            out += ("." if out else "") + shorten(part, 40)  # a key may be a 50 MB string
    return out


def _allowed_keys(model: type[BaseModel], loc: Sequence[Any]) -> list[str]:
    current: Any = model
    for part in loc:
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return []
        field = current.model_fields.get(str(part))
        if field is None:
            return []
        current = field.annotation
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return []


def one_line(error: ValidationError, model: type[BaseModel], prefix: str = "") -> str:
    """Render the first pydantic error as `key: value is wrong because ...`."""
    first = error.errors()[0]
    loc = [p for p in first["loc"] if not str(p).startswith(("function-", "list[", "dict["))]
    where = ".".join(filter(None, [prefix, _format_loc(loc)])) or prefix or "params"
    more = len(error.errors()) - 1
    tail = f" (and {more} more error{'s' if more > 1 else ''})" if more else ""
    if first["type"] == "extra_forbidden":
        allowed = _allowed_keys(model, loc[:-1])
        hint = f"; allowed: {', '.join(allowed)}" if allowed else ""
        return f"{where}: unknown key{hint}{tail}"
    if first["type"] == "missing":
        return f"{where}: required key is missing{tail}"
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] in ("value_error", "assertion_error") or "input" not in first:
        # Validators phrase their message as "sub.key: what is wrong", relative to loc.
        head, sep, rest = message.partition(": ")
        if sep and " " not in head:
            return f"{where + '.' if loc or prefix else ''}{shorten(head)}: {rest}{tail}"
        return f"{where}: {message}{tail}"
    return f"{where}: {echo(first['input'])} is invalid: {shorten(message, 200)}{tail}"
