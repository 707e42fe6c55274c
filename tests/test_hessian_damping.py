"""The one Hessian damping routine GPTQ and SparseGPT share (unbottle.compression)."""

from __future__ import annotations

import pytest
import torch

from unbottle.compression import damped_hessian_factor


def test_dead_inputs_are_made_independent_and_the_factor_inverts_the_damped_hessian():
    x = torch.randn(64, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x[:, 2] = 0  # an input never active in the calibration data
    h = x.T @ x
    before = h.clone()
    result = damped_hessian_factor(h, 0.01)
    assert torch.equal(h, before)  # the caller's Hessian is left alone
    assert result.dead.tolist() == [False, False, True, False, False, False]
    assert result.diag[2] == 1.0 and result.perm is None and result.damp == 0.01
    fixed = h.float().clone()
    fixed[2, 2] = 1.0
    assert result.damp_added == pytest.approx(0.01 * float(fixed.diagonal().mean()))
    damped = fixed + result.damp_added * torch.eye(6)
    u = result.hinv_chol
    assert torch.allclose(u.T @ u, torch.linalg.inv(damped), rtol=1e-4, atol=1e-6)
    assert torch.equal(u, torch.triu(u))


def test_act_order_factors_the_hessian_in_decreasing_diagonal_order():
    h = torch.diag(torch.tensor([1.0, 4.0, 2.0, 3.0]))
    result = damped_hessian_factor(h, 0.01, act_order=True)
    assert result.perm.tolist() == [1, 3, 2, 0]
    assert result.diag.tolist() == [4.0, 3.0, 2.0, 1.0]


def test_a_hessian_that_does_not_factor_is_retried_with_ten_times_the_damping():
    # Mean diagonal 0.4975: 1% of it (0.004975) leaves -0.005 negative, 10% does not.
    h = torch.diag(torch.tensor([1.0, -0.005]))
    result = damped_hessian_factor(h, 0.01)
    assert result.damp == pytest.approx(0.1)
    assert result.damp_added == pytest.approx(0.04975)
    with pytest.raises(ValueError, match=r"not positive definite even with damping 10$"):
        damped_hessian_factor(-torch.eye(3), 0.01)
