"""Deployment: hand the chosen, evaluated variant to a deploy target."""

from __future__ import annotations

from pathlib import Path

from unbottle.core.artifacts import atomic_dir, tree_hash, write_manifest
from unbottle.core.config import DeployParams
from unbottle.core.errors import ConfigError
from unbottle.core.registry import Registry
from unbottle.core.stage import StageResult, strategy_record
from unbottle.core.strategies import DeployContext


def deploy(
    cfg: DeployParams,
    *,
    baseline: Path,
    variants_dir: Path,
    evaluation: Path,
    out_dir: Path,
    registry: Registry,
) -> StageResult:
    from unbottle.core.artifacts import verify_artifact
    from unbottle.core.evaluate import read_evaluation, variant_dirs
    from unbottle.core.runtime import model_format

    target = registry.create("deploy_target", cfg.target.name, cfg.target.options)
    rows, table = read_evaluation(evaluation)
    dirs = variant_dirs(baseline, variants_dir)
    if cfg.variant not in dirs or cfg.variant not in rows:
        raise ConfigError(
            f"deploy.variant: {cfg.variant!r} was not evaluated; evaluated: {', '.join(rows)}"
        )
    model_dir = dirs[cfg.variant]
    manifest = verify_artifact(model_dir)
    fmt = model_format(model_dir)
    if fmt not in target.accepts:
        raise ConfigError(
            f"deploy.target: {target.name!r} ships {', '.join(target.accepts)} models, but "
            f"variant {cfg.variant!r} is {fmt}; choose another variant or target"
        )
    ctx = DeployContext(
        variant=cfg.variant,
        model_format=fmt,
        metrics=rows[cfg.variant],
        report_markdown=table,
        manifest=manifest,
    )
    with atomic_dir(out_dir) as tmp:
        facts = target.deploy(model_dir, tmp, ctx)
        write_manifest(
            tmp,
            stage="deploy",
            config=cfg.model_dump(mode="json"),
            strategies={
                "deploy_target": strategy_record(registry.get("deploy_target", target.name))
            },
            inputs={"model": tree_hash(model_dir), "evaluation": tree_hash(evaluation)},
            metrics=facts,
            extra={"variant": cfg.variant, "format": fmt},
        )
    return StageResult(out_dir, {"variant": cfg.variant, **facts})
