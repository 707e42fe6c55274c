"""Plugin loading: built-ins through the entry-point group, errors that name the culprit."""

from __future__ import annotations

import json
import textwrap
from importlib.metadata import distributions
from pathlib import Path

import pytest

from tests.conftest import run_cli
from unbottle.core.contract.errors import PluginError
from unbottle.core.contract.kinds import KINDS
from unbottle.core.registry import ENTRY_POINT_GROUP, load_registry

BUILTINS = {
    ("parallelism", "single"),
    ("optimizer", "adamw"),
    ("optimizer", "adam"),
    ("optimizer", "sgd"),
    ("finetune_method", "full"),
    ("pruning", "magnitude"),
    ("quantization", "onnx-dynamic-int8"),
    ("distillation", "kd"),
    ("metric", "perplexity"),
    ("metric", "accuracy"),
    ("metric", "size"),
    ("metric", "speed"),
    ("deploy_target", "hf"),
}


def fake_distribution(root: Path, dist: str, modules: dict[str, str], eps: dict[str, str]) -> Path:
    """Lay out a real installed distribution (a .dist-info) under root, as pip would."""
    root.mkdir(parents=True, exist_ok=True)
    for name, source in modules.items():
        (root / f"{name}.py").write_text(textwrap.dedent(source))
    info = root / f"{dist.replace('-', '_')}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    lines = "\n".join(f"{k} = {v}" for k, v in eps.items())
    (info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\n{lines}\n")
    return root


def eps_under(root: Path, monkeypatch: pytest.MonkeyPatch):
    """The entry points of the distributions under root, importable as if installed."""
    monkeypatch.syspath_prepend(str(root))
    return [ep for d in distributions(path=[str(root)]) for ep in d.entry_points]


GOOD_PRUNER = """
    from unbottle import StrategyConfig, hookimpl

    class Magnitude:
        name = "magnitude"
        class Config(StrategyConfig):
            pass
        def __init__(self, config):
            self.config = config
        def prune(self, model, ctx):
            return {}

    @hookimpl
    def register_pruners(register):
        register(Magnitude)
"""


def test_builtins_come_from_the_entry_point_group():
    registry = load_registry(disabled=())
    found = {(i.kind, i.name) for i in registry.all()}
    assert found >= BUILTINS
    for info in registry.all():
        if (info.kind, info.name) in BUILTINS:
            assert info.distribution == "unbottle"
            assert info.plugin.startswith("builtin_")


def test_every_kind_has_a_hook_and_a_builtin():
    registry = load_registry(disabled=())
    for kind in KINDS:
        assert registry.names(kind), kind


def test_plugin_that_fails_to_import_is_named(tmp_path, monkeypatch):
    root = fake_distribution(
        tmp_path / "site",
        "unbottle-broken",
        {"broken_plugin": "raise RuntimeError('boom at import')"},
        {"broken": "broken_plugin"},
    )
    with pytest.raises(PluginError) as info:
        load_registry(eps_under(root, monkeypatch))
    assert str(info.value) == (
        'Error loading plugin "broken" (unbottle-broken 1.0): RuntimeError: boom at import. '
        "Skip it with UNBOTTLE_DISABLE_PLUGINS=broken."
    )
    assert isinstance(info.value.__cause__, RuntimeError)


def test_disabled_plugins_are_skipped_by_name_or_distribution(tmp_path, monkeypatch):
    root = fake_distribution(
        tmp_path / "site",
        "unbottle-broken",
        {"broken_plugin": "raise RuntimeError"},
        {"b": "broken_plugin"},
    )
    assert load_registry(eps_under(root, monkeypatch), disabled={"b"}).all() == []
    assert load_registry(eps_under(root, monkeypatch), disabled={"unbottle-broken"}).all() == []


def test_duplicate_strategy_names_both_providers(tmp_path, monkeypatch):
    from importlib.metadata import entry_points

    root = fake_distribution(
        tmp_path / "site", "unbottle-copycat", {"copycat": GOOD_PRUNER}, {"copycat": "copycat"}
    )
    builtin = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == "builtin_pruning"]
    with pytest.raises(PluginError) as info:
        load_registry([*builtin, *eps_under(root, monkeypatch)])
    message = str(info.value)
    assert "Two plugins provide the pruning strategy 'magnitude'" in message
    assert "plugin 'builtin_pruning' (unbottle " in message
    assert "plugin 'copycat' (unbottle-copycat 1.0)" in message


def test_strategy_without_config_is_rejected(tmp_path, monkeypatch):
    source = """
        from unbottle import hookimpl

        class NoConfig:
            name = "noconfig"
            def prune(self, model, ctx):
                return {}

        @hookimpl
        def register_pruners(register):
            register(NoConfig)
    """
    root = fake_distribution(tmp_path / "site", "unbottle-bad", {"bad": source}, {"bad": "bad"})
    with pytest.raises(PluginError, match=r"pruning strategy 'noconfig' has no pydantic `Config`"):
        load_registry(eps_under(root, monkeypatch))


def test_misspelled_hook_is_rejected(tmp_path, monkeypatch):
    source = """
        from unbottle import hookimpl

        @hookimpl
        def register_pruner(register):
            pass
    """
    root = fake_distribution(tmp_path / "site", "unbottle-typo", {"typo": source}, {"typo": "typo"})
    with pytest.raises(PluginError, match="implements a hook that does not exist"):
        load_registry(eps_under(root, monkeypatch))


def test_cli_lists_plugins_with_distribution(tmp_path):
    result = run_cli("plugins", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert {"kind": "pruning", "name": "magnitude", "distribution": "unbottle"}.items() <= next(
        r for r in rows if r["name"] == "magnitude"
    ).items()
    table = run_cli("plugins", cwd=tmp_path)
    assert table.returncode == 0
    assert "onnx-dynamic-int8" in table.stdout
    # In a terminal of 80 columns, each row is one line, whole, and no line is longer.
    narrow = run_cli("plugins", cwd=tmp_path, env={"COLUMNS": "80"}).stdout
    assert max(len(line) for line in narrow.splitlines()) <= 80
    cells = {cell.strip() for line in narrow.splitlines() for cell in line.split("│")}
    assert {row["name"] for row in rows} <= cells
    assert len(narrow.splitlines()) < 2 * len(rows), "rows fold over several lines"
    assert "(the plugin column needs a wider terminal; --json lists it)" in narrow


def test_cli_reports_a_broken_plugin_in_one_line_and_can_skip_it(tmp_path):
    root = fake_distribution(
        tmp_path / "site",
        "unbottle-broken",
        {"broken_plugin": "raise ImportError('needs libfoo')"},
        {"broken": "broken_plugin"},
    )
    result = run_cli("plugins", cwd=tmp_path, env={"PYTHONPATH": str(root)})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        'error: Error loading plugin "broken" (unbottle-broken 1.0): ImportError: needs libfoo. '
        "Skip it with UNBOTTLE_DISABLE_PLUGINS=broken."
    ]
    skipped = run_cli(
        "plugins", cwd=tmp_path, env={"PYTHONPATH": str(root), "UNBOTTLE_DISABLE_PLUGINS": "broken"}
    )
    assert skipped.returncode == 0, skipped.stderr
