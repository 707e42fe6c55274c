"""Built-in finetuning methods: ``full``, ``lora`` (through peft) and ``partial``.

- ``full``: every weight trains.
- ``lora``: low-rank adapters (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large
  Language Models") on the named linear modules, through peft; the base stays frozen.
  At the end the adapter is saved alone (``adapter/`` in the finetune artifact, peft's
  safetensors format) and merged into the base weights, so the stages downstream get a
  plain model.
- ``partial``: only the parameters whose names match the given regular expressions,
  and/or the top k decoder layers, train; the rest is frozen.

Each checks what it names against the model before training and fails in one line.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from unbottle import ConfigError, Regex, StrategyConfig, hookimpl

log = logging.getLogger("unbottle.finetune")


def _log_trainable(method: str, model: Any) -> None:
    params = {id(p): p for p in model.parameters()}.values()
    trainable = sum(p.numel() for p in params if p.requires_grad)
    total = sum(p.numel() for p in params)
    from unbottle.training import is_main_process

    # Said once: the stage's checks before any loading prepare a weightless copy first,
    # and under torchrun every process prepares its own copy.
    once = is_main_process() and not any(p.is_meta for p in params)
    (log.info if once else log.debug)(
        "method %s: %d of %d parameters train (%.2f%%)",
        method,
        trainable,
        total,
        100 * trainable / total,
    )


class Full:
    """Full-parameter finetuning: the whole model trains, nothing is frozen."""

    name = "full"

    class Config(StrategyConfig):
        pass

    def __init__(self, config: Config) -> None:
        self.config = config

    def prepare(self, model: Any) -> Any:
        for parameter in model.parameters():
            parameter.requires_grad_(True)
        return model

    def finalize(self, model: Any, out_dir: Path) -> Any:
        return model


LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class LoRA:
    """Low-rank adapters on the named linear modules; merged into the base at the end."""

    name = "lora"

    class Config(StrategyConfig):
        r: int = Field(8, ge=1)  # rank of each adapter
        alpha: float = Field(16.0, gt=0)  # the update is scaled by alpha / r
        dropout: float = Field(0.0, ge=0, lt=1)
        # Module names, matched as peft does: the whole name or its last dotted parts.
        target_modules: list[str] = Field(default_factory=lambda: list(LLAMA_LINEAR), min_length=1)

    def __init__(self, config: Config) -> None:
        self.config = config

    def prepare(self, model: Any) -> Any:
        import torch
        from peft import LoraConfig, get_peft_model

        linear = {
            name: module
            for name, module in model.named_modules()
            if isinstance(module, (torch.nn.Linear, torch.nn.Embedding))
        }
        for target in self.config.target_modules:
            if not any(name == target or name.endswith(f".{target}") for name in linear):
                leaves = sorted({name.rsplit(".", 1)[-1] for name in linear})
                raise ConfigError(
                    f"finetune.method.target_modules: {target!r} names no linear module of the "
                    f"model; its linear modules are {', '.join(leaves)}"
                )
        config = LoraConfig(
            r=self.config.r,
            lora_alpha=self.config.alpha,
            lora_dropout=self.config.dropout,
            target_modules=list(self.config.target_modules),
            bias="none",
            task_type="CAUSAL_LM",
        )
        peft_model = get_peft_model(model, config)
        # Keep machine paths out of the artifact: the adapter's base is the pretrain stage.
        peft_model.peft_config["default"].base_model_name_or_path = None
        _log_trainable(self.name, peft_model)
        return peft_model

    def finalize(self, model: Any, out_dir: Path) -> Any:
        # The adapter alone first (small; loads onto the pretrained model with peft), then
        # W + (alpha / r) * B @ A folded into each targeted weight for the stages downstream.
        model.save_pretrained(Path(out_dir) / "adapter", safe_serialization=True)
        return model.merge_and_unload()


class Partial:
    """Train only some parameters: those matching regexes and/or the top k decoder layers."""

    name = "partial"

    class Config(StrategyConfig):
        # Regular expressions searched in parameter names, e.g. ["norm", "layers\\.3\\."].
        modules: list[Regex] = Field(default_factory=list)
        top_layers: int = Field(0, ge=0)  # the last k decoder layers train

        @model_validator(mode="after")
        def _something_trains(self) -> Partial.Config:
            if not self.modules and not self.top_layers:
                raise ValueError("modules: give modules (regexes) or top_layers (> 0), or both")
            return self

    def __init__(self, config: Config) -> None:
        self.config = config

    def prepare(self, model: Any) -> Any:
        # remove_duplicate=False: a tied weight answers to each of its names (lm_head too).
        named = list(model.named_parameters(remove_duplicate=False))
        model.requires_grad_(False)
        for pattern in self.config.modules:
            hits = [p for name, p in named if re.search(pattern, name)]
            if not hits:
                raise ConfigError(
                    f"finetune.method.modules: {pattern!r} matches no parameter; names look "
                    f"like {named[0][0]}, {named[-1][0]}"
                )
            for parameter in hits:
                parameter.requires_grad_(True)
        k = self.config.top_layers
        if k:
            layers = decoder_layers(model)
            if k > len(layers):
                raise ConfigError(
                    f"finetune.method.top_layers: {k} is more than the model's {len(layers)} layers"
                )
            for layer in list(layers)[-k:]:
                layer.requires_grad_(True)
        _log_trainable(self.name, model)
        return model

    def finalize(self, model: Any, out_dir: Path) -> Any:
        model.requires_grad_(True)  # a plain model again for the stages downstream
        return model


def decoder_layers(model: Any) -> Any:
    """The model's stack of decoder layers (see ``unbottle.compression.find_decoder_blocks``)."""
    from unbottle.compression import find_decoder_blocks

    found = find_decoder_blocks(model)
    if found is not None:
        return found[1]
    raise ConfigError("finetune.method.top_layers: this model has no recognisable decoder layers")


@hookimpl
def register_finetune_methods(register):
    register(Full)
    register(LoRA)
    register(Partial)
