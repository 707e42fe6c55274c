"""The onnxruntime-genai bundle (plugins/quantization/genai.py): a packed variant written as
the GPTQ checkpoint genai's model builder reads, built into genai's graph with the
variant's own codes, run by genai's generator (evaluation) and written by the ``onnx``
deploy target's ``runtime: genai``, and served by unbottle's engine on the same graph."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.conftest import require_extra
from tests.test_edge_bundle import packed_variant
from unbottle.core.compression.grids import Scheme, unpack
from unbottle.core.contract.errors import ConfigError
from unbottle.core.models.lowbit import load_packed

require_extra("onnxruntime_genai")


@pytest.fixture(scope="module")
def tokenizer():
    from unbottle.core.models.loading import train_tokenizer

    return train_tokenizer(["the quick brown fox jumps over the lazy dog " * 8], 300)


@pytest.fixture(scope="module")
def gptq_packed(tmp_path_factory, tokenizer) -> Path:
    """A GPTQ int4 g32 variant with act order: g_idx and zero points."""
    return packed_variant(
        tokenizer, tmp_path_factory.mktemp("gptq") / "packed", "gptq", Scheme(bits=4, group_size=32)
    )


def graph_arrays(bundle: Path) -> tuple[list, dict]:
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(bundle / "model.onnx")).graph
    return list(graph.node), {t.name: numpy_helper.to_array(t) for t in graph.initializer}


def test_gptq_checkpoint_is_the_layout_genai_reads(tmp_path, gptq_packed):
    from safetensors.torch import load_file

    from unbottle.plugins.quantization.genai import write_gptq_checkpoint

    facts = write_gptq_checkpoint(gptq_packed, tmp_path / "gptq")
    assert facts == {"desc_act": True, "quantized_layers": 14, "quantized_head": False}
    config = json.loads((tmp_path / "gptq/config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "gptq" and config["bits"] == 4
    assert config["group_size"] == 32 and config["desc_act"] is True
    state = load_file(str(tmp_path / "gptq/model.safetensors"))
    layer = load_packed(gptq_packed, kernel="on-the-fly")[0].get_submodule(
        "model.layers.1.mlp.down_proj"
    )
    name = "model.layers.1.mlp.down_proj"
    qweight, qzeros = state[f"{name}.qweight"], state[f"{name}.qzeros"]
    assert qweight.dtype == torch.int32 and qweight.shape == (128 // 8, 64)  # (in / 8, out)
    assert qzeros.shape == (4, 64 // 8) and state[f"{name}.scales"].shape == (4, 64)
    # Unpacked the way the builder does (quantized_model.py): low bits first, along `in`
    # for codes and along `out` for zero points, which are stored minus one.
    shifts = torch.arange(0, 32, 4)
    codes = ((qweight.t()[..., None] >> shifts) & 15).reshape(64, 128)  # (out, in)
    zeros = (((qzeros[..., None] >> shifts) & 15).reshape(4, 64) + 1) & 15  # (G, out)
    assert torch.equal(codes, unpack(layer.qweight, 4, 128).long())
    assert torch.equal(zeros.t(), layer.zero_points().long())
    assert torch.equal(state[f"{name}.g_idx"], layer.g_idx)


def test_genai_bundle_carries_the_codes_and_gives_the_packed_models_logits(
    tmp_path, gptq_packed, tokenizer
):
    from unbottle.core.models.runtimes import GenaiRunner, TorchRunner, load_runner
    from unbottle.plugins.quantization.genai import build_genai_bundle

    exact = build_genai_bundle(gptq_packed, tmp_path / "exact", head="float", accuracy_level=0)
    # q/k/v are one node from the builder; gate and up become one here: 4 nodes a layer.
    assert exact["act_order_layers"] == 10 and exact["fused_layers"] == 2
    assert exact["nbits_layers"] == 8
    nodes, arrays = graph_arrays(tmp_path / "exact")
    (gate_up,) = [n for n in nodes if n.name == "/model/layers.0/mlp/gate_proj+up_proj/MatMulNBits"]
    assert {a.name: a.i for a in gate_up.attribute}["N"] == 2 * 128
    # Act-order layers take the fast kernel: no g_idx input, a Gather sorts the columns.
    assert all(len(n.input) <= 4 for n in nodes if n.op_type == "MatMulNBits")
    # One per distinct input and order: q/k/v (one node), o, gate and up (one order), and
    # none for down_proj, whose input columns gate's and up's permuted rows already sort.
    sorts = [n for n in nodes if n.op_type == "Gather" and n.name.endswith("input_sorted/Gather")]
    assert len(sorts) == 3 * 2 and not any("down_proj" in n.name for n in sorts)
    packed_model = load_packed(gptq_packed, kernel="on-the-fly")[0]
    up, down = (
        packed_model.get_submodule(f"model.layers.0.mlp.{p}") for p in ("up_proj", "down_proj")
    )
    stored = torch.from_numpy(arrays[f"{gate_up.name}.codes"][128:].copy())  # up's rows
    codes = unpack(up.qweight, 4, 64)[:, torch.argsort(up.g_idx.long(), stable=True)]
    codes = codes[torch.argsort(down.g_idx.long(), stable=True)]  # rows in down's order
    assert torch.equal(unpack(stored.reshape(128, -1), 4, 64), codes)  # not re-quantized

    ids = torch.randint(0, len(tokenizer), (2, 24), generator=torch.Generator().manual_seed(5))
    reference = TorchRunner(gptq_packed)
    expected = reference.logits(ids)
    runner = load_runner(tmp_path / "exact")
    assert isinstance(runner, GenaiRunner) and runner.format == "genai"
    assert torch.allclose(runner.logits(ids), expected, atol=1e-5, rtol=1e-5)
    mask = torch.ones_like(ids[:, :8])
    greedy = reference.generate(ids[:, :8], mask, 6, eos_token_id=None)
    assert torch.equal(runner.generate(ids[:, :8], mask, 6, eos_token_id=None), greedy)
    # The same decoder layers, fused or not, and the same codes at their zero point; the
    # float head is left out of the layers by both.
    counts, packed_counts = runner.weight_counts(), reference.weight_counts()
    assert counts.layers == packed_counts.layers == 2 * (2 * 64 * 64 + 2 * 32 * 64 + 3 * 64 * 128)
    assert counts.layers_nonzero == packed_counts.layers_nonzero

    # The shipped default: int8 activations and an int8 head: close, not equal.
    fast = build_genai_bundle(gptq_packed, tmp_path / "fast")
    assert fast["head"] == "int8" and fast["nbits_layers"] == 9
    got = GenaiRunner(tmp_path / "fast").logits(ids)
    assert (got - expected).abs().max() <= 0.02 * expected.abs().max()


def test_a_quantized_head_is_built_from_the_variants_codes(tmp_path, tokenizer):
    from unbottle.core.models.runtimes import GenaiRunner, TorchRunner
    from unbottle.plugins.quantization.genai import build_genai_bundle

    packed = packed_variant(
        tokenizer, tmp_path / "packed", "gptq", Scheme(bits=4, group_size=32), head=True
    )
    facts = build_genai_bundle(packed, tmp_path / "exact", accuracy_level=0)
    assert facts["head"] == "variant" and facts["nbits_layers"] == 9
    nodes, _ = graph_arrays(tmp_path / "exact")
    (head,) = [n for n in nodes if n.op_type == "MatMulNBits" and "lm_head" in n.name]
    assert {a.name: a.i for a in head.attribute}["bits"] == 4
    # The embeddings read their own float table, not a quantized copy of the head.
    assert not any(n.op_type == "GatherBlockQuantized" for n in nodes)
    ids = torch.randint(0, len(tokenizer), (2, 24), generator=torch.Generator().manual_seed(5))
    expected = TorchRunner(packed).logits(ids)
    # Float compute on the variant's codes: the packed model's logits (a head the builder
    # re-quantized would not give them).
    runner = GenaiRunner(tmp_path / "exact")
    assert torch.allclose(runner.logits(ids), expected, atol=1e-5)
    # The quantized head is the output head still: not one of the decoder's layers.
    assert runner.weight_counts().layers == TorchRunner(packed).weight_counts().layers


def test_a_symmetric_variant_is_built_without_zero_points(tmp_path, tokenizer):
    """The builder stores zero points for every grid; a symmetric one's are all the
    midpoint, which MatMulNBits assumes when it has none. Dropped, the bundle has the
    format and bytes of genai's own symmetric int4 builds and the same logits."""
    from unbottle.core.models.runtimes import GenaiRunner, TorchRunner
    from unbottle.plugins.quantization.genai import build_genai_bundle

    scheme = Scheme(bits=4, group_size=32, symmetric=True)
    packed = packed_variant(tokenizer, tmp_path / "packed", "gptq", scheme, head=True)
    facts = build_genai_bundle(packed, tmp_path / "sym", accuracy_level=0)
    nodes, arrays = graph_arrays(tmp_path / "sym")
    nbits = [n for n in nodes if n.op_type == "MatMulNBits"]
    assert len(nbits) == facts["nbits_layers"] == 9
    assert all(len(n.input) == 3 for n in nbits)  # A, codes, scales
    assert not any(name.endswith("qzeros") for name in arrays)
    ids = torch.randint(0, len(tokenizer), (2, 24), generator=torch.Generator().manual_seed(5))
    expected = TorchRunner(packed).logits(ids)
    assert torch.allclose(GenaiRunner(tmp_path / "sym").logits(ids), expected, atol=1e-5)


def test_the_bundle_keeps_the_models_chat_template(tmp_path, gptq_packed):
    """transformers writes a chat template to chat_template.jinja, beside the tokenizer's
    files: a bundle without it is served with unbottle's question/answer template, and a
    chat model answers off its format (seen on SmolLM2's bundle: no JSON where the
    GGUF file of the same variant wrote it)."""
    from transformers import AutoTokenizer

    from unbottle.plugins.quantization.genai import build_genai_bundle

    packed = tmp_path / "packed"
    shutil.copytree(gptq_packed, packed)
    template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>"
    tokenizer = AutoTokenizer.from_pretrained(packed)
    tokenizer.chat_template = template
    tokenizer.save_pretrained(packed)
    assert (packed / "chat_template.jinja").is_file()
    build_genai_bundle(packed, tmp_path / "genai")
    assert AutoTokenizer.from_pretrained(tmp_path / "genai").chat_template == template


def test_genai_generate_on_a_left_padded_batch_keeps_the_prompt_columns(tmp_path, gptq_packed):
    """The runners' convention (transformers'): a (B, T) left-padded batch comes back as
    (B, T + new), the new tokens of every row from column T on. The accuracy metric cuts
    there; genai's rows, generated one by one unpadded, must be put back in place."""
    from unbottle.core.models.runtimes import GenaiRunner, TorchRunner
    from unbottle.plugins.quantization.genai import build_genai_bundle

    build_genai_bundle(gptq_packed, tmp_path / "exact", head="float", accuracy_level=0)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 300, (3, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :4], mask[2, :7] = 0, 0  # left padding: rows of 10, 6 and 3 tokens
    ids = ids.masked_fill(mask == 0, 0)
    expected = TorchRunner(gptq_packed).generate(ids, mask, 5, eos_token_id=None)
    got = GenaiRunner(tmp_path / "exact").generate(ids, mask, 5, eos_token_id=None)
    assert got.shape == expected.shape == (3, 15)
    assert torch.equal(got[:, 10:], expected[:, 10:])


def test_rtn_int8_per_channel_bundle(tmp_path, tokenizer):
    from unbottle.core.models.runtimes import GenaiRunner, TorchRunner
    from unbottle.plugins.quantization.genai import build_genai_bundle

    packed = packed_variant(tokenizer, tmp_path / "packed", "rtn", Scheme(bits=8, symmetric=True))
    facts = build_genai_bundle(packed, tmp_path / "exact", head="float", accuracy_level=0)
    assert facts["bits"] == 8 and facts["act_order_layers"] == 0
    ids = torch.randint(0, len(tokenizer), (1, 16), generator=torch.Generator().manual_seed(2))
    expected = TorchRunner(packed).logits(ids)
    assert torch.allclose(GenaiRunner(tmp_path / "exact").logits(ids), expected, atol=1e-5)


def test_a_grid_genai_cannot_take_is_refused_in_one_line(tmp_path, tokenizer):
    from unbottle.plugins.quantization.genai import build_genai_bundle

    packed = packed_variant(tokenizer, tmp_path / "packed", "rtn", Scheme(bits=4, group_size=8))
    with pytest.raises(ConfigError) as caught:
        build_genai_bundle(packed, tmp_path / "out")
    message = str(caught.value)
    assert "group_size 8 is not a power of two of at least 16" in message
    assert "\n" not in message and not (tmp_path / "out").exists()


def test_deploy_target_runtime_genai(tmp_path, gptq_packed):
    from unbottle.core.contract.strategies import DeployContext
    from unbottle.core.registry import get_registry
    from unbottle.core.serving.engine import load_backend

    def ctx(fmt: str) -> DeployContext:
        return DeployContext("gptq", fmt, {}, "| variant |\n|---|\n| gptq |", {})

    target = get_registry().create("deploy_target", "onnx", {"runtime": "genai"})
    (tmp_path / "bundle").mkdir()
    facts = target.deploy(gptq_packed, tmp_path / "bundle", ctx("packed"))
    assert facts["smoke_generated_tokens"] == 2 and facts["nbits_layers"] == 9
    assert "onnxruntime_genai" in (tmp_path / "bundle/README.md").read_text()
    from tests.test_stages import run_card_code

    assert "intra_op_num_threads" in run_card_code(tmp_path / "bundle")  # the card's code runs
    # The serving engine runs it too (test_the_engine_serves_a_genai_bundle below).
    backend = load_backend(tmp_path / "bundle", threads=1)
    assert backend.format == "genai" and backend.right_padded
    # Only packed variants: a float one has no codes to carry.
    (tmp_path / "other").mkdir()
    with pytest.raises(ConfigError, match=r"^deploy.target.runtime: genai takes a packed"):
        target.deploy(tmp_path / "float", tmp_path / "other", ctx("hf"))


def test_deploy_refuses_a_bundle_whose_tokenizer_genai_reads_differently(tmp_path, tokenizer):
    """The deploy check encodes with onnxruntime-genai's own tokenizer, as the card's code
    does: a tokenizer.json it misreads (here, a byte-level BPE with the SentencePiece
    decoder chain transformers' GGUF reader writes) fails the stage in one line."""
    from tokenizers import decoders
    from transformers import PreTrainedTokenizerFast

    from unbottle.core.contract.errors import DataError
    from unbottle.core.contract.strategies import DeployContext
    from unbottle.core.registry import get_registry

    misread = PreTrainedTokenizerFast(tokenizer_object=copy.deepcopy(tokenizer.backend_tokenizer))
    misread.backend_tokenizer.decoder = decoders.Sequence(
        [
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Replace("\u2581", " "),
            decoders.ByteLevel(),
        ]
    )
    packed = packed_variant(misread, tmp_path / "packed", "rtn", Scheme(bits=4, group_size=32))
    target = get_registry().create("deploy_target", "onnx", {"runtime": "genai"})
    (tmp_path / "bundle").mkdir()
    ctx = DeployContext("rtn", "packed", {}, "| variant |\n|---|\n| rtn |", {})
    with pytest.raises(
        DataError, match=r"onnxruntime-genai.s tokenizer reads the card.s prompt as \[-1"
    ):
        target.deploy(packed, tmp_path / "bundle", ctx)


def test_a_leading_bos_only_one_reader_adds_is_not_a_mismatch(tmp_path, tokenizer):
    """A tokenizer that adds BOS through its post-processor (Llama's way): transformers
    adds it, onnxruntime-genai's tokenizer does not; the prompt's own tokens agree, and
    the bundle deploys."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    from unbottle.core.contract.strategies import DeployContext
    from unbottle.core.registry import get_registry

    with_bos = PreTrainedTokenizerFast(
        tokenizer_object=copy.deepcopy(tokenizer.backend_tokenizer), bos_token="<|endoftext|>"
    )
    bos = with_bos.bos_token_id
    with_bos.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", bos)]
    )
    assert with_bos("the fox")["input_ids"][0] == bos
    packed = packed_variant(with_bos, tmp_path / "packed", "rtn", Scheme(bits=4, group_size=32))
    target = get_registry().create("deploy_target", "onnx", {"runtime": "genai"})
    (tmp_path / "bundle").mkdir()
    ctx = DeployContext("rtn", "packed", {}, "| variant |\n|---|\n| rtn |", {})
    assert target.deploy(packed, tmp_path / "bundle", ctx)["smoke_generated_tokens"] == 2


def test_the_engine_serves_a_genai_bundle_with_continuous_batching(tmp_path, gptq_packed):
    """genai's graph run by ONNX Runtime with the engine's own cache: requests of different
    lengths join one running batch and each gets the packed model's greedy tokens."""
    import threading

    from transformers import AutoTokenizer

    from unbottle.core.models.runtimes import TorchRunner
    from unbottle.core.serving.engine import Engine, SamplingParams, Sequence, load_backend
    from unbottle.plugins.quantization.genai import build_genai_bundle

    bundle = tmp_path / "exact"
    build_genai_bundle(gptq_packed, bundle, head="float", accuracy_level=0)
    backend = load_backend(bundle, threads=1)
    assert backend.format == "genai" and backend.right_padded
    tokenizer = AutoTokenizer.from_pretrained(bundle)
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, len(tokenizer), (n,), generator=g).tolist() for n in (9, 4, 13)]
    reference = TorchRunner(gptq_packed)
    solo = []
    for ids in prompts:
        row = torch.tensor([ids])
        out = reference.generate(row, torch.ones_like(row), 6, eos_token_id=None)
        solo.append(out[0, len(ids) :].tolist())

    engine = Engine(backend, tokenizer, max_batch=4)
    engine.start()
    try:
        sampling = SamplingParams(max_tokens=6, ignore_eos=True)
        done = threading.Semaphore(0)
        seqs = [Sequence(ids, sampling, lambda s, t, f: f and done.release()) for ids in prompts]
        engine.submit(seqs[:1])  # the first runs alone, then the others join mid-flight
        engine.submit(seqs[1:])
        for _ in seqs:
            assert done.acquire(timeout=60)
    finally:
        engine.stop()
    assert [s.generated for s in seqs] == solo

    # Why the batch is padded on the right for this graph: the fused attention counts a
    # row's cache columns from the left and writes its new column at the row's length, so
    # rows of different lengths, each from column 0, decode in one call with the logits
    # each gets alone; the left-padded layout of the other backends would not give them.
    from unbottle.core.serving.engine import _Batch

    alone, batches = [], {True: _Batch(right_padded=True), False: _Batch(right_padded=False)}
    for ids in prompts:
        _, cache = backend.prefill(ids)
        for batch in batches.values():
            batch.add(Sequence(ids, sampling, None), cache, context=1000)
        n = len(ids)
        own = [tuple(torch.nn.functional.pad(t, (0, 0, 0, 32 - n)) for t in kv) for kv in cache]
        one = torch.ones(1, n + 1, dtype=torch.long)
        alone.append(backend.decode(torch.tensor([3]), torch.tensor([n]), one, own, n)[0])
    tokens, positions = torch.tensor([3] * len(prompts)), torch.tensor(list(map(len, prompts)))
    right = batches[True]
    assert right.capacity == _Batch.MIN_CAPACITY and right.width == max(map(len, prompts))
    mask = right.next_mask()
    assert mask.sum(1).tolist() == [n + 1 for n in map(len, prompts)]
    batched = backend.decode(tokens, positions, mask, right.buffers, right.width)
    assert torch.allclose(batched, torch.stack(alone), atol=1e-5)
    engine._batch = right  # row by row (batch_invariant graphs), each over its own columns
    assert torch.allclose(engine._decode_rows(tokens, positions, mask), batched, atol=1e-5)
    left = batches[False]
    wrong = backend.decode(tokens, positions, left.next_mask(), left.buffers, left.width)
    assert not torch.allclose(wrong[1], alone[1], atol=1e-3)  # the 4-token row, padded left


def test_speculative_checks_write_genais_cache_in_place_as_decode_steps(tmp_path, gptq_packed):
    """Several tokens of a lone row in one call of the graph bound to the engine's buffer:
    each position's logits and cache column as one decode step each gives them. (The
    fused attention takes them after the row's length, read off the mask.)"""
    from tests.serving_helpers import assert_verify_matches_decode
    from unbottle.core.serving.engine import load_backend
    from unbottle.plugins.quantization.genai import build_genai_bundle

    bundle = tmp_path / "exact"
    build_genai_bundle(gptq_packed, bundle, head="float", accuracy_level=0)
    backend = load_backend(bundle, threads=1)
    assert_verify_matches_decode(backend, [5, 9, 11, 20, 7], [5, 9, 11, 5, 30], atol=1e-4)


def test_a_bundle_of_genais_own_builder_is_served_from_its_genai_config(tmp_path, gptq_packed):
    """onnxruntime-genai's builder writes ``genai_config.json`` and no ``config.json`` (its
    output for the issue's anchor command): the server takes the context, the end token
    and the sampling defaults from it, and decodes what it decodes with ours."""
    import json

    from unbottle.core.serving.engine import SamplingParams, load_bundle
    from unbottle.plugins.quantization.genai import build_genai_bundle

    bundle = tmp_path / "built"
    build_genai_bundle(gptq_packed, bundle, head="float", accuracy_level=0)
    ids = [5, 9, 14, 3, 7]
    params = SamplingParams(max_tokens=6, ignore_eos=True)

    def served() -> tuple[object, list[int]]:
        loaded = load_bundle(bundle, {"prompt_cache": False})
        engine = loaded.engine()
        engine.start()
        try:
            return loaded, engine.generate(ids, params).generated
        finally:
            engine.stop()

    ours, expected = served()
    for name in ("config.json", "generation_config.json"):
        (bundle / name).unlink(missing_ok=True)
    genai = json.loads((bundle / "genai_config.json").read_text())
    bare, tokens = served()
    assert tokens == expected
    assert bare.context == ours.context == genai["model"]["context_length"]
    assert bare.eos_token_ids == {genai["model"]["eos_token_id"]}
    assert bare.default_temperature == 0.0  # the builder's search: do_sample false
    genai["search"].update(do_sample=True, temperature=0.7, top_p=0.9)
    (bundle / "genai_config.json").write_text(json.dumps(genai))
    sampled = load_bundle(bundle)
    assert (sampled.default_temperature, sampled.default_top_p) == (0.7, 0.9)


def test_gptq_genai_variant_is_evaluated_and_deployed_in_its_runtime(
    tmp_path, tmp_path_factory, tiny_data
):
    from tests.serving_helpers import variant_through_evaluate
    from unbottle.core.stages.runner import run_stage

    gptq = {"quantize": "gptq", "bits": 4, "group_size": 16, "runtime": "genai"}
    validated, layout = variant_through_evaluate(
        tmp_path, tmp_path_factory, tiny_data, "gptq4-genai", gptq
    )

    variant = layout.artifact("compress") / "gptq4-genai"
    manifest = json.loads((variant / "manifest.json").read_text())
    assert manifest["format"] == "genai" and manifest["metrics"]["step1_act_order_layers"] == 10
    rows = json.loads((layout.artifact("evaluate") / "evaluation.json").read_text())["variants"]
    genai, dense = rows["gptq4-genai"], rows["finetuned"]
    assert genai["format"] == "genai"  # measured by onnxruntime-genai, where it ships
    assert genai["perplexity"] / dense["perplexity"] < 1.5  # the demo's gate

    facts = run_stage("deploy", validated, layout).metrics
    assert facts["variant"] == "gptq4-genai" and facts["smoke_generated_tokens"] == 2
    bundle = layout.artifact("deploy")
    assert (bundle / "model.onnx.data").read_bytes() == (variant / "model.onnx.data").read_bytes()

    # The server target ships it as it is; the real server answers the openai client with
    # the tokens onnxruntime-genai's own generator gives.
    import openai
    from transformers import AutoTokenizer

    from tests.serving_helpers import (
        assert_every_position_scored,
        assert_prefill_from_a_past_matches,
        deploy_target,
        live_server,
    )
    from unbottle.core.models.runtimes import GenaiRunner
    from unbottle.core.serving.engine import load_backend

    served = tmp_path / "served"
    facts = deploy_target("server", {"model_name": "genai"}, variant, served)
    assert facts["backend"] == "genai" and facts["serve_smoke_generated_tokens"] == 2
    tokenizer = AutoTokenizer.from_pretrained(variant)
    prompt = "Question: Where does"
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    out = GenaiRunner(variant).generate(ids, torch.ones_like(ids), 5, eos_token_id=None)
    expected = tokenizer.decode(out[0, ids.shape[1] :])
    with live_server(served, {"engine_process": False}) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        reply = client.completions.create(
            model="genai", prompt=prompt, max_tokens=5, extra_body={"ignore_eos": True}
        )
        # Again: all but the last prompt token come from the first request's cache, fed
        # to genai's graph as its past.
        again = client.completions.create(
            model="genai", prompt=prompt, max_tokens=5, extra_body={"ignore_eos": True}
        )
        # A structured output holds in genai's graph too (its logits' width, its vocab).
        chosen = client.completions.create(
            model="genai",
            prompt=prompt,
            max_tokens=12,
            extra_body={"structured_outputs": {"choice": ["Alice lives", "Bob works"]}},
        )
    assert chosen.choices[0].text in ("Alice lives", "Bob works")
    assert chosen.choices[0].finish_reason == "stop"
    assert reply.choices[0].text == expected and reply.usage.completion_tokens == 5
    assert reply.usage.prompt_tokens_details.cached_tokens == 0
    assert again.choices[0].text == expected
    assert again.usage.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens - 1
    long = tokenizer("Question: Where does Alice live?\nAnswer:")["input_ids"]
    backend = load_backend(served)
    assert_prefill_from_a_past_matches(backend, long, 7, atol=1e-4)
    assert_every_position_scored(backend, long, 7, atol=1e-4)


def test_a_layer_genai_cannot_pack_is_refused_by_the_preflight_check(tokenizer):
    """Before any quantizing: a layer whose outputs are not a multiple of 8 cannot be
    packed in the GPTQ checkpoint genai reads (zero points in int32 words along the
    outputs). The output head is not packed there (its codes go into the graph after the
    build), so a vocabulary of any size passes."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from unbottle.core.registry import get_registry

    def llama(vocab_size: int, head_dim: int, kv_heads: int):
        config = LlamaConfig(
            vocab_size=vocab_size, hidden_size=64, intermediate_size=128, head_dim=head_dim,
            num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=kv_heads,
            tie_word_embeddings=True,
        )  # fmt: skip
        with torch.device("meta"):
            return LlamaForCausalLM(config)

    options = {"group_size": 16, "runtime": "genai", "quantize_head": True}
    gptq = get_registry().create("quantization", "gptq", options)
    with pytest.raises(ConfigError) as info:
        gptq.check_model(llama(304, 4, 1), "compress.variants.q[0]")  # k_proj: 1 head x 4
    assert str(info.value) == (
        "compress.variants.q[0].runtime: genai: model.layers.0.self_attn.k_proj: 4x64 is not "
        "a multiple of 8 (GPTQ int32 packing)"
    )
    model = llama(300, 16, 2)
    gptq.check_model(model, "compress.variants.q[0]")
    # The model is only looked at: still tied, as the compress step will find it.
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_runtime_genai_grid_and_missing_library_fail_in_one_line(monkeypatch):
    import importlib.util

    from tests.conftest import TINY_PARAMS
    from unbottle.core.config.schema import Params
    from unbottle.core.config.strategy_checks import check_strategies
    from unbottle.core.registry import get_registry
    from unbottle.plugins.quantization.genai import require_genai

    step = {"quantize": "gptq", "group_size": 48, "runtime": "genai"}
    params = Params.model_validate({**TINY_PARAMS, "compress": {"variants": {"q": [step]}}})
    with pytest.raises(
        ConfigError,
        match=r"^compress\.variants\.q\[0\].*runtime genai: group_size 48 is not a power of two",
    ):
        check_strategies(params, get_registry())
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "onnxruntime_genai" else real_find_spec(name, *a),
    )
    with pytest.raises(ConfigError, match=r"pip install 'onnxruntime-genai==0\.11\.4' onnx-ir"):
        require_genai("compress.variants.q[0].runtime")


def test_the_builder_neither_floods_the_log_nor_reconfigures_logging(tmp_path, gptq_packed):
    """onnxruntime's quantizer, which the builder imports, calls ``logging.basicConfig`` at
    INFO when imported and logs a line per graph node it leaves alone (thousands on a real
    model). A fresh process, as a stage is, builds a bundle: its stderr stays free of those
    lines and its root logger is as it was."""
    import subprocess
    import sys

    script = f"""
import logging
from pathlib import Path
from unbottle.plugins.quantization.genai import build_genai_bundle
root = logging.getLogger()
before = (list(root.handlers), root.level)
build_genai_bundle(Path({str(gptq_packed)!r}), Path({str(tmp_path / "bundle")!r}))
assert (list(root.handlers), root.level) == before, (root.handlers, root.level)
print("built")
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "built"
    assert "[INFO]" not in done.stderr, done.stderr[:2000]


def worker_threads_added(load, torch_threads: int) -> int:
    """Threads the process gained while ``load()`` ran with torch on ``torch_threads``
    (ONNX Runtime starts an intra-op pool of n threads as n - 1 workers beside the
    caller's). A first load, dropped, starts what a process starts once (onnxruntime-genai
    keeps a thread of its own). Torch's thread count is restored after."""
    import os

    before_threads = torch.get_num_threads()
    torch.set_num_threads(torch_threads)
    try:
        first = load()
        del first
        before = len(os.listdir("/proc/self/task"))
        held = load()
        added = len(os.listdir("/proc/self/task")) - before
        del held
    finally:
        torch.set_num_threads(before_threads)
    return added


@pytest.mark.parametrize("threads", [1, 3])
def test_the_genai_runner_decodes_on_as_many_threads_as_torch(
    tmp_path_factory, gptq_packed, threads
):
    """Evaluation puts every runtime on the same cores. Left to its default, onnxruntime-
    genai decoded SmolLM2's genai bundle at one thread's speed on a 2-core VM, 0.73x to
    0.82x of two, while the float model ran on torch's two."""
    from unbottle.core.models.runtimes import GenaiRunner
    from unbottle.plugins.quantization.genai import build_genai_bundle

    bundle = tmp_path_factory.mktemp("threads") / "bundle"
    build_genai_bundle(gptq_packed, bundle)
    config = json.loads((bundle / "genai_config.json").read_text())
    assert "intra_op_num_threads" not in config["model"]["decoder"]["session_options"]
    assert worker_threads_added(lambda: GenaiRunner(bundle), threads) == threads - 1
