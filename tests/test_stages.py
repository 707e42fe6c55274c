"""Each stage on a tiny config, run in-process in order, then checked for what it promises."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from unbottle.core.stages.layout import Layout
from unbottle.core.store.artifacts import read_manifest, verify_artifact


@pytest.fixture(scope="module")
def run(pipeline_run) -> dict:
    return pipeline_run


def answer_loss(model_dir: Path, qa_file: Path, limit: int | None = None) -> float:
    """Mean cross-entropy of the answer tokens of held-out questions (the first
    ``limit``), as the finetuning loop computes it."""
    import torch

    from unbottle.core.data import prompts as task
    from unbottle.core.models.loading import load_model
    from unbottle.core.stages.finetune import collate, encode_pairs

    model, tokenizer = load_model(model_dir)
    pairs = task.read_pairs(qa_file, "qa")[:limit]
    batch = collate(encode_pairs(tokenizer, pairs, 64), tokenizer.pad_token_id)
    with torch.inference_mode():
        return float(model(**batch).loss)


def test_pretrain_writes_a_model_and_a_falling_loss_curve(run):
    layout: Layout = run["layout"]
    out = layout.artifact("pretrain")
    assert (out / "model.safetensors").is_file()
    assert (out / "tokenizer.json").is_file()
    assert not list(out.glob("*.bin")) and not list(out.glob("*.pt"))  # no pickles
    manifest = verify_artifact(out)
    assert manifest["strategies"]["optimizer"]["name"] == "adamw"
    assert manifest["strategies"]["optimizer"]["distribution"] == "unbottle"
    assert len(manifest["inputs"]["train_text"]) == 64  # a sha256
    timing = json.loads(layout.timing_file("pretrain").read_text())
    assert timing["tokens_per_s"] > 0
    curve = layout.plot_file("pretrain_loss").read_text().splitlines()
    assert curve[0] == "step,loss"
    losses = [float(line.split(",")[1]) for line in curve[1:]]
    assert losses[-1] < losses[0]


def test_finetune_lowers_the_loss_of_held_out_answers(run):
    layout: Layout = run["layout"]
    qa_test = layout.root / "data/qa/test.jsonl"
    before = answer_loss(layout.artifact("pretrain"), qa_test)
    after = answer_loss(layout.artifact("finetune"), qa_test)
    assert after < before
    assert (
        read_manifest(layout.artifact("finetune"))["strategies"]["finetune_method"]["name"]
        == "full"
    )


def test_finetune_learns_only_the_answer_tokens():
    from unbottle.core.stages.finetune import IGNORE, collate

    # (input ids, labels), the labels IGNORE outside the answer (encode_pairs makes them).
    batch = collate(
        [([5, 6, 7, 8, 9], [IGNORE, IGNORE, IGNORE, 8, 9]), ([5, 8], [IGNORE, 8])], pad=1
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [5, 8, 1, 1, 1]]
    assert batch["labels"].tolist() == [
        [IGNORE, IGNORE, IGNORE, 8, 9],
        [IGNORE, 8, IGNORE, IGNORE, IGNORE],
    ]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]


def test_magnitude_variant_has_real_zeros_at_the_target_sparsity(run):
    from safetensors.torch import load_file

    out = run["layout"].artifact("compress") / "magnitude50"
    weights = load_file(out / "model.safetensors")
    pruned = {k: v for k, v in weights.items() if k.endswith("proj.weight")}
    assert pruned
    for name, w in pruned.items():
        assert int((w == 0).sum()) == round(0.5 * w.numel()), name
    assert float((weights["model.embed_tokens.weight"] == 0).float().mean()) < 0.01
    manifest = read_manifest(out)
    assert manifest["steps"][0]["action"] == "prune"
    assert manifest["steps"][0]["metrics"]["sparsity"] == pytest.approx(0.5, abs=1e-3)


def test_int8_variant_stores_int8_weights(run):
    import onnx
    from onnx import TensorProto, numpy_helper
    from safetensors.torch import load_file

    layout: Layout = run["layout"]
    out = layout.artifact("compress") / "int8"
    (model_file,) = out.glob("*.onnx")
    graph = onnx.load(str(model_file)).graph
    int8 = [t for t in graph.initializer if t.data_type in (TensorProto.INT8, TensorProto.UINT8)]
    float_weights = load_file(layout.artifact("finetune") / "model.safetensors")
    projections = [w for k, w in float_weights.items() if k.endswith("proj.weight")]
    # Every projection matrix is stored as one byte per weight, not four.
    stored = sorted(numpy_helper.to_array(t).size for t in int8 if len(t.dims) == 2)
    assert sum(stored) >= sum(w.numel() for w in projections)
    assert all(len(t.raw_data) == numpy_helper.to_array(t).size for t in int8 if t.raw_data)
    metrics = read_manifest(out)["metrics"]
    assert metrics["step1_onnx_int8_bytes"] < metrics["step1_onnx_fp32_bytes"]


def test_distilled_variant_is_shallower_and_recovers(run):
    from transformers import AutoConfig

    out = run["layout"].artifact("compress") / "kd1"
    assert AutoConfig.from_pretrained(out).num_hidden_layers == 1
    step = read_manifest(out)["steps"][0]
    assert step["action"] == "distill"
    assert (
        step["metrics"]["student_perplexity_after"] < step["metrics"]["student_perplexity_before"]
    )


def test_distillation_trains_in_the_precision_it_names(run, tmp_path, caplog):
    """kd's ``precision`` reaches its training loop: the loop logs it, and bf16's rounding
    takes other steps than fp32 from the same teacher, data and seed."""
    import logging

    import torch
    from safetensors.torch import load_file

    from unbottle.core.config.schema import CompressParams
    from unbottle.core.registry import get_registry
    from unbottle.core.stages.compress import build_variant, prepare

    layout, params = run["layout"], run["params"]
    kd = {"distill": "kd", "layers": 1, "steps": 3, "batch_size": 2, "seq_len": 32}
    cfg = CompressParams.model_validate(
        {
            "calibration": {"samples": 4, "seq_len": 24},
            "variants": {p: [{**kd, "precision": p}] for p in ("fp32", "bf16")},
        }
    )
    bench = prepare(
        cfg,
        registry=get_registry(),
        model=layout.artifact("finetune"),
        train_text=layout.root / params.data.train_text,
        seed=0,
    )
    students = {}
    for precision in ("fp32", "bf16"):
        with caplog.at_level(logging.INFO):
            caplog.clear()
            build_variant(bench, precision, tmp_path / precision)
        assert f"distill: precision {precision} (" in caplog.text
        students[precision] = load_file(tmp_path / precision / "model.safetensors")
    assert any(
        not torch.equal(weight, students["bf16"][name]) for name, weight in students["fp32"].items()
    )


def test_compress_records_every_variant_and_step(run):
    out = run["layout"].artifact("compress")
    manifest = verify_artifact(out)
    assert manifest["variants"] == ["magnitude50", "int8", "kd1"]
    for name in manifest["variants"]:
        verify_artifact(out / name)


def test_evaluate_measures_every_variant(run):
    layout: Layout = run["layout"]
    evaluation = json.loads((layout.artifact("evaluate") / "evaluation.json").read_text())
    metrics = evaluation["variants"]
    assert set(metrics) == {"pretrained", "finetuned", "magnitude50", "int8", "kd1"}
    quality = json.loads(layout.metrics_file("evaluate").read_text())["variants"]
    timing = json.loads(layout.timing_file("evaluate").read_text())["variants"]
    assert "perplexity" in quality["int8"] and "latency_p50_s" not in quality["int8"]
    assert "latency_p50_s" in timing["int8"]
    for name, row in metrics.items():
        for key in (
            "perplexity",
            "accuracy",
            "size_bytes",
            "parameters",
            "nonzero_parameters",
            "latency_p50_s",
            "decode_tokens_per_s",
        ):
            assert key in row and math.isfinite(row[key]), (name, key)
    assert metrics["int8"]["format"] == "onnx"
    # (At this tiny size the ONNX graph outweighs its int8 weights; the demo shows the shrink.)
    assert (
        metrics["int8"]["size_bytes"]
        == (layout.artifact("compress") / "int8" / "model_quantized.onnx").stat().st_size
    )
    assert metrics["magnitude50"]["nonzero_parameters"] < metrics["finetuned"]["nonzero_parameters"]
    # Half of the layers the pruner prunes; less over all weights (the embeddings are dense).
    assert metrics["magnitude50"]["layer_sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert metrics["magnitude50"]["sparsity"] < 0.45
    assert metrics["finetuned"]["layer_sparsity"] == 0.0
    assert metrics["finetuned"]["perplexity_ratio"] == pytest.approx(1.0)
    report = (layout.artifact("evaluate") / "report.md").read_text()
    for name in metrics:
        assert f"| {name} |" in report


def test_finetuning_lowers_the_perplexity_of_held_out_answers(run):
    """answer_perplexity is the loss finetuning minimises, on held-out pairs: lower for
    the finetuned model than for the pretrained one, the training loop's figure exactly,
    and about the same for its int8 ONNX variant, measured in ONNX Runtime."""
    from unbottle.core.contract.strategies import EvalContext
    from unbottle.core.data.prompts import prompt_format_of, read_pairs
    from unbottle.core.models.runtimes import load_runner
    from unbottle.plugins.metrics import AnswerPerplexity

    layout: Layout = run["layout"]
    questions = read_pairs(layout.root / run["params"].data.qa_test, "data.qa_test")[:8]
    finetuned = layout.artifact("finetune")
    metric = AnswerPerplexity(AnswerPerplexity.Config())
    figures = {}
    for name, model_dir in (
        ("pretrained", layout.artifact("pretrain")),
        ("finetuned", finetuned),
        ("int8", layout.artifact("compress") / "int8"),
    ):
        runner = load_runner(model_dir)
        ctx = EvalContext(
            tokenizer=runner.tokenizer,
            valid_text="",
            questions=questions,
            model_dir=model_dir,
            prompt_format=prompt_format_of(finetuned),
        )
        figures[name] = metric.measure(runner, ctx)
    perplexity = {name: f["answer_perplexity"] for name, f in figures.items()}
    assert perplexity["finetuned"] < perplexity["pretrained"]
    # The loss finetuning minimises, computed as training computes it, on the same pairs.
    qa_test = layout.root / run["params"].data.qa_test
    loss = answer_loss(finetuned, qa_test, limit=8)
    assert math.log(perplexity["finetuned"]) == pytest.approx(loss, abs=1e-4)
    # The int8 ONNX variant of the finetuned model answers about as well.
    assert 0.8 < perplexity["int8"] / perplexity["finetuned"] < 1.25
    assert len({f["answer_tokens"] for f in figures.values()}) == 1


def test_deploy_bundle_loads_and_generates_in_transformers(run):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = run["layout"].artifact("deploy")
    names = {p.name for p in out.iterdir()}
    assert {
        "model.safetensors",
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "README.md",
        "manifest.json",
    } <= names
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("Question: Where does", return_tensors="pt")
    with torch.inference_mode():
        generated = model.generate(**ids, max_new_tokens=3, min_new_tokens=3)
    assert generated.shape[1] == ids["input_ids"].shape[1] + 3
    card = (out / "README.md").read_text()
    assert "| finetuned |" in card and "| int8 |" in card
    assert read_manifest(out)["variant"] == "finetuned"


def run_card_code(bundle: Path) -> str:
    """Run the model card's Python example against the bundle, as a user would paste it."""
    import contextlib
    import io
    import re

    card = (bundle / "README.md").read_text(encoding="utf-8")
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(code.replace("path/to/this/bundle", str(bundle)), {})
    return code


def test_the_model_cards_example_runs_and_asks_a_question_of_the_users_test_set(run):
    from unbottle.core.data.prompts import read_pairs

    questions = [p["question"] for p in read_pairs(run["layout"].root / "data/qa/test.jsonl", "qa")]
    code = run_card_code(run["layout"].artifact("deploy"))
    assert any(f"Question: {q}" in code for q in questions), code
    assert "Alice" not in code  # the demo world's placeholder is not the user's data
