"""Lion, an unbottle optimizer strategy: ``optimizer: lion`` in params.yaml.

Lion ("EvoLved Sign Momentum") is from Chen et al., 2023, "Symbolic Discovery of
Optimization Algorithms", arXiv:2302.06675. Each step, for gradient ``g`` and momentum
``m``::

    p = p * (1 - lr * weight_decay)              # decoupled weight decay
    p = p - lr * sign(beta1 * m + (1 - beta1) * g)
    m = beta2 * m + (1 - beta2) * g

Every coordinate moves by exactly ``lr`` (or not at all), so Lion wants a learning rate
about 3-10x smaller than AdamW's and a weight decay 3-10x larger, to keep the same
effective decay ``lr * weight_decay``. It keeps one state tensor per parameter (AdamW
keeps two).

This module is what unbottle imports when it loads plugins, so it does not import torch:
the optimizer itself lives in :mod:`unbottle_lion.optim`, imported when an optimizer is
built.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated, Any

from pydantic import Field

from unbottle import StrategyConfig, hookimpl

__version__ = "0.1.0"

Beta = Annotated[float, Field(ge=0, lt=1)]


class Lion:
    """The Lion optimizer (sign of an interpolated momentum, decoupled weight decay)."""

    name = "lion"

    class Config(StrategyConfig):
        # (beta1, beta2): beta1 interpolates the update, beta2 the momentum it keeps.
        betas: tuple[Beta, Beta] = (0.9, 0.99)

    def __init__(self, config: Config) -> None:
        self.config = config

    def build(self, parameters: Iterable[Any], *, lr: float, weight_decay: float) -> Any:
        from unbottle_lion.optim import LionOptimizer

        # Like unbottle's built-in optimizers, decay matrices only: not norms or biases.
        params = list(parameters)
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        return LionOptimizer([g for g in groups if g["params"]], lr=lr, betas=self.config.betas)


@hookimpl
def register_optimizers(register):
    register(Lion)


def __getattr__(name: str) -> Any:
    # `unbottle_lion.LionOptimizer` without importing torch when the plugin loads.
    if name == "LionOptimizer":
        from unbottle_lion.optim import LionOptimizer

        return LionOptimizer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
