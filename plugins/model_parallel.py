"""Built-in model parallelism: ``fsdp``, ``tp``, ``pp`` and ``hybrid`` (dp x tp), on a device mesh.

Each shards the model itself, with PyTorch's own distributed APIs, over a
``DeviceMesh`` of the processes torchrun started: gloo on CPUs, NCCL on GPUs, the same
code. The training loop calls them through the ``ModelParallelStrategy`` protocol.

- ``fsdp``: fully sharded data parallel, FSDP2's ``fully_shard`` per decoder layer and
  at the root (Zhao et al., 2023, "PyTorch FSDP"; the ZeRO-3 partitioning of
  Rajbhandari et al., 2020). Each process keeps 1/N of the weights, gradients and
  optimizer state, gathers one layer's weights at a time (all-gather) and
  reduce-scatters its gradients; the batch splits as under DDP.
- ``tp``: tensor parallelism of every decoder layer (Shoeybi et al., 2019,
  "Megatron-LM"): q/k/v and gate/up split by columns, o and down by rows, so each
  process computes heads/N attention heads and 1/N of the MLP, with one all-reduce after
  the attention and one after the MLP, forward and backward. Every process sees the whole
  batch; embeddings, norms and the head are replicated.
- ``pp``: pipeline parallelism (Huang et al., 2019, "GPipe"; 1F1B from Narayanan et al.,
  2021, "Efficient Large-Scale Language Model Training on GPU Clusters Using
  Megatron-LM"): contiguous decoder layers per stage, the embedding on the first and the
  final norm and head on the last, micro-batches streamed through
  ``torch.distributed.pipelining``. A tied embedding's gradient is summed between the
  first and last stage, as Megatron-LM does, so the two copies stay equal.
- ``hybrid``: a 2D mesh, ``dp`` x ``tp``: tensor parallelism inside each group of ``tp``
  processes, FSDP across the ``dp`` groups (Narayanan et al., 2021; PyTorch's 2D recipe).

Launch any of them with ``torchrun --nproc_per_node N -m unbottle stage pretrain -S
pretrain.train.parallelism=tp`` (or ``{name: hybrid, dp: 2, tp: 2}`` in params.yaml).
docs/training.md says when to choose which.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from unbottle import ConfigError, DataSplit, StrategyConfig

if TYPE_CHECKING:
    import torch

log = logging.getLogger("unbottle.train")
_KEY = "train.parallelism"
_LAUNCH = "torchrun --nproc_per_node N -m unbottle stage <stage> ..."


def _world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _check_world(name: str, mesh: dict[str, int], key: str = "train") -> None:
    """The mesh's product must be the number of processes launched."""
    world, product = _world(), 1
    for size in mesh.values():
        product *= size
    if product != world:
        shape = " x ".join(f"{k} {v}" for k, v in mesh.items())
        raise ConfigError(
            f"{key}.parallelism: '{name}' mesh {shape} = {product} processes, but {world} "
            f"{'was' if world == 1 else 'were'} launched; launch {product} "
            f"(`{_LAUNCH}`) or change the mesh"
        )


def _train_key(parallelism_key: str) -> str:
    """``pretrain.train`` of ``pretrain.train.parallelism``: the key _check_world names."""
    return parallelism_key.removesuffix(".parallelism")


def _check_tp(model: Any, tp: int, key: str) -> None:
    """tp must divide the attention heads, the key/value heads and the MLP width."""
    config = getattr(model, "config", None)
    if tp == 1 or config is None:
        return
    heads = config.num_attention_heads
    sizes = {
        "attention heads": heads,
        "key/value heads": getattr(config, "num_key_value_heads", None) or heads,
        "FFN width (intermediate_size)": config.intermediate_size,
    }
    for what, size in sizes.items():
        if size % tp:
            raise ConfigError(
                f"{key}.parallelism.tp: {tp} does not divide the model's {size} {what}; "
                "use a tp that divides heads, key/value heads and intermediate_size"
            )


def _decoder_layers(model: Any, key: str) -> Any:
    from unbottle.compression import find_decoder_blocks

    found = find_decoder_blocks(model)
    # The sharding plans below address the stack by that name.
    if found is None or found[0] != "model.layers":
        raise ConfigError(
            f"{key}.parallelism: this model has no `model.layers` of decoder layers to "
            "shard (a Llama-style causal LM is expected); use ddp"
        )
    return found[1]


def _accelerator(name: str, cpu: bool, mixed_precision: str) -> Any:
    import torch
    from accelerate import Accelerator

    from unbottle.plugins.parallelism import _check_devices, _fresh_state

    if mixed_precision == "fp16":
        raise ConfigError(
            f"{_KEY}: '{name}' does not run fp16 with a gradient scaler; "
            "use precision bf16 (GPUs) or fp32"
        )
    if "LOCAL_RANK" not in os.environ:
        raise ConfigError(f"{_KEY}: '{name}' needs a distributed launch: `{_LAUNCH}`")
    on_cpu = cpu or not torch.cuda.is_available()
    local = int(os.environ.get("LOCAL_WORLD_SIZE", _world()))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if on_cpu and local > (cores or 1):
        # A mesh may need more processes than cores (dp 2 x tp 2 on 2 cores): slower, but
        # the same arithmetic, so CPUs can stand in for a GPU node in tests.
        log.warning("%s: %d processes share %d CPU cores; expect it to be slow", name, local, cores)
    else:
        _check_devices(name, local, cpu=on_cpu)
    _fresh_state()
    # accelerate starts the process group (gloo on CPUs, NCCL on GPUs) and gives the
    # device and autocast; the model is sharded here, never wrapped by accelerate.
    return Accelerator(cpu=on_cpu, mixed_precision=mixed_precision)


def _mesh(accelerator: Any, shape: dict[str, int]) -> Any:
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(
        accelerator.device.type, tuple(shape.values()), mesh_dim_names=tuple(shape)
    )


def _apply_tp(model: Any, mesh: Any) -> None:
    """Megatron-LM's split of each decoder layer over ``mesh``."""
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    plan = {
        "self_attn.q_proj": ColwiseParallel(),
        "self_attn.k_proj": ColwiseParallel(),
        "self_attn.v_proj": ColwiseParallel(),
        "self_attn.o_proj": RowwiseParallel(),
        "mlp.gate_proj": ColwiseParallel(),
        "mlp.up_proj": ColwiseParallel(),
        "mlp.down_proj": RowwiseParallel(),
    }
    for layer in model.model.layers:
        parallelize_module(layer, mesh, plan)
        _replicate(layer.input_layernorm, mesh)
        _replicate(layer.post_attention_layernorm, mesh)
        # The attention reshapes with -1 heads, so it runs heads/tp of them as it is;
        # the counts are set for anything that reads them.
        attention = layer.self_attn
        for attr in ("num_heads", "num_key_value_heads"):
            if hasattr(attention, attr):
                setattr(attention, attr, getattr(attention, attr) // mesh.size())

    tied = model.lm_head.weight is model.model.embed_tokens.weight
    for module in (model.model.embed_tokens, model.model.norm, model.lm_head):
        _replicate(module, mesh)
    if tied:  # replication gave the embedding a new parameter: tie the head to it again
        model.lm_head.weight = model.model.embed_tokens.weight


def _replicate(module: Any, mesh: Any) -> None:
    """Replicate ``module``'s weights over ``mesh`` (DTensors, like the split ones, so that
    one optimizer step takes them all); its inputs and outputs stay plain tensors."""
    from torch.distributed.tensor import DTensor, Replicate, distribute_module

    def inputs(_module: Any, args: tuple, device_mesh: Any) -> tuple:
        return tuple(
            DTensor.from_local(a, device_mesh, [Replicate()], run_check=False)
            if not isinstance(a, DTensor)
            else a
            for a in args
        )

    def outputs(_module: Any, output: Any, _mesh: Any) -> Any:
        return output.to_local() if isinstance(output, DTensor) else output

    distribute_module(module, mesh, input_fn=inputs, output_fn=outputs)


def _apply_fsdp(model: Any, mesh: Any, *, reshard_after_forward: bool, offload: bool) -> None:
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    policy = CPUOffloadPolicy() if offload else OffloadPolicy()
    for layer in model.model.layers:  # one unit per decoder layer: gathered one at a time
        fully_shard(
            layer, mesh=mesh, reshard_after_forward=reshard_after_forward, offload_policy=policy
        )
    fully_shard(
        model, mesh=mesh, reshard_after_forward=reshard_after_forward, offload_policy=policy
    )


def clip_grad_norm(
    parameters: list[Any], max_norm: float, group: Any = None, skip: Any = None
) -> float:
    """Scale the gradients so that their global 2-norm is at most ``max_norm``.

    As ``torch.nn.utils.clip_grad_norm_``, over sharded (DTensor) gradients on any mesh,
    and summed over ``group`` (pipeline stages, which hold different parameters).
    ``skip``: a parameter scaled but left out of the norm (a tied copy counted elsewhere).
    """
    import torch
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    squares = torch.zeros((), dtype=torch.float32)
    for p in parameters:
        if p is skip:
            continue
        if p.grad is None:
            continue
        norm = torch.linalg.vector_norm(p.grad)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        squares += norm.float().cpu() ** 2
    if group is not None:
        device = next(iter(parameters)).device
        squares = squares.to(device)
        dist.all_reduce(squares, group=group)
    total = float(squares.sqrt())
    coefficient = max_norm / (total + 1e-6)
    if coefficient < 1:
        for p in parameters:
            if p.grad is not None:
                p.grad.mul_(coefficient)
    return total


def _plain_model(model_class: type, config: Any, state: dict[str, Any]) -> Any:
    """A fresh, unsharded model of ``model_class`` on the CPU, holding ``state``."""
    import torch

    with torch.device("cpu"):
        plain = model_class(config)
    plain.load_state_dict(state)
    return plain


def _full_state(module: Any, *, main_only: bool = True) -> dict[str, Any]:
    """Every process takes part; the whole state dict, on the CPU (of the main process
    only, or of every process)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(
        module, options=StateDictOptions(full_state_dict=True, cpu_offload=main_only)
    )
    return state if main_only else _to_cpu(state)


def _to_cpu(value: Any) -> Any:
    import torch

    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_cpu(v) for v in value]
    return value


def _is_main() -> bool:
    import torch.distributed as dist

    return dist.get_rank() == 0


class _Sharded:
    """What FSDP, TP and hybrid share: a mesh, DTensor weights, plain model at the end."""

    name = ""
    config: Any
    mesh: Any = None
    split = DataSplit(1, 0)

    def data_split(self) -> DataSplit:
        return self.split

    def clip_grad_norm(self, module: Any, max_norm: float) -> float:
        return clip_grad_norm([p for p in module.parameters() if p.requires_grad], max_norm)

    def final_model(self, module: Any) -> Any:
        state = _full_state(module)
        if not _is_main():
            return module  # only the main process writes the artifact
        return _plain_model(self._model_class, module.config, state)

    def _remember(self, model: Any) -> None:
        from torch.distributed.fsdp import FSDPModule

        # fully_shard swaps the module's class for a subclass: keep the original.
        self._model_class = next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))


class FSDP(_Sharded):
    """Fully sharded data parallel (FSDP2) over every process, CPUs (gloo) or GPUs (NCCL)."""

    name = "fsdp"

    class Config(StrategyConfig):
        processes: int | None = Field(None, ge=1)  # expected world size (None: as launched)
        cpu: bool = False  # gloo on the CPUs even when GPUs are present
        reshard_after_forward: bool = True  # True: ZeRO-3-like; False: keep weights gathered
        cpu_offload: bool = False  # keep sharded weights and optimizer state in CPU RAM

    def __init__(self, config: Config) -> None:
        self.config = config

    def check_launch(self, key: str = _KEY) -> None:
        _check_world(self.name, {"dp": self.config.processes or _world()}, _train_key(key))

    def check_model(self, model: Any, cfg: Any, key: str) -> None:
        _check_world(self.name, {"dp": self.config.processes or _world()}, key)
        _decoder_layers(model, key)

    def accelerator(self, *, mixed_precision: str) -> Any:
        _check_world(self.name, {"dp": self.config.processes or _world()})
        accelerator = _accelerator(self.name, self.config.cpu, mixed_precision)
        self.mesh = _mesh(accelerator, {"dp": accelerator.num_processes})
        self.split = DataSplit(accelerator.num_processes, accelerator.process_index)
        return accelerator

    def parallelize(self, model: Any, device: Any) -> Any:
        self._remember(model)
        model.to(device)
        _apply_fsdp(
            model,
            self.mesh,
            reshard_after_forward=self.config.reshard_after_forward,
            offload=self.config.cpu_offload,
        )
        return model

    def memory_split(self, world_size: int) -> Any:
        from unbottle.training import Split

        return Split(data=world_size, shard=world_size)


class TensorParallel(_Sharded):
    """Tensor parallelism of the attention and MLP projections over every process."""

    name = "tp"

    class Config(StrategyConfig):
        tp: int | None = Field(None, ge=1)  # processes per layer (None: all launched)
        cpu: bool = False

    def __init__(self, config: Config) -> None:
        self.config = config

    def _tp(self) -> int:
        return self.config.tp or _world()

    def check_launch(self, key: str = _KEY) -> None:
        _check_world(self.name, {"tp": self._tp()}, _train_key(key))

    def check_model(self, model: Any, cfg: Any, key: str) -> None:
        _check_world(self.name, {"tp": self._tp()}, key)
        _decoder_layers(model, key)
        _check_tp(model, self._tp(), key)

    def accelerator(self, *, mixed_precision: str) -> Any:
        _check_world(self.name, {"tp": self._tp()})
        accelerator = _accelerator(self.name, self.config.cpu, mixed_precision)
        self.mesh = _mesh(accelerator, {"tp": accelerator.num_processes})
        self.split = DataSplit(1, 0)  # every process sees the whole batch
        return accelerator

    def parallelize(self, model: Any, device: Any) -> Any:
        self._remember(model)
        model.to(device)
        _apply_tp(model, self.mesh)
        return model

    def memory_split(self, world_size: int) -> Any:
        from unbottle.training import Split

        return Split(tensor=world_size)


class Hybrid(_Sharded):
    """2D: tensor parallel inside groups of ``tp`` processes, FSDP across ``dp`` groups."""

    name = "hybrid"

    class Config(StrategyConfig):
        dp: int = Field(..., ge=1)  # data-parallel (FSDP) groups
        tp: int = Field(..., ge=1)  # processes per tensor-parallel group
        cpu: bool = False
        reshard_after_forward: bool = True

    def __init__(self, config: Config) -> None:
        self.config = config

    def _shape(self) -> dict[str, int]:
        return {"dp": self.config.dp, "tp": self.config.tp}

    def check_launch(self, key: str = _KEY) -> None:
        _check_world(self.name, self._shape(), _train_key(key))

    def check_model(self, model: Any, cfg: Any, key: str) -> None:
        _check_world(self.name, self._shape(), key)
        _decoder_layers(model, key)
        _check_tp(model, self.config.tp, key)

    def accelerator(self, *, mixed_precision: str) -> Any:
        _check_world(self.name, self._shape())
        accelerator = _accelerator(self.name, self.config.cpu, mixed_precision)
        self.mesh = _mesh(accelerator, self._shape())
        dp = self.mesh["dp"]
        self.split = DataSplit(dp.size(), dp.get_local_rank(), dp.get_group())
        return accelerator

    def parallelize(self, model: Any, device: Any) -> Any:
        self._remember(model)
        model.to(device)
        _apply_tp(model, self.mesh["tp"])
        _apply_fsdp(
            model,
            self.mesh["dp"],
            reshard_after_forward=self.config.reshard_after_forward,
            offload=False,
        )
        return model

    def memory_split(self, world_size: int) -> Any:
        from unbottle.training import Split

        return Split(data=self.config.dp, shard=self.config.dp, tensor=self.config.tp)


# ---------------------------------------------------------------------- pipeline


def _stage_module(model: Any, layers: range, *, first: bool, last: bool) -> Any:
    """The part of a Llama-style causal LM one pipeline stage runs.

    Parameter names stay those of the whole model (``model.layers.3.…``), so checkpoints
    and the final model are put together by name.
    """
    import torch
    from torch import nn

    class Stage(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.config = model.config
            self.model = nn.Module()
            if first:
                self.model.embed_tokens = model.model.embed_tokens
            self.model.layers = nn.ModuleDict({str(i): model.model.layers[i] for i in layers})
            self.model.rotary_emb = model.model.rotary_emb
            if last:
                self.model.norm = model.model.norm
                self.lm_head = model.lm_head

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            # first: token ids (b, T); later: hidden states (b, T, C)
            hidden = self.model.embed_tokens(x) if first else x  # (b, T, C)
            positions = torch.arange(hidden.shape[1], device=hidden.device)[None]  # (1, T)
            rotary = self.model.rotary_emb(hidden, positions)
            for layer in self.model.layers.values():
                # No mask: SDPA's causal attention. Rows are right-padded, and a causal
                # model's real tokens never attend to the padding after them.
                hidden = layer(hidden, position_ids=positions, position_embeddings=rotary)
                if isinstance(hidden, tuple):
                    hidden = hidden[0]
            if last:
                return self.lm_head(self.model.norm(hidden))  # (b, T, V)
            return hidden

    return Stage()


class PipelineParallel:
    """Pipeline parallelism: decoder layers in stages, one stage per process."""

    name = "pp"

    class Config(StrategyConfig):
        stages: int | None = Field(None, ge=1)  # one per process (None: as launched)
        microbatches: int = Field(2, ge=1)  # per step: more of them, a smaller bubble
        schedule: Literal["gpipe", "1f1b"] = "gpipe"
        cpu: bool = False

    def __init__(self, config: Config) -> None:
        self.config = config
        self.mesh: Any = None

    def _stages(self) -> int:
        return self.config.stages or _world()

    def check_launch(self, key: str = _KEY) -> None:
        _check_world(self.name, {"pp": self._stages()}, _train_key(key))

    def check_model(self, model: Any, cfg: Any, key: str) -> None:
        _check_world(self.name, {"pp": self._stages()}, key)
        layers = len(_decoder_layers(model, key))
        if self._stages() > layers:
            raise ConfigError(
                f"{key}.parallelism.stages: {self._stages()} pipeline stages but the model "
                f"has {layers} decoder layers; use at most {layers}"
            )
        rows = cfg.batch_size // cfg.grad_accum_steps
        if cfg.batch_size % (cfg.grad_accum_steps * self.config.microbatches):
            raise ConfigError(
                f"{key}.parallelism.microbatches: {self.config.microbatches} does not divide "
                f"the {rows} rows of a step's batch (batch_size / grad_accum_steps); use a "
                "divisor of it"
            )
        self._seq_len = cfg.seq_len
        self._vocab = model.config.vocab_size
        self._tied = bool(getattr(model.config, "tie_word_embeddings", False))

    def accelerator(self, *, mixed_precision: str) -> Any:
        _check_world(self.name, {"pp": self._stages()})
        accelerator = _accelerator(self.name, self.config.cpu, mixed_precision)
        self.mesh = _mesh(accelerator, {"pp": accelerator.num_processes})
        self.stage = accelerator.process_index
        return accelerator

    def data_split(self) -> DataSplit:
        return DataSplit(1, 0)

    def parallelize(self, model: Any, device: Any) -> Any:
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

        from unbottle.training import stage_layers

        stages, stage = self.mesh.size(), self.stage
        self._first, self._last = stage == 0, stage == stages - 1
        self._model_class, config = type(model), model.config
        owned = stage_layers(len(model.model.layers), stages)[stage]
        module = _stage_module(model, owned, first=self._first, last=self._last)
        # Free what other stages hold: the caller's model keeps only this stage's parts.
        model.model.layers = type(model.model.layers)(module.model.layers.values())
        if not self._first:
            model.model.embed_tokens = None
        if not self._last:
            model.lm_head = model.model.norm = None
        module.to(device)
        module.config = config
        self._device = device
        self._local_names = {n for n, _ in module.named_parameters(remove_duplicate=False)}
        pipeline = PipelineStage(module, stage, stages, device, group=self.mesh.get_group())
        schedule = ScheduleGPipe if self.config.schedule == "gpipe" else Schedule1F1B
        # Losses are shares of one mean over the global batch: sum them, don't average.
        self._schedule = schedule(
            pipeline, self.config.microbatches, loss_fn=self._loss, scale_grads=False
        )
        return module

    def _loss(self, logits: Any, labels: Any) -> Any:
        from transformers.loss.loss_utils import ForCausalLMLoss

        return ForCausalLMLoss(logits, labels, self._vocab, num_items_in_batch=self._items)

    def forward_backward(self, module: Any, parts: list[dict[str, Any]], num_items: int) -> Any:
        """One step's forward and backward through the pipeline; the loss on every stage."""
        import torch
        import torch.distributed as dist
        import torch.nn.functional as F

        from unbottle.training import IGNORE_INDEX

        # Every micro-batch must have one shape: pad to seq_len on the right (labels
        # ignored there), which a causal model's real tokens never see.
        def padded(key: str, value: int) -> torch.Tensor:
            rows = torch.cat([b[key] for b in parts])  # (b, t)
            return F.pad(rows, (0, self._seq_len - rows.shape[1]), value=value)

        self._items = num_items
        losses: list[Any] = []
        # The logits are not kept for the caller: only the losses are needed.
        keep = {"return_outputs": False}
        if self._first:
            self._schedule.step(
                padded("input_ids", 0),
                target=padded("labels", IGNORE_INDEX),
                losses=losses,
                **keep,
            )
        elif self._last:
            self._schedule.step(target=padded("labels", IGNORE_INDEX), losses=losses, **keep)
        else:
            self._schedule.step(**keep)
        group = self.mesh.get_group()
        if self._tied and self.mesh.size() > 1:
            self._sync_tied(module, group)
        loss = torch.stack(losses).sum() if self._last else torch.zeros((), device=self._device)
        loss = loss.detach().float()
        dist.broadcast(loss, src=dist.get_global_rank(group, self.mesh.size() - 1), group=group)
        return loss

    def _sync_tied(self, module: Any, group: Any) -> None:
        """Sum the tied embedding's gradient over the first and last stage."""
        import torch
        import torch.distributed as dist

        if self._first:
            weight = module.model.embed_tokens.weight
        elif self._last:
            weight = module.lm_head.weight
        else:  # a middle stage adds nothing
            weight = None
        shape = (self._vocab, module.config.hidden_size)
        grad = torch.zeros(shape, device=self._device)
        if weight is not None and weight.grad is not None:
            grad = weight.grad
        dist.all_reduce(grad, group=group)
        if weight is not None:
            weight.grad = grad

    def clip_grad_norm(self, module: Any, max_norm: float) -> float:
        params = [p for p in module.parameters() if p.requires_grad]
        # The tied weight's two copies are counted once, on the first stage.
        skip = module.lm_head.weight if self._tied and self._last and not self._first else None
        return clip_grad_norm(params, max_norm, self.mesh.get_group(), skip=skip)

    # ---- checkpoints and the final model: each stage holds its own names

    def gather_state(self, state: dict[str, Any]) -> dict[str, Any]:
        import torch.distributed as dist

        group = self.mesh.get_group()
        main = dist.get_rank(group) == 0
        parts: list[Any] = [None] * self.mesh.size()
        dist.gather_object(_to_cpu(state), parts if main else None, group=group, group_dst=0)
        if not main:
            return {}  # only the main process writes
        if "param_groups" not in state:
            return {k: v for part in parts for k, v in part.items()}
        merged: dict[str, Any] = {"state": {}, "param_groups": []}
        for part in parts:
            merged["state"].update(part["state"])
            for i, group in enumerate(part["param_groups"]):
                if i == len(merged["param_groups"]):
                    merged["param_groups"].append({**group, "params": []})
                merged["param_groups"][i]["params"] += group["params"]
        return merged

    def local_state(self, module: Any, state: dict[str, Any]) -> dict[str, Any]:
        mine = self._local_names
        if "param_groups" not in state:
            return {k: v for k, v in state.items() if k in mine}
        return {
            "state": {k: v for k, v in state["state"].items() if k in mine},
            "param_groups": [
                {**g, "params": [p for p in g["params"] if p in mine]}
                for g in state["param_groups"]
            ],
        }

    def final_model(self, module: Any) -> Any:
        state = self.gather_state(_full_state(module, main_only=False))
        if not _is_main():
            return module
        return _plain_model(self._model_class, module.config, state)

    def memory_split(self, world_size: int) -> Any:
        from unbottle.training import Split

        return Split(
            pipeline=self.config.stages or world_size,
            microbatches=self.config.microbatches,
            schedule=self.config.schedule,
        )
