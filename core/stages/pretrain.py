"""Pretraining: a byte-level BPE tokenizer and a model, from scratch, trained on the
objective ``pretrain.objective`` names (``clm``: a Llama-style causal LM; ``mlm``, ``nsp``:
an encoder, whose held-out figures the stage reports, see plugins/objectives.py).

With ``pretrain.source`` set, the stage starts from that pretrained model (a Hugging
Face directory or a converted GGUF file, see core/models/sources.py): its artifact is the
model as released or, with ``pretrain.continued``, the model trained further on
``data.train_text`` with its own tokenizer (continued pretraining).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from unbottle.core.config.schema import ContinuedTrainParams, PretrainParams, SourceParams
from unbottle.core.registry import Registry
from unbottle.core.stages.layout import StageResult
from unbottle.core.stages.model_artifact import save_model_artifact, save_trained_model

log = logging.getLogger("unbottle.pretrain")


def pretrain(
    cfg: PretrainParams,
    *,
    train_text: Path,
    out_dir: Path,
    seed: int,
    registry: Registry,
    root: Path | None = None,
    valid_text: Path | None = None,
    token_cache: Path | None = None,
) -> StageResult:
    """Train tokenizer and model on ``train_text``; write them to ``out_dir``.

    An encoder objective is measured on ``valid_text`` (held out) after training. With
    ``cfg.source`` set, write that pretrained model instead, or with ``cfg.continued`` too,
    train it further (a relative source path is taken from the workspace ``root``, by
    default the working directory). The corpus is
    read from disk as it is needed and its token ids kept in a file under
    ``token_cache`` (a temporary file without one; see core/data/corpus.py).
    """
    if cfg.source is not None and cfg.continued is not None:
        return continue_source(
            cfg,
            train_text=train_text,
            out_dir=out_dir,
            seed=seed,
            registry=registry,
            root=root or Path.cwd(),
            token_cache=token_cache,
        )
    if cfg.source is not None:
        return from_source(cfg, out_dir=out_dir, root=root or Path.cwd())

    import torch

    from unbottle.core.contract.strategies import PretrainContext
    from unbottle.core.data.corpus import Corpus
    from unbottle.core.training.loop import (
        checkpoint_store,
        estimate_memory,
        is_main_process,
        train,
    )

    objective = registry.create("objective", cfg.objective.name, cfg.objective.options)
    corpus = Corpus(train_text, "data.train_text", token_cache=token_cache)
    held_out = None
    if objective.model_kind != "causal":  # the evaluate stage measures causal models
        if valid_text is None:
            raise ValueError(f"pretrain: objective {objective.name} needs the held-out text")
        held_out = Corpus(valid_text, "data.valid_text", token_cache=token_cache)
    tokenizer = corpus.train_tokenizer(
        cfg.tokenizer.vocab_size, sample=cfg.tokenizer.sample_documents, seed=seed
    )
    # Check the memory on a weightless (meta) copy first: refuse before allocating.
    with torch.device("meta"):
        skeleton = objective.build_model(cfg.model, tokenizer, seed)
    ctx = PretrainContext(corpus, tokenizer, cfg.train.seq_len, seed)
    data = objective.batches(ctx)
    documents = (
        ""
        if corpus.document_count is None
        else f"{corpus.document_count} documents, {corpus.token_count} tokens, "
    )
    (log.info if is_main_process() else log.debug)(
        "pretrain: %s%d examples, vocabulary %d, objective %s",
        documents,
        data.size,
        len(tokenizer),
        objective.name,
    )
    plan = estimate_memory(skeleton, cfg.train, registry=registry, key="pretrain.train")
    model = objective.build_model(cfg.model, tokenizer, seed)

    inputs = {"train_text": corpus.sha256}
    if held_out is not None:
        inputs["valid_text"] = held_out.sha256
    store = checkpoint_store(
        cfg.train,
        stage="pretrain",
        out_dir=out_dir,
        identity={
            "inputs": inputs,
            "tokenizer": cfg.tokenizer.model_dump(mode="json"),
            "model": cfg.model.model_dump(mode="json"),
            "objective": cfg.objective.model_dump(mode="json"),
            "seed": seed,
        },
    )
    model, report = train(
        model,
        data,
        cfg.train,
        registry=registry,
        desc="pretrain",
        checkpoints=store,
        memory_estimate=plan,
        loss_fn=getattr(objective, "loss", None),  # None: the loop's causal-LM loss
    )
    metrics = {
        **report.metrics(),
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": len(tokenizer),
    }
    if corpus.token_count:  # the objective took the token ids (clm, mlm)
        # How many times training went over the corpus: below 1, it saw part of it.
        metrics["corpus_tokens"] = corpus.token_count
        metrics["epochs"] = metrics["train_tokens"] / corpus.token_count
    if held_out is not None:
        held_out_ctx = PretrainContext(held_out, tokenizer, ctx.seq_len, seed)
        metrics.update(objective.evaluate(model, held_out_ctx))
    save_trained_model(
        out_dir,
        model,
        tokenizer,
        stage="pretrain",
        config=cfg.model_dump(mode="json"),
        strategies=[("objective", objective.name)],
        train=cfg.train,
        registry=registry,
        inputs=inputs,
        metrics=metrics,
        checkpoints=store,
    )
    return StageResult(out_dir, metrics, plots={"pretrain_loss": report.curve()})


def from_source(cfg: PretrainParams, *, out_dir: Path, root: Path) -> StageResult:
    """The pretrained model ``cfg.source`` names, as this stage's artifact: float32
    safetensors and its own tokenizer. The manifest records the source, its sha256 and,
    for a GGUF file, the conversion."""
    from unbottle.core.models import sources as sources
    from unbottle.core.training.loop import barrier, is_main_process

    assert cfg.source is not None
    src = sources.resolve(cfg.source, root)
    metrics: dict = {}
    if is_main_process():  # under torchrun, one process converts and writes
        model, tokenizer, done = sources.load_source(src)
        metrics = {
            "parameters": sum(p.numel() for p in model.parameters()),
            "vocab_size": len(tokenizer),
        }
        log.info(
            "pretrain: from %s %s (%d parameters), no training",
            src.kind,
            src.path,
            metrics["parameters"],
        )
        save_model_artifact(
            out_dir,
            model,
            tokenizer,
            stage="pretrain",
            config={"source": cfg.source.model_dump(mode="json")},
            strategies={},
            inputs={"source": src.sha256},
            metrics=metrics,
            extra={"source": source_record(cfg.source, src, done)},
        )
    barrier()
    # No steps trained: the loss curve dvc.yaml declares is written with its header only.
    return StageResult(out_dir, metrics, plots={"pretrain_loss": []})


def continue_source(
    cfg: PretrainParams,
    *,
    train_text: Path,
    out_dir: Path,
    seed: int,
    registry: Registry,
    root: Path,
    token_cache: Path | None = None,
) -> StageResult:
    """Continued pretraining: the model ``cfg.source`` names, trained further on
    ``train_text`` for ``cfg.continued`` on ``cfg.objective`` (a causal one), with the
    source's own tokenizer. The context and the memory are checked on a weightless copy
    before the weights load."""
    import torch

    from unbottle.core.contract.strategies import PretrainContext
    from unbottle.core.data.corpus import Corpus
    from unbottle.core.models import sources as sources
    from unbottle.core.models.loading import meta_model
    from unbottle.core.training.loop import (
        check_context,
        checkpoint_store,
        estimate_memory,
        is_main_process,
        main_process_value,
        mix_batches,
        prepare_method,
        train,
        weightless_trainable,
    )

    assert cfg.source is not None and cfg.continued is not None
    key = "pretrain.continued"
    objective = registry.create("objective", cfg.objective.name, cfg.objective.options)
    method_ref = cfg.continued.method
    method = registry.create("finetune_method", method_ref.name, method_ref.options)
    src = sources.resolve(cfg.source, root)
    plan = None

    def check_fits(directory: Path) -> None:
        nonlocal plan
        skeleton = meta_model(directory)
        check_context(skeleton, cfg.continued.seq_len, key)
        # What the method trains decides the gradients and the optimizer's state.
        trainable = weightless_trainable(method, skeleton, f"{key}.method")
        if trainable is not None:
            plan = estimate_memory(trainable, cfg.continued, registry=registry, key=key)

    model, tokenizer, done = sources.load_source(src, before_load=check_fits)
    corpus = Corpus(train_text, "data.train_text", token_cache=token_cache)
    reference = None
    if cfg.continued.reference_text is not None:
        reference = Corpus(root / cfg.continued.reference_text, f"{key}.reference_text")
    before = None
    if reference is not None and is_main_process():  # measured before any step is taken
        before = reference_perplexity(model, tokenizer, reference, cfg.continued, registry)
    ctx = PretrainContext(corpus, tokenizer, cfg.continued.seq_len, seed, key=key)
    data = objective.batches(ctx)
    replay = None
    if cfg.continued.replay_text is not None:
        replay = Corpus(
            root / cfg.continued.replay_text, f"{key}.replay_text", token_cache=token_cache
        )
        replayed = PretrainContext(replay, tokenizer, cfg.continued.seq_len, seed, key=key)
        data = mix_batches(
            data,
            objective.batches(replayed),
            cfg.continued.replay_fraction,
            key=f"{key}.replay_text",
        )
        if reference is not None and is_main_process() and reference.sha256 == replay.sha256:
            log.warning(
                "pretrain: %s.reference_text is the replay text: its perplexity then "
                "measures what was trained on, not what was kept",
                key,
            )
    parameters = sum(p.numel() for p in model.parameters())
    (log.info if is_main_process() else log.debug)(
        "pretrain: %s %s (%d parameters) trained further on %d documents, %d tokens, method %s",
        src.kind,
        src.path,
        parameters,
        corpus.document_count or 0,
        corpus.token_count or 0,
        method.name,
    )
    torch.manual_seed(seed)  # adapters start from the same random init on every run
    model = prepare_method(method, model, f"{key}.method")
    trainable_parameters = sum(
        p.numel() for p in {id(p): p for p in model.parameters()}.values() if p.requires_grad
    )
    inputs = {"source": src.sha256, "train_text": corpus.sha256}
    if replay is not None:
        inputs["replay_text"] = replay.sha256
    store = checkpoint_store(
        cfg.continued,
        stage="pretrain",
        out_dir=out_dir,
        identity={
            "inputs": inputs,
            "objective": cfg.objective.model_dump(mode="json"),
            "seed": seed,
        },
        # The forgetting limit is checked after training and is out of the run key: a
        # refused run keeps its last step, so a rerun with a raised limit only measures.
        keep_last=cfg.continued.max_reference_ratio is not None,
    )
    # ``model`` is what trains: the source itself, or a wrapper holding adapters, which
    # the method folds back into a plain model when the artifact is written.
    model, report = train(
        model,
        data,
        cfg.continued,
        registry=registry,
        desc="pretrain",
        key=key,
        checkpoints=store,
        memory_estimate=plan,
        loss_fn=getattr(objective, "loss", None),
    )
    metrics = {
        **report.metrics(),
        "parameters": parameters,
        "trainable_parameters": trainable_parameters,
        "vocab_size": len(tokenizer),
    }
    if corpus.token_count:
        # With replay, the share of rows drawn from the corpus is 1 - replay_fraction on
        # average: these two are expectations, not counts.
        own_share = 1.0 if replay is None else 1.0 - cfg.continued.replay_fraction
        metrics["corpus_tokens"] = corpus.token_count
        metrics["epochs"] = metrics["train_tokens"] * own_share / corpus.token_count
        if replay is not None:
            metrics["replay_tokens"] = metrics["train_tokens"] * (1 - own_share)
    if reference is not None:  # an input of the stage, not of its run (the run key)
        inputs = {**inputs, "reference_text": reference.sha256}
        measured = None
        if before is not None:  # the main process measures
            after = reference_perplexity(model, tokenizer, reference, cfg.continued, registry)
            measured = (before, after)
            metrics.update(
                reference_perplexity_before=before,
                reference_perplexity_after=after,
                reference_perplexity_ratio=after / before,
            )
            log.info(
                "pretrain: perplexity on %s %.3f before, %.3f after (x%.2f)",
                cfg.continued.reference_text,
                before,
                after,
                after / before,
            )
        limit = cfg.continued.max_reference_ratio
        if limit is not None:  # every process learns the verdict, and stops with the main
            check_forgetting(main_process_value(measured), limit, cfg.continued, key)
    save_trained_model(
        out_dir,
        model,
        tokenizer,
        stage="pretrain",
        config={
            "source": cfg.source.model_dump(mode="json"),
            "continued": cfg.continued.model_dump(mode="json"),
            "objective": cfg.objective.model_dump(mode="json"),
        },
        strategies=[("objective", objective.name), ("finetune_method", method.name)],
        train=cfg.continued,
        registry=registry,
        inputs=inputs,
        metrics=metrics,
        checkpoints=store,
        finalize=method.finalize,
        extra={"source": source_record(cfg.source, src, done)},
    )
    return StageResult(out_dir, metrics, plots={"pretrain_loss": report.curve()})


def check_forgetting(
    measured: tuple[float, float], limit: float, cfg: ContinuedTrainParams, key: str
) -> None:
    """Refuse a model whose ``reference_text`` perplexity (before, after) rose more than
    ``limit`` times, before it is written."""
    from unbottle.core.contract.errors import GateError

    before, after = measured
    if after / before > limit:
        raise GateError(
            f"{key}.max_reference_ratio: the perplexity on {cfg.reference_text} rose "
            f"x{after / before:.2f} ({before:.3f} to {after:.3f}), above x{limit:g}; no model "
            f"was written. Train less (steps, lr), replay general text ({key}.replay_text; "
            "`unbottle data general` writes some), or raise the limit"
        )


def reference_perplexity(
    model: Any, tokenizer: Any, reference: Any, cfg: ContinuedTrainParams, registry: Registry
) -> float:
    """The ``perplexity`` metric, as the evaluate stage resolves it, of ``model`` on the
    first ``cfg.reference_tokens`` tokens of ``reference`` (a Corpus), in windows of up to
    512 tokens."""
    from unbottle.core.contract.errors import DataError
    from unbottle.core.contract.strategies import EvalContext
    from unbottle.core.models.runtimes import TorchRunner

    window = min(512, int(model.config.max_position_embeddings), cfg.reference_tokens)
    ctx = EvalContext(tokenizer=tokenizer, valid_text=reference, questions=[], model_dir=Path())
    found = ctx.held_out_ids(window + 1).numel()
    if found < window + 1:
        raise DataError(
            f"{reference.what}: {found} tokens; its perplexity needs at least {window + 1} "
            "(one window); give a longer text"
        )
    metric = registry.create(
        "metric", "perplexity", {"window": window, "max_tokens": cfg.reference_tokens}
    )
    was_training = model.training
    model.eval()
    try:
        return float(metric.measure(TorchRunner.of_model(model, tokenizer), ctx)["perplexity"])
    finally:
        model.train(was_training)


def source_record(source: SourceParams, src: Any, done: dict[str, Any]) -> dict[str, Any]:
    """The manifest's account of where the model came from: the source, its sha256, a
    Hub model's revision and commit, and what loading it did (the GGUF conversion)."""
    return {
        "kind": src.kind,
        "path": str(src.path),
        "sha256": src.sha256,
        **hub_record(source, src.path),
        **done,
    }


def hub_record(source: SourceParams, path: Path) -> dict[str, str | None]:
    """Provenance of a Hub model: the id, the revision asked for and the commit read."""
    if source.hub is None:
        return {}
    from unbottle.core.models.sources import hub_commit

    return {"hub": source.hub, "revision": source.revision or "main", "commit": hub_commit(path)}
