"""Keep dvc.lock true to what unbottle wrote, so `dvc repro` reruns nothing it need not.

Both routes that run stages outside DVC record them here: the Prefect flow after a run,
and `unbottle stage NAME` after its stage. They first write the plugin locks
(``locks/<stage>.json``: the strategies each stage uses and their code hashes, what
dvc.yaml's always-changed ``plugins`` stage writes), then ``dvc commit --force`` the
``plugins`` stage and the stages that ran. Under ``dvc repro`` (``DVC_STAGE`` is set)
DVC records the stage itself and holds the repo lock, so nothing is done here.

No import of prefect or dvc: DVC runs as a subprocess, the way dvc.yaml runs unbottle.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

from unbottle.core.contract.errors import UnbottleError

#: dvc.yaml's stage that writes the plugin locks.
PLUGINS_STAGE = "plugins"


class DvcError(UnbottleError):
    """A DVC command failed: no remote, an unwritable remote, a held repo lock."""


def dvc(root: Path, *args: str) -> str:
    """Run a DVC command; a failure becomes one line with DVC's own reason."""
    done = subprocess.run(
        [sys.executable, "-m", "dvc", *args], cwd=root, capture_output=True, text=True
    )
    if done.returncode != 0:
        errors = [line for line in done.stderr.splitlines() if line.startswith("ERROR")]
        reason = errors[0].removeprefix("ERROR:").strip() if errors else done.stderr.strip()
        if "no remote specified" in reason:
            reason = "this project has no default remote"
        hint = ""
        if "lock" in reason.lower():
            hint = "; another DVC command holds the repo lock: wait for it to finish"
        elif "remote" in reason.lower():
            hint = "; add one with `dvc remote add -d NAME URL` or fix its URL or permissions"
        raise DvcError(f"dvc {args[0]}: {reason}{hint}")
    return done.stdout


def is_dvc_project(root: Path) -> bool:
    return (root / ".dvc").is_dir() and (root / "dvc.yaml").is_file()


def under_dvc() -> bool:
    """True inside a command that `dvc repro` or `dvc exp run` started."""
    return "DVC_STAGE" in os.environ


def record_stages(root: Path, stages: Iterable[str]) -> None:
    """Write the plugin locks for the workspace's params.yaml and record the ``plugins``
    stage and ``stages`` in dvc.lock as they are on disk."""
    from unbottle.core.config.loading import load_params
    from unbottle.core.registry import get_registry
    from unbottle.core.stages.layout import Layout
    from unbottle.core.store.fingerprint import write_plugin_locks

    params_file = root / "params.yaml"
    params = load_params(params_file if params_file.is_file() else None, [])
    write_plugin_locks(params, Layout(root), get_registry())
    dvc(root, "commit", "--force", PLUGINS_STAGE, *stages)
