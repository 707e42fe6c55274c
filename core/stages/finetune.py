"""Supervised finetuning on question/answer pairs, with the loss on answer tokens only."""

from __future__ import annotations

import logging
from pathlib import Path

from unbottle.core.config.params import FinetuneParams
from unbottle.core.registry import Registry
from unbottle.core.stages.layout import StageResult, split_timings, strategy_record
from unbottle.core.store.artifacts import atomic_dir, tree_hash, write_manifest

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

    from unbottle.core.contract.errors import ConfigError
    from unbottle.core.data import prompts as task
    from unbottle.core.models.loading import load_model, save_model
    from unbottle.core.store.artifacts import verify_artifact
    from unbottle.core.training.loop import (
        Batches,
        barrier,
        checkpoint_store,
        is_main_process,
        train,
    )

    pairs = task.read_pairs(qa_train, "data.qa_train")
    verify_artifact(base)
    method = registry.create("finetune_method", cfg.method.name, cfg.method.options)
    model, tokenizer = load_model(base)
    context = model.config.max_position_embeddings
    if cfg.train.seq_len > context:
        raise ConfigError(
            f"finetune.train.seq_len: {cfg.train.seq_len} is longer than the base model's "
            f"context ({context}); use at most {context}"
        )
    examples = encode_pairs(tokenizer, pairs, cfg.train.seq_len)

    def rows(ids: list[int]) -> dict[str, torch.Tensor]:
        return collate([examples[i] for i in ids], tokenizer.pad_token_id)

    torch.manual_seed(seed)  # adapters start from the same random init on every run
    trainable = method.prepare(model)
    trainable_parameters = sum(
        p.numel() for p in {id(p): p for p in trainable.parameters()}.values() if p.requires_grad
    )
    (log.info if is_main_process() else log.debug)(
        "finetune: %d pairs, method %s", len(examples), cfg.method.name
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
    if is_main_process():  # under DDP every process trained; one writes
        with atomic_dir(out_dir) as tmp:
            model = method.finalize(trained, tmp)
            save_model(model, tokenizer, tmp)
            write_manifest(
                tmp,
                stage="finetune",
                config=cfg.model_dump(mode="json"),
                strategies={
                    "finetune_method": strategy_record(
                        registry.get("finetune_method", cfg.method.name)
                    ),
                    "optimizer": strategy_record(
                        registry.get("optimizer", cfg.train.optimizer.name)
                    ),
                    "parallelism": strategy_record(
                        registry.get("parallelism", cfg.train.parallelism.name)
                    ),
                },
                inputs=inputs,
                metrics=split_timings(metrics)[0],
            )
        if store is not None:
            store.clear()  # the artifact is whole: the run's checkpoints are not needed
    barrier()
    return StageResult(out_dir, metrics, plots={"finetune_loss": report.curve()})


def encode_pairs(
    tokenizer, pairs: list[dict[str, str]], max_len: int
) -> list[tuple[list[int], list[int]]]:
    """Token ids of each (prompt, answer + EOS)."""
    from unbottle.core.contract.errors import DataError
    from unbottle.core.data import prompts as task

    examples = []
    for pair in pairs:
        prompt_ids = tokenizer(task.prompt(pair["question"]), add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(task.target(pair["answer"]), add_special_tokens=False)["input_ids"]
        answer_ids = [*answer_ids, tokenizer.eos_token_id]
        if len(prompt_ids) + len(answer_ids) > max_len:
            raise DataError(
                f"data.qa_train: the pair {pair['question']!r} is "
                f"{len(prompt_ids) + len(answer_ids)} tokens, longer than finetune.train.seq_len "
                f"({max_len})"
            )
        examples.append((prompt_ids, answer_ids))
    return examples


def collate(rows: list[tuple[list[int], list[int]]], pad: int) -> dict:
    """Right-padded batch whose labels cover the answer tokens only."""
    import torch

    width = max(len(p) + len(a) for p, a in rows)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)  # (B, T)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(rows), width), dtype=torch.long)  # (B, T)
    for r, (p, a) in enumerate(rows):
        n = len(p) + len(a)
        input_ids[r, :n] = torch.tensor(p + a)
        labels[r, len(p) : n] = torch.tensor(a)  # learn the answer, not the question
        mask[r, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}
