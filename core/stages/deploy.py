"""Deployment: choose the variant the evidence supports, then hand it to a deploy target.

The choice (:func:`choose_variant`) reads the evaluation: every candidate (the finetuned
model and each compressed variant; the pretrained model is only a reference) is checked
against ``deploy.gates``, and ``deploy.policy`` picks among those that pass: the one
named by ``deploy.variant`` (``explicit``), the ``smallest`` on disk, the ``fastest`` at
decoding, or the ``best`` by ``deploy.quality``. When nothing passes, deployment stops
with one line naming each variant and the limits it broke.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from unbottle.core.config.evaluation_plan import DERIVED_METRICS, POLICY_METRICS
from unbottle.core.config.schema import BASELINE, DeployParams, GateLimit
from unbottle.core.contract.errors import ConfigError, GateError
from unbottle.core.contract.strategies import DeployContext
from unbottle.core.registry import Registry
from unbottle.core.stages.layout import StageResult, split_timings, strategy_record
from unbottle.core.stages.report import RANGES, add_ratios, ranges_overlap
from unbottle.core.store.artifacts import atomic_dir, tree_hash, write_manifest

if TYPE_CHECKING:
    from unbottle.core.stages.evaluate import EvaluationInputs

log = logging.getLogger("unbottle.deploy")
REFERENCE = "pretrained"  # measured for comparison, never deployed


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def broken_limits(row: dict[str, Any], gates: dict[str, GateLimit]) -> list[str]:
    """Each gate ``row`` breaks, as ``metric value < min limit``; empty when it passes."""
    broken = []
    for metric, limit in gates.items():
        value = row.get(metric)
        if value is None and metric in DERIVED_METRICS and DERIVED_METRICS[metric][0] in row:
            source = DERIVED_METRICS[metric][0]
            broken.append(f"{metric} has no value: the finetuned model's {source} is 0 or missing")
        elif value is None:
            broken.append(f"{metric} was not measured")
        elif limit.min is not None and value < limit.min:
            broken.append(f"{metric} {_fmt(value)} < min {_fmt(limit.min)}")
        elif limit.max is not None and value > limit.max:
            broken.append(f"{metric} {_fmt(value)} > max {_fmt(limit.max)}")
    return broken


def metric_directions(registry: Registry) -> dict[str, str | None]:
    """Which way is better for every metric name an installed metric lists."""
    directions: dict[str, str | None] = {}
    for name in registry.names("metric"):
        listing = getattr(registry.get("metric", name).cls, "produces", None)
        if isinstance(listing, dict):
            directions.update(listing)
    directions.update({k: better for k, (_, better) in DERIVED_METRICS.items()})
    return directions


@dataclass
class Decision:
    """Which variant deploys, by which policy, and how every candidate fared."""

    chosen: str
    policy: str
    ranked_by: str | None
    gates: dict[str, GateLimit]
    verdicts: dict[str, list[str]] = field(default_factory=dict)  # variant -> broken limits
    # The variants the ranking could not tell apart (overlapping measured ranges), from
    # which the better quality was chosen; empty when the ranking decided alone.
    tied: list[str] = field(default_factory=list)
    tie_break: str | None = None  # the quality metric that chose among them

    def gates_text(self) -> str:
        parts = []
        for metric, limit in self.gates.items():
            if limit.min is not None:
                parts.append(f"{metric} ≥ {_fmt(limit.min)}")
            if limit.max is not None:
                parts.append(f"{metric} ≤ {_fmt(limit.max)}")
        return ", ".join(parts) or "none"

    def markdown(self) -> str:
        how = f"`{self.policy}`" + (f" (by {self.ranked_by})" if self.ranked_by else "")
        if self.tied:
            how += (
                f"; {', '.join(self.tied)} decode equally fast within the ranges their "
                f"requests measured, so {self.tie_break} chose"
            )
        rows = "\n".join(
            f"| {name} | {'; '.join(broken) or 'pass'} |"
            + (" **deployed** |" if name == self.chosen else " |")
            for name, broken in self.verdicts.items()
        )
        return (
            "### Deployment decision\n\n"
            f"Policy {how} among the variants that pass the gates: {self.gates_text()}.\n\n"
            f"| variant | gates | |\n|---|---|---|\n{rows}\n"
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "chosen": self.chosen,
            "policy": self.policy,
            "ranked_by": self.ranked_by,
            "gates": {k: v.model_dump(exclude_none=True) for k, v in self.gates.items()},
            "verdicts": self.verdicts,
            "tied": self.tied,
            "tie_break": self.tie_break,
        }


def choose_variant(
    cfg: DeployParams,
    rows: dict[str, dict[str, Any]],
    directions: dict[str, str | None],
    accepts: tuple[str, ...] | None = None,
) -> Decision:
    """Apply the gates and the policy to evaluated rows (in params order).

    ``accepts``: the model formats the deploy target ships; a variant in another format
    fails as if it broke a gate.
    """
    candidates = [name for name in rows if name != REFERENCE]
    for metric in cfg.gates:
        if not any(metric in rows[name] for name in candidates):
            measured = sorted({k for n in candidates for k in rows[n]})
            raise ConfigError(
                f"deploy.gates.{metric}: no evaluated variant has {metric!r}; "
                f"measured: {', '.join(measured)}"
            )
    verdicts = {name: broken_limits(rows[name], cfg.gates) for name in candidates}
    for name in candidates:
        fmt = rows[name].get("format")
        if accepts is not None and fmt not in accepts:
            ships = "/".join(accepts)
            verdicts[name].append(f"format {fmt} (target {cfg.target.name} ships {ships})")
    passing = [name for name in candidates if not verdicts[name]]
    if not passing:
        raise GateError(
            "deploy.gates: no variant passes; "
            + "; ".join(f"{name}: {', '.join(broken)}" for name, broken in verdicts.items())
        )

    if cfg.policy == "explicit":
        if cfg.variant not in verdicts:
            raise ConfigError(
                f"deploy.variant: {cfg.variant!r} was not evaluated; evaluated: "
                f"{', '.join(candidates)}"
            )
        if verdicts[cfg.variant]:
            raise GateError(
                f"deploy.variant: {cfg.variant!r} fails deploy.gates "
                f"({', '.join(verdicts[cfg.variant])}); passing: {', '.join(passing)}"
            )
        return Decision(cfg.variant, cfg.policy, None, dict(cfg.gates), verdicts)

    metric, better = POLICY_METRICS.get(cfg.policy, (cfg.quality, None))
    better = better or directions.get(metric)
    if better is None:
        raise ConfigError(f"deploy.quality: which way {metric!r} is better is not known")
    unmeasured = [name for name in passing if metric not in rows[name]]
    if unmeasured:
        raise ConfigError(
            f"deploy.policy: {cfg.policy!r} ranks by {metric}, which was not measured for "
            f"{', '.join(unmeasured)}"
        )
    sign = 1 if better == "lower" else -1
    chosen = min(passing, key=lambda name: (sign * rows[name][metric], candidates.index(name)))
    decision = Decision(chosen, cfg.policy, metric, dict(cfg.gates), verdicts)
    # A measured figure (decode speed) whose requests' ranges overlap the chosen one's
    # cannot be told from it: among those, the better quality deploys.
    low, high = RANGES.get(metric, ("", ""))
    if all(low in rows[n] and high in rows[n] for n in passing):
        measured = {n: (rows[n][low], rows[n][high]) for n in passing}
        tied = [n for n in passing if ranges_overlap(measured[n], measured[chosen])]
        q_better = directions.get(cfg.quality)
        if len(tied) > 1 and q_better and all(cfg.quality in rows[n] for n in tied):
            q_sign = 1 if q_better == "lower" else -1
            decision.chosen = min(
                tied, key=lambda n: (q_sign * rows[n][cfg.quality], candidates.index(n))
            )
            decision.tied, decision.tie_break = tied, cfg.quality
    return decision


def decide(cfg: DeployParams, evaluation: Path, registry: Registry) -> Decision:
    """The decision for an evaluate stage's output (what the flow checks before deploy)."""
    from unbottle.core.stages.evaluate import read_evaluation

    rows, _ = read_evaluation(evaluation)
    accepts = registry.get("deploy_target", cfg.target.name).cls.accepts
    return choose_variant(cfg, rows, metric_directions(registry), tuple(accepts))


def ships_unchanged(target: Any, model_format: str) -> bool:
    """Whether ``target`` ships a ``model_format`` variant as it was evaluated (see
    :class:`unbottle.core.contract.strategies.DeployTarget`); a target that does not say
    has every bundle measured."""
    return model_format in tuple(getattr(target, "ships_unchanged", ()))


def bundle_runner(target: Any, bundle: Path, device: str) -> Any:
    """The runtime the bundle ships in: the target's own runner, or unbottle's for an
    ``hf``, ``packed`` or ``onnx`` directory."""
    if callable(getattr(target, "runner", None)):
        return target.runner(bundle, device)
    from unbottle.core.models.runtimes import load_runner

    return load_runner(bundle, device)


def measure_bundle(
    target: Any,
    bundle: Path,
    measure_with: EvaluationInputs,
    metrics: list[tuple[str, Any]],
    *,
    label: str,
    reference: dict[str, Any],
    prompt_format: Any,
) -> tuple[dict[str, Any], str]:
    """The bundle's row: the evaluate stage's metrics, run on what the target wrote, in
    the runtime it ships in, with the perplexity ratios to ``reference`` (the finetuned
    model's row, as the evaluation computes them); and where it was measured, in words."""
    from unbottle.core.stages.evaluate import resolve_device

    device = resolve_device(measure_with.cfg.device)
    log.info("deploy: %s is a new model; measuring it as the evaluate stage does", label)
    runner = bundle_runner(target, bundle, device)
    row, _ = measure_with.measure(
        runner,
        bundle,
        metrics,
        prompt_format=prompt_format,
        label=label,
    )
    add_ratios({label: row}, reference)
    # Where the figures come from, for the card: the runner's own words, else its format.
    runtime = getattr(runner, "runtime", None)
    return row, f"in {runtime}" if runtime else f"in the runtime it ships in (`{row['format']}`)"


def shipped_markdown(label: str, row: dict[str, Any], how: str, columns: Any = ()) -> str:
    """The card's table of the bundle itself, and where its figures come from."""
    from unbottle.core.stages.report import markdown_table

    return f"### This bundle, as shipped\n\n{how}\n\n{markdown_table({label: row}, None, columns)}"


def deploy(
    cfg: DeployParams,
    *,
    baseline: Path,
    variants_dir: Path,
    evaluation: Path,
    out_dir: Path,
    registry: Registry,
    measure_with: EvaluationInputs | None = None,
) -> StageResult:
    """Ship the variant the gates and policy choose with ``deploy.target``.

    A target that writes a new model from the variant (see :func:`ships_unchanged`) has
    its bundle measured with ``measure_with`` (the evaluate stage's metrics and data), in
    the runtime the bundle ships in; the gates apply to that row, which the card, the
    manifest and the stage's metrics record. A gate it breaks stops the stage, and
    nothing is written.
    """
    from dataclasses import replace

    from unbottle.core.data.prompts import prompt_format_of
    from unbottle.core.models.runtimes import model_format
    from unbottle.core.stages.evaluate import example_question, read_evaluation, variant_dirs
    from unbottle.core.stages.report import markdown_table, plugin_columns
    from unbottle.core.store.artifacts import verify_artifact

    target = registry.create("deploy_target", cfg.target.name, cfg.target.options)
    rows, table = read_evaluation(evaluation)
    decision = choose_variant(cfg, rows, metric_directions(registry), tuple(target.accepts))
    variant = decision.chosen
    dirs = variant_dirs(baseline, variants_dir)
    if variant not in dirs:
        raise ConfigError(
            f"deploy: variant {variant!r} was evaluated but is not among the compressed "
            f"variants ({', '.join(dirs)}); rerun compress and evaluate"
        )
    model_dir = dirs[variant]
    manifest = verify_artifact(model_dir)
    fmt = model_format(model_dir)
    if fmt not in target.accepts:
        raise ConfigError(
            f"deploy.target: {target.name!r} ships {', '.join(target.accepts)} models, but "
            f"variant {variant!r} is {fmt}; choose another variant or target"
        )
    unchanged = ships_unchanged(target, fmt)
    metrics: list[tuple[str, Any]] = []
    columns: Any = ()
    if measure_with is not None:
        columns = plugin_columns(
            registry.get("metric", r.name).cls for r in measure_with.cfg.metrics
        )
    if not unchanged:
        if measure_with is None:
            raise ConfigError(
                f"deploy.target: {target.name!r} writes a new model from a {fmt} variant, "
                "which must be measured, but no evaluation inputs were given"
            )
        metrics = measure_with.setup(registry)  # checked before any work
    decision_md = decision.markdown()
    evaluated = f"### Candidates, as the evaluate stage measured them\n\n{table}"
    prompt_format = prompt_format_of(baseline)
    ctx = DeployContext(
        variant=variant,
        model_format=fmt,
        metrics=rows[variant],
        report_markdown=(
            shipped_markdown(
                variant,
                rows[variant],
                f"The variant `{variant}` as it was evaluated: this bundle ships it unchanged.",
                columns,
            )
            + f"\n\n{evaluated}\n\n{decision_md}"
            if unchanged
            else f"{evaluated}\n\n{decision_md}"
        ),
        manifest=manifest,
        example_question=example_question(evaluation),
        prompt_format=prompt_format,
    )
    with atomic_dir(out_dir) as tmp:
        facts = target.deploy(model_dir, tmp, ctx)
        if unchanged:
            measured = {"source": "evaluate", "row": rows[variant]}
        else:
            assert measure_with is not None
            label = f"{variant} ({target.name} bundle)"
            row, measured_in = measure_bundle(
                target,
                tmp,
                measure_with,
                metrics,
                label=label,
                reference=rows.get(BASELINE, {}),
                prompt_format=prompt_format,
            )
            broken = broken_limits(row, cfg.gates)
            if broken:
                raise GateError(
                    f"deploy.gates: the {target.name} bundle of {variant!r} fails: "
                    f"{', '.join(broken)} (the evaluated variant passed)"
                )
            measured = {"source": "deploy", "row": row}
            log.info("deploy: as shipped:\n%s", markdown_table({label: row}, None, columns))
            gates = decision.gates_text()
            how = (
                f"The `{target.name}` target wrote a new model from the `{fmt}` variant "
                f"`{variant}`: these are that bundle's figures, measured after it was written "
                f"with the evaluate stage's metrics, {measured_in}. "
                + (f"It passes the gates ({gates})." if decision.gates else "No gates are set.")
            )
            if callable(getattr(target, "write_card", None)):
                target.write_card(
                    tmp,
                    replace(
                        ctx,
                        metrics=row,
                        report_markdown=(
                            f"{shipped_markdown(label, row, how, columns)}\n\n"
                            f"{evaluated}\n\n{decision_md}"
                        ),
                    ),
                )
        facts = {**facts, "measured": measured}
        write_manifest(
            tmp,
            stage="deploy",
            config=cfg.model_dump(mode="json"),
            strategies={
                "deploy_target": strategy_record(registry.get("deploy_target", target.name))
            },
            inputs={
                "model": tree_hash(model_dir),
                "evaluation": tree_hash(evaluation),
                **(measure_with.hashes() if not unchanged and measure_with else {}),
            },
            metrics=split_timings(facts)[0],  # what the bundle is, not this machine's speed
            extra={"variant": variant, "format": fmt, "decision": decision.as_dict()},
        )
    return StageResult(out_dir, {"variant": variant, "policy": cfg.policy, **facts})
