"""Experiment tracking with MLflow, as a plugin of the lifecycle hooks.

Off unless ``UNBOTTLE_MLFLOW=1``; it needs the optional extra
(``pip install 'unbottle[mlflow]'``). Each stage that runs becomes one MLflow run, named
after the stage, in the experiment ``MLFLOW_EXPERIMENT_NAME`` (default ``unbottle``):

- params: the stage's config from its manifest, flattened (``train.lr``), and the
  strategies it used (``strategy.optimizer``: ``adamw (unbottle 0.1.0)``);
- metrics: every step's ``loss``, ``lr`` and ``tokens_per_s`` while training
  (:func:`on_train_log`), and the stage's own metrics when it ends, flattened with ``/``
  (``variants/finetuned/perplexity``);
- evaluate's table as an MLflow table (``evaluation_table.json``, one row per variant)
  and its ``report.md`` as an artifact;
- tags: the stage, the fingerprint of its output, the artifact directory.

The store is ``MLFLOW_TRACKING_URI`` when set, else the file store ``./mlruns`` in the
directory the command runs in: no server. MLflow 3 keeps the file store in maintenance
mode behind ``MLFLOW_ALLOW_FILE_STORE``, which this plugin sets for file URIs; point
``MLFLOW_TRACKING_URI`` at ``sqlite:///mlflow.db`` or a server to use a database backend.
"""

from __future__ import annotations

import atexit
import json
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from unbottle import hookimpl

ENABLE_ENV = "UNBOTTLE_MLFLOW"
DEFAULT_EXPERIMENT = "unbottle"
#: MLflow refuses longer param values.
_PARAM_LIMIT = 6000

# The run the current stage logs into: opened by its first training step or at its end.
_state: dict[str, Any] = {"client": None, "uri": None, "run_id": None}


def enabled() -> bool:
    return os.environ.get(ENABLE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or (Path.cwd() / "mlruns").as_uri()


def _client() -> Any:
    if _state["client"] is None or _state["uri"] != tracking_uri():
        try:
            from mlflow import MlflowClient
        except ImportError as e:
            raise ModuleNotFoundError(
                f"{ENABLE_ENV}=1 but mlflow is not installed: pip install 'unbottle[mlflow]'"
            ) from e
        uri = tracking_uri()
        if uri.startswith("file:") or "://" not in uri:
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        _state["client"], _state["uri"] = MlflowClient(tracking_uri=uri), uri
    return _state["client"]


def _run(stage: str) -> str:
    """The open run, or a new one named after ``stage``."""
    if _state["run_id"] is None:
        client = _client()
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", DEFAULT_EXPERIMENT)
        experiment = client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(name)
        run = client.create_run(experiment_id, run_name=stage, tags={"unbottle.stage": stage})
        _state["run_id"] = run.info.run_id
    return _state["run_id"]


def _end_run(status: str) -> None:
    if _state["run_id"] is not None:
        _state["client"].set_terminated(_state["run_id"], status=status)
        _state["run_id"] = None


@atexit.register
def _fail_open_run() -> None:
    """A stage that raised never reached after_stage: its run ended in failure."""
    _end_run("FAILED")


def flatten(tree: Mapping[str, Any], prefix: str = "", sep: str = ".") -> Iterator[tuple[str, Any]]:
    for key, value in tree.items():
        name = f"{prefix}{sep}{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            yield from flatten(value, name, sep)
        else:
            yield name, value


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@hookimpl
def on_train_log(stage: str, step: int, metrics: dict[str, float]) -> None:
    if not enabled():
        return
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    _client().log_batch(
        _run(stage),
        metrics=[Metric(key, float(value), now, step) for key, value in metrics.items()],
    )


@hookimpl
def after_stage(stage: str, artifact_dir: Path, metrics: dict[str, Any]) -> None:
    if not enabled():
        return
    from mlflow.entities import Metric, Param

    client, run_id = _client(), _run(stage)
    manifest = json.loads((artifact_dir / "manifest.json").read_text(encoding="utf-8"))
    params = {
        key: json.dumps(value) if isinstance(value, list | dict) else str(value)
        for key, value in flatten(manifest.get("config") or {})
    }
    for role, info in sorted(manifest.get("strategies", {}).items()):
        params[f"strategy.{role}"] = f"{info['name']} ({info['distribution']} {info['version']})"
    now = int(time.time() * 1000)
    values = [
        Metric(key, float(value), now, 0)
        for key, value in flatten(metrics, sep="/")
        if _is_number(value)
    ]
    client.set_tag(run_id, "mlflow.runName", stage)  # a run the kd distiller opened is compress's
    client.set_tag(run_id, "unbottle.fingerprint", str(manifest.get("fingerprint", "")))
    client.set_tag(run_id, "unbottle.artifact_dir", str(artifact_dir))
    # MLflow takes at most 100 params and 1000 metrics per batch.
    items = [Param(k, v[:_PARAM_LIMIT]) for k, v in params.items()]
    for start in range(0, len(items), 100):
        client.log_batch(run_id, params=items[start : start + 100])
    for start in range(0, len(values), 1000):
        client.log_batch(run_id, metrics=values[start : start + 1000])
    evaluation = artifact_dir / "evaluation.json"
    if evaluation.is_file():
        client.log_table(run_id, data=_table(evaluation), artifact_file="evaluation_table.json")
        client.log_artifact(run_id, str(artifact_dir / "report.md"))
    _end_run("FINISHED")


def _table(evaluation: Path) -> dict[str, list[Any]]:
    """evaluate's rows as columns: ``variant`` and every metric any row has."""
    data = json.loads(evaluation.read_text(encoding="utf-8"))
    rows = data["variants"]
    order = data.get("order", list(rows))
    keys: list[str] = []
    for name in order:
        keys.extend(k for k in rows[name] if k not in keys)
    table: dict[str, list[Any]] = {"variant": list(order)}
    for key in keys:
        table[key] = [rows[name].get(key) for name in order]
    return table
