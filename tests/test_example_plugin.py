"""The example plugin examples/unbottle-lion, installed for real.

The module-scoped fixture `pip install`s the example package (offline: no dependencies,
no build isolation) into a folder of its own, which each test puts on its path.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REPO, cli_env, pip_install_plugin, plugin_on_path, run_cli

# One worker installs it once for the module's tests.
pytestmark = pytest.mark.xdist_group("unbottle-lion")

EXAMPLE = REPO / "examples" / "unbottle-lion"
DIST = "unbottle-lion"
LION = {"kind": "optimizer", "name": "lion", "distribution": DIST, "version": "0.1.0"}


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return pip_install_plugin(EXAMPLE, tmp_path_factory.mktemp("lion"))


@pytest.fixture
def lion_installed(installed: Path) -> Iterator[Path]:
    with plugin_on_path(installed, "unbottle_lion"):
        yield installed


def _plugins(workspace: Path, env: dict[str, str] | None = None) -> list[dict[str, str]]:
    result = run_cli("plugins", "--json", cwd=workspace, env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _lion_rows(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    return [
        {k: row[k] for k in LION}
        for row in rows
        if row["kind"] == "optimizer" and row["name"] == "lion"
    ]


def test_plugins_lists_lion(lion_installed: Path, workspace: Path) -> None:
    rows = _plugins(workspace)
    assert _lion_rows(rows) == [LION]
    assert next(r for r in rows if r["name"] == "lion")["plugin"] == "lion"
    # The built-ins are still there, next to it.
    assert {"adamw", "adam", "sgd"} <= {r["name"] for r in rows if r["kind"] == "optimizer"}


@pytest.mark.parametrize("disabled", ["lion", "unbottle-lion"])
def test_disable_plugins_skips_lion(lion_installed: Path, workspace: Path, disabled: str) -> None:
    rows = _plugins(workspace, env={"UNBOTTLE_DISABLE_PLUGINS": f"nothing,{disabled}"})
    assert _lion_rows(rows) == []
    assert "adamw" in {r["name"] for r in rows}


def test_pretrain_with_lion_records_it(lion_installed: Path, workspace: Path) -> None:
    result = run_cli(
        "stage",
        "pretrain",
        "-S",
        "pretrain.train.optimizer=lion",
        "-S",
        "pretrain.train.lr=3e-4",
        cwd=workspace,
    )
    assert result.returncode == 0, result.stderr
    manifest = json.loads((workspace / "artifacts/pretrain/manifest.json").read_text())
    optimizer = manifest["strategies"]["optimizer"]
    assert optimizer["name"] == "lion"
    assert optimizer["distribution"] == DIST
    assert optimizer["version"] == "0.1.0"
    assert manifest["config"]["train"]["optimizer"]["name"] == "lion"


def test_invalid_lion_option_fails_fast(lion_installed: Path, workspace: Path) -> None:
    result = run_cli(
        "stage",
        "pretrain",
        "-S",
        "pretrain.train.optimizer=lion",
        "-S",
        "pretrain.train.optimizer.betas=[2,0.5]",
        cwd=workspace,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: pretrain.train.optimizer"), lines[0]
    assert "betas" in lines[0]
    assert not (workspace / "artifacts").exists()


def test_example_package_tests_pass(lion_installed: Path) -> None:
    # PYTHONSAFEPATH: import the installed unbottle_lion, not the source folder in cwd
    # (the copy pip built from).
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"],
        cwd=lion_installed.parent / "source",
        env=cli_env({"PYTHONSAFEPATH": "1"}),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert " passed" in result.stdout
