"""The int4/int8 edge bundle (plugins/quantization/matmulnbits.py): ONNX Runtime
MatMulNBits layers that carry a packed variant's own codes, so its logits are the packed
torch model's, through compress (``runtime: onnx``), evaluate, deploy and the server."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tests.conftest import TINY_PARAMS
from unbottle.compression import output_head
from unbottle.core.compression.grids import Scheme, quantize_rtn, unpack
from unbottle.core.contract.errors import ConfigError
from unbottle.core.models.lowbit import load_packed, save_packed
from unbottle.plugins.quantization.gptq import gptq_model
from unbottle.plugins.quantization.matmulnbits import export_matmulnbits


@pytest.fixture(scope="module")
def tokenizer():
    from unbottle.core.models.loading import train_tokenizer

    return train_tokenizer(["the quick brown fox jumps over the lazy dog " * 8], 300)


def packed_variant(
    tokenizer, out: Path, method: str, scheme: Scheme, width: int = 64, *, head: bool = False
) -> Path:
    """A tiny Llama quantized by ``method``; with ``head``, the output head too (untied,
    as ``quantize_head`` does)."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config).eval()
    layers = [(n, m) for n, m in model.named_modules() if n.endswith("proj")]
    if head:
        layers.append(output_head(model, untie=True))
    if method == "gptq":
        g = torch.Generator().manual_seed(1)
        calibration = [torch.randint(0, len(tokenizer), (1, 32), generator=g) for _ in range(4)]
        quantized, _ = gptq_model(model, calibration, layers, scheme, act_order=True)
    else:
        quantized = {n: quantize_rtn(m.weight.detach(), scheme) for n, m in layers}
    save_packed(
        model,
        tokenizer,
        quantized,
        out,
        method=method,
        group_size=scheme.group_size,
        symmetric=scheme.symmetric,
        options={},
    )
    return out


def edge_bundle(packed: Path, out: Path, tokenizer, accuracy_level: int) -> dict:
    facts = export_matmulnbits(packed, out, accuracy_level=accuracy_level)
    tokenizer.save_pretrained(out)
    return facts


@pytest.mark.parametrize(
    ("method", "scheme", "head"),
    [
        ("gptq", Scheme(bits=4, group_size=32), False),  # act order: g_idx, zero points
        ("rtn", Scheme(bits=8, symmetric=True), False),  # per channel: one block per row
        ("gptq", Scheme(bits=4, group_size=32), True),  # quantize_head: lm_head too
    ],
    ids=["gptq-int4-g32", "rtn-int8-channel", "gptq-int4-g32-head"],
)
def test_edge_bundle_carries_the_variants_codes_and_gives_its_logits(
    tmp_path, tokenizer, method, scheme, head
):
    import onnx
    from onnx import numpy_helper

    from unbottle.core.models.runtimes import OnnxRunner, TorchRunner

    packed = packed_variant(tokenizer, tmp_path / "packed", method, scheme, head=head)
    layers = 14 + head
    facts = edge_bundle(packed, tmp_path / "fast", tokenizer, accuracy_level=4)
    assert facts["nbits_layers"] == layers and facts["bits"] == scheme.bits
    # The same graph with float32 compute (accuracy_level 0) instead of int8 activations.
    shutil.copytree(tmp_path / "fast", tmp_path / "exact")
    exact_graph = onnx.load(str(tmp_path / "fast/model.onnx"))
    for node in exact_graph.graph.node:
        for attribute in node.attribute:
            if node.op_type == "MatMulNBits" and attribute.name == "accuracy_level":
                attribute.i = 0
    onnx.save(exact_graph, str(tmp_path / "exact/model.onnx"))

    # The graph's weights are the variant's codes, not a re-quantization. Layers reading
    # the same input share a node (q, k and v; gate and up): 4 nodes a layer.
    torch_model, _ = load_packed(packed, kernel="on-the-fly")
    graph = onnx.load(str(tmp_path / "exact/model.onnx")).graph
    ops = [node.op_type for node in graph.node]
    assert facts["fused_layers"] == 2 * 3 and ops.count("MatMulNBits") == 2 * 4 + head
    stored = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    qkv = "/model/layers.0/self_attn/q_proj+k_proj+v_proj/MatMulNBits"
    where = {  # a layer's tensors: their name's stem and its first row there
        "model.layers.0.self_attn.q_proj": (qkv, ".codes", ".scales", 0),
        "model.layers.0.self_attn.v_proj": (qkv, ".codes", ".scales", 64 + 32),
        "model.layers.1.mlp.down_proj": ("model.layers.1.mlp.down_proj", ".qweight", ".scales", 0),
        "lm_head": ("lm_head", ".qweight", ".scales", 0),
    }
    for name in list(where)[: 3 + head]:
        stem, codes_name, scales_name, first = where[name]
        layer = torch_model.get_submodule(name)
        codes = unpack(layer.qweight, scheme.bits, layer.in_features)  # (N, K)
        if layer.g_idx is not None:
            codes = codes[:, torch.argsort(layer.g_idx.long(), stable=True)]
            # One Gather per distinct input and order: q/k/v, o, gate/up, down per layer.
            assert ops.count("Gather") >= 2 * 4
        n, blocks = codes.shape[0], layer.scales.numel() // codes.shape[0]
        bundle_codes = torch.from_numpy(stored[stem + codes_name].copy()).reshape(
            -1, stored[stem + codes_name][0].size
        )[first : first + n]
        assert torch.equal(unpack(bundle_codes, scheme.bits, layer.in_features), codes)
        scales = stored[stem + scales_name].reshape(-1)[first * blocks : (first + n) * blocks]
        assert torch.equal(torch.from_numpy(scales.copy()), layer.scales.float().reshape(-1))

    ids = torch.randint(0, len(tokenizer), (2, 24), generator=torch.Generator().manual_seed(5))
    reference = TorchRunner(packed)
    expected = reference.logits(ids)
    exact = OnnxRunner(tmp_path / "exact")
    assert torch.allclose(exact.logits(ids), expected, atol=1e-5, rtol=1e-5)
    # Every weight matrix counted as torch counts it (ONNX's count leaves out 1-D norms).
    norms = sum(p.numel() for p in torch_model.parameters() if p.ndim == 1)
    counts = reference.weight_counts()
    assert exact.weight_counts() == counts._replace(
        total=counts.total - norms, nonzero=counts.nonzero - norms
    )
    # ONNX Runtime's fast path quantizes activations to int8 per block: close, not equal.
    fast = OnnxRunner(tmp_path / "fast").logits(ids)
    assert (fast - expected).abs().max() <= 0.02 * expected.abs().max()


def test_grids_matmulnbits_cannot_hold_fail_in_one_line_before_work(tmp_path, tokenizer):
    from unbottle.core.config.schema import Params
    from unbottle.core.config.strategy_checks import check_strategies
    from unbottle.core.registry import get_registry

    step = {"quantize": "gptq", "group_size": 48, "runtime": "onnx"}
    params = Params.model_validate({**TINY_PARAMS, "compress": {"variants": {"q": [step]}}})
    with pytest.raises(
        ConfigError,
        match=r"^compress\.variants\.q\[0\].*runtime onnx: group_size 48 is not a power of two "
        r"of at least 16 \(MatMulNBits block sizes\)",
    ):
        check_strategies(params, get_registry())
    # Per-channel grids are one block per row: a row of 48 cannot be one.
    packed = packed_variant(
        tokenizer, tmp_path / "packed", "rtn", Scheme(bits=4, symmetric=True), width=48
    )
    with pytest.raises(
        ConfigError,
        match=r": model\.layers\.0\.mlp\.gate_proj: a per-channel row of 48 is not a power",
    ):
        export_matmulnbits(packed, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_gptq_edge_variant_is_evaluated_deployed_and_served_in_onnx_runtime(
    tmp_path, tmp_path_factory, tiny_data
):
    from tests.serving_helpers import (
        assert_every_position_scored,
        assert_prefill_from_a_past_matches,
        variant_through_evaluate,
    )
    from unbottle.core.serving.engine import SamplingParams, Sequence, load_bundle
    from unbottle.core.stages.runner import run_stage

    gptq = {"quantize": "gptq", "bits": 4, "group_size": 16, "act_order": True}
    validated, layout = variant_through_evaluate(
        tmp_path, tmp_path_factory, tiny_data, "gptq4-edge", {**gptq, "runtime": "onnx"}
    )

    variant = layout.artifact("compress") / "gptq4-edge"
    manifest = json.loads((variant / "manifest.json").read_text())
    metrics = manifest["metrics"]
    assert manifest["format"] == "onnx" and metrics["step1_nbits_layers"] == 14
    assert metrics["step1_fused_layers"] == 6  # q/k/v and gate/up share nodes
    rows = json.loads((layout.artifact("evaluate") / "evaluation.json").read_text())["variants"]
    edge, dense = rows["gptq4-edge"], rows["finetuned"]
    assert edge["format"] == "onnx"  # measured in ONNX Runtime, the runtime it ships in
    assert edge["perplexity"] / dense["perplexity"] < 1.5  # the demo's gate
    model = TINY_PARAMS["pretrain"]["model"]  # ONNX's count leaves out the 1-D norms
    norms = (2 * model["layers"] + 1) * model["hidden_size"]
    assert edge["parameters"] == dense["parameters"] - norms

    facts = run_stage("deploy", validated, layout).metrics
    assert facts["variant"] == "gptq4-edge" and facts["int8"] is False
    bundle = layout.artifact("deploy")
    assert (bundle / "model.onnx").read_bytes() == (variant / "model.onnx").read_bytes()

    # The server batches MatMulNBits bundles continuously: batched tokens equal solo ones.
    loaded = load_bundle(bundle)
    assert loaded.format == "onnx" and not loaded.backend.couples_rows
    engine = loaded.engine()
    engine.start()
    try:
        prompts = ["Question: Where does", "Question: Who", "Answer:"]
        ids = [loaded.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        sampling = SamplingParams(max_tokens=6, ignore_eos=True)
        alone = [engine.generate(i, sampling) for i in ids]
        solo = [seq.generated for seq in alone]
        done = threading.Semaphore(0)
        seqs = [Sequence(i, sampling, lambda s, t, f: f and done.release()) for i in ids]
        engine.submit(seqs)
        for _ in seqs:
            assert done.acquire(timeout=60)
        assert [s.generated for s in seqs] == solo
    finally:
        engine.stop()
    # The second prompt reused the first's cached start ("Question:"), and the batch's
    # rows all but their last token; every prompt computed from scratch, 3 tokens an
    # engine iteration, gives the same.
    shared = next(i for i, (a, b) in enumerate(zip(*ids[:2], strict=False)) if a != b)
    assert shared > 3 and [s.cached_tokens for s in alone][:2] == [0, shared]
    assert [s.cached_tokens for s in seqs] == [len(i) - 1 for i in ids]
    assert_prefill_from_a_past_matches(loaded.backend, ids[0], shared - 2, atol=1e-4)
    assert_every_position_scored(loaded.backend, ids[0], shared - 2, atol=1e-4)
    fresh = load_bundle(bundle, {"prompt_cache": False, "prefill_chunk": 3}).engine()
    fresh.start()
    try:
        assert [fresh.generate(i, sampling).generated for i in ids] == solo
    finally:
        fresh.stop()


def test_layers_reading_one_input_share_a_node_and_give_the_same_outputs_to_the_bit():
    """fuse_matmuls_sharing_input: rows stacked, one kernel, a Split; nodes that differ
    in anything but N (here a block size) or read another input keep their own."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from unbottle.plugins.quantization.matmulnbits import fuse_matmuls_sharing_input

    rng, k = np.random.default_rng(0), 64
    initializers, nodes, outputs = [], [], []

    def layer(name: str, source: str, n: int, block: int) -> None:
        blocks = k // block
        tensors = {
            f"{name}.qweight": rng.integers(0, 256, (n, blocks, block // 2), dtype=np.uint8),
            f"{name}.scales": rng.uniform(0.01, 0.1, n * blocks).astype(np.float32),
            f"{name}.qzeros": rng.integers(0, 256, n * -(-blocks // 2), dtype=np.uint8),
        }
        initializers.extend(numpy_helper.from_array(v, key) for key, v in tensors.items())
        nodes.append(
            helper.make_node(
                "MatMulNBits",
                [source, *tensors],
                [f"{name}.out"],
                name=f"/block/{name}/MatMulNBits",
                domain="com.microsoft",
                K=k,
                N=n,
                bits=4,
                block_size=block,
                accuracy_level=4,
            )
        )
        outputs.append(helper.make_tensor_value_info(f"{name}.out", TensorProto.FLOAT, None))

    nodes.append(helper.make_node("Relu", ["x"], ["y"], name="/block/relu"))
    layer("gate", "x", 48, 32)
    layer("up", "x", 48, 32)
    layer("wide_blocks", "x", 16, 64)  # another block size: not stackable with the others
    layer("other_input", "y", 16, 32)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, k])
    model = helper.make_model(
        helper.make_graph(nodes, "g", [x], outputs, initializers),
        opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)],
    )

    def run(graph) -> list:
        session = ort.InferenceSession(
            graph.SerializeToString(), providers=["CPUExecutionProvider"]
        )
        return session.run(None, {"x": rng_x})

    rng_x = rng.standard_normal((3, k)).astype(np.float32)
    before = run(model)
    assert fuse_matmuls_sharing_input(model) == 1
    fused = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert [n.name for n in fused] == [
        "/block/gate+up/MatMulNBits",
        "/block/wide_blocks/MatMulNBits",
        "/block/other_input/MatMulNBits",
    ]
    assert {a.name: a.i for a in fused[0].attribute}["N"] == 96
    names = {init.name for init in model.graph.initializer}
    assert not names & {"gate.qweight", "up.qweight", "gate.scales", "up.qzeros"}
    after = run(model)
    for got, expected in zip(after, before, strict=True):
        assert np.array_equal(got, expected)
