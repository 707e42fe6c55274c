"""The training loop shared by pretrain, finetune and the ``kd`` distiller.

It runs through ``accelerate.Accelerator`` from the start: the parallelism strategy builds
the accelerator (one process, DDP), or shards the model itself (FSDP, tensor, pipeline,
2D: a ``ModelParallelStrategy``), the optimizer strategy builds the optimizer, and the loop
never changes when either does. Everything that can be wrong with a run
(precision for the device, world size, batch split, sequence length, memory) is checked
before the first step, each failure one line naming the key to change.

Data. ``batch_size`` is the global batch of one optimizer step. Each step draws the ids of
the whole global batch from one generator seeded from params, on every process alike;
process ``r`` then builds only its own slice of rows, split again into
``grad_accum_steps`` micro-batches. So a step sees the same examples whatever the number
of processes, and saving the generator's state saves the data order.

Loss. The default loss is the model's causal-LM cross-entropy summed over the micro-batch
and divided by the number of label tokens in the *global* batch (summed over processes
first), so gradient accumulation and DDP, which averages gradients over processes,
reproduce the gradient of one big batch exactly, padding or not. A custom ``loss_fn``
returns a per-micro-batch mean instead.

Checkpoints (``core/training/checkpoint.py``) are written every ``checkpoint_every`` steps; a
rerun of the same run finds the newest whole one and continues from it, bit for bit.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from unbottle.core.contract.errors import ConfigError
from unbottle.core.contract.strategies import DataSplit

if TYPE_CHECKING:
    import torch

    from unbottle.core.config.schema import TrainParams
    from unbottle.core.registry import Registry
    from unbottle.core.training.checkpoint import CheckpointStore
    from unbottle.core.training.memory import MemoryEstimate

log = logging.getLogger("unbottle.train")
IGNORE_INDEX = -100  # label value that cross-entropy skips

# TrainParams keys that do not change the weights a run ends with: a checkpoint taken under
# other values of these still resumes.
_NOT_IN_RUN_KEY = (
    "log_every",
    "checkpoint_every",
    "keep_checkpoints",
    "checkpoint_dir",
    "clear_checkpoints",
    "memory_check",
    # continued pretraining's measurement of the source and the result (replay_text and
    # replay_fraction do change the weights, and stay in)
    "reference_text",
    "reference_tokens",
    "max_reference_ratio",
)

LossFn = Callable[["torch.nn.Module", dict[str, "torch.Tensor"]], "torch.Tensor"]


@dataclass
class TrainReport:
    losses: list[float] = field(default_factory=list)  # one per optimizer step, from step 1
    tokens: int = 0  # tokens trained on, all steps (before a resume too)
    session_tokens: int = 0  # tokens trained on in this process's run, for the rate
    seconds: float = 0.0  # wall time of this process's run of the loop
    cpu_seconds: float = 0.0  # CPU time of this process (all its threads) in the loop
    precision: str = "fp32"
    precision_reason: str = ""
    world_size: int = 1
    resumed_from: int = 0  # the checkpoint step this run continued from (0: a fresh start)
    peak_memory_bytes: int = 0
    memory: MemoryEstimate | None = None

    @property
    def tokens_per_second(self) -> float:
        return self.session_tokens / self.seconds if self.seconds > 0 else 0.0

    def curve(self, every: int = 1) -> list[dict[str, float]]:
        return [
            {"step": i + 1, "loss": round(loss, 6)}
            for i, loss in enumerate(self.losses)
            if (i + 1) % every == 0 or i == 0 or i + 1 == len(self.losses)
        ]

    def metrics(self) -> dict[str, Any]:
        """The figures every training stage reports."""
        return {
            "final_loss": self.losses[-1],
            "tokens_per_s": self.tokens_per_second,
            "train_seconds": self.seconds,
            "train_cpu_seconds": self.cpu_seconds,
            "train_tokens": self.tokens,
            "precision": self.precision,
            "world_size": self.world_size,
            "resumed_from_step": self.resumed_from,
            "peak_memory_bytes": self.peak_memory_bytes,
            "estimated_memory_bytes": self.memory.total if self.memory else 0,
        }


@dataclass
class Batches:
    """A training set of ``size`` examples, sampled with replacement.

    ``collate(ids)`` builds the batch of the examples with those ids: a dict of (rows, T)
    tensors with ``input_ids`` and, for the default loss, ``labels`` (and
    ``attention_mask`` when rows are padded). ``seed`` seeds the sampling order.
    """

    size: int
    collate: Callable[[list[int]], dict[str, torch.Tensor]]
    seed: int


def mix_batches(main: Batches, replay: Batches, fraction: float, *, key: str = "replay") -> Batches:
    """``main``'s examples with ``replay``'s mixed in: each row drawn comes from
    ``replay`` with probability ``fraction``, whatever the two sets' sizes. Training a
    pretrained model further on a narrow corpus with some of what it was trained on
    replayed is the usual remedy for forgetting (Ibrahim et al., "Simple and Scalable
    Strategies to Continually Pre-train Large Language Models", 2024).

    Ids below ``main.size`` are ``main``'s examples; the ``round(main.size * fraction /
    (1 - fraction))`` ids after them are spread evenly over ``replay``'s, so a uniform
    draw lands in ``replay`` with probability ``fraction`` (to within one id in the
    total). A micro-batch holds its ``main`` rows first, then its ``replay`` rows, so the
    two sets' rows must have the same keys and widths: a ``ConfigError`` naming ``key``
    says so, here for their first rows and in training for any later ones.
    """
    import torch

    if not 0 < fraction < 1:
        raise ValueError(f"mix_batches: fraction {fraction} is not between 0 and 1")
    extra = max(1, round(main.size * fraction / (1 - fraction)))

    def stack(own: dict[str, torch.Tensor], replayed: dict[str, torch.Tensor]) -> dict:
        check_same_rows(own, replayed, key)
        return {name: torch.cat([own[name], replayed[name]]) for name in own}

    def collate(ids: list[int]) -> dict[str, torch.Tensor]:
        own = [i for i in ids if i < main.size]
        replayed = [(i - main.size) * replay.size // extra for i in ids if i >= main.size]
        if not replayed:
            return main.collate(own)
        if not own:
            return replay.collate(replayed)
        return stack(main.collate(own), replay.collate(replayed))

    stack(main.collate([0]), replay.collate([0]))  # a mismatch fails before any training
    return Batches(size=main.size + extra, collate=collate, seed=main.seed)


def check_same_rows(own: dict[str, Any], replayed: dict[str, Any], key: str) -> None:
    """The rows of two sets can share a batch: the same keys, the same widths."""
    if set(own) != set(replayed):
        raise ConfigError(
            f"{key}: the objective's rows from the corpus have the keys {sorted(own)} and "
            f"from the replay text {sorted(replayed)}; replay needs the same keys in both"
        )
    for name in own:
        if own[name].shape[1:] != replayed[name].shape[1:]:
            raise ConfigError(
                f"{key}: the objective's {name} rows are {tuple(own[name].shape[1:])} from "
                f"the corpus and {tuple(replayed[name].shape[1:])} from the replay text; "
                "replay needs an objective whose rows have one width"
            )


#: On a CPU, ``precision: auto`` picks bf16 only for models at least this wide (hidden
#: size). Narrower ones trained hardly faster in bf16 than in fp32, if at all, on a CPU
#: with AMX: 0.82x at the demo's 128, 0.97x at 256, 1.08x at 384, against 1.24x at 512
#: and 1.66x at 768 (bench/cpu_bf16.py, BENCHMARKS.md): their matmuls are too small to
#: pay for autocast's casts, and the demo's tiny model scored lower in bf16.
CPU_BF16_MIN_WIDTH = 512


def resolve_precision(requested: str, key: str = "train", model: Any = None) -> tuple[str, str]:
    """Pick accelerate's mixed-precision mode for this device, and say why.

    ``key`` names the params section in error messages (``finetune.train``). ``model``
    (its config's ``hidden_size``) lets ``auto`` keep a narrow model in fp32 on a CPU,
    where bf16 does not pay for it (:data:`CPU_BF16_MIN_WIDTH`)."""
    import torch

    cuda = torch.cuda.is_available()
    if requested == "fp16" and not cuda:
        raise ConfigError(f"{key}.precision: fp16 needs a CUDA GPU; use fp32 or auto on a CPU")
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
    native = cpu_bf16_instructions()
    width = getattr(getattr(model, "config", None), "hidden_size", None)
    if native is not None and isinstance(width, int) and width < CPU_BF16_MIN_WIDTH:
        return "no", (
            f"auto: fp32, because the model's hidden size ({width}) is below "
            f"{CPU_BF16_MIN_WIDTH}: on a CPU, bf16 autocast trains models that narrow no "
            "faster than fp32"
        )
    if native is not None:
        return "bf16", f"auto: the CPU has native bf16 ({native})"
    return "no", (
        "auto: fp32, because this CPU has no native bf16 (AMX or AVX512-BF16) and emulated "
        "bf16 autocast made a training step about 20x slower on one"
    )


def cpu_bf16_instructions() -> str | None:
    """The CPU's native bf16 matmul instructions ("AMX", "AVX512-BF16"), or None.

    Asked of torch's own CPU feature checks, the ones its oneDNN kernels go by; torch's
    dispatch capability string says "AVX512" with or without the bf16 extension."""
    import torch

    def has(check: str) -> bool:
        probe = getattr(torch.cpu, check, None)  # private in torch 2.x: absent is "no"
        return bool(probe and probe())

    if has("_is_amx_tile_supported"):
        return "AMX"
    if has("_is_avx512_bf16_supported"):
        return "AVX512-BF16"
    return None


# ------------------------------------------------------------------ processes


def world_size() -> int:
    """Processes of this run, as the launcher (torchrun, accelerate launch) set them."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    """Only the main process writes artifacts, metrics and checkpoint manifests."""
    return rank() == 0


def main_process_value(value: Any) -> Any:
    """``value`` as the main process has it, on every process of the run."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return value


def barrier() -> None:
    """Wait for every process of the run (nothing to wait for with one process)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def micro_batch_size(cfg: TrainParams, processes: int, key: str) -> int:
    """Rows per micro-batch in each process; the global batch must split evenly."""
    parts = processes * cfg.grad_accum_steps
    if cfg.batch_size % parts:
        raise ConfigError(
            f"{key}.batch_size: {cfg.batch_size} does not split over {processes} process"
            f"{'es' if processes > 1 else ''} x {cfg.grad_accum_steps} accumulation steps; "
            f"use a multiple of {parts}"
        )
    return cfg.batch_size // parts


# ------------------------------------------------------------------ checkpoints


def run_key(cfg: TrainParams, *, stage: str, identity: dict[str, Any]) -> str:
    """A hash of everything that decides the weights a run ends with.

    ``identity`` holds what the stage adds: the hashes of its inputs, the model and
    method config, the seed. The process count is part of it: a resume under another
    world size would not be bit-identical.
    """
    train = {k: v for k, v in cfg.model_dump(mode="json").items() if k not in _NOT_IN_RUN_KEY}
    text = json.dumps(
        {"stage": stage, "train": train, "identity": identity, "world_size": world_size()},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(text.encode()).hexdigest()


def checkpoint_store(
    cfg: TrainParams,
    *,
    stage: str,
    out_dir: Path,
    identity: dict[str, Any],
    keep_last: bool = False,
) -> CheckpointStore | None:
    """Where the stage's run keeps its checkpoints, or None when they are off.

    By default ``artifacts/.checkpoints/<stage>/<run key>/``: beside the stage's artifact
    (which is replaced whole, so checkpoints cannot live inside it) and out of DVC's outs.
    ``keep_last`` checkpoints the last step too (:class:`CheckpointStore`).
    """
    from unbottle.core.training.checkpoint import FOLDER, CheckpointStore

    if cfg.checkpoint_every == 0:
        return None
    root = cfg.checkpoint_dir or Path(out_dir).parent / FOLDER / Path(out_dir).name
    key = run_key(cfg, stage=stage, identity=identity)
    return CheckpointStore(
        Path(root).resolve(),
        key,
        every=cfg.checkpoint_every,
        keep=cfg.keep_checkpoints,
        keep_last=keep_last,
    )


# ------------------------------------------------------------------ setup pieces


def build_schedule(optimizer: Any, cfg: TrainParams) -> Any:
    """Warmup, then cosine decay to ``min_lr_ratio * lr``, linear decay to 0, or constant."""
    from transformers import (
        get_constant_schedule_with_warmup,
        get_cosine_with_min_lr_schedule_with_warmup,
        get_linear_schedule_with_warmup,
    )

    warmup = min(cfg.warmup_steps, cfg.steps)
    if cfg.schedule == "cosine":
        return get_cosine_with_min_lr_schedule_with_warmup(
            optimizer,
            num_warmup_steps=warmup,
            num_training_steps=cfg.steps,
            min_lr_rate=cfg.min_lr_ratio,
        )
    if cfg.schedule == "linear":
        return get_linear_schedule_with_warmup(
            optimizer, num_warmup_steps=warmup, num_training_steps=cfg.steps
        )
    return get_constant_schedule_with_warmup(optimizer, num_warmup_steps=warmup)


def check_context(model: Any, seq_len: int, key: str) -> None:
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if context is not None and seq_len > context:
        raise ConfigError(
            f"{key}.seq_len: {seq_len} is longer than the model's context ({context}); "
            f"use at most {context}"
        )


def prepare_method(method: Any, model: Any, key: str) -> Any:
    """``method.prepare(model)`` (a finetune method: what trains), its errors naming
    ``key``. Methods name their options ``finetune.method.<option>`` in messages; the same
    methods serve ``pretrain.continued.method``, whose messages must name that key."""
    try:
        return method.prepare(model)
    except ConfigError as e:
        text, default = str(e), "finetune.method"
        if key == default or not text.startswith(default):
            raise
        raise ConfigError(key + text[len(default) :]) from None


def weightless_trainable(method: Any, skeleton: Any, key: str) -> Any | None:
    """What ``method`` would train of a weightless (meta) model, for the memory estimate;
    None when the method cannot wrap one (it is then checked on the loaded model)."""
    try:
        return prepare_method(method, skeleton, key)
    except ConfigError:
        raise
    except Exception as e:
        log.debug("%s: %s could not prepare a meta model (%s)", key, method.name, e)
        return None


def _enable_grad_checkpointing(model: Any, key: str) -> None:
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ConfigError(f"{key}.grad_checkpointing: this model does not support it; set it false")
    # Non-reentrant checkpointing works with DDP, frozen inputs and adapters alike.
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def estimate_memory(
    model: Any,
    cfg: TrainParams,
    *,
    registry: Registry,
    key: str,
    device: torch.device | None = None,
    processes: int | None = None,
    announce: bool = True,
) -> MemoryEstimate:
    """Estimate the run's memory and refuse it when it cannot fit (see core/training/memory.py).

    Works on a model built on the meta device, so a stage can check before it allocates.
    """
    import torch

    from unbottle.core.training import memory

    processes = processes or world_size()
    mixed_precision, _ = resolve_precision(cfg.precision, key, model)
    parallel = registry.create("parallelism", cfg.parallelism.name, cfg.parallelism.options)
    sharded = hasattr(parallel, "parallelize") or cfg.parallelism.name == "fsdp"
    _refuse_sharded_adapters(model, parallel.name, sharded=sharded, key=key)
    check_model = getattr(parallel, "check_model", None)
    if check_model is not None:  # a model-parallel strategy: mesh and shapes first
        check_model(model, cfg, key)
    split = parallel.memory_split(processes) if hasattr(parallel, "memory_split") else None
    if device is None:
        on_cpu = bool(cfg.parallelism.options.get("cpu")) or not torch.cuda.is_available()
        local = int(os.environ.get("LOCAL_RANK", "0"))  # one GPU per local process
        device = torch.device("cpu") if on_cpu else torch.device("cuda", local)
    plan = memory.estimate(
        model,
        cfg,
        micro_batch=micro_batch_size(cfg, split.data if split else processes, key),
        mixed_precision=mixed_precision,
        optimizer_strategy=registry.create("optimizer", cfg.optimizer.name, cfg.optimizer.options),
        world_size=processes,
        sharded=cfg.parallelism.name == "fsdp",
        split=split,
    )
    memory.check(plan, device, key=key, enabled=cfg.memory_check, announce=announce)
    return plan


# ------------------------------------------------------------------ the loop


def train(
    model: torch.nn.Module,
    data: Batches | Callable[[int], dict[str, torch.Tensor]],
    cfg: TrainParams,
    *,
    registry: Registry,
    desc: str,
    loss_fn: LossFn | None = None,
    checkpoints: CheckpointStore | None = None,
    key: str | None = None,
    memory_estimate: MemoryEstimate | None = None,
) -> tuple[torch.nn.Module, TrainReport]:
    """Train ``model`` for ``cfg.steps`` optimizer steps on ``data``.

    ``data`` is a :class:`Batches` or, for callers that sample themselves, a function
    ``step -> global batch`` (no resume of the data order then, so no checkpoints).
    ``key`` names the params section in error messages (default ``<desc>.train``).
    Returns the trained, unwrapped model (on every process) and the report.
    """
    from unbottle.core.progress import progress_bar
    from unbottle.core.training.memory import PeakMemory

    key = key or f"{desc}.train"
    if checkpoints is not None and not isinstance(data, Batches):
        raise ValueError("checkpoints need Batches: a sampling function's order cannot be saved")
    run = _setup(
        model,
        data,
        cfg,
        registry=registry,
        desc=desc,
        key=key,
        loss_fn=loss_fn,
        checkpoints=checkpoints,
        memory_estimate=memory_estimate,
    )
    start_step = _resume_run(run)
    run.prepared.train()
    peak = PeakMemory(run.accelerator.device)
    peak.start()
    run.clock = (time.perf_counter(), time.process_time())
    title = desc if start_step == 0 else f"{desc} (from step {start_step})"
    bar = progress_bar(title, total=cfg.steps - start_step) if run.rank == 0 else _no_bar()
    with bar as advance:
        for step in range(start_step, cfg.steps):
            value, tokens = _train_step(run, step)
            _log_step(run, step + 1, value, tokens, advance)
            if checkpoints is not None and checkpoints.due(step + 1, cfg.steps):
                _save_checkpoint(run, step + 1)
    run.report.peak_memory_bytes = peak.read()
    return _finish(run), run.report


@dataclass
class _Run:
    """What a training run holds between its steps (built by :func:`_setup`)."""

    cfg: TrainParams
    data: Batches | Callable[[int], dict[str, torch.Tensor]]
    desc: str
    registry: Registry
    loss_fn: LossFn | None
    checkpoints: CheckpointStore | None
    parallel: Any  # the parallelism strategy
    accelerator: Any
    data_split: DataSplit  # the data-parallel groups the global batch splits over
    micro: int  # rows per micro-batch in this process
    sharding: bool  # a model-parallel strategy sharded the model itself
    fsdp: bool
    prepared: Any  # the model as accelerate (or the sharding strategy) prepared it
    forward: Any  # what a micro-batch goes through: the prepared model, maybe compiled
    optimizer: Any  # accelerate's wrapper (it steps the gradient scaler)
    inner_optimizer: Any  # the strategy's own optimizer
    scheduler: Any
    report: TrainReport
    generator: torch.Generator | None  # draws the data order of a Batches run
    clock: tuple[float, float] = (0.0, 0.0)  # wall and CPU time when the steps began

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    def say(self, *args: Any) -> None:
        """One voice for the whole run: the main process logs, the others only debug."""
        (log.info if self.rank == 0 else log.debug)(*args)


def _setup(
    model: Any,
    data: Batches | Callable[[int], dict[str, torch.Tensor]],
    cfg: TrainParams,
    *,
    registry: Registry,
    desc: str,
    key: str,
    loss_fn: LossFn | None,
    checkpoints: CheckpointStore | None,
    memory_estimate: MemoryEstimate | None,
) -> _Run:
    """Check everything that can be wrong with the run, then build accelerator and optimizer."""
    mixed_precision, reason = resolve_precision(cfg.precision, key, model)
    parallel = registry.create("parallelism", cfg.parallelism.name, cfg.parallelism.options)
    # A model-parallel strategy (ModelParallelStrategy) shards the model itself.
    sharding = hasattr(parallel, "parallelize")
    if sharding:
        parallel.check_model(model, cfg, key)
        if loss_fn is not None and hasattr(parallel, "forward_backward"):
            raise ConfigError(
                f"{key}.parallelism: '{parallel.name}' trains with the causal-LM loss only; "
                "use ddp, fsdp, tp or hybrid here"
            )
    accelerator = parallel.accelerator(mixed_precision=mixed_precision)
    processes, this_rank = accelerator.num_processes, accelerator.process_index
    data_split = parallel.data_split() if sharding else DataSplit(processes, this_rank)
    micro = micro_batch_size(cfg, data_split.size, key)
    fsdp = accelerator.distributed_type.value == "FSDP"
    _check_model(model, cfg, parallel.name, sharded=fsdp or sharding, key=key, desc=desc)
    plan = memory_estimate or estimate_memory(
        model, cfg, registry=registry, key=key, device=accelerator.device, processes=processes
    )
    prepared, forward, optimizer, inner_optimizer, scheduler = _prepare(
        model, cfg, registry, parallel, accelerator, key=key
    )
    run = _Run(
        cfg=cfg,
        data=data,
        desc=desc,
        registry=registry,
        loss_fn=loss_fn,
        checkpoints=checkpoints,
        parallel=parallel,
        accelerator=accelerator,
        data_split=data_split,
        micro=micro,
        sharding=sharding,
        fsdp=fsdp,
        prepared=prepared,
        forward=forward,
        optimizer=optimizer,
        inner_optimizer=inner_optimizer,
        scheduler=scheduler,
        report=TrainReport(
            precision=mixed_precision if mixed_precision != "no" else "fp32",
            precision_reason=reason,
            world_size=processes,
            memory=plan,
        ),
        generator=_data_generator(data),
    )
    run.say("%s: precision %s (%s), %d process(es)", desc, run.report.precision, reason, processes)
    return run


def _refuse_sharded_adapters(model: Any, parallelism: str, *, sharded: bool, key: str) -> None:
    # Checked before the strategy's own checks of the model, which would not recognise
    # the adapters' wrapper and say something less useful.
    if sharded and hasattr(model, "peft_config"):
        raise ConfigError(
            f"{key}.parallelism: {parallelism} cannot merge a peft adapter at the end of "
            "training; use ddp or single with a lora method"
        )


def _check_model(
    model: Any, cfg: TrainParams, parallelism: str, *, sharded: bool, key: str, desc: str
) -> None:
    check_context(model, cfg.seq_len, key)
    _refuse_sharded_adapters(model, parallelism, sharded=sharded, key=key)
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError(f"{desc}: no parameter is trainable")


def _prepare(
    model: Any, cfg: TrainParams, registry: Registry, parallel: Any, accelerator: Any, *, key: str
) -> tuple[Any, Any, Any, Any, Any]:
    """The model sharded or wrapped for the run's processes, what a micro-batch goes
    through, the optimizer (accelerate's wrapper and the strategy's own) and the schedule."""
    import torch

    if cfg.grad_checkpointing:
        _enable_grad_checkpointing(model, key)
    optimizer_strategy = registry.create("optimizer", cfg.optimizer.name, cfg.optimizer.options)
    sharding = hasattr(parallel, "parallelize")
    if sharding:  # the optimizer is built over the shards
        model = parallel.parallelize(model, accelerator.device)
    optimizer = optimizer_strategy.build(
        [p for p in model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=cfg.weight_decay
    )
    if sharding:
        prepared, optimizer = model, accelerator.prepare(optimizer)
    else:
        prepared, optimizer = accelerator.prepare(model, optimizer)
    inner_optimizer = getattr(optimizer, "optimizer", optimizer)
    # Stepped here, not through accelerate: accelerate steps a prepared scheduler once per
    # process, as if each process's data loader were shorter; our batch is global already.
    scheduler = build_schedule(inner_optimizer, cfg)
    forward = torch.compile(prepared) if cfg.compile else prepared
    if sharding:  # not wrapped by accelerate, so its autocast is applied here
        forward = accelerator.autocast()(forward)
    return prepared, forward, optimizer, inner_optimizer, scheduler


def _data_generator(data: Any) -> torch.Generator | None:
    import torch

    return torch.Generator().manual_seed(data.seed) if isinstance(data, Batches) else None


def _resume_run(run: _Run) -> int:
    """Continue from the run's newest whole checkpoint, if any: the step to start from."""
    from unbottle.core.training.checkpoint import restore_rng

    if run.checkpoints is None:
        return 0
    restored = _load_checkpoint(
        run.checkpoints, run.prepared, run.inner_optimizer, run.rank, run.parallel
    )
    if restored is None:
        return 0
    state = restored.trainer
    run.scheduler.load_state_dict(state["scheduler"])
    scaler = run.accelerator.scaler
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    restore_rng(restored, run.generator)
    run.report.resumed_from = restored.step
    run.report.losses = list(state["losses"])
    run.report.tokens = int(state["tokens"])
    run.say("%s: resuming from %s", run.desc, restored.path)
    return restored.step


def _micro_batches(run: _Run, step: int) -> list[dict[str, torch.Tensor]]:
    """This process's micro-batches of the global batch of ``step``."""
    import torch

    cfg, data, micro = run.cfg, run.data, run.micro
    per_process = cfg.batch_size // run.data_split.size
    group_rank = run.data_split.rank  # which rows of the global batch are this process's
    if isinstance(data, Batches):
        ids = torch.randint(0, data.size, (cfg.batch_size,), generator=run.generator).tolist()
        mine = ids[group_rank * per_process : (group_rank + 1) * per_process]
        return [
            data.collate(mine[j * micro : (j + 1) * micro]) for j in range(cfg.grad_accum_steps)
        ]
    batch = data(step)
    rows = next(iter(batch.values())).shape[0]
    if rows != cfg.batch_size:
        raise ValueError(f"{run.desc}: the batch function gave {rows} rows, not {cfg.batch_size}")
    first = group_rank * per_process
    return [
        {k: v[first + j * micro : first + (j + 1) * micro] for k, v in batch.items()}
        for j in range(cfg.grad_accum_steps)
    ]


def _all_sum(run: _Run, values: list[float]) -> list[float]:
    """Sum over the data-parallel groups (one small all-reduce)."""
    if run.data_split.size == 1:
        return values
    import torch
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64, device=run.accelerator.device)
    dist.all_reduce(tensor, group=run.data_split.group)
    return tensor.tolist()


def _train_step(run: _Run, step: int) -> tuple[float, int]:
    """One optimizer step on the global batch of ``step`` (from 0): its loss and tokens."""
    import torch

    device = run.accelerator.device
    parts = [{k: v.to(device) for k, v in b.items()} for b in _micro_batches(run, step)]
    local_tokens = sum(_token_count(b) for b in parts)
    label_tokens = 0
    if run.loss_fn is None:
        # Label tokens of the global batch: every micro-batch's loss is a share of one mean
        # over them.
        (label_tokens,) = _all_sum(run, [sum(_label_count(b) for b in parts)])
        label_tokens = max(int(label_tokens), 1)
    loss_sum = torch.zeros((), device=device)
    if hasattr(run.parallel, "forward_backward"):  # the strategy runs the step (pipeline)
        loss_sum += run.parallel.forward_backward(run.prepared, parts, label_tokens)
        parts = []
    for j, batch in enumerate(parts):
        last = j == len(parts) - 1
        sync = contextlib.nullcontext() if last else run.accelerator.no_sync(run.prepared)
        with sync:
            loss, scaled = _micro_batch_loss(run, batch, label_tokens, len(parts))
            run.accelerator.backward(scaled)
        loss_sum += loss.detach()
    _optimizer_step(run)
    loss_total, tokens = _all_sum(run, [float(loss_sum), float(local_tokens)])
    value = loss_total if run.loss_fn is None else loss_total / run.data_split.size
    if not math.isfinite(value):
        raise FloatingPointError(f"{run.desc}: loss became {value} at step {step + 1}")
    return value, int(tokens)


def _micro_batch_loss(
    run: _Run, batch: dict[str, torch.Tensor], label_tokens: int, parts: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A micro-batch's share of the step's loss, and what to backpropagate."""
    if run.loss_fn is not None:
        loss = run.loss_fn(run.forward, batch) / parts
        return loss, loss
    # use_cache=False only where it is needed (checkpointing warns otherwise): without a
    # cache object transformers builds the causal mask with vmap instead of letting SDPA
    # apply it, a few percent of a small model's step.
    extra = {"use_cache": False} if run.cfg.grad_checkpointing else {}
    loss = run.forward(**batch, num_items_in_batch=label_tokens, **extra).loss
    # DDP and FSDP average gradients over the data-parallel groups; the shares must add up.
    groups = run.data_split.size
    return loss, (loss * groups if groups > 1 else loss)


def _optimizer_step(run: _Run) -> None:
    """Clip, step optimizer and schedule, and clear the gradients."""
    if run.cfg.grad_clip > 0:
        _clip_gradients(run)
    if run.accelerator.scaler is None:
        # Straight to the optimizer: accelerate's wrapper looks for an optional package on
        # every step (a millisecond or so), and there is nothing to scale.
        run.inner_optimizer.step()
        run.scheduler.step()
    else:
        run.optimizer.step()  # the scaler unscales, skips a step with inf/nan, rescales
        if not run.optimizer.step_was_skipped:
            run.scheduler.step()
    run.inner_optimizer.zero_grad(set_to_none=True)


def _clip_gradients(run: _Run) -> None:
    import torch

    if run.sharding:  # over every shard, on any mesh
        run.parallel.clip_grad_norm(run.prepared, run.cfg.grad_clip)
        return
    if run.fsdp:  # sharded gradients: accelerate computes the global norm across shards
        run.accelerator.clip_grad_norm_(run.prepared.parameters(), run.cfg.grad_clip)
        return
    if run.accelerator.scaler is not None:
        run.accelerator.unscale_gradients()  # clip the true gradients, not the scaled ones
    # torch's own, as accelerate does for plain tensors (without its per-step checks).
    params = [p for p in run.prepared.parameters() if p.requires_grad]
    torch.nn.utils.clip_grad_norm_(params, run.cfg.grad_clip)


def _log_step(run: _Run, step: int, value: float, tokens: int, advance: Any) -> None:
    """Record step ``step`` (from 1) in the report, the progress bar, the hooks and the log."""
    report, cfg = run.report, run.cfg
    report.losses.append(value)
    report.tokens += tokens
    report.session_tokens += tokens
    report.seconds = time.perf_counter() - run.clock[0]
    report.cpu_seconds = time.process_time() - run.clock[1]
    advance(loss=value, tokens_per_s=report.tokens_per_second)
    lr = run.scheduler.get_last_lr()[0]
    if run.rank == 0:
        run.registry.hook.on_train_log(
            stage=run.desc,
            step=step,
            metrics={"loss": value, "lr": lr, "tokens_per_s": report.tokens_per_second},
        )
    if step % cfg.log_every == 0 or step == cfg.steps:
        run.say(
            "%s step %d/%d loss %.4f lr %.2e %.0f tokens/s",
            run.desc,
            step,
            cfg.steps,
            value,
            lr,
            report.tokens_per_second,
        )


def _save_checkpoint(run: _Run, step: int) -> None:
    """Checkpoint the run after ``step`` steps: weights, optimizer, schedule, data order."""
    assert run.checkpoints is not None
    scaler = run.accelerator.scaler
    # The names the checkpoint's weights go by (wrappers' prefixes stripped, as
    # torch.distributed.checkpoint names them); a tied weight answers to each of its names.
    unwrapped = run.accelerator.unwrap_model(run.prepared)
    trainable_names = {
        name for name, p in unwrapped.named_parameters(remove_duplicate=False) if p.requires_grad
    }
    _write_checkpoint(
        run.checkpoints,
        step=step,
        model=run.prepared,
        trainable_names=trainable_names,
        optimizer=run.inner_optimizer,
        generator=run.generator,
        trainer={
            "losses": run.report.losses,
            "tokens": run.report.tokens,
            "scheduler": run.scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler else None,
        },
        rank=run.rank,
        processes=run.accelerator.num_processes,
        parallel=run.parallel,
    )


def _finish(run: _Run) -> Any:
    """The trained model, unwrapped, in eval mode; the accelerator's memory freed."""
    if run.sharding:
        trained = run.parallel.final_model(run.prepared)
    else:
        trained = _final_model(run.accelerator, run.prepared, run.fsdp)
    if run.cfg.grad_checkpointing:
        trained.gradient_checkpointing_disable()
    trained.eval()
    run.accelerator.free_memory()
    return trained


@contextlib.contextmanager
def _no_bar() -> Any:
    yield lambda **figures: None


def _token_count(batch: dict[str, torch.Tensor]) -> int:
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else batch["input_ids"].numel()


def _label_count(batch: dict[str, torch.Tensor]) -> int:
    labels = batch.get("labels")
    if labels is None:
        raise ValueError("the default loss needs `labels` in every batch")
    return int((labels[:, 1:] != IGNORE_INDEX).sum())  # causal LM: each token predicts the next


def _write_checkpoint(
    store: CheckpointStore,
    *,
    step: int,
    model: Any,
    trainable_names: set[str],
    optimizer: Any,
    generator: Any,
    trainer: dict[str, Any],
    rank: int,
    processes: int,
    parallel: Any = None,
) -> None:
    """Every process takes part (FSDP gathers the shards); the main process commits."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    gather = getattr(parallel, "gather_state", None)
    # cpu_offload leaves the whole state on the main process only; a strategy that
    # gathers the parts itself needs every process's own.
    offload = gather is None
    full = StateDictOptions(full_state_dict=True, cpu_offload=offload)
    trainable = StateDictOptions(
        full_state_dict=True, cpu_offload=offload, ignore_frozen_params=True
    )
    # ignore_frozen_params misses a frozen weight tied to another name (lm_head): filter.
    model_state = {
        k: v
        for k, v in get_model_state_dict(model, options=trainable).items()
        if k in trainable_names
    }
    optimizer_state = get_optimizer_state_dict(model, optimizer, options=full)
    if gather is not None:  # each pipeline stage holds its own weights: put them together
        model_state, optimizer_state = gather(model_state), gather(optimizer_state)
    main = rank == 0
    tmp = store.begin(step) if main else store.partial_dir(step)
    barrier()
    store.write_rank(tmp, rank, generator)
    if main:
        store.write_main(
            tmp, step=step, model=model_state, optimizer=optimizer_state, trainer=trainer
        )
    barrier()
    if main:
        final = store.commit(tmp, step, processes)
        log.info("checkpoint: %s", final)  # main process only
    barrier()


def _load_checkpoint(
    store: CheckpointStore, model: Any, optimizer: Any, rank: int, parallel: Any = None
) -> Any:
    """Load the newest whole checkpoint of this run into model and optimizer, if any."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    step = store.latest_valid() if rank == 0 else None
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [step]
        dist.broadcast_object_list(box, src=0)  # every process resumes from the same step
        step = box[0]
    if step is None:
        return None
    restored = store.load(step, rank)
    local = getattr(parallel, "local_state", None)
    if local is not None:  # a pipeline stage takes its own part of the whole
        restored.model = local(model, restored.model)
        restored.optimizer = local(model, restored.optimizer)
    options = StateDictOptions(full_state_dict=True, strict=False)
    result = set_model_state_dict(model, restored.model, options=options)
    if result.unexpected_keys:
        raise ValueError(
            f"checkpoint {restored.path} has unknown weights {result.unexpected_keys[:3]}"
        )
    set_optimizer_state_dict(
        model, optimizer, restored.optimizer, options=StateDictOptions(full_state_dict=True)
    )
    return restored


def _final_model(accelerator: Any, prepared: Any, fsdp: bool) -> Any:
    """The trained model as a plain module (FSDP: the full weights, on the main process)."""
    # Without the autocast wrapper accelerate put on forward: the stage measures the model
    # it returns in fp32, as the saved weights load.
    unwrapped = accelerator.unwrap_model(prepared, keep_fp32_wrapper=False)
    if not fsdp:
        return unwrapped
    import torch
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(
        prepared, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    if not is_main_process():
        return unwrapped  # only the main process writes the artifact
    from torch.distributed.fsdp import FSDPModule

    # fully_shard swapped the module's class for an FSDP subclass: rebuild the original,
    # on the CPU (its non-persistent buffers, like rotary frequencies, are computed).
    cls = next(c for c in type(unwrapped).__mro__ if not issubclass(c, FSDPModule))
    with torch.device("cpu"):
        plain = cls(unwrapped.config)
    plain.load_state_dict(full)
    return plain


def rng(seed: int) -> Any:
    import torch

    return torch.Generator().manual_seed(seed)
