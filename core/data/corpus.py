"""A training corpus read from disk as it is needed, and its token ids in a file.

Held in memory, a corpus costs per token its text (about 4 bytes), the documents' copy
of it and the ids as int64 arrays with their concatenation: over 20 bytes a token while
it is tokenized (BENCHMARKS, "Pretraining's data, from disk"). Here the documents are
read from the files as they are needed
(:func:`~unbottle.core.models.loading.iter_documents`), and the ids are written once to a
flat file of ``uint16`` (``uint32`` for a vocabulary beyond 65,536 tokens) that training
reads through a memory map, as nanoGPT's ``train.bin``: the ids live in the page cache,
2 bytes a token, and the process holds one batch of documents at a time, besides the
tokenizer trainer's count of each distinct word (:meth:`Corpus.sample` bounds that).

With a cache folder, the token file is kept there under the sha256 of the corpus, the
tokenizer, the code that reads and encodes them and the tokenizers version, so a rerun
or a resumed run maps it instead of tokenizing again; without one it is an unnamed
temporary file, gone once unmapped. The tokenizer the pretrain stage trains on the
corpus is kept beside it, under the sha256 of the corpus, the vocabulary size, the
sample, the code and the tokenizers version.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from unbottle.core.store.cache_pruning import mark_used
from unbottle.core.store.locking import one_at_a_time

if TYPE_CHECKING:
    import numpy as np
    import torch
    from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

log = logging.getLogger("unbottle.corpus")

#: What a token file's sidecar record is named after: ``<key>.tokens`` and ``<key>.json``.
TOKENS_SUFFIX = ".tokens"


def token_dtype(vocabulary: int) -> np.dtype:
    """The narrowest unsigned type that holds every id of a ``vocabulary``-token
    tokenizer: ``uint16`` up to 65,536 tokens, else ``uint32``."""
    import numpy as np

    return np.dtype(np.uint16 if vocabulary <= 1 << 16 else np.uint32)


class Corpus:
    """A corpus: the files at ``path`` (``what`` names it in error lines, as
    ``data.train_text``), or a string (:meth:`of_text`).

    ``token_cache`` is the folder token files are kept in (see the module docstring).
    """

    def __init__(
        self,
        path: Path | None,
        what: str,
        *,
        token_cache: Path | None = None,
        text: str | None = None,
    ) -> None:
        if (path is None) == (text is None):
            raise TypeError("Corpus: give either a path or a text")
        self.path: Path | None = None if path is None else Path(path)
        self.what, self.token_cache = what, token_cache
        self._text = text
        # Known once tokenized (or the token file found):
        self.document_count: int | None = None
        self.token_count: int | None = None

    @classmethod
    def of_text(cls, text: str, what: str = "text") -> Corpus:
        """A corpus held as a string: its documents are what
        :func:`~unbottle.core.models.loading.documents` finds in it."""
        return cls(None, what, text=text)

    def documents(self) -> Iterator[str]:
        """The documents, in order, read as they are iterated."""
        from unbottle.core.models.loading import iter_documents, iter_text_documents

        if self.path is None:
            return iter_text_documents(self._text or "")
        return iter_documents(self.path, self.what)

    def text(self) -> str:
        """The whole corpus as one string (each document then a page break): it is held
        in memory, which :meth:`documents` and :meth:`token_ids` avoid."""
        from unbottle.core.models.loading import read_text

        if self.path is None:
            return self._text or ""
        return read_text(self.path, self.what)

    def check(self) -> None:
        """Read the whole corpus once, holding one document at a time: every fault it has
        is raised here, as a one-line :class:`DataError`."""
        for _ in self.documents():
            pass

    @cached_property
    def sha256(self) -> str:
        """The sha256 of the corpus's file, or of its folder's files."""
        import hashlib

        from unbottle.core.store.artifacts import tree_hash

        if self.path is None:
            return hashlib.sha256((self._text or "").encode()).hexdigest()
        return tree_hash(self.path)

    def sample(self, count: int, seed: int) -> list[str]:
        """``count`` documents drawn uniformly at random without replacement, in corpus
        order (every document if it has fewer), in one pass that holds only the sample:
        reservoir sampling (Vitter, "Random sampling with a reservoir", ACM TOMS 1985,
        Algorithm R), seeded by ``seed``."""
        import random

        pick = random.Random(seed)
        reservoir: list[tuple[int, str]] = []
        seen = 0
        for i, doc in enumerate(self.documents()):
            seen = i + 1
            if i < count:
                reservoir.append((i, doc))
            elif (j := pick.randrange(seen)) < count:
                reservoir[j] = (i, doc)
        log.info("tokenizer: a sample of %d of %d documents", len(reservoir), seen)
        return [doc for _, doc in sorted(reservoir)]

    def train_tokenizer(
        self, vocab_size: int, *, sample: int | None = None, seed: int = 0
    ) -> PreTrainedTokenizerFast:
        """A byte-level BPE tokenizer of ``vocab_size`` tokens trained on the documents as
        they are read (:func:`~unbottle.core.models.loading.train_tokenizer`), or on a
        ``sample`` of that many (:meth:`sample`, seeded by ``seed``). With a cache
        folder it is kept there, so a rerun loads it instead of training again."""
        from tokenizers import Tokenizer

        from unbottle.core.heap import trim_heap
        from unbottle.core.models.loading import train_tokenizer, wrap_tokenizer
        from unbottle.core.store.artifacts import write_text_atomic

        def documents() -> Iterator[str]:
            return self.documents() if sample is None else iter(self.sample(sample, seed))

        def trained() -> PreTrainedTokenizerFast:
            tokenizer = train_tokenizer(documents(), vocab_size)
            # The trainer's word counts, freed: glibc keeps them (360 of 400 MB on 64 MB
            # of many-worded JSONL) unless asked to hand them back before training.
            trim_heap()
            return tokenizer

        if self.token_cache is None:
            return trained()
        drawn = None if sample is None else {"documents": sample, "seed": seed}
        key = self._key(vocab_size=vocab_size, sample=drawn)
        path = Path(self.token_cache) / f"{key}.tokenizer.json"
        with one_at_a_time(path.with_suffix(".lock")):
            _remove_dead_writes(path)
            if path.is_file():
                try:
                    tokenizer = wrap_tokenizer(Tokenizer.from_file(str(path)))
                except Exception as e:  # any damage, whatever tokenizers raises: train again
                    log.warning("tokenizer: %s does not load (%s); training again", path, e)
                else:
                    log.info("tokenizer: %s, from the cache", path)
                    mark_used(path)
                    return tokenizer
            tokenizer = trained()
            write_text_atomic(path, tokenizer.backend_tokenizer.to_str())
            return tokenizer

    def token_ids(self, tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
        """The corpus as one 1-D tensor of token ids, each document followed by EOS, of
        :func:`token_dtype` (convert windows with ``.long()``). For a corpus on disk it
        is memory-mapped from its token file, written here when the cache lacks it."""
        import numpy as np
        import torch

        from unbottle.core.models.loading import encode_documents

        dtype = token_dtype(len(tokenizer))
        if self.path is None:
            pieces = [np.empty(0, dtype), *encode_documents(tokenizer, self.documents())]
            ids = torch.from_numpy(np.concatenate(pieces).astype(dtype, copy=False))
        elif self.token_cache is None:
            with tempfile.TemporaryFile(prefix="unbottle-tokens-") as f:
                count, self.document_count = self._write_tokens(
                    f, tokenizer, dtype, "a temporary file"
                )
                ids = _map(f, dtype, count)  # the mapping keeps the unnamed file alive
        else:
            path, record = self._cached(tokenizer, dtype)
            self.document_count = record["documents"]
            with open(path, "rb") as f:
                ids = _map(f, dtype, record["tokens"])
        self.token_count = ids.numel()
        return ids

    def _cached(self, tokenizer: PreTrainedTokenizerBase, dtype: np.dtype) -> tuple[Path, dict]:
        """The cache's token file for ``tokenizer`` and its record, written if missing or
        damaged."""
        assert self.token_cache is not None
        key = self._key(
            tokenizer=tokenizer.backend_tokenizer.to_str(),
            eos=tokenizer.eos_token_id,
            dtype=dtype.name,
        )
        path = Path(self.token_cache) / f"{key}{TOKENS_SUFFIX}"
        with one_at_a_time(path.with_suffix(".lock")):
            _remove_dead_writes(path)
            return path, self._load_or_write(path, tokenizer, dtype)

    def _load_or_write(
        self, path: Path, tokenizer: PreTrainedTokenizerBase, dtype: np.dtype
    ) -> dict:
        import json

        from unbottle.core.store.artifacts import as_umask_allows, write_json_atomic

        record_file = path.with_suffix(".json")
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            record = json.loads(record_file.read_text(encoding="utf-8"))
            if path.stat().st_size == record["tokens"] * dtype.itemsize:
                log.info("tokens: %s (%d tokens), from the cache", path, record["tokens"])
                mark_used(record_file)
                return record
            log.warning("tokens: %s is not the size its record says; tokenizing again", path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Written under a temporary name and renamed: a run killed midway leaves no file
        # that a later run would take for whole.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                count, documents = self._write_tokens(f, tokenizer, dtype, str(path))
            as_umask_allows(Path(tmp))
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        record = {"tokens": count, "documents": documents, "dtype": dtype.name}
        write_json_atomic(record_file, record)
        return record

    def _key(self, **parts: object) -> str:
        """A cache key: the sha256 of ``parts``, the corpus, the code that reads it and the
        tokenizers library that trains and runs the tokenizer."""
        import tokenizers

        from unbottle.core.store.cache import code_hashes, digest

        code = code_hashes(("core.models.loading", "core.data.corpus"))
        return digest(
            {"corpus": self.sha256, "code": code, "tokenizers": tokenizers.__version__, **parts}
        )

    def _write_tokens(
        self, f: BinaryIO, tokenizer: PreTrainedTokenizerBase, dtype: np.dtype, where: str
    ) -> tuple[int, int]:
        """Write the ids to ``f`` (``where`` names it in the log), one batch of documents
        at a time; return the counts of tokens and documents."""
        from unbottle.core.models.loading import encode_documents
        from unbottle.core.progress import progress_bar

        tokens = documents = 0
        start = time.perf_counter()
        docs = self.documents()

        def counted() -> Iterator[str]:
            nonlocal documents
            for doc in docs:
                documents += 1
                yield doc

        with progress_bar(f"tokenizing {self.what}", total=None) as advance:
            for ids in encode_documents(tokenizer, counted()):
                f.write(ids.astype(dtype).tobytes())
                tokens += ids.size
                advance(documents=documents, tokens=tokens)
        f.flush()
        log.info(
            "tokens: %s, %d documents, %d tokens in %.1f s, to %s",
            self.what,
            documents,
            tokens,
            time.perf_counter() - start,
            where,
        )
        return tokens, documents


def _remove_dead_writes(path: Path) -> None:
    """Remove the temporary files of ``path`` that a writer killed midway left (a token
    file's can be gigabytes). Called with the entry's lock held, so no live writer owns
    one."""
    for leftover in path.parent.glob(f".{path.name}.*.tmp"):
        log.info("cache: removing %s, left by a writer that died", leftover)
        leftover.unlink(missing_ok=True)


def _map(f: BinaryIO, dtype: np.dtype, count: int) -> torch.Tensor:
    import numpy as np
    import torch

    # Copy-on-write: torch wants a writable array, and nothing is written back.
    return torch.from_numpy(np.memmap(f, dtype=dtype, mode="c", shape=(count,)))
