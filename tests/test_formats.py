"""Interchange formats: a packed variant as a standard compressed-tensors checkpoint (the
``hf`` target), GGUF files (the ``gguf`` target), and no unbottle directory that plain
transformers would load with random weights."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.conftest import require_extra
from tests.test_quantization import calibration, tiny_llama
from unbottle.compression import output_head
from unbottle.core.compression.grids import Scheme, unpack
from unbottle.core.contract.errors import ConfigError
from unbottle.core.contract.strategies import DeployContext
from unbottle.core.models.lowbit import load_packed, save_packed
from unbottle.plugins.quantization.gptq import gptq_model

IDS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def tokenizer():
    from unbottle.core.models.loading import train_tokenizer

    return train_tokenizer(["the quick brown fox jumps over the lazy dog " * 8], 300)


@pytest.fixture(scope="module")
def float_dir(tmp_path_factory, tokenizer) -> Path:
    from unbottle.core.models.loading import save_model

    out = tmp_path_factory.mktemp("float")
    save_model(tiny_llama(len(tokenizer), seed=3), tokenizer, out)
    return out


def packed_variant(root: Path, tokenizer, *, bits: int, group_size: int | None, **grid) -> Path:
    """A GPTQ variant of the tiny model in unbottle's packed format."""
    symmetric = grid.pop("symmetric", False)
    head = grid.pop("head", False)  # quantize the output head too (untied), as quantize_head
    model = tiny_llama(len(tokenizer), seed=3)
    layers = [(n, m) for n, m in model.named_modules() if n.endswith("proj")]
    if head:
        layers.append(output_head(model, untie=True))
    scheme = Scheme(bits=bits, group_size=group_size, symmetric=symmetric)
    quantized, _ = gptq_model(model, calibration(len(tokenizer)), layers, scheme, **grid)
    out = root / f"gptq{bits}-g{group_size}-{'sym' if symmetric else 'asym'}{'-head' * head}"
    save_packed(
        model, tokenizer, quantized, out, method="gptq", group_size=group_size,
        symmetric=symmetric, options={},
    )  # fmt: skip
    return out


@pytest.fixture(scope="module")
def sym32(tmp_path_factory, tokenizer) -> Path:
    """GPTQ int4, symmetric, groups of 32 fitted on contiguous columns: Q4_0's grid."""
    return packed_variant(
        tmp_path_factory.mktemp("sym32"), tokenizer, bits=4, group_size=32, symmetric=True,
        act_order=True, static_groups=True,
    )  # fmt: skip


@pytest.fixture(scope="module")
def asym32(tmp_path_factory, tokenizer) -> Path:
    """GPTQ int4 with zero points in groups of 32."""
    return packed_variant(
        tmp_path_factory.mktemp("asym32"), tokenizer, bits=4, group_size=32, act_order=False
    )


def deploy(name: str, options: dict, model_dir: Path, out_dir: Path) -> dict:
    from unbottle.core.models.runtimes import model_format
    from unbottle.core.registry import get_registry

    target = get_registry().create("deploy_target", name, options)
    fmt = model_format(model_dir)
    assert fmt in target.accepts
    ctx = DeployContext(
        variant=model_dir.name,
        model_format=fmt,
        metrics={},
        report_markdown="| variant |\n|---|\n| x |",
        manifest={},
    )
    out_dir.mkdir(parents=True)
    return target.deploy(model_dir, out_dir, ctx)


def logits(model) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=IDS).logits


def card_library(bundle: Path) -> str | None:
    header = (bundle / "README.md").read_text().split("---")[1]
    lines = [line for line in header.splitlines() if line.startswith("library_name:")]
    return lines[0].split(":", 1)[1].strip() if lines else None


# ------------------------------------------------------- weights in the process's memory


def file_mapped(tensor: torch.Tensor) -> str | None:
    """The file whose memory mapping holds ``tensor``'s data, or None (process memory)."""
    address = tensor.data_ptr()
    with open("/proc/self/maps", encoding="ascii") as maps:
        for line in maps:
            span, _, _, _, inode, *path = line.split()
            low, high = (int(x, 16) for x in span.split("-"))
            if low <= address < high:
                return path[0] if inode != "0" and path else None
    return None


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="reads Linux's /proc maps")
def test_loaded_weights_live_in_process_memory_not_in_the_files_pages(float_dir, asym32):
    from unbottle.core.models.loading import load_model

    # What the copy is for: transformers leaves the weights in the safetensors file's
    # mapping, page cache that huge pages never back.
    plain = AutoModelForCausalLM.from_pretrained(float_dir, dtype=torch.float32)
    assert str(file_mapped(plain.model.embed_tokens.weight)).endswith("model.safetensors")
    for model, _ in (load_model(float_dir), load_packed(asym32)):
        tensors = dict(model.named_parameters()) | dict(model.named_buffers())
        in_files = {name: file_mapped(t) for name, t in tensors.items() if file_mapped(t)}
        assert not in_files
        assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    dense, _ = load_model(float_dir)
    assert torch.equal(logits(dense), logits(plain))


# --------------------------------------------------- item 2: compressed-tensors checkpoint


@pytest.mark.parametrize(
    "grid",
    [
        # GPTQ's default: asymmetric int4 in groups, act order (a g_idx per column).
        {"bits": 4, "group_size": 16, "act_order": True},
        {"bits": 8, "group_size": None, "symmetric": True, "act_order": False},
        # quantize_head: the output head packed too, the embeddings float and untied.
        {"bits": 4, "group_size": 16, "act_order": True, "head": True},
    ],
    ids=["int4-g16-asym-actorder", "int8-channel-sym", "int4-g16-head"],
)
def test_hf_target_writes_a_quantized_checkpoint_transformers_loads_to_the_same_logits(
    tmp_path, tokenizer, grid
):
    require_extra("compressed_tensors")
    head = grid.get("head", False)
    variant = packed_variant(tmp_path, tokenizer, **grid)
    bundle = tmp_path / "bundle"
    facts = deploy("hf", {}, variant, bundle)

    config = json.loads((bundle / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors"
    assert config["format"] == "pack-quantized"
    weights = config["config_groups"]["group_0"]["weights"]
    assert (weights["num_bits"], weights["group_size"]) == (grid["bits"], grid["group_size"])
    assert weights["actorder"] == ("group" if grid["act_order"] else None)
    assert config["ignore"] == ([] if head else ["lm_head"])
    with safe_open(str(bundle / "model.safetensors"), "pt") as f:
        dtypes = {k.rsplit(".", 1)[1]: f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118
        assert "model.layers.0.self_attn.q_proj.weight" not in f.keys()  # noqa: SIM118
    assert dtypes["weight_packed"] == "I32" and dtypes["weight_scale"] == "F16"
    assert ("weight_g_idx" in dtypes) == grid["act_order"]
    assert facts["quantized_layers"] == 14 + head and facts["smoke_generated_tokens"] == 2
    assert card_library(bundle) == "transformers"

    # Plain transformers, as a user would call it: the packed variant's logits.
    model = AutoModelForCausalLM.from_pretrained(bundle, dtype=torch.float32)
    reference, _ = load_packed(variant)
    assert torch.allclose(logits(model), logits(reference), rtol=0, atol=1e-5)
    assert facts["max_logit_difference"] <= 1e-5

    # unbottle's loader (the deploy stage's measurement, evaluate, `unbottle serve`), and
    # the card's code: compressed-tensors' forward wrapper, which quantizes every weight
    # again at every call (on SmolLM2, 0.31x the float model's decode speed), is off;
    # each Linear decompresses once, then multiplies in float. The same logits.
    from tests.test_stages import run_card_code
    from unbottle.core.models.runtimes import TorchRunner, load_torch_model

    fast, _ = load_torch_model(bundle)
    quantized = [m for m in fast.modules() if hasattr(m, "quantization_scheme")]
    assert len(quantized) == 14 + head
    assert not any(m.quantization_enabled for m in quantized)
    assert torch.allclose(logits(fast), logits(reference), rtol=0, atol=1e-5)
    assert all(m.weight.dtype == torch.float32 for m in quantized)  # decompressed, once
    # Counted as the float weights they stand for, as the packed variant's are.
    assert TorchRunner(bundle).weight_counts() == TorchRunner(variant).weight_counts()
    assert "disable_quantization" in run_card_code(bundle)


def test_compressed_tensors_codes_are_the_variants_codes(tmp_path, asym32):
    """No re-quantization: the checkpoint's packed int32 words unpack to the same codes."""
    require_extra("compressed_tensors")
    from compressed_tensors.compressors.quantized_compressors.pack_quantized import (
        unpack_from_int32,
    )

    variant = asym32
    bundle = tmp_path / "bundle"
    deploy("hf", {}, variant, bundle)
    name = "model.layers.1.mlp.down_proj"
    with safe_open(str(variant / "model.safetensors"), "pt") as f:
        codes = unpack(f.get_tensor(f"{name}.qweight"), 4, 128).int()
        zeros = unpack(f.get_tensor(f"{name}.qzeros"), 4, 4).int()
        scales = f.get_tensor(f"{name}.scales")
    with safe_open(str(bundle / "model.safetensors"), "pt") as f:
        packed = f.get_tensor(f"{name}.weight_packed")
        signed = unpack_from_int32(packed, 4, torch.Size([64, 128])).int()
        zero_point = unpack_from_int32(
            f.get_tensor(f"{name}.weight_zero_point"), 4, torch.Size([64, 4]), packed_dim=0
        ).int()
        assert torch.equal(f.get_tensor(f"{name}.weight_scale"), scales)
    assert torch.equal(signed + 8, codes)
    assert torch.equal(zero_point + 8, zeros)


# ------------------------------------------------------------------------ item 3: GGUF


def gguf_tensor(path: Path, name: str):
    from gguf import GGUFReader

    (tensor,) = [t for t in GGUFReader(path).tensors if t.name == name]
    return tensor


def q4_0_codes_stored_and_written(variant: Path, module: str, path: Path, gguf_name: str):
    """(codes, scales) of ``module`` in the packed variant, and (codes, scales) of its
    Q4_0 tensor ``gguf_name`` in the GGUF file, decoded (64 input columns)."""
    from unbottle.core.models.gguf_writer import decode_blocks

    with safe_open(str(variant / "model.safetensors"), "pt") as f:
        codes = unpack(f.get_tensor(f"{module}.qweight"), 4, 64).numpy()
        scales = f.get_tensor(f"{module}.scales").numpy()
    tensor = gguf_tensor(path, gguf_name)
    assert tensor.tensor_type.name == "Q4_0"
    return (codes, scales), decode_blocks(tensor.data, "Q4_0", 64)


def test_gguf_q4_0_holds_a_symmetric_group32_gptq_variant_code_for_code(tmp_path, tokenizer, sym32):
    require_extra("gguf")
    from unbottle.core.models.gguf_writer import rotary_permute

    variant = sym32
    bundle = tmp_path / "bundle"
    facts = deploy("gguf", {}, variant, bundle)  # auto: the exact type, Q4_0
    assert facts["gguf_type"] == "Q4_0" and facts["gguf_exact_tensors"] == 14
    path = bundle / "model-Q4_0.gguf"
    assert facts["smoke_generated_tokens"] == 2 and card_library(bundle) is None

    # Bit-exact: Q4_0's 4-bit codes and float16 d are the variant's codes and scales
    # (the query rows in llama.cpp's rotary order).
    (codes, scales), (got_codes, got_scales) = q4_0_codes_stored_and_written(
        variant, "model.layers.0.self_attn.q_proj", path, "blk.0.attn_q.weight"
    )
    assert (got_codes == rotary_permute(codes, 4)).all()
    assert (got_scales == rotary_permute(scales, 4)).all()

    # transformers' GGUF reader: the variant's logits (embeddings are float16 in the file).
    model = AutoModelForCausalLM.from_pretrained(bundle, gguf_file=path.name, dtype=torch.float32)
    reference, _ = load_packed(variant)
    assert torch.allclose(logits(model), logits(reference), rtol=0, atol=2e-3)

    # The tokenizer and chat template travel in the file.
    loaded = AutoTokenizer.from_pretrained(bundle, gguf_file=path.name)
    text = "the quick brown fox"
    assert loaded(text, add_special_tokens=False)["input_ids"] == tokenizer(text)["input_ids"]
    from gguf import GGUFReader

    template = GGUFReader(path).fields["tokenizer.chat_template"].contents()
    assert template == AutoTokenizer.from_pretrained(bundle).chat_template


def test_gguf_q4_1_holds_a_group32_gptq_variant_with_zero_points(tmp_path, tokenizer, asym32):
    """GPTQ's default grid (a zero point per group) is Q4_1's: q * d + m with the codes and
    d copied and m = -z * d, which float16 rounds by at most 2^-11 of itself."""
    require_extra("gguf")
    import numpy as np

    from unbottle.core.models.gguf_writer import decode_q4_1, rotary_permute

    bundle = tmp_path / "bundle"
    facts = deploy("gguf", {}, asym32, bundle)  # auto: the exact type, Q4_1
    assert facts["gguf_type"] == "Q4_1" and facts["gguf_exact_tensors"] == 14
    path = bundle / "model-Q4_1.gguf"
    with safe_open(str(asym32 / "model.safetensors"), "pt") as f:
        module = "model.layers.0.self_attn.q_proj"
        codes = unpack(f.get_tensor(f"{module}.qweight"), 4, 64).numpy()
        scales = f.get_tensor(f"{module}.scales").numpy()
        zeros = unpack(f.get_tensor(f"{module}.qzeros"), 4, 2).numpy()
    assert len(np.unique(zeros)) > 1  # really zero points, not one offset
    tensor = gguf_tensor(path, "blk.0.attn_q.weight")
    assert tensor.tensor_type.name == "Q4_1"
    got_codes, d, m = decode_q4_1(tensor.data, 64)
    assert (got_codes == rotary_permute(codes, 4)).all()
    assert (d == rotary_permute(scales, 4).astype(np.float16)).all()
    exact = -rotary_permute(zeros, 4).astype(np.float32) * d.astype(np.float32)
    assert (np.abs(m.astype(np.float32) - exact) <= np.abs(exact) * 2.0**-11).all()

    model = AutoModelForCausalLM.from_pretrained(bundle, gguf_file=path.name, dtype=torch.float32)
    reference, _ = load_packed(asym32)
    assert torch.allclose(logits(model), logits(reference), rtol=0, atol=3e-3)


def test_gguf_q4_0_holds_a_quantized_output_head_code_for_code(tmp_path, tokenizer):
    require_extra("gguf")

    variant = packed_variant(
        tmp_path, tokenizer, bits=4, group_size=32, symmetric=True, act_order=True,
        static_groups=True, head=True,
    )  # fmt: skip
    bundle = tmp_path / "bundle"
    facts = deploy("gguf", {}, variant, bundle)
    assert facts["gguf_type"] == "Q4_0" and facts["gguf_exact_tensors"] == 15
    path = bundle / "model-Q4_0.gguf"
    (codes, scales), (got_codes, got_scales) = q4_0_codes_stored_and_written(
        variant, "lm_head", path, "output.weight"
    )
    assert (got_codes == codes).all() and (got_scales == scales).all()
    assert gguf_tensor(path, "token_embd.weight").tensor_type.name == "F16"
    model = AutoModelForCausalLM.from_pretrained(bundle, gguf_file=path.name, dtype=torch.float32)
    reference, _ = load_packed(variant)
    assert torch.allclose(logits(model), logits(reference), rtol=0, atol=2e-3)


@pytest.mark.parametrize(("gguf_type", "atol"), [("F16", 2e-3), ("Q8_0", 3e-2)])
def test_gguf_of_a_float_variant_loads_back_to_its_logits(tmp_path, float_dir, gguf_type, atol):
    require_extra("gguf")
    bundle = tmp_path / "bundle"
    facts = deploy("gguf", {"type": gguf_type}, float_dir, bundle)
    assert facts["gguf_type"] == gguf_type and facts["gguf_exact_tensors"] == 0
    path = bundle / f"model-{gguf_type}.gguf"
    assert gguf_tensor(path, "blk.1.ffn_down.weight").tensor_type.name == gguf_type
    model = AutoModelForCausalLM.from_pretrained(bundle, gguf_file=path.name, dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(float_dir, dtype=torch.float32)
    assert torch.allclose(logits(model), logits(reference), rtol=0, atol=atol)


@pytest.fixture(scope="module")
def heads_pruned(tmp_path_factory, tokenizer) -> Path:
    """A model whose heads were pruned: 3 heads of 16 in a width of 64 (config.head_dim
    kept, hidden_size / heads no longer the head size)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from unbottle.core.models.loading import save_model

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=3, num_key_value_heads=1, head_dim=16, max_position_embeddings=64,
        tie_word_embeddings=True,
    )  # fmt: skip
    out = tmp_path_factory.mktemp("pruned")
    save_model(LlamaForCausalLM(config).eval(), tokenizer, out)
    return out


def test_gguf_of_a_heads_pruned_model_names_its_head_size(tmp_path, heads_pruned):
    """Structured pruning of heads keeps each head's size (config.head_dim) while
    hidden_size / heads changes: llama.cpp derives the head size from the latter unless the
    file says otherwise (attention.key_length / value_length), and refuses the file."""
    require_extra("gguf")
    from gguf import GGUFReader

    pruned = heads_pruned
    bundle = tmp_path / "bundle"
    deploy("gguf", {"type": "F16"}, pruned, bundle)
    fields = GGUFReader(bundle / "model-F16.gguf").fields
    for key in ("llama.attention.key_length", "llama.attention.value_length"):
        assert fields[key].contents() == 16
    assert fields["llama.rope.dimension_count"].contents() == 16
    model = AutoModelForCausalLM.from_pretrained(
        bundle, gguf_file="model-F16.gguf", dtype=torch.float32
    )
    reference = AutoModelForCausalLM.from_pretrained(pruned, dtype=torch.float32)
    assert torch.allclose(logits(model), logits(reference), rtol=0, atol=2e-3)


def test_onnx_bundle_of_a_heads_pruned_model_runs_in_optimum(tmp_path, heads_pruned):
    """optimum 2.1 sizes a Llama's empty KV cache with hidden_size / heads: a heads-pruned
    model failed its first step ("past_key_values.0.key ... Got: 21 Expected: 16"), in the
    deploy check, the evaluate stage and the card's code alike."""
    from tests.test_stages import run_card_code
    from unbottle.core.models.runtimes import OnnxRunner, TorchRunner

    bundle = tmp_path / "bundle"
    assert deploy("onnx", {"int8": False}, heads_pruned, bundle)["smoke_generated_tokens"] == 2
    reference = AutoModelForCausalLM.from_pretrained(heads_pruned, dtype=torch.float32)
    runner = OnnxRunner(bundle)
    assert torch.allclose(runner.logits(IDS), logits(reference), rtol=0, atol=1e-4)
    assert "embed_size_per_head" in run_card_code(bundle)
    # The float graph's head (tied: a transposed copy of the embeddings) is found and left
    # out of the layers, as torch leaves out its output embeddings.
    assert runner.weight_counts().layers == TorchRunner(heads_pruned).weight_counts().layers


def test_an_int8_onnx_bundle_counts_its_pruned_weights_as_zeros(tmp_path, tokenizer):
    """Dynamic int8 stores each weight as a code with a zero point: a pruned weight is a
    code equal to its zero point, not 0, and the evaluation's sparsity read 0% for a
    half-pruned model's int8 bundle."""
    from unbottle.core.compression.sparsity import nm_prune_mask
    from unbottle.core.models.loading import save_model
    from unbottle.core.models.runtimes import OnnxRunner, TorchRunner

    model = tiny_llama(len(tokenizer), seed=3)
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith("proj"):
                module.weight.masked_fill_(nm_prune_mask(module.weight.abs(), 2, 4), 0.0)
    sparse = tmp_path / "sparse"
    save_model(model, tokenizer, sparse)
    bundle = tmp_path / "bundle"
    deploy("onnx", {}, sparse, bundle)  # int8 by default
    dense = TorchRunner(sparse).weight_counts()
    assert dense.layers_nonzero == dense.layers // 2  # the projections' half, exactly
    expected = 1 - dense.nonzero / dense.total  # the same zeros, over every weight
    int8 = OnnxRunner(bundle).weight_counts()
    # About the same shares: a few small weights also round to their zero point.
    assert expected - 0.01 < 1 - int8.nonzero / int8.total < expected + 0.02
    assert int8.layers == dense.layers
    assert 0.5 <= 1 - int8.layers_nonzero / int8.layers < 0.52


# ------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("grid", "gguf_type", "message"),
    [
        (
            {"bits": 4, "group_size": 32, "act_order": False},
            "Q4_0",
            r"^deploy\.target\.type: Q4_0 cannot hold this quantized variant \(int4, group "
            r"32, asymmetric\) without re-quantizing it; .*Q4_0: symmetric int4 in groups of 32",
        ),
        (
            {"bits": 4, "group_size": 64, "symmetric": True, "act_order": False},
            "Q4_0",
            r"^deploy\.target\.type: Q4_0 cannot hold this quantized variant \(int4, group 64, ",
        ),
        (
            {"bits": 4, "group_size": 32, "symmetric": True, "act_order": True},
            "auto",
            r"^deploy\.target\.type: Q4_0 holds groups of 32 contiguous columns, and "
            r"model\.layers\.\d\.\S+ has act-order groups \(g_idx\); quantize with gptq "
            r"`static_groups: true`",
        ),
        (
            {"bits": 4, "group_size": 64, "act_order": False},
            "Q4_1",
            r"^deploy\.target\.type: Q4_1 cannot hold this quantized variant \(int4, group 64, "
            r"asymmetric\) without re-quantizing it; .*Q4_1: int4 in groups of 32\)$",
        ),
        (
            {"bits": 8, "group_size": 32, "act_order": False},
            "Q4_1",
            r"^deploy\.target\.type: Q4_1 cannot hold this quantized variant \(int8, group 32, ",
        ),
    ],
    ids=["asymmetric", "group64", "act-order", "q4_1-group64", "q4_1-int8"],
)
def test_gguf_refuses_a_grid_its_type_cannot_hold_before_any_work(
    tmp_path, tokenizer, grid, gguf_type, message
):
    require_extra("gguf")
    variant = packed_variant(tmp_path, tokenizer, **grid)
    with pytest.raises(ConfigError, match=message):
        deploy("gguf", {"type": gguf_type}, variant, tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize(
    ("gguf_type", "grid"), [("Q4_0", "a symmetric int4 grid"), ("Q4_1", "an int4 grid")]
)
def test_gguf_refuses_q4_from_a_pruned_but_dense_variant(tmp_path, float_dir, gguf_type, grid):
    require_extra("gguf")
    pruned = tmp_path / "pruned"
    shutil.copytree(float_dir, pruned)
    with pytest.raises(
        ConfigError,
        match=rf"^deploy\.target\.type: {gguf_type} holds only {grid} in groups of 32, "
        r"and this variant has float weights \(pruned or not",
    ):
        deploy("gguf", {"type": gguf_type}, pruned, tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize(
    ("change", "options", "message"),
    [
        (
            {"model_type": "mistral"},
            {},
            r"^deploy\.target: the GGUF writer does not know the architecture 'mistral'; "
            r"known: llama$",
        ),
        (
            {"attention_bias": True},
            {},
            r"^deploy\.target: the GGUF writer knows the plain llama layout; this model has "
            r"attention_bias: True$",
        ),
        (
            {"intermediate_size": 48},
            {"type": "Q8_0"},
            r"^deploy\.target\.type: Q8_0 stores blocks of 32 inputs, and this model's layer "
            r"input sizes are 48, 64; use F16$",
        ),
    ],
    ids=["architecture", "bias", "block"],
)
def test_gguf_refuses_a_model_the_writer_does_not_know(
    tmp_path, float_dir, change, options, message
):
    require_extra("gguf")
    other = tmp_path / "other"
    shutil.copytree(float_dir, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(ConfigError, match=message):
        deploy("gguf", options, other, tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize(
    ("target", "options", "module", "install"),
    [
        ("gguf", {}, "gguf", r"pip install 'unbottle\[gguf\]'"),
        ("hf", {}, "compressed_tensors", r"pip install 'compressed-tensors>=0\.14,<0\.15'"),
    ],
)
def test_a_missing_optional_library_is_one_line_with_its_pip_install(
    tmp_path, sym32, monkeypatch, target, options, module, install
):
    variant = sym32
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == module else find_spec(name, *a),
    )
    with pytest.raises(
        ConfigError,
        match=rf"^deploy\.target: .*needs the \S+ package\b.*; install it with `{install}",
    ):
        deploy(target, options, variant, tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []


def test_no_unbottle_directory_loads_as_random_weights_in_plain_transformers(
    tmp_path, float_dir, asym32
):
    """Every format either loads in plain transformers with its own logits or fails loudly."""
    require_extra("compressed_tensors")
    require_extra("gguf")
    from unbottle.plugins.quantization import export_onnx

    float_model = AutoModelForCausalLM.from_pretrained(float_dir, dtype=torch.float32)
    packed = asym32
    packed_model, _ = load_packed(packed)
    deploy("server", {}, packed, tmp_path / "server-packed")
    deploy("hf", {}, packed, tmp_path / "hf-packed")
    deploy("gguf", {"type": "F16"}, float_dir, tmp_path / "gguf")
    (tmp_path / "onnx").mkdir()
    export_onnx(float_dir, tmp_path / "onnx", int8=False)
    loads = {float_dir: float_model, tmp_path / "hf-packed": packed_model}
    refuses = {
        packed: "Incompatible safetensors file.* but unbottle-packed",
        tmp_path / "server-packed": "Incompatible safetensors file.* but unbottle-packed",
        tmp_path / "gguf": "Unrecognized model in",  # no config.json: the file is all
        tmp_path / "onnx": "no file named .*model.safetensors",
    }
    for directory, reference in loads.items():
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
        assert torch.allclose(logits(model), logits(reference), rtol=0, atol=1e-5), directory
    for directory, message in refuses.items():
        with pytest.raises((OSError, ValueError), match=message):
            AutoModelForCausalLM.from_pretrained(directory)
    assert card_library(tmp_path / "server-packed") is None


# ------------------------------------------------------------ llama.cpp runs the file


@pytest.mark.parametrize(("key", "value"), [("runtime", "llama.cpp"), ("type", "Q4_K_M")])
def test_what_needs_llama_cpp_is_refused_without_it_when_params_are_checked(
    monkeypatch, key, value
):
    """Known from params alone, so refused with the other strategy options, before any
    stage runs, in one line with the install command."""
    from unbottle.core.config.schema import Params
    from unbottle.core.config.strategy_checks import check_strategies
    from unbottle.core.registry import get_registry

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llama_cpp" else find_spec(name, *a),
    )
    params = Params.model_validate({"deploy": {"target": {"name": "gguf", key: value}}})
    with pytest.raises(ConfigError) as refused:
        check_strategies(params, get_registry())
    assert str(refused.value) == (
        f"deploy.target.{key}: {value} needs llama-cpp-python; pip install 'unbottle[llama-cpp]'"
    )


def require_llama_cpp() -> None:
    """llama-cpp-python builds llama.cpp from source (about 4 minutes on 2 cores), more
    than `make test` can spend, so these tests run where it is installed
    (`pip install 'unbottle[llama-cpp]'`) and skip elsewhere, saying so."""
    pytest.importorskip(
        "llama_cpp", reason="llama-cpp-python is not installed: pip install 'unbottle[llama-cpp]'"
    )


@pytest.mark.parametrize(
    ("variant_name", "gguf_type", "atol"),
    [
        ("sym32", "Q4_0", 1e-2),
        ("asym32", "Q4_1", 1e-2),
        ("float_dir", "F16", 2e-3),
        ("float_dir", "Q8_0", 2e-2),
    ],
)
def test_llama_cpp_runs_the_gguf_file_to_the_variants_logits(
    request, tmp_path, tokenizer, variant_name, gguf_type, atol
):
    """llama.cpp itself, not a Python reader of the file: its tokenizer reads text as the
    original, its kernels give the variant's logits (within what float16 weights, and for
    Q4_0/Q8_0 its int8 activations, cost), and it decodes a left-padded batch as each row
    alone."""
    require_llama_cpp()
    from unbottle.core.models.runtimes import TorchRunner
    from unbottle.core.registry import get_registry
    from unbottle.export import LlamaCppRunner

    variant = request.getfixturevalue(variant_name)
    options = {"type": gguf_type, "runtime": "llama.cpp"}
    bundle = tmp_path / "bundle"
    facts = deploy("gguf", options, variant, bundle)
    assert facts["gguf_runtime"] == "llama.cpp" and facts["smoke_generated_tokens"] == 2
    runner = get_registry().create("deploy_target", "gguf", options).runner(bundle, "cpu")
    assert isinstance(runner, LlamaCppRunner)

    text = "the quick brown fox jumps over the lazy dog"
    assert runner.encode(text) == tokenizer(text, add_special_tokens=False)["input_ids"]

    got, want = runner.logits(IDS), TorchRunner(variant).logits(IDS)
    assert got.shape == want.shape
    assert torch.allclose(got, want, rtol=0, atol=atol)

    prompts = [IDS[0, :5], IDS[1, :9]]
    alone = [runner.generate(p[None], torch.ones(1, len(p)), 6, eos_token_id=None) for p in prompts]
    padded = torch.zeros(2, 9, dtype=torch.long)
    padded[0, 4:], padded[1] = prompts
    mask = (torch.arange(9) >= torch.tensor([[4], [0]])).long()
    batched = runner.generate(padded, mask, 6, eos_token_id=None)
    assert batched.shape == (2, 15)
    for row, solo in zip(batched, alone, strict=True):
        assert row[9:].tolist() == solo[0, -6:].tolist()

    # A prompt longer than one llama_decode call (512 tokens) goes in chunks, in both paths.
    long = torch.randint(0, len(tokenizer), (1, 540), generator=torch.Generator().manual_seed(2))
    next_token = runner.generate(long, torch.ones_like(long), 1, eos_token_id=None)[0, -1]
    assert next_token == runner.logits(long)[0, -1].argmax()
    # ...and with other rows: a chunk holds the end of one row and the start of the next,
    # each row with the cache cells of its own that a longer row than before needs.
    rows = torch.cat([torch.zeros(1, 535, dtype=torch.long), prompts[0][None]], 1)
    rows = torch.cat([rows, long])
    mask = torch.ones_like(rows)
    mask[0, :535] = 0
    both = runner.generate(rows, mask, 6, eos_token_id=None)
    assert both[0, -6:].tolist() == alone[0][0, -6:].tolist()
    assert (
        both[1, -6:].tolist()
        == runner.generate(long, mask[1:], 6, eos_token_id=None)[0, -6:].tolist()
    )

    # A stop token ends a row, except before min_new_tokens (as transformers: not chosen).
    first, prompt, ones = int(alone[0][0, 5]), prompts[0][None], torch.ones(1, 5)
    assert runner.generate(prompt, ones, 6, eos_token_id=first).shape == (1, 6)
    forced = runner.generate(prompt, ones, 6, eos_token_id=[first], min_new_tokens=3)
    assert forced.shape[1] >= 8 and first not in forced[0, 5:8].tolist()
    runner.close()


@pytest.fixture(scope="module")
def wide_float_dir(tmp_path_factory, tokenizer) -> Path:
    """A float model whose rows are 256 wide, a k-quant block (narrower rows fall back to
    other types in llama.cpp's quantizer)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from unbottle.core.models.loading import save_model

    torch.manual_seed(4)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=256, intermediate_size=512, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
        tie_word_embeddings=True,
    )  # fmt: skip
    out = tmp_path_factory.mktemp("wide")
    save_model(LlamaForCausalLM(config).eval(), tokenizer, out)
    return out


def test_gguf_k_quants_are_llama_cpps_own_quantization_of_a_float_variant(
    tmp_path, wide_float_dir, sym32
):
    """Q4_K_M: the writer's F16 file quantized by llama.cpp itself, its "_M" mix of 4- and
    6-bit blocks; transformers' reader (the deploy stage's default runtime) and llama.cpp
    read the same weights. A quantized variant is refused: that would round it twice."""
    require_llama_cpp()
    from gguf import GGUFReader

    from unbottle.export import LlamaCppRunner

    bundle = tmp_path / "bundle"
    facts = deploy("gguf", {"type": "Q4_K_M"}, wide_float_dir, bundle)
    assert facts["gguf_type"] == "Q4_K_M" and facts["gguf_quantized_by"] == "llama.cpp"
    assert [p.name for p in bundle.glob("*.gguf")] == ["model-Q4_K_M.gguf"]  # no F16 left
    path = bundle / "model-Q4_K_M.gguf"
    types = {t.name: t.tensor_type.name for t in GGUFReader(path).tensors}
    assert types["blk.0.ffn_gate.weight"] == "Q4_K" and "Q6_K" in types.values()
    assert facts["gguf_bytes"] == path.stat().st_size

    reader = AutoModelForCausalLM.from_pretrained(bundle, gguf_file=path.name, dtype=torch.float32)
    runner = LlamaCppRunner(bundle)
    got = runner.logits(IDS)
    runner.close()
    # llama.cpp's kernels round the activations to 8 bits: 0.023 apart at most here, where
    # the 4- and 6-bit weights move the logits 0.12 from the float model's.
    read, floats = logits(reader), logits(AutoModelForCausalLM.from_pretrained(wide_float_dir))
    assert torch.allclose(got, read, rtol=0, atol=5e-2)
    assert (read - floats).abs().max() > 5e-2

    with pytest.raises(ConfigError, match=r"^deploy\.target\.type: Q4_K_M is llama\.cpp's own "):
        deploy("gguf", {"type": "Q4_K_M"}, sym32, tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []
