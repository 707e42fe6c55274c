"""Pretraining: a byte-level BPE tokenizer and a Llama-style causal LM, from scratch."""

from __future__ import annotations

import logging
from pathlib import Path

from unbottle.core.artifacts import atomic_dir, tree_hash, write_manifest
from unbottle.core.config import PretrainParams
from unbottle.core.registry import Registry
from unbottle.core.stage import StageResult, strategy_record

log = logging.getLogger("unbottle.pretrain")


def pretrain(
    cfg: PretrainParams, *, train_text: Path, out_dir: Path, seed: int, registry: Registry
) -> StageResult:
    """Train tokenizer and model on ``train_text``; write them to ``out_dir``."""
    import torch

    from unbottle.core.modeling import build_model, documents, encode_stream, read_text, save_model
    from unbottle.core.training import rng, train

    text = read_text(train_text, "data.train_text")
    tokenizer = train_tokenizer_for(text, cfg.tokenizer.vocab_size)
    stream = encode_stream(tokenizer, text)  # (N,)
    seq_len = cfg.train.seq_len
    if stream.numel() < seq_len + 1:
        from unbottle.core.errors import DataError

        raise DataError(
            f"data.train_text: {stream.numel()} tokens is fewer than one sequence of "
            f"{seq_len + 1}; give more text or lower pretrain.train.seq_len"
        )
    log.info(
        "pretrain: %d documents, %d tokens, vocabulary %d",
        len(documents(text)),
        stream.numel(),
        len(tokenizer),
    )
    model = build_model(cfg.model, tokenizer, seed)
    generator = rng(seed)

    def next_batch(step: int) -> dict[str, torch.Tensor]:
        starts = torch.randint(
            0, stream.numel() - seq_len, (cfg.train.batch_size,), generator=generator
        )
        input_ids = torch.stack([stream[s : s + seq_len] for s in starts.tolist()])  # (B, T)
        return {"input_ids": input_ids, "labels": input_ids}

    model, report = train(model, next_batch, cfg.train, registry=registry, desc="pretrain")
    metrics = {
        "final_loss": report.losses[-1],
        "tokens_per_s": report.tokens_per_second,
        "train_seconds": report.seconds,
        "train_tokens": report.tokens,
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": len(tokenizer),
        "precision": report.precision,
    }
    with atomic_dir(out_dir) as tmp:
        save_model(model, tokenizer, tmp)
        write_manifest(
            tmp,
            stage="pretrain",
            config=cfg.model_dump(mode="json"),
            strategies={
                "optimizer": strategy_record(registry.get("optimizer", cfg.train.optimizer.name)),
                "parallelism": strategy_record(
                    registry.get("parallelism", cfg.train.parallelism.name)
                ),
            },
            inputs={"train_text": tree_hash(train_text)},
            metrics=_stable(metrics),
        )
    return StageResult(out_dir, metrics, plots={"pretrain_loss": report.curve()})


def train_tokenizer_for(text: str, vocab_size: int):
    from unbottle.core.modeling import documents, train_tokenizer

    return train_tokenizer(documents(text), vocab_size)


def _stable(metrics: dict) -> dict:
    """The metrics that do not depend on timing, for the manifest (timings vary per run)."""
    return {k: v for k, v in metrics.items() if "second" not in k and "per_s" not in k}
