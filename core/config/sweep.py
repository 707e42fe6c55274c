"""Sweeps: grids over compression settings, expanded into named variants."""

from __future__ import annotations

import re
from typing import Any

#: The marker of a sweep axis inside a sweep recipe: ``sparsity: {grid: [0.3, 0.5]}``.
GRID = "grid"


def _name_part(value: Any) -> str:
    """A grid value as part of a variant name: 0.5 -> 0p5, onnx-dynamic-int8 stays."""
    text = re.sub(r"[^a-z0-9_-]+", "-", str(value).lower().replace(".", "p"))
    return text.strip("-_") or "x"


def expand_sweep(prefix: str, recipe: Any) -> dict[str, list[dict[str, Any]]]:
    """The variants a sweep recipe stands for: one per point of its grid.

    A recipe is a list of steps like a variant's, in which any value (a strategy name or
    an option) may be ``{grid: [v1, v2, ...]}``. The variants are the cross product of
    the grids, named ``prefix-v1-...`` after the values of each point, in order.
    """
    import itertools

    if not (isinstance(recipe, list) and recipe and all(isinstance(s, dict) for s in recipe)):
        raise ValueError(
            f"sweep.{prefix}: a sweep is a list of steps like "
            f"[{{prune: magnitude, sparsity: {{{GRID}: [0.3, 0.5]}}}}]"
        )
    axes: list[tuple[int, str, list[Any]]] = []
    for i, step in enumerate(recipe):
        for key, value in step.items():
            if isinstance(value, dict) and GRID in value:
                values = value[GRID]
                if set(value) != {GRID} or not isinstance(values, list) or not values:
                    raise ValueError(
                        f"sweep.{prefix}[{i}].{key}: write {{{GRID}: [value, ...]}} with at "
                        "least one value"
                    )
                axes.append((i, key, values))
    variants: dict[str, list[dict[str, Any]]] = {}
    for point in itertools.product(*(values for _, _, values in axes)):
        steps = [dict(step) for step in recipe]
        for (i, key, _), value in zip(axes, point, strict=True):
            steps[i][key] = value
        name = "-".join([prefix, *map(_name_part, point)])
        if name in variants:
            raise ValueError(f"sweep.{prefix}: two grid points are both named {name!r}")
        variants[name] = steps
    return variants
