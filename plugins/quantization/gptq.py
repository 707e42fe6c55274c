"""GPTQ: quantize each Linear so its *outputs* on calibration data change least.

Frantar, Ashkboos, Hoefler & Alistarh, 2022, "GPTQ: Accurate Post-Training Quantization
for Generative Pre-trained Transformers" (arXiv:2210.17323), building on Optimal Brain
Quantization (Frantar & Alistarh, 2022). For a layer with weight W (out, in) and inputs
X (in, tokens), GPTQ minimises ||W X - Q X||^2 over quantized Q, one input column at a
time: column j is rounded to its grid, and the error it leaves is spread over the
columns not yet quantized, in proportion to the inverse of H = 2 X X^T:

    err = (w_j - q_j) / [H^-1]_jj          W[:, j+1:] -= err [H^-1]_{j, j+1:}

after which column j is removed from H^-1. As in the paper:

- the inverse Hessian's updates for all remaining columns are read off one upper
  Cholesky factor of H^-1 (section 3, "Cholesky reformulation"), computed once per layer
  from H + damp * mean(diag H) * I (the dampening keeps it positive definite; the
  factorisation is retried with 10x the damping if it still fails);
- columns are processed in blocks of ``block_size``: updates inside a block are applied
  at once per column, those to the columns after it once per block ("lazy batch
  updates"). unbottle applies the same idea once more inside a block: a column's update
  goes at once only to its sub-block of 16 columns, and to the rest of the block once
  per sub-block, so the per-column work stays in cache (the result is the paper's, up
  to the order of floating-point sums);
- input columns never active in the calibration data (diag H = 0) get weight 0 and
  H_jj = 1, as in the reference code.

Options beyond the paper's core, all from its reference implementation:

- groups (``group_size``): a group's grid is fitted when GPTQ reaches its first column,
  on the weights *as updated so far*, so the grid absorbs the compensation of the
  earlier columns. Blocks are made a multiple of the group size, so a group's columns
  are always up to date when its grid is fitted.
- activation order (``act_order``, "desc_act"): columns are processed in order of
  decreasing H_jj (the input features with the largest activations first, while most
  columns remain to absorb their error). With groups, group k is then the k-th run of
  ``group_size`` columns *in that order*: its grid is computed in the permuted order, and
  ``g_idx[j]`` records, per original column j, which group's grid it uses.
  ``static_groups`` instead fits every group's grid up front on contiguous original
  columns, so no ``g_idx`` is needed (at some cost in accuracy).
- weights that are already exactly zero (pruned by an earlier step of the chain) stay
  zero: their code is the zero point, and the error of moving them there is spread like
  any other column's, as SparseGPT (Frantar & Alistarh, 2023) does when it sparsifies
  and quantizes jointly. Without this, the updates moved pruned weights off zero and
  broke a 2:4 pattern.
- the clipping search of :func:`unbottle.compression.fit_grid` (``clip_search``), with
  each column's squared error weighted by H_jj: the diagonal of the output error the
  layer minimises, so that clipping spares the weights of the most active inputs.

The model is quantized block by block through
:func:`unbottle.compression.calibrate_sequentially`: each layer's Hessian
comes from inputs computed with every earlier layer already quantized, and the dequantized weights
are written into the model as it goes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from unbottle import ConfigError
from unbottle.compression import (
    DampedHessian,
    QuantizedWeight,
    Scheme,
    clamp_codes,
    damped_hessian_factor,
    fit_grid,
    one_thread,
    weight_error,
)

if TYPE_CHECKING:
    import torch

    from unbottle.compression import InputStats


@dataclass
class LayerResult:
    quantized: QuantizedWeight
    weight: torch.Tensor  # (out, in) float32: the dequantized weight
    #: GPTQ's own account of the error it left, per output row: the sum over columns of
    #: the squared rounding errors scaled by the inverse Hessian's Cholesky diagonal,
    #: which adds up to tr((W - Q) H' (W - Q)^T) for the damped Hessian H' (in the units
    #: of the H given).
    row_loss: torch.Tensor  # (out,)

    @property
    def loss(self) -> float:
        return float(self.row_loss.sum())

    def rows(self, start: int, stop: int) -> LayerResult:
        """The result for output rows [start, stop): GPTQ treats rows independently, so
        layers fed the same input can be quantized as one stacked matrix and split."""
        q = self.quantized
        return LayerResult(
            QuantizedWeight(
                codes=q.codes[start:stop].clone(),
                scales=q.scales[start:stop].clone(),
                zeros=None if q.zeros is None else q.zeros[start:stop].clone(),
                # A copy each: tensors sharing storage would be saved once, as if tied.
                g_idx=None if q.g_idx is None else q.g_idx.clone(),
                bits=q.bits,
            ),
            self.weight[start:stop].clone(),
            self.row_loss[start:stop].clone(),
        )


def gptq_layer(
    weight: torch.Tensor,
    hessian: DampedHessian,
    scheme: Scheme,
    *,
    static_groups: bool = False,
    block_size: int = 128,
) -> LayerResult:
    """Quantize one weight matrix (out, in) with GPTQ against a prepared Hessian.

    The clipping search (``scheme.clip_search``) weighs each column's squared error by
    H_jj, the diagonal of the layer's output error, rather than counting weights alike.
    """
    import torch

    W = weight.detach().float().clone()  # (out, in)
    out, n = W.shape
    W[:, hessian.dead] = 0.0
    perm = hessian.perm
    length = scheme.group_length(n)
    groups = n // length
    grouped = scheme.group_size is not None
    scales = torch.zeros(out, groups)
    zeros = torch.zeros(out, groups)
    diag = None  # H_jj in original column order, for the clipping search
    if scheme.clip_search:
        diag = hessian.diag if perm is None else hessian.diag[torch.argsort(perm)]
    if not grouped or static_groups:
        # Grids fitted once, before any update, on contiguous original columns.
        rows = W.reshape(out * groups, length)  # (out*G, group)
        importance = None if diag is None else diag.reshape(groups, length).repeat(out, 1)
        scale, zero = fit_grid(rows, scheme, importance)
        scales, zeros = scale.reshape(out, groups), zero.reshape(out, groups)
    # The group of each processed (permuted) column, in the grids' numbering.
    if not grouped:
        group_of = torch.zeros(n, dtype=torch.long)
    elif static_groups:
        group_of = (perm if perm is not None else torch.arange(n)) // length
    else:
        group_of = torch.arange(n) // length
    if grouped:
        block_size = max(1, block_size // length) * length  # groups never straddle blocks

    # Transposed, a column of W is a contiguous row: the loop's many small ops run on
    # contiguous memory. Rows in processing order.
    Wt = W.T.contiguous() if perm is None else W.T.index_select(0, perm)  # (in, out)
    # Weights already exactly zero were pruned (a chain: prune, then quantize): they stay
    # zero, code = zero point, and their error is spread like any other (SparseGPT's
    # joint sparsification and quantization); a dense layer has none to hold.
    pruned = Wt == 0  # (in, out), processing order
    has_zeros = pruned.any(dim=1).tolist()  # per column: only those pay for the fill
    codes = torch.zeros(n, out)  # (in, out): q - z during the loop, in processing order
    scales_t, zeros_t = scales.T.contiguous(), zeros.T.contiguous()  # (G, out)
    group_list = group_of.tolist()
    fit_in_loop = grouped and not static_groups
    # Within a block, columns go in sub-blocks of ``step``: a column's rounding error is
    # spread at once only over its own sub-block (a small slab that stays in cache), and
    # over the rest of the block once per sub-block, as one matrix product. A sub-block
    # never straddles a group, so a grid fitted at a group's first column sees every
    # update of the columns before it.
    step = _sub_block(length if fit_in_loop else block_size)
    Hinv = hessian.hinv_chol
    row_loss = torch.zeros(out)
    with one_thread():  # thousands of small ops: a thread pool's hand-offs cost more
        for i1 in range(0, n, block_size):
            i2 = min(i1 + block_size, n)
            block = Wt[i1:i2]  # (B, out) view, kept up to date
            # Per column, w minus its dequantized value, divided by the column's pivot
            # [H^-1]_jj once its sub-block is done: the error GPTQ spreads.
            errors = torch.empty_like(block)
            Hinv1 = Hinv[i1:i2, i1:i2]
            pivots = Hinv1.diagonal()
            scale_by = (-1.0 / pivots).tolist()
            grid_of = -1
            for j1 in range(0, i2 - i1, step):
                j2 = min(j1 + step, i2 - i1)
                first = i1 + j1
                if fit_in_loop and first % length == 0:
                    g = group_list[first]
                    importance = None if diag is None else hessian.diag[first : first + length]
                    group = block[j1 : j1 + length].T.contiguous()  # (out, group)
                    scales_t[g], zeros_t[g] = fit_grid(group, scheme, importance)
                    grid_of = -1
                slab = block[j1:j2]  # (S, out)
                # Hinv1 is upper triangular: row i of the slab's own part is zero left of
                # the diagonal, so updating the whole slab leaves the columns already
                # done alone (all but column i itself, which is never read again).
                columns = zip(
                    slab.unbind(0),
                    errors[j1:j2].unbind(0),
                    codes[first : i1 + j2].unbind(0),
                    Hinv1[j1:j2, j1:j2].unbind(0),
                    range(first, i1 + j2),
                    strict=True,
                )
                for w, err, code, h_row, col in columns:
                    g = group_list[col]
                    if g != grid_of:
                        s, z = scales_t[g], zeros_t[g]  # (out,)
                        low, high = -z, scheme.maxq - z
                        grid_of = g
                    # q - z = clamp(round(w / s), -z, maxq - z): one rounding gives both
                    # the code and the error.
                    clamp_codes(torch.div(w, s, out=code).round_(), low, high)
                    if has_zeros[col]:
                        code.masked_fill_(pruned[col], 0.0)
                    torch.addcmul(w, code, s, value=-1.0, out=err)  # w - (q - z) * s
                    slab.addr_(h_row, err, alpha=scale_by[col - i1])
                done = errors[j1:j2].div_(pivots[j1:j2, None])  # (S, out)
                block[j2:].addmm_(Hinv1[j1:j2, j2:].T, done, alpha=-1)
            Wt[i2:].addmm_(Hinv[i1:i2, i2:].T, errors, alpha=-1)  # the lazy batch update
            row_loss += errors.pow(2).sum(dim=0)
    codes.add_(zeros_t[group_of])  # q = (q - z) + z, each column with its group's z

    g_idx = None
    if perm is not None:
        inverse = torch.argsort(perm)
        codes = codes.index_select(0, inverse)  # rows back in the original column order
        if grouped and not static_groups:
            g_idx = group_of[inverse].to(torch.int32)  # column j -> its group's grid
    codes, scales, zeros = codes.T, scales_t.T, zeros_t.T  # (out, in), (out, G) each
    quantized = QuantizedWeight(
        codes=codes.to(torch.uint8),
        scales=scales.half(),
        zeros=None if scheme.symmetric else zeros.to(torch.uint8),
        g_idx=g_idx,
        bits=scheme.bits,
    )
    return LayerResult(quantized, quantized.dequantize(), row_loss)


def _sub_block(length: int, most: int = 16) -> int:
    """The largest divisor of ``length`` that is at most ``most``."""
    return next(d for d in range(min(most, length), 0, -1) if length % d == 0)


def output_error(
    original: torch.Tensor, result: LayerResult, hessian: DampedHessian, raw: torch.Tensor
) -> float:
    """||W X - Q X||^2 / ||W X||^2, the layer's relative output error on its inputs.

    ``raw`` is H = sum x x^T as collected. GPTQ's loss is the error for the damped H,
    tr(D (H + a I) D^T) with D = W - Q, so the error for H itself is the loss minus
    a ||D||^2: one matrix product (for ||W X||^2) instead of two.
    """
    delta = original.float() - result.weight  # (out, in)
    delta[:, hessian.dead] = 0.0  # inputs never active: no output error, whatever D is
    error = result.loss - hessian.damp_added * float(delta.pow(2).sum())
    w = original.float()
    reference = float(((w @ raw) * w).sum())
    return max(error, 0.0) / reference if reference > 0 else 0.0


def gptq_model(
    model: Any,
    calibration: Sequence[torch.Tensor],
    layers: Sequence[tuple[str, Any]],
    scheme: Scheme,
    *,
    act_order: bool = False,
    static_groups: bool = False,
    damp: float = 0.01,
    block_size: int = 128,
    batch_size: int = 8,
) -> tuple[dict[str, QuantizedWeight], dict[str, float]]:
    """Quantize ``layers`` of ``model`` in place, block by block; return their codes.

    Each selected Linear's weight is replaced by its dequantized GPTQ weight, so later
    layers are calibrated on the quantized earlier ones. Returns the quantized weights
    by module name and metrics: the mean and max relative output error of the layers on
    the calibration inputs they saw, their mean relative weight error and the largest
    damping used. ``layers`` may include the output head (last, from the final norm of the
    quantized stack's outputs); untie it from the embeddings first (``output_head``).
    """
    from unbottle.compression import architecture_of, calibrate_sequentially

    selected = {name for name, _ in layers}
    results: dict[str, QuantizedWeight] = {}
    errors: list[float] = []
    weight_errors: list[float] = []
    damps: list[float] = []

    def process(group: Sequence[tuple[str, Any]], stats: InputStats) -> None:
        import torch

        prepared = damped_hessian_factor(stats.hessian, damp, act_order=act_order)
        # Layers fed the same input (q/k/v, gate/up) share H, and GPTQ quantizes each
        # output row on its own: one pass over the stacked weights gives each layer the
        # same result as its own pass, in fewer, larger ops.
        stacked = torch.cat([linear.weight.detach() for _, linear in group])
        result = gptq_layer(
            stacked, prepared, scheme, static_groups=static_groups, block_size=block_size
        )
        start = 0
        for name, linear in group:
            stop = start + linear.weight.shape[0]
            own = result.rows(start, stop)
            start = stop
            errors.append(output_error(linear.weight, own, prepared, stats.hessian))
            weight_errors.append(weight_error(linear.weight, own.weight))
            damps.append(prepared.damp)
            linear.weight.copy_(own.weight.to(linear.weight.dtype))
            results[name] = own.quantized

    calibrate_sequentially(
        model,
        calibration,
        process_together=process,
        select=selected.__contains__,
        hessian=True,
        head=architecture_of(model).head in selected,
        batch_size=batch_size,
        desc="gptq",
    )
    missed = sorted(selected - set(results))
    if missed:  # a Linear outside the q/k/v/o and gate/up/down projections of a block
        raise ConfigError(
            f"gptq.layers: selects {missed[0]}, which the block-by-block pass does not reach; "
            "gptq quantizes the attention and MLP projections of Llama-family blocks (and "
            "the output head, with quantize_head)"
        )
    return results, {
        "mean_layer_output_error": sum(errors) / len(errors),
        "max_layer_output_error": max(errors),
        "mean_weight_error": sum(weight_errors) / len(weight_errors),
        "max_damp": max(damps),
    }
