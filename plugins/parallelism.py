"""Built-in training parallelism: ``single`` and ``ddp`` through accelerate; ``fsdp``, ``tp``,
``pp`` and ``hybrid``, which shard the model, in ``plugins/model_parallel.py``.

The launcher starts the processes; the strategy checks, inside each one, that what was
launched is what params ask for, and builds the ``Accelerator`` the loop runs through.

- ``single``: one process on one device.
- ``ddp``: DistributedDataParallel, one model replica per process, gradients all-reduced
  (gloo on CPUs, NCCL on GPUs). Launch with ``torchrun --nproc_per_node N -m unbottle
  stage pretrain -S pretrain.train.parallelism=ddp``, and across machines with torchrun's
  ``--nnodes``/``--node_rank``/``--rdzv_endpoint`` (see README).
"""

from __future__ import annotations

import os
from typing import Any

from pydantic import Field

from unbottle import ConfigError, StrategyConfig, hookimpl
from unbottle.plugins.model_parallel import FSDP, Hybrid, PipelineParallel, TensorParallel

_LAUNCH = "torchrun --nproc_per_node N -m unbottle stage <stage> ..."
#: The key a strategy's messages name when no fuller path is known.
_KEY = "train.parallelism"


def _fresh_state() -> None:
    # Pretrain and finetune may run in one process (a Prefect flow): accelerate keeps its
    # state in a process-wide singleton, so start each loop from a clean one. An existing
    # process group is kept and reused.
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _launched() -> tuple[int, int]:
    """(world size, processes on this machine) as the launcher set them."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return world, int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))


def _check_devices(name: str, local: int, *, cpu: bool, key: str = _KEY) -> None:
    """One process per device: refuse more processes on a machine than it has devices."""
    import torch

    if not cpu and torch.cuda.is_available():
        gpus = torch.cuda.device_count()
        if local > gpus:
            raise ConfigError(
                f"{key}: '{name}' was launched with {local} processes on this "
                f"machine but it has {gpus} GPU{'s' if gpus > 1 else ''}; launch at most {gpus}"
            )
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if local > (cores or 1):
        raise ConfigError(
            f"{key}: '{name}' was launched with {local} processes on this machine "
            f"but it has {cores} CPU cores; launch at most {cores}"
        )


def _check_world(name: str, expected: int | None, *, minimum: int, key: str = _KEY) -> int:
    world, local = _launched()
    if world < minimum:
        raise ConfigError(
            f"{key}: '{name}' needs at least {minimum} processes but {world} was "
            f"launched; start it with `{_LAUNCH}` (`accelerate launch --cpu` starts one)"
        )
    if expected is not None and world != expected:
        raise ConfigError(
            f"{key}.processes: {expected} expected but {world} were launched; "
            "launch that many or change the option"
        )
    return local


class Single:
    """One process on one device: the GPU when there is one, else the CPU."""

    name = "single"

    class Config(StrategyConfig):
        cpu: bool = False  # stay on the CPU even when a GPU is present

    def __init__(self, config: Config) -> None:
        self.config = config

    def check_launch(self, key: str = _KEY) -> None:
        """Refuse, before any work, a launch of several processes."""
        world, _ = _launched()
        if world != 1:
            raise ConfigError(
                f"{key}: 'single' runs one process, but {world} were launched; choose ddp or fsdp"
            )

    def accelerator(self, *, mixed_precision: str) -> Any:
        from accelerate import Accelerator

        self.check_launch()
        _fresh_state()
        accelerator = Accelerator(cpu=self.config.cpu, mixed_precision=mixed_precision)
        if accelerator.num_processes != 1:
            raise ConfigError(
                f"train.parallelism: 'single' runs one process, but {accelerator.num_processes} "
                "were launched; choose a data-parallel strategy"
            )
        return accelerator


class DDP:
    """Data parallel: a replica per process, gradients averaged by all-reduce."""

    name = "ddp"

    class Config(StrategyConfig):
        processes: int | None = Field(None, ge=1)  # expected world size (None: as launched)
        cpu: bool = False  # gloo on the CPUs even when GPUs are present
        bucket_cap_mb: int = Field(25, ge=1)  # gradients all-reduced in buckets of this size
        find_unused_parameters: bool = False

    def __init__(self, config: Config) -> None:
        self.config = config

    def check_launch(self, key: str = _KEY) -> None:
        """Refuse, before any work, a launch of one process or more than the devices."""
        import torch

        c = self.config
        local = _check_world(self.name, c.processes, minimum=2, key=key)
        _check_devices(self.name, local, cpu=c.cpu or not torch.cuda.is_available(), key=key)

    def accelerator(self, *, mixed_precision: str) -> Any:
        import torch
        from accelerate import Accelerator, DistributedDataParallelKwargs

        c = self.config
        cpu = c.cpu or not torch.cuda.is_available()
        self.check_launch()
        _fresh_state()
        accelerator = Accelerator(
            cpu=cpu,  # accelerate picks MULTI_CPU (gloo) only when told it runs on CPUs
            mixed_precision=mixed_precision,
            kwargs_handlers=[
                DistributedDataParallelKwargs(
                    bucket_cap_mb=c.bucket_cap_mb, find_unused_parameters=c.find_unused_parameters
                )
            ],
        )
        if accelerator.num_processes < 2:
            raise ConfigError(
                "train.parallelism: 'ddp' found no process group (world size 1); "
                f"start it with `{_LAUNCH}`"
            )
        return accelerator


@hookimpl
def register_parallelism(register):
    register(Single)
    register(DDP)
    for strategy in (FSDP, TensorParallel, PipelineParallel, Hybrid):
        register(strategy)
