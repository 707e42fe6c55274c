"""The training loop shared by pretrain and finetune.

It runs through ``accelerate.Accelerator`` from the start: the parallelism strategy
builds the accelerator, the optimizer strategy builds the optimizer, and the loop itself
never changes when either does. Setup (precision, strategies, schedule) is resolved and
validated before the first step.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from unbottle.core.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from unbottle.core.config import TrainParams
    from unbottle.core.registry import Registry

log = logging.getLogger("unbottle.train")


@dataclass
class TrainReport:
    losses: list[float] = field(default_factory=list)
    tokens: int = 0
    seconds: float = 0.0
    precision: str = "fp32"
    precision_reason: str = ""
    world_size: int = 1

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def curve(self, every: int = 1) -> list[dict[str, float]]:
        return [
            {"step": i + 1, "loss": round(loss, 6)}
            for i, loss in enumerate(self.losses)
            if (i + 1) % every == 0 or i == 0 or i + 1 == len(self.losses)
        ]


def resolve_precision(requested: str) -> tuple[str, str]:
    """Pick accelerate's mixed-precision mode for this device, and say why."""
    import torch

    cuda = torch.cuda.is_available()
    if requested == "fp16" and not cuda:
        raise ConfigError("train.precision: fp16 needs a CUDA GPU; use fp32 or auto on a CPU")
    if requested == "fp32":
        return "no", "fp32 requested"
    if requested == "bf16":
        return "bf16", "bf16 requested"
    if requested == "fp16":
        return "fp16", "fp16 requested (with a gradient scaler)"
    if cuda:
        if torch.cuda.is_bf16_supported():
            return "bf16", "auto: the GPU supports bf16"
        return "fp16", "auto: the GPU lacks bf16, fp16 with a gradient scaler"
    capability = str(torch.backends.cpu.get_cpu_capability())
    if "AMX" in capability or "BF16" in capability:
        return "bf16", f"auto: the CPU has native bf16 ({capability})"
    return "no", (
        f"auto: fp32, because this CPU ({capability}) has no native bf16 and emulated bf16 "
        "autocast made a training step about 20x slower here"
    )


def train(
    model: torch.nn.Module,
    next_batch: Callable[[int], dict[str, torch.Tensor]],
    cfg: TrainParams,
    *,
    registry: Registry,
    desc: str,
    loss_fn: Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor] | None = None,
) -> tuple[torch.nn.Module, TrainReport]:
    """Train ``model`` for ``cfg.steps`` steps; ``next_batch(step)`` supplies each batch.

    The loss is the model's own (``model(**batch).loss``) unless ``loss_fn`` computes it.
    """
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    from unbottle.core.progress import progress_bar

    mixed_precision, reason = resolve_precision(cfg.precision)
    parallel = registry.create("parallelism", cfg.parallelism.name, cfg.parallelism.options)
    accelerator = parallel.accelerator(mixed_precision=mixed_precision)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ConfigError(f"{desc}: no parameter is trainable")
    optimizer_strategy = registry.create("optimizer", cfg.optimizer.name, cfg.optimizer.options)
    optimizer = optimizer_strategy.build(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = get_cosine_with_min_lr_schedule_with_warmup(
        optimizer,
        num_warmup_steps=min(cfg.warmup_steps, cfg.steps),
        num_training_steps=cfg.steps,
        min_lr_rate=cfg.min_lr_ratio,
    )
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    report = TrainReport(
        precision=mixed_precision if mixed_precision != "no" else "fp32",
        precision_reason=reason,
        world_size=accelerator.num_processes,
    )
    log.info("%s: precision %s (%s)", desc, report.precision, reason)

    model.train()
    start = time.perf_counter()
    with progress_bar(desc, total=cfg.steps) as advance:
        for step in range(cfg.steps):
            batch = {k: v.to(accelerator.device) for k, v in next_batch(step).items()}
            loss = loss_fn(model, batch) if loss_fn else model(**batch).loss
            accelerator.backward(loss)
            if cfg.grad_clip > 0:
                accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            value = float(loss.detach())
            if not math.isfinite(value):
                raise FloatingPointError(f"{desc}: loss became {value} at step {step + 1}")
            report.losses.append(value)
            mask = batch.get("attention_mask")
            report.tokens += int(mask.sum()) if mask is not None else batch["input_ids"].numel()
            report.seconds = time.perf_counter() - start
            advance(loss=value, tokens_per_s=report.tokens_per_second)
            if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
                log.info(
                    "%s step %d/%d loss %.4f lr %.2e %.0f tokens/s",
                    desc,
                    step + 1,
                    cfg.steps,
                    value,
                    scheduler.get_last_lr()[0],
                    report.tokens_per_second,
                )
    model = accelerator.unwrap_model(model)
    model.eval()
    accelerator.free_memory()
    return model, report


def rng(seed: int) -> Any:
    import torch

    return torch.Generator().manual_seed(seed)
