"""The Prefect flow end to end on a tiny config, against Prefect's own test server."""

from __future__ import annotations

import pytest

from tests.conftest import make_workspace


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    import os

    os.environ.setdefault("PREFECT_HOME", str(tmp_path_factory.mktemp("prefect-home")))
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.mark.slow
def test_flow_runs_the_five_stages_and_publishes_the_evaluation(
    prefect_server, tmp_path, tiny_data
):
    from prefect.artifacts import Artifact

    from unbottle.core.evaluate import read_evaluation
    from unbottle.core.stage import STAGES, Layout
    from unbottle.flows.pipeline import pipeline

    root = make_workspace(tmp_path, tiny_data)
    state = pipeline(params_file=str(root / "params.yaml"), root=str(root), return_state=True)
    assert state.is_completed(), state
    summary = state.result()
    assert set(summary["metrics"]) == set(STAGES)
    assert summary["deployed"] == str(root / "artifacts" / "deploy")

    rows, table = read_evaluation(Layout(root).artifact("evaluate"))
    published = Artifact.get(key="unbottle-evaluation")
    assert published is not None and table in published.data
    rows_published = Artifact.get(key="unbottle-evaluation-table")
    assert rows_published is not None
    for name in rows:
        assert name in str(rows_published.data)


@pytest.mark.slow
def test_flow_fails_fast_on_bad_params(prefect_server, tmp_path, tiny_data):
    from unbottle.core.errors import ConfigError
    from unbottle.flows.pipeline import pipeline

    root = make_workspace(tmp_path, tiny_data)
    with pytest.raises(ConfigError, match=r"Unknown pruning strategy 'nope'"):
        pipeline(
            params_file=str(root / "params.yaml"),
            overrides=["compress.variants.x=[{prune: nope}]"],
            root=str(root),
        )
    assert not (root / "artifacts").exists()
