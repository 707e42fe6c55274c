"""The architecture's rules, checked: core stays a library; start-up stays light."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_core_imports_neither_prefect_nor_dvc():
    modules = sorted(
        ".".join(p.relative_to(REPO / "core").with_suffix("").parts)
        for p in (REPO / "core").rglob("*.py")
        if p.stem != "__init__"
    )
    code = (
        "import sys\n"
        + "".join(f"import unbottle.core.{m}\n" for m in modules)
        + "import unbottle.plugins.metrics, unbottle.plugins.pruning\n"
        + "import unbottle.plugins.quantization\n"
        + "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('prefect', 'dvc'))\n"
        + "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert len(modules) >= 10
    assert out.stdout.strip() == ""


def test_plugin_discovery_does_not_import_heavy_libraries():
    code = (
        "import sys\n"
        "from unbottle.core.registry import load_registry\n"
        "load_registry()\n"
        "heavy = ('torch', 'transformers', 'prefect', 'dvc', 'onnxruntime', 'optimum')\n"
        "print(','.join(sorted(m for m in sys.modules if m.split('.')[0] in heavy)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_no_top_level_core_flows_or_plugins_package_is_installed():
    code = (
        "import importlib.util\n"
        "print([n for n in ('core', 'flows', 'plugins') if importlib.util.find_spec(n)])\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/"
    )
    assert out.stdout.strip() == "[]"
