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

from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from unbottle.core.layerwise import one_thread

if TYPE_CHECKING:
    import torch


def inverse_hessian_factor(hessian: torch.Tensor, damping: float = 0.01) -> torch.Tensor:
    """The upper Cholesky factor U of (H + lambda I)^-1, with lambda = ``damping`` times
    the mean diagonal of H (the paper's dampening; 1% by default).

    ``hessian`` is sum x x^T over the calibration tokens (any positive scale: the update
    only uses ratios of H^-1's entries). Inputs that were always zero get H_jj = 1, which
    makes them independent of the rest. ``hessian`` itself is not modified.
    """
    import torch

    h = hessian.to(torch.float32).clone()  # (in, in); float32, as the reference code
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    damp = damping * torch.diagonal(h).mean()
    h.diagonal().add_(damp)
    with one_thread():
        # A near-singular H (few tokens, correlated inputs) may need more damping.
        for _ in range(6):
            chol, info = torch.linalg.cholesky_ex(h)
            if int(info) == 0:
                break
            h.diagonal().add_(damp)
        else:
            raise ValueError("the Hessian is not positive definite even with extra damping")
        inverse = torch.cholesky_inverse(chol)
        return torch.linalg.cholesky(inverse, upper=True).to(torch.float32)  # (in, in)


def sparsegpt_prune(
    weight: torch.Tensor,
    hinv: torch.Tensor,
    *,
    zeros: int | None = None,
    pattern: tuple[int, int] | None = None,
    blocksize: int = 128,
) -> torch.Tensor:
    """The pruned and updated copy of ``weight`` (out, in).

    ``hinv`` is :func:`inverse_hessian_factor` of the layer's input Hessian. Give either
    ``zeros``, the exact number of weights to zero (unstructured), or ``pattern`` (N, M):
    at most N nonzeros in every M consecutive input weights of each row.
    """
    import torch

    if (zeros is None) == (pattern is None):
        raise ValueError("give exactly one of zeros and pattern")
    w = weight.detach().to(torch.float32).clone()  # (out, in)
    cols = w.shape[1]
    if pattern is not None:
        m = pattern[1]
        if cols % m or blocksize % m:
            raise ValueError(f"{m} must divide the input width {cols} and the block {blocksize}")
    block_starts = list(range(0, cols, blocksize))
    widths = [min(blocksize, cols - s) for s in block_starts]
    # A layer's zeros, split over its blocks in proportion to their widths.
    budgets = [0] * len(widths)
    if zeros is not None:
        cumulative = [0]
        for width in widths:
            cumulative.append(cumulative[-1] + width)
        budgets = [
            round(zeros * cumulative[b + 1] / cols) - round(zeros * cumulative[b] / cols)
            for b in range(len(widths))
        ]

    workers = torch.get_num_threads()  # one column loop per core, each on one thread
    with one_thread():
        _prune_blocks(w, hinv, block_starts, widths, budgets, pattern, workers)
    return w.to(weight.dtype)


#: Fewer rows than this per thread and the threads' hand-offs cost more than they save.
_MIN_ROWS_PER_WORKER = 128


def _prune_blocks(
    w: torch.Tensor,
    hinv: torch.Tensor,
    block_starts: list[int],
    widths: list[int],
    budgets: list[int],
    pattern: tuple[int, int] | None,
    workers: int,
) -> None:
    """SparseGPT's Algorithm 1 on ``w`` in place, block by block.

    Works on W transposed, so that a column of W is a contiguous row for the loop's many
    small ops. A block's mask is chosen over all rows at once; the column loop that
    follows treats rows independently, so it runs on ``workers`` row slices in parallel
    threads (torch on one thread each: the caller's ``one_thread``).
    """
    import numpy
    import torch

    n, m = pattern if pattern is not None else (0, 0)
    wt = w.T.contiguous()  # (in, out)
    out = wt.shape[1]
    parts = max(1, min(workers, out // _MIN_ROWS_PER_WORKER))
    row_slices = [
        slice(out * i // parts, out * (i + 1) // parts) for i in range(parts)
    ]  # of W's rows: columns of wt
    pool = ThreadPoolExecutor(parts) if parts > 1 else None
    try:
        for start, width, budget in zip(block_starts, widths, budgets, strict=True):
            end = start + width
            block = wt[start:end]  # (width, out), a view: updated in place
            h_block = hinv[start:end, start:end]  # (width, width)
            diag = torch.diagonal(h_block)  # (width,)
            errors = torch.zeros_like(block)  # (width, out)
            pruned = torch.zeros_like(block, dtype=torch.bool)
            if pattern is None and budget:
                saliency = (block.pow(2) / diag.pow(2).unsqueeze(1)).reshape(-1)
                # A partition in linear time: topk or a sort, with k near half of a
                # block's 10^5 weights, took 5-10x longer.
                lowest = numpy.argpartition(saliency.numpy(), budget - 1)[:budget]
                pruned.view(-1)[torch.from_numpy(lowest)] = True

            def columns(
                rows: slice, block=block, h_block=h_block, diag=diag, errors=errors, pruned=pruned
            ) -> None:
                part, part_errors, part_pruned = block[:, rows], errors[:, rows], pruned[:, rows]
                for j in range(part.shape[0]):
                    if pattern is not None and j % m == 0:
                        group = part[j : j + m].pow(2) / diag[j : j + m, None].pow(2)  # (m, r)
                        lowest = torch.topk(group, m - n, dim=0, largest=False).indices
                        part_pruned[j : j + m].scatter_(0, lowest, True)
                    column = part[j]  # (r,)
                    kept = torch.where(part_pruned[j], 0.0, column)
                    error = part_errors[j]
                    torch.sub(column, kept, out=error).div_(diag[j])
                    # OBS: move this column's error onto the block's columns to its right.
                    part[j:].addr_(h_block[j, j:], error, alpha=-1)
                    part[j] = kept

            if pool is None:
                columns(slice(None))
            else:
                list(pool.map(columns, row_slices))
            # Lazy batch update: the whole block's errors onto every column after it.
            wt[end:].addmm_(hinv[start:end, end:].T, errors, alpha=-1)  # (in - end, out)
    finally:
        if pool is not None:
            pool.shutdown()
    w.copy_(wt.T)


def reconstruction_error(weight: torch.Tensor, pruned: torch.Tensor, x: torch.Tensor) -> float:
    """||W X - W' X||_F for inputs ``x`` (tokens, in): what SparseGPT minimises."""
    return float(((weight - pruned) @ x.T).norm())
