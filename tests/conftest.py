"""Shared fixtures: a tiny workspace (8 fictional people, a 2-layer model) and a CLI runner."""

from __future__ import annotations

import copy
import importlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from unbottle.core.data.demo import DemoDataConfig, write_demo_data

REPO = Path(__file__).resolve().parents[1]


def require_extra(module: str):
    """Import an optional dependency, skipping the test where it is not installed, except
    under ``UNBOTTLE_REQUIRE_EXTRAS=1`` (set by `make test`, which installs the extras),
    where a missing one fails instead of silently skipping."""
    if os.environ.get("UNBOTTLE_REQUIRE_EXTRAS") == "1":
        return importlib.import_module(module)
    return pytest.importorskip(module)


# Small enough that the whole pipeline runs in well under a minute on 2 cores.
TINY_PARAMS = {
    "seed": 0,
    "data": {
        # dvc.yaml names these keys, so a params file for `dvc repro` must spell them out.
        "train_text": "data/corpus/train.txt",
        "valid_text": "data/corpus/valid.txt",
        "qa_train": "data/qa/train.jsonl",
        "qa_test": "data/qa/test.jsonl",
        "demo": {"seed": 0, "people": 8, "renderings": 2, "test_fraction": 0.2},
    },
    "pretrain": {
        "tokenizer": {"vocab_size": 320},
        "model": {
            "hidden_size": 32,
            "layers": 2,
            "heads": 2,
            "intermediate_size": 64,
            "context": 64,
        },
        "train": {
            "steps": 12,
            "batch_size": 4,
            "seq_len": 32,
            "lr": 3e-3,
            "warmup_steps": 2,
            "log_every": 4,
        },
    },
    "finetune": {
        "train": {
            "steps": 8,
            "batch_size": 4,
            "seq_len": 64,
            "lr": 1e-3,
            "warmup_steps": 1,
            "log_every": 4,
        }
    },
    "compress": {
        "calibration": {"samples": 4, "seq_len": 32},
        "variants": {
            "magnitude50": [{"prune": "magnitude", "sparsity": 0.5}],
            "int8": [{"quantize": "onnx-dynamic-int8"}],
        },
    },
    "evaluate": {
        "metrics": [
            {"name": "perplexity", "window": 32},
            "accuracy",
            "size",
            {"name": "speed", "prompt_tokens": 8, "new_tokens": 4, "repeats": 1},
        ],
        "max_questions": 8,
    },
    "deploy": {"target": "hf", "variant": "finetuned"},
}

TINY_DATA = DemoDataConfig(seed=0, people=8, renderings=2, test_fraction=0.2)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny") / "data"
    write_demo_data(out, TINY_DATA)
    return out


def make_workspace(root: Path, data: Path, params: dict | None = None) -> Path:
    shutil.copytree(data, root / "data")
    (root / "params.yaml").write_text(yaml.safe_dump(params or TINY_PARAMS, sort_keys=False))
    return root


# The stage tests also distill a 1-layer student.
PIPELINE_PARAMS = copy.deepcopy(TINY_PARAMS)
PIPELINE_PARAMS["compress"]["variants"]["kd1"] = [
    {"distill": "kd", "layers": 1, "steps": 6, "batch_size": 2, "seq_len": 32}
]


def run_pipeline(root: Path, params: dict) -> dict:
    """Run the five stages in-process, in order."""
    from unbottle.core.config.schema import Params
    from unbottle.core.stages.layout import STAGES, Layout
    from unbottle.core.stages.runner import run_stage

    layout = Layout(root)
    validated = Params.model_validate(params)
    results = {name: run_stage(name, validated, layout) for name in STAGES}
    return {"layout": layout, "params": validated, "results": results}


@pytest.fixture(scope="session")
def pipeline_run(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path) -> dict:
    """One tiny pipeline run, shared by the tests that only read its outputs."""
    root = make_workspace(tmp_path_factory.mktemp("pipeline"), tiny_data, PIPELINE_PARAMS)
    return run_pipeline(root, PIPELINE_PARAMS)


@pytest.fixture
def workspace(tmp_path: Path, tiny_data: Path) -> Path:
    """A directory with tiny demo data and a tiny params.yaml."""
    return make_workspace(tmp_path, tiny_data)


def cli_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    # Each test's workspace gets its own Prefect home (the CLI's default), unless a test
    # says otherwise: one leaked in from the caller's shell would be shared.
    env.pop("PREFECT_HOME", None)
    env.pop("PREFECT_API_URL", None)
    env.update({"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    env.update(extra or {})
    return env


def run_cli(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: int = 300):
    """Run `unbottle ARGS` as a user would, in a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "unbottle", *args],
        cwd=cwd,
        env=cli_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_cli_here(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`unbottle ARGS` in this process, with what :func:`run_cli` returns: for the many
    refusals, where a subprocess would spend five of its seconds importing torch and
    transformers. What the CLI sets in the process is put back after: the environment,
    the working directory, argv, and the unbottle logger's handlers, level and
    propagation. The CLI adds its handler once per process, bound to the stdout of the
    time: without the reset, every call after the first would log into the first call's
    buffer and lose its lines. And it stops the logger propagating: left so, pytest's
    caplog (on the root logger) would see no unbottle record in the tests after."""
    import io
    import logging
    from contextlib import redirect_stderr, redirect_stdout

    from unbottle.cli import main

    logger = logging.getLogger("unbottle")
    environ, here, argv = dict(os.environ), Path.cwd(), sys.argv
    handlers, level, propagate = logger.handlers, logger.level, logger.propagate
    out, err, env = io.StringIO(), io.StringIO(), cli_env()
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    sys.argv, logger.handlers = ["unbottle", *args], []
    try:
        with redirect_stdout(out), redirect_stderr(err):
            main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        sys.argv, logger.handlers = argv, handlers
        logger.setLevel(level)
        logger.propagate = propagate
        os.chdir(here)
        os.environ.clear()
        os.environ.update(environ)
    return subprocess.CompletedProcess(["unbottle", *args], code, out.getvalue(), err.getvalue())


def pip_install_plugin(source: Path, into: Path) -> Path:
    """`pip install` a plugin distribution for real (offline: no dependencies, no build
    isolation), into a folder of its own rather than this venv, where the tests running
    beside it on the other worker would see it. Returns the folder: Python finds the
    distributions on its path, entry points included, as it finds a venv's. pip builds in
    the source tree, so it builds a copy, and the repository's examples stay clean."""
    build = into / "source"
    shutil.copytree(source, build, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    target = into / "site-packages"
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation"]
    subprocess.run([*pip, "--target", str(target), str(build)], check=True, timeout=300)
    return target


@contextmanager
def plugin_on_path(target: Path, package: str) -> Iterator[None]:
    """For one test: the plugin installed in `target` on PYTHONPATH, for the processes the
    test starts, and on this process's path, whose cached registry is read again with it
    and without it after."""
    from unbottle.core.registry import get_registry

    with pytest.MonkeyPatch.context() as patch:
        before = os.environ.get("PYTHONPATH")
        patch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(target), before])))
        patch.syspath_prepend(str(target))
        get_registry.cache_clear()
        try:
            yield
        finally:
            for name in [m for m in sys.modules if m.split(".")[0] == package]:
                del sys.modules[name]
    importlib.invalidate_caches()
    get_registry.cache_clear()
