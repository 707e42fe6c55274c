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

Under a parallelism strategy each process holds a share (:class:`Split`, which the
strategy gives): FSDP shards weights, gradients and optimizer state over its processes
and gathers a layer (and prefetches the next) at a time; tensor parallelism splits the
attention and MLP projections, and those activations that are their outputs, over its
processes (the residual stream, the norms, the embeddings and the head stay whole);
pipeline parallelism gives each stage its decoder layers (the embedding to the first, the
final norm and head to the last) and the activations of the micro-batches in flight on it
(GPipe: all of a step's; 1F1B: at most the stages after it, Narayanan et al., 2021). The
estimate is that of the process with the most to hold.

``tests/test_training.py`` checks the activation count against the tensors autograd
really saves (``torch.autograd.graph.saved_tensors_hooks``) on a small model.

The peak is measured, not estimated: on a CPU the process's peak resident set
(``VmHWM``, reset at the start of training through ``/proc/self/clear_refs``), on a GPU the
caching allocator's peak (``torch.cuda.max_memory_allocated``).
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from unbottle.core.contract.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from unbottle.core.config.schema import TrainParams

log = logging.getLogger("unbottle.memory")


#: The projections tensor parallelism splits (Megatron-LM's column/row pairs).
TP_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Split:
    """How a run's work is cut into per-process shares (see the module docstring)."""

    data: int = 1  # ways the global batch splits (DDP, FSDP, a mesh's dp)
    shard: int = 1  # ways weights, gradients and optimizer state are sharded (FSDP)
    tensor: int = 1  # ways the decoder layers' projections are split (TP)
    pipeline: int = 1  # pipeline stages
    microbatches: int = 1  # pipeline micro-batches per step
    schedule: str = "gpipe"  # gpipe or 1f1b: how many micro-batches a stage holds
    buckets: bool = False  # DDP's gradient buckets (a second copy of the gradients)


def stage_layers(layers: int, stages: int) -> list[range]:
    """Decoder layers of each pipeline stage: contiguous, the first stages one longer."""
    base, extra = divmod(layers, stages)
    bounds = [0]
    for s in range(stages):
        bounds.append(bounds[-1] + base + (1 if s < extra else 0))
    return [range(bounds[s], bounds[s + 1]) for s in range(stages)]


def _layer_of(name: str) -> int | None:
    match = re.search(r"(?:^|\.)layers\.(\d+)\.", name)
    return int(match.group(1)) if match else None


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
    split: Split | None = None,
) -> MemoryEstimate:
    """What one process needs to train ``model`` with ``cfg`` (works on a meta-device model).

    ``split`` is the parallelism's share; by default DDP over ``world_size`` processes
    (FSDP with ``sharded``). With pipeline stages it is the stage with the most to hold.
    """
    if split is None:
        split = Split(
            data=world_size,
            shard=world_size if sharded else 1,
            buckets=world_size > 1 and not sharded,
        )
    config = getattr(model, "config", None)
    layers = getattr(config, "num_hidden_layers", None)
    stages = stage_layers(layers, split.pipeline) if layers and split.pipeline > 1 else None
    return max(
        (
            _estimate_share(model, cfg, micro_batch, mixed_precision, optimizer_strategy, split, s)
            for s in (range(split.pipeline) if stages else [None])
        ),
        key=lambda plan: plan.total,
    )


def _estimate_share(
    model: Any,
    cfg: TrainParams,
    micro_batch: int,
    mixed_precision: str,
    optimizer_strategy: Any,
    split: Split,
    stage: int | None,
) -> MemoryEstimate:
    """One process's estimate: pipeline stage ``stage`` (None: the whole model)."""
    config = getattr(model, "config", None)
    layers = getattr(config, "num_hidden_layers", 0) or 0
    owned = stage_layers(layers, split.pipeline)[stage] if stage is not None else None
    last = stage is None or stage == split.pipeline - 1

    def holds(name: str) -> bool:
        if stage is None:
            return True
        index = _layer_of(name)
        if index is not None:
            return index in owned
        if "embed_tokens" in name:
            return stage == 0
        return last  # the final norm and the head

    mine: dict[int, tuple[Any, int]] = {}  # tied weights count once per process
    for name, p in model.named_parameters(remove_duplicate=False):
        if holds(name) and id(p) not in mine:
            split_here = split.tensor > 1 and name.rsplit(".", 2)[-2] in TP_PROJECTIONS
            mine[id(p)] = (p, split.tensor if split_here else 1)
    all_unique = {id(p): p for p in model.parameters()}.values()

    def size(p: Any, ways: int) -> int:
        return p.numel() * p.element_size() // ways

    weights = sum(size(p, ways) for p, ways in mine.values())
    weights += sum(b.numel() * b.element_size() for b in model.buffers())
    trainable = [(p, ways) for p, ways in mine.values() if p.requires_grad]
    gradients = sum(size(p, ways) for p, ways in trainable)
    all_trainable = [p for p in all_unique if p.requires_grad]
    whole_gradients = sum(p.numel() * p.element_size() for p in all_trainable)
    state_bytes = getattr(optimizer_strategy, "state_bytes", None)
    whole_optimizer = (
        int(state_bytes(all_trainable))
        if callable(state_bytes)
        else sum(2 * p.numel() * p.element_size() for p in all_trainable)
    )
    # The optimizer state follows the parameters: this process's share of them.
    optimizer = whole_optimizer * gradients // whole_gradients if whole_gradients else 0
    low_precision = mixed_precision in ("bf16", "fp16")
    if low_precision:  # autocast's cached half-precision copies of the matmul weights
        weights += sum(2 * p.numel() // ways for p, ways in mine.values() if p.dim() >= 2)
    transient = 0
    if split.shard > 1:
        per_layer = [0] * max(layers, 1)
        for name, p in model.named_parameters():
            index = _layer_of(name)
            if index is not None:
                per_layer[index] += p.numel() * p.element_size() // split.tensor
        weights, gradients, optimizer = (x // split.shard for x in (weights, gradients, optimizer))
        # FSDP gathers one layer's weights (and prefetches the next) and holds its full
        # gradients until they are reduce-scattered.
        transient += 3 * max(per_layer)

    tokens = micro_batch * cfg.seq_len
    activations = 0
    if config is not None and hasattr(config, "num_hidden_layers"):
        h = config.hidden_size
        counts = activation_values_per_token(
            config, cfg.seq_len, checkpointing=cfg.grad_checkpointing
        )
        layer = counts["layer"]
        if split.tensor > 1:
            # The projections' outputs and the attention (2h + 2h_kv + 4i + heads, and the
            # eager attention matrix) split; the residual stream and the norms (7h) do not.
            layer = 7 * h + (layer - 7 * h) // split.tensor
        stack_layers = len(owned) if owned is not None else layers
        stack = stack_layers * (h if cfg.grad_checkpointing else layer)
        head = counts["head"] if last else 0
        value_bytes = 2 if low_precision else 4
        in_flight = 1
        if stage is not None:
            # Rows of a pipeline micro-batch; GPipe keeps every micro-batch's activations
            # until the backward passes, 1F1B at most (stages - stage) of them.
            tokens = tokens // split.microbatches
            in_flight = split.microbatches
            if split.schedule == "1f1b":
                in_flight = min(split.microbatches, split.pipeline - stage)
        # The head's logits are upcast to fp32 for the loss whatever the precision.
        activations = in_flight * tokens * (stack * value_bytes + head * 4)
        # Backward: one layer's activation gradients (plus the layer rebuilt, with
        # checkpointing) and the logits' gradient at a time.
        rebuilt = 2 if cfg.grad_checkpointing else 1
        logits_grad = config.vocab_size * 4 if last else 0
        transient += tokens * (rebuilt * layer * value_bytes + logits_grad)
    if split.buckets:
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
