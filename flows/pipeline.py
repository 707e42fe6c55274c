"""The Prefect flow: the five stages as tasks, each a thin wrapper over core's run_stage."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from unbottle.core.config import load_params
from unbottle.core.pipeline import run_stage, setup
from unbottle.core.stage import STAGES, Layout


@task(task_run_name="{name}")
def stage_task(name: str, params_file: str | None, overrides: list[str], root: str) -> dict:
    """Run one stage through core; the same function `unbottle stage` calls."""
    logger = get_run_logger()
    params = load_params(Path(params_file) if params_file else None, overrides)
    result = run_stage(name, params, Layout(Path(root)))
    logger.info("%s wrote %s", name, result.out_dir)
    return result.metrics


def record_in_dvc(root: Path) -> bool:
    """Make dvc.lock describe the outputs this flow wrote, so `dvc repro` has nothing to do."""
    if not ((root / ".dvc").is_dir() and (root / "dvc.yaml").is_file()):
        return False
    subprocess.run(
        [sys.executable, "-m", "dvc", "commit", "--force", *STAGES],
        cwd=root,
        check=True,
    )
    return True


@flow(name="unbottle-pipeline")
def pipeline(
    params_file: str | None = None, overrides: list[str] | None = None, root: str = "."
) -> dict[str, Any]:
    """pretrain -> finetune -> compress -> evaluate -> deploy, on one params file."""
    logger = get_run_logger()
    overrides = list(overrides or [])
    root_path = Path(root).resolve()
    params = load_params(Path(params_file) if params_file else None, overrides)
    setup(params)  # every strategy resolved and validated before the first stage

    results: dict[str, dict] = {}
    upstream: list[Any] = []
    for name in STAGES:
        future = stage_task.submit(name, params_file, overrides, str(root_path), wait_for=upstream)
        results[name] = future.result()
        upstream = [future]

    from unbottle.core.evaluate import read_evaluation

    layout = Layout(root_path)
    rows, table = read_evaluation(layout.artifact("evaluate"))
    create_markdown_artifact(key="unbottle-evaluation", markdown=f"# Evaluation\n\n{table}\n")
    create_table_artifact(
        key="unbottle-evaluation-table",
        table=[{"variant": name, **row} for name, row in rows.items()],
    )
    # Only a run of the workspace's own params.yaml describes what dvc.yaml would run.
    own_params = params_file in (None, "params.yaml", str(root_path / "params.yaml"))
    if not overrides and own_params and record_in_dvc(root_path):
        logger.info("dvc.lock now describes this run's outputs")
    return {
        "deployed": str(layout.artifact("deploy")),
        "report": str(layout.artifact("evaluate") / "report.md"),
        "metrics": results,
    }
