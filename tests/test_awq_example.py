"""The third-party example examples/unbottle-awq, installed for real and run by the compress stage.

It is built on the public API alone (``unbottle``, ``unbottle.compression``); the fixture
`pip install`s it (offline: no dependencies, no build isolation) into a folder of its own,
which each test puts on its path.
"""

from __future__ import annotations

import ast
import copy
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REPO, TINY_PARAMS, cli_env, make_workspace, pip_install_plugin, plugin_on_path

# One worker installs it once for the module's tests.
pytestmark = pytest.mark.xdist_group("unbottle-awq")

EXAMPLE = REPO / "examples" / "unbottle-awq"


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return pip_install_plugin(EXAMPLE, tmp_path_factory.mktemp("awq"))


@pytest.fixture
def awq_installed(installed: Path) -> Iterator[Path]:
    with plugin_on_path(installed, "unbottle_awq"):
        yield installed


def test_the_example_imports_only_the_public_api():
    allowed = {"unbottle", "unbottle.compression"}
    for path in sorted((EXAMPLE / "unbottle_awq").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom) and not node.level
                else []
            )
            for name in names:
                if name.split(".")[0] == "unbottle":
                    assert name in allowed, f"{path.name}: imports {name}"


def test_compress_runs_an_awq_variant(awq_installed, tmp_path, tmp_path_factory, tiny_data):
    import torch

    from tests.serving_helpers import finetuned_model
    from unbottle.compression import load_model, load_packed
    from unbottle.core.config.schema import Params
    from unbottle.core.stages.layout import Layout
    from unbottle.core.stages.runner import run_stage

    params = copy.deepcopy(TINY_PARAMS)
    params["compress"]["variants"] = {
        "awq4": [{"quantize": "awq", "bits": 4, "group_size": 16}],
    }
    root = make_workspace(tmp_path, tiny_data, params)
    trained = finetuned_model(tmp_path_factory, tiny_data).parent
    for stage in ("pretrain", "finetune"):
        shutil.copytree(trained / stage, root / "artifacts" / stage)

    # In this process, as `unbottle stage compress` runs it, with the registry read again
    # from the installed entry points (plugin_on_path cleared the cached one).
    run_stage("compress", Params.model_validate(params), Layout(root))

    variant = root / "artifacts" / "compress" / "awq4"
    manifest = json.loads((variant / "manifest.json").read_text())
    assert manifest["format"] == "packed"
    quant = json.loads((variant / "quantization.json").read_text())
    assert quant["method"] == "awq" and quant["bits"] == 4 and quant["group_size"] == 16
    metrics = manifest["metrics"]
    # q/k/v, o, gate/up and down of both blocks (the tiny model has a K/V head per query
    # head, so v_proj's channels are o_proj's)
    assert metrics["step1_scaled_groups"] == 8
    assert metrics["step1_mean_group_output_error"] <= metrics["step1_mean_group_output_error_rtn"]
    assert metrics["step1_linear_size_ratio"] < 0.3

    packed, _ = load_packed(variant)
    dense, tokenizer = load_model(root / "artifacts" / "finetune")
    ids = torch.tensor([tokenizer("Ada lives in Paris.")["input_ids"]])
    with torch.no_grad():
        want, got = dense(input_ids=ids).logits, packed(input_ids=ids).logits
    assert float((got - want).norm() / want.norm()) < 0.2


def test_example_package_tests_pass(awq_installed: Path) -> None:
    # PYTHONSAFEPATH: import the installed unbottle_awq, not the source folder in cwd
    # (the copy pip built from).
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"],
        cwd=awq_installed.parent / "source",
        env=cli_env({"PYTHONSAFEPATH": "1"}),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert " passed" in result.stdout
