"""Lifecycle hooks, plugin code by package, and one truth for unbottle and DVC.

A small plugin distribution, ``unbottle-probe``, is written here and pip-installed for real
(offline: no dependencies, no build isolation) into a folder of its own, which the tests
that use it put on their path. It has a strategy module and a *helper* module, the case
where a plugin's class file does not change but its code does; a metric that declares a
report column; a command; a finetune method; and an optimizer that can be told to fail at
run time.
"""

from __future__ import annotations

import copy
import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
import yaml

from tests.conftest import (
    TINY_PARAMS,
    make_workspace,
    pip_install_plugin,
    plugin_on_path,
    require_extra,
    run_cli,
)
from tests.test_dvc import dvc, dvc_repo, sh, stages_run  # noqa: F401 (dvc_repo: a fixture)

# One worker installs the probe once for the module's tests.
pytestmark = pytest.mark.xdist_group("unbottle-probe")

DIST = "unbottle-probe"
PROBE_INIT = '''
"""A probe plugin for unbottle's tests: every strategy calls into helpers.py."""

from typing import Any, ClassVar

from unbottle import ReportColumn, StrategyConfig, hookimpl


class ProbeSGD:
    """Plain SGD, built by the helper module."""

    name = "probe-sgd"

    class Config(StrategyConfig):
        fail: bool = False

    def __init__(self, config: Config) -> None:
        self.config = config

    def build(self, parameters, *, lr: float, weight_decay: float) -> Any:
        from unbottle_probe.helpers import make_sgd

        if self.config.fail:
            raise ValueError("probe-sgd was told to fail\\n(second line)")
        return make_sgd(parameters, lr)


class ProbeScore:
    """The share of the held-out questions' characters that are vowels."""

    name = "probe-score"
    produces: ClassVar[dict[str, str | None]] = {"probe_score": "higher"}
    columns: ClassVar[dict[str, ReportColumn]] = {
        "probe_score": ReportColumn("probe score", "{:.2%}", "higher")
    }

    class Config(StrategyConfig):
        pass

    def __init__(self, config: Config) -> None:
        self.config = config

    def measure(self, model: Any, ctx: Any) -> dict[str, float]:
        from unbottle_probe.helpers import vowel_share

        return {"probe_score": vowel_share(q["question"] for q in ctx.questions)}


class ProbeNorms:
    """A finetune method: only the normalisation weights train."""

    name = "probe-norms"

    class Config(StrategyConfig):
        pass

    def __init__(self, config: Config) -> None:
        self.config = config

    def prepare(self, model: Any) -> Any:
        from unbottle_probe.helpers import train_only

        return train_only(model, "norm")

    def finalize(self, model: Any, out_dir: Any) -> Any:
        return model


@hookimpl
def register_optimizers(register):
    register(ProbeSGD)


@hookimpl
def register_finetune_methods(register):
    register(ProbeNorms)


@hookimpl
def register_metrics(register):
    register(ProbeScore)


@hookimpl
def register_commands(cli):
    @cli.command("probe-hello")
    def probe_hello(name: str = "world", fail: bool = False) -> None:
        """Say hello (a command added by a plugin)."""
        if fail:
            raise RuntimeError("probe-hello was told to fail")
        print(f"hello {name} from unbottle-probe")
'''
PROBE_HELPERS = """
def make_sgd(parameters, lr):
    import torch

    return torch.optim.SGD(list(parameters), lr=lr)


def train_only(model, word):
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(word in name)
    return model


def vowel_share(texts):
    text = "".join(texts)
    return sum(c in "aeiou" for c in text.lower()) / max(len(text), 1)
"""
PROBE_PYPROJECT = """
[build-system]
requires = ["setuptools>=69"]
build-backend = "setuptools.build_meta"

[project]
name = "unbottle-probe"
version = "0.1.0"
dependencies = ["unbottle"]

[project.entry-points.unbottle]
probe = "unbottle_probe"

[tool.setuptools]
packages = ["unbottle_probe"]
"""


@pytest.fixture(scope="module")
def probe_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """unbottle-probe installed (not editable) into a folder of its own."""
    source = tmp_path_factory.mktemp("probe-source") / "unbottle-probe"
    (source / "unbottle_probe").mkdir(parents=True)
    (source / "pyproject.toml").write_text(PROBE_PYPROJECT)
    (source / "unbottle_probe" / "__init__.py").write_text(PROBE_INIT.lstrip())
    (source / "unbottle_probe" / "helpers.py").write_text(PROBE_HELPERS.lstrip())
    return pip_install_plugin(source, tmp_path_factory.mktemp("probe"))


@pytest.fixture
def probe(probe_site: Path) -> Iterator[Path]:
    """The probe on this test's path; yields its installed package folder, whose
    helpers.py the tests edit."""
    import importlib.util

    with plugin_on_path(probe_site, "unbottle_probe"):
        spec = importlib.util.find_spec("unbottle_probe")
        assert spec is not None and spec.submodule_search_locations
        installed = Path(next(iter(spec.submodule_search_locations)))
        assert installed == probe_site / "unbottle_probe"  # the install, not the source
        yield installed


def _edit(module: Path, note: str) -> None:
    """Change a module's code, not its behaviour (the version stays 0.1.0)."""
    module.write_text(module.read_text() + f"\n# {note}\n")


# ------------------------------------------------------------------ DVC and `unbottle stage`


@pytest.mark.slow
def test_a_plugin_helper_change_reruns_its_stage_through_unbottle_and_dvc(dvc_repo, probe):  # noqa: F811
    root = dvc_repo
    # The user's project as dvc_repo lays it out, pretraining from scratch (a released
    # model as the source would train nothing) with the probe's optimizer.
    params = yaml.safe_load((root / "params.yaml").read_text())
    del params["pretrain"]["source"]
    params["pretrain"]["train"]["optimizer"] = "probe-sgd"
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh("git", "commit", "-qam", "pretrain with the probe's optimizer", cwd=root)
    unbottle = (sys.executable, "-m", "unbottle")

    out = sh(*unbottle, "stage", "pretrain", cwd=root)
    assert "pretrain: wrote artifacts/pretrain" in out
    assert "pretrain: recorded in dvc.lock" in out
    lock = json.loads((root / "locks/pretrain.json").read_text())
    assert lock["pretrain.train.optimizer"]["distribution"] == DIST
    assert lock["pretrain.train.optimizer"]["version"] == "0.1.0"
    # Recorded as the flow records: `dvc repro` right after has nothing to do but the
    # always-changed lock stage, whose output did not change.
    assert re.findall(r"Running stage '(\w+)'", dvc("repro", "pretrain", cwd=root)) == ["plugins"]

    # The helper module changes, the version does not: `unbottle stage` reruns pretrain...
    _edit(probe / "helpers.py", "edit 1")
    assert "pretrain: wrote artifacts/pretrain" in sh(*unbottle, "stage", "pretrain", cwd=root)
    # ...and so does `dvc repro`, once per change: the lock changed, then it did not.
    _edit(probe / "helpers.py", "edit 2")
    assert stages_run(dvc("repro", "pretrain", cwd=root)) == ["pretrain"]
    assert stages_run(dvc("repro", "pretrain", cwd=root)) == []
    changed = json.loads((root / "locks/pretrain.json").read_text())
    assert changed["pretrain.train.optimizer"]["code"] != lock["pretrain.train.optimizer"]["code"]


def test_a_plugin_failing_at_run_time_is_named_in_one_line(workspace: Path, probe: Path) -> None:
    args = ("stage", "pretrain", "-S", "pretrain.train.optimizer=probe-sgd")
    args += ("-S", "pretrain.train.optimizer.fail=true")
    result = run_cli(*args, cwd=workspace)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines()[-1] == (
        'error: plugin "probe" (unbottle-probe 0.1.0) failed: ValueError: probe-sgd was told '
        "to fail (second line) (--debug shows the traceback)"
    )
    assert "Traceback" not in result.stderr


def test_a_plugin_adds_a_command(workspace: Path, probe: Path) -> None:
    result = run_cli("probe-hello", "--name", "tests", cwd=workspace)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "hello tests from unbottle-probe\n"
    assert "probe-hello" in run_cli("--help", cwd=workspace).stdout
    # A plugin's command failing: one line, or the traceback with --debug.
    failed = run_cli("probe-hello", "--fail", cwd=workspace)
    assert (failed.returncode, failed.stderr) == (
        2,
        'error: plugin "probe" (unbottle-probe 0.1.0) failed: RuntimeError: probe-hello was '
        "told to fail (--debug shows the traceback)\n",
    )
    debug = run_cli("--debug", "probe-hello", "--fail", cwd=workspace)
    assert debug.returncode == 1
    assert debug.stderr.startswith("Traceback")
    assert 'unbottle_probe/__init__.py", line' in debug.stderr
    assert debug.stderr.endswith("RuntimeError: probe-hello was told to fail\n")


def test_a_plugins_finetune_method_trains_a_released_model_further(
    tmp_path: Path, tiny_data: Path, probe: Path
) -> None:
    """pretrain.continued.method names a finetune method as finetune.method does, a third
    party's too: continued pretraining of a released model trains what the method leaves
    trainable, and the artifact records whose method it was."""
    import torch
    from safetensors.torch import load_file

    from tests.released_model import save_released_model, tiny_released_model
    from unbottle.core.config.schema import Params
    from unbottle.core.stages.layout import Layout
    from unbottle.core.stages.runner import run_stage
    from unbottle.core.store.artifacts import read_manifest

    model, tokenizer = tiny_released_model(tiny_data / "corpus" / "train.txt")
    source = save_released_model(model, tokenizer, tmp_path / "source")
    params = copy.deepcopy(TINY_PARAMS)
    params["pretrain"]["source"] = {"path": str(source)}
    params["pretrain"]["continued"] = {
        **{"steps": 3, "batch_size": 2, "seq_len": 32, "lr": 1e-2},
        "method": "probe-norms",
    }
    root = make_workspace(tmp_path / "project", tiny_data, params)
    result = run_stage("pretrain", Params.model_validate(params), Layout(root))

    before = load_file(source / "model.safetensors")
    after = load_file(result.out_dir / "model.safetensors")
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k].float(), after[k].float())}
    norms = {k for k in before if "norm" in k}
    assert changed == norms and len(norms) == 5  # 2 per layer and the final one
    assert result.metrics["trainable_parameters"] == sum(before[k].numel() for k in norms)
    described = read_manifest(result.out_dir)["strategies"]["finetune_method"]
    assert (described["name"], described["distribution"]) == ("probe-norms", DIST)

    # And in the finetune stage, on the pairs.
    params["finetune"]["method"] = "probe-norms"
    params["finetune"]["train"].update(seq_len=128, lr=1e-2)  # the chat template's tokens too
    tuned = run_stage("finetune", Params.model_validate(params), Layout(root))
    finetuned = load_file(tuned.out_dir / "model.safetensors")
    assert {k for k in after if not torch.equal(after[k], finetuned[k])} == norms


# ------------------------------------------------------------------ MLflow and report columns


def test_mlflow_tracks_a_run_and_report_shows_a_plugin_column(
    tmp_path: Path, tiny_data: Path, probe: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    require_extra("mlflow")
    from mlflow import MlflowClient

    from unbottle.core.config.schema import Params
    from unbottle.core.registry import load_registry
    from unbottle.core.stages.layout import Layout
    from unbottle.core.stages.runner import run_stage

    params = copy.deepcopy(TINY_PARAMS)
    params["compress"]["variants"] = {"magnitude50": [{"prune": "magnitude", "sparsity": 0.5}]}
    params["evaluate"]["metrics"] = [{"name": "perplexity", "window": 32}, "probe-score"]
    root = make_workspace(tmp_path / "project", tiny_data, params)
    monkeypatch.chdir(root)  # the default store is ./mlruns
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("UNBOTTLE_MLFLOW", "1")
    registry = load_registry()
    hooks = {(hook, plugin.name) for hook, plugin in registry.lifecycle_hooks()}
    assert {("after_stage", "builtin_mlflow"), ("on_train_log", "builtin_mlflow")} <= hooks
    assert ("register_commands", "probe") in hooks  # what `unbottle plugins` lists
    validated, layout = Params.model_validate(params), Layout(root)
    results = {
        name: run_stage(name, validated, layout, registry)
        for name in ("pretrain", "finetune", "compress", "evaluate")
    }

    client = MlflowClient((root / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("unbottle")
    runs = {
        r.info.run_name: r for r in client.search_runs([experiment.experiment_id], max_results=10)
    }
    assert set(runs) == {"pretrain", "finetune", "compress", "evaluate"}
    assert all(r.info.status == "FINISHED" for r in runs.values())

    pretrain = runs["pretrain"]
    history = client.get_metric_history(pretrain.info.run_id, "loss")
    assert [m.step for m in history] == list(range(1, 13))  # every optimizer step
    assert history[-1].value == pytest.approx(results["pretrain"].metrics["final_loss"])
    assert pretrain.data.params["train.steps"] == "12"
    assert pretrain.data.params["train.lr"] == "0.003"
    assert pretrain.data.params["strategy.optimizer"] == "adamw (unbottle 0.1.0)"
    stamp = json.loads((root / "artifacts/pretrain/manifest.json").read_text())["fingerprint"]
    assert pretrain.data.tags["unbottle.fingerprint"] == stamp

    evaluate = runs["evaluate"]
    evaluation = json.loads((root / "artifacts/evaluate/evaluation.json").read_text())
    table = client.load_table(
        experiment.experiment_id, "evaluation_table.json", run_ids=[evaluate.info.run_id]
    )
    assert list(table["variant"]) == ["pretrained", "finetuned", "magnitude50"]
    for _, row in table.iterrows():
        expected = evaluation["variants"][row["variant"]]
        assert row["perplexity"] == pytest.approx(expected["perplexity"])
        assert row["probe_score"] == pytest.approx(expected["probe_score"])
    ppl = evaluate.data.metrics["variants/magnitude50/perplexity"]
    assert ppl == pytest.approx(evaluation["variants"]["magnitude50"]["perplexity"])
    artifacts = {a.path for a in client.list_artifacts(evaluate.info.run_id)}
    assert {"report.md", "evaluation_table.json"} <= artifacts

    # The probe's declared column, with its label, direction and format.
    report = (root / "artifacts/evaluate/report.md").read_text()
    header = next(line for line in report.splitlines() if line.startswith("| variant"))
    titles = [cell.strip() for cell in header.strip("|").split("|")]
    assert "probe score ↑" in titles
    column = titles.index("probe score ↑")
    finetuned = next(line for line in report.splitlines() if line.startswith("| finetuned "))
    cells = [cell.strip() for cell in finetuned.strip("|").split("|")]
    assert cells[column] == f"{evaluation['variants']['finetuned']['probe_score']:.2%}"


def test_a_bad_report_column_is_refused_before_measuring() -> None:
    from unbottle.core.contract.errors import PluginError
    from unbottle.core.contract.strategies import ReportColumn
    from unbottle.core.registry import StrategyInfo
    from unbottle.core.stages.evaluate import check_columns
    from unbottle.core.stages.report import markdown_table, plugin_columns

    class Bad:
        name = "bad"
        columns: ClassVar[dict[str, Any]] = {"x": ReportColumn("x", "{:.2q}")}

    info = StrategyInfo("metric", "bad", Bad, "p", "dist", "1.0")
    with pytest.raises(
        PluginError,
        match=r"^plugin 'p' \(dist 1\.0\): metric 'bad' column 'x': format '\{:\.2q\}' fails",
    ):
        check_columns(info)
    Bad.columns = {"x": ("x", "{:.2f}")}
    with pytest.raises(PluginError, match=re.escape("is ('x', '{:.2f}'), not an unbottle.")):
        check_columns(info)

    class Good:
        columns: ClassVar[dict[str, ReportColumn]] = {
            "perplexity": ReportColumn("ignored: a built-in column"),
            "score": ReportColumn("score", "{:.1f}", "lower"),
        }

    extra = plugin_columns([Good])
    assert extra == [("score", "score ↓", "{:.1f}")]
    table = markdown_table({"a": {"perplexity": 2.0, "score": 3.14159}}, None, extra)
    assert table.splitlines()[0] == "| variant | perplexity | score ↓ |"
    assert table.splitlines()[2] == "| a | 2.000 | 3.1 |"


# ------------------------------------------------------------------ code hashing by package


def test_a_strategy_code_hash_covers_its_whole_package(tmp_path, monkeypatch) -> None:
    from unbottle.core.store.code import code_unit, strategy_code_hash

    package = tmp_path / "hashprobe"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("class S:\n    name = 's'\n")
    (package / "helpers.py").write_text("X = 1\n")
    (package / "sub" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    import hashprobe

    try:
        before = strategy_code_hash(hashprobe.S)
        (package / "__pycache__").mkdir()
        (package / "__pycache__" / "helpers.cpython-311.pyc").write_bytes(b"compiled")
        assert strategy_code_hash(hashprobe.S) == before  # caches are not code
        (package / "sub" / "more.py").write_text("Y = 2\n")
        after_new_module = strategy_code_hash(hashprobe.S)
        assert after_new_module != before
        (package / "helpers.py").write_text("X = 2\n")
        assert strategy_code_hash(hashprobe.S) not in (before, after_new_module)
    finally:
        sys.modules.pop("hashprobe", None)

    assert code_unit("unbottle_lion.optim") == "unbottle_lion"
    assert code_unit("unbottle.plugins.pruning.sparsegpt") == "unbottle.plugins.pruning"
    assert code_unit("unbottle.plugins.optimizers") == "unbottle.plugins.optimizers"


def _core_imports(module: str, repo: Path) -> set[str]:
    """The ``unbottle.core`` modules ``module`` imports, anywhere in its body, recursively."""
    import ast

    def path_of(name: str) -> Path | None:
        rel = repo.joinpath(*name.split(".")[1:])
        for candidate in (rel.with_suffix(".py"), rel / "__init__.py"):
            if candidate.is_file():
                return candidate
        return None

    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        path = path_of(name)
        if name in seen or path is None:
            continue
        seen.add(name)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("unbottle."):
                todo.append(node.module)
                todo += [f"{node.module}.{a.name}" for a in node.names]
    return {m for m in seen if m.startswith("unbottle.core.")}


def test_stage_code_covers_every_core_module_a_stage_imports() -> None:
    from tests.conftest import REPO
    from unbottle.core.store.fingerprint import STAGE_CODE

    # The framework decides whether a stage runs, not what it writes: config, contract,
    # store, the registry, progress bars, the layout of the workspace.
    framework = ("config", "contract", "store")
    for stage, entries in STAGE_CODE.items():
        covered = {f"unbottle.{e}" for e in entries}
        for module in _core_imports(f"unbottle.core.stages.{stage}", REPO):
            sub = ".".join(module.split(".")[:3])
            top_level_module = (REPO / "core" / f"{sub.split('.')[-1]}.py").is_file()
            if top_level_module or sub.split(".")[-1] in framework:
                continue
            if module == "unbottle.core.stages.layout":
                continue
            if sub == "unbottle.core.stages":
                assert module in covered, (stage, module)
            else:
                assert sub in covered, (stage, module)


def test_plugin_locks_change_only_when_a_plugin_does(tmp_path) -> None:
    from unbottle.core.config.schema import Params
    from unbottle.core.registry import get_registry
    from unbottle.core.stages.layout import STAGES, Layout
    from unbottle.core.store.fingerprint import write_plugin_locks

    params, layout = Params.model_validate(TINY_PARAMS), Layout(tmp_path)
    paths = write_plugin_locks(params, layout, get_registry())
    assert [p.name for p in paths] == [f"{stage}.json" for stage in STAGES]
    first = {p: (p.read_text(), p.stat().st_mtime_ns) for p in paths}
    write_plugin_locks(params, layout, get_registry())
    assert {p: (p.read_text(), p.stat().st_mtime_ns) for p in paths} == first  # untouched
    compress = json.loads(layout.plugin_lock_file("compress").read_text())
    assert set(compress) == {"compress.variants.magnitude50[0]", "compress.variants.int8[0]"}
    assert compress["compress.variants.magnitude50[0]"]["plugin"] == "builtin_pruning"
    assert re.fullmatch(r"[0-9a-f]{64}", compress["compress.variants.int8[0]"]["code"])


# ------------------------------------------------------------------ docs/plugins.md


def test_plugins_md_reference_is_generated_from_the_registry_and_hookspecs() -> None:
    from tests.conftest import REPO
    from unbottle.core.contract.reference import (
        BUILTIN,
        documented_section,
        hook_functions,
        reference_markdown,
    )
    from unbottle.core.registry import get_registry

    registry = get_registry()
    doc = (REPO / "docs" / "plugins.md").read_text()
    section = documented_section(doc)
    assert section is not None, "docs/plugins.md has no generated reference"
    headings = set(re.findall(r"^#{3,4} `?([\w-]+)`?$", section, flags=re.M))
    missing_hooks = {f.__name__ for f in hook_functions()} - headings
    assert not missing_hooks, f"hooks missing from docs/plugins.md: {missing_hooks}"
    builtins = {i.name for i in registry.all() if i.distribution == BUILTIN}
    assert not builtins - headings, f"strategies missing from docs: {builtins - headings}"
    assert section == reference_markdown(registry), (
        "docs/plugins.md's reference is stale: regenerate it with `unbottle plugins --markdown`"
    )
