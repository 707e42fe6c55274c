"""`unbottle sweep`'s flow against Prefect's test server: one mapped task per variant,
the shared recipe prefix computed once across tasks, every variant a row of one report."""

from __future__ import annotations

import copy
import json
import shutil

import pytest

from tests.conftest import make_workspace
from tests.test_evaluate import SWEEP_PARAMS, save_random_model


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    import os

    os.environ.setdefault("PREFECT_HOME", str(tmp_path_factory.mktemp("prefect-home")))
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


def stamped_workspace(tmp_path, tiny_data):
    """A sweep workspace whose pretrain and finetune outputs are random-weight models,
    stamped as current so the flow's stage tasks skip them (no training in these tests)."""
    from unbottle.core.config.schema import Params
    from unbottle.core.models.loading import documents, read_text, train_tokenizer
    from unbottle.core.registry import get_registry
    from unbottle.core.stages.layout import Layout
    from unbottle.core.store import fingerprint
    from unbottle.core.store.artifacts import write_json_atomic

    params_tree = copy.deepcopy(SWEEP_PARAMS)
    params_tree["evaluate"]["metrics"] = [{"name": "perplexity", "window": 64}, "size"]
    params_tree["deploy"]["gates"] = {"perplexity_ratio": {"max": 0.01}}  # nothing passes
    root = make_workspace(tmp_path, tiny_data, params_tree)
    layout = Layout(root)
    tokenizer = train_tokenizer(documents(read_text(root / "data/corpus/train.txt", "t")), 320)
    params = Params.model_validate(params_tree)
    for seed, stage in enumerate(("pretrain", "finetune")):
        save_random_model(layout.artifact(stage), tokenizer, stage, seed=seed)
        fingerprint.record(
            layout.artifact(stage), fingerprint.fingerprint(stage, params, layout, get_registry())
        )
        write_json_atomic(layout.metrics_file(stage), {})
    return root


def task_run_states(flow_state) -> dict[str, str]:
    """The name of each task run of a finished flow run, and the name of its final state,
    as the Prefect server recorded them."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    flow_run = FlowRunFilter(id=FlowRunFilterId(any_=[flow_state.state_details.flow_run_id]))
    with get_client(sync_client=True) as client:
        return {run.name: run.state.name for run in client.read_task_runs(flow_run_filter=flow_run)}


@pytest.mark.slow
def test_sweep_maps_variants_over_a_dask_cluster_and_reuses_the_shared_prefix(
    prefect_server, tmp_path, tiny_data
):
    """The sweep through prefect-dask on a local cluster of two worker processes (the
    default runner is the same flow with tasks in this process): each variant compresses
    on a worker, and the prefix the two share is computed once."""
    import distributed
    from prefect.artifacts import Artifact

    from unbottle.flows.sweep import PREFIX_CACHE, sweep, task_runner

    class Finished(distributed.diagnostics.plugin.SchedulerPlugin):
        """Which tasks the cluster's workers completed, and where."""

        def __init__(self) -> None:
            self.where: dict[str, str] = {}

        def transition(self, key, start, finish, *args, **kwargs):
            if finish == "memory" and start == "processing":
                self.where[str(key)] = kwargs.get("worker", "?")

    root = stamped_workspace(tmp_path, tiny_data)
    finished = Finished()
    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
    ) as cluster:
        cluster.scheduler.add_plugin(finished)
        workers = set(cluster.scheduler.workers)
        runner = task_runner("dask", address=cluster.scheduler_address)
        state = sweep.with_options(task_runner=runner)(
            params_file=str(root / "params.yaml"), root=str(root), return_state=True
        )
        assert state.is_completed(), state
    compressed = {k: w for k, w in finished.where.items() if k.startswith("compress_variant")}
    assert len(compressed) == 2, finished.where
    assert set(compressed.values()) <= workers

    summary = state.result()
    assert summary["variants"] == ["kd-0p3", "kd-0p6"]
    assert summary["reused_steps"] == {"kd-0p3": 0, "kd-0p6": 1}
    assert summary["would_deploy"] is None  # the gate rules every variant out
    assert len(list((root / PREFIX_CACHE).iterdir())) == 3  # kd; kd+prune 0.3; kd+prune 0.6

    evaluation = root / "artifacts/sweep/evaluation"
    data = json.loads((evaluation / "evaluation.json").read_text())
    assert data["order"] == ["pretrained", "finetuned", "kd-0p3", "kd-0p6"]
    assert (evaluation / "quality_vs_size.png").stat().st_size > 5000
    published = Artifact.get(key="unbottle-sweep")
    assert published is not None and data["table"] in published.data
    assert not (root / "artifacts/deploy").exists()

    # Again on the default runner, with finetune's artifact deleted. The first run stored
    # both stage tasks' results under their fingerprints: pretrain's artifact is current and
    # its task comes from Prefect's cache; finetune's key is the same, but its artifact is
    # gone, so the task runs and trains it again (a cached result would leave compress
    # without a model).
    shutil.rmtree(root / "artifacts/finetune")
    again = sweep(params_file=str(root / "params.yaml"), root=str(root), return_state=True)
    assert again.is_completed(), again
    states = task_run_states(again)
    assert (states["pretrain"], states["finetune"]) == ("Cached", "Completed"), states
    assert (root / "artifacts/finetune/model.safetensors").is_file()
    assert again.result()["variants"] == ["kd-0p3", "kd-0p6"]


def test_an_unknown_runner_or_a_missing_engine_is_one_line():
    from unbottle.core.contract.errors import ConfigError
    from unbottle.flows.sweep import task_runner

    with pytest.raises(ConfigError, match=r"^--runner: 'spark' is not a runner; choose one of"):
        task_runner("spark")
    with pytest.raises(ConfigError, match=r"^--workers: 0 workers; at least 1 needed$"):
        task_runner("dask", workers=0)
