"""Built-in training parallelism: ``single`` (one process)."""

from __future__ import annotations

from typing import Any

from unbottle import StrategyConfig, hookimpl
from unbottle.core.errors import ConfigError


class Single:
    """One process on one device: the GPU when there is one, else the CPU."""

    name = "single"

    class Config(StrategyConfig):
        cpu: bool = False  # stay on the CPU even when a GPU is present

    def __init__(self, config: Config) -> None:
        self.config = config

    def accelerator(self, *, mixed_precision: str) -> Any:
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState, GradientState

        # Pretrain and finetune may run in one process (a Prefect flow): accelerate keeps
        # its state in a process-wide singleton, so start each loop from a clean one.
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        accelerator = Accelerator(cpu=self.config.cpu, mixed_precision=mixed_precision)
        if accelerator.num_processes != 1:
            raise ConfigError(
                f"train.parallelism: 'single' runs one process, but {accelerator.num_processes} "
                "were launched; choose a data-parallel strategy"
            )
        return accelerator


@hookimpl
def register_parallelism(register):
    register(Single)
