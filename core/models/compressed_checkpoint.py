"""A packed variant as a standard quantized checkpoint: compressed-tensors ``pack-quantized``.

The house ``packed`` format (:mod:`unbottle.core.models.lowbit`) is read only by unbottle.
:func:`write_compressed_tensors` rewrites the same integer codes, float16 scales, zero
points and ``g_idx`` in the layout of the compressed-tensors library (vLLM's native
format for weight-only int4/int8; Neural Magic / Red Hat, ``llm-compressor``), with a
``quantization_config`` in ``config.json`` that names it. Plain
``transformers.AutoModelForCausalLM.from_pretrained`` then loads the directory on CPU
with the ``compressed-tensors`` package installed, and ``vllm serve DIR`` serves it on a GPU.

Why compressed-tensors and not the GPTQ (``qweight``/``qzeros`` int32) layout: transformers
4.57 loads GPTQ checkpoints only through ``gptqmodel`` (or the retired ``auto-gptq``),
which builds from source against torch and did not install here; compressed-tensors is
pure Python and its loader decompresses on CPU.

The mapping is exact, code for code. unbottle stores unsigned codes u in [0, 2^b) with a
zero point z (2^(b-1) for symmetric grids) and reads back (u - z) * s. compressed-tensors
stores signed codes q = u - 2^(b-1) (``pack_to_int32`` adds the offset back when it
packs) with a signed zero point z' = z - 2^(b-1) (0 and not stored for symmetric grids)
and reads back (q - z') * s: the same number. A ``g_idx`` (GPTQ's activation order) is
written as ``weight_g_idx`` with ``actorder: group``. Nothing is re-quantized, so
GPTQ's choices survive.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

from unbottle.core.contract.errors import ConfigError, DataError

#: The version range this writer was checked against (transformers 4.57's loader): 0.15+
#: drops ``g_idx``, 0.12 cannot decompress packed zero points.
COMPRESSED_TENSORS = "compressed-tensors>=0.14,<0.15"
FORMAT = "pack-quantized"
WEIGHTS = "model.safetensors"


def require_compressed_tensors(what: str) -> None:
    """One line naming the install command when the optional library is missing."""
    if importlib.util.find_spec("compressed_tensors") is None:
        raise ConfigError(
            f"{what}: a quantized Hugging Face checkpoint needs the compressed-tensors "
            f"package (a dependency of unbottle); install it with "
            f"`pip install '{COMPRESSED_TENSORS}'`"
        )


def _meta_model(model_dir: Path) -> Any:
    """The model's modules on the meta device: shapes without memory."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def quantization_config(
    meta: dict[str, Any], linears: list[str], has_g_idx: bool
) -> dict[str, Any]:
    """compressed-tensors' ``quantization_config`` for a packed variant's grid."""
    import compressed_tensors
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
    )

    group_size = meta["group_size"]
    args = QuantizationArgs(
        num_bits=int(meta["bits"]),
        type="int",
        symmetric=bool(meta["symmetric"]),
        strategy="group" if group_size else "channel",
        group_size=group_size,
        actorder="group" if has_g_idx else None,
    )
    quantized = set(meta["modules"])
    config = QuantizationConfig(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=args)},
        format=FORMAT,
        quantization_status="compressed",
        # The output head, and any Linear the variant's `layers` did not select, stay float.
        ignore=[name for name in linears if name not in quantized],
    )
    return {
        "version": compressed_tensors.__version__,
        **config.model_dump(),
        "quant_method": "compressed-tensors",
    }


def write_compressed_tensors(packed_dir: Path, out_dir: Path) -> dict[str, Any]:
    """Write the packed variant in ``packed_dir`` as a compressed-tensors checkpoint.

    Writes ``model.safetensors`` and ``config.json`` (with ``quantization_config``) into
    ``out_dir``; the tokenizer and generation config are the caller's. Returns facts:
    ``quantized_layers`` and ``weights_bytes``.
    """
    import torch
    from compressed_tensors.compressors.quantized_compressors.pack_quantized import (
        pack_to_int32,
    )
    from safetensors.torch import load_file, save_file

    from unbottle.core.compression.grids import unpack
    from unbottle.core.models.lowbit import read_quantization_config

    require_compressed_tensors("deploy.target")
    packed_dir, out_dir = Path(packed_dir), Path(out_dir)
    meta = read_quantization_config(packed_dir)
    bits = int(meta["bits"])
    offset = 2 ** (bits - 1)  # unsigned code u <-> signed code u - offset
    model = _meta_model(packed_dir)
    state = load_file(str(packed_dir / WEIGHTS))
    tensors: dict[str, torch.Tensor] = {}
    has_g_idx = False
    for name in meta["modules"]:
        try:
            linear = model.get_submodule(name)
            qweight, scales = state.pop(f"{name}.qweight"), state.pop(f"{name}.scales")
        except (AttributeError, KeyError):
            raise DataError(
                f"{packed_dir}: quantized module {name} is missing from the model or its weights"
            ) from None
        out, n = linear.out_features, linear.in_features
        codes = unpack(qweight, bits, n).to(torch.int16)  # (out, in), unsigned
        signed_codes = (codes - offset).to(torch.int8)
        tensors[f"{name}.weight_packed"] = pack_to_int32(signed_codes, bits).contiguous()
        tensors[f"{name}.weight_scale"] = scales.contiguous()  # (out, G) float16
        tensors[f"{name}.weight_shape"] = torch.tensor([out, n], dtype=torch.int32)
        qzeros = state.pop(f"{name}.qzeros", None)
        if qzeros is not None:
            zeros = unpack(qzeros, bits, scales.shape[1]).to(torch.int16)  # (out, G)
            signed = (zeros - offset).to(torch.int8)
            tensors[f"{name}.weight_zero_point"] = pack_to_int32(
                signed, bits, packed_dim=0
            ).contiguous()
        g_idx = state.pop(f"{name}.g_idx", None)
        if g_idx is not None:
            has_g_idx = True
            tensors[f"{name}.weight_g_idx"] = g_idx.to(torch.int32).contiguous()
        bias = state.pop(f"{name}.bias", None)
        if bias is not None:
            tensors[f"{name}.bias"] = bias
    tensors.update(state)  # embeddings, norms, an untied head: float, as they are
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / WEIGHTS), metadata={"format": "pt"})

    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    config = json.loads((packed_dir / "config.json").read_text(encoding="utf-8"))
    config["quantization_config"] = quantization_config(meta, linears, has_g_idx)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return {
        "quantized_layers": len(meta["modules"]),
        "weights_bytes": (out_dir / WEIGHTS).stat().st_size,
    }


def load_compressed_tensors(model_dir: Path) -> Any:
    """The checkpoint through plain transformers, in float32 on CPU (what users get)."""
    import torch
    from transformers import AutoModelForCausalLM

    require_compressed_tensors(str(model_dir))
    return AutoModelForCausalLM.from_pretrained(
        model_dir, use_safetensors=True, dtype=torch.float32
    ).eval()
