"""The Prefect flow: the five stages as tasks, each a thin wrapper over core's run_stage.

Each task's cache key is the stage's content fingerprint (inputs, params slice, code and
plugin versions; see ``unbottle.core.store.fingerprint``). The flows submit through
``submit_stage``, which refreshes the cache whenever the artifact on disk is not current
for that fingerprint, so a deleted or edited artifact is rebuilt, and stores the result
under the key either way: the next run with nothing changed finds every task cached, and
changing one compress parameter reruns compress and what follows. I/O-bound tasks (deploy,
recording in DVC) retry with backoff; training does not.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.context import TaskRunContext
from prefect.tasks import exponential_backoff

from unbottle.core.config.loading import load_params
from unbottle.core.stages.layout import STAGES, Layout
from unbottle.core.stages.runner import run_stage, setup
from unbottle.flows.dvc_lock import DvcError, dvc, is_dvc_project, record_stages
from unbottle.flows.publish import decide_deployment, publish_evaluation

IO_RETRIES = {"retries": 3, "retry_delay_seconds": exponential_backoff(backoff_factor=2)}


def stage_fingerprint(
    name: str, params_file: str | None, overrides: list[str], root: str
) -> tuple[str, bool]:
    """The stage's fingerprint, and whether its artifact on disk is current for it."""
    from unbottle.core.registry import get_registry
    from unbottle.core.store import fingerprint

    layout = Layout(Path(root))
    stamp = fingerprint.fingerprint(name, _params(params_file, overrides), layout, get_registry())
    return stamp, fingerprint.is_current(layout.artifact(name), stamp, layout.metrics_file(name))


def stage_cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str | None:
    """The stage's fingerprint while its artifact is current; no key (run it) otherwise.

    Safe for a direct ``stage_task`` call, but such a run stores its result under no key:
    the flows submit through :func:`submit_stage`, which stores it under the fingerprint."""
    stamp, current = stage_fingerprint(**parameters)
    return f"unbottle-{parameters['name']}-{stamp}" if current else None


def submit_stage(
    runner: Any, name: str, params_file: str | None, overrides: list[str], root: str, **submit
) -> Any:
    """Submit stage task ``runner`` with its result stored under the stage's fingerprint
    whether it runs or not, so the next run with nothing changed finds it cached; when the
    artifact on disk is not current the cache is refreshed, so a deleted or edited
    artifact is rebuilt. Call it once the stages before have finished: the fingerprint
    hashes what they wrote."""
    stamp, current = stage_fingerprint(name, params_file, overrides, root)
    key = f"unbottle-{name}-{stamp}"
    runner = runner.with_options(
        cache_key_fn=lambda context, parameters: key,
        # None: Prefect's own setting (PREFECT_TASKS_REFRESH_CACHE) decides, false by default.
        refresh_cache=None if current else True,
    )
    return runner.submit(name, params_file, overrides, root, **submit)


def _params(params_file: str | None, overrides: list[str]):
    return load_params(Path(params_file) if params_file else None, overrides)


@task(
    task_run_name="{name}",
    cache_key_fn=stage_cache_key,
    persist_result=True,
    result_serializer="json",
)
def stage_task(name: str, params_file: str | None, overrides: list[str], root: str) -> dict:
    """Run one stage through core; the same function `unbottle stage` calls."""
    logger = get_run_logger()
    result = run_stage(name, _params(params_file, overrides), Layout(Path(root)))
    logger.info(
        "%s %s %s", name, "was up to date in" if result.skipped else "wrote", result.out_dir
    )
    return result.metrics


def check_default_remote(root: Path) -> str:
    """The default remote's name; fails in one line when there is none."""
    try:
        name = dvc(root, "remote", "default").strip()
    except DvcError:
        name = ""
    if not name:
        raise DvcError(
            "dvc push: this project has no default remote; add one with "
            "`dvc remote add -d NAME URL`"
        )
    return name


@task(**IO_RETRIES)
def record_in_dvc(root: str) -> None:
    """Make dvc.lock describe the outputs this flow wrote, so `dvc repro` has nothing to do."""
    record_stages(Path(root), STAGES)


@task(**IO_RETRIES)
def push_to_dvc_remote(root: str) -> None:
    """Upload data and artifacts to the default DVC remote."""
    dvc(Path(root), "push")


@flow(name="unbottle-pipeline")
def pipeline(
    params_file: str | None = None,
    overrides: list[str] | None = None,
    root: str = ".",
    push: bool = False,
) -> dict[str, Any]:
    """pretrain -> finetune -> compress -> evaluate -> deploy, on one params file."""
    logger = get_run_logger()
    overrides = list(overrides or [])
    root_path = Path(root).resolve()
    params = _params(params_file, overrides)
    setup(params)  # every strategy resolved and validated before the first stage

    layout = Layout(root_path)
    results: dict[str, dict] = {}
    upstream: list[Any] = []
    for name in STAGES:
        if name == "deploy":
            # The report is published and the gates checked before anything deploys: when
            # no variant passes, the flow stops here, naming each one and the limit it broke.
            publish_evaluation(layout.artifact("evaluate"))
            decide_deployment(params, layout.artifact("evaluate"))
        runner = stage_task.with_options(**IO_RETRIES) if name == "deploy" else stage_task
        future = submit_stage(
            runner, name, params_file, overrides, str(root_path), wait_for=upstream
        )
        results[name] = future.result()
        upstream = [future]

    # Only a run of the workspace's own params.yaml describes what dvc.yaml would run.
    own_params = params_file in (None, "params.yaml", str(root_path / "params.yaml"))
    if not overrides and own_params and is_dvc_project(root_path):
        record_in_dvc(str(root_path))
        logger.info("dvc.lock now describes this run's outputs")
        if push:
            push_to_dvc_remote(str(root_path))
            logger.info("pushed data and artifacts to the default DVC remote")
    return {
        "deployed": str(layout.artifact("deploy")),
        "report": str(layout.artifact("evaluate") / "report.md"),
        "metrics": results,
    }
