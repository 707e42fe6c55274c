"""What the compress stage holds in memory while a variant is quantized and exported.

On SmolLM2-135M the stage with a GPTQ ``runtime: genai`` variant peaked at 4.7 GB: three
float copies of the model (the input, the recipe's working copy, the quantizer's own load)
and the codes were all alive while onnxruntime-genai's builder ran beside them
(BENCHMARKS.md, the released-model pipeline). These tests count the float models alive
at each point, so they fail when a copy outlives its use.
"""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
from transformers import GenerationMixin

from unbottle.core.registry import get_registry
from unbottle.core.store.artifacts import write_manifest


def live_models() -> int:
    """Language models (torch, with their weights) that are still referenced: each counted
    once, not again for its inner base model, which generates nothing."""
    gc.collect()
    return sum(issubclass(type(o), GenerationMixin) for o in gc.get_objects())


@pytest.fixture(scope="module")
def tokenizer():
    from unbottle.core.models.loading import train_tokenizer

    return train_tokenizer(["the quick brown fox jumps over the lazy dog " * 8], 300)


@pytest.fixture(scope="module")
def model_artifact(tmp_path_factory, tokenizer) -> Path:
    """A tiny float model as the finetune stage leaves it."""
    from unbottle.core.config.schema import ModelParams
    from unbottle.core.models.loading import build_model, save_model

    out = tmp_path_factory.mktemp("finetune") / "model"
    out.mkdir()
    params = ModelParams(hidden_size=64, layers=2, heads=2, intermediate_size=128, context=64)
    save_model(build_model(params, tokenizer, 0), tokenizer, out)
    write_manifest(out, stage="finetune", config={}, strategies={}, inputs={}, metrics={})
    return out


@pytest.fixture(scope="module")
def train_text(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "train.txt"
    path.write_text("the quick brown fox jumps over the lazy dog. " * 200, encoding="utf-8")
    return path


def compress_one(recipe: list[dict], model: Path, text: Path, out: Path) -> dict:
    from unbottle.core.config.schema import CompressParams
    from unbottle.core.stages.compress import compress

    cfg = CompressParams.model_validate(
        {"calibration": {"samples": 2, "seq_len": 32}, "variants": {"v": recipe}}
    )
    return compress(
        cfg, model=model, train_text=text, out_dir=out, seed=0, registry=get_registry()
    ).metrics


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_the_quantizers_float_model_and_codes_are_freed_before_the_export(
    method, model_artifact, train_text, tmp_path, monkeypatch
):
    import unbottle.plugins.quantization.matmulnbits as matmulnbits

    before = live_models()  # other tests' models may linger in this process
    seen: list[int] = []
    export = matmulnbits.export_matmulnbits

    def counting_export(*args, **kwargs):
        seen.append(live_models() - before)
        return export(*args, **kwargs)

    monkeypatch.setattr(matmulnbits, "export_matmulnbits", counting_export)
    step = {"quantize": method, "bits": 4, "group_size": 32, "runtime": "onnx"}
    metrics = compress_one([step], model_artifact, train_text, tmp_path / "out")
    assert metrics["v"]["format"] == "onnx"
    # Only the stage's input model (read by every variant; a distiller's teacher) is alive.
    assert seen == [1]


@pytest.mark.parametrize(
    "recipe",
    [
        [{"quantize": "rtn", "bits": 8}],
        [{"prune": "magnitude", "sparsity": 0.5}, {"quantize": "rtn", "bits": 8}],
    ],
    ids=["quantize-only", "prune-then-quantize"],
)
def test_the_recipes_working_copy_is_not_held_while_the_quantizer_runs(
    recipe, model_artifact, train_text, tmp_path, monkeypatch
):
    from unbottle.plugins.quantization import RoundToNearest

    before = live_models()
    seen: list[int] = []
    quantize = RoundToNearest.quantize

    def counting_quantize(self, model_dir, out_dir, ctx):
        seen.append(live_models() - before)
        return quantize(self, model_dir, out_dir, ctx)

    monkeypatch.setattr(RoundToNearest, "quantize", counting_quantize)
    metrics = compress_one(recipe, model_artifact, train_text, tmp_path / "out")
    assert metrics["v"]["format"] == "packed"
    # The input model only: the working copy was written for the quantizer to load, and
    # a quantize-only recipe never needed one.
    assert seen == [1]
    assert live_models() == before  # nothing of the stage's is left behind
