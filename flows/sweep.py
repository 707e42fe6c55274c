"""The sweep flow: every compressed variant a mapped Prefect task, all in one report.

``unbottle sweep`` runs it. pretrain and finetune run as the pipeline's stage tasks
(skipped when current); then one task per variant compresses it and one task per model
measures it; the rows become one report under ``artifacts/sweep/evaluation``. Variants
that share a recipe prefix reuse it through the compress prefix cache, kept in
``.cache/unbottle/prefixes`` so that a later sweep reuses it too; a variant or a model's
row unchanged since an earlier run comes from the variant and row caches beside it
(:mod:`unbottle.core.store.cache`), so a sweep that changes one point redoes that point.

Where the tasks run is the task runner's business (``task_runner``): by default one at a
time in this process; with ``dask`` or ``ray`` (the ``[dask]`` / ``[ray]`` extras) on a
cluster, a local one or one at an address. Variants compress in waves (``build_order``):
the first variant to reach a shared recipe prefix computes it, the ones that start with it
run in a later wave and find it in the cache, and variants within a wave run in parallel.
Evaluations run one at a time on any runner: a speed measured while another model runs
beside it on the same cores would measure the contention.

The sweep explores; it deploys nothing. It reports the variant that ``deploy.policy``
would pick among those passing ``deploy.gates``, or why none passes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task, unmapped
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner

from unbottle.core.config.loading import load_params
from unbottle.core.contract.errors import ConfigError
from unbottle.core.stages.layout import Layout

SWEEP_DIR = "sweep"
PREFIX_CACHE = Path(".cache") / "unbottle" / "prefixes"
RUNNERS = ("thread", "dask", "ray")


def task_runner(kind: str = "thread", *, address: str | None = None, workers: int = 2) -> Any:
    """The Prefect task runner a sweep's tasks go through.

    ``thread``: one task at a time in this process. ``dask``: a Dask cluster, the one at
    ``address`` (``tcp://host:8786``) or a local one of ``workers`` single-threaded
    processes. ``ray``: a Ray cluster at ``address`` (``ray://host:10001``) or a local one
    with ``workers`` CPUs.
    """
    if kind == "thread":
        return ThreadPoolTaskRunner(max_workers=1)
    if kind not in RUNNERS:
        raise ConfigError(f"--runner: {kind!r} is not a runner; choose one of {', '.join(RUNNERS)}")
    if workers < 1:
        raise ConfigError(f"--workers: {workers} workers; at least 1 needed")
    try:
        if kind == "dask":
            from prefect_dask import DaskTaskRunner

            if address:
                return DaskTaskRunner(address=address)
            return DaskTaskRunner(
                cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True}
            )
        from prefect_ray import RayTaskRunner

        if address:  # ray.init refuses a CPU count for a cluster that exists already
            return RayTaskRunner(address=address)
        return RayTaskRunner(init_kwargs={"num_cpus": workers})
    except ImportError:
        raise ConfigError(
            f"--runner {kind}: prefect-{kind} is not installed; pip install 'unbottle[{kind}]'"
        ) from None


def _params(params_file: str | None, overrides: list[str]):
    return load_params(Path(params_file) if params_file else None, overrides)


@task(task_run_name="compress {name}", cache_policy=NO_CACHE)
def compress_variant(
    name: str, params_file: str | None, overrides: list[str], root: str, staging: str
) -> dict[str, Any]:
    """Build one variant into the staging directory, through the prefix cache; a variant
    unchanged since an earlier sweep or pipeline run comes from the variant cache."""
    from unbottle.core.registry import get_registry
    from unbottle.core.stages.compress import PrefixCache, prepare, reuse_or_build
    from unbottle.core.store.cache import VariantCache, cache_root
    from unbottle.core.store.cache_pruning import using_cache

    params = _params(params_file, overrides)
    layout = Layout(Path(root))
    with using_cache(cache_root(layout.root)):
        bench = prepare(
            params.compress,
            model=layout.artifact("finetune"),
            train_text=layout.resolve(params.data.train_text),
            seed=params.seed,
            registry=get_registry(),
            token_cache=cache_root(layout.root) / "tokens",
            qa_train=layout.resolve(params.data.qa_train),
        )
        cache = PrefixCache(layout.root / PREFIX_CACHE)
        variants = VariantCache(cache_root(layout.root) / "variants")
        return reuse_or_build(bench, name, Path(staging) / name, variants, cache, None)


@task(task_run_name="evaluate {name}", cache_policy=NO_CACHE)
def evaluate_model(
    name: str, model_dir: str, params_file: str | None, overrides: list[str], root: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every configured metric on one model: (row, samples); a row cached for the same
    model, metrics and data is reused as it was measured."""
    from unbottle.core.data import prompts as qa
    from unbottle.core.data.corpus import Corpus
    from unbottle.core.data.prompts import prompt_format_of
    from unbottle.core.registry import get_registry
    from unbottle.core.stages.evaluate import create_metrics, measure_all, resolve_device
    from unbottle.core.store.cache import cache_root
    from unbottle.core.store.cache_pruning import using_cache

    params = _params(params_file, overrides)
    layout = Layout(Path(root))
    cfg = params.evaluate
    registry = get_registry()
    with using_cache(cache_root(layout.root)):
        results, _ = measure_all(
            {name: Path(model_dir)},
            create_metrics(cfg, registry),
            valid_text=Corpus(layout.resolve(params.data.valid_text), "data.valid_text"),
            questions=qa.read_pairs(layout.resolve(params.data.qa_test), "data.qa_test")[
                : cfg.max_questions
            ],
            seed=params.seed,
            device=resolve_device(cfg.device),
            prompt_format=prompt_format_of(layout.artifact("finetune")),
            train_pairs=qa.read_pairs(layout.resolve(params.data.qa_train), "data.qa_train"),
            registry=registry,
            row_cache=cache_root(layout.root) / "evaluations",
        )
    return results[name]


@flow(name="unbottle-sweep", task_runner=ThreadPoolTaskRunner(max_workers=1))
def sweep(
    params_file: str | None = None, overrides: list[str] | None = None, root: str = "."
) -> dict[str, Any]:
    """pretrain -> finetune -> compress each variant -> evaluate each -> one report."""
    from unbottle.core.config.schema import BASELINE
    from unbottle.core.contract.errors import GateError
    from unbottle.core.stages.compress import (
        build_order,
        compress_inputs,
        plan_prefixes,
        write_index,
    )
    from unbottle.core.stages.evaluate import PRETRAINED, write_evaluation
    from unbottle.core.stages.runner import setup
    from unbottle.core.store.artifacts import atomic_dir, tree_hash
    from unbottle.flows.pipeline import stage_task, submit_stage
    from unbottle.flows.publish import decide_deployment, publish_evaluation

    logger = get_run_logger()
    overrides = list(overrides or [])
    root_path = Path(root).resolve()
    params = _params(params_file, overrides)
    registry = setup(params)  # every strategy of every grid point checked before any work
    names = list(params.compress.variants)
    if not names:
        raise ConfigError("compress: no variants to sweep; add compress.sweep or .variants")
    layout = Layout(root_path)
    args = (params_file, overrides, str(root_path))

    upstream: list[Any] = []
    for stage in ("pretrain", "finetune"):
        future = submit_stage(stage_task, stage, *args, wait_for=upstream)
        future.result()
        upstream = [future]

    out = layout.artifacts / SWEEP_DIR
    variants_dir = out / "variants"
    inputs = compress_inputs(
        params.compress,
        model=layout.artifact("finetune"),
        train_text=tree_hash(layout.resolve(params.data.train_text)),
        qa_train=layout.resolve(params.data.qa_train),
    )
    waves = build_order(
        plan_prefixes(params.compress, inputs=inputs, seed=params.seed, registry=registry)
    )
    built: dict[str, dict[str, Any]] = {}
    with atomic_dir(variants_dir) as staging:
        for wave in waves:
            results = compress_variant.map(
                wave, *(unmapped(a) for a in args), staging=unmapped(str(staging))
            ).result()
            built.update(zip(wave, results, strict=True))
        write_index(staging, params.compress, inputs, names)
    reused = {name: built[name]["reused_steps"] for name in names}
    logger.info("recipe steps reused from the prefix cache: %s", reused)

    targets = {
        PRETRAINED: layout.artifact("pretrain"),
        BASELINE: layout.artifact("finetune"),
        **{name: variants_dir / name for name in names},
    }
    measured = [
        evaluate_model.submit(name, str(path), *args).result() for name, path in targets.items()
    ]
    evaluation_dir = out / "evaluation"
    write_evaluation(
        params.evaluate,
        dict(zip(targets, measured, strict=True)),
        out_dir=evaluation_dir,
        registry=registry,
        inputs={name: tree_hash(path) for name, path in targets.items()},
        stage="sweep",
    )
    publish_evaluation(evaluation_dir, key="unbottle-sweep")
    try:
        chosen: str | None = decide_deployment(params, evaluation_dir).chosen
    except GateError as e:
        logger.warning("no deploy candidate: %s", e)
        chosen = None
    return {
        "report": str(evaluation_dir / "report.md"),
        "variants": names,
        "reused_steps": reused,
        "would_deploy": chosen,
    }
