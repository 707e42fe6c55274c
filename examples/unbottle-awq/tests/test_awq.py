"""AWQ behaves as the paper says; run with `pytest` after `pip install .`."""

from __future__ import annotations

import copy

import pytest
import torch
from pydantic import ValidationError
from transformers import LlamaConfig, LlamaForCausalLM
from unbottle_awq import Awq, register_quantizers
from unbottle_awq.awq import awq_model, awq_search, fold_scales, scaled_rtn, search_scales

from unbottle.compression import InputStats, Scheme, find_linears, quantize_rtn

SCHEME = Scheme(bits=4, group_size=32)


def outlier_inputs(tokens: int, width: int, outliers: list[int], seed: int) -> torch.Tensor:
    """Activations with a few input channels 30x larger than the rest, as in LLMs."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, width, generator=g)  # (tokens, in)
    x[:, outliers] *= 30
    return x


def stats_of(x: torch.Tensor) -> InputStats:
    return InputStats(
        tokens=x.shape[0],
        sq_norm=x.pow(2).sum(0),
        hessian=x.T @ x,
        abs_sum=x.abs().sum(0),
    )


def test_on_outlier_channels_awq_error_is_well_below_rtn():
    outliers = [3, 40, 77, 101]
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(0))  # (out, in)
    calibration = outlier_inputs(512, 128, outliers, seed=1)
    held_out = outlier_inputs(512, 128, outliers, seed=2)

    s, alpha, error, rtn_error = search_scales([w], stats_of(calibration), SCHEME)

    def out_error(q: torch.Tensor) -> float:
        return float((held_out @ (q - w).T).pow(2).sum())

    awq, rtn = out_error(scaled_rtn(w, s, SCHEME)), out_error(quantize_rtn(w, SCHEME).dequantize())
    assert alpha > 0 and error < rtn_error
    assert awq < 0.5 * rtn  # on unseen tokens too
    # The salient channels are the scaled-up ones.
    assert set(torch.topk(s, len(outliers)).indices.tolist()) == set(outliers)


def test_without_outliers_scales_change_little():
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(0))
    x = torch.randn(512, 128, generator=torch.Generator().manual_seed(1))
    s, _, error, rtn_error = search_scales([w], stats_of(x), SCHEME)
    assert error <= rtn_error  # alpha = 0 is plain RTN, so never worse on calibration data
    assert float(s.max() / s.min()) < 1.5


def tiny_llama(kv_heads: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=32,
    )
    return LlamaForCausalLM(config).eval()


def calibration(n: int = 6, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 64, (1, 16), generator=g) for _ in range(n)]


@pytest.mark.parametrize(("kv_heads", "groups"), [(4, 4), (2, 3)])
def test_folding_the_scales_keeps_the_model_s_function(kv_heads, groups):
    model = tiny_llama(kv_heads)
    ids = torch.cat(calibration(seed=1))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    layers = find_linears(model, r"proj$")
    found, _ = awq_search(model, calibration(), {n for n, _ in layers}, SCHEME)
    # q/k/v, o (only when v_proj's channels are o_proj's, without grouped-query
    # attention), gate/up and down, in each block.
    assert len(found) == 2 * groups
    assert {g.feeder.split(".", 3)[-1] for g in found} >= {
        "input_layernorm",
        "post_attention_layernorm",
        "mlp.up_proj",
    }
    for group in found:
        fold_scales(model, group)
    with torch.no_grad():
        after = model(input_ids=ids).logits
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    assert any(float(g.scales.max() / g.scales.min()) > 1.01 for g in found)


def test_awq_model_beats_rtn_when_a_norm_makes_outlier_channels():
    model = tiny_llama(kv_heads=4)
    # Outlier channels as trained LLMs have them: the norm before q/k/v amplifies a few
    # channels 30x and the projections read them with 30x smaller weights (the function
    # is unchanged; only rounding sees the difference).
    with torch.no_grad():
        for block in model.model.layers:
            block.input_layernorm.weight[[5, 17, 42]] *= 30
            for proj in (block.self_attn.q_proj, block.self_attn.k_proj, block.self_attn.v_proj):
                proj.weight[:, [5, 17, 42]] /= 30
    ids = torch.cat(calibration(seed=1))
    with torch.no_grad():
        reference = model(input_ids=ids).logits

    def logits_error(quantized: dict, owner: LlamaForCausalLM) -> float:
        with torch.no_grad():
            for name, q in quantized.items():
                owner.get_submodule(name).weight.copy_(q.dequantize())
            return float((owner(input_ids=ids).logits - reference).pow(2).mean())

    rtn_model = copy.deepcopy(model)
    rtn = {n: quantize_rtn(m.weight, SCHEME) for n, m in find_linears(rtn_model, r"proj$")}
    layers = find_linears(model, r"proj$")
    quantized, metrics = awq_model(model, calibration(), layers, SCHEME)
    assert metrics["mean_group_output_error"] < metrics["mean_group_output_error_rtn"]
    assert logits_error(quantized, model) < 0.5 * logits_error(rtn, rtn_model)


@pytest.mark.parametrize(
    "options", [{"bits": 3}, {"group_size": 0}, {"grid": 0}, {"layers": "("}, {"alpha": 1}]
)
def test_config_rejects_bad_options(options):
    with pytest.raises(ValidationError):
        Awq.Config(**options)


def test_registers_through_the_hook():
    registered = []
    register_quantizers(registered.append)
    assert registered == [Awq]
    assert Awq.output_format == "packed"
