"""Training memory: an estimate before the run starts, and the measured peak after.

The estimate adds up, per process:

- weights (every parameter and buffer, at its dtype), plus the low-precision copies that
  autocast caches for the matmuls under bf16/fp16;
- gradients of the trainable parameters, and DDP's gradient buckets (a second copy);
- the optimizer state, as the optimizer strategy reports it (``state_bytes``), or 8 bytes
  per trainable parameter (Adam-like) when it does not say;
- activations saved for the backward pass, counted per token and per decoder layer for a
  Llama-style block (RMSNorm, attention through a fused SDPA kernel, SwiGLU MLP). This is
  the accounting of Korthikanti et al., 2022, "Reducing Activation Recomputation in Large
  Transformer Models" (section 4.1), redone for that block: per layer and token,
  ``9h + 2h_kv + 4i + heads`` saved values (h hidden, h_kv key/value width, i MLP width),
  ``2 * heads * s`` more with eager attention, which keeps the attention matrix; plus the
  final norm (``3h``), the logits and their log-softmax (``2V``), and in the backward pass
  one layer's activation gradients and the logits' gradient (``V``) at a time.
  With gradient checkpointing only each layer's input (``h``) stays, and one layer's
  activations are rebuilt at a time in the backward pass.

``tests/test_training.py`` checks the activation count against the tensors autograd
really saves (``torch.autograd.graph.saved_tensors_hooks``) on a small model.

The peak is measured, not estimated: on a CPU the process's peak resident set
(``VmHWM``, reset at the start of training through ``/proc/self/clear_refs``), on a GPU the
caching allocator's peak (``torch.cuda.max_memory_allocated``).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from unbottle.core.contract.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from unbottle.core.config.params import TrainParams

log = logging.getLogger("unbottle.memory")


@dataclass
class MemoryEstimate:
    weights: int
    gradients: int
    optimizer: int
    activations: int
    transient: int  # gradients of activations, logits' gradient, DDP buckets
    processes_sharing: int = 1  # processes of this run that share the device's memory

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations + self.transient

    def parts(self) -> str:
        return ", ".join(
            f"{name} {human(getattr(self, name))}"
            for name in ("weights", "gradients", "optimizer", "activations", "transient")
        )


def human(size: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.2f} GiB"


def activation_values_per_token(config: Any, seq_len: int, *, checkpointing: bool) -> dict:
    """Activation values per token for a Llama-style decoder (see the module docstring).

    ``saved``: what the forward pass leaves for the backward pass, the logits included;
    ``layer``: one decoder layer's share, which the backward pass holds again as
    gradients (and, with checkpointing, as the recomputed layer). Values, not bytes.
    """
    h = config.hidden_size
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    h_kv = h // heads * kv_heads
    i = getattr(config, "intermediate_size", 4 * h)
    layers = config.num_hidden_layers
    layer = 9 * h + 2 * h_kv + 4 * i + heads
    if getattr(config, "_attn_implementation", "sdpa") == "eager":
        layer += 2 * heads * seq_len
    stack = layers * h if checkpointing else layers * layer
    head = 3 * h + 2 * config.vocab_size  # final norm; logits and their log-softmax
    return {"stack": stack, "head": head, "layer": layer}


def estimate(
    model: torch.nn.Module,
    cfg: TrainParams,
    *,
    micro_batch: int,
    mixed_precision: str,
    optimizer_strategy: Any,
    world_size: int,
    sharded: bool = False,
) -> MemoryEstimate:
    """What one process needs to train ``model`` with ``cfg`` (works on a meta-device model)."""
    params = list(model.parameters())
    unique = {id(p): p for p in params}.values()  # tied weights count once
    trainable = [p for p in unique if p.requires_grad]
    weights = sum(p.numel() * p.element_size() for p in unique)
    weights += sum(b.numel() * b.element_size() for b in model.buffers())
    gradients = sum(p.numel() * p.element_size() for p in trainable)
    state_bytes = getattr(optimizer_strategy, "state_bytes", None)
    optimizer = (
        int(state_bytes(trainable))
        if callable(state_bytes)
        else sum(2 * p.numel() * p.element_size() for p in trainable)
    )
    low_precision = mixed_precision in ("bf16", "fp16")
    if low_precision:  # autocast's cached half-precision copies of the matmul weights
        weights += sum(2 * p.numel() for p in unique if p.dim() >= 2)
    if sharded:
        weights, gradients, optimizer = (
            x // max(world_size, 1) for x in (weights, gradients, optimizer)
        )

    config = getattr(model, "config", None)
    tokens = micro_batch * cfg.seq_len
    activations = transient = 0
    if config is not None and hasattr(config, "num_hidden_layers"):
        counts = activation_values_per_token(
            config, cfg.seq_len, checkpointing=cfg.grad_checkpointing
        )
        value_bytes = 2 if low_precision else 4
        # The head's logits are upcast to fp32 for the loss whatever the precision.
        activations = tokens * (counts["stack"] * value_bytes + counts["head"] * 4)
        # Backward: one layer's activation gradients (plus the layer rebuilt, with
        # checkpointing) and the logits' gradient at a time.
        rebuilt = 2 if cfg.grad_checkpointing else 1
        transient = tokens * (rebuilt * counts["layer"] * value_bytes + config.vocab_size * 4)
    if world_size > 1 and not sharded:
        transient += gradients  # DDP's gradient buckets
    return MemoryEstimate(weights, gradients, optimizer, activations, transient)


def available_bytes(device: torch.device) -> tuple[int, str]:
    """Free memory of ``device`` and a name for it."""
    import torch

    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free), f"GPU {device.index or 0} ({torch.cuda.get_device_name(device)})"
    import psutil

    return int(psutil.virtual_memory().available), "this machine's RAM"


def check(
    plan: MemoryEstimate, device: torch.device, *, key: str, enabled: bool, announce: bool = True
) -> None:
    """Refuse a run that cannot fit, unless ``<key>.memory_check`` is false; log the
    estimate when ``announce`` (the fail-fast setup checks quietly, the stage says it)."""
    free, where = available_bytes(device)
    # On a CPU every local process of the run draws on the same RAM.
    sharing = local_world_size() if device.type == "cpu" else 1
    plan.processes_sharing = sharing
    need = plan.total * sharing
    who = f"; per process, x {sharing} processes" if sharing > 1 else ""
    if announce and int(os.environ.get("RANK", "0")) == 0:
        log.info(
            "memory: need about %s (%s%s), %s free on %s",
            human(need),
            plan.parts(),
            who,
            human(free),
            where,
        )
    if need > free and enabled:
        raise ConfigError(
            f"{key}: training needs about {human(need)} ({plan.parts()}{who}) "
            f"but {where} has {human(free)} free; lower {key}.batch_size or seq_len, "
            f"raise {key}.grad_accum_steps, set {key}.grad_checkpointing=true, or set "
            f"{key}.memory_check=false to try anyway"
        )


def local_world_size() -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))


class PeakMemory:
    """The peak memory of this process from :meth:`start` on."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def start(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:  # "5" resets the peak RSS (VmHWM) to the current RSS (Linux >= 4.0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass  # then the peak counts from the process start

    def read(self) -> int:
        import torch

        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
