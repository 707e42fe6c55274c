"""Weight quantization: grids, bit packing, GPTQ, the packed format and its loader, and the
``rtn`` / ``gptq`` strategies run by the compress, evaluate and deploy stages."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import LlamaConfig, LlamaForCausalLM

from tests.conftest import TINY_PARAMS, make_workspace
from unbottle.core.compression.grids import Scheme, fit_grid, pack, quantize_rtn, unpack
from unbottle.core.compression.hessian import damped_hessian_factor
from unbottle.core.contract.errors import ConfigError, DataError
from unbottle.core.contract.strategies import CompressContext
from unbottle.core.models.lowbit import QUANT_CONFIG, load_packed, save_packed
from unbottle.plugins.quantization.gptq import gptq_layer, gptq_model

# ------------------------------------------------------------------------ helpers


@pytest.fixture(scope="module")
def tokenizer():
    from unbottle.core.models.loading import train_tokenizer

    return train_tokenizer(["the quick brown fox jumps over the lazy dog " * 8], 300)


def tiny_llama(vocab: int, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).eval()


def calibration(vocab: int, n: int = 4, length: int = 32) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(0, vocab, (1, length), generator=generator) for _ in range(n)]


@pytest.fixture(scope="module")
def float_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny float model saved as the compress stage hands it to a quantizer."""
    from unbottle.core.models.loading import save_model

    out = tmp_path_factory.mktemp("float")
    save_model(tiny_llama(len(tokenizer)), tokenizer, out)
    return out


def context(tokenizer, samples: int = 4) -> CompressContext:
    return CompressContext(
        tokenizer=tokenizer,
        calibration=calibration(len(tokenizer), samples),
        train_ids=torch.arange(64),
    )


def quantizer(name: str, options: dict):
    from unbottle.core.registry import get_registry

    return get_registry().create("quantization", name, options)


def steps_of(q, shape: tuple[int, int]) -> torch.Tensor:
    """The grid step of every weight: (out, in), each group's scale spread over its columns."""
    n = shape[1]
    scales = q.scales.float()
    if q.g_idx is not None:
        return scales[:, q.g_idx.long()]
    return scales.repeat_interleave(n // scales.shape[1], dim=1)


def correlated_inputs(n: int, tokens: int = 2048, seed: int = 0) -> torch.Tensor:
    """(tokens, n) inputs with correlated features of very different scales, like an LLM's."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=g) / math.sqrt(n)
    x = torch.randn(tokens, n, generator=g) @ mix + 0.1 * torch.randn(tokens, n, generator=g)
    return x * torch.linspace(0.1, 3.0, n)  # (tokens, n)


# ------------------------------------------------------------------------ packing


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (5, 16), (2, 3, 9), (4, 33)])
def test_pack_unpack_round_trip_is_bit_exact(bits, shape):
    g = torch.Generator().manual_seed(sum(shape) + bits)
    codes = torch.randint(0, 2**bits, shape, generator=g, dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (*shape[:-1], math.ceil(shape[-1] * bits / 8))
    assert torch.equal(unpack(packed, bits, shape[-1]), codes)


def test_int4_packs_two_codes_per_byte_low_nibble_first():
    codes = torch.tensor([[1, 2, 15]], dtype=torch.uint8)
    assert pack(codes, 4).tolist() == [[0x21, 0x0F]]


# ------------------------------------------------------------------------ RTN


def heavy_tailed(out: int = 24, n: int = 96, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, n, generator=g) * 0.02
    w[3, 5], w[7, 70] = 0.5, -0.4  # outliers, each in one group of one row
    return w


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [None, 32])
@pytest.mark.parametrize("symmetric", [False, True])
def test_rtn_puts_every_weight_within_half_a_step_of_its_group_grid(bits, group_size, symmetric):
    w = heavy_tailed()
    q = quantize_rtn(w, Scheme(bits=bits, group_size=group_size, symmetric=symmetric))
    groups = 1 if group_size is None else 96 // group_size
    assert q.codes.dtype == torch.uint8 and int(q.codes.max()) <= 2**bits - 1
    assert q.scales.shape == (24, groups) and q.scales.dtype == torch.float16
    assert (q.zeros is None) == symmetric
    step = steps_of(q, w.shape)
    error = (w - q.dequantize()).abs()
    assert bool((error <= step / 2 * (1 + 1e-5)).all())
    if group_size is not None:
        # Per group: the outlier coarsens only its own group's grid.
        assert float(step[3, 5]) > 3 * float(step[3, 40])


def test_clip_search_lowers_each_groups_squared_error():
    # Laplace-distributed rows of 512: heavy tails, where a clipped range pays off.
    g = torch.Generator().manual_seed(0)
    sign = torch.sign(torch.rand(24, 512, generator=g) - 0.5)
    w = 0.02 * sign * -torch.log(torch.rand(24, 512, generator=g))

    def errors(scheme):
        scale, zero = fit_grid(w, scheme)
        codes = torch.clamp(torch.round(w / scale[:, None]) + zero[:, None], 0, 15)
        return ((codes - zero[:, None]) * scale[:, None] - w).pow(2).sum(1)

    before, after = errors(Scheme(bits=4)), errors(Scheme(bits=4, clip_search=True))
    assert bool((after <= before).all())  # the unclipped range is one of the candidates
    assert float(after.sum()) < 0.85 * float(before.sum())


# ------------------------------------------------------------------------ GPTQ


def output_error(w: torch.Tensor, q: torch.Tensor, x: torch.Tensor) -> float:
    return float(torch.linalg.norm(x @ w.T - x @ q.T))  # ||WX - QX||


@pytest.mark.parametrize(
    ("group_size", "act_order", "clip_search"),
    [
        (None, False, False),
        (None, True, False),
        (32, False, False),
        (32, True, False),
        (32, True, True),
    ],
)
def test_gptq_reconstructs_layer_outputs_better_than_rtn(group_size, act_order, clip_search):
    x = correlated_inputs(128)
    w = torch.randn(48, 128, generator=torch.Generator().manual_seed(2))
    rtn = quantize_rtn(w, Scheme(bits=4, group_size=group_size)).dequantize()
    hessian = damped_hessian_factor(x.T @ x, 0.01, act_order=act_order)
    scheme = Scheme(bits=4, group_size=group_size, clip_search=clip_search)
    gptq = gptq_layer(w, hessian, scheme, block_size=64)
    assert torch.equal(gptq.weight, gptq.quantized.dequantize())
    # The paper's claim: compensating each rounding error on the columns still to come
    # lowers the layer's output error, clearly so on correlated inputs.
    assert output_error(w, gptq.weight, x) < 0.9 * output_error(w, rtn, x)


@pytest.mark.parametrize(
    ("group_size", "act_order", "static_groups", "symmetric"),
    [(None, False, False, False), (32, True, False, False), (32, True, True, True)],
)
def test_gptq_keeps_a_pruned_layers_zeros(group_size, act_order, static_groups, symmetric):
    """Pruning then GPTQ (a compress chain): GPTQ spreads each column's rounding error over
    the columns after it, and so moved pruned weights off zero, breaking a 2:4 pattern
    (seen on SmolLM2 after SparseGPT 2:4). A weight that is exactly zero stays
    zero (its code is the zero point), and its share of the error goes on as SparseGPT's
    joint sparsification and quantization do; the result still beats RTN."""
    from unbottle.core.compression.sparsity import nm_prune_mask

    x = correlated_inputs(128)
    dense = torch.randn(48, 128, generator=torch.Generator().manual_seed(2))
    sparse = dense.masked_fill(nm_prune_mask(dense.abs(), 2, 4), 0.0)  # 2:4
    scheme = Scheme(bits=4, group_size=group_size, symmetric=symmetric)
    hessian = damped_hessian_factor(x.T @ x, 0.01, act_order=act_order)
    gptq = gptq_layer(sparse, hessian, scheme, static_groups=static_groups, block_size=64)
    assert bool((gptq.weight[sparse == 0] == 0).all())  # every pruned weight still zero
    assert bool(((gptq.weight.reshape(48, 32, 4) == 0).sum(-1) >= 2).all())  # still 2:4
    rtn = quantize_rtn(sparse, scheme).dequantize()  # keeps zeros too: 0 rounds to zero
    assert bool((rtn[sparse == 0] == 0).all())
    # Half the weights held, fewer are left to absorb each error: still below RTN's.
    assert output_error(sparse, gptq.weight, x) < output_error(sparse, rtn, x)


def column_by_column_gptq(weight, prepared, scheme: Scheme) -> torch.Tensor:
    """The paper's Algorithm 1 without its lazy batches: quantize one column, spread its
    error over every column after it, go on; grids fitted at each group's first column."""
    w = weight.clone()
    w[:, prepared.dead] = 0.0
    if prepared.perm is not None:
        w = w[:, prepared.perm]
    u = prepared.hinv_chol
    n = w.shape[1]
    length = scheme.group_length(n)
    dequantized = torch.zeros_like(w)
    for j in range(n):
        if j % length == 0:
            importance = prepared.diag[j : j + length] if scheme.clip_search else None
            scale, zero = fit_grid(w[:, j : j + length], scheme, importance)
        codes = torch.clamp(torch.round(w[:, j] / scale) + zero, 0, scheme.maxq)
        dequantized[:, j] = (codes - zero) * scale
        err = (w[:, j] - dequantized[:, j]) / u[j, j]
        w[:, j:] -= torch.outer(err, u[j, j:])
    if prepared.perm is not None:
        dequantized = dequantized[:, torch.argsort(prepared.perm)]
    return dequantized


@pytest.mark.parametrize(
    ("group_size", "act_order", "clip_search"),
    [(None, False, False), (32, False, True), (32, True, False), (40, True, True)],
)
def test_blocked_gptq_gives_the_column_by_column_result(group_size, act_order, clip_search):
    """Blocks of 96 columns (80 for groups of 40) in sub-blocks of 16 (10): the deferred
    updates must reach every column before it is quantized or its group's grid fitted."""
    x = correlated_inputs(480)
    w = torch.randn(24, 480, generator=torch.Generator().manual_seed(6))
    prepared = damped_hessian_factor(x.T @ x, 0.01, act_order=act_order)
    scheme = Scheme(bits=4, group_size=group_size, clip_search=clip_search)
    blocked = gptq_layer(w, prepared, scheme, block_size=96)
    expected = column_by_column_gptq(w, prepared, scheme)
    # Sums taken in another order round differently in the last bit, which can flip a
    # weight sitting on a rounding boundary: allow a handful of 11,520. A deferred update
    # that missed a column would change most weights after it.
    assert int((blocked.weight != expected).sum()) <= 10
    assert output_error(w, blocked.weight, x) == pytest.approx(
        output_error(w, expected, x), rel=1e-3
    )


def test_gptq_accounts_exactly_for_the_output_error_it_leaves():
    from unbottle.plugins.quantization.gptq import output_error as relative_output_error

    x = correlated_inputs(96)
    x[:, 7] = 0.0  # an input never active: its column gets weight 0
    w = torch.randn(32, 96, generator=torch.Generator().manual_seed(4))
    h = x.T @ x
    prepared = damped_hessian_factor(h, 0.01, act_order=True)
    result = gptq_layer(w, prepared, Scheme(bits=4, group_size=32))
    # OBQ's bookkeeping: each column's scaled rounding error is the rise of the layer's
    # objective for the damped Hessian H + aI, so they add up to tr(D (H + aI) D^T).
    delta = w - result.weight
    delta[:, 7] = 0.0
    damped = h + prepared.damp_added * torch.eye(96)
    assert result.loss == pytest.approx(float(((delta @ damped) * delta).sum()), rel=1e-4)
    direct = output_error(w, result.weight, x) ** 2 / float(torch.linalg.norm(x @ w.T)) ** 2
    assert relative_output_error(w, result, prepared, h) == pytest.approx(direct, rel=1e-3)


@pytest.mark.parametrize("clip_search", [False, True])
def test_gptq_on_stacked_layers_equals_gptq_on_each(clip_search):
    """gptq_model quantizes q/k/v (and gate/up) as one stacked matrix: GPTQ treats output
    rows independently, so each layer's slice must be what its own pass gives."""
    x = correlated_inputs(128)
    g = torch.Generator().manual_seed(5)
    layers = [torch.randn(rows, 128, generator=g) for rows in (32, 16, 16)]
    prepared = damped_hessian_factor(x.T @ x, 0.01, act_order=True)
    scheme = Scheme(bits=4, group_size=32, clip_search=clip_search)
    stacked = gptq_layer(torch.cat(layers), prepared, scheme, block_size=64)
    start = 0
    for w in layers:
        alone = gptq_layer(w, prepared, scheme, block_size=64)
        part = stacked.rows(start, start + w.shape[0])
        start += w.shape[0]
        # Matrix products of another shape may round differently in the last bit, and
        # a code can flip where a weight sits on a rounding boundary: allow a handful.
        assert (part.quantized.codes != alone.quantized.codes).float().mean() < 1e-3
        assert torch.equal(part.quantized.g_idx, alone.quantized.g_idx)
        torch.testing.assert_close(part.quantized.scales, alone.quantized.scales)
        assert part.loss == pytest.approx(alone.loss, rel=1e-3)


def test_act_order_groups_follow_the_activation_order_and_are_stored_per_column():
    x = correlated_inputs(128)
    w = torch.randn(16, 128, generator=torch.Generator().manual_seed(3))
    h = x.T @ x
    scheme = Scheme(bits=4, group_size=32)
    result = gptq_layer(w, damped_hessian_factor(h, 0.01, act_order=True), scheme)
    g_idx = result.quantized.g_idx
    assert g_idx is not None and g_idx.dtype == torch.int32 and g_idx.shape == (128,)
    # Group k holds the k-th run of 32 columns in order of decreasing H_jj.
    order = torch.argsort(torch.diag(h), descending=True)
    for k in range(4):
        assert set(torch.nonzero(g_idx == k).flatten().tolist()) == set(
            order[32 * k : 32 * (k + 1)].tolist()
        )
    # Every weight lies on the grid of the group g_idx names for its column.
    step = steps_of(result.quantized, w.shape)
    zeros = result.quantized.zero_points().float()[:, g_idx.long()]
    on_grid = result.weight / step + zeros
    assert torch.allclose(on_grid, on_grid.round(), atol=1e-3)
    # Static groups: grids of contiguous columns, fitted up front; no g_idx needed.
    static = gptq_layer(
        w, damped_hessian_factor(h, 0.01, act_order=True), scheme, static_groups=True
    )
    assert static.quantized.g_idx is None
    assert torch.equal(static.weight, static.quantized.dequantize())


# ------------------------------------------------------------------ packed format


def quantized_tensor_bytes(path: Path, modules: list[str]) -> tuple[int, dict[str, str]]:
    """Bytes of the quantized modules' tensors in a safetensors file, and their dtypes."""
    sizes = {"U8": 1, "I8": 1, "F16": 2, "I32": 4, "F32": 4}
    total, dtypes = 0, {}
    with safe_open(str(path), "pt") as f:
        for key in f.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
            if any(key.startswith(m + ".") for m in modules):
                part = f.get_slice(key)
                total += math.prod(part.get_shape()) * sizes[part.get_dtype()]
                dtypes[key] = part.get_dtype()
    return total, dtypes


def test_packed_model_stores_integers_and_loads_to_the_same_logits(tmp_path, tokenizer):
    from unbottle.core.models.runtimes import load_runner, model_format
    from unbottle.plugins.metrics import torch_bytes_per_token

    model = tiny_llama(len(tokenizer))
    dense_bytes = torch_bytes_per_token(model)
    layers = [(n, m) for n, m in model.named_modules() if n.endswith("proj")]
    scheme = Scheme(bits=4, group_size=32)
    quantized, metrics = gptq_model(
        model, calibration(len(tokenizer)), layers, scheme, act_order=True
    )
    assert metrics["mean_layer_output_error"] < 0.05
    reference = copy.deepcopy(model)  # the float model with the dequantized weights in it
    out = tmp_path / "packed"
    facts = save_packed(
        model, tokenizer, quantized, out, method="gptq", group_size=32, symmetric=False, options={}
    )
    assert model_format(out) == "packed"
    assert json.loads((out / QUANT_CONFIG).read_text())["modules"] == sorted(quantized)

    # On disk: integer codes and zero points, float16 scales; no float copy of a weight.
    stored, dtypes = quantized_tensor_bytes(out / "model.safetensors", list(quantized))
    fp32 = sum(m.weight.numel() * 4 for n, m in reference.named_modules() if n in quantized)
    assert stored <= 0.3 * fp32
    assert stored / fp32 == pytest.approx(facts["linear_size_ratio"])
    suffixes = {key.rsplit(".", 1)[1]: dtype for key, dtype in dtypes.items()}
    assert suffixes == {"qweight": "U8", "qzeros": "U8", "scales": "F16", "g_idx": "I32"}
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        # Tied: the output head is stored once, as the embedding.
        assert "lm_head.weight" not in f.keys()  # noqa: SIM118

    loaded, _ = load_packed(out)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert not any(
        isinstance(m, torch.nn.Linear) for n, m in loaded.named_modules() if n in quantized
    )
    ids = torch.randint(0, len(tokenizer), (2, 24), generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        assert torch.equal(loaded(input_ids=ids).logits, reference(input_ids=ids).logits)

    # Through the evaluation's runner: the same weights counted, fewer bytes read per token.
    runner = load_runner(out)
    assert runner.format == "packed"
    assert runner.parameter_counts()[0] == sum(p.numel() for p in reference.parameters())
    # The default kernel reads a cached float copy (as fast as float); without it, the codes.
    assert torch_bytes_per_token(runner.model) == dense_bytes
    assert torch_bytes_per_token(load_packed(out, kernel="on-the-fly")[0]) < 0.6 * dense_bytes


def test_a_step_needing_float_weights_refuses_a_packed_model(tmp_path, float_dir, tokenizer):
    from unbottle.core.models.loading import load_model

    out = tmp_path / "int8"
    quantizer("rtn", {"bits": 8}).quantize(float_dir, out, context(tokenizer))
    with pytest.raises(DataError, match=r"int8: the model is quantized .*needs float weights"):
        load_model(out)


# ------------------------------------------------------------------ bad input


def test_group_size_that_does_not_divide_a_layer_fails_before_writing(
    tmp_path, float_dir, tokenizer
):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(
        ConfigError,
        match=r"^gptq\.group_size: 48 does not divide the input size 64 of "
        r"model\.layers\.0\.self_attn\.q_proj; use a divisor of every selected layer's input "
        r"size \(64, 128\) or null for per channel$",
    ):
        quantizer("gptq", {"group_size": 48}).quantize(float_dir, out, context(tokenizer))
    assert list(out.iterdir()) == []


def test_layers_that_match_nothing_are_an_error(tmp_path, float_dir, tokenizer):
    with pytest.raises(ConfigError, match=r"^rtn\.layers: 'attention' matches no Linear layer"):
        quantizer("rtn", {"layers": "attention"}).quantize(float_dir, tmp_path, context(tokenizer))


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_quantize_head_packs_the_head_and_leaves_the_embeddings_float(
    tmp_path, float_dir, tokenizer, method
):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "variant"
    options = {"bits": 4, "group_size": 32, "quantize_head": True}
    facts = quantizer(method, options).quantize(float_dir, out, context(tokenizer))
    assert facts["quantized_layers"] == 15
    assert "lm_head" in json.loads((out / QUANT_CONFIG).read_text())["modules"]
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "lm_head.qweight" in keys and "lm_head.weight" not in keys

    dense = AutoModelForCausalLM.from_pretrained(float_dir, dtype=torch.float32).eval()
    assert dense.lm_head.weight is dense.model.embed_tokens.weight  # the source is tied
    loaded, _ = load_packed(out)
    assert loaded.config.tie_word_embeddings is False
    assert type(loaded.lm_head).__name__ == "QuantizedLinear"
    # The embedding table is the source's, untouched by the head's rounding.
    assert torch.equal(loaded.model.embed_tokens.weight, dense.model.embed_tokens.weight)

    float_head = dense.lm_head.weight.detach()
    rtn_head = quantize_rtn(float_head, Scheme(bits=4, group_size=32)).dequantize()
    head = loaded.lm_head.dequantized_weight()
    if method == "rtn":
        assert torch.equal(head, rtn_head)
        return
    # GPTQ's head keeps its outputs on the calibration data closer than rounding does: its
    # inputs are the final norm of the quantized stack's outputs.
    inputs = []
    hook = loaded.lm_head.register_forward_pre_hook(lambda _m, a: inputs.append(a[0]))
    with torch.no_grad():
        for ids in context(tokenizer).calibration:
            loaded(input_ids=ids)
    hook.remove()
    x = torch.cat([t.reshape(-1, t.shape[-1]) for t in inputs])
    gptq_error = (x @ (head - float_head).T).pow(2).sum()
    rtn_error = (x @ (rtn_head - float_head).T).pow(2).sum()
    assert gptq_error < 0.8 * rtn_error


def test_gptq_without_calibration_samples_fails_before_loading(tmp_path, tokenizer):
    ctx = CompressContext(tokenizer=tokenizer, calibration=[], train_ids=torch.arange(4))
    with pytest.raises(
        ConfigError, match=r"^compress\.calibration\.samples: 0 calibration samples; gptq needs"
    ):
        quantizer("gptq", {}).quantize(tmp_path / "no-model-here", tmp_path / "out", ctx)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"bits": 3}, r"^compress\.variants\.q\[0\]\.bits: 3 is invalid: Input should be 4 or 8$"),
        ({"group_size": 0}, r"^compress\.variants\.q\[0\]\.group_size: 0 is invalid"),
        ({"layers": "("}, r"^compress\.variants\.q\[0\]\.layers: '\(' is not a regular"),
        ({"damp": 0}, r"^compress\.variants\.q\[0\]\.damp: 0 is invalid"),
    ],
)
def test_invalid_options_fail_with_one_line_naming_the_key(options, message):
    from unbottle.core.config.schema import Params
    from unbottle.core.config.strategy_checks import check_strategies
    from unbottle.core.registry import get_registry

    params = Params.model_validate(
        {**TINY_PARAMS, "compress": {"variants": {"q": [{"quantize": "gptq", **options}]}}}
    )
    with pytest.raises(ConfigError, match=message):
        check_strategies(params, get_registry())


# ------------------------------------------------------------------ the stages


def test_compress_evaluate_and_deploy_a_gptq_int4_variant(tmp_path, tmp_path_factory, tiny_data):
    import shutil

    from tests.serving_helpers import finetuned_model
    from unbottle.core.config.schema import Params
    from unbottle.core.stages.layout import Layout
    from unbottle.core.stages.runner import run_stage

    params = copy.deepcopy(TINY_PARAMS)
    params["compress"]["variants"] = {
        "gptq4": [{"quantize": "gptq", "bits": 4, "group_size": 16, "act_order": True}],
        "rtn8": [{"quantize": "rtn", "bits": 8, "symmetric": True}],
    }
    params["evaluate"]["metrics"] = [{"name": "perplexity", "window": 32}, "size"]
    params["deploy"] = {"target": "server", "variant": "gptq4"}
    root = make_workspace(tmp_path, tiny_data, params)
    layout = Layout(root)
    validated = Params.model_validate(params)
    # The session's tiny pretrained and finetuned models (same data and settings).
    trained = finetuned_model(tmp_path_factory, tiny_data).parent
    for stage in ("pretrain", "finetune"):
        shutil.copytree(trained / stage, layout.artifact(stage))
    for stage in ("compress", "evaluate"):
        run_stage(stage, validated, layout)

    variant = layout.artifact("compress") / "gptq4"
    manifest = json.loads((variant / "manifest.json").read_text())
    assert manifest["format"] == "packed"
    assert manifest["metrics"]["step1_bits"] == 4 and manifest["metrics"]["step1_group_size"] == 16
    assert manifest["metrics"]["step1_linear_size_ratio"] < 0.3

    rows = json.loads((layout.artifact("evaluate") / "evaluation.json").read_text())["variants"]
    dense, int4, int8 = rows["finetuned"], rows["gptq4"], rows["rtn8"]
    assert int4["format"] == int8["format"] == "packed"
    assert int4["size_bytes"] == (variant / "model.safetensors").stat().st_size
    assert int4["size_bytes"] < int8["size_bytes"] < dense["size_bytes"]
    assert int4["parameters"] == int8["parameters"] == dense["parameters"]
    assert int8["perplexity_ratio"] == pytest.approx(1.0, abs=0.01)
    assert math.isfinite(int4["perplexity"])

    # The server target ships the packed model and serves it (its deploy generates).
    facts = run_stage("deploy", validated, layout).metrics
    assert facts["variant"] == "gptq4" and facts["backend"] == "packed"
    # The hf target ships it as a standard compressed-tensors checkpoint, which plain
    # transformers loads to the packed model's logits (tests/test_formats.py).
    hf = Params.model_validate({**params, "deploy": {"target": "hf", "variant": "gptq4"}})
    facts = run_stage("deploy", hf, layout).metrics
    assert facts["variant"] == "gptq4" and facts["max_logit_difference"] <= 1e-4
