"""`unbottle show`: an artifact's provenance as a person reads it."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests.conftest import run_cli
from unbottle.core.store.provenance import git_state


def git(*args: str, cwd: Path) -> None:
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t.invalid", *args],
        cwd=cwd,
        check=True,
        capture_output=True,
    )


def test_the_pipelines_own_outputs_do_not_make_a_committed_tree_dirty(tmp_path):
    (tmp_path / "metrics").mkdir()
    (tmp_path / "artifacts" / "finetune").mkdir(parents=True)
    for name in ("dvc.lock", "metrics/finetune.json", "params.yaml"):
        (tmp_path / name).write_text("1\n")
    git("init", "-q", cwd=tmp_path)
    git("add", "-A", cwd=tmp_path)
    git("commit", "-qm", "a run", cwd=tmp_path)
    artifact = tmp_path / "artifacts" / "finetune"
    # A rerun rewrites dvc.lock and the metrics: the code and params are as committed.
    (tmp_path / "dvc.lock").write_text("2\n")
    (tmp_path / "metrics" / "finetune.json").write_text("2\n")
    assert git_state(artifact)["dirty"] is False
    (tmp_path / "params.yaml").write_text("2\n")
    assert git_state(artifact)["dirty"] is True


def test_show_prints_a_variants_steps_with_options_metrics_and_times(pipeline_run):
    root = pipeline_run["layout"].root
    timing = json.loads((root / "metrics" / "compress_timing.json").read_text())
    seconds = timing["magnitude50"]["step1_seconds"]
    wide = {"COLUMNS": "250"}  # one table row a line
    result = run_cli("show", "artifacts/compress/magnitude50", cwd=root, env=wide)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "steps" in out
    # The steps table: strategy, validated options and the step's own time on one row.
    assert any(
        "magnitude (unbottle" in line and '"sparsity": 0.5' in line and str(seconds) in line
        for line in out.splitlines()
    ), out
    finetune = run_cli("show", "artifacts/finetune", cwd=root, env=wide)
    assert "time wall_s" in finetune.stdout
