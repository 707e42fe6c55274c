"""The wheel a user installs holds every module of the source tree."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

#: Source folders and the import package each is installed as (pyproject's package-dir).
FOLDERS = {
    "unbottle": "unbottle",
    "core": "unbottle/core",
    "plugins": "unbottle/plugins",
    "flows": "unbottle/flows",
}


def test_a_built_wheel_contains_every_module(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--wheel-dir",
            str(tmp_path),
            str(REPO),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("unbottle-*.whl")
    in_wheel = {n for n in zipfile.ZipFile(wheel).namelist() if n.endswith(".py")}
    in_tree = {
        f"{installed}/{path.relative_to(REPO / folder).as_posix()}"
        for folder, installed in FOLDERS.items()
        for path in (REPO / folder).rglob("*.py")
        if "__pycache__" not in path.parts
    }
    assert len(in_tree) > 50
    assert in_tree - in_wheel == set()
