"""Lion's update, checked by hand; run with `pytest` after `pip install .`."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from unbottle_lion import Lion, register_optimizers
from unbottle_lion.optim import LionOptimizer


def test_one_step_matches_the_formula_by_hand():
    lr, beta1, beta2, wd = 0.1, 0.9, 0.99, 0.5
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = LionOptimizer([p], lr=lr, betas=(beta1, beta2), weight_decay=wd)
    opt.state[p]["exp_avg"] = torch.tensor([0.5, 1.0])  # a momentum from earlier steps
    p.grad = torch.tensor([-1.0, -20.0])

    opt.step()

    # c = beta1*m + (1-beta1)*g = [0.45 - 0.1, 0.9 - 2.0] = [0.35, -1.1] -> sign [+1, -1]
    # p = p*(1 - lr*wd) - lr*sign(c) = [0.95 - 0.1, -1.9 + 0.1]
    assert p.detach().tolist() == pytest.approx([0.85, -1.8])
    # m = beta2*m + (1-beta2)*g = [0.495 - 0.01, 0.99 - 0.2]
    assert opt.state[p]["exp_avg"].tolist() == pytest.approx([0.485, 0.79])


def test_first_step_from_zero_momentum_is_sign_of_gradient():
    p = torch.nn.Parameter(torch.tensor([3.0, -4.0]))
    opt = LionOptimizer([p], lr=0.01)
    p.grad = torch.tensor([2.0, -1e-6])
    opt.step()
    assert p.detach().tolist() == pytest.approx([2.99, -3.99])
    assert opt.state[p]["exp_avg"].tolist() == pytest.approx([0.02, -1e-8])


def test_strategy_builds_the_optimizer_and_decays_matrices_only():
    model = torch.nn.Linear(3, 2)
    opt = Lion(Lion.Config(betas=(0.8, 0.95))).build(model.parameters(), lr=1e-3, weight_decay=1.0)
    assert isinstance(opt, LionOptimizer)
    decay = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert decay == {id(model.weight): 1.0, id(model.bias): 0.0}
    assert all(g["betas"] == (0.8, 0.95) and g["lr"] == 1e-3 for g in opt.param_groups)


@pytest.mark.parametrize("options", [{"betas": (2, 0.5)}, {"betas": (0.9, 1.0)}, {"eps": 1e-8}])
def test_config_rejects_bad_options(options):
    with pytest.raises(ValidationError):
        Lion.Config(**options)


def test_registers_through_the_hook():
    registered = []
    register_optimizers(registered.append)
    assert registered == [Lion]
