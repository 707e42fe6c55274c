"""Sparsity masks and per-layer sparsity budgets, shared by magnitude, Wanda and SparseGPT.

* **N:M semi-structured sparsity** keeps at most N nonzero weights in every M consecutive
  weights along a row's input dimension (2:4 keeps 2 of every 4, the pattern sparse
  tensor cores accelerate). :func:`parse_pattern` validates it, :func:`nm_prune_mask`
  picks the M - N weights to zero in each group.
* **Wanda** (Sun, Liu, Bair & Kolter, 2023, "A Simple and Effective Pruning Approach for
  Large Language Models") scores weight W_ij by |W_ij| * ||X_j||_2, the size of the
  weight times the norm of the input feature it multiplies over the calibration tokens,
  and compares the scores within each output row (:func:`wanda_scores`,
  :func:`row_prune_mask`).
* **Non-uniform sparsity** across decoder blocks, at the same overall sparsity
  (:func:`spread_sparsities`): OWL (Yin et al., 2023, "Outlier Weighed Layerwise Sparsity
  (OWL): A Missing Secret Sauce for Pruning LLMs to High Sparsity") lowers the sparsity
  of blocks with a larger share of outlier weights (Wanda scores above ``threshold``
  times the block's mean score, :func:`outlier_ratio`); the depth schedule raises it
  linearly with depth, as deeper blocks change the residual stream less (Gromov et al.,
  2024, "The Unreasonable Ineffectiveness of the Deeper Layers").

Budgets are counts of weights, not fractions: :func:`exact_counts` rounds per-layer
sparsities so that the zeros of all layers together are exactly ``round(target * total)``,
which is how the overall sparsity a pruner reports equals the target it was given.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

PATTERN_HELP = (
    "write N:M with 0 < N < M and M a power of two, such as 2:4 or 4:8 "
    "(at most N nonzero weights in every M consecutive input weights of a row)"
)


def parse_pattern(text: str) -> tuple[int, int]:
    """``"2:4"`` -> (2, 4); a ValueError saying what is allowed otherwise."""
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", text)
    if match is None:
        raise ValueError(f"{text!r} is not an N:M pattern; {PATTERN_HELP}")
    n, m = int(match[1]), int(match[2])
    if not 0 < n < m or m & (m - 1):
        raise ValueError(f"{text!r} is not a valid N:M pattern; {PATTERN_HELP}")
    return n, m


def even_split(total: int, parts: int) -> list[int]:
    """``total`` split into ``parts`` integers that differ by at most one and sum to it."""
    return [total * (i + 1) // parts - total * i // parts for i in range(parts)]


def exact_counts(sizes: Sequence[int], sparsities: Sequence[float], target: float) -> list[int]:
    """How many weights to zero in each layer: close to ``sparsities[i] * sizes[i]``,
    summing to exactly ``round(target * sum(sizes))`` (largest remainders get the rest).

    The sparsities must already average to ``target`` weighted by size; this only rounds.
    """
    total = round(target * sum(sizes))
    wanted = [min(max(s, 0.0), 1.0) * n for s, n in zip(sparsities, sizes, strict=True)]
    counts = [min(math.floor(w), n) for w, n in zip(wanted, sizes, strict=True)]
    # Hand the remaining zeros to the layers whose wish was rounded down the most (or
    # take surplus ones back from those rounded down the least), never past a layer's size.
    order = sorted(range(len(sizes)), key=lambda i: counts[i] - wanted[i])
    missing = total - sum(counts)
    while missing > 0:
        for j in order:
            if missing and counts[j] < sizes[j]:
                counts[j] += 1
                missing -= 1
    while missing < 0:
        for j in reversed(order):
            if missing and counts[j] > 0:
                counts[j] -= 1
                missing += 1
    return counts


def smallest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` smallest entries of a 1-D tensor (exactly k)."""
    import torch

    return torch.topk(scores, k, largest=False, sorted=False).indices


def row_prune_mask(scores: torch.Tensor, zeros: int) -> torch.Tensor:
    """True where a weight is pruned: ``zeros`` weights in all, the smallest scores of each
    row, spread over the rows as evenly as integers allow."""
    import torch

    rows = scores.shape[0]
    mask = torch.zeros_like(scores, dtype=torch.bool)
    per_row = even_split(zeros, rows)
    for k in sorted(set(per_row)):
        if k == 0:
            continue
        picked = torch.tensor([r for r in range(rows) if per_row[r] == k])
        # (picked, k): the k lowest-scoring columns of each of these rows
        lowest = torch.topk(scores[picked], k, dim=1, largest=False, sorted=False).indices
        mask[picked.unsqueeze(1), lowest] = True
    return mask


def nm_prune_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """True where a weight is pruned: in every group of ``m`` consecutive columns of each
    row, the ``m - n`` lowest scores, so that at most ``n`` of every ``m`` survive."""
    import torch

    rows, cols = scores.shape
    groups = scores.reshape(rows, cols // m, m)  # (rows, groups, m)
    lowest = torch.topk(groups, m - n, dim=2, largest=False, sorted=False).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, lowest, True)
    return mask.reshape(rows, cols)


def wanda_scores(weight: torch.Tensor, sq_norm: torch.Tensor) -> torch.Tensor:
    """|W_ij| * ||X_j||_2, from the summed squares of each input feature (Wanda, eq. 1)."""
    return weight.abs() * sq_norm.sqrt().unsqueeze(0)  # (out, in)


def outlier_ratio(scores: Sequence[torch.Tensor], threshold: float) -> tuple[int, int]:
    """(outliers, total): how many of a block's scores exceed ``threshold`` times their
    mean (OWL's layerwise outlier distribution, counted over all the block's layers)."""
    import torch

    flat = torch.cat([s.reshape(-1) for s in scores])
    return int((flat > threshold * flat.mean()).sum()), flat.numel()


def spread_sparsities(
    scores: Sequence[float], sizes: Sequence[int], target: float, spread: float
) -> list[float]:
    """Per-block sparsities that rise linearly with ``scores`` over a range of
    ``2 * spread``, centred so that their size-weighted mean is ``target``.

    OWL passes minus each block's outlier ratio (blocks with more outliers keep more
    weights; its lambda is ``spread``); the depth schedule passes the block index. When
    centring would push a block out of [0, 1), the range is narrowed until all fit.
    """
    low, high = min(scores), max(scores)
    if high == low:
        return [target] * len(scores)
    shares = [(v - low) / (high - low) for v in scores]  # 0 .. 1
    mean_share = sum(s * n for s, n in zip(shares, sizes, strict=True)) / sum(sizes)
    # sparsity_i = target + width * (share_i - mean_share) must stay inside [0, 1)
    limit = min(
        (1 - target if s > mean_share else target) / abs(s - mean_share)
        for s in shares
        if s != mean_share
    )
    width = min(2 * spread, 0.999 * limit)
    return [target + width * (s - mean_share) for s in shares]
