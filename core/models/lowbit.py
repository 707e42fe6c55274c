"""The "packed" model format: low-bit integer weights in safetensors, and its loader.

A packed model directory holds

- ``model.safetensors``: for each quantized Linear ``<name>``, its codes packed
  ``8 // bits`` to a byte (``<name>.qweight``, uint8, (out, ceil(in * bits / 8))), its
  float16 scales (``<name>.scales``, (out, G)), its packed zero points for asymmetric
  grids (``<name>.qzeros``, uint8, (out, ceil(G * bits / 8))), the group of each input
  column when groups are not contiguous (``<name>.g_idx``, int32, (in,)) and its bias if
  any; every other tensor (embeddings, norms, the output head) in float32, a tied
  output head stored once, as the embedding;
- ``quantization.json``: the method, bits, group size, grid shape and the list of
  quantized modules (see :func:`write_quantization_config`);
- ``config.json``, ``generation_config.json`` and the tokenizer, as a Hugging Face
  directory has them.

:func:`load_packed` builds the model from its config and puts a :class:`QuantizedLinear`
in place of each quantized Linear. How that layer multiplies is its ``kernel``
(:data:`KERNELS`):

- ``dequantized`` (the default): the weight is dequantized once, when the layer is built,
  and kept in float32 next to the packed buffers; each call is a plain ``F.linear``, as
  fast as the float model, with the float model's memory;
- ``on-the-fly``: no float copy is kept; each call unpacks and dequantizes the whole
  weight (the smallest memory, several times slower than float at decode);
- ``int4pack``: torch's CPU int4 kernel (``_weight_int4pack_mm_for_cpu``) on the codes
  repacked at load, for int4 grids with groups of 32 to 256 (act-order groups are
  handled by permuting the input columns).

Measured by ``bench/lowbit_kernels.py`` (docs/compression.md has the figures): on AVX2
and AVX-512 CPUs neither of torch's low-bit kernels beat the float32 matmul at batch 1 or
8, so the default is the cached float weight. The fast low-bit route is the ONNX Runtime edge
bundle (``MatMulNBits``, plugins/quantization/matmulnbits.py). Plain ``transformers``
cannot load this format; unbottle's evaluation, serving and the ``server`` deploy target
load it through here.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from unbottle.core.compression.grids import QuantizedWeight, dequantize_groups, pack, unpack
from unbottle.core.contract.errors import DataError

if TYPE_CHECKING:
    import torch

FORMAT = "packed"
QUANT_CONFIG = "quantization.json"
WEIGHTS = "model.safetensors"
_CONFIG_VERSION = 1
#: How a QuantizedLinear multiplies (see the module docstring); the first is the default.
KERNELS = ("dequantized", "on-the-fly", "int4pack")
#: Group sizes torch's CPU int4 kernel takes.
_INT4PACK_GROUPS = (32, 64, 128, 256)


def __getattr__(name: str) -> Any:
    # ``QuantizedLinear`` is a torch module; it is defined on first use so that importing
    # this module stays cheap (PEP 562).
    if name == "QuantizedLinear":
        return _quantized_linear_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@functools.cache
def _quantized_linear_class() -> type:
    import torch

    class QuantizedLinear(torch.nn.Module):
        """A Linear layer whose weight is stored as packed integer codes with float16 grids.

        ``kernel`` says how ``forward`` multiplies (:data:`KERNELS`): with a float32 copy
        dequantized once at construction (``dequantized``), by dequantizing at every call
        (``on-the-fly``), or with torch's CPU int4 kernel (``int4pack``). The packed
        buffers are what the layer saves, whatever the kernel.
        """

        def __init__(
            self,
            in_features: int,
            out_features: int,
            *,
            bits: int,
            group_size: int | None,
            qweight: torch.Tensor,
            scales: torch.Tensor,
            qzeros: torch.Tensor | None,
            g_idx: torch.Tensor | None,
            bias: torch.Tensor | None,
            kernel: str = KERNELS[0],
        ) -> None:
            super().__init__()
            if kernel not in KERNELS:
                raise ValueError(f"kernel: {kernel!r}; one of {', '.join(KERNELS)}")
            self.in_features, self.out_features = in_features, out_features
            self.bits, self.group_size = bits, group_size
            self.groups = in_features // (group_size or in_features)
            self.kernel = kernel
            self.register_buffer("qweight", qweight)  # (out, ceil(in * bits / 8)) uint8
            self.register_buffer("scales", scales)  # (out, G) float16
            self.register_buffer("qzeros", qzeros)  # (out, ceil(G * bits / 8)) uint8 or None
            self.register_buffer("g_idx", g_idx)  # (in,) int32 or None
            self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)
            # Derived tensors are not saved (persistent=False): the file keeps the codes.
            if kernel == "dequantized":
                with torch.no_grad():
                    weight = self._dequantize()  # (out, in) float32
                self.register_buffer("dequantized", weight, persistent=False)
            elif kernel == "int4pack":
                self._prepare_int4pack()

        def _prepare_int4pack(self) -> None:
            if self.bits != 4 or self.group_size not in _INT4PACK_GROUPS:
                groups = ", ".join(map(str, _INT4PACK_GROUPS))
                raise ValueError(
                    f"kernel int4pack: int4 with groups of {groups} only; this layer is "
                    f"int{self.bits}, group {self.group_size}"
                )
            codes = unpack(self.qweight, self.bits, self.in_features)  # (out, in) uint8
            scales = self.scales.float()  # (out, G)
            # (q - z) s = (q - 8) s + (8 - z) s: the kernel's scale and float zero.
            offsets = (8 - self.zero_points().float()) * scales  # (out, G)
            order = None
            if self.g_idx is not None:
                # Act-order groups: columns sorted by group form contiguous groups of
                # group_size, so permute the columns here and the input at each call.
                order = torch.argsort(self.g_idx.long(), stable=True)  # (in,)
                codes = codes.index_select(1, order)
            self.register_buffer("input_order", order, persistent=False)
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.int(), 1)
            self.register_buffer("int4pack", packed, persistent=False)
            grid = torch.stack([scales.t(), offsets.t()], dim=-1).contiguous()  # (G, out, 2)
            self.register_buffer("int4pack_grid", grid, persistent=False)

        @classmethod
        def from_quantized(
            cls,
            q: QuantizedWeight,
            group_size: int | None,
            bias: torch.Tensor | None = None,
            kernel: str = KERNELS[0],
        ) -> QuantizedLinear:
            out, n = q.shape
            return cls(
                n,
                out,
                bits=q.bits,
                group_size=group_size,
                qweight=pack(q.codes, q.bits),
                scales=q.scales.contiguous(),
                qzeros=None if q.zeros is None else pack(q.zeros, q.bits),
                g_idx=q.g_idx,
                bias=None if bias is None else bias.detach().float().clone(),
                kernel=kernel,
            )

        def zero_points(self) -> torch.Tensor:
            if self.qzeros is None:
                return torch.full(
                    self.scales.shape,
                    2 ** (self.bits - 1),
                    dtype=torch.uint8,
                    device=self.scales.device,
                )
            return unpack(self.qzeros, self.bits, self.groups)

        def _dequantize(self) -> torch.Tensor:
            codes = unpack(self.qweight, self.bits, self.in_features)  # (out, in) uint8
            return dequantize_groups(codes, self.scales, self.zero_points(), self.g_idx)

        def dequantized_weight(self) -> torch.Tensor:
            """(out, in) float32 weight, computed from the packed buffers (or its cache)."""
            return self.dequantized if self.kernel == "dequantized" else self._dequantize()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if (
                self.kernel == "dequantized"
                and x.dtype == self.dequantized.dtype
                and (self.bias is None or self.bias.dtype == x.dtype)
            ):
                # nn.Linear's own call on the cached weight, nothing else: at decode this
                # path must not be slower than the float model (issue #14).
                return torch.nn.functional.linear(x, self.dequantized, self.bias)
            bias = None if self.bias is None else self.bias.to(x.dtype)
            if self.kernel != "int4pack":
                weight = self.dequantized_weight().to(x.dtype)  # (out, in)
                return torch.nn.functional.linear(x, weight, bias)
            rows = x.reshape(-1, self.in_features).float()  # (B*T, in)
            if self.input_order is not None:
                rows = rows.index_select(1, self.input_order)
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(
                rows, self.int4pack, self.group_size, self.int4pack_grid
            )  # (B*T, out)
            if bias is not None:
                out = out + bias.float()
            return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

        def packed_bytes(self) -> int:
            """Bytes of the stored weight: packed codes, scales, zero points, group indices."""
            tensors = (self.qweight, self.scales, self.qzeros, self.g_idx)
            return sum(t.numel() * t.element_size() for t in tensors if t is not None)

        def read_bytes(self) -> int:
            """Bytes of weight one forward call reads: the float copy with the
            ``dequantized`` kernel, the packed buffers (or their repacked form) otherwise."""
            if self.kernel == "dequantized":
                return self.dequantized.numel() * self.dequantized.element_size()
            if self.kernel == "int4pack":
                tensors = (self.int4pack, self.int4pack_grid, self.input_order)
                return sum(t.numel() * t.element_size() for t in tensors if t is not None)
            return self.packed_bytes()

        def weight_counts(self) -> tuple[int, int]:
            """(weight elements this layer stands for, of which nonzero after dequantizing)."""
            return self.in_features * self.out_features, int(
                self.dequantized_weight().count_nonzero()
            )

        def extra_repr(self) -> str:
            group = self.group_size or "channel"
            return (
                f"{self.in_features}, {self.out_features}, int{self.bits}, group={group}, "
                f"kernel={self.kernel}"
            )

    return QuantizedLinear


# ------------------------------------------------------------------------ writing


def write_quantization_config(
    out_dir: Path,
    *,
    method: str,
    bits: int,
    group_size: int | None,
    symmetric: bool,
    modules: list[str],
    options: dict[str, Any],
) -> None:
    from unbottle.core.store.artifacts import write_json_atomic

    write_json_atomic(
        Path(out_dir) / QUANT_CONFIG,
        {
            "format": FORMAT,
            "version": _CONFIG_VERSION,
            "method": method,
            "bits": bits,
            "group_size": group_size,
            "symmetric": symmetric,
            # How to read the tensors back (documented in core/compression/grids.py and above).
            "packing": f"{8 // bits} codes per uint8, first in the low bits, along in",
            "zero_point": 2 ** (bits - 1) if symmetric else "qzeros",
            "modules": modules,
            "options": options,
        },
    )


#: The weights file's safetensors metadata. Its ``format`` is not one transformers
#: accepts ("pt", "tf", "flax", "mlx"), so ``from_pretrained`` on a packed directory
#: raises ("Incompatible safetensors file ... but unbottle-packed") rather than loading
#: the config's Linear layers with random weights; safetensors itself ignores it. The
#: ``hf`` deploy target rewrites the variant as a checkpoint transformers does load
#: (core/models/compressed_checkpoint.py).
SAFETENSORS_METADATA = {"format": "unbottle-packed", "unbottle": FORMAT}


def save_packed(
    model: Any,
    tokenizer: Any,
    quantized: dict[str, QuantizedWeight],
    out_dir: Path,
    *,
    method: str,
    group_size: int | None,
    symmetric: bool,
    options: dict[str, Any],
    source_dir: Path | None = None,
) -> dict[str, float]:
    """Write ``model`` with the Linears in ``quantized`` packed, into ``out_dir``.

    ``model`` is modified: those Linears are replaced by :class:`QuantizedLinear`. The
    generation config is copied from ``source_dir`` when it has one. Returns size facts:
    ``linear_size_ratio`` (stored bytes of the quantized Linears over their float32
    bytes), ``file_bytes`` and ``quantized_layers``.
    """
    import shutil

    from safetensors.torch import save_file

    if not quantized:
        raise ValueError("save_packed: no quantized layers")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    bits = {q.bits for q in quantized.values()}
    if len(bits) != 1:
        raise ValueError(f"save_packed: one bit width per model, got {sorted(bits)}")
    packed_bytes = float_bytes = 0
    for name, q in quantized.items():
        linear = model.get_submodule(name)
        # The model is only written from here: no float copy (kernel on-the-fly).
        layer = _quantized_linear_class().from_quantized(
            q, group_size, linear.bias, kernel="on-the-fly"
        )
        model.set_submodule(name, layer)
        packed_bytes += layer.packed_bytes()
        float_bytes += layer.in_features * layer.out_features * 4
    tensors: dict[str, Any] = {}
    seen: set[tuple[int, tuple[int, ...]]] = set()
    for key, tensor in model.state_dict().items():
        identity = (tensor.data_ptr(), tuple(tensor.shape))
        if identity in seen and tensor.numel():
            continue  # a tied matrix is stored once (the loader ties it again)
        seen.add(identity)
        tensors[key] = tensor.detach().contiguous()
    # Not "pt": plain transformers refuses a safetensors file of another format, so it
    # fails loudly on this directory instead of building random Linear layers.
    save_file(tensors, str(out_dir / WEIGHTS), metadata=SAFETENSORS_METADATA)
    model.config.save_pretrained(out_dir)
    if source_dir is not None and (Path(source_dir) / "generation_config.json").is_file():
        shutil.copy2(Path(source_dir) / "generation_config.json", out_dir)
    tokenizer.save_pretrained(out_dir)
    write_quantization_config(
        out_dir,
        method=method,
        bits=bits.pop(),
        group_size=group_size,
        symmetric=symmetric,
        modules=sorted(quantized),
        options=options,
    )
    return {
        "linear_size_ratio": packed_bytes / float_bytes,
        "file_bytes": (out_dir / WEIGHTS).stat().st_size,
        "quantized_layers": len(quantized),
    }


# ------------------------------------------------------------------------ reading


def read_quantization_config(model_dir: Path) -> dict[str, Any]:
    path = Path(model_dir) / QUANT_CONFIG
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: unreadable quantization config ({e})") from None
    if config.get("format") != FORMAT or config.get("bits") not in (1, 2, 4, 8):
        raise DataError(
            f"{path}: not a packed quantization config (format {config.get('format')!r}, "
            f"bits {config.get('bits')!r})"
        )
    return config


def load_packed(model_dir: Path, kernel: str = KERNELS[0]) -> tuple[Any, Any]:
    """A packed model with :class:`QuantizedLinear` layers, and its tokenizer.

    ``kernel``: how the layers multiply (:data:`KERNELS`; the module docstring says
    what each costs).

    The model is built from its config with empty (meta) parameters, so no float copy of
    the quantized weights is ever allocated; the file's tensors are then assigned.
    """
    import torch
    from accelerate import init_empty_weights
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(model_dir)
    meta = read_quantization_config(model_dir)
    bits, group_size = int(meta["bits"]), meta["group_size"]
    # The copy: load_file's tensors are views of the file's mapping, in pages that huge
    # pages never back (loading.into_process_memory says what that costs a decode step).
    state = {name: t.clone() for name, t in load_file(str(model_dir / WEIGHTS)).items()}
    config = AutoConfig.from_pretrained(model_dir)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    for name in meta["modules"]:
        try:
            linear = model.get_submodule(name)
            qweight = state.pop(f"{name}.qweight")
            scales = state.pop(f"{name}.scales")
        except (AttributeError, KeyError):
            raise DataError(
                f"{model_dir}: quantized module {name} is missing from the model or its weights"
            ) from None
        layer = _quantized_linear_class()(
            linear.in_features,
            linear.out_features,
            bits=bits,
            group_size=group_size,
            qweight=qweight,
            scales=scales,
            qzeros=state.pop(f"{name}.qzeros", None),
            g_idx=state.pop(f"{name}.g_idx", None),
            bias=state.pop(f"{name}.bias", None),
            kernel=kernel,
        )
        _check_shapes(layer, name, model_dir)
        model.set_submodule(name, layer)
    _, unexpected = model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    still_empty = [n for n, p in model.named_parameters() if p.is_meta]
    if unexpected or still_empty:
        what = unexpected[0] if unexpected else f"{still_empty[0]} (missing)"
        raise DataError(f"{model_dir}/{WEIGHTS}: {what} does not fit the model's config")
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return model, tokenizer


def _check_shapes(layer: Any, name: str, model_dir: Path) -> None:
    from unbottle.core.compression.grids import packed_length

    out, n, g, bits = layer.out_features, layer.in_features, layer.groups, layer.bits
    expected = {
        "qweight": (out, packed_length(n, bits)),
        "scales": (out, g),
        "qzeros": (out, packed_length(g, bits)),
        "g_idx": (n,),
    }
    for key, shape in expected.items():
        tensor = getattr(layer, key)
        if tensor is not None and tuple(tensor.shape) != shape:
            raise DataError(
                f"{model_dir}/{WEIGHTS}: {name}.{key} has shape {tuple(tensor.shape)}, "
                f"expected {shape}"
            )
    if layer.g_idx is not None and not 0 <= int(layer.g_idx.min()) <= int(layer.g_idx.max()) < g:
        raise DataError(f"{model_dir}/{WEIGHTS}: {name}.g_idx names groups outside 0..{g - 1}")
