"""Built-in optimizers: AdamW, Adam and SGD with momentum (torch.optim)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pydantic import Field

from unbottle import StrategyConfig, hookimpl


def _decay_groups(parameters: Iterable[Any], weight_decay: float) -> list[dict[str, Any]]:
    # Decay matrices only: decaying norms' gains and biases hurts small models (nanoGPT).
    params = list(parameters)
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


class AdamW:
    """Adam with decoupled weight decay (Loshchilov & Hutter, 2019)."""

    name = "adamw"

    class Config(StrategyConfig):
        betas: tuple[float, float] = (0.9, 0.95)
        eps: float = Field(1e-8, gt=0)

    def __init__(self, config: Config) -> None:
        self.config = config

    def build(self, parameters: Iterable[Any], *, lr: float, weight_decay: float) -> Any:
        import torch

        return torch.optim.AdamW(
            _decay_groups(parameters, weight_decay),
            lr=lr,
            betas=self.config.betas,
            eps=self.config.eps,
        )


class Adam:
    """Adam (Kingma & Ba, 2015); weight decay, if any, is L2 added to the gradient."""

    name = "adam"

    class Config(StrategyConfig):
        betas: tuple[float, float] = (0.9, 0.999)
        eps: float = Field(1e-8, gt=0)

    def __init__(self, config: Config) -> None:
        self.config = config

    def build(self, parameters: Iterable[Any], *, lr: float, weight_decay: float) -> Any:
        import torch

        return torch.optim.Adam(
            _decay_groups(parameters, weight_decay),
            lr=lr,
            betas=self.config.betas,
            eps=self.config.eps,
        )


class SGD:
    """Stochastic gradient descent with (Nesterov) momentum."""

    name = "sgd"

    class Config(StrategyConfig):
        momentum: float = Field(0.9, ge=0, lt=1)
        nesterov: bool = True

    def __init__(self, config: Config) -> None:
        self.config = config

    def build(self, parameters: Iterable[Any], *, lr: float, weight_decay: float) -> Any:
        import torch

        return torch.optim.SGD(
            _decay_groups(parameters, weight_decay),
            lr=lr,
            momentum=self.config.momentum,
            nesterov=self.config.nesterov and self.config.momentum > 0,
        )


@hookimpl
def register_optimizers(register):
    register(AdamW)
    register(Adam)
    register(SGD)
