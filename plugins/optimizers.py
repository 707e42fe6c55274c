"""Built-in optimizers: AdamW, Adam, SGD with momentum (torch.optim) and Adafactor.

Each also says how many bytes of state it keeps for a set of parameters
(``state_bytes``), which the memory estimate before training uses.
"""

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
        fused: bool = True  # one fused kernel for all parameters (CPU and CUDA)

    def __init__(self, config: Config) -> None:
        self.config = config

    def build(self, parameters: Iterable[Any], *, lr: float, weight_decay: float) -> Any:
        import torch

        return torch.optim.AdamW(
            _decay_groups(parameters, weight_decay),
            lr=lr,
            betas=self.config.betas,
            eps=self.config.eps,
            fused=self.config.fused,
        )

    def state_bytes(self, parameters: Iterable[Any]) -> int:
        return _moments_bytes(parameters, 2)  # exp_avg and exp_avg_sq


class Adam:
    """Adam (Kingma & Ba, 2015); weight decay, if any, is L2 added to the gradient."""

    name = "adam"

    class Config(StrategyConfig):
        betas: tuple[float, float] = (0.9, 0.999)
        eps: float = Field(1e-8, gt=0)
        fused: bool = True

    def __init__(self, config: Config) -> None:
        self.config = config

    def build(self, parameters: Iterable[Any], *, lr: float, weight_decay: float) -> Any:
        import torch

        return torch.optim.Adam(
            _decay_groups(parameters, weight_decay),
            lr=lr,
            betas=self.config.betas,
            eps=self.config.eps,
            fused=self.config.fused,
        )

    def state_bytes(self, parameters: Iterable[Any]) -> int:
        return _moments_bytes(parameters, 2)


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

    def state_bytes(self, parameters: Iterable[Any]) -> int:
        return _moments_bytes(parameters, 1 if self.config.momentum > 0 else 0)


class Adafactor:
    """Adafactor (Shazeer & Stern, 2018): second moments factored into row and column means.

    A matrix of r x c keeps r + c values of state instead of Adam's 2rc, which is the
    point of it when optimizer state is what does not fit. This uses the transformers
    implementation with an external learning rate (``relative_step`` off), so the
    schedule of ``train.schedule`` applies as for the other optimizers.
    """

    name = "adafactor"

    class Config(StrategyConfig):
        beta1: float | None = Field(None, ge=0, lt=1)  # first moment (None: none, less memory)
        decay_rate: float = Field(-0.8, lt=0)  # second-moment decay: 1 - step^decay_rate
        clip_threshold: float = Field(1.0, gt=0)  # update clipping (RMS)
        scale_parameter: bool = False  # scale the lr by each parameter's RMS

    def __init__(self, config: Config) -> None:
        self.config = config

    def build(self, parameters: Iterable[Any], *, lr: float, weight_decay: float) -> Any:
        from transformers.optimization import Adafactor as HFAdafactor

        return HFAdafactor(
            _decay_groups(parameters, weight_decay),
            lr=lr,
            beta1=self.config.beta1,
            decay_rate=self.config.decay_rate,
            clip_threshold=self.config.clip_threshold,
            scale_parameter=self.config.scale_parameter,
            relative_step=False,
            warmup_init=False,
        )

    def state_bytes(self, parameters: Iterable[Any]) -> int:
        total = 0
        for p in parameters:
            if p.dim() >= 2:  # row and column means of the squared gradient
                total += (p.numel() // p.shape[-1] + p.numel() // p.shape[-2]) * 4
            else:
                total += p.numel() * 4
            if self.config.beta1 is not None:
                total += p.numel() * 4
        return total


def _moments_bytes(parameters: Iterable[Any], moments: int) -> int:
    """fp32 state tensors of each parameter's shape, ``moments`` of them."""
    return sum(moments * p.numel() * 4 for p in parameters)


@hookimpl
def register_optimizers(register):
    register(AdamW)
    register(Adam)
    register(SGD)
    register(Adafactor)
