"""The built-in plugins are built on the public API alone, as a third party's would be."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import unbottle

REPO = Path(__file__).resolve().parents[1]
PUBLIC = {
    "unbottle",
    "unbottle.compression",
    "unbottle.training",
    "unbottle.evaluation",
    "unbottle.serving",
    "unbottle.export",
}


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in a file, top level or inside functions."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # a relative import stays inside plugins/
                continue
            found += [(node.lineno, node.module or "")]
            # `from unbottle import core` imports unbottle.core too (a name that is not
            # one of the package's exports is a submodule)
            if node.module == "unbottle":
                found += [
                    (node.lineno, f"unbottle.{a.name}")
                    for a in node.names
                    if a.name not in unbottle.__all__
                ]
    return found


PLUGIN_FILES = sorted((REPO / "plugins").rglob("*.py"))


@pytest.mark.parametrize("path", PLUGIN_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_plugins_import_only_the_public_api(path):
    bad = [
        f"{path.relative_to(REPO)}:{line}: {module}"
        for line, module in imported_modules(path)
        if module.startswith("unbottle.")
        and module not in PUBLIC
        and not module.startswith("unbottle.plugins")
    ]
    assert bad == []


def test_the_check_sees_imports_inside_functions(tmp_path):
    sample = tmp_path / "p.py"
    sample.write_text(
        "from unbottle import hookimpl\n"
        "def f():\n"
        "    from unbottle.core.models.loading import load_model\n"
        "    import unbottle.core.registry\n"
        "    from unbottle import core\n"
    )
    modules = [m for _, m in imported_modules(sample)]
    assert "unbottle.core.models.loading" in modules
    assert "unbottle.core.registry" in modules
    assert "unbottle.core" in modules
    assert len(PLUGIN_FILES) >= 10


def test_public_modules_import_without_torch():
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in sorted(PUBLIC))
        + "print(','.join(sorted(m for m in sys.modules if m.split('.')[0] == 'torch')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_config_error_and_model_runner_are_public():
    from unbottle.core.contract.errors import ConfigError
    from unbottle.core.models.runtimes import ModelRunner

    assert unbottle.ConfigError is ConfigError
    assert unbottle.ModelRunner is ModelRunner
    assert {"ConfigError", "ModelRunner", "DataError"} <= set(unbottle.__all__)
