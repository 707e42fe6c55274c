"""Fail-fast checks of one stage: what params, the data and the upstream artifacts' configs
can tell before any heavy work (litgpt's ``setup()`` before ``main()``).

:func:`preflight` runs after the strategies are resolved (``runner.setup``) and before a
stage loads a model or a dataset: it reads the stage's data files (they exist, are UTF-8,
parse), the upstream artifacts' manifests and safetensors headers, and checks against the
*shape* of the model the stage will receive, on a weightless (meta-device) copy built from
the upstream ``config.json``:

- training (pretrain from scratch or continued, finetune): first the launch the
  parallelism strategy needs and the batch split over processes and accumulation steps
  (before the data is read), then precision for this device, the context, and the memory
  estimate;
- compress: at least one variant, and each step a strategy can check on the shapes it
  will see (``check_model``: group sizes that divide the layers' inputs, structured
  pruning that leaves something). Steps after one that changes shapes are checked when
  they run.

Every failure is one line naming the full key path. The stages keep their own checks:
they still hold when a stage function is called directly.

With ``planned=True`` (``unbottle run``: the flow makes the upstream artifacts first) the
upstream model's shape comes from ``pretrain.model`` and the upstream artifacts are not
read; a pretrained ``pretrain.source`` then leaves the shape checks to the stages.
"""

from __future__ import annotations

import logging
from typing import Any

from unbottle.core.config.schema import Params, StrategyRef, TrainParams
from unbottle.core.contract.errors import ConfigError
from unbottle.core.models.loading import meta_model
from unbottle.core.registry import Registry
from unbottle.core.stages.layout import Layout

log = logging.getLogger("unbottle.pipeline")

#: The upstream model artifact each stage starts from.
_MODEL_INPUT = {"finetune": "pretrain", "compress": "finetune"}
#: The artifacts each stage reads (their manifests must parse).
_UPSTREAM = {
    "pretrain": (),
    "finetune": ("pretrain",),
    "compress": ("finetune",),
    "evaluate": ("pretrain", "finetune", "compress"),
    "deploy": ("finetune", "compress", "evaluate"),
}


def preflight(
    name: str, params: Params, layout: Layout, registry: Registry, *, planned: bool = False
) -> None:
    """Refuse, in one line, what stage ``name`` would refuse only after loading its inputs."""
    if name == "compress" and not params.compress.variants:
        raise ConfigError(
            "compress.variants: no variants to build (an empty artifact would replace the "
            "last one); name at least one, e.g. magnitude50: [{prune: magnitude, sparsity: 0.5}]"
        )
    # The launch first: a wrong process count needs no corpus read through, no model built.
    if (trained := _trained_section(name, params)) is not None:
        check_launch(*trained, registry)
    check_data(name, params, layout, registry)
    if not planned:
        check_upstream(name, layout)
    from_scratch = params.pretrain.source is None
    if name == "pretrain" and from_scratch:
        model = _meta_model_from_params(params)
        check_training(params.pretrain.train, "pretrain.train", model, registry)
    elif name == "pretrain" and params.pretrain.continued is not None:
        model = _source_model(params, layout)
        continued = params.pretrain.continued
        method = (continued.method, "pretrain.continued.method")
        check_training(continued, "pretrain.continued", model, registry, method)
    elif name == "finetune":
        model = _input_model(name, params, layout, planned=planned)
        method = (params.finetune.method, "finetune.method")
        check_training(params.finetune.train, "finetune.train", model, registry, method)
    elif name == "compress":
        model = _input_model(name, params, layout, planned=planned)
        if model is not None:
            check_compress(params, model, registry)


def check_data(name: str, params: Params, layout: Layout, registry: Registry) -> None:
    """The stage's data files exist, are UTF-8 and parse (a corpus is read through once,
    a document at a time)."""
    from unbottle.core.data.corpus import Corpus
    from unbottle.core.data.prompts import read_pairs

    data, path = params.data, layout.resolve
    trains_on_text = params.pretrain.source is None or params.pretrain.continued is not None
    if (name == "pretrain" and trains_on_text) or name == "compress":
        Corpus(path(data.train_text), "data.train_text").check()
    continued = params.pretrain.continued
    if name == "pretrain" and continued is not None:
        for key in ("replay_text", "reference_text"):
            text = getattr(continued, key)
            if text is not None:
                Corpus(path(text), f"pretrain.continued.{key}").check()
    if name == "finetune" or (name == "compress" and _calibrates_on_pairs(params, layout)):
        read_pairs(path(data.qa_train), "data.qa_train")
    if name == "evaluate":
        Corpus(path(data.valid_text), "data.valid_text").check()
        read_pairs(path(data.qa_test), "data.qa_test")
        if any(ref.options.get("shots") for ref in params.evaluate.metrics):
            # Few-shot examples come from the training pairs: are there enough?
            from unbottle.core.stages.evaluate import check_shots, create_metrics

            pairs = read_pairs(path(data.qa_train), "data.qa_train")
            check_shots(params.evaluate, create_metrics(params.evaluate, registry), len(pairs))


def _calibrates_on_pairs(params: Params, layout: Layout) -> bool:
    """Whether compress draws calibration windows from data.qa_train. ``auto`` does for
    a model finetuned in chat format; before the finetune stage has run, the finetune
    stage itself reads the pairs first."""
    from unbottle.core.data.prompts import CHAT, prompt_format_of
    from unbottle.core.store.artifacts import MANIFEST

    source = params.compress.calibration.source
    if source != "auto":
        return source != "train_text"
    finetuned = layout.artifact("finetune")
    return (finetuned / MANIFEST).is_file() and prompt_format_of(finetuned).kind == CHAT


def check_upstream(name: str, layout: Layout) -> None:
    """The upstream artifacts exist and their manifests and weight headers are whole."""
    from unbottle.core.models.loading import check_safetensors
    from unbottle.core.store.artifacts import read_manifest, verify_artifact

    for upstream in _UPSTREAM[name]:
        artifact = layout.artifact(upstream)
        if upstream == _MODEL_INPUT.get(name):  # the model the stage loads: whole, intact
            verify_artifact(artifact)
            check_safetensors(artifact)
        else:
            read_manifest(artifact)


# --------------------------------------------------------------------------- the model


def _meta_model_from_params(params: Params) -> Any:
    """A weightless model of the shape ``pretrain.model`` describes; the vocabulary at
    ``pretrain.tokenizer.vocab_size``, the most the trained tokenizer can have."""
    import torch
    from transformers import AutoModelForCausalLM

    from unbottle.core.models.loading import llama_config

    pretrain = params.pretrain
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(
            llama_config(pretrain.model, pretrain.tokenizer.vocab_size)
        )


def _source_model(params: Params, layout: Layout) -> Any | None:
    """A weightless copy of a Hugging Face directory ``pretrain.source``; None for a GGUF
    file, whose config exists once it is converted (the stage checks it then)."""
    from unbottle.core.models.sources import locate

    assert params.pretrain.source is not None
    kind, path = locate(params.pretrain.source, layout.root)
    return meta_model(path) if kind == "hf" else None


def _input_model(name: str, params: Params, layout: Layout, *, planned: bool) -> Any | None:
    """A weightless copy of the model stage ``name`` will load, or None when unknown."""
    if planned:
        return _meta_model_from_params(params) if params.pretrain.source is None else None
    return meta_model(layout.artifact(_MODEL_INPUT[name]))


# --------------------------------------------------------------------------- training


def _trained_section(name: str, params: Params) -> tuple[TrainParams, str] | None:
    """The training settings stage ``name`` runs with, and their key; None where it
    trains nothing (a pretrained source taken as it is, or a stage that does not train)."""
    pretrain = params.pretrain
    if name == "pretrain" and pretrain.source is None:
        return pretrain.train, "pretrain.train"
    if name == "pretrain" and pretrain.continued is not None:
        return pretrain.continued, "pretrain.continued"
    if name == "finetune":
        return params.finetune.train, "finetune.train"
    return None


def check_launch(cfg: TrainParams, key: str, registry: Registry) -> None:
    """What the processes launched must fit, known before any model: the parallelism
    strategy's process count (its mesh) and the batch's split over the processes."""
    from unbottle.core.training.loop import micro_batch_size, world_size

    parallel = registry.create("parallelism", cfg.parallelism.name, cfg.parallelism.options)
    check = getattr(parallel, "check_launch", None)
    if check is not None:  # optional for third-party strategies
        check(f"{key}.parallelism")
    micro_batch_size(cfg, world_size(), key)


def check_training(
    cfg: TrainParams,
    key: str,
    model: Any,
    registry: Registry,
    method: tuple[StrategyRef, str] | None = None,
) -> None:
    """What the training loop checks before its first step, on a weightless model, after
    :func:`check_launch`. ``method``: the finetune method that decides what trains (LoRA:
    adapters), and the key that names it."""
    from unbottle.core.training.loop import (
        check_context,
        estimate_memory,
        resolve_precision,
        weightless_trainable,
    )

    resolve_precision(cfg.precision, key, model)
    if model is None:
        return
    check_context(model, cfg.seq_len, key)
    trainable = model
    if method is not None:
        ref, method_key = method
        strategy = registry.create("finetune_method", ref.name, ref.options)
        trainable = weightless_trainable(strategy, model, method_key)
        if trainable is None:  # a method that cannot wrap a weightless model: check later
            return
    estimate_memory(trainable, cfg, registry=registry, key=key, announce=False)


# --------------------------------------------------------------------------- compress


def check_compress(params: Params, model: Any, registry: Registry) -> None:
    """Each variant's steps that see the input model's shapes fit them."""
    for variant, steps in params.compress.variants.items():
        n_to_m = None  # the step that zeroed weights in an N:M pattern, if any
        for i, step in enumerate(steps):
            strategy = registry.create(step.kind, step.strategy, step.options)
            # Only a step that says so (keeps_shape = False): a plugin that does not say
            # is not refused on a guess.
            reshapes = getattr(strategy, "keeps_shape", None) is False
            if reshapes and n_to_m is not None:
                # Removing input columns shifts every later column into another group of M.
                raise ConfigError(
                    f"compress.variants.{variant}[{i}]: {step.strategy} changes the layers' "
                    f"shapes after an N:M pattern ({variant}[{n_to_m}]), which would no "
                    "longer hold; put the N:M step after it"
                )
            if getattr(getattr(strategy, "config", None), "nm", None) is not None:
                n_to_m = i  # the built-in pruners' N:M pattern (UnstructuredOptions.nm)
        for i, step in enumerate(steps):
            strategy = registry.create(step.kind, step.strategy, step.options)
            check = getattr(strategy, "check_model", None)
            if check is not None:
                check(model, f"compress.variants.{variant}[{i}]")
            if not getattr(strategy, "keeps_shape", False):
                break  # the next steps see another shape: they check when they run
