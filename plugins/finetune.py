"""Built-in finetuning method: ``full`` (every weight trains)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from unbottle import StrategyConfig, hookimpl


class Full:
    """Full-parameter finetuning: the whole model trains, nothing is frozen."""

    name = "full"

    class Config(StrategyConfig):
        pass

    def __init__(self, config: Config) -> None:
        self.config = config

    def prepare(self, model: Any) -> Any:
        for parameter in model.parameters():
            parameter.requires_grad_(True)
        return model

    def finalize(self, model: Any, out_dir: Path) -> Any:
        return model


@hookimpl
def register_finetune_methods(register):
    register(Full)
