"""Structured pruning that physically shrinks a Llama-family decoder: attention heads, FFN
channels and whole decoder layers are removed, not masked, so the result has a smaller
config, fewer parameters and does less work per token.

Hugging Face Llama configs give every layer the same shape, so each kind of unit is cut
by the same *count* in every layer, while *which* units go is chosen per layer from one
calibration pass over the dense model (:func:`measure_importance`):

* **Attention heads** are scored by the energy of their contribution to the attention
  output, sum over tokens of ||W_o[:, h] z_h||^2 (z_h: head h's attention output). With
  grouped-query attention a query head belongs to one K/V head, and all groups must stay
  the same size, so heads go either as whole K/V groups (``kv_heads``: the group and its
  query heads, scored by the sum of their energies) or the same number of query heads
  from every group (``heads``; K/V projections stay). When every query head has its own
  K/V head (plain multi-head attention) the two are the same thing.
* **FFN channels** j are scored by ||a_j||_2 * ||W_down[:, j]||_2, the norm of the
  channel's activation act(gate_j) * up_j over the calibration tokens times the norm of
  the column it writes back with: Wanda's |W| * ||X|| for the channel as a whole.
* **Decoder layers** go as one contiguous run of n layers, the run whose input and output
  hidden states are closest in angular distance arccos(cos(x_l, x_{l+n})) / pi (Gromov et
  al., 2024, "The Unreasonable Ineffectiveness of the Deeper Layers"), averaged here over
  all calibration tokens rather than the last one only.

:func:`apply_plan` then rebuilds the Linear layers with the kept rows and columns, drops
the layers, renumbers the attention modules' ``layer_idx`` (the KV cache indexes layers
by position) and updates the config, so ``save_pretrained`` writes a model that plain
``AutoModelForCausalLM.from_pretrained`` loads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from unbottle.compression import architecture_of, decoder_blocks

if TYPE_CHECKING:
    import torch


@dataclass
class Shape:
    """The attention and FFN dimensions shared by every layer of the model."""

    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int

    @classmethod
    def of(cls, model: Any) -> Shape:
        config = model.config
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(
            layers=config.num_hidden_layers,
            heads=heads,
            kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            intermediate=config.intermediate_size,
        )

    @property
    def group_size(self) -> int:
        """Query heads per K/V head."""
        return self.heads // self.kv_heads


@dataclass
class Cut:
    """How many units go from every layer (the same counts everywhere)."""

    layers: int = 0  # decoder layers, one contiguous run
    kv_heads: int = 0  # K/V heads per layer, each with its query heads
    heads_per_group: int = 0  # query heads per remaining K/V group
    channels: int = 0  # FFN channels per layer


@dataclass
class Importance:
    """Per-layer scores from one pass of the calibration data through the dense model."""

    head_energy: list[torch.Tensor]  # per layer: (heads,)
    channel_score: list[torch.Tensor]  # per layer: (intermediate,)
    #: run_distance[l]: angular distance between the input of layer l and the output of
    #: layer l + span - 1, for the span the cut removes (empty when it removes none).
    run_distance: list[float] = field(default_factory=list)


@dataclass
class Plan:
    """What stays: the kept units of each kept layer, by their original indices."""

    removed_layers: list[int]
    kept_kv_heads: dict[int, list[int]]
    kept_heads: dict[int, list[int]]  # query heads, grouped by their K/V head, in order
    kept_channels: dict[int, list[int]]


def measure_importance(
    model: Any, calibration: Sequence[torch.Tensor], *, span: int, batch_size: int = 8
) -> Importance:
    """Head energies, FFN channel scores and, for removing ``span`` consecutive layers,
    the angular distance across each run, from the dense model on ``calibration``."""
    import torch

    blocks = decoder_blocks(model)
    shape = Shape.of(model)
    count = len(blocks)
    head_energy = [torch.zeros(shape.heads, dtype=torch.float64) for _ in range(count)]
    channel_sq = [torch.zeros(shape.intermediate, dtype=torch.float64) for _ in range(count)]
    distance_sum = [0.0] * max(count - span + 1, 0)
    tokens = 0
    states: dict[int, torch.Tensor] = {}  # boundary index -> hidden states (B, T, H)

    def on_attention_output(index: int) -> Any:
        def hook(module: Any, args: tuple[Any, ...]) -> None:
            z = args[0].reshape(-1, shape.heads, shape.head_dim).float()  # (N, heads, d)
            w = module.weight.reshape(-1, shape.heads, shape.head_dim)  # (hidden, heads, d)
            per_head = torch.einsum("nhd,ohd->nho", z, w)  # (N, heads, hidden)
            head_energy[index] += per_head.pow(2).sum((0, 2)).double()

        return hook

    def on_ffn_activation(index: int) -> Any:
        def hook(_module: Any, args: tuple[Any, ...]) -> None:
            a = args[0].reshape(-1, args[0].shape[-1]).float()  # (N, intermediate)
            channel_sq[index] += a.pow(2).sum(0).double()

        return hook

    def angular(a: torch.Tensor, b: torch.Tensor) -> float:
        cos = torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1)  # (B, T)
        return float(torch.arccos(cos.clamp(-1.0, 1.0)).sum() / torch.pi)

    def on_block_input(index: int) -> Any:
        def hook(_module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if span and index == 0:
                states[0] = args[0] if args else kwargs["hidden_states"]

        return hook

    def on_block_output(index: int) -> Any:
        def hook(_module: Any, _args: Any, _kwargs: Any, output: Any) -> None:
            if not span:
                return
            hidden = output[0] if isinstance(output, tuple) else output
            states[index + 1] = hidden
            start = index + 1 - span
            if start >= 0:
                distance_sum[start] += angular(states.pop(start), hidden)

        return hook

    handles = []
    for i, block in enumerate(blocks):
        handles += [
            block.self_attn.o_proj.register_forward_pre_hook(on_attention_output(i)),
            block.mlp.down_proj.register_forward_pre_hook(on_ffn_activation(i)),
            block.register_forward_pre_hook(on_block_input(i), with_kwargs=True),
            block.register_forward_hook(on_block_output(i), with_kwargs=True),
        ]
    ids = torch.cat([c.reshape(1, -1) for c in calibration])  # (N, T)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, ids.shape[0], batch_size):
                batch = ids[start : start + batch_size]  # (B, T)
                states.clear()
                model.model(input_ids=batch, use_cache=False)
                tokens += batch.numel()
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    channel_score = [
        channel_sq[i].sqrt().float() * blocks[i].mlp.down_proj.weight.norm(dim=0)
        for i in range(count)
    ]
    return Importance(
        head_energy=[e.float() for e in head_energy],
        channel_score=channel_score,
        run_distance=[d / tokens for d in distance_sum] if span else [],
    )


def plan_cut(shape: Shape, cut: Cut, importance: Importance) -> Plan:
    """The units to keep: the most important ones of each layer, in their original order."""
    import torch

    removed: list[int] = []
    if cut.layers:
        start = min(range(len(importance.run_distance)), key=importance.run_distance.__getitem__)
        removed = list(range(start, start + cut.layers))
    kept_kv: dict[int, list[int]] = {}
    kept_heads: dict[int, list[int]] = {}
    kept_channels: dict[int, list[int]] = {}
    g = shape.group_size
    for layer in (i for i in range(shape.layers) if i not in removed):
        energy = importance.head_energy[layer]  # (heads,)
        groups = energy.reshape(shape.kv_heads, g)  # (kv_heads, group): a group's heads
        keep_groups = torch.topk(groups.sum(1), shape.kv_heads - cut.kv_heads).indices
        kept_kv[layer] = sorted(keep_groups.tolist())
        heads: list[int] = []
        for group in kept_kv[layer]:
            best = torch.topk(groups[group], g - cut.heads_per_group).indices
            heads += sorted(group * g + h for h in best.tolist())
        kept_heads[layer] = heads
        scores = importance.channel_score[layer]
        best_channels = torch.topk(scores, shape.intermediate - cut.channels).indices
        kept_channels[layer] = sorted(best_channels.tolist())
    return Plan(removed, kept_kv, kept_heads, kept_channels)


def _linear(weight: torch.Tensor, bias: torch.Tensor | None, like: Any) -> Any:
    """A Linear holding ``weight`` (out, in) and ``bias``, trainable like ``like``."""
    import torch

    out_features, in_features = weight.shape
    new = torch.nn.Linear(in_features, out_features, bias=bias is not None, device="meta")
    trainable = like.weight.requires_grad
    new.weight = torch.nn.Parameter(weight.clone(), requires_grad=trainable)
    if bias is not None:
        new.bias = torch.nn.Parameter(bias.clone(), requires_grad=trainable)
    return new


def _rows(linear: Any, index: torch.Tensor) -> Any:
    """The Linear with only the given output rows."""
    bias = linear.bias[index] if linear.bias is not None else None
    return _linear(linear.weight[index], bias, linear)


def _columns(linear: Any, index: torch.Tensor) -> Any:
    """The Linear with only the given input columns."""
    return _linear(linear.weight[:, index], linear.bias, linear)


def _head_rows(heads: Sequence[int], head_dim: int) -> torch.Tensor:
    import torch

    return torch.tensor([h * head_dim + k for h in heads for k in range(head_dim)])


def apply_plan(model: Any, plan: Plan) -> None:
    """Shrink ``model`` in place to what ``plan`` keeps, config included."""
    import torch

    shape = Shape.of(model)
    blocks = decoder_blocks(model)
    kept_layers = [i for i in range(shape.layers) if i not in plan.removed_layers]
    heads = len(plan.kept_heads[kept_layers[0]])
    kv_heads = len(plan.kept_kv_heads[kept_layers[0]])
    channels = len(plan.kept_channels[kept_layers[0]])
    with torch.no_grad():
        for i in kept_layers:
            attn, mlp = blocks[i].self_attn, blocks[i].mlp
            query = _head_rows(plan.kept_heads[i], shape.head_dim)
            kv = _head_rows(plan.kept_kv_heads[i], shape.head_dim)
            attn.q_proj = _rows(attn.q_proj, query)
            attn.k_proj = _rows(attn.k_proj, kv)
            attn.v_proj = _rows(attn.v_proj, kv)
            attn.o_proj = _columns(attn.o_proj, query)
            attn.num_key_value_groups = heads // kv_heads
            channel = torch.tensor(plan.kept_channels[i])
            mlp.gate_proj = _rows(mlp.gate_proj, channel)
            mlp.up_proj = _rows(mlp.up_proj, channel)
            mlp.down_proj = _columns(mlp.down_proj, channel)
            mlp.intermediate_size = channels
    path = architecture_of(model).blocks
    model.set_submodule(path, torch.nn.ModuleList([blocks[i] for i in kept_layers]))
    for position, block in enumerate(model.get_submodule(path)):
        block.self_attn.layer_idx = position  # the KV cache indexes layers by position
    config = model.config
    config.head_dim = shape.head_dim  # no longer hidden_size // heads
    config.num_attention_heads = heads
    config.num_key_value_heads = kv_heads
    config.intermediate_size = channels
    config.num_hidden_layers = len(kept_layers)
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in kept_layers]
