"""DVC in a real git repo: after `unbottle run`, `dvc repro` has nothing to do, and changing
one compress parameter reruns compress, evaluate and deploy only."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, TINY_PARAMS, cli_env, make_workspace

GIT_IDENTITY = {
    "GIT_AUTHOR_NAME": "unbottle tests",
    "GIT_AUTHOR_EMAIL": "tests@unbottle.invalid",
    "GIT_COMMITTER_NAME": "unbottle tests",
    "GIT_COMMITTER_EMAIL": "tests@unbottle.invalid",
}


def env() -> dict[str, str]:
    # dvc.yaml's commands call `unbottle`, so the venv's bin must be on PATH.
    bin_dir = str(Path(sys.executable).parent)
    return cli_env({**GIT_IDENTITY, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")})


def sh(*args: str, cwd: Path, timeout: int = 600) -> str:
    result = subprocess.run(
        args, cwd=cwd, env=env(), capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, f"{' '.join(args)}\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


def dvc(*args: str, cwd: Path) -> str:
    return sh(sys.executable, "-m", "dvc", *args, cwd=cwd)


def stages_run(output: str) -> list[str]:
    return re.findall(r"Running stage '([a-z]+)'", output)


@pytest.fixture
def dvc_repo(tmp_path, tiny_data) -> Path:
    """A project like this one: the code dvc.yaml depends on, tiny params, data.dvc."""
    root = make_workspace(tmp_path / "project", tiny_data)
    for folder in ("core", "plugins"):
        shutil.copytree(REPO / folder, root / folder, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    sh("git", "init", "-q", "-b", "main", cwd=root)
    dvc("init", "-q", cwd=root)
    dvc("config", "core.analytics", "false", cwd=root)
    dvc("add", "-q", "data", cwd=root)
    sh("git", "add", "-A", cwd=root)
    sh("git", "commit", "-qm", "tiny project", cwd=root)
    return root


@pytest.mark.slow
def test_repro_after_a_flow_run_runs_nothing_and_a_param_change_reruns_downstream(dvc_repo):
    root = dvc_repo
    out = sh(sys.executable, "-m", "unbottle", "run", cwd=root, timeout=900)
    assert "deployed model:" in out
    assert (root / ".prefect").is_dir()  # PREFECT_HOME defaults into the workspace

    assert stages_run(dvc("repro", cwd=root)) == []
    assert "up to date" in dvc("status", cwd=root)

    params = yaml.safe_load((root / "params.yaml").read_text())
    params["compress"]["variants"]["magnitude50"][0]["sparsity"] = 0.6
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert stages_run(dvc("repro", cwd=root)) == ["compress", "evaluate", "deploy"]
    assert stages_run(dvc("repro", cwd=root)) == []


def test_dvc_yaml_declares_only_the_params_each_stage_reads():
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert list(spec) == ["pretrain", "finetune", "compress", "evaluate", "deploy"]
    for name, stage in spec.items():
        assert stage["cmd"] == f"unbottle stage {name}"
        assert all(p == "seed" or p.split(".")[0] in ("data", name) for p in stage["params"])
        assert stage["outs"] == [f"artifacts/{name}"]
    # Every code dependency exists, so editing it reruns the stage.
    for stage in spec.values():
        for dep in stage["deps"]:
            if dep.endswith(".py"):
                assert (REPO / dep).is_file(), dep
    assert TINY_PARAMS["deploy"]["variant"] == "finetuned"
