"""A model variant as one GGUF file, for llama.cpp, Ollama and anything built on ggml.

Written with the ``gguf`` package (ggml's own Python writer), following llama.cpp's
``convert_hf_to_gguf.py`` for the Llama architecture: the same metadata keys, tensor
names (``gguf.get_tensor_name_map``), the reordering of the query and key rows that
llama.cpp's rotary embedding expects, and the tokenizer as a GPT-2 style BPE vocabulary
with merges, special tokens and the chat template.

Weight types (``GgufType``, the ``gguf`` deploy target's ``type``):

- ``F16``: every matrix in float16 (norms stay float32, as ggml requires);
- ``Q8_0``: blocks of 32 weights, one float16 scale d each, int8 codes q, value q * d;
- ``Q4_0``: blocks of 32 weights, one float16 scale d each, 4-bit codes q, value (q - 8) * d;
- ``Q4_1``: blocks of 32 weights, a float16 scale d and a float16 minimum m each, 4-bit
  codes q, value q * d + m.

A float variant is quantized to Q8_0 by the ``gguf`` package (round to nearest). A
packed variant (``rtn``/``gptq``, :mod:`unbottle.core.models.lowbit`) whose grid *is* the
GGUF type's grid is copied code for code, so GPTQ's choices survive: a symmetric int4
grid in contiguous groups of 32 is Q4_0 exactly (unbottle's zero point 8 is Q4_0's
offset, its float16 scale is d), a symmetric int8 grid in groups of 32 is Q8_0 exactly
(code u is q = u - 128), and an int4 grid with zero points z in groups of 32 (GPTQ's and
RTN's default, asymmetric) is Q4_1: the codes and d as they are, m = -z * d rounded to
float16 (off by at most 2^-11 of z * d, under 1% of a step d). Any other grid cannot be
held without re-quantizing and is refused before any work. The embeddings (and an untied
output head) are stored in float16.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from unbottle.core.contract.errors import ConfigError, DataError

if TYPE_CHECKING:
    import numpy as np

GgufType = Literal["F16", "Q8_0", "Q4_0", "Q4_1"]
#: Hugging Face ``model_type`` -> GGUF architecture the writer knows.
ARCHITECTURES = {"llama": "llama"}
#: The exact packed grid (bits, group size) each low-bit type holds: symmetric only.
EXACT_GRIDS = {"Q4_0": (4, 32), "Q8_0": (8, 32)}
#: ... and with a zero point per group (asymmetric, or symmetric: zero point 8).
ZERO_POINT_GRIDS = {"Q4_1": (4, 32)}
BLOCK = 32


def require_gguf(what: str) -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ConfigError(
            f"{what}: writing a GGUF file needs the gguf package; install it with "
            "`pip install 'unbottle[gguf]'` (or `pip install 'gguf>=0.10'`)"
        )


def check_writable(model_dir: Path, gguf_type: str, what: str) -> dict[str, Any] | None:
    """Refuse, in one line and before any work, what the file cannot hold.

    Returns the packed variant's quantization config, or None for a float variant.
    """
    from unbottle.core.models.lowbit import QUANT_CONFIG, read_quantization_config

    require_gguf(what)
    config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise ConfigError(
            f"{what}: the GGUF writer does not know the architecture {model_type!r}; "
            f"known: {', '.join(ARCHITECTURES)}"
        )
    unsupported = [key for key in ("attention_bias", "mlp_bias", "rope_scaling") if config.get(key)]
    if unsupported:
        raise ConfigError(
            f"{what}: the GGUF writer knows the plain llama layout; this model has "
            f"{', '.join(f'{key}: {config[key]}' for key in unsupported)}"
        )
    sizes = sorted({config["hidden_size"], config["intermediate_size"]})
    if gguf_type != "F16" and any(size % BLOCK for size in sizes):
        raise ConfigError(
            f"{what}.type: {gguf_type} stores blocks of {BLOCK} inputs, and this model's "
            f"layer input sizes are {', '.join(map(str, sizes))}; use F16"
        )
    tokenizer_json = Path(model_dir) / "tokenizer.json"
    if not tokenizer_json.is_file():
        raise ConfigError(f"{what}: {model_dir} has no tokenizer.json for the GGUF vocabulary")
    _pre_tokenizer(json.loads(tokenizer_json.read_text(encoding="utf-8")))
    if not (Path(model_dir) / QUANT_CONFIG).is_file():
        if gguf_type in ("Q4_0", "Q4_1"):
            symmetric = gguf_type == "Q4_0"
            grid, how = ("a symmetric int4", ", symmetric true") if symmetric else ("an int4", "")
            raise ConfigError(
                f"{what}.type: {gguf_type} holds only {grid} grid in groups of 32, and this "
                "variant has float weights (pruned or not, they are dense floats); quantize "
                f"it with rtn/gptq (bits 4, group_size 32{how}) or use F16 or Q8_0"
            )
        return None
    meta = read_quantization_config(model_dir)
    grid = f"int{meta['bits']}, group {meta['group_size'] or 'per channel'}, " + (
        "symmetric" if meta["symmetric"] else "asymmetric"
    )
    if not holds(gguf_type, meta):
        allowed = "; ".join(
            [
                *(f"{t}: symmetric int{b} in groups of {g}" for t, (b, g) in EXACT_GRIDS.items()),
                *(f"{t}: int{b} in groups of {g}" for t, (b, g) in ZERO_POINT_GRIDS.items()),
            ]
        )
        raise ConfigError(
            f"{what}.type: {gguf_type} cannot hold this quantized variant ({grid}) without "
            f"re-quantizing it; a GGUF type holds a packed variant only when its grid is "
            f"the type's ({allowed})"
        )
    _check_contiguous_groups(Path(model_dir), gguf_type, what)
    return meta


def holds(gguf_type: str, meta: dict[str, Any]) -> bool:
    """Whether ``gguf_type`` holds a packed variant's grid (its quantization config)
    exactly."""
    grid = (meta["bits"], meta["group_size"])
    if meta["symmetric"] and EXACT_GRIDS.get(gguf_type) == grid:
        return True
    return ZERO_POINT_GRIDS.get(gguf_type) == grid


def exact_gguf_type(meta: dict[str, Any]) -> str | None:
    """The smallest type that holds a packed variant's grid exactly, if one does: Q4_0
    for a symmetric int4 grid in groups of 32, Q4_1 for one with zero points, Q8_0 for a
    symmetric int8 grid in groups of 32."""
    for gguf_type in (*EXACT_GRIDS, *ZERO_POINT_GRIDS):
        if holds(gguf_type, meta):
            return gguf_type
    return None


def _check_contiguous_groups(model_dir: Path, gguf_type: str, what: str) -> None:
    """GGUF blocks are runs of 32 columns: GPTQ's act-order groups (a ``g_idx`` that is
    not column // 32) cannot be blocks."""
    import torch
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        for key in f.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
            if not key.endswith(".g_idx"):
                continue
            g_idx = f.get_tensor(key).long()
            if not torch.equal(g_idx, torch.arange(len(g_idx)) // BLOCK):
                raise ConfigError(
                    f"{what}.type: {gguf_type} holds groups of 32 contiguous columns, and "
                    f"{key.removesuffix('.g_idx')} has act-order groups (g_idx); quantize "
                    "with gptq `static_groups: true` (or `act_order: false`)"
                )


# ------------------------------------------------------------------ block encodings


def q4_0_blocks(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """(rows, n) unsigned 4-bit codes, (rows, n/32) float16 scales -> (rows, n/32*18) bytes.

    ggml's block_q4_0: d (float16), then 16 bytes whose low nibbles hold codes 0..15 of
    the block and high nibbles codes 16..31.
    """
    import numpy as np

    rows, n = codes.shape
    blocks = codes.astype(np.uint8).reshape(rows, n // BLOCK, BLOCK)
    qs = blocks[..., : BLOCK // 2] | (blocks[..., BLOCK // 2 :] << 4)  # (rows, nb, 16)
    d = scales.astype(np.float16).reshape(rows, n // BLOCK, 1).view(np.uint8)  # (rows, nb, 2)
    return np.concatenate([d, qs], axis=-1).reshape(rows, -1)


def q4_1_blocks(codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray) -> np.ndarray:
    """(rows, n) unsigned 4-bit codes, (rows, n/32) float16 scales and integer zero
    points -> (rows, n/32*20) bytes.

    ggml's block_q4_1: d (float16), m (float16), then the codes as Q4_0 packs them; a
    weight is q * d + m, and unbottle's (q - z) * d is that with m = -z * d.
    """
    import numpy as np

    rows, n = codes.shape
    blocks = codes.astype(np.uint8).reshape(rows, n // BLOCK, BLOCK)
    qs = blocks[..., : BLOCK // 2] | (blocks[..., BLOCK // 2 :] << 4)  # (rows, nb, 16)
    d = scales.astype(np.float16)
    m = (-zeros.astype(np.float32) * d.astype(np.float32)).astype(np.float16)
    dm = np.stack([d, m], axis=-1).reshape(rows, n // BLOCK, 2).view(np.uint8)  # 4 bytes
    return np.concatenate([dm, qs], axis=-1).reshape(rows, -1)


def decode_q4_1(data: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The inverse of :func:`q4_1_blocks`: (rows, bytes) -> (codes, d, m)."""
    import numpy as np

    rows = data.shape[0]
    blocks = data.reshape(rows, n // BLOCK, 20)
    dm = blocks[..., :4].copy().view(np.float16).reshape(rows, n // BLOCK, 2)
    qs = blocks[..., 4:]
    codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(rows, n)
    return codes, dm[..., 0], dm[..., 1]


def q8_0_blocks(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """(rows, n) unsigned 8-bit codes (zero point 128), (rows, n/32) float16 scales ->
    (rows, n/32*34) bytes: ggml's block_q8_0, d (float16) then 32 int8 codes."""
    import numpy as np

    rows, n = codes.shape
    signed = (codes.astype(np.int16) - 128).astype(np.int8).reshape(rows, n // BLOCK, BLOCK)
    d = scales.astype(np.float16).reshape(rows, n // BLOCK, 1).view(np.uint8)
    return np.concatenate([d, signed.view(np.uint8)], axis=-1).reshape(rows, -1)


def decode_blocks(data: np.ndarray, gguf_type: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The inverse of the two encoders: (rows, bytes) -> (unsigned codes, float16 scales)."""
    import numpy as np

    rows = data.shape[0]
    width = 18 if gguf_type == "Q4_0" else 34
    blocks = data.reshape(rows, n // BLOCK, width)
    scales = blocks[..., :2].copy().view(np.float16).reshape(rows, n // BLOCK)
    if gguf_type == "Q4_0":
        qs = blocks[..., 2:]
        codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)
    else:
        codes = (blocks[..., 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
    return codes.reshape(rows, n), scales


def rotary_permute(weights: np.ndarray, heads: int) -> np.ndarray:
    """Reorder query/key rows from Hugging Face's rotary layout to llama.cpp's (as
    ``convert_hf_to_gguf.py``'s ``LlamaModel.permute``; transformers undoes it on load)."""
    return (
        weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


# ------------------------------------------------------------------------ tokenizer


def _pre_tokenizer(tokenizer_json: dict[str, Any]) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenization (``tokenizer.ggml.pre``)."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [(p.get("type"), p.get("individual_digits"), p.get("use_regex", True)) for p in parts]
    if kinds == [("ByteLevel", None, True)]:
        return "gpt-2"
    if kinds == [("Digits", True, True), ("ByteLevel", None, True)]:
        return "smollm"  # SmolLM's: digits one by one, then GPT-2's byte-level split
    raise ConfigError(
        "deploy.target: the GGUF writer knows byte-level BPE tokenizers with GPT-2's "
        f"pre-tokenization (optionally after single digits); this one has {pre.get('type')!r}"
    )


def add_tokenizer(writer: Any, tokenizer_dir: Path, vocab_size: int) -> None:
    """The vocabulary, merges, special tokens and chat template, as llama.cpp reads them."""
    import gguf
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer_json = json.loads((tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))
    if (tokenizer_json.get("model") or {}).get("type") != "BPE":
        raise ConfigError(
            "deploy.target: the GGUF writer knows BPE tokenizers; this one is "
            f"{(tokenizer_json.get('model') or {}).get('type')!r}"
        )
    by_id = {i: token for token, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            special = added[i].special
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer(tokenizer_json))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(tokenizer_dir, load_merges=True, n_vocab=vocab_size)
    special.add_to_gguf(writer, quiet=True)


# --------------------------------------------------------------------------- writer


def write_gguf(
    model_dir: Path, tokenizer_dir: Path, out_file: Path, gguf_type: GgufType
) -> dict[str, Any]:
    """Write the variant in ``model_dir`` (float or packed) to ``out_file``.

    ``tokenizer_dir`` holds the tokenizer to embed (with its chat template). Raises a
    one-line :class:`ConfigError` for what the file cannot hold, before any work.
    """
    import gguf
    import numpy as np
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from unbottle.core.compression.grids import unpack

    what = "deploy.target"
    model_dir = Path(model_dir)
    meta = check_writable(model_dir, gguf_type, what)
    config = AutoConfig.from_pretrained(model_dir)
    state = load_file(str(model_dir / "model.safetensors"))
    blocks = config.num_hidden_layers
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, blocks)
    file_type = {
        "F16": gguf.LlamaFileType.MOSTLY_F16,
        "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
        "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
        "Q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
    }[gguf_type]
    qtype = getattr(gguf.GGMLQuantizationType, gguf_type)

    writer = gguf.GGUFWriter(str(out_file), "llama")
    writer.add_name(model_dir.name)
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(blocks)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_rope_dimension_count(head_dim)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    if head_dim != config.hidden_size // heads:
        # Heads pruned away (structured pruning keeps each head's size): llama.cpp takes
        # the head size to be hidden_size / heads unless the file says otherwise.
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(float(getattr(config, "rope_theta", 10000.0)))
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_tokenizer(writer, Path(tokenizer_dir), config.vocab_size)

    def rows_order(name: str, array: np.ndarray) -> np.ndarray:
        if name.endswith("q_proj"):
            return rotary_permute(array, heads)
        if name.endswith("k_proj"):
            return rotary_permute(array, kv_heads)
        return array

    quantized = set(meta["modules"]) if meta else set()
    counts = {"exact": 0, "float": 0}
    for name in quantized:
        bits = int(meta["bits"])
        qweight, scales = state.pop(f"{name}.qweight"), state.pop(f"{name}.scales")
        qzeros = state.pop(f"{name}.qzeros", None)  # None: symmetric, zero point 8
        state.pop(f"{name}.g_idx", None)  # contiguous groups (checked above)
        groups = scales.shape[1]
        n = groups * BLOCK
        if state.pop(f"{name}.bias", None) is not None:
            raise ConfigError(f"{what}: {name} has a bias, which the llama GGUF layout lacks")
        codes = unpack(qweight, bits, n).numpy()  # (out, in) unsigned
        half = scales.numpy().astype(np.float16)  # (out, n/32)
        codes, half = rows_order(name, codes), rows_order(name, half)
        if gguf_type == "Q4_1":
            zeros = np.full(half.shape, 2 ** (bits - 1), dtype=np.uint8)
            if qzeros is not None:
                zeros = rows_order(name, unpack(qzeros, bits, groups).numpy())
            data = q4_1_blocks(codes, half, zeros)
        else:
            data = (q4_0_blocks if gguf_type == "Q4_0" else q8_0_blocks)(codes, half)
        writer.add_tensor(_gguf_name(names, f"{name}.weight"), data, raw_dtype=qtype)
        counts["exact"] += 1
    for key, tensor in state.items():
        name = key.removesuffix(".weight")
        if key == "lm_head.weight" and config.tie_word_embeddings:
            continue
        array = tensor.float().numpy()
        if array.ndim == 1:  # norms: float32, as ggml's kernels need
            writer.add_tensor(_gguf_name(names, key), array)
            continue
        array = rows_order(name, array)
        linear = name.endswith("_proj")
        if gguf_type == "Q8_0" and linear:
            data = gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(_gguf_name(names, key), data, raw_dtype=qtype)
        else:  # F16, and the embeddings / untied head of every type
            writer.add_tensor(_gguf_name(names, key), array.astype(np.float16))
        counts["float"] += 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {
        "gguf_type": gguf_type,
        "gguf_bytes": Path(out_file).stat().st_size,
        "gguf_exact_tensors": counts["exact"],
    }


def _gguf_name(names: Any, hf_key: str) -> str:
    """llama.cpp's name for a Hugging Face tensor, e.g. ``blk.0.attn_q.weight``."""
    name = names.get_name(hf_key, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise DataError(f"GGUF writer: no llama GGUF name for tensor {hf_key}")
    return name
