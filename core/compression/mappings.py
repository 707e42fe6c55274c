"""Which layers of a decoder block share an input, in what order, and what feeds them.

One table, :data:`ARCHITECTURES`, keyed by the Hugging Face ``config.model_type``: a new
architecture is one entry. The block-by-block calibration pass
(:mod:`unbottle.core.compression.calibration`) reads it to know where the decoder blocks
are and which Linears it compresses together, in the order the data reaches them; methods
that rescale input channels (AWQ, SmoothQuant) read the *feeder* of each group: the module
whose output is the group's input, into which a per-channel scale can be folded.

The model is llm-compressor's ``modifiers/awq/mappings.py`` (a smooth layer and the
layers it balances, per architecture), extended with the block path and the data-flow
order the sequential pass needs. For the Llama family (Llama, Mistral, Qwen2, Qwen3, SmolLM):

    q/k/v_proj   <- input_layernorm            (an RMSNorm: scale its weight)
    o_proj       <- v_proj, through attention  (only without grouped-query attention)
    gate/up_proj <- post_attention_layernorm
    down_proj    <- up_proj, through act(gate) * up

A feeder is usable only when its output channels are the group's input channels one for
one; with grouped-query attention a v_proj output channel feeds several o_proj input
channels, so :func:`feeder_of` reports no feeder for o_proj there (llm-compressor skips
that mapping for the same reason).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from unbottle.core.contract.errors import ConfigError

#: The Linears of a Llama-family decoder block: what pruners and quantizers select by
#: default (a regex over full module names).
DEFAULT_LAYERS = r"\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$"


@dataclass(frozen=True)
class LayerGroup:
    """Linears of a block that read the same input, and the module that produces it.

    Names are relative to the block (``"self_attn.q_proj"``). ``feeder`` is None when no
    module's output is the group's input channel for channel (nothing to fold into).
    """

    linears: tuple[str, ...]
    feeder: str | None


@dataclass(frozen=True)
class Architecture:
    """Where a model's decoder blocks are and how data flows through one of them."""

    #: Dotted path from the model to the ModuleList of decoder blocks.
    blocks: str
    #: The block's Linear groups in the order a forward pass reaches them.
    groups: tuple[LayerGroup, ...]
    #: The norm after the last block, whose output is the output head's input.
    final_norm: str = "model.norm"
    #: The output head (the Linear from hidden states to vocabulary logits).
    head: str = "lm_head"

    @property
    def linears(self) -> tuple[str, ...]:
        """Every Linear the groups name, in data-flow order."""
        return tuple(name for group in self.groups for name in group.linears)


LLAMA = Architecture(
    blocks="model.layers",
    groups=(
        LayerGroup(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "input_layernorm"),
        LayerGroup(("self_attn.o_proj",), "self_attn.v_proj"),
        LayerGroup(("mlp.gate_proj", "mlp.up_proj"), "post_attention_layernorm"),
        LayerGroup(("mlp.down_proj",), "mlp.up_proj"),
    ),
)

#: ``config.model_type`` -> its block layout. Add an architecture here, nowhere else.
ARCHITECTURES: dict[str, Architecture] = {
    "llama": LLAMA,
    "mistral": LLAMA,
    "qwen2": LLAMA,
    "qwen3": LLAMA,  # q_norm/k_norm inside the attention change nothing here
}


def architecture_of(model: Any, what: str = "layer-wise calibration") -> Architecture:
    """The table entry for ``model``, checked against its modules; a ConfigError otherwise."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    arch = ARCHITECTURES.get(str(model_type))
    if arch is None:
        raise ConfigError(
            f"{what} supports the architectures in unbottle.compression.ARCHITECTURES "
            f"({', '.join(sorted(ARCHITECTURES))}); got {type(model).__name__} "
            f"(model_type {model_type!r})"
        )
    blocks = _get(model, arch.blocks)
    missing = [
        name
        for name in (*arch.linears, *(g.feeder for g in arch.groups if g.feeder))
        if blocks is None or len(blocks) == 0 or _get(blocks[0], name) is None
    ]
    if missing:
        raise ConfigError(
            f"{what}: {type(model).__name__} does not have the layout of model_type "
            f"{model_type!r} ({arch.blocks}[i].{missing[0]} is missing)"
        )
    return arch


def decoder_blocks(model: Any, what: str = "layer-wise calibration") -> Any:
    """The ModuleList of the model's decoder blocks, from :data:`ARCHITECTURES`."""
    return _get(model, architecture_of(model, what).blocks)


def find_decoder_blocks(model: Any) -> tuple[str, Any] | None:
    """(dotted path, ModuleList) of the decoder blocks of any transformers model, or None.

    The table's path for known architectures; otherwise the ModuleList as long as the
    config's layer count (GPT-2's ``transformer.h``, for instance).
    """
    import torch

    arch = ARCHITECTURES.get(str(getattr(getattr(model, "config", None), "model_type", None)))
    if arch is not None:
        blocks = _get(model, arch.blocks)
        if blocks is not None:
            return arch.blocks, blocks
    count = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == count:
            return name, module
    return None


def find_linears(model: Any, pattern: str) -> list[tuple[str, Any]]:
    """The Linear layers whose full names match the regex ``pattern``, in model order.

    The output head is never one: it shares its matrix with the embedding in tied
    models and is the layer most sensitive to pruning and rounding, so it is compressed
    only when asked for by name (the quantizers' ``quantize_head``, :func:`output_head`).
    An empty list when nothing matches: the caller says which option was wrong.
    """
    import torch

    regex = re.compile(pattern)
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name != "lm_head" and regex.search(name)
    ]


def output_head(model: Any, *, untie: bool = False) -> tuple[str, Any]:
    """(full name, Linear) of the model's output head.

    With ``untie``, a head that shares its matrix with the input embeddings gets a copy of
    its own and the config records ``tie_word_embeddings: false``, so the head can be
    rewritten (quantized) while the embedding table keeps its float values, and a model
    saved from here loads back untied.
    """
    import torch

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    name = next((n for n, m in model.named_modules() if m is head), None)
    if not isinstance(head, torch.nn.Linear) or name is None:
        raise ConfigError(f"{type(model).__name__} has no Linear output head to quantize")
    embeddings = model.get_input_embeddings()
    if untie and embeddings is not None and head.weight is embeddings.weight:
        head.weight = torch.nn.Parameter(head.weight.detach().clone(), requires_grad=False)
        model.config.tie_word_embeddings = False
    return name, head


def feeder_of(block: Any, group: LayerGroup) -> Any | None:
    """The module whose output channels are ``group``'s input channels one for one, or None.

    Its output width must equal the group's input width: a norm's weight, or a Linear's
    output features.
    """
    if group.feeder is None:
        return None
    feeder = _get(block, group.feeder)
    width = _get(block, group.linears[0]).in_features
    out = getattr(feeder, "out_features", None)
    if out is None:
        weight = getattr(feeder, "weight", None)
        out = None if weight is None or weight.dim() != 1 else weight.shape[0]
    return feeder if out == width else None


def _get(root: Any, dotted: str) -> Any | None:
    node = root
    for part in dotted.split("."):
        node = getattr(node, part, None)
        if node is None:
            return None
    return node
