"""SparseGPT: one-shot pruning of a Linear layer with second-order weight updates.

Frantar & Alistarh, 2023, "SparseGPT: Massive Language Models Can Be Accurately Pruned
in One-Shot" (ICML). For a layer y = W x and calibration inputs X, SparseGPT looks for a
sparse W' that keeps ||W X - W' X||^2 small. It visits the input columns left to right;
when it zeroes (or keeps) a weight it spreads that weight's error over the columns not
yet visited by the Optimal Brain Surgeon update

    W[:, j:] -= (w_j - w'_j) / [H^-1]_jj * [H^-1]_{j, j:}

with H = X X^T (+ damping), using the rows of the upper Cholesky factor of H^-1, which
are exactly the inverse Hessians of the remaining columns (the paper's Algorithm 1,
shared with GPTQ). The errors of a block of ``blocksize`` columns are applied to the
columns right of it in one matrix product ("lazy batch updates").

Which weights to zero is decided per block of columns ("adaptive mask selection"): at
the start of each block, the weights with the smallest OBS saliency w^2 / [H^-1]_jj^2
are picked among the block's, already updated by the blocks before it. For N:M
sparsity the choice is made per group of M columns, M - N weights in each row.

Unlike the reference code, the number of zeros is exact: a layer's budget is split over
its blocks in proportion to their widths, so the achieved sparsity is the asked one.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import TYPE_CHECKING

from unbottle.compression import one_thread

if TYPE_CHECKING:
    import torch


def sparsegpt_prune(
    weight: torch.Tensor,
    hinv: torch.Tensor,
    *,
    zeros: int | None = None,
    pattern: tuple[int, int] | None = None,
    blocksize: int = 128,
) -> torch.Tensor:
    """The pruned and updated copy of ``weight`` (out, in).

    ``hinv`` is the upper Cholesky factor of the layer's damped inverse Hessian
    (:func:`unbottle.compression.damped_hessian_factor`'s ``hinv_chol``). Give either
    ``zeros``, the exact number of weights to zero (unstructured), or ``pattern`` (N, M):
    at most N nonzeros in every M consecutive input weights of each row.
    """
    budgets = None if zeros is None else [zeros]
    return sparsegpt_prune_together(
        [weight], hinv, zeros=budgets, pattern=pattern, blocksize=blocksize
    )[0]


def sparsegpt_prune_together(
    weights: Sequence[torch.Tensor],
    hinv: torch.Tensor,
    *,
    zeros: Sequence[int] | None = None,
    pattern: tuple[int, int] | None = None,
    blocksize: int = 128,
) -> list[torch.Tensor]:
    """:func:`sparsegpt_prune` of layers fed the same input (q/k/v, gate/up), in one pass.

    ``weights`` (out_i, in) share ``hinv``; ``zeros`` gives each layer's own budget.
    Each layer gets what it would get alone: the column loop treats output rows
    independently, and each layer's weights to zero are chosen among its own rows. One
    loop over the stacked rows runs a third as many small ops as three loops would.
    """
    import torch

    if (zeros is None) == (pattern is None):
        raise ValueError("give exactly one of zeros and pattern")
    if zeros is not None and len(zeros) != len(weights):
        raise ValueError(f"{len(zeros)} budgets for {len(weights)} weights")
    w = torch.cat([x.detach().to(torch.float32) for x in weights])  # (sum out, in)
    cols = w.shape[1]
    if pattern is not None:
        m = pattern[1]
        if cols % m or blocksize % m:
            raise ValueError(f"{m} must divide the input width {cols} and the block {blocksize}")
    block_starts = list(range(0, cols, blocksize))
    widths = [min(blocksize, cols - s) for s in block_starts]
    stops = list(itertools.accumulate(x.shape[0] for x in weights))
    layers = [slice(stop - x.shape[0], stop) for x, stop in zip(weights, stops, strict=True)]
    # Each layer's zeros, split over the blocks in proportion to their widths.
    edges = [0, *itertools.accumulate(widths)]
    budgets = [
        [
            round(count * edges[b + 1] / cols) - round(count * edges[b] / cols)
            for b in range(len(widths))
        ]
        for count in (zeros or [0] * len(weights))
    ]

    # One thread: the loop's small ops cost more in a thread pool's hand-offs than they
    # gain, and splitting the rows over two Python threads ran 1.2-2.4x slower than one
    # loop (measured on 960-3072 x 576 and 576 x 1536 weights, 2 cores).
    with one_thread():
        _prune_blocks(w, hinv, block_starts, widths, layers, budgets, pattern)
    return [w[rows].to(x.dtype, copy=True) for x, rows in zip(weights, layers, strict=True)]


def _prune_blocks(
    w: torch.Tensor,
    hinv: torch.Tensor,
    block_starts: list[int],
    widths: list[int],
    layers: list[slice],
    budgets: list[list[int]],
    pattern: tuple[int, int] | None,
) -> None:
    """SparseGPT's Algorithm 1 on ``w`` in place, block by block.

    ``layers`` are the row ranges of the stacked layers, and ``budgets[k][b]`` the
    zeros of layer k in block b (unstructured). Works on W transposed, so that a column
    of W is a contiguous row for the loop's many small ops. A block's mask is chosen
    per layer, over all its rows at once.
    """
    import numpy
    import torch

    n, m = pattern if pattern is not None else (0, 0)
    wt = w.T.contiguous()  # (in, out)
    for b, (start, width) in enumerate(zip(block_starts, widths, strict=True)):
        end = start + width
        block = wt[start:end]  # (width, out), a view: updated in place
        h_block = hinv[start:end, start:end]  # (width, width)
        diag = torch.diagonal(h_block)  # (width,)
        errors = torch.zeros_like(block)  # (width, out)
        pruned = torch.zeros_like(block, dtype=torch.bool)
        for rows, layer_budgets in zip(layers, budgets, strict=True):
            budget = layer_budgets[b]
            if pattern is not None or not budget:
                continue
            saliency = block[:, rows].pow(2) / diag.pow(2).unsqueeze(1)  # (width, r)
            # A partition in linear time: topk or a sort, with k near half of a
            # block's 10^5 weights, took 5-10x longer.
            lowest = numpy.argpartition(saliency.reshape(-1).numpy(), budget - 1)[:budget]
            lowest = torch.from_numpy(lowest)
            height = rows.stop - rows.start
            pruned[lowest // height, lowest % height + rows.start] = True

        # Views made once per block, and four ops per column.
        pivots, h_rows = diag.tolist(), h_block.unbind(0)
        views = zip(*(v.unbind(0) for v in (block, errors, pruned)), strict=True)
        for j, (column, error, mask) in enumerate(views):  # (out,) each
            if pattern is not None and j % m == 0:
                group = block[j : j + m].pow(2) / diag[j : j + m, None].pow(2)  # (m, out)
                lowest = torch.topk(group, m - n, dim=0, largest=False).indices
                pruned[j : j + m].scatter_(0, lowest, True)
            # The error of zeroing the masked weights (and none for the others).
            torch.mul(column, mask, out=error).div_(pivots[j])
            # OBS: move this column's error onto the block's columns to its right
            # (which leaves the pruned weights near zero; then exactly zero).
            block[j:].addr_(h_rows[j][j:], error, alpha=-1)
            column.masked_fill_(mask, 0.0)
        # Lazy batch update: the whole block's errors onto every column after it.
        wt[end:].addmm_(hinv[start:end, end:].T, errors, alpha=-1)  # (in - end, out)
    w.copy_(wt.T)


def reconstruction_error(weight: torch.Tensor, pruned: torch.Tensor, x: torch.Tensor) -> float:
    """||W X - W' X||_F for inputs ``x`` (tokens, in): what SparseGPT minimises."""
    return float(((weight - pruned) @ x.T).norm())
