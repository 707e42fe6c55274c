"""Pruning on tiny Llama models: exact sparsity and N:M patterns, what Wanda and SparseGPT
choose and why it is better, structured pruning that really shrinks the model, a recipe of
several steps through the compress stage, and one-line errors for bad input."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from tests.conftest import TINY_PARAMS, make_workspace
from unbottle.core.compression.hessian import damped_hessian_factor
from unbottle.core.compression.sparsity import (
    exact_counts,
    nm_prune_mask,
    row_prune_mask,
    wanda_scores,
)
from unbottle.core.config.loading import load_params
from unbottle.core.config.schema import Params
from unbottle.core.config.strategy_checks import check_strategies
from unbottle.core.contract.errors import ConfigError
from unbottle.core.contract.strategies import CompressContext
from unbottle.core.registry import get_registry
from unbottle.plugins.pruning.sparsegpt import (
    reconstruction_error,
    sparsegpt_prune,
    sparsegpt_prune_together,
)
from unbottle.plugins.pruning.structured import Shape, measure_importance, plan_cut

PROJECTIONS = re.compile(r"(q|k|v|o|gate|up|down)_proj$")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models are all small operations: one thread runs them fastest (and on busy
    shared cores, waking a second thread per operation costs many times the work)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_llama(
    *, heads: int = 4, kv_heads: int = 2, layers: int = 2, seed: int = 0
) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


def context(samples: int = 8, length: int = 32) -> CompressContext:
    generator = torch.Generator().manual_seed(1)
    calibration = [torch.randint(0, 64, (1, length), generator=generator) for _ in range(samples)]
    return CompressContext(tokenizer=None, calibration=calibration, train_ids=torch.arange(64))


def prune(model, strategy: str, ctx: CompressContext | None = None, **options) -> dict:
    pruner = get_registry().create("pruning", strategy, options)
    return pruner.prune(model, ctx or context())


def projections(model) -> dict[str, torch.Tensor]:
    return {
        name: module.weight.detach()
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and PROJECTIONS.search(name)
    }


# ------------------------------------------------------------------ unstructured sparsity

METHODS = ["magnitude", "wanda", "sparsegpt"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(("pattern", "n", "m"), [("2:4", 2, 4), ("4:8", 4, 8)])
def test_nm_pattern_keeps_exactly_n_of_every_m(method, pattern, n, m):
    model = tiny_llama()
    metrics = prune(model, method, pattern=pattern)
    for name, weight in projections(model).items():
        groups = weight.reshape(weight.shape[0], -1, m)  # (out, in / m, m)
        nonzeros = (groups != 0).sum(-1)
        assert bool((nonzeros == n).all()), name
    assert metrics["sparsity"] == (m - n) / m
    assert metrics["target_sparsity"] == (m - n) / m


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    "options",
    [
        {"sparsity": 0.37, "allocation": "uniform"},
        {"sparsity": 0.45, "allocation": "depth", "spread": 0.1},
        {"sparsity": 0.6, "allocation": "owl", "owl_threshold": 2.0, "spread": 0.1},
        {"sparsity": 0.5, "overrides": {r"down_proj$": 0.25}},
    ],
    ids=["uniform", "depth", "owl", "overrides"],
)
def test_achieved_sparsity_is_exactly_the_target(method, options):
    model = tiny_llama(layers=3)
    metrics = prune(model, method, **options)
    weights = projections(model)
    total = sum(w.numel() for w in weights.values())
    zeros = sum(int((w == 0).sum()) for w in weights.values())
    assert zeros == round(options["sparsity"] * total)
    assert metrics["sparsity"] == zeros / total
    per_layer = {name: float((w == 0).float().mean()) for name, w in weights.items()}
    if "overrides" in options:
        downs = [s for name, s in per_layer.items() if name.endswith("down_proj")]
        assert downs == pytest.approx([0.25] * len(downs), abs=1 / (64 * 96))
    block_sparsity = [
        sum(int((w == 0).sum()) for name, w in weights.items() if f"layers.{i}." in name)
        / sum(w.numel() for name, w in weights.items() if f"layers.{i}." in name)
        for i in range(3)
    ]
    if options.get("allocation") == "depth":  # 0.35, 0.45, 0.55
        assert block_sparsity == pytest.approx([0.35, 0.45, 0.55], abs=1e-3)
    if options.get("allocation") == "owl":  # blocks get different sparsities
        assert max(block_sparsity) - min(block_sparsity) > 0.05
        assert metrics["max_layer_sparsity"] > metrics["min_layer_sparsity"]


def test_exact_counts_hit_the_total_with_uneven_layers():
    sizes = [7, 13, 100, 1]
    counts = exact_counts(sizes, [0.33, 0.71, 0.4, 0.5], 0.43)
    assert sum(counts) == round(0.43 * sum(sizes))
    assert all(0 <= c <= n for c, n in zip(counts, sizes, strict=True))


def test_wanda_ranks_by_weight_times_input_norm_within_each_row():
    model = tiny_llama()
    block = model.model.layers[0]
    loud = 5  # an input feature of block 0's q/k/v with a large norm and small weights
    with torch.no_grad():
        block.input_layernorm.weight[loud] = 40.0
        for proj in (block.self_attn.q_proj, block.self_attn.k_proj, block.self_attn.v_proj):
            # Every weight of the column a quarter of the mean size: below each row's median.
            small = 0.25 * proj.weight.abs().mean()
            proj.weight[:, loud] = small * proj.weight[:, loud].sign()
    ctx = context()
    inputs: list[torch.Tensor] = []
    hook = block.self_attn.q_proj.register_forward_pre_hook(
        lambda _m, args: inputs.append(args[0].reshape(-1, 64))
    )
    with torch.no_grad():
        for ids in ctx.calibration:
            model(input_ids=ids)
    hook.remove()
    x = torch.cat(inputs)  # (tokens, in): what enters block 0, pruned or not
    dense_q = block.self_attn.q_proj.weight.detach().clone()

    by_magnitude = copy.deepcopy(model)
    prune(by_magnitude, "magnitude", ctx, sparsity=0.5)
    prune(model, "wanda", ctx, sparsity=0.5, allocation="uniform")
    magnitude_q = by_magnitude.model.layers[0].self_attn.q_proj.weight
    wanda_q = model.model.layers[0].self_attn.q_proj.weight
    assert bool((magnitude_q[:, loud] == 0).all())  # tiny weights: magnitude drops them all
    assert bool((wanda_q[:, loud] != 0).all())  # times a large input norm: Wanda keeps them
    # Exactly the per-row top half of |W_ij| * ||X_j||_2.
    scores = dense_q.abs() * x.norm(dim=0)  # (out, in)
    expected = torch.zeros_like(scores, dtype=torch.bool)
    expected.scatter_(1, scores.topk(32, dim=1, largest=False).indices, True)
    assert torch.equal(wanda_q == 0, expected)


def correlated_layer(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A random (out, in) weight and inputs (tokens, in) whose features are correlated."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(16, 128, generator=generator)  # 16 latent factors for 128 features
    scale = torch.rand(128, generator=generator) * 3  # uneven feature norms
    latent = torch.randn(2048, 16, generator=generator)
    x = (latent @ mixing + 0.1 * torch.randn(2048, 128, generator=generator)) * scale
    return torch.randn(64, 128, generator=generator), x


@pytest.mark.parametrize("pattern", [None, (2, 4)], ids=["50%", "2:4"])
def test_sparsegpt_reconstructs_the_layer_output_better_than_magnitude_and_wanda(pattern):
    weight, x = correlated_layer()
    zeros = weight.numel() // 2
    hessian = x.T @ x  # (in, in)

    def masked(scores: torch.Tensor) -> torch.Tensor:
        mask = nm_prune_mask(scores, *pattern) if pattern else row_prune_mask(scores, zeros)
        return weight.masked_fill(mask, 0.0)

    magnitude = masked(weight.abs())
    wanda = masked(wanda_scores(weight, x.pow(2).sum(0)))
    sparse = sparsegpt_prune(
        weight,
        damped_hessian_factor(hessian).hinv_chol,
        zeros=None if pattern else zeros,
        pattern=pattern,
        blocksize=32,
    )
    assert int((sparse == 0).sum()) == zeros
    errors = {
        name: reconstruction_error(weight, w, x)
        for name, w in (("magnitude", magnitude), ("wanda", wanda), ("sparsegpt", sparse))
    }
    # The OBS updates let the surviving weights absorb most of the error (measured here:
    # about half of Wanda's, which is itself well below magnitude's).
    assert errors["sparsegpt"] < 0.6 * errors["wanda"], errors
    assert errors["wanda"] < 0.8 * errors["magnitude"], errors


@pytest.mark.parametrize("pattern", [None, (2, 4)], ids=["50%", "2:4"])
def test_sparsegpt_gives_the_same_result_whatever_torchs_thread_count(pattern):
    _, x = correlated_layer(1)
    weight = torch.randn(300, 128, generator=torch.Generator().manual_seed(7))
    hinv = damped_hessian_factor(x.T @ x).hinv_chol
    zeros = None if pattern else weight.numel() // 2
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = sparsegpt_prune(weight, hinv, zeros=zeros, pattern=pattern, blocksize=32)
        torch.set_num_threads(2)
        two = sparsegpt_prune(weight, hinv, zeros=zeros, pattern=pattern, blocksize=32)
        assert torch.get_num_threads() == 2  # the loop's one-thread setting is undone
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one == 0, two == 0)
    torch.testing.assert_close(one, two, rtol=0, atol=1e-5)


@pytest.mark.parametrize("pattern", [None, (2, 4)], ids=["unstructured", "2:4"])
def test_sparsegpt_on_stacked_layers_gives_each_layer_its_own_result(pattern):
    _, x = correlated_layer(1)
    generator = torch.Generator().manual_seed(3)
    weights = [torch.randn(rows, 128, generator=generator) for rows in (96, 32, 160)]
    hinv = damped_hessian_factor(x.T @ x).hinv_chol
    budgets = [w.numel() * share // 8 for w, share in zip(weights, (4, 2, 5), strict=True)]
    alone = [
        sparsegpt_prune(w, hinv, zeros=None if pattern else zeros, pattern=pattern, blocksize=32)
        for w, zeros in zip(weights, budgets, strict=True)
    ]
    together = sparsegpt_prune_together(
        weights, hinv, zeros=None if pattern else budgets, pattern=pattern, blocksize=32
    )
    for one, stacked, zeros in zip(alone, together, budgets, strict=True):
        assert torch.equal(one == 0, stacked == 0)  # each layer's own mask and budget
        if pattern is None:
            assert int((stacked == 0).sum()) == zeros
        torch.testing.assert_close(stacked, one, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- structured


def masked_equivalent(model, plan, shape: Shape):
    """The original model with the removed units' outputs zeroed instead of removed."""
    masked = copy.deepcopy(model)
    d = shape.head_dim
    with torch.no_grad():
        for i, block in enumerate(masked.model.layers):
            out, down = block.self_attn.o_proj.weight, block.mlp.down_proj.weight
            if i in plan.removed_layers:  # a block that adds nothing passes its input on
                out.zero_()
                down.zero_()
                continue
            for head in set(range(shape.heads)) - set(plan.kept_heads[i]):
                out[:, head * d : (head + 1) * d] = 0
            for channel in set(range(shape.intermediate)) - set(plan.kept_channels[i]):
                down[:, channel] = 0
    return masked


@pytest.mark.parametrize(
    ("model_options", "options", "after"),
    [
        ({}, {"heads": 2}, {"heads": 2, "kv_heads": 2}),  # one query head per K/V group
        ({}, {"kv_heads": 1}, {"heads": 2, "kv_heads": 1}),  # a whole group
        ({"heads": 4, "kv_heads": 4}, {"heads": 0.5}, {"heads": 2, "kv_heads": 2}),  # MHA
        ({}, {"ffn": 0.25}, {"intermediate": 72}),
        ({"layers": 3}, {"layers": 1}, {"layers": 2}),
        (
            {"heads": 8, "kv_heads": 4, "layers": 3},
            {"heads": 0.5, "kv_heads": 1, "ffn": 40, "layers": 1},
            {"heads": 3, "kv_heads": 3, "intermediate": 56, "layers": 2},
        ),
    ],
    ids=["heads-per-group", "kv-group", "mha-heads", "ffn", "layers", "all"],
)
def test_structured_model_computes_what_the_masked_model_does(model_options, options, after):
    model = tiny_llama(**model_options)
    ctx = context()
    shape = Shape.of(model)
    pruner = get_registry().create("pruning", "structured", options)
    cut = pruner.cut(model)
    plan = plan_cut(shape, cut, measure_importance(model, ctx.calibration, span=cut.layers))
    masked = masked_equivalent(model, plan, shape)

    metrics = pruner.prune(model, ctx)
    new = Shape.of(model)
    assert {k: getattr(new, k) for k in after} == after
    assert new.head_dim == shape.head_dim
    assert len(model.model.layers) == model.config.num_hidden_layers == new.layers
    assert metrics["parameters_after"] == sum(p.numel() for p in model.parameters())
    assert metrics["parameters_after"] < metrics["parameters_before"]
    ids = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, masked(ids).logits, atol=1e-5, rtol=1e-5)


def test_structured_removes_the_least_important_units():
    model = tiny_llama(heads=4, kv_heads=4, layers=3)
    with torch.no_grad():
        layer1 = model.model.layers[1]
        layer1.self_attn.o_proj.weight.mul_(1e-3)  # layer 1 barely changes its input
        layer1.mlp.down_proj.weight.mul_(1e-3)
        layer0 = model.model.layers[0]
        layer0.self_attn.o_proj.weight[:, 16:32] *= 1e-3  # head 1 of layer 0 writes ~nothing
        layer0.mlp.down_proj.weight[:, 7] *= 1e-3  # and so does channel 7
    ctx = context()
    pruner = get_registry().create("pruning", "structured", {"heads": 1, "ffn": 1, "layers": 1})
    cut = pruner.cut(model)
    plan = plan_cut(Shape.of(model), cut, measure_importance(model, ctx.calibration, span=1))
    assert plan.removed_layers == [1]
    assert 1 not in plan.kept_heads[0]
    assert 7 not in plan.kept_channels[0]


def test_structured_model_saves_loads_and_generates(tmp_path):
    model = tiny_llama(heads=8, kv_heads=4, layers=3)
    before = sum(p.numel() for p in model.parameters())
    prune(model, "structured", heads=4, ffn=0.5, layers=1)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    config = loaded.config
    assert (config.num_attention_heads, config.num_key_value_heads) == (4, 4)
    assert (config.intermediate_size, config.num_hidden_layers) == (48, 2)
    assert sum(p.numel() for p in loaded.parameters()) < 0.6 * before
    ids = torch.randint(0, 64, (1, 8), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
        generated = loaded.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False
        )
    assert generated.shape == (1, 14)


# --------------------------------------------------------------- a recipe through the stage


def test_compress_recipe_runs_its_steps_in_order(tmp_path, tiny_data):
    from safetensors.torch import load_file

    from unbottle.core.stages.layout import Layout
    from unbottle.core.stages.runner import run_stage
    from unbottle.core.store.artifacts import read_manifest

    params = copy.deepcopy(TINY_PARAMS)
    for stage in ("pretrain", "finetune"):  # any model will do: train it as little as possible
        params[stage]["train"].update(steps=1, warmup_steps=0, log_every=1)
    params["compress"]["variants"] = {
        "shrunk": [
            {"prune": "structured", "ffn": 0.5, "layers": 1},
            {"prune": "wanda", "sparsity": 0.5},
            {"prune": "sparsegpt", "pattern": "2:4"},
        ]
    }
    root = make_workspace(tmp_path, tiny_data, params)
    layout, validated = Layout(root), Params.model_validate(params)
    for stage in ("pretrain", "finetune", "compress"):
        run_stage(stage, validated, layout)

    out = layout.artifact("compress") / "shrunk"
    steps = read_manifest(out)["steps"]
    assert [(s["step"], s["action"], s["strategy"]["name"]) for s in steps] == [
        (1, "prune", "structured"),
        (2, "prune", "wanda"),
        (3, "prune", "sparsegpt"),
    ]
    assert steps[0]["metrics"]["layers_after"] == 1
    assert steps[0]["metrics"]["intermediate_size_after"] == 32
    assert steps[1]["metrics"]["sparsity"] == 0.5
    assert steps[2]["options"]["pattern"] == "2:4"
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert (loaded.config.num_hidden_layers, loaded.config.intermediate_size) == (1, 32)
    for name, weight in load_file(out / "model.safetensors").items():
        if name.endswith("proj.weight"):
            assert bool(((weight.reshape(weight.shape[0], -1, 4) != 0).sum(-1) <= 2).all())


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("step", "message"),
    [
        ("{prune: wanda, sparsity: 1.0}", r"\.sparsity: 1\.0 is invalid: .*less than 1$"),
        ("{prune: sparsegpt, sparsity: 0}", r"\.sparsity: 0 is invalid: .*greater than 0$"),
        (
            "{prune: magnitude, pattern: '4:4'}",
            r"\.pattern: '4:4' is not a valid N:M pattern; write N:M with 0 < N < M and M a "
            r"power of two, such as 2:4 or 4:8 \(at most N nonzero weights in every M",
        ),
        (
            "{prune: wanda, pattern: 2:4}",
            r"\.pattern: got the number 124: YAML reads an unquoted N:M as base 60; quote it, "
            r"as in pattern: '2:4'$",
        ),
        ("{prune: wanda, pattern: '2:6'}", r"\.pattern: '2:6' is not a valid N:M pattern"),
        ("{prune: wanda, pattern: 2-4}", r"\.pattern: '2-4' is not an N:M pattern; write N:M"),
        (
            "{prune: sparsegpt, sparsity: 0.5, pattern: '2:4'}",
            r": give sparsity \(unstructured\) or pattern \(N:M\), not both",
        ),
        (
            "{prune: wanda, pattern: '2:4', allocation: owl}",
            r"\.allocation: owl sets per-layer sparsities, which an N:M pattern fixes",
        ),
        (
            "{prune: sparsegpt, pattern: '4:8', allocation: depth}",
            r"\.allocation: depth sets per-layer sparsities, which an N:M pattern fixes",
        ),
        (
            "{prune: wanda, allocation: depth, overrides: {down: 0.2}}",
            r"\.allocation: depth and overrides cannot be combined; choose one$",
        ),
        (
            "{prune: magnitude, scope: global, overrides: {down: 0.2}}",
            r": overrides needs scope: layer \(global scope ranks all weights\)$",
        ),
        ("{prune: sparsegpt, blocksize: 100}", r"\.blocksize: 100 is not a power of two"),
        (
            "{prune: structured}",
            r": give at least one of heads, kv_heads, ffn, layers \(a fraction in \(0, 1\) or "
            r"a count\)$",
        ),
        (
            "{prune: structured, heads: 1.5}",
            r"\.heads: 1\.5 is neither a fraction in \(0, 1\) nor a whole count$",
        ),
    ],
)
def test_bad_options_fail_in_one_line(step, message):
    params = load_params(None, [f"compress.variants.x=[{step}]"])
    with pytest.raises(ConfigError, match=r"^compress\.variants\.x\[0\]" + message) as error:
        check_strategies(params, get_registry())
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("strategy", "options", "ctx", "message"),
    [
        ("wanda", {"layers": "nothing_here"}, None, r"^prune: layers 'nothing_here' match no"),
        (
            "sparsegpt",
            {"overrides": {"mlp_in": 0.3}},
            None,
            r"^prune: overrides 'mlp_in' matches none of the pruned layers$",
        ),
        (
            "wanda",
            {"sparsity": 0.5},
            context(samples=0),
            r"^wanda: compress\.calibration\.samples: 0 calibration samples; at least 1 needed$",
        ),
        ("structured", {"ffn": 0.5}, context(samples=0), r"^structured: .*0 calibration samples"),
        (
            "magnitude",
            {"pattern": "2:128"},
            None,
            r"^prune: pattern 2:128 needs M=128 to divide every layer's input width; "
            r"model\.layers\.0\.self_attn\.q_proj has 64$",
        ),
        (
            "sparsegpt",
            {"overrides": {"proj": 0.3}},
            None,
            r"^prune: overrides pin every pruned layer",
        ),
        (
            "structured",
            {"layers": 2},
            None,
            r"^structured: layers 2 would remove every decoder layer \(2\); at most 1$",
        ),
        (
            "structured",
            {"ffn": 96},
            None,
            r"^structured: ffn 96 would remove every FFN channel \(96\); at most 95$",
        ),
        (
            "structured",
            {"heads": 4},
            None,
            r"^structured: heads 4 would remove every query head of each K/V group "
            r"\(2 per group\); at most 2 \(1 per group\)$",
        ),
        (
            "structured",
            {"heads": 3},
            None,
            r"^structured: heads 3 cannot be taken evenly from 2 K/V groups",
        ),
        ("structured", {"kv_heads": 2}, None, r"^structured: kv_heads 2 would remove every"),
        (
            "structured",
            {"heads": 0.2},
            None,
            r"^structured: heads 0\.2 removes nothing \(0\.2 x 2 query heads per K/V group",
        ),
    ],
)
def test_bad_input_for_the_model_fails_before_any_work(strategy, options, ctx, message):
    model = tiny_llama()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ConfigError, match=message) as error:
        prune(model, strategy, ctx, **options)
    assert "\n" not in str(error.value)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
