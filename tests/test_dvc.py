"""DVC in a real git repo: after `unbottle run`, `dvc repro` has nothing to do, and changing
one compress parameter reruns compress, evaluate and deploy only."""

from __future__ import annotations

import copy
import json
import os
import re
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, TINY_PARAMS, cli_env
from tests.released_model import save_released_model, tiny_released_model

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
    """The stages a `dvc repro` ran, besides the always-changed ``plugins`` stage (which
    only rewrites the plugin locks, changing them only when a plugin changed)."""
    return [s for s in re.findall(r"Running stage '([a-z]+)'", output) if s != "plugins"]


def children_cpu_seconds() -> float:
    """User and system CPU time of this process's finished children (and theirs)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def status_is_current(root: Path) -> bool:
    """`dvc status` has nothing to report but the always-changed lock stage."""
    return json.loads(dvc("status", "--json", cwd=root)) == {"plugins": ["always changed"]}


#: The user's own files, at paths of their choosing: DVC must track these, not the demo's.
USER_DATA = {
    "train_text": ("corpus/train.txt", "mine/prose.txt"),
    "valid_text": ("corpus/valid.txt", "mine/held_out.txt"),
    "qa_train": ("qa/train.jsonl", "mine/qa_train.jsonl"),
    "qa_test": ("qa/test.jsonl", "mine/qa_test.jsonl"),
}


@pytest.fixture
def dvc_repo(tmp_path, tiny_data) -> Path:
    """A user's project: a released model (a tiny one in SmolLM2's format) as
    ``pretrain.source``, their own data files under data/ tracked by data.dvc, the code
    dvc.yaml depends on, and this project's dvc.yaml."""
    params = copy.deepcopy(TINY_PARAMS)
    root = tmp_path / "project"
    (root / "data" / "mine").mkdir(parents=True)
    for key, (demo, mine) in USER_DATA.items():
        shutil.copy(tiny_data / demo, root / "data" / mine)
        params["data"][key] = f"data/{mine}"
    model, tokenizer = tiny_released_model(tiny_data / "corpus" / "train.txt")
    save_released_model(model, tokenizer, root / "models" / "tiny-chat")
    params["pretrain"]["source"] = {"path": "models/tiny-chat"}
    params["finetune"]["train"]["seq_len"] = 128  # chat format: the template's tokens too
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for folder in ("core", "plugins"):
        shutil.copytree(REPO / folder, root / folder, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    sh("git", "init", "-q", "-b", "main", cwd=root)
    dvc("init", "-q", cwd=root)
    shutil.copy(REPO / ".dvcignore", root / ".dvcignore")  # the project's, not dvc init's
    dvc("config", "core.analytics", "false", cwd=root)
    dvc("add", "-q", "data", cwd=root)
    sh("git", "add", "-A", cwd=root)
    sh("git", "commit", "-qm", "tiny project", cwd=root)
    return root


@pytest.mark.slow
def test_flow_run_then_repro_experiments_and_a_remote_round_trip(dvc_repo, tmp_path):
    root = dvc_repo
    remote = tmp_path / "remote"
    dvc("remote", "add", "-d", "local", str(remote), cwd=root)
    sh("git", "commit", "-qam", "a local DVC remote", cwd=root)
    out = sh(sys.executable, "-m", "unbottle", "run", "--push", cwd=root, timeout=900)
    assert "deployed model:" in out
    assert (root / ".prefect").is_dir()  # PREFECT_HOME defaults into the workspace
    assert any(remote.rglob("*")), "dvc push wrote nothing to the remote"

    # The flow recorded its outputs: nothing to reproduce, and cheaply so (best of two:
    # the first call also warms DVC's hash cache after the flow's own `dvc commit`).
    # CPU seconds, not wall time: the suite shares the cores with other tests.
    seconds = []
    for _ in range(2):
        before = children_cpu_seconds()
        assert stages_run(dvc("repro", cwd=root)) == []
        seconds.append(children_cpu_seconds() - before)
    assert status_is_current(root)
    # Python writes bytecode beside the code the stages depend on when it first imports a
    # module (`unbottle serve` importing the serving code, a stage a quantizer's): not a
    # change of that code, or a new .pyc would rerun every stage from pretrain.
    pycache = root / "core" / "models" / "__pycache__"
    pycache.mkdir(exist_ok=True)
    (pycache / "runtimes.cpython-311.pyc").write_bytes(bytes(16))
    assert status_is_current(root)

    # Provenance: the commit the run was made from, and the data version.
    head = sh("git", "rev-parse", "HEAD", cwd=root).strip()
    shown = json.loads(
        sh(sys.executable, "-m", "unbottle", "show", "artifacts/finetune", "--json", cwd=root)
    )
    data_md5 = yaml.safe_load((root / "data.dvc").read_text())["outs"][0]["md5"]
    assert shown["environment"]["git"] == {"commit": head, "dirty": False}
    assert shown["environment"]["dvc_data"] == data_md5
    assert shown["strategies"]["optimizer"]["distribution"] == "unbottle"
    assert "git commit" in sh(
        sys.executable, "-m", "unbottle", "show", "artifacts/finetune", cwd=root
    )

    # A second run of the flow finds each current stage's result in Prefect's cache, so
    # that task does not run; a deleted artifact is rebuilt though its key is cached (and
    # pushed: the clone below pulls it).
    shutil.rmtree(root / "artifacts" / "deploy")
    again = sh(sys.executable, "-m", "unbottle", "run", "--push", cwd=root, timeout=600)
    assert again.count("Finished in state Cached") == 4, again
    assert re.search(r"Task run 'deploy' - deploy wrote ", again), again
    assert (root / "artifacts/deploy/model.safetensors").is_file()
    sh("git", "add", "-A", cwd=root)
    sh("git", "commit", "-qm", "a run", cwd=root)

    # A fresh clone pulls data and artifacts from the remote and has nothing to run.
    clone = tmp_path / "clone"
    sh("git", "clone", "-q", str(root), str(clone), cwd=tmp_path)
    dvc("pull", cwd=clone)
    assert (clone / "artifacts/deploy/model.safetensors").is_file()
    assert stages_run(dvc("repro", cwd=clone)) == []

    # One compress parameter, as an experiment: only compress and what follows rerun.
    exp = dvc("exp", "run", "-S", "compress.variants.magnitude50.0.sparsity=0.6", cwd=root)
    assert stages_run(exp) == ["compress", "evaluate", "deploy"]
    diff = json.loads(dvc("metrics", "diff", "--json", cwd=root))
    sparsity = diff["metrics/compress.json"]["magnitude50.prune_sparsity"]
    assert sparsity["old"] == 0.5
    assert sparsity["new"] == pytest.approx(0.6, abs=1e-3)

    # The experiment's results are applied to the workspace: nothing left to reproduce.
    assert stages_run(dvc("repro", cwd=root)) == []

    # An edit to the user's own held-out text: DVC sees it as a changed input of the two
    # stages that read it, evaluate and deploy (which measures the shipped bundle on it),
    # and of no other. (That a changed input reruns its stages, the experiment showed.)
    held_out = root / "data" / USER_DATA["valid_text"][1]
    held_out.write_text(held_out.read_text(encoding="utf-8") + "\nOne more paragraph.\n")
    changed = {"changed deps": {f"data/{USER_DATA['valid_text'][1]}": "modified"}}
    assert json.loads(dvc("status", "--json", cwd=root)) == {
        "plugins": ["always changed"],
        "data.dvc": [{"changed outs": {"data": "modified"}}],
        "evaluate": [changed],
        "deploy": [changed],
    }
    # Loose enough for a slow machine (3.2 s of wall time was seen on a busy one), tight
    # enough to catch a no-op that rehashes the outputs.
    assert min(seconds) < 5, f"a no-op dvc repro took {seconds} CPU seconds"


def test_push_without_a_remote_fails_before_any_work(dvc_repo):
    result = subprocess.run(
        [sys.executable, "-m", "unbottle", "run", "--push"],
        cwd=dvc_repo,
        env=env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: dvc push: this project has no default remote; add one with "
        "`dvc remote add -d NAME URL`"
    )
    assert not (dvc_repo / "artifacts").exists()


def test_dvc_yaml_matches_what_the_fingerprints_hash():
    from unbottle.core.stages.layout import STAGES, Layout
    from unbottle.core.store.fingerprint import STAGE_CODE, STAGE_PARAMS, stage_code_paths

    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    stages = {name: stage for name, stage in spec.items() if name in STAGES}
    assert {name: tuple(stage["params"]) for name, stage in stages.items()} == STAGE_PARAMS
    layout = Layout(REPO)
    for name, stage in stages.items():
        # The core code by folder (a subpackage) or file (a stage module), as hashed.
        hashed = {p.relative_to(REPO).as_posix() for p in stage_code_paths(name).values()}
        assert {d for d in stage["deps"] if d.startswith("core/")} == hashed, name
        assert len(hashed) == len(STAGE_CODE[name])
        assert not any(d.startswith("plugins/") for d in stage["deps"]), name  # the lock's job
        lock = layout.plugin_lock_file(name).relative_to(REPO).as_posix()
        assert lock in stage["deps"], name
    # The plugin locks: written by an always-changed stage, one per stage, kept out of
    # DVC's cache (small, and meant for git).
    plugins = spec["plugins"]
    assert plugins["cmd"] == "unbottle plugins --lock"
    assert plugins["always_changed"] is True
    assert plugins["outs"] == [
        {layout.plugin_lock_file(s).relative_to(REPO).as_posix(): {"cache": False}} for s in STAGES
    ]


def test_dvc_yaml_declares_only_the_params_each_stage_reads():
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert list(spec) == ["plugins", "pretrain", "finetune", "compress", "evaluate", "deploy"]
    del spec["plugins"]
    for name, stage in spec.items():
        assert stage["cmd"] == f"unbottle stage {name}"
        # deploy measures a bundle it writes as a new model with the evaluate settings.
        reads = (name, "evaluate") if name == "deploy" else (name,)
        assert all(p == "seed" or p.split(".")[0] in ("data", *reads) for p in stage["params"])
        assert stage["outs"] == [f"artifacts/{name}"]
        # The data deps are the files the params name, templated from params.yaml.
        data_deps = {d for d in stage["deps"] if d.startswith("${")}
        assert data_deps == {f"${{{p}}}" for p in stage["params"] if p.startswith("data.")}
    # Every code dependency exists, so editing it reruns the stage.
    for stage in spec.values():
        for dep in stage["deps"]:
            if dep.startswith("core/"):
                assert (REPO / dep).exists(), dep
    assert TINY_PARAMS["deploy"]["variant"] == "finetuned"


def test_a_held_dvc_lock_fails_in_one_line(dvc_repo):
    from dvc.lock import make_lock

    from unbottle.flows.pipeline import DvcError
    from unbottle.flows.pipeline import dvc as run_dvc

    lock = make_lock(
        str(dvc_repo / ".dvc" / "tmp" / "lock"), tmp_dir=str(dvc_repo / ".dvc" / "tmp")
    )
    lock.lock()
    try:
        with pytest.raises(DvcError) as info:
            run_dvc(dvc_repo, "commit", "--force", "pretrain")
    finally:
        lock.unlock()
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("dvc commit: ")
    assert message.endswith("another DVC command holds the repo lock: wait for it to finish")
