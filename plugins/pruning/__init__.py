"""Built-in pruning: ``magnitude``, ``wanda``, ``sparsegpt`` (weights zeroed in place) and
``structured`` (attention heads, FFN channels and whole layers physically removed).

The three unstructured pruners take one of

* ``sparsity`` s in (0, 1): the fraction of the selected weights set to zero, exactly
  (the zeros of all layers add up to ``round(s * total)``). By default every layer gets
  s; ``allocation: depth`` ramps the sparsity of decoder blocks linearly with depth, from
  s - spread to s + spread; ``allocation: owl`` gives blocks with more outlier weights a
  lower sparsity (Yin et al., 2023); ``overrides: {regex: s_layer}`` pins the sparsity of
  matching layers. The other layers absorb the difference: the overall sparsity stays s.
* ``pattern: "N:M"``: at most N nonzero weights in every M consecutive input weights of
  each row (2:4 keeps 2 of every 4: 50%; 4:8 keeps 4 of every 8). Quote it in YAML.

They differ in how they choose and what they do after:

* ``magnitude`` zeroes the smallest |W| (Han et al., 2015), per layer or ``scope: global``;
  it needs no calibration data.
* ``wanda`` zeroes the smallest |W_ij| * ||X_j||_2 of each output row (Sun et al., 2023):
  one block-by-block pass over the calibration data for the input norms.
* ``sparsegpt`` picks by OBS saliency and updates the surviving weights to compensate
  (Frantar & Alistarh, 2023; see ``unbottle.plugins.pruning.sparsegpt``): the same pass
  with Hessians.

The zeros are real: they are stored in the weights, and the achieved sparsity reported is
counted from them.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from unbottle import CompressContext, ConfigError, Regex, StrategyConfig, hookimpl
from unbottle.compression import DEFAULT_LAYERS, find_linears

log = logging.getLogger("unbottle.prune")

#: The Linear layers of a Llama-family decoder block.
BLOCK_LINEARS = DEFAULT_LAYERS
DEFAULT_SPARSITY = 0.5


def prunable_linears(model: Any, pattern: str) -> list[tuple[str, Any]]:
    """The Linear layers inside the decoder blocks whose names match ``pattern``.

    Embeddings and the (tied) output head are left dense: they are shared, and pruning
    them costs small models far more quality than it saves.
    """
    found = find_linears(model, pattern)
    if not found:
        raise ConfigError(f"prune: layers {pattern!r} match no Linear layer of the model")
    return found


# ------------------------------------------------------------------------------ options

Fraction = Annotated[float, Field(ge=0, lt=1)]


class UnstructuredOptions(StrategyConfig):
    """What magnitude, Wanda and SparseGPT share: how much to prune, and where.

    ``sparsity``: the overall fraction of weights zeroed (0.5 unless a pattern is given);
    ``pattern``: "N:M" instead; ``layers``: a regex over module names, the Linears to
    prune; ``allocation``: how the sparsity is spread over decoder blocks (``uniform``,
    ``depth``: rising linearly with depth, ``owl``: falling with the block's outlier
    ratio); ``spread``: the block sparsities of depth and owl span target +- spread (OWL's
    lambda); ``owl_threshold``: OWL's M, a score is an outlier above M times its block's
    mean; ``overrides``: ``{regex: sparsity}`` pinned for matching layers;
    ``batch_size``: calibration sequences per forward pass.

    Subclasses declare the fields (so each strategy lists its options in its own order);
    these validators check how they combine.
    """

    @model_validator(mode="before")
    @classmethod
    def _sparsity_or_pattern(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        if data.get("sparsity") is not None and data.get("pattern") is not None:
            raise ValueError(
                "give sparsity (unstructured) or pattern (N:M), not both; "
                f"pattern {data['pattern']} fixes the sparsity"
            )
        if data.get("pattern") is not None or data.get("overrides"):
            # An N:M pattern fixes every layer's sparsity and overrides set them: the
            # default allocation gives way (an explicit one is checked below).
            data = {"allocation": "uniform", **data}
        if data.get("sparsity") is None and data.get("pattern") is None:
            return {**data, "sparsity": DEFAULT_SPARSITY}
        return data

    @field_validator("pattern", mode="before", check_fields=False)
    @classmethod
    def _valid_pattern(cls, value: Any) -> str | None:
        from unbottle.compression import parse_pattern

        if isinstance(value, int) and not isinstance(value, bool):
            # YAML 1.1 reads an unquoted 2:4 as the base-60 number 2 * 60 + 4 = 124.
            raise ValueError(
                f"got the number {value}: YAML reads an unquoted N:M as base 60; "
                f"quote it, as in pattern: '{value // 60}:{value % 60}'"
            )
        if value is not None:
            n, m = parse_pattern(str(value))
            return f"{n}:{m}"
        return value

    @model_validator(mode="after")
    def _nonuniform_needs_a_sparsity(self) -> Any:
        values = self.__dict__
        uneven = [
            key
            for key, active in (
                (
                    f"allocation: {values.get('allocation')}",
                    values.get("allocation", "uniform") != "uniform",
                ),
                ("overrides", bool(values.get("overrides"))),
            )
            if active
        ]
        if len(uneven) > 1:
            raise ValueError(f"{uneven[0]} and overrides cannot be combined; choose one")
        if uneven and values.get("pattern") is not None:
            raise ValueError(
                f"{uneven[0]} sets per-layer sparsities, which an N:M pattern fixes; "
                "use sparsity instead of pattern"
            )
        if uneven and values.get("scope") == "global":
            raise ValueError(f"{uneven[0]} needs scope: layer (global scope ranks all weights)")
        return self

    @property
    def nm(self) -> tuple[int, int] | None:
        from unbottle.compression import parse_pattern

        pattern = self.__dict__.get("pattern")
        return parse_pattern(pattern) if pattern is not None else None

    @property
    def target(self) -> float:
        """The overall sparsity asked for: ``sparsity``, or (M - N) / M for a pattern."""
        if self.nm is not None:
            n, m = self.nm
            return (m - n) / m
        return float(self.__dict__["sparsity"])


# ------------------------------------------------------------------- shared machinery


def _check_calibration(ctx: CompressContext, who: str) -> None:
    if not ctx.calibration:
        raise ConfigError(
            f"{who}: compress.calibration.samples: 0 calibration samples; at least 1 needed"
        )


def _check_pattern_fits(layers: list[tuple[str, Any]], nm: tuple[int, int] | None) -> None:
    if nm is None:
        return
    n, m = nm
    for name, module in layers:
        if module.in_features % m:
            raise ConfigError(
                f"prune: pattern {n}:{m} needs M={m} to divide every layer's input width; "
                f"{name} has {module.in_features}"
            )


def _check_before_work(
    model: Any, opts: UnstructuredOptions, where: str, calibrated: str | None
) -> None:
    """What ``prune`` would refuse on this model's shapes, before any variant is built (a
    weightless copy will do); ``calibrated`` names a method that sees only the Linears
    the calibration pass reaches."""
    layers = prunable_linears(model, opts.layers)
    try:
        if calibrated is not None:
            _check_reachable(model, layers, calibrated)
        _check_pattern_fits(layers, opts.nm)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def _check_reachable(model: Any, layers: list[tuple[str, Any]], who: str) -> None:
    """Wanda and SparseGPT see the Linears the block-by-block pass reaches, nothing else."""
    from unbottle.compression import architecture_of, calibrated_linears

    arch = architecture_of(model)  # a known architecture, or a one-line error
    reachable = set(calibrated_linears(model))
    missed = [name for name, _ in layers if name not in reachable]
    if missed:
        handled = f"{', '.join(arch.linears)} of {arch.blocks}"
        raise ConfigError(
            f"{who}: layers matches {missed[0]}, which the block-by-block calibration pass "
            f"does not reach (it handles {handled})"
        )


def _block_of(name: str) -> int:
    """The index of the decoder block a layer belongs to (for per-block allocations)."""
    match = re.search(r"layers\.(\d+)\.", name)
    if match is None:
        raise ConfigError(f"prune: {name} is in no decoder block; per-block allocation needs one")
    return int(match[1])


def _owl_layer_sparsities(
    model: Any, layers: list[tuple[str, Any]], ctx: CompressContext, opts: Any
) -> dict[str, float]:
    """Each layer's sparsity under OWL: its block's, from outlier ratios of Wanda scores
    measured on the dense model (one block-by-block pass, weights untouched)."""
    from unbottle.compression import (
        calibrate_sequentially,
        outlier_ratio,
        spread_sparsities,
        wanda_scores,
    )

    selected = {name for name, _ in layers}
    scores: dict[int, list[Any]] = {}

    def record(name: str, linear: Any, stats: Any) -> None:
        scores.setdefault(_block_of(name), []).append(wanda_scores(linear.weight, stats.sq_norm))

    ratios: dict[int, float] = {}
    sizes: dict[int, int] = {}

    def finish_blocks_before(current: int | None) -> None:
        for block in [b for b in scores if b != current]:
            outliers, total = outlier_ratio(scores.pop(block), opts.owl_threshold)
            ratios[block], sizes[block] = outliers / total, total

    def process(name: str, linear: Any, stats: Any) -> None:
        finish_blocks_before(_block_of(name))
        record(name, linear, stats)

    calibrate_sequentially(
        model,
        ctx.calibration,
        process,
        select=lambda name: name in selected,
        hessian=False,
        batch_size=opts.batch_size,
        desc="owl: outliers",
    )
    finish_blocks_before(None)
    blocks = list(ratios)
    per_block = spread_sparsities(
        [-ratios[b] for b in blocks], [sizes[b] for b in blocks], opts.target, opts.spread
    )
    sparsity = dict(zip(blocks, per_block, strict=True))
    log.info(
        "owl: outlier ratios %s -> block sparsities %s",
        [round(ratios[b], 4) for b in blocks],
        [round(s, 3) for s in per_block],
    )
    return {name: sparsity[_block_of(name)] for name, _ in layers}


def _depth_sparsities(layers: list[tuple[str, Any]], opts: Any) -> dict[str, float]:
    """Each layer's sparsity under the depth schedule: rising linearly with its block's
    index from target - spread to target + spread (size-weighted mean: the target)."""
    from unbottle.compression import spread_sparsities

    sizes: dict[int, int] = {}
    for name, module in layers:
        block = _block_of(name)
        sizes[block] = sizes.get(block, 0) + module.weight.numel()
    blocks = sorted(sizes)
    per_block = spread_sparsities(blocks, [sizes[b] for b in blocks], opts.target, opts.spread)
    sparsity = dict(zip(blocks, per_block, strict=True))
    return {name: sparsity[_block_of(name)] for name, _ in layers}


def _override_sparsities(layers: list[tuple[str, Any]], opts: Any) -> dict[str, float]:
    """Pinned sparsities for layers matching an override (the first that matches); the
    rest share what keeps the overall sparsity at the target."""
    pinned: dict[str, float] = {}
    for pattern, value in opts.overrides.items():
        regex = re.compile(pattern)
        hits = [name for name, _ in layers if regex.search(name) and name not in pinned]
        if not any(regex.search(name) for name, _ in layers):
            raise ConfigError(f"prune: overrides {pattern!r} matches none of the pruned layers")
        pinned.update(dict.fromkeys(hits, value))
    sizes = {name: module.weight.numel() for name, module in layers}
    rest = [name for name in sizes if name not in pinned]
    if not rest:
        raise ConfigError(
            "prune: overrides pin every pruned layer, so nothing can keep the overall "
            f"sparsity at {opts.target}; leave some layers to the default"
        )
    rest_size = sum(sizes[name] for name in rest)
    needed = (
        opts.target * sum(sizes.values()) - sum(pinned[n] * sizes[n] for n in pinned)
    ) / rest_size
    if not 0 <= needed < 1:
        raise ConfigError(
            f"prune: with overrides {dict(opts.overrides)} the other layers would need "
            f"sparsity {needed:.3f} to reach {opts.target} overall; it must be in [0, 1)"
        )
    return {name: pinned.get(name, needed) for name in sizes}


def _zero_budgets(
    model: Any, layers: list[tuple[str, Any]], ctx: CompressContext, opts: Any
) -> dict[str, int]:
    """How many weights each layer loses, summing to exactly round(target * total)."""
    from unbottle.compression import exact_counts

    if opts.allocation == "owl":
        wished = _owl_layer_sparsities(model, layers, ctx, opts)
    elif opts.allocation == "depth":
        wished = _depth_sparsities(layers, opts)
    elif opts.overrides:
        wished = _override_sparsities(layers, opts)
    else:
        wished = {name: opts.target for name, _ in layers}
    sizes = [module.weight.numel() for _, module in layers]
    counts = exact_counts(sizes, [wished[name] for name, _ in layers], opts.target)
    return {name: k for (name, _), k in zip(layers, counts, strict=True)}


def _sparsity_metrics(layers: list[tuple[str, Any]], opts: Any) -> dict[str, float]:
    per_layer = [float((m.weight == 0).sum()) / m.weight.numel() for _, m in layers]
    total = sum(m.weight.numel() for _, m in layers)
    zeros = sum(int((m.weight == 0).sum()) for _, m in layers)
    return {
        "sparsity": zeros / total,
        "target_sparsity": opts.target,
        "min_layer_sparsity": min(per_layer),
        "max_layer_sparsity": max(per_layer),
        "pruned_layers": len(layers),
    }


# ------------------------------------------------------------------------- magnitude


class Magnitude:
    """Zero the smallest-magnitude weights, in each layer, across all of them, or N:M."""

    name = "magnitude"
    keeps_shape = True  # zeros weights, removes none: later steps see the same shapes

    class Config(UnstructuredOptions):
        sparsity: float | None = Field(None, gt=0, lt=1)
        scope: Literal["layer", "global"] = "layer"
        pattern: str | None = None
        layers: Regex = BLOCK_LINEARS
        allocation: Literal["uniform", "depth", "owl"] = "uniform"
        overrides: dict[Regex, Fraction] = Field(default_factory=dict)
        owl_threshold: float = Field(5.0, gt=0)
        spread: float = Field(0.05, gt=0, lt=0.5)
        batch_size: int = Field(8, ge=1)

    def __init__(self, config: Config) -> None:
        self.config = config

    def check_model(self, model: Any, where: str) -> None:
        _check_before_work(model, self.config, where, calibrated=None)

    def prune(self, model: Any, ctx: CompressContext) -> dict[str, float]:
        import torch

        from unbottle.compression import nm_prune_mask, smallest

        opts = self.config
        layers = prunable_linears(model, opts.layers)
        _check_pattern_fits(layers, opts.nm)
        if opts.allocation == "owl":
            _check_calibration(ctx, "magnitude (allocation: owl)")
        with torch.no_grad():
            if opts.nm is not None:
                for _, module in layers:
                    mask = nm_prune_mask(module.weight.abs(), *opts.nm)
                    module.weight.masked_fill_(mask, 0.0)
            elif opts.scope == "layer":
                budgets = _zero_budgets(model, layers, ctx, opts)
                for name, module in layers:
                    flat = module.weight.view(-1)
                    flat[smallest(flat.abs(), budgets[name])] = 0.0
            else:
                scores = torch.cat([m.weight.abs().view(-1) for _, m in layers])
                k = round(opts.target * scores.numel())
                keep = torch.ones_like(scores, dtype=torch.bool)
                keep[smallest(scores, k)] = False
                offset = 0
                for _, module in layers:
                    n = module.weight.numel()
                    module.weight.view(-1).mul_(keep[offset : offset + n])
                    offset += n
        return _sparsity_metrics(layers, opts)


# ------------------------------------------------------------------------------ wanda


class Wanda:
    """Zero the weights with the smallest |W_ij| * ||X_j||_2 in each output row (or in each
    N:M group), block by block over the calibration data (Sun et al., 2023)."""

    name = "wanda"
    keeps_shape = True  # zeros weights, removes none: later steps see the same shapes

    class Config(UnstructuredOptions):
        sparsity: float | None = Field(None, gt=0, lt=1)
        pattern: str | None = None
        layers: Regex = BLOCK_LINEARS
        allocation: Literal["uniform", "depth", "owl"] = "depth"
        overrides: dict[Regex, Fraction] = Field(default_factory=dict)
        owl_threshold: float = Field(5.0, gt=0)
        spread: float = Field(0.05, gt=0, lt=0.5)
        batch_size: int = Field(8, ge=1)

    def __init__(self, config: Config) -> None:
        self.config = config

    def check_model(self, model: Any, where: str) -> None:
        _check_before_work(model, self.config, where, calibrated="wanda")

    def prune(self, model: Any, ctx: CompressContext) -> dict[str, float]:
        import torch

        from unbottle.compression import (
            calibrate_sequentially,
            nm_prune_mask,
            row_prune_mask,
            wanda_scores,
        )

        opts = self.config
        layers = prunable_linears(model, opts.layers)
        _check_reachable(model, layers, "wanda")
        _check_pattern_fits(layers, opts.nm)
        _check_calibration(ctx, "wanda")
        budgets = _zero_budgets(model, layers, ctx, opts) if opts.nm is None else {}

        def process(name: str, linear: Any, stats: Any) -> None:
            scores = wanda_scores(linear.weight, stats.sq_norm)  # (out, in)
            if opts.nm is not None:
                mask = nm_prune_mask(scores, *opts.nm)
            else:
                mask = row_prune_mask(scores, budgets[name])
            linear.weight.masked_fill_(mask, 0.0)

        selected = {name for name, _ in layers}
        with torch.no_grad():
            calibrate_sequentially(
                model,
                ctx.calibration,
                process,
                select=lambda name: name in selected,
                hessian=False,
                batch_size=opts.batch_size,
                desc="wanda",
            )
        return _sparsity_metrics(layers, opts)


# -------------------------------------------------------------------------- sparsegpt


class SparseGPT:
    """Prune each Linear by OBS saliency and update the surviving weights to compensate,
    block by block over the calibration data (Frantar & Alistarh, 2023)."""

    name = "sparsegpt"
    keeps_shape = True  # zeros weights, removes none: later steps see the same shapes

    class Config(UnstructuredOptions):
        sparsity: float | None = Field(None, gt=0, lt=1)
        pattern: str | None = None
        layers: Regex = BLOCK_LINEARS
        allocation: Literal["uniform", "depth", "owl"] = "depth"
        overrides: dict[Regex, Fraction] = Field(default_factory=dict)
        owl_threshold: float = Field(5.0, gt=0)
        spread: float = Field(0.05, gt=0, lt=0.5)
        batch_size: int = Field(8, ge=1)
        # Columns per lazy-update block; the pruning mask is chosen per block.
        blocksize: int = Field(128, ge=1)
        # Added to H's diagonal, as a fraction of its mean diagonal.
        damping: float = Field(0.01, gt=0)

        @field_validator("blocksize")
        @classmethod
        def _power_of_two(cls, value: int) -> int:
            if value & (value - 1):
                raise ValueError(f"{value} is not a power of two (N:M groups must fit a block)")
            return value

    def __init__(self, config: Config) -> None:
        self.config = config

    def check_model(self, model: Any, where: str) -> None:
        _check_before_work(model, self.config, where, calibrated="sparsegpt")

    def prune(self, model: Any, ctx: CompressContext) -> dict[str, float]:
        import torch

        from unbottle.compression import calibrate_sequentially, damped_hessian_factor
        from unbottle.plugins.pruning.sparsegpt import sparsegpt_prune_together

        opts = self.config
        layers = prunable_linears(model, opts.layers)
        _check_reachable(model, layers, "sparsegpt")
        _check_pattern_fits(layers, opts.nm)
        if opts.nm is not None and opts.blocksize < opts.nm[1]:
            raise ConfigError(
                f"sparsegpt: blocksize {opts.blocksize} is smaller than M={opts.nm[1]}"
            )
        _check_calibration(ctx, "sparsegpt")
        budgets = _zero_budgets(model, layers, ctx, opts) if opts.nm is None else {}

        def process(group: Sequence[tuple[str, Any]], stats: Any) -> None:
            # q/k/v (and gate/up) share one input, hence one Hessian: factored once and
            # pruned as one stacked matrix, each layer with its own budget.
            pruned = sparsegpt_prune_together(
                [linear.weight for _, linear in group],
                damped_hessian_factor(stats.hessian, opts.damping).hinv_chol,
                zeros=None if opts.nm is not None else [budgets[name] for name, _ in group],
                pattern=opts.nm,
                blocksize=opts.blocksize,
            )
            for (_, linear), weight in zip(group, pruned, strict=True):
                linear.weight.copy_(weight)

        selected = {name for name, _ in layers}
        with torch.no_grad():
            calibrate_sequentially(
                model,
                ctx.calibration,
                process_together=process,
                select=lambda name: name in selected,
                hessian=True,
                batch_size=opts.batch_size,
                desc="sparsegpt",
            )
        return _sparsity_metrics(layers, opts)


# ------------------------------------------------------------------------- structured


def _amount(value: float) -> float:
    """A fraction in (0, 1) or a whole count (kept as an int)."""
    if value >= 1 and value != int(value):
        raise ValueError(f"{value} is neither a fraction in (0, 1) nor a whole count")
    return int(value) if value >= 1 else value


class Structured:
    """Physically remove attention heads, FFN channels and whole decoder layers, chosen by
    calibration-based importance (see ``unbottle.plugins.pruning.structured``).

    Each amount is a fraction in (0, 1) or a count, the same in every layer:
    ``heads``: query heads removed from every K/V group (a fraction of a group's heads, or
    a count over the layer that is a multiple of the K/V heads; K/V projections stay);
    ``kv_heads``: K/V heads removed, each with its query heads; ``ffn``: FFN channels;
    ``layers``: decoder layers, one contiguous run.
    """

    name = "structured"
    keeps_shape = False  # removes rows and columns: an N:M pattern before it would break

    class Config(StrategyConfig):
        heads: int | float = Field(0, ge=0)
        kv_heads: int | float = Field(0, ge=0)
        ffn: int | float = Field(0, ge=0)
        layers: int | float = Field(0, ge=0)
        batch_size: int = Field(8, ge=1)

        _whole_or_fraction = field_validator("heads", "kv_heads", "ffn", "layers")(_amount)

        @model_validator(mode="after")
        def _something_to_remove(self) -> Any:
            if not (self.heads or self.kv_heads or self.ffn or self.layers):
                raise ValueError(
                    "give at least one of heads, kv_heads, ffn, layers "
                    "(a fraction in (0, 1) or a count)"
                )
            return self

    def __init__(self, config: Config) -> None:
        self.config = config

    def check_model(self, model: Any, where: str) -> None:
        self.cut(model, where)

    def cut(self, model: Any, where: str = "structured") -> Any:
        """The counts to remove from this model, or a one-line error (beginning with
        ``where``) if they cannot be. A weightless copy of the model will do."""
        from unbottle.compression import decoder_blocks
        from unbottle.plugins.pruning.structured import Cut, Shape

        decoder_blocks(model)
        shape = Shape.of(model)
        opts = self.config

        def count(key: str, total: int, unit: str) -> int:
            value = getattr(opts, key)
            n = int(value * total + 0.5) if value < 1 else int(value)  # half up
            if value and n == 0:
                raise ConfigError(
                    f"{where}: {key} {value} removes nothing ({value} x {total} {unit} rounds to 0)"
                )
            return n

        def at_most(key: str, n: int, total: int, what: str) -> None:
            if n >= total:
                raise ConfigError(
                    f"{where}: {key} {getattr(opts, key)} would remove every {what} "
                    f"({total}); at most {total - 1}"
                )

        layers = count("layers", shape.layers, "decoder layers")
        at_most("layers", layers, shape.layers, "decoder layer")
        channels = count("ffn", shape.intermediate, "FFN channels")
        at_most("ffn", channels, shape.intermediate, "FFN channel")
        group = shape.group_size
        if group == 1:  # multi-head attention: a query head and its K/V head go together
            if opts.heads and opts.kv_heads:
                raise ConfigError(
                    f"{where}: this model has one query head per K/V head, so heads and "
                    "kv_heads mean the same; give one"
                )
            key = "heads" if opts.heads else "kv_heads"
            kv = count(key, shape.heads, "attention heads")
            at_most(key, kv, shape.heads, "attention head")
            return Cut(layers=layers, kv_heads=kv, heads_per_group=0, channels=channels)
        kv = count("kv_heads", shape.kv_heads, "K/V heads")
        at_most("kv_heads", kv, shape.kv_heads, "K/V head")
        groups = shape.kv_heads - kv
        if 0 < opts.heads < 1:
            per_group = count("heads", group, "query heads per K/V group")
        else:
            per_group = int(opts.heads) // groups
            if int(opts.heads) % groups:
                raise ConfigError(
                    f"{where}: heads {int(opts.heads)} cannot be taken evenly from "
                    f"{groups} K/V groups (each loses the same number); give a multiple "
                    f"of {groups}"
                )
        if per_group >= group:
            raise ConfigError(
                f"{where}: heads {opts.heads} would remove every query head of each K/V "
                f"group ({group} per group); at most {(group - 1) * groups} "
                f"({group - 1} per group)"
            )
        return Cut(layers=layers, kv_heads=kv, heads_per_group=per_group, channels=channels)

    def prune(self, model: Any, ctx: CompressContext) -> dict[str, float]:
        from unbottle.plugins.pruning.structured import (
            Shape,
            apply_plan,
            measure_importance,
            plan_cut,
        )

        cut = self.cut(model, ctx.where or "structured")
        _check_calibration(ctx, "structured")
        shape = Shape.of(model)
        before = sum(p.numel() for p in model.parameters())
        importance = measure_importance(
            model, ctx.calibration, span=cut.layers, batch_size=self.config.batch_size
        )
        plan = plan_cut(shape, cut, importance)
        apply_plan(model, plan)
        after = sum(p.numel() for p in model.parameters())
        config = model.config
        # What the fractions came to after rounding (heads: 0.25 of 3 per K/V group is 1,
        # a third): said here, not only in the metrics.
        log.info(
            "structured: query heads %d -> %d, K/V heads %d -> %d, FFN channels %d -> %d a "
            "layer; removed layers %s; %d -> %d parameters",
            shape.heads,
            config.num_attention_heads,
            shape.kv_heads,
            config.num_key_value_heads,
            shape.intermediate,
            config.intermediate_size,
            plan.removed_layers,
            before,
            after,
        )
        return {
            "sparsity": 1 - after / before,  # the fraction of parameters removed
            "parameters_before": before,
            "parameters_after": after,
            "layers_after": config.num_hidden_layers,
            "first_removed_layer": plan.removed_layers[0] if plan.removed_layers else -1,
            "heads_after": config.num_attention_heads,
            "kv_heads_after": config.num_key_value_heads,
            "intermediate_size_after": config.intermediate_size,
        }


@hookimpl
def register_pruners(register):
    register(Magnitude)
    register(Wanda)
    register(SparseGPT)
    register(Structured)
