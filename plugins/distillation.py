"""Built-in distillation: ``kd``, a smaller student taught by the finetuned model.

Knowledge distillation (Hinton, Vinyals & Dean, 2015, "Distilling the Knowledge in a
Neural Network"): the student minimises

    alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE

on the pipeline's own data, as ``compress.calibration.source`` names it: the training
text, the finetuning pairs as finetuning rendered them, or both. The teacher is the
model the variant started from (the finetuned model). The student is the recipe's
current model: after a structured prune step, the narrower model it made; with
``layers``, a copy of the current model keeping that many of its decoder layers, evenly
spaced, as in DistilBERT (Sanh et al., 2019), so it starts close to the teacher and
distillation recovers what dropping layers lost. Weights that are exactly zero when
distillation starts (an earlier unstructured or N:M prune step) get no gradient, so the
student keeps its sparsity pattern.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Literal

from pydantic import Field, field_validator

from unbottle import CompressContext, ConfigError, StrategyConfig, hookimpl
from unbottle.compression import find_decoder_blocks


def _held_out_loss(model: Any, batches: list[Any]) -> float:
    import torch

    model.eval()
    with torch.inference_mode():
        losses = [float(model(input_ids=b, labels=b).loss) for b in batches]
    return sum(losses) / len(losses)


def shallow_copy_of(teacher: Any, layers: int) -> Any:
    """A student with ``layers`` of the teacher's decoder layers, evenly spaced."""
    import torch

    total = teacher.config.num_hidden_layers
    if not 1 <= layers < total:
        raise ConfigError(f"distill: student layers {layers} must be in [1, {total - 1}]")
    keep = (
        [round(i * (total - 1) / max(layers - 1, 1)) for i in range(layers)] if layers > 1 else [0]
    )
    student = copy.deepcopy(teacher)
    path, blocks = find_decoder_blocks(student) or _no_decoder_layers(student)
    student.set_submodule(path, torch.nn.ModuleList([blocks[i] for i in keep]))
    for i, layer in enumerate(student.get_submodule(path)):
        layer.self_attn.layer_idx = i  # the KV cache indexes layers by position
    student.config.num_hidden_layers = layers
    if getattr(student.config, "layer_types", None):
        student.config.layer_types = [student.config.layer_types[i] for i in keep]
    return student


def _no_decoder_layers(model: Any) -> Any:
    raise ConfigError(f"distill: {type(model).__name__} has no recognisable decoder layers")


def keep_zeros_during_training(model: Any) -> int:
    """Mask the gradient of every Linear weight at its exact zeros; return how many.

    With zero gradient (and no weight decay) Adam-family optimizers never move those
    weights, so a pruned student stays exactly as sparse as it was.
    """
    import torch

    masked = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            keep = module.weight.detach() != 0
            zeros = int((~keep).sum())
            if zeros:
                module.weight.register_hook(lambda grad, keep=keep: grad * keep)
                masked += zeros
    return masked


def same_weights(a: Any, b: Any) -> bool:
    import torch

    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(
        sa[k].shape == sb[k].shape and torch.equal(sa[k], sb[k]) for k in sa
    )


class KnowledgeDistillation:
    """Distill the finetuned model into a smaller student: the current model or a
    shallower copy of it."""

    name = "kd"

    class Config(StrategyConfig):
        # Decoder layers the student keeps (a shallower copy of the current model), or
        # None: the student is the current model as an earlier prune step left it.
        layers: int | None = Field(None, ge=1)
        alpha: float = Field(0.5, ge=0, le=1)
        temperature: float = Field(2.0, gt=0)
        steps: int = Field(100, ge=1)
        batch_size: int = Field(8, ge=1)
        seq_len: int = Field(64, ge=8)
        lr: float = Field(1e-3, gt=0)
        # As a training section's `precision`: auto is bf16 on a GPU or CPU with native
        # bf16, on a CPU only for a student at least 512 wide (bench/cpu_bf16.py).
        precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"

        @field_validator("precision")
        @classmethod
        def _device_has_it(cls, value: str) -> str:
            # The training loop refuses it too, but only once this step is reached.
            if value == "fp16":
                import torch

                if not torch.cuda.is_available():
                    raise ValueError("fp16 needs a CUDA GPU; use fp32 or auto on a CPU")
            return value

    def __init__(self, config: Config) -> None:
        self.config = config

    def distill(self, model: Any, ctx: CompressContext) -> tuple[Any, dict[str, float]]:
        import torch
        import torch.nn.functional as F

        from unbottle.training import TrainParams, get_registry, rng, train

        c = self.config
        teacher = ctx.teacher if ctx.teacher is not None else copy.deepcopy(model)
        teacher.eval()
        if c.layers is not None:
            student = shallow_copy_of(model, c.layers)
        elif same_weights(model, teacher):
            raise ConfigError(
                "distill kd: the student would be the teacher itself; set `layers` for a "
                "shallower student, or put a prune step (e.g. structured) before distill"
            )
        else:
            student = model
        student.requires_grad_(True)
        masked = keep_zeros_during_training(student)
        held_out = list(ctx.calibration)
        teacher_loss = _held_out_loss(teacher, held_out)
        before = _held_out_loss(student, held_out)

        generator = rng(ctx.seed + 2)

        def next_batch(step: int) -> dict[str, torch.Tensor]:
            ids = ctx.training_windows(c.batch_size, c.seq_len, generator)
            return {"input_ids": ids, "labels": ids}

        def loss_fn(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
            out = model(**batch)
            with torch.no_grad():
                teacher_logits = teacher(input_ids=batch["input_ids"]).logits  # (B, T, V)
            t = c.temperature
            kl = (
                F.kl_div(
                    F.log_softmax(out.logits / t, dim=-1),
                    F.log_softmax(teacher_logits / t, dim=-1),
                    log_target=True,
                    reduction="batchmean",
                )
                / batch["input_ids"].shape[1]
            )  # per token, like the cross-entropy
            return c.alpha * t * t * kl + (1 - c.alpha) * out.loss

        params = TrainParams(
            steps=c.steps,
            batch_size=c.batch_size,
            seq_len=c.seq_len,
            lr=c.lr,
            warmup_steps=min(10, c.steps // 10),
            weight_decay=0.0,
            precision=c.precision,
            log_every=max(1, c.steps // 5),
        )
        student, _ = train(
            student, next_batch, params, registry=get_registry(), desc="distill", loss_fn=loss_fn
        )
        after = _held_out_loss(student, held_out)
        gap_before, gap_after = before - teacher_loss, after - teacher_loss
        return student, {
            "student_layers": student.config.num_hidden_layers,
            "student_parameters": sum(p.numel() for p in student.parameters()),
            "teacher_parameters": sum(p.numel() for p in teacher.parameters()),
            "zeros_kept": masked,
            "teacher_perplexity": math.exp(teacher_loss),
            "student_perplexity_before": math.exp(before),
            "student_perplexity_after": math.exp(after),
            # Share of the loss gap to the teacher that distillation closed.
            "gap_recovered": (1 - gap_after / gap_before) if gap_before > 0 else 0.0,
        }


@hookimpl
def register_distillers(register):
    register(KnowledgeDistillation)
