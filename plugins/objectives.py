"""Built-in pretraining objectives: what the pretrain stage optimises, on which model.

- ``clm``: causal language modelling on a Llama-style decoder, every token predicting the
  next (the default; the stages downstream take its model).
- ``mlm``: masked language modelling on an encoder (BERT, Devlin et al., 2019; or
  ModernBERT, Warner et al., 2024): 15% of the tokens are chosen, and of those 80% are
  replaced by the mask token, 10% by a random token and 10% kept, with transformers'
  ``DataCollatorForLanguageModeling``; the loss is on the chosen tokens only.
- ``nsp``: next-sentence prediction (Devlin et al., 2019) as an auxiliary head trained
  with mlm (``BertForPreTraining``): ``[CLS] A [SEP] B [SEP]``, where B is the sentence
  after A in the same document half of the time and a sentence of another document
  otherwise.

An encoder is measured by the pretrain stage on the held-out text: masked-token accuracy
(the same 15% / 80-10-10 corruption, from a generator seeded by ``seed``), the
pseudo-perplexity of Salazar et al. (2020, "Masked Language Model Scoring": every token
masked in turn and scored from both sides) and, for ``nsp``, the accuracy of the
next-sentence head on held-out pairs (chance: 50%).
"""

from __future__ import annotations

import math
import random
import re
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field

from unbottle import Batches, DataError, PretrainContext, StrategyConfig, hookimpl
from unbottle.training import encode_texts, progress_bar

if TYPE_CHECKING:
    import torch

#: Special tokens an encoder needs beside the tokenizer's EOS and PAD.
ENCODER_TOKENS = {"mask_token": "<|mask|>", "cls_token": "<|cls|>", "sep_token": "<|sep|>"}


def _stream_long_enough(stream: torch.Tensor, ctx: PretrainContext) -> None:
    seq_len = ctx.seq_len
    if stream.numel() < seq_len + 1:
        what = ctx.corpus.what if ctx.corpus.path is not None else "data.train_text"
        raise DataError(
            f"{what}: {stream.numel()} tokens is fewer than one sequence of "
            f"{seq_len + 1}; give more text or lower {ctx.key}.seq_len"
        )


class CausalLM:
    """Next-token prediction on a Llama-style decoder (what pretraining always did)."""

    name = "clm"
    model_kind: ClassVar[Literal["causal", "encoder"]] = "causal"
    architectures: ClassVar[tuple[str, ...]] = ("llama",)

    class Config(StrategyConfig):
        pass

    def __init__(self, config: Config) -> None:
        self.config = config

    def build_model(self, cfg: Any, tokenizer: Any, seed: int) -> Any:
        from unbottle.training import build_model

        return build_model(cfg, tokenizer, seed)

    def batches(self, ctx: PretrainContext) -> Batches:
        import torch

        stream = ctx.token_ids()  # (N,), memory-mapped, uint16 or uint32
        seq_len = ctx.seq_len
        _stream_long_enough(stream, ctx)

        def windows(starts: list[int]) -> dict[str, torch.Tensor]:
            input_ids = torch.stack([stream[s : s + seq_len] for s in starts]).long()  # (B, T)
            return {"input_ids": input_ids, "labels": input_ids}

        return Batches(size=stream.numel() - seq_len, collate=windows, seed=ctx.seed)

    def evaluate(self, model: Any, ctx: PretrainContext) -> dict[str, float]:
        return {}  # the evaluate stage measures a causal LM (perplexity, accuracy, ...)


class MaskedLM:
    """Masked language modelling on an encoder: 15% of tokens chosen, 80/10/10."""

    name = "mlm"
    model_kind: ClassVar[Literal["causal", "encoder"]] = "encoder"
    architectures: ClassVar[tuple[str, ...]] = ("bert", "modernbert")

    class Config(StrategyConfig):
        mask_probability: float = Field(0.15, gt=0, lt=1)
        dropout: float = Field(0.1, ge=0, lt=1)  # BERT's; tiny models learn faster without
        # Held-out windows of seq_len tokens for masked-token accuracy; the first
        # `pppl_windows` of them also for pseudo-perplexity (one forward pass per token).
        eval_windows: int = Field(32, ge=1)
        pppl_windows: int = Field(4, ge=1)

    def __init__(self, config: Config) -> None:
        self.config = config

    # ---- model

    def build_model(self, cfg: Any, tokenizer: Any, seed: int) -> Any:
        import torch

        tokenizer.add_special_tokens(ENCODER_TOKENS)
        config = _encoder_config(cfg, tokenizer, self.config.dropout)
        torch.manual_seed(seed)
        return self._head(config)

    def _head(self, config: Any) -> Any:
        from transformers import AutoModelForMaskedLM

        return AutoModelForMaskedLM.from_config(config)

    # ---- training data

    def collator(self, tokenizer: Any, seed: int | None = None) -> Any:
        """transformers' 80/10/10 masking. Without a seed it draws from torch's global
        generator, which training checkpoints save, so a resumed run masks the same."""
        from transformers import DataCollatorForLanguageModeling

        return DataCollatorForLanguageModeling(
            tokenizer, mlm=True, mlm_probability=self.config.mask_probability, seed=seed
        )

    def batches(self, ctx: PretrainContext) -> Batches:
        import torch

        stream = ctx.token_ids()  # (N,), memory-mapped, uint16 or uint32
        seq_len = ctx.seq_len
        _stream_long_enough(stream, ctx)
        collator = self.collator(ctx.tokenizer)
        special = torch.tensor(ctx.tokenizer.all_special_ids)

        def windows(starts: list[int]) -> dict[str, torch.Tensor]:
            ids = torch.stack([stream[s : s + seq_len] for s in starts]).long()  # (B, T)
            inputs, labels = collator.torch_mask_tokens(ids.clone(), torch.isin(ids, special))
            return {"input_ids": inputs, "labels": labels}

        return Batches(size=stream.numel() - seq_len + 1, collate=windows, seed=ctx.seed)

    def loss(self, model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean cross-entropy over the masked tokens of the micro-batch (plus, for nsp,
        the next-sentence loss that BertForPreTraining adds)."""
        return model(**batch).loss

    # ---- held-out figures

    def evaluate(self, model: Any, ctx: PretrainContext) -> dict[str, float]:
        import torch

        stream = ctx.token_ids()
        seq_len = min(ctx.seq_len, stream.numel())
        count = min(self.config.eval_windows, stream.numel() // seq_len)
        windows = stream[: count * seq_len].view(count, seq_len).long()  # (W, T)
        special = torch.tensor(ctx.tokenizer.all_special_ids)
        model.eval()
        with torch.no_grad():
            inputs, labels = self.collator(ctx.tokenizer, seed=ctx.seed).torch_mask_tokens(
                windows.clone(), torch.isin(windows, special)
            )
            logits = _mlm_logits(model(input_ids=inputs))  # (W, T, V)
            chosen = labels != -100
            correct = int((logits.argmax(-1)[chosen] == labels[chosen]).sum())
            pppl, scored = pseudo_perplexity(
                model, windows[: self.config.pppl_windows], special, ctx.tokenizer.mask_token_id
            )
        return {
            "masked_token_accuracy": correct / max(int(chosen.sum()), 1),
            "masked_tokens": int(chosen.sum()),
            "pseudo_perplexity": pppl,
            "pseudo_perplexity_tokens": scored,
        }


class NextSentence(MaskedLM):
    """Next-sentence prediction trained with mlm (BertForPreTraining)."""

    name = "nsp"
    architectures: ClassVar[tuple[str, ...]] = ("bert",)

    class Config(MaskedLM.Config):
        # Held-out sentence pairs for the next-sentence accuracy, half of them real.
        eval_pairs: int = Field(256, ge=2)

    def _head(self, config: Any) -> Any:
        from transformers import BertForPreTraining

        return BertForPreTraining(config)

    def batches(self, ctx: PretrainContext) -> Batches:
        import torch

        pairs = SentencePairs(ctx)
        collator = self.collator(ctx.tokenizer)

        def rows(ids: list[int]) -> dict[str, torch.Tensor]:
            # The coin and the random sentence come from torch's global generator, like
            # the masking: a checkpoint saves it, so a resumed run draws the same.
            draws = torch.rand(len(ids)).tolist()
            others = torch.randint(0, 1 << 30, (len(ids),)).tolist()
            batch = pairs.encode(
                [(i, draw >= 0.5, other) for i, draw, other in zip(ids, draws, others, strict=True)]
            )
            batch["input_ids"], batch["labels"] = collator.torch_mask_tokens(
                batch["input_ids"], batch.pop("special_tokens_mask")
            )
            return batch

        return Batches(size=len(pairs.firsts), collate=rows, seed=ctx.seed)

    def evaluate(self, model: Any, ctx: PretrainContext) -> dict[str, float]:
        import torch

        figures = super().evaluate(model, ctx)
        pairs = SentencePairs(ctx)
        rng = random.Random(ctx.seed)
        count = min(self.config.eval_pairs, len(pairs.firsts))
        chosen = rng.sample(range(len(pairs.firsts)), count)
        # Exactly half real, half random, in a seeded order.
        picks = [(i, k % 2 == 1, rng.randrange(1 << 30)) for k, i in enumerate(chosen)]
        batch = pairs.encode(picks)
        batch.pop("special_tokens_mask")
        labels = batch.pop("next_sentence_label")
        with torch.no_grad():
            predicted = model(**batch).seq_relationship_logits.argmax(-1)  # (P,)
        figures["nsp_accuracy"] = float((predicted == labels).float().mean())
        figures["nsp_pairs"] = count
        return figures


#: Documents whose sentences are tokenized in one call (a fast tokenizer spreads a call's
#: texts over the cores).
DOCUMENTS_PER_CALL = 1024


class SentencePairs:
    """The sentences of a text, and ``[CLS] A [SEP] B [SEP]`` pairs built from them.

    ``firsts`` lists every sentence that has a next one in its document. A pair is real
    (B follows A; label 0, as BERT counts) or random (B from another document; label 1).

    The sentences are held as arrays, not Python lists: every token id in one array of
    ``uint16`` (``uint32`` beyond 65,536 tokens), each sentence's start there (int64) and
    document (int32), so a corpus of hundreds of megabytes costs a few bytes a token. The
    documents are read a batch at a time, each batch's sentences tokenized in one call.
    """

    _SPLIT = re.compile(r"(?<=[.!?])\s+")

    def __init__(self, ctx: PretrainContext) -> None:
        import itertools

        import numpy as np

        tok = ctx.tokenizer
        self.tokenizer, self.seq_len = tok, ctx.seq_len
        dtype = np.uint16 if len(tok) <= 1 << 16 else np.uint32
        ids = [np.empty(0, dtype)]
        lengths, owners = [np.empty(0, np.int32)], [np.empty(0, np.int32)]
        documents = enumerate(ctx.corpus.documents())
        with progress_bar(f"sentences of {ctx.corpus.what}", total=None) as advance:
            while batch := list(itertools.islice(documents, DOCUMENTS_PER_CALL)):
                texts, doc_of = [], []
                for d, doc in batch:
                    sentences = [s for s in self._SPLIT.split(doc) if s.strip()]
                    texts += sentences
                    doc_of += [d] * len(sentences)
                if not texts:
                    continue
                encoded = encode_texts(tok, texts)
                ids.append(np.fromiter(itertools.chain.from_iterable(encoded), dtype))
                lengths.append(np.fromiter(map(len, encoded), np.int32, len(encoded)))
                owners.append(np.array(doc_of, np.int32))
                advance(documents=batch[-1][0] + 1, sentences=sum(map(len, owners)))
        self.ids = np.concatenate(ids)
        del ids
        # Sentence k is ids[starts[k]:starts[k + 1]], of document doc_of[k].
        self.starts = np.zeros(sum(map(len, lengths)) + 1, np.int64)
        np.cumsum(np.concatenate(lengths), out=self.starts[1:])
        del lengths
        self.doc_of = np.concatenate(owners)
        del owners
        # A sentence has a next one when the sentence after it is of its document.
        self.firsts = np.flatnonzero(self.doc_of[:-1] == self.doc_of[1:])
        # Documents are numbered in order: two of them have sentences when the first
        # sentence's is not the last's.
        if not len(self.firsts) or self.doc_of[0] == self.doc_of[-1]:
            raise DataError(
                f"{ctx.corpus.what}: next-sentence prediction needs documents of two or more "
                "sentences, and at least two documents"
            )

    def sentence(self, k: int) -> list[int]:
        return self.ids[self.starts[k] : self.starts[k + 1]].tolist()

    def encode(self, picks: list[tuple[int, bool, int]]) -> dict[str, torch.Tensor]:
        """Rows for (index into firsts, random B?, a random number to choose B)."""
        import numpy as np
        import torch

        tok, seq_len = self.tokenizer, self.seq_len
        rows = torch.full((len(picks), seq_len), tok.pad_token_id)  # (P, T)
        types = torch.zeros_like(rows)
        mask = torch.zeros_like(rows)
        labels = torch.zeros(len(picks), dtype=torch.long)
        for r, (i, random_next, draw) in enumerate(picks):
            a = int(self.firsts[i])
            b = a + 1
            if random_next:
                others = len(self.doc_of)
                b = draw % others
                if self.doc_of[b] == self.doc_of[a]:  # then the next document's first
                    b = int(np.searchsorted(self.doc_of, self.doc_of[a], "right")) % others
                labels[r] = 1
            first, second = self.sentence(a), self.sentence(b)
            room = seq_len - 3  # [CLS], [SEP], [SEP]
            first = first[: max(room // 2, room - len(second))]
            second = second[: room - len(first)]
            ids = [tok.cls_token_id, *first, tok.sep_token_id, *second, tok.sep_token_id]
            rows[r, : len(ids)] = torch.tensor(ids)
            types[r, len(first) + 2 : len(ids)] = 1
            mask[r, : len(ids)] = 1
        special = torch.isin(rows, torch.tensor(tok.all_special_ids))
        return {
            "input_ids": rows,
            "token_type_ids": types,
            "attention_mask": mask,
            "next_sentence_label": labels,
            "special_tokens_mask": special,
        }


def _encoder_config(cfg: Any, tokenizer: Any, dropout: float) -> Any:
    """A BERT or ModernBERT config of the sizes in ``pretrain.model``."""
    sizes = {
        "vocab_size": len(tokenizer),
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.layers,
        "num_attention_heads": cfg.heads,
        "intermediate_size": cfg.intermediate_size,
        "max_position_embeddings": cfg.context,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if (cfg.architecture or "bert") == "modernbert":
        from transformers import ModernBertConfig

        return ModernBertConfig(
            **sizes,
            bos_token_id=tokenizer.cls_token_id,
            eos_token_id=tokenizer.sep_token_id,
            cls_token_id=tokenizer.cls_token_id,
            sep_token_id=tokenizer.sep_token_id,
            local_attention=min(128, cfg.context),
            attention_dropout=dropout,
            mlp_dropout=dropout,
            embedding_dropout=dropout,
            reference_compile=False,  # no torch.compile behind the user's back
        )
    from transformers import BertConfig

    return BertConfig(
        **sizes,
        type_vocab_size=2,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )


def _mlm_logits(output: Any) -> torch.Tensor:
    # BertForPreTraining names them prediction_logits; the *ForMaskedLM heads, logits.
    logits = getattr(output, "prediction_logits", None)
    return output.logits if logits is None else logits


def pseudo_perplexity(
    model: Any, windows: torch.Tensor, special: torch.Tensor, mask_id: int
) -> tuple[float, int]:
    """exp of the mean negative log-likelihood of each token with only it masked
    (Salazar et al., 2020), over the non-special tokens of ``windows`` (W, T)."""
    import torch

    nll, scored = 0.0, 0
    for window in windows:
        positions = (~torch.isin(window, special)).nonzero().flatten()  # (P,)
        if positions.numel() == 0:
            continue
        copies = window.repeat(positions.numel(), 1)  # (P, T): one masked token each
        copies[torch.arange(positions.numel()), positions] = mask_id
        logits = _mlm_logits(model(input_ids=copies))  # (P, T, V)
        picked = logits[torch.arange(positions.numel()), positions]  # (P, V)
        log_probs = torch.log_softmax(picked.double(), -1)  # (P, V)
        nll -= float(log_probs.gather(1, window[positions].unsqueeze(1)).sum())
        scored += positions.numel()
    return (math.exp(nll / scored) if scored else float("nan")), scored


@hookimpl
def register_objectives(register):
    register(CausalLM)
    register(MaskedLM)
    register(NextSentence)
