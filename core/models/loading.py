"""Tokenizer and model construction, saving and loading (safetensors only).

The model is a transformers Llama-architecture decoder, so everything downstream
(peft, optimum's ONNX export, `AutoModelForCausalLM`) works on it unchanged.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from unbottle.core.contract.errors import DataError, shorten
from unbottle.core.data.demo import missing_data_hint
from unbottle.core.store.artifacts import (
    open_user_file,
    path_kind,
    read_jsonl,
    read_lines,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase, PreTrainedTokenizerFast

    from unbottle.core.config.schema import ModelParams

EOS = "<|endoftext|>"
PAD = "<|pad|>"


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer (GPT-2 style) on ``texts`` (any iterable: the
    trainer keeps word counts, not the texts)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return wrap_tokenizer(tokenizer)


def wrap_tokenizer(tokenizer: Any) -> PreTrainedTokenizerFast:
    """A trained ``tokenizers.Tokenizer`` of :func:`train_tokenizer`'s, as transformers'
    fast tokenizer with its special tokens named."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=EOS,
        bos_token=EOS,
        pad_token=PAD,
        unk_token=None,
        clean_up_tokenization_spaces=False,
        # A decoder has no token types; without this, generate() rejects the encoding.
        model_input_names=["input_ids", "attention_mask"],
    )


def llama_config(cfg: ModelParams, vocab_size: int, **special_tokens: int | None) -> Any:
    """The transformers LlamaConfig that ``pretrain.model`` describes."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.heads,
        max_position_embeddings=cfg.context,
        tie_word_embeddings=True,
        rope_theta=10000.0,
        **special_tokens,
    )


def build_model(cfg: ModelParams, tokenizer: PreTrainedTokenizerFast, seed: int) -> PreTrainedModel:
    import torch
    from transformers import LlamaForCausalLM

    config = llama_config(
        cfg,
        len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def save_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, out_dir: Path) -> None:
    """Save weights as safetensors, with config, generation config and tokenizer."""
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def load_model(model_dir: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """Load a Hugging Face-format model from safetensors (never from pickles)."""
    model_dir = Path(model_dir)
    if not (model_dir / "model.safetensors").is_file():
        raise DataError(
            f"{model_dir}: no model.safetensors; a float model in Hugging Face format is needed"
        )
    if (model_dir / "quantization.json").is_file():
        raise DataError(
            f"{model_dir}: the model is quantized (packed low-bit weights, quantization.json); "
            "this step needs float weights: give it the model from before the quantize step"
        )
    refuse_encoder(model_dir)  # from config.json alone: before reading any weights
    check_safetensors(model_dir)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if _compressed_tensors(model_dir):
        model = _load_decompressed(model_dir)
    else:
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, use_safetensors=True, dtype=torch.float32
        )
    into_process_memory(model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return model, tokenizer


def into_process_memory(model: Any) -> None:
    """Copy every parameter and buffer of ``model`` into memory of its own.

    transformers loads safetensors weights as views of the file's memory mapping: page
    cache in 4 KiB pages, which glibc's huge-page tunable (core/huge_pages.py) never
    reaches. A decode step reads every weight, so it pays a TLB miss for most pages it
    reads: SmolLM2-135M in float32 decoded 1.17x as fast at batch 1 once copied, faster
    in 20 of 21 rounds (BENCHMARKS.md, "Weights in the file's pages"). Shared parameters
    (a head tied to the embeddings) stay shared: each is copied once, in place. For a
    moment the copy and the file's pages are both resident; the file's are clean page
    cache, which the kernel reclaims first.
    """
    import torch

    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.data = tensor.data.clone()


def _compressed_tensors(model_dir: Path) -> bool:
    """Whether a directory is a compressed-tensors checkpoint (the ``hf`` deploy target's
    bundle of a packed variant)."""
    import json

    config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    quantization = config.get("quantization_config") or {}
    return quantization.get("quant_method") == "compressed-tensors"


def _load_decompressed(model_dir: Path) -> PreTrainedModel:
    """A compressed-tensors checkpoint as a float model: its Linears decompressed once.

    transformers loads each quantized Linear as compressed-tensors' ``CompressedLinear``,
    which decompresses its weight to float on its first forward, but compressed-tensors
    also wraps that forward to quantize the weight again at every call (for
    quantization-aware training; a no-op on weights already on the grid). With the
    wrapper off, one forward decompresses every layer, and the packed tensors are then
    dropped: a float model with the same logits to the bit, the float model's decode
    speed (0.31x of it with the wrapper on SmolLM2's GPTQ int4 g64 bundle) and weight count.
    (``run_compressed=False``, which decompresses at load, fails on act-order ``g_idx``
    in compressed-tensors 0.14.)
    """
    import torch
    from compressed_tensors.quantization.lifecycle.helpers import disable_quantization
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        model_dir, use_safetensors=True, dtype=torch.float32
    )
    model.apply(disable_quantization)
    with torch.no_grad():  # not inference_mode: the weights it makes may train later
        model(input_ids=torch.zeros((1, 1), dtype=torch.long))
    for module in model.modules():
        if hasattr(module, "quantization_scheme"):
            packed = [n for n, _ in module.named_parameters(recurse=False) if n != "weight"]
            for name in packed:
                if name != "bias":
                    delattr(module, name)  # weight_packed, weight_scale, ...: used up
    return model


def meta_model(model_dir: Path) -> Any:
    """A weightless (meta-device) model built from ``model_dir/config.json``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config_file = Path(model_dir) / "config.json"
    if not config_file.is_file():
        raise DataError(f"{model_dir}: no config.json; rerun the stage that makes it")
    try:
        config = AutoConfig.from_pretrained(model_dir)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except (OSError, ValueError, KeyError, TypeError) as e:  # JSONDecodeError is a ValueError
        raise DataError(
            f"{config_file}: not a model config ({shorten(e, 120)}); rerun the stage that "
            f"makes {model_dir}"
        ) from None


def check_safetensors(model_dir: Path) -> None:
    """Every ``*.safetensors`` file of a model has a whole header and covers its tensors.

    Reads the headers only (cheap); a damaged file is one line naming it, not a
    SafetensorError from deep inside transformers.
    """
    from safetensors import SafetensorError, safe_open

    for path in sorted(Path(model_dir).glob("*.safetensors")):
        try:
            with safe_open(path, framework="numpy"):
                pass
        except (SafetensorError, OSError) as e:
            raise DataError(
                f"{path}: damaged weights ({shorten(e, 120)}); rerun the stage that makes "
                f"{model_dir}"
            ) from None


def refuse_encoder(model_dir: Path) -> None:
    """One line, instead of transformers' long error or a silently re-headed model, when
    ``model_dir`` holds an encoder (an mlm or nsp pretraining) where a causal LM is needed."""
    import json

    config = Path(model_dir) / "config.json"
    if not config.is_file():
        return
    architectures = json.loads(config.read_text(encoding="utf-8")).get("architectures") or []
    if architectures and not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        raise DataError(
            f"{model_dir}: the model is an encoder ({', '.join(architectures)}), not a causal "
            "LM; finetune, compress, evaluate and deploy work on causal LMs "
            "(pretrain.objective clm)"
        )


#: Separates documents that hold blank lines: a page break (form feed). A plain-text
#: corpus may use it for documents with paragraphs; :func:`read_text` ends every document
#: with it.
DOCUMENT_BREAK = "\f"


#: The files a corpus folder is read from (each may also be gzipped: ``*.txt.gz``).
CORPUS_SUFFIXES = (".txt", ".jsonl")


def read_text(path: Path, what: str) -> str:
    """A corpus as one string: each of its documents (:func:`iter_documents`) followed by
    a page break (:data:`DOCUMENT_BREAK`), so that :func:`documents` finds them again."""
    return "".join(doc + DOCUMENT_BREAK for doc in iter_documents(path, what))


def iter_documents(path: Path, what: str) -> Iterator[str]:
    """A corpus's documents, read as they come, one held at a time.

    The corpus is plain text, or JSONL (a ``.jsonl`` file) with one ``{"text": ...}``
    record per document, the layout of most pretraining dumps; either may be gzipped
    (``*.gz``). A plain-text file's documents are what :func:`documents` finds in it; a
    JSONL file's are its records. A folder is the corpus of its ``*.txt`` and ``*.jsonl``
    files, in the order of their paths (shards), hidden files aside; no document runs on
    from one file into the next. Every fault (a missing file, bytes that are not UTF-8, a
    bad record, a corpus with no text) is a :class:`DataError` of one line.
    """
    path = Path(path)
    files = [path]
    if path_kind(path, what) == "directory":
        files = corpus_files(path)
        if not files:
            kinds = ", ".join(f"*{suffix}" for suffix in CORPUS_SUFFIXES)
            raise DataError(
                f"{what}: {path} is a folder with no corpus files ({kinds}, gzipped or not)"
            )
    empty = True
    for file in files:
        for doc in _file_documents(file, what):
            empty = False
            yield doc
    if empty:
        raise DataError(f"{what}: {path} is empty")


def corpus_files(folder: Path) -> list[Path]:
    """The corpus files under ``folder``, by path: ``*.txt`` and ``*.jsonl``, gzipped or
    not, none hidden or inside a hidden folder."""
    return sorted(
        p
        for p in Path(folder).rglob("*")
        if p.name.lower().removesuffix(".gz").endswith(CORPUS_SUFFIXES)
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
        and p.is_file()
    )


def _file_documents(path: Path, what: str) -> Iterator[str]:
    name = path.name.lower().removesuffix(".gz")
    if name.endswith(".json"):  # as text, the model would learn the JSON syntax
        raise DataError(
            f'{what}: {path} is a .json file; give plain text, or JSONL: one {{"text": ...}} '
            "object per line, in a file named *.jsonl"
        )
    texts = _jsonl_texts(path, what) if name.endswith(".jsonl") else _text_blocks(path, what)
    for text in texts:
        if doc := text.strip():
            yield doc


def _jsonl_texts(path: Path, what: str) -> Iterator[str]:
    layout = '; a .jsonl corpus holds one {"text": ...} object per line'
    for lineno, record in read_jsonl(path, what, hint=layout, if_missing=missing_data_hint):
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            found = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise DataError(
                f'{what}: {path}:{lineno} is not an object with a string field "text" '
                f"(found {shorten(str(found), 80)}){layout}"
            )
        # Page breaks separate documents in read_text's string: one inside a record is a
        # line break.
        yield record["text"].replace(DOCUMENT_BREAK, "\n")


#: Whether a plain-text file has page breaks, by the file's identity, size and mtime.
_PAGED: dict[tuple, bool] = {}


def _has_page_breaks(f: BinaryIO) -> bool:
    # A page break is one byte in UTF-8 and never inside another character's bytes.
    return any(b"\f" in chunk for chunk in iter(lambda: f.read(1 << 20), b""))


def _text_blocks(path: Path, what: str) -> Iterator[str]:
    """A plain-text file's blocks as :func:`documents` splits them (between page breaks
    if the file has any, else between blank lines), read line by line."""
    with open_user_file(path, what, if_missing=missing_data_hint) as f:
        # Whether the file has page breaks takes a pass over it; a reader that wants only
        # its first documents (evaluate's held-out ids) should not pay it at every read.
        stat = os.fstat(f.fileno())
        version = (str(path), stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)
        paged = _PAGED.get(version)
        if paged is None:
            paged = _PAGED[version] = _has_page_breaks(f)
    block: list[str] = []
    for line in read_lines(path, what, if_missing=missing_data_hint):
        if paged:
            first, *rest = line.split(DOCUMENT_BREAK)
            block.append(first)
            for part in rest:
                yield "".join(block)
                block = [part]
        elif line == "\n":  # with the previous line's end, the "\n\n" of a blank line
            yield "".join(block)
            block = []
        else:
            block.append(line)
    yield "".join(block)


def documents(text: str) -> list[str]:
    """A corpus's documents: the blocks between page breaks (:data:`DOCUMENT_BREAK`) where
    it has any, else the blocks between blank lines."""
    return list(iter_text_documents(text))


def iter_text_documents(text: str) -> Iterator[str]:
    """:func:`documents` one at a time, so that a reader that needs the first few of a
    large text neither splits nor copies the rest."""
    separator = DOCUMENT_BREAK if DOCUMENT_BREAK in text else "\n\n"
    start = 0
    while start <= len(text):
        end = text.find(separator, start)
        if end < 0:
            end = len(text)
        block = text[start:end].strip()
        if block:
            yield block
        start = end + len(separator)


#: Documents tokenized per call of :func:`encode_stream`: a fast tokenizer spreads a batch
#: over the cores, and one batch's ids are all that is ever held as Python ints.
ENCODE_BATCH = 1024


def encode_stream(tokenizer: PreTrainedTokenizerFast, text: str):
    """The corpus as one 1-D LongTensor of token ids, each document followed by EOS."""
    import numpy as np
    import torch

    # A list of every id would cost about 36 bytes a token (an int and its pointer); the
    # stream is built from int64 arrays, 8 bytes a token, one batch of documents at a time.
    pieces = [np.empty(0, dtype=np.int64), *encode_documents(tokenizer, documents(text))]
    return torch.from_numpy(np.concatenate(pieces))


def encode_documents(tokenizer: PreTrainedTokenizerFast, docs: Iterable[str]):
    """The token ids of ``docs``, each document followed by EOS, as int64 arrays of
    :data:`ENCODE_BATCH` documents each (a generator: it holds one batch)."""
    import itertools

    import numpy as np

    eos = [tokenizer.eos_token_id]
    docs = iter(docs)
    while batch := list(itertools.islice(docs, ENCODE_BATCH)):
        encoded = encode_texts(tokenizer, batch)
        yield np.fromiter(itertools.chain.from_iterable(d + eos for d in encoded), np.int64)


def encode_texts(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    """The token ids of each of ``texts``, without special tokens: what
    ``tokenizer(texts, add_special_tokens=False)["input_ids"]`` gives, in less time.

    transformers' call on a fast tokenizer turns every encoding into a dict of lists (ids,
    attention mask, type ids) that is then dropped: that takes longer than tokenizing,
    the more so the shorter the texts (BENCHMARKS, "Reading and tokenizing a corpus").
    Here the Rust tokenizer behind it is called directly, without tracking offsets
    (``encode_batch_fast``), and set as transformers' call sets it: no truncation, no
    padding, special tokens matched in the text unless the tokenizer splits them. A slow
    tokenizer is called as usual.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return tokenizer(texts, add_special_tokens=False)["input_ids"]
    if backend.truncation is not None:
        backend.no_truncation()
    if backend.padding is not None:
        backend.no_padding()
    backend.encode_special_tokens = getattr(tokenizer, "split_special_tokens", False)
    return [encoding.ids for encoding in backend.encode_batch_fast(texts, add_special_tokens=False)]
