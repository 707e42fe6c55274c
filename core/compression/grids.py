"""Integer weight grids, round-to-nearest quantization and bit packing.

A weight matrix W (out, in) is quantized on a uniform integer grid, one grid per *group*:
either a whole output row (per channel) or each run of ``group_size`` consecutive input
columns of a row (per group, the scheme of GPTQ, Frantar et al. 2022, and AWQ, Lin et
al. 2023). A group's grid is a scale s and a zero point z; a weight w is stored as the
unsigned code

    q = clamp(round(w / s) + z, 0, 2^bits - 1)        and read back as  (q - z) * s.

- Asymmetric grids fit the group's range [min(w, 0), max(w, 0)]:
  s = (max - min) / (2^bits - 1), z = round(-min / s), both stored.
- Symmetric grids centre on zero: z = 2^(bits-1) for every group (not stored) and
  s = 2 max|w| / (2^bits - 1), the choice of the GPTQ reference code, which keeps both
  -max|w| and +max|w| within half a step of the grid.

Without clipping every weight lies within half a step (s / 2) of its grid. Clipping
trades that bound on the few largest weights for a finer step on all the others:
``clip_search`` tries shrinking the group's range by factors from 1 down to
``clip_min`` and keeps, per group, the one with the least squared error (optionally
weighted per input column, e.g. by the diagonal of the layer's input Hessian). This is
the ``mse`` option of the GPTQ reference implementation and the clipping search of AWQ.

Scales are stored as float16, so the grid is computed with the scale rounded *up* to a
float16 (rounding down would push the group's extremes off the grid): what is quantized
against is exactly what the packed model dequantizes to.

Packing (:func:`pack` / :func:`unpack`): codes of ``bits`` in {1, 2, 4, 8} go
``8 // bits`` to a uint8 byte along the last dimension, the first code in the lowest bits
(int4: column 2k in the low nibble of byte k, column 2k+1 in the high nibble); a row whose
length is not a multiple is padded with zero codes, and unpacking cuts them off. Asymmetric
zero points are packed the same way. The round trip is bit-exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from unbottle.core.contract.errors import ConfigError

if TYPE_CHECKING:
    import torch

# The smallest positive float16 (a subnormal): a scale below it would be stored as zero.
_MIN_SCALE = 2.0**-24
#: The clipping search evaluates candidates in chunks of about this many weights: a
#: chunk's intermediates (256 KB each) stay in a core's cache. Summed over GPTQ's calls
#: on SmolLM2-135M's shapes, the search took about half the time of 2 MB chunks, and a
#: quarter of one pass over all 20 candidates (ad-hoc timings, one thread).
_CLIP_SEARCH_ELEMENTS = 2**16


@dataclass(frozen=True)
class Scheme:
    """How a weight matrix is quantized: bits, group size, grid shape, clipping."""

    bits: int = 4
    #: Input columns per group; None: one group per output row (per channel).
    group_size: int | None = None
    symmetric: bool = False
    clip_search: bool = False
    #: Shrink factors tried by the clipping search: ``clip_grid`` of them, from 1 down to
    #: ``clip_min``.
    clip_grid: int = 20
    clip_min: float = 0.5

    def __post_init__(self) -> None:
        if not 1 <= self.bits <= 8:
            raise ValueError(f"bits: {self.bits}; 1 to 8 supported")
        if self.group_size is not None and self.group_size < 1:
            raise ValueError(f"group_size: {self.group_size}; a positive integer or None")

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    @property
    def symmetric_zero(self) -> int:
        return 2 ** (self.bits - 1)

    def group_length(self, in_features: int) -> int:
        return self.group_size or in_features

    def groups(self, in_features: int) -> int:
        return in_features // self.group_length(in_features)


def fit_grid(
    w: torch.Tensor, scheme: Scheme, importance: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The scale and zero point of each row of ``w`` (rows, n), one grid per row.

    Returns (scale, zero), each (rows,) float32; scales are float16-representable and
    zeros are integers in [0, maxq]. ``importance``, (n,) or (rows, n), weighs each
    weight's squared error in the clipping search.
    """
    import torch

    w = w.float()
    low = w.min(dim=1).values.clamp(max=0)  # (rows,)
    high = w.max(dim=1).values.clamp(min=0)
    if not scheme.clip_search:
        return _grid(low, high, scheme)
    # Every shrink factor at once, as a leading dimension of c candidates: GPTQ fits a
    # grid at each group boundary of its column loop, so one call per group must be a
    # handful of ops, not a Python loop over the candidates. Chunked to stay in cache.
    shrinks = torch.linspace(1.0, scheme.clip_min, scheme.clip_grid)[:, None]  # 1.0 first
    scales, zeros = _grid(low * shrinks, high * shrinks, scheme)  # (c, rows) each
    chunk = max(1, _CLIP_SEARCH_ELEMENTS // max(w.numel(), 1))
    errors = torch.cat(
        [
            _squared_error(w, scales[i : i + chunk], zeros[i : i + chunk], scheme, importance)
            for i in range(0, len(shrinks), chunk)
        ]
    )  # (c, rows)
    # argmin keeps the first of equal errors: the widest range, unless a shrink is better.
    best = errors.argmin(dim=0, keepdim=True)  # (1, rows)
    return scales.gather(0, best)[0], zeros.gather(0, best)[0]


def _grid(
    low: torch.Tensor, high: torch.Tensor, scheme: Scheme
) -> tuple[torch.Tensor, torch.Tensor]:
    import torch

    if scheme.symmetric:
        scale = _float16_ceil(2 * torch.maximum(-low, high) / scheme.maxq)
        return scale, torch.full_like(scale, float(scheme.symmetric_zero))
    scale = _float16_ceil((high - low) / scheme.maxq)
    zero = torch.round(-low / scale).clamp(0, scheme.maxq)
    return scale, zero


def _float16_ceil(scale: torch.Tensor) -> torch.Tensor:
    """The smallest float16 >= each scale (and >= the smallest float16 > 0), as float32."""
    import torch

    scale = scale.clamp(min=_MIN_SCALE)
    half = scale.half()
    up = torch.nextafter(half, torch.full_like(half, float("inf")))
    return torch.where(half.float() < scale, up, half).float()


def _squared_error(
    w: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    scheme: Scheme,
    importance: torch.Tensor | None,
) -> torch.Tensor:
    """Squared error of ``w`` (rows, n) on each grid; ``scale``/``zero`` (..., rows).

    With t = w / s + z (z is an integer), the dequantized weight is
    (clamp(round(t), 0, maxq) - z) * s, so its error is s * (clamp(round(t), 0, maxq) - t):
    a clamp to constant bounds, which ran 15-20% faster over the whole search than
    clamping round(w / s) to [-z, maxq - z] (a minimum and a maximum against tensors),
    and than computing t in one ``addcdiv`` (ad-hoc timings, one thread).
    """
    import torch

    scale, zero = scale[..., None], zero[..., None]  # (..., rows, 1)
    shifted = torch.div(w, scale).add_(zero)  # (..., rows, n)
    err = torch.round(shifted).clamp_(0, scheme.maxq).sub_(shifted).square_()
    if importance is None:
        total = err.sum(dim=-1)
    elif importance.dim() == 1:
        total = err @ importance  # (..., rows)
    else:
        total = err.mul_(importance).sum(dim=-1)
    return total * scale[..., 0].square()


def clamp_codes(codes: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """``codes`` clamped in place to [low, high], tensors broadcast against it.

    ``torch.clamp_`` with tensor bounds ran 6x slower than a maximum and a minimum here.
    """
    import torch

    return torch.minimum(torch.maximum(codes, low, out=codes), high, out=codes)


def quantize_codes(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int
) -> torch.Tensor:
    """Integer codes (as float) of ``w`` on the grid (scale, zero), broadcast against it."""
    import torch

    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> Any:
    """The weights the codes stand for: (q - z) * s, in float32, broadcast like ``codes``.

    Computed in place on a fresh float copy of the codes: out of place, torch's
    broadcasting of a (rows, 1) operand ran ten times slower.
    """
    import torch

    weights = codes.to(torch.float32, copy=True)
    return weights.sub_(zero.float()).mul_(scale.float())


@dataclass
class QuantizedWeight:
    """One Linear's weight as integer codes with their grids.

    ``codes`` (out, in) uint8 holds unsigned codes in original column order. ``scales``
    (out, G) float16 and ``zeros`` (out, G) uint8 hold one grid per group (``zeros`` is
    None for symmetric grids, whose zero point is 2^(bits-1)). Column j belongs to group
    ``g_idx[j]``, or to ``j // group_length`` when ``g_idx`` is None (contiguous groups;
    GPTQ's activation order without static groups makes them non-contiguous).
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    g_idx: torch.Tensor | None
    bits: int

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    def zero_points(self) -> torch.Tensor:
        """(out, G) zero points, filled in for symmetric grids."""
        import torch

        if self.zeros is not None:
            return self.zeros
        return torch.full(self.scales.shape, 2 ** (self.bits - 1), dtype=torch.uint8)

    def dequantize(self) -> torch.Tensor:
        """(out, in) float32 weight."""
        return dequantize_groups(self.codes, self.scales, self.zero_points(), self.g_idx)


def dequantize_groups(
    codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor | None
) -> torch.Tensor:
    """(out, in) codes with (out, G) scales and zero points -> (out, in) float32 weights.

    The one formula both the quantizers (for the weights later layers calibrate on) and
    the packed model's layers use, so the two agree to the bit.
    """
    out, n = codes.shape
    groups = scales.shape[1]
    if g_idx is not None:
        # Each column's grid, gathered (index_select: advanced indexing along dim 1 was
        # several times slower).
        g = g_idx.long()
        return dequantize_codes(
            codes, scales.float().index_select(1, g), zeros.float().index_select(1, g)
        )
    grouped = codes.reshape(out, groups, n // groups)  # (out, G, group)
    return dequantize_codes(grouped, scales[..., None], zeros[..., None]).reshape(out, n)


def quantize_rtn(
    weight: torch.Tensor, scheme: Scheme, importance: torch.Tensor | None = None
) -> QuantizedWeight:
    """Round each weight to the nearest point of its group's grid.

    ``importance`` (in,) weighs each input column's squared error in the clipping search
    (e.g. the diagonal of the layer's input Hessian); ignored without ``clip_search``.
    """
    import torch

    out, n = weight.shape
    length = scheme.group_length(n)
    rows = weight.detach().float().reshape(out * (n // length), length)  # (out*G, group)
    if importance is not None:
        importance = importance.float().reshape(1, n // length, length).expand(out, -1, -1)
        importance = importance.reshape(out * (n // length), length)  # like rows
    scale, zero = fit_grid(rows, scheme, importance)
    codes = quantize_codes(rows, scale[:, None], zero[:, None], scheme.maxq)
    groups = n // length
    return QuantizedWeight(
        codes=codes.to(torch.uint8).reshape(out, n),
        scales=scale.half().reshape(out, groups),
        zeros=None if scheme.symmetric else zero.to(torch.uint8).reshape(out, groups),
        g_idx=None,
        bits=scheme.bits,
    )


def weight_error(original: torch.Tensor, quantized: torch.Tensor) -> float:
    """||W - Q||_F / ||W||_F."""
    import torch

    norm = float(torch.linalg.norm(original.float()))
    return float(torch.linalg.norm(original.float() - quantized.float())) / max(norm, 1e-12)


# ------------------------------------------------------------------------- packing


def _per_byte(bits: int) -> int:
    if bits not in (1, 2, 4, 8):
        raise ValueError(f"cannot pack {bits}-bit codes into bytes; 1, 2, 4 or 8 bits")
    return 8 // bits


def packed_length(n: int, bits: int) -> int:
    """Bytes that ``n`` codes of ``bits`` take."""
    per = _per_byte(bits)
    return -(-n // per)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(..., n) uint8 codes < 2^bits -> (..., ceil(n * bits / 8)) uint8, low bits first."""
    import torch

    per = _per_byte(bits)
    codes = codes.to(torch.uint8)
    if per == 1:
        return codes.contiguous()
    n = codes.shape[-1]
    pad = packed_length(n, bits) * per - n
    if pad:
        codes = torch.nn.functional.pad(codes, (0, pad))
    lanes = codes.reshape(*codes.shape[:-1], -1, per)  # (..., bytes, per)
    packed = torch.zeros(lanes.shape[:-1], dtype=torch.uint8)
    for k in range(per):
        packed |= lanes[..., k] << (bits * k)
    return packed


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """The inverse of :func:`pack`: (..., bytes) uint8 -> (..., n) uint8 codes."""
    import torch

    per = _per_byte(bits)
    if per == 1:
        return packed[..., :n]
    mask = 2**bits - 1
    lanes = torch.stack([(packed >> (bits * k)) & mask for k in range(per)], dim=-1)
    return lanes.reshape(*packed.shape[:-1], -1)[..., :n]  # (..., bytes * per) -> (..., n)


# ------------------------------------------------------------------ layer selection


def check_group_size(layers: list[tuple[str, Any]], scheme: Scheme, what: str) -> None:
    """Every selected layer's input size must split into whole groups."""
    if scheme.group_size is None:
        return
    for name, module in layers:
        if module.in_features % scheme.group_size:
            sizes = sorted({m.in_features for _, m in layers})
            raise ConfigError(
                f"{what}.group_size: {scheme.group_size} does not divide the input size "
                f"{module.in_features} of {name}; use a divisor of every selected layer's "
                f"input size ({', '.join(map(str, sizes))}) or null for per channel"
            )
