"""params.yaml validation: every mistake is one line naming the key, the value and the rule."""

from __future__ import annotations

from pathlib import Path

import pytest

from unbottle.core.config.loading import load_params
from unbottle.core.config.strategy_checks import check_strategies
from unbottle.core.contract.errors import ConfigError
from unbottle.core.registry import get_registry


def test_repository_params_are_valid():
    params = load_params(Path(__file__).parents[1] / "params.yaml")
    check_strategies(params, get_registry())
    assert params.deploy.variant in params.variant_names()


def test_defaults_need_no_file():
    params = load_params(None)
    assert params.pretrain.train.optimizer.name == "adamw"
    assert params.compress.variants == {}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("pretrain.train.steps=-1", r"^pretrain\.train\.steps: -1 is invalid: .*greater than"),
        ("pretrain.train.stepz=5", r"^pretrain\.train\.stepz: unknown key; allowed: steps, "),
        ("pretrain.train.lr=fast", r"^pretrain\.train\.lr: 'fast' is invalid: .*number"),
        ("pretrain.train.precision=fp8", r"precision: 'fp8' is invalid: .*'auto', 'fp32'"),
        ("pretrain.model.heads=3", r"^pretrain\.model\.hidden_size: 128 is not divisible by"),
        ("pretrain.train.seq_len=4096", r"^pretrain\.train\.seq_len: 4096 is longer than"),
        ("deploy.variant=nope", r"^deploy\.variant: 'nope' is not a variant; allowed: finetuned"),
        ("compress.variants.x=[]", r"^compress\.variants\.x: a variant needs at least one step"),
        ("compress.variants.Bad=[{prune: magnitude}]", r"variants\.Bad: a variant name must"),
        (
            "compress.variants.x=[{prune: magnitude, quantize: onnx-dynamic-int8}]",
            r"^compress\.variants\.x\[0\]: a step names exactly one of prune, quantize, distill",
        ),
        (
            "compress.variants.x=[{quantize: onnx-dynamic-int8}, {prune: magnitude}]",
            r"^compress\.variants\.x\[1\]: a prune step cannot follow a quantize step",
        ),
        ("data.demo.people=2", r"^data\.demo\.people: 2 is invalid: .*greater than or equal to 4"),
    ],
)
def test_structural_errors_are_one_line(override, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_params(None, [override])
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "pretrain.train.optimizer=lamb",
            r"^pretrain\.train\.optimizer: Unknown optimizer 'lamb'\. "
            r"Installed: adafactor, adam, adamw, sgd",
        ),
        (
            "compress.variants.x=[{prune: foo}]",
            r"^compress\.variants\.x\[0\]: Unknown pruning strategy 'foo'\. Installed: magnitude",
        ),
        (
            "compress.variants.x=[{prune: magnitude, sparsity: 1.5}]",
            r"^compress\.variants\.x\[0\]\.sparsity: 1\.5 is invalid: .*less than 1",
        ),
        (
            "compress.variants.x=[{prune: magnitude, sparsty: 0.5}]",
            r"^compress\.variants\.x\[0\]\.sparsty: unknown key; allowed: sparsity, scope",
        ),
        ("evaluate.metrics=[bleu]", r"^evaluate\.metrics\[0\]: Unknown metric 'bleu'"),
        (
            "deploy.target=s3",
            r"^deploy\.target: Unknown deploy target 's3'\. Installed: gguf, hf, onnx, server\.$",
        ),
    ],
)
def test_strategy_errors_name_installed_strategies(override, message):
    params = load_params(None, [override])
    with pytest.raises(ConfigError, match=message):
        check_strategies(params, get_registry())


def test_overrides_reach_keys_the_file_leaves_out(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("pretrain:\n  train:\n    steps: 5\n")
    params = load_params(path, ["pretrain.train.optimizer.betas=[0.8, 0.9]", "seed=7"])
    assert params.seed == 7
    assert params.pretrain.train.steps == 5
    assert params.pretrain.train.optimizer.name == "adamw"
    assert params.pretrain.train.optimizer.options == {"betas": [0.8, 0.9]}


def test_override_indexes_lists(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("compress:\n  variants:\n    s: [{prune: magnitude, sparsity: 0.5}]\n")
    params = load_params(path, ["compress.variants.s.0.sparsity=0.7"])
    assert params.compress.variants["s"][0].options == {"sparsity": 0.7}
    with pytest.raises(ConfigError, match=r"compress\.variants\.s\.3 is not an index"):
        load_params(path, ["compress.variants.s.3.sparsity=0.7"])


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_params(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("pretrain: [unclosed\n")
    with pytest.raises(ConfigError, match=r"not valid YAML at line \d"):
        load_params(broken)
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_params(listing)
    with pytest.raises(ConfigError, match=r"not of the form key\.path=value"):
        load_params(None, ["seed"])


@pytest.mark.parametrize(
    ("override", "where"),
    [
        ("compress.variants.x=[{quantize: gptq, layers: '('}]", r"x\[0\]\.layers"),
        ("compress.variants.x=[{prune: wanda, layers: '('}]", r"x\[0\]\.layers"),
        ("compress.variants.x=[{prune: sparsegpt, overrides: {'(': 0.5}}]", r"x\[0\]\.overrides"),
        ("finetune.method={name: partial, modules: ['[']}", r"method\.modules\[0\]"),
    ],
)
def test_a_layer_pattern_that_is_not_a_regex_is_one_line(override, where):
    params = load_params(None, [override])
    with pytest.raises(ConfigError, match=rf"{where}.* is not a regular expression: ") as info:
        check_strategies(params, get_registry())
    assert "\n" not in str(info.value)
