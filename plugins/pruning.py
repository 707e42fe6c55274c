"""Built-in pruning: ``magnitude`` (unstructured, per layer or global).

Magnitude pruning zeroes the weights of smallest absolute value (Han et al., 2015,
"Learning both Weights and Connections for Efficient Neural Networks"). The zeros are
real: they are stored in the weights, and the achieved sparsity is counted from them.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field

from unbottle import CompressContext, StrategyConfig, hookimpl
from unbottle.core.errors import ConfigError


def prunable_linears(model: Any, pattern: str) -> list[tuple[str, Any]]:
    """The Linear layers inside the decoder blocks whose names match ``pattern``.

    Embeddings and the (tied) output head are left dense: they are shared, and pruning
    them costs small models far more quality than it saves.
    """
    import torch

    regex = re.compile(pattern)
    found = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name != "lm_head" and regex.search(name)
    ]
    if not found:
        raise ConfigError(f"prune: layers {pattern!r} match no Linear layer of the model")
    return found


def _smallest(scores: Any, k: int) -> Any:
    """Indices of the k smallest scores (exactly k, ties broken by position)."""
    import torch

    return torch.topk(scores, k, largest=False, sorted=False).indices


class Magnitude:
    """Zero the smallest-magnitude weights, in each layer or across all of them."""

    name = "magnitude"

    class Config(StrategyConfig):
        sparsity: float = Field(0.5, gt=0, lt=1)
        scope: Literal["layer", "global"] = "layer"
        layers: str = r"\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$"

    def __init__(self, config: Config) -> None:
        self.config = config

    def prune(self, model: Any, ctx: CompressContext) -> dict[str, float]:
        import torch

        layers = prunable_linears(model, self.config.layers)
        with torch.no_grad():
            if self.config.scope == "layer":
                for _, module in layers:
                    flat = module.weight.view(-1)
                    k = round(self.config.sparsity * flat.numel())
                    flat[_smallest(flat.abs(), k)] = 0.0
            else:
                scores = torch.cat([m.weight.abs().view(-1) for _, m in layers])
                k = round(self.config.sparsity * scores.numel())
                mask = torch.ones_like(scores, dtype=torch.bool)
                mask[_smallest(scores, k)] = False
                offset = 0
                for _, module in layers:
                    n = module.weight.numel()
                    module.weight.view(-1).mul_(mask[offset : offset + n])
                    offset += n
        total = sum(m.weight.numel() for _, m in layers)
        zeros = sum(int((m.weight == 0).sum()) for _, m in layers)
        return {"sparsity": zeros / total, "pruned_layers": len(layers)}


@hookimpl
def register_pruners(register):
    register(Magnitude)
