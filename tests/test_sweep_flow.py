"""`unbottle sweep`'s flow against Prefect's test server: one mapped task per variant,
the shared recipe prefix computed once across tasks, every variant a row of one report."""

from __future__ import annotations

import copy
import json

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


@pytest.mark.slow
def test_sweep_flow_maps_variants_and_reuses_the_shared_prefix(prefect_server, tmp_path, tiny_data):
    from prefect.artifacts import Artifact

    from unbottle.core import fingerprint
    from unbottle.core.artifacts import write_json_atomic
    from unbottle.core.config import Params
    from unbottle.core.modeling import documents, read_text, train_tokenizer
    from unbottle.core.registry import get_registry
    from unbottle.core.stage import Layout
    from unbottle.flows.sweep import PREFIX_CACHE, sweep

    params_tree = copy.deepcopy(SWEEP_PARAMS)
    params_tree["evaluate"]["metrics"] = [{"name": "perplexity", "window": 64}, "size"]
    params_tree["deploy"]["gates"] = {"perplexity_ratio": {"max": 0.01}}  # nothing passes
    root = make_workspace(tmp_path, tiny_data, params_tree)
    layout = Layout(root)
    # Random-weight pretrain and finetune outputs, stamped as current so the flow's stage
    # tasks skip them (no training in this test).
    tokenizer = train_tokenizer(documents(read_text(root / "data/corpus/train.txt", "t")), 320)
    params = Params.model_validate(params_tree)
    for seed, stage in enumerate(("pretrain", "finetune")):
        save_random_model(layout.artifact(stage), tokenizer, stage, seed=seed)
        fingerprint.record(
            layout.artifact(stage), fingerprint.fingerprint(stage, params, layout, get_registry())
        )
        write_json_atomic(layout.metrics_file(stage), {})

    state = sweep(params_file=str(root / "params.yaml"), root=str(root), return_state=True)
    assert state.is_completed(), state
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
