"""Supervised finetuning on question/answer pairs, with the loss on answer tokens only."""

from __future__ import annotations

import logging
from pathlib import Path

from unbottle.core.config.schema import FinetuneParams
from unbottle.core.data.prompts import PromptFormat
from unbottle.core.registry import Registry
from unbottle.core.stages.layout import StageResult
from unbottle.core.stages.model_artifact import save_trained_model
from unbottle.core.store.artifacts import tree_hash

log = logging.getLogger("unbottle.finetune")
IGNORE = -100  # label value that cross-entropy skips (training.IGNORE_INDEX)


def finetune(
    cfg: FinetuneParams,
    *,
    base: Path,
    qa_train: Path,
    out_dir: Path,
    seed: int,
    registry: Registry,
) -> StageResult:
    import torch
    from transformers import AutoConfig, AutoTokenizer

    from unbottle.core.contract.errors import ConfigError
    from unbottle.core.data import prompts as task
    from unbottle.core.models.loading import load_model
    from unbottle.core.store.artifacts import verify_artifact
    from unbottle.core.training.loop import (
        Batches,
        checkpoint_store,
        is_main_process,
        train,
    )

    pairs = task.read_pairs(qa_train, "data.qa_train")
    verify_artifact(base)
    method = registry.create("finetune_method", cfg.method.name, cfg.method.options)
    # The context and the pairs are checked from the config and the tokenizer, before the
    # weights load: a pair too long for seq_len is not learnt after a large model's load.
    context = AutoConfig.from_pretrained(base).max_position_embeddings
    if cfg.train.seq_len > context:
        raise ConfigError(
            f"finetune.train.seq_len: {cfg.train.seq_len} is longer than the base model's "
            f"context ({context}); use at most {context}"
        )
    tokenizer = AutoTokenizer.from_pretrained(base)
    prompt_format = task.PromptFormat.resolve(cfg.format, cfg.system_prompt, tokenizer)
    examples = encode_pairs(tokenizer, pairs, cfg.train.seq_len, prompt_format)
    model, _ = load_model(base)

    def rows(ids: list[int]) -> dict[str, torch.Tensor]:
        return collate([examples[i] for i in ids], tokenizer.pad_token_id)

    torch.manual_seed(seed)  # adapters start from the same random init on every run
    trainable = method.prepare(model)
    trainable_parameters = sum(
        p.numel() for p in {id(p): p for p in trainable.parameters()}.values() if p.requires_grad
    )
    (log.info if is_main_process() else log.debug)(
        "finetune: %d pairs, method %s, %s format",
        len(examples),
        cfg.method.name,
        prompt_format.kind,
    )
    inputs = {"base": tree_hash(base), "qa_train": tree_hash(qa_train)}
    store = checkpoint_store(
        cfg.train,
        stage="finetune",
        out_dir=out_dir,
        identity={
            "inputs": inputs,
            "method": cfg.method.model_dump(mode="json"),
            "seed": seed,
        },
    )
    trained, report = train(
        trainable,
        Batches(size=len(examples), collate=rows, seed=seed),
        cfg.train,
        registry=registry,
        desc="finetune",
        checkpoints=store,
    )
    metrics = {
        **report.metrics(),
        "train_pairs": len(examples),
        "trainable_parameters": trainable_parameters,
    }
    save_trained_model(
        out_dir,
        trained,
        tokenizer,
        stage="finetune",
        config=cfg.model_dump(mode="json"),
        strategies=[("finetune_method", cfg.method.name)],
        train=cfg.train,
        registry=registry,
        inputs=inputs,
        metrics=metrics,
        checkpoints=store,
        # How prompts were rendered: evaluate asks its questions the same way.
        extra={"prompt_format": prompt_format.record()},
        finalize=method.finalize,
    )
    return StageResult(out_dir, metrics, plots={"finetune_loss": report.curve()})


def encode_pairs(
    tokenizer, pairs: list[dict], max_len: int, prompt_format: PromptFormat | None = None
) -> list[tuple[list[int], list[int]]]:
    """(input ids, labels) of each pair, the labels IGNORE where nothing is learned."""
    from unbottle.core.contract.errors import DataError
    from unbottle.core.data.prompts import PromptFormat

    prompt_format = prompt_format or PromptFormat()
    examples = []
    for pair in pairs:
        try:
            runs = prompt_format.segments(tokenizer, pair)
        except DataError as e:
            raise DataError(f"data.qa_train: {e}") from None
        ids = [i for run, _ in runs for i in run]
        labels = [i if learned else IGNORE for run, learned in runs for i in run]
        if len(ids) > max_len:
            raise DataError(
                f"data.qa_train: the pair {pair['question']!r} is {len(ids)} tokens, longer "
                f"than finetune.train.seq_len ({max_len})"
            )
        examples.append((ids, labels))
    return examples


def collate(rows: list[tuple[list[int], list[int]]], pad: int) -> dict:
    """Right-padded batch; the labels cover the answer tokens only."""
    import torch

    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)  # (B, T)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(rows), width), dtype=torch.long)  # (B, T)
    for r, (ids, learned) in enumerate(rows):
        input_ids[r, : len(ids)] = torch.tensor(ids)
        labels[r, : len(ids)] = torch.tensor(learned)  # learn the answer, not the question
        mask[r, : len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}
