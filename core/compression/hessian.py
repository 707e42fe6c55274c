"""Damping and factoring a layer's input Hessian, as GPTQ and SparseGPT both need it.

GPTQ (Frantar et al., 2022, arXiv:2210.17323, section 3 and its reference code) and
SparseGPT (Frantar & Alistarh, 2023, arXiv:2301.00774) both spread a column's error over
the remaining columns with rows of one upper Cholesky factor of (H + lambda I)^-1, where
H = sum x x^T over the calibration tokens and lambda is a small fraction (1% in both
papers) of H's mean diagonal. Inputs that were never active (H_jj = 0) get H_jj = 1,
which makes them independent of the rest. A near-singular H (few tokens, correlated
inputs) may still fail to factor; the factorisation is then retried with 10x the damping.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from unbottle.core.compression.calibration import inverse_cholesky_factor

if TYPE_CHECKING:
    import torch

#: How many times the damping is tried, each 10x the last, before giving up.
DAMPING_TRIES = 4


@dataclass
class DampedHessian:
    """A layer's input Hessian, damped and factored; layers sharing inputs share it."""

    dead: torch.Tensor  # (in,) bool: inputs never active in the calibration data
    diag: torch.Tensor  # (in,) diag H after the dead fix, permuted like the columns
    perm: torch.Tensor | None  # (in,) processing order of the columns (act_order)
    hinv_chol: torch.Tensor  # (in, in) upper Cholesky factor of (damped H)^-1, permuted
    damp: float  # the relative damping that made H positive definite
    damp_added: float  # what was added to H's diagonal: damp * mean(diag H)


def damped_hessian_factor(
    hessian: torch.Tensor, damp: float = 0.01, *, act_order: bool = False
) -> DampedHessian:
    """Fix dead inputs, optionally permute, damp and factor H (``hessian`` is not modified).

    ``hessian`` is sum x x^T (any positive multiple of it works: the updates use only
    ratios of H^-1's entries). ``damp`` is lambda as a fraction of H's mean diagonal.
    ``act_order`` orders the columns by decreasing H_jj (GPTQ's "desc_act"); the factor
    is then of the permuted H. Raises ValueError if H cannot be factored even with
    ``damp * 10**(DAMPING_TRIES - 1)``.
    """
    import torch

    H = hessian.detach().float().clone()  # (in, in); float32, as the reference code
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else None
    if perm is not None:
        H = H.index_select(0, perm).index_select(1, perm)
    diag = torch.diag(H).clone()
    mean_diag = float(diag.mean())
    used = tried = damp
    for _ in range(DAMPING_TRIES):
        damped = H.clone()
        damped.diagonal().add_(used * mean_diag)
        upper = inverse_cholesky_factor(damped)
        if upper is not None:
            return DampedHessian(dead, diag, perm, upper, used, used * mean_diag)
        tried, used = used, used * 10
    raise ValueError(f"the input Hessian is not positive definite even with damping {tried:g}")
