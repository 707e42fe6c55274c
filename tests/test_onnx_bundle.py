"""The ``onnx`` edge bundle: optimum loads it, and its greedy tokens hold up against torch.

The float32 export must generate exactly the torch model's greedy tokens. The dynamic
int8 bundle is held to a quality gate measured with the evaluation's own perplexity
metric: its perplexity on the held-out text within 2% of the torch model's, and at least
90% of its greedy tokens equal to torch's on the held-out questions.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from tests.serving_helpers import (
    assert_verify_matches_decode,
    deploy_target,
    finetuned_model,
    live_server,
)
from unbottle.core.data import prompts as task

NEW_TOKENS = 8
MAX_PERPLEXITY_RATIO = 1.02
MIN_TOKEN_AGREEMENT = 0.90


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory, tiny_data) -> Path:
    return finetuned_model(tmp_path_factory, tiny_data)


@pytest.fixture(scope="module")
def int8_bundle(tmp_path_factory, finetuned) -> Path:
    out = tmp_path_factory.mktemp("onnx-int8") / "bundle"
    deploy_target("onnx", {}, finetuned, out)
    return out


@pytest.fixture(scope="module")
def prompts(finetuned, tiny_data) -> list[str]:
    questions = task.read_pairs(tiny_data / "qa/test.jsonl", "qa") + task.read_pairs(
        tiny_data / "qa/train.jsonl", "qa"
    )
    return [task.prompt(pair["question"]) for pair in questions[:16]]


def greedy(model, tokenizer, prompts: list[str]) -> list[list[int]]:
    out = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt")
        generated = model.generate(
            **ids,
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=tokenizer.pad_token_id,
        )
        out.append(generated[0, ids["input_ids"].shape[1] :].tolist())
    return out


@pytest.fixture(scope="module")
def torch_greedy(finetuned, prompts) -> list[list[int]]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(finetuned).eval()
    with torch.inference_mode():
        return greedy(model, AutoTokenizer.from_pretrained(finetuned), prompts)


def load_ort(bundle: Path):
    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers import AutoTokenizer

    (model_file,) = bundle.glob("*.onnx")
    model = ORTModelForCausalLM.from_pretrained(bundle, file_name=model_file.name)
    return model, AutoTokenizer.from_pretrained(bundle)


def test_int8_bundle_has_int8_weights_tokenizer_and_card(int8_bundle):
    import onnx
    from onnx import TensorProto

    names = {p.name for p in int8_bundle.iterdir()}
    assert {"model_quantized.onnx", "config.json", "tokenizer.json", "README.md"} <= names
    graph = onnx.load(str(int8_bundle / "model_quantized.onnx")).graph
    int8 = [t for t in graph.initializer if t.data_type in (TensorProto.INT8, TensorProto.UINT8)]
    assert len([t for t in int8 if len(t.dims) == 2]) >= 7 * 2  # every projection of 2 layers
    card = (int8_bundle / "README.md").read_text()
    assert "ORTModelForCausalLM.from_pretrained" in card and "| finetuned |" in card


def test_fp32_bundle_generates_the_torch_models_greedy_tokens(
    tmp_path, finetuned, prompts, torch_greedy
):
    out = tmp_path / "fp32"
    facts = deploy_target("onnx", {"int8": False}, finetuned, out)
    assert facts["onnx_file"] == "model.onnx" and facts["int8"] is False
    model, tokenizer = load_ort(out)
    assert greedy(model, tokenizer, prompts) == torch_greedy


def test_int8_bundle_stays_within_the_quality_gate(
    int8_bundle, finetuned, tiny_data, prompts, torch_greedy
):
    from unbottle.core.contract.strategies import EvalContext
    from unbottle.core.models.runtimes import OnnxRunner, TorchRunner
    from unbottle.plugins.metrics import Perplexity

    model, tokenizer = load_ort(int8_bundle)
    int8_tokens = greedy(model, tokenizer, prompts)
    pairs = [
        (a, b)
        for ours, theirs in zip(int8_tokens, torch_greedy, strict=True)
        for a, b in zip(ours, theirs, strict=True)
    ]
    agreement = sum(a == b for a, b in pairs) / len(pairs)
    assert agreement >= MIN_TOKEN_AGREEMENT

    metric = Perplexity(Perplexity.Config(window=32))
    valid = (tiny_data / "corpus/valid.txt").read_text()

    def perplexity(runner) -> float:
        ctx = EvalContext(
            tokenizer=runner.tokenizer, valid_text=valid, questions=[], model_dir=finetuned
        )
        return metric.measure(runner, ctx)["perplexity"]

    ratio = perplexity(OnnxRunner(int8_bundle)) / perplexity(TorchRunner(finetuned))
    assert ratio <= MAX_PERPLEXITY_RATIO


def test_an_onnx_variant_ships_as_it_is(tmp_path, int8_bundle):
    # A compressed onnx variant (here: the int8 bundle itself) is copied, not re-exported.
    (tmp_path / "variant").mkdir()
    for path in int8_bundle.iterdir():
        (tmp_path / "variant" / path.name).write_bytes(path.read_bytes())
    (tmp_path / "variant" / "manifest.json").write_text("{}")
    facts = deploy_target("onnx", {}, tmp_path / "variant", tmp_path / "out")
    assert facts["int8"] is True and "onnx_fp32_bytes" not in facts
    shipped = (tmp_path / "out" / "model_quantized.onnx").read_bytes()
    assert shipped == (int8_bundle / "model_quantized.onnx").read_bytes()


def test_speculative_checks_run_the_graph_as_decode_steps_and_skip_coupled_rows(
    tmp_path, finetuned, int8_bundle, caplog
):
    """Several tokens of a lone row in one call give each step's logits and cache; a graph
    whose rows share activation scales (dynamic int8) would give others, so its engine
    does not speculate."""
    from unbottle.core.serving.engine import load_backend, load_bundle

    out = tmp_path / "fp32"
    deploy_target("onnx", {"int8": False}, finetuned, out)
    assert_verify_matches_decode(
        load_backend(out, threads=1), [5, 9, 11, 20, 7], [5, 9, 11, 5], atol=1e-4
    )
    speculative = {"speculative": {"num_speculative_tokens": 2}}
    assert load_bundle(out, speculative).engine().speculative is not None
    assert load_bundle(int8_bundle, speculative).engine().speculative is None
    assert "speculative decoding is off: this graph's rows share activation scales" in caplog.text


def test_the_engine_keeps_int8_greedy_tokens_batch_invariant(int8_bundle, prompts):
    """Dynamic int8 shares one activation scale across a batch, so the engine decodes its
    rows one by one: batched and solo tokens must still be equal."""
    from unbottle.core.serving.engine import SamplingParams, Sequence, load_bundle

    loaded = load_bundle(int8_bundle)
    assert loaded.backend.couples_rows
    engine = loaded.engine()
    engine.start()
    try:
        ids = [loaded.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        params = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)
        solo = [engine.generate(i, params).generated for i in ids]
        done = threading.Semaphore(0)
        seqs = [Sequence(i, params, lambda s, t, f: f and done.release()) for i in ids]
        engine.submit(seqs)
        for _ in seqs:
            assert done.acquire(timeout=60)
    finally:
        engine.stop()
    assert [s.generated for s in seqs] == solo


def test_the_server_serves_an_onnx_bundle_as_optimum_generates(int8_bundle, prompts):
    import httpx

    model, tokenizer = load_ort(int8_bundle)
    expected = tokenizer.decode(greedy(model, tokenizer, prompts[:1])[0][:4])
    with live_server(int8_bundle, {"model_name": "edge", "engine_process": False}) as url:
        body = {"model": "edge", "prompt": prompts[0], "max_tokens": 4, "ignore_eos": True}
        reply = httpx.post(url + "/v1/completions", json=body).json()
    assert reply["choices"][0]["text"] == expected
    assert reply["usage"]["completion_tokens"] == 4


@pytest.mark.parametrize("threads", [1, 3])
def test_the_onnx_runner_decodes_on_as_many_threads_as_torch(int8_bundle, threads):
    """As the genai runner (tests/test_genai_bundle.py): the same cores as torch."""
    from tests.test_genai_bundle import worker_threads_added
    from unbottle.core.models.runtimes import OnnxRunner

    assert worker_threads_added(lambda: OnnxRunner(int8_bundle), threads) == threads - 1


def test_the_model_cards_code_runs_on_named_threads(int8_bundle):
    from tests.test_stages import run_card_code

    assert "intra_op_num_threads" in run_card_code(int8_bundle)
