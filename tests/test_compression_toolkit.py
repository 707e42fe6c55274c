"""unbottle.compression: the architecture table drives the calibration pass, the pass hands
out the statistics a method asks for, and the docs' one-module pruner works as written."""

from __future__ import annotations

import copy
import re
import threading

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tests.conftest import REPO
from unbottle.compression import (
    ARCHITECTURES,
    Architecture,
    ConfigError,
    LayerGroup,
    calibrate_sequentially,
    calibrated_linears,
    find_decoder_blocks,
    find_linears,
    output_head,
)
from unbottle.core.contract.strategies import CompressContext


def tiny_llama(kv_heads: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=32,
    )
    return LlamaForCausalLM(config).eval()


def calibration(n: int = 5) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 64, (1, 12), generator=g) for _ in range(n)]


def dense_inputs(model, ids) -> dict[str, torch.Tensor]:
    """What enters each Linear in a plain forward pass, (tokens, in) per layer."""
    seen: dict[str, list[torch.Tensor]] = {}
    hooks = [
        m.register_forward_pre_hook(lambda _m, a, n=n: seen.setdefault(n, []).append(a[0]))
        for n, m in find_linears(model, ".")
    ]
    with torch.no_grad():
        for x in ids:
            model(input_ids=x)
    for h in hooks:
        h.remove()
    return {n: torch.cat([t.reshape(-1, t.shape[-1]) for t in v]) for n, v in seen.items()}


@pytest.mark.parametrize(("kv_heads", "o_feeder"), [(4, True), (2, False)])
def test_the_pass_reports_mean_abs_and_each_group_s_feeder(kv_heads, o_feeder):
    model = tiny_llama(kv_heads)
    ids = calibration()
    expected = dense_inputs(model, ids)
    got: dict[str, tuple] = {}

    def record(group, stats):
        for name, _ in group:
            got[name] = (stats.mean_abs.clone(), stats.feeder and stats.feeder[0])

    calibrate_sequentially(
        model, ids, process_together=record, select=lambda n: True, hessian=False, mean_abs=True
    )
    assert list(got) == calibrated_linears(model)
    for name, x in expected.items():
        torch.testing.assert_close(got[name][0], x.abs().mean(0), rtol=1e-4, atol=1e-5)
    block = "model.layers.1."
    assert got[block + "self_attn.k_proj"][1] == block + "input_layernorm"
    assert got[block + "mlp.up_proj"][1] == block + "post_attention_layernorm"
    assert got[block + "mlp.down_proj"][1] == block + "mlp.up_proj"
    # v_proj feeds o_proj channel for channel only without grouped-query attention.
    assert got[block + "self_attn.o_proj"][1] == (block + "self_attn.v_proj" if o_feeder else None)


def test_the_head_comes_last_fed_the_final_norm_of_the_compressed_stack():
    """With ``head=True`` the output head is compressed after every block, from the final
    norm of what the already-compressed blocks output, like any layer from its input."""
    model = tiny_llama()
    ids = calibration()
    seen: list[str] = []
    head_stats = []

    def halve(group, stats):  # a "compression" that changes every block's output
        for name, linear in group:
            seen.append(name)
            if name == "lm_head":
                head_stats.append(stats)
            else:
                linear.weight.mul_(0.5)

    untied = output_head(model, untie=True)[1]
    assert untied.weight is not model.get_input_embeddings().weight
    assert model.config.tie_word_embeddings is False
    calibrate_sequentially(
        model, ids, process_together=halve, select=lambda n: True, hessian=True, head=True
    )
    assert seen == [*calibrated_linears(model), "lm_head"]
    # What a plain forward of the halved model feeds its head: the final norm's output.
    grabbed = []
    hook = model.lm_head.register_forward_pre_hook(lambda _m, a: grabbed.append(a[0]))
    with torch.no_grad():
        for x in ids:
            model(input_ids=x)
    hook.remove()
    expected = torch.cat([t.reshape(-1, t.shape[-1]) for t in grabbed])
    (stats,) = head_stats
    assert stats.tokens == expected.shape[0] and stats.feeder[0] == "model.norm"
    torch.testing.assert_close(stats.hessian, expected.T @ expected, rtol=1e-4, atol=1e-4)
    # Without head=True (the default), the pass never reaches the head.
    seen.clear()
    calibrate_sequentially(model, ids, process_together=halve, select=lambda n: True, hessian=False)
    assert "lm_head" not in seen


def test_a_new_architecture_is_one_table_entry():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    model = Qwen3ForCausalLM(
        Qwen3Config(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            max_position_embeddings=32,
        )
    ).eval()
    ids = calibration(3)
    expected = dense_inputs(model, ids)
    got = {}
    calibrate_sequentially(
        model,
        ids,
        lambda name, linear, stats: got.setdefault(name, stats.sq_norm.clone()),
        select=lambda n: True,
        hessian=False,
    )
    assert ARCHITECTURES["qwen3"] is ARCHITECTURES["llama"]
    assert sorted(got) == sorted(expected)
    for name, x in expected.items():
        torch.testing.assert_close(got[name], x.pow(2).sum(0), rtol=1e-4, atol=1e-4)


def test_an_unknown_architecture_is_one_line():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2))
    with pytest.raises(ConfigError, match=r"^layer-wise calibration supports the architectures"):
        calibrate_sequentially(
            model, calibration(1), lambda *a: None, select=lambda n: True, hessian=False
        )
    # Finding the decoder blocks needs no entry.
    path, blocks = find_decoder_blocks(model)
    assert path == "transformer.h" and blocks is model.transformer.h


def test_a_table_entry_out_of_data_flow_order_is_an_error_and_leaves_no_threads(monkeypatch):
    llama = ARCHITECTURES["llama"]
    swapped = Architecture(llama.blocks, (llama.groups[2], *llama.groups[:2], llama.groups[3]))
    monkeypatch.setitem(ARCHITECTURES, "llama", swapped)
    threads = threading.active_count()
    with pytest.raises(RuntimeError, match="must follow the data flow"):
        calibrate_sequentially(
            tiny_llama(), calibration(), lambda *a: None, select=lambda n: True, hessian=False
        )
    assert threading.active_count() == threads
    # Linears that read different inputs cannot be one group.
    mixed = Architecture(llama.blocks, (LayerGroup(("self_attn.q_proj", "mlp.gate_proj"), None),))
    monkeypatch.setitem(ARCHITECTURES, "llama", mixed)
    with pytest.raises(RuntimeError, match="do not share one input"):
        calibrate_sequentially(
            tiny_llama(), calibration(), lambda *a: None, select=lambda n: True, hessian=False
        )
    assert threading.active_count() == threads


def test_an_error_in_a_method_stops_the_pass_cleanly():
    threads = threading.active_count()

    def fail(name, linear, stats):
        raise ValueError(f"cannot compress {name}")

    with pytest.raises(ValueError, match=r"^cannot compress model\.layers\.0\.self_attn\.q_proj"):
        calibrate_sequentially(
            tiny_llama(), calibration(), fail, select=lambda n: True, hessian=False
        )
    assert threading.active_count() == threads


def test_the_docs_one_module_pruner_is_the_built_in_wanda():
    from unbottle.core.registry import get_registry

    text = (REPO / "docs" / "plugins.md").read_text(encoding="utf-8")
    code = re.search(r"<!-- pruner-example -->\n```python\n(.*?)```", text, re.S)[1]
    namespace: dict = {}
    exec(compile(code, "docs/plugins.md", "exec"), namespace)
    registered = []
    namespace["register_pruners"](registered.append)
    [SimpleWanda] = registered

    ctx = CompressContext(tokenizer=None, calibration=calibration(), train_ids=torch.zeros(1))
    ours, builtin = tiny_llama(), tiny_llama()
    metrics = SimpleWanda(SimpleWanda.Config(sparsity=0.5)).prune(ours, ctx)
    wanda = get_registry().create("pruning", "wanda", {"sparsity": 0.5, "allocation": "uniform"})
    wanda.prune(builtin, copy.copy(ctx))
    assert metrics["sparsity"] == pytest.approx(0.5)
    pairs = zip(find_linears(ours, "proj"), find_linears(builtin, "proj"), strict=True)
    for (name, a), (_, b) in pairs:
        assert torch.equal(a.weight, b.weight), name
