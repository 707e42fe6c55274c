"""A GGUF file run by llama.cpp itself, through llama-cpp-python's bindings of ``llama.h``.

The ``gguf`` deploy target writes a file for llama.cpp and Ollama; transformers' GGUF
reader dequantizes it to float32 and runs it in torch, which checks the file's numbers but
not that llama.cpp reads them the same way (its tokenizer, the query/key row order of its
rotary embedding, its Q4_0 kernels), nor how fast llama.cpp decodes it. This runner gives
the evaluation metrics llama.cpp's own logits and decoding loop: every row of a batch is a
sequence of its own in one ``llama_decode`` call per step, as llama.cpp's server batches.

llama-cpp-python has no wheel for this platform on PyPI: ``pip install
'unbottle[llama-cpp]'`` builds llama.cpp from source (about 4 minutes on 2 cores, with
cmake and a C++ compiler), for the CPU it is built on.
"""

from __future__ import annotations

import ctypes
import importlib.util
import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from unbottle.core.contract.errors import ConfigError, DataError
from unbottle.core.models.runtimes import CountsWeights, WeightCounts

if TYPE_CHECKING:
    import torch

LLAMA_CPP_INSTALL = "pip install 'unbottle[llama-cpp]'"
#: The decoder's projections: what a pruner prunes and the size metric counts as layers.
LAYER_TENSORS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
#: Tokens llama.cpp takes in one ``llama_decode`` call (its default batch).
CHUNK = 512
#: Sequences one llama.cpp context holds at most (``LLAMA_MAX_SEQ`` in llama.cpp's source).
MAX_SEQUENCES = 256

log = logging.getLogger(__name__)
_backend_lock = threading.Lock()
_backend_ready = False
_quiet_log: Any = None  # the logging callback, kept alive as long as llama.cpp may call it


def require_llama_cpp(what: str) -> None:
    if importlib.util.find_spec("llama_cpp") is None:
        raise ConfigError(
            f"{what}: running a GGUF file in llama.cpp needs the llama-cpp-python package; "
            f"install it with `{LLAMA_CPP_INSTALL}` (it builds llama.cpp: about 4 minutes on "
            "2 cores)"
        )


def amx_build(lib: Any) -> bool:
    """Whether this llama.cpp was built with ggml's AMX kernels (a native build on a CPU
    that has AMX, such as Sapphire Rapids)."""
    return b"AMX_INT8 = 1" in lib.llama_print_system_info()


def llama_library() -> Any:
    """llama-cpp-python's bindings of ``llama.h``, with llama.cpp's process-wide start
    done once and its log quiet (errors surface as failed calls, which raise here)."""
    global _backend_ready, _quiet_log
    import llama_cpp

    with _backend_lock:
        if not _backend_ready:
            _quiet_log = llama_cpp.llama_log_callback(lambda level, text, data: None)
            llama_cpp.llama_log_set(_quiet_log, ctypes.c_void_p(0))
            llama_cpp.llama_backend_init()
            _backend_ready = True
    return llama_cpp


#: llama.cpp's own quantization types (``llama-quantize``'s names): Q4_0, and its k-quants,
#: blocks of 256 weights with 6- or 8-bit sub-block scales, the "_M" mixes keeping some
#: tensors at more bits. The ``gguf`` target offers the k-quants for a float variant (its
#: Q4_0 holds a packed variant's own codes instead).
LLAMA_CPP_QUANT_TYPES = ("Q4_0", "Q4_K_M", "Q5_K_M", "Q6_K")


def quantize_gguf(source: Path, out: Path, gguf_type: str, threads: int | None = None) -> None:
    """Quantize a float GGUF file with llama.cpp's ``llama_model_quantize``, as
    ``llama-quantize SOURCE OUT TYPE`` does (no importance matrix)."""
    import os

    if gguf_type not in LLAMA_CPP_QUANT_TYPES:
        raise ConfigError(
            f"llama.cpp quantization: {gguf_type!r}; known: {', '.join(LLAMA_CPP_QUANT_TYPES)}"
        )
    lib = llama_library()
    params = lib.llama_model_quantize_default_params()
    params.ftype = getattr(lib, f"LLAMA_FTYPE_MOSTLY_{gguf_type}")
    params.nthread = threads or os.cpu_count() or 1
    status = lib.llama_model_quantize(str(source).encode(), str(out).encode(), ctypes.byref(params))
    if status != 0:
        raise DataError(f"{source}: llama.cpp could not quantize it to {gguf_type} ({status})")


def write_quantized_gguf(
    model_dir: Path, tokenizer_dir: Path, out_file: Path, gguf_type: str
) -> dict[str, Any]:
    """A float model as llama.cpp's own ``gguf_type``: the writer's F16 file beside
    ``out_file``, quantized by :func:`quantize_gguf`, then removed. Returns the writer's
    facts about the file."""
    from unbottle.core.models.gguf_writer import write_gguf

    out_file = Path(out_file)
    f16 = out_file.with_name(f".{out_file.stem}-F16.gguf")
    try:
        facts = write_gguf(model_dir, tokenizer_dir, f16, "F16")
        quantize_gguf(f16, out_file, gguf_type)
    finally:
        f16.unlink(missing_ok=True)
    facts.update(gguf_type=gguf_type, gguf_bytes=out_file.stat().st_size)
    return {**facts, "gguf_quantized_by": "llama.cpp"}


def gguf_file(bundle_dir: Path) -> Path:
    """The one ``.gguf`` file of a GGUF bundle directory."""
    files = sorted(Path(bundle_dir).glob("*.gguf"))
    if len(files) != 1:
        raise DataError(f"{bundle_dir}: expected one .gguf file, found {len(files)}")
    return files[0]


def load_llama_model(path: Path) -> Any:
    """llama.cpp's model of the GGUF file ``path``, on the CPU. On a build with AMX
    kernels the weights stay out of the AMX and repacked buffers (see below)."""
    lib = llama_library()
    params = lib.llama_model_default_params()
    params.n_gpu_layers = 0
    if amx_build(lib):
        # ggml's AMX kernels crash in their matrix multiply on Q4_0 and the other
        # types they take (llama.cpp #20824; seen on this project's Xeon): keep the
        # weights out of the AMX buffer, and so out of the repacked one too (slower).
        log.warning(
            "llama.cpp was built with AMX kernels, which crash on quantized weights "
            "(llama.cpp issue 20824): running without its AMX and repacked weight "
            "buffers, slower; build llama-cpp-python without AMX (docs/serving.md)"
        )
        params.use_extra_bufts = False
    model = lib.llama_model_load_from_file(str(path).encode(), params)
    if not model:
        raise DataError(f"{path}: llama.cpp could not load this GGUF file")
    return model


def end_of_generation(lib: Any, vocab: Any) -> list[int]:
    """The tokens llama.cpp ends a generation at (``llama_vocab_is_eog``): those the file
    marks as end of text or of turn, and those it knows by their text (``<|im_end|>``...),
    as llama-server stops."""
    return [t for t in range(lib.llama_vocab_n_tokens(vocab)) if lib.llama_vocab_is_eog(vocab, t)]


def file_end_of_generation(path: Path) -> list[int]:
    """:func:`end_of_generation` of a GGUF file, reading its vocabulary only."""
    lib = llama_library()
    params = lib.llama_model_default_params()
    params.vocab_only = True
    model = lib.llama_model_load_from_file(str(path).encode(), params)
    if not model:
        raise DataError(f"{path}: llama.cpp could not read this GGUF file's vocabulary")
    try:
        return end_of_generation(lib, lib.llama_model_get_vocab(model))
    finally:
        lib.llama_model_free(model)


def new_context(
    model: Any, path: Path, tokens: int, sequences: int, unified: bool, threads: int
) -> Any:
    """A llama.cpp context of ``model``: a KV cache of ``tokens`` cells for up to
    ``sequences`` sequences, shared by them (``unified``) or ``tokens / sequences`` each,
    taking :data:`CHUNK` tokens a call, on ``threads`` threads."""
    lib = llama_library()
    params = lib.llama_context_default_params()
    params.n_ctx = tokens
    params.n_batch = params.n_ubatch = CHUNK
    params.n_seq_max = sequences
    params.kv_unified = unified
    params.n_threads = params.n_threads_batch = threads
    ctx = lib.llama_init_from_model(model, params)
    if not ctx:
        raise DataError(f"{path}: llama.cpp could not make a context of {tokens} tokens")
    return ctx


def decode_entries(
    ctx: Any, batch: Any, entries: list[tuple[int, int, int, bool]], n_vocab: int, path: Path
) -> Any:
    """One ``llama_decode`` of at most :data:`CHUNK` (token, position, sequence, wants
    logits) entries, through ``batch`` (a ``llama_batch_init(CHUNK, 0, 1)``); returns the
    logits of those that want them, in order: (n, V) float32."""
    import numpy as np

    lib = llama_library()
    for i, (token, pos, seq, wants) in enumerate(entries):
        batch.token[i] = token
        batch.pos[i] = pos
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = seq
        batch.logits[i] = wants
    batch.n_tokens = len(entries)
    status = lib.llama_decode(ctx, batch)
    if status != 0:
        raise DataError(f"{path}: llama_decode failed with status {status}")
    wanted = sum(1 for entry in entries if entry[3])
    if not wanted:  # a prompt's chunk before its last token
        return np.empty((0, n_vocab), dtype=np.float32)
    pointer = lib.llama_get_logits(ctx)
    return np.ctypeslib.as_array(pointer, shape=(wanted, n_vocab)).copy()


class LlamaCppRunner(CountsWeights):
    """A GGUF bundle in llama.cpp, for the evaluation metrics (a ``ModelRunner``).

    ``threads`` defaults to torch's thread count in this process, as the ONNX runners'
    (``onnx_threads``): every row of one evaluation table decodes on the same cores.
    Each row of a batch is a llama.cpp sequence with cells of its own, as ``unbottle
    serve`` runs a GGUF bundle (llama-server's slots): one cache shared by the rows
    (``kv_unified``) decodes 8 rows of SmolLM2 about a sixth slower. The cache holds at
    least ``cache_tokens`` in all (float16, llama.cpp's default), and grows when a call
    needs more.
    """

    format = "gguf"
    device = "cpu"
    runtime = "llama.cpp (its own tokenizer, kernels and decoding loop)"

    def __init__(self, bundle_dir: Path, threads: int | None = None, cache_tokens: int = 2048):
        require_llama_cpp(str(bundle_dir))
        from transformers import AutoTokenizer

        from unbottle.core.models.runtimes import onnx_threads

        self.path = gguf_file(bundle_dir)
        self._lib = lib = llama_library()
        self._model = load_llama_model(self.path)
        self._vocab = lib.llama_model_get_vocab(self._model)
        self.n_vocab = lib.llama_vocab_n_tokens(self._vocab)
        #: The tokens that end a generation (end of text, of turn...), as the file marks them.
        self.end_of_generation = end_of_generation(lib, self._vocab)
        self.context = int(lib.llama_model_n_ctx_train(self._model))
        self.threads = threads or onnx_threads()
        self.tokenizer = AutoTokenizer.from_pretrained(bundle_dir)  # the one the file embeds
        self.pad_token_id = self.tokenizer.pad_token_id or 0
        self._ctx = None
        # The context (its KV cache and compute buffers) is made at the first call, so a
        # memory metric run first counts what llama.cpp allocates to serve, as llama-server
        # allocates its context up front; at least cache_tokens, so that a longer request
        # after a short warm-up does not rebuild it.
        self._cache_tokens = min(cache_tokens, self.context)
        self._row_tokens = self._ctx_seqs = 0
        self._batch = lib.llama_batch_init(CHUNK, 0, 1)  # reused by every decode call

    # ------------------------------------------------------------------ llama.cpp state

    def _context_for(self, row_tokens: int, sequences: int) -> Any:
        """A context whose cache holds ``row_tokens`` for each of ``sequences`` rows,
        cleared."""
        lib = self._lib
        if self._ctx is None or row_tokens > self._row_tokens or sequences > self._ctx_seqs:
            if self._ctx is not None:
                lib.llama_free(self._ctx)
            self._ctx_seqs = max(sequences, self._ctx_seqs)
            # llama.cpp gives each sequence n_ctx / n_seq_max cells.
            total = max(self._cache_tokens, row_tokens * self._ctx_seqs)
            self._row_tokens = total // self._ctx_seqs
            self._ctx = new_context(
                self._model, self.path, total, self._ctx_seqs, False, self.threads
            )
        lib.llama_memory_clear(lib.llama_get_memory(self._ctx), True)
        return self._ctx

    def _decode(self, entries: list[tuple[int, int, int, bool]]) -> Any:
        """:func:`decode_entries` in this runner's context."""
        return decode_entries(self._ctx, self._batch, entries, self.n_vocab, self.path)

    def encode(self, text: str) -> list[int]:
        """``text`` as llama.cpp's tokenizer reads it from the file (no special tokens
        added), to check against the tokenizer the file was written from."""
        raw = text.encode("utf-8")
        room = len(raw) + 8
        tokens = (self._lib.llama_token * room)()
        n = self._lib.llama_tokenize(self._vocab, raw, len(raw), tokens, room, False, False)
        if n < 0:
            raise DataError(f"{self.path}: llama.cpp could not tokenize {text[:40]!r}")
        return list(tokens[:n])

    # --------------------------------------------------------------- ModelRunner

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) ids -> (B, T, V) logits, each row decoded alone from an empty cache."""
        import numpy as np
        import torch

        rows = []
        for ids in input_ids.tolist():
            self._context_for(len(ids), 1)
            parts = [
                self._decode([(t, start + j, 0, True) for j, t in enumerate(ids[start:][:CHUNK])])
                for start in range(0, len(ids), CHUNK)
            ]
            rows.append(np.concatenate(parts))
        return torch.from_numpy(np.stack(rows))

    def generate(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int, **kw: Any
    ) -> torch.Tensor:
        """Greedy decoding of every row at once, each row a llama.cpp sequence (left
        padding, as the tokenizers pad for generation, is left out). ``eos_token_id``
        (an id, a list, or None to decode exactly ``max_new_tokens``; absent: the file's
        end-of-generation tokens) and ``min_new_tokens`` (no stop token before it) as
        transformers' ``generate``; ``streamer`` gets the prompt, then each step's tokens.
        Returns (B, T + new): the prompt as given, then each row's new tokens, finished
        rows padded."""
        import numpy as np
        import torch

        if len(input_ids) > CHUNK:
            raise DataError(f"llama.cpp runner: {len(input_ids)} rows at once; at most {CHUNK}")
        rows = [
            ids[mask.bool()].tolist() for ids, mask in zip(input_ids, attention_mask, strict=True)
        ]
        forced = int(kw.get("min_new_tokens") or 0)
        eos = kw.get("eos_token_id", self.end_of_generation)
        stops = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        self._context_for(max(len(r) for r in rows) + max_new_tokens, len(rows))
        streamer = kw.get("streamer")
        if streamer is not None:
            streamer.put(input_ids)
        # The prompts, in chunks: only each row's last token's logits are needed.
        entries = [
            (token, pos, seq, pos == len(ids) - 1)
            for seq, ids in enumerate(rows)
            for pos, token in enumerate(ids)
        ]
        last: list[Any] = []
        for start in range(0, len(entries), CHUNK):
            last.extend(self._decode(entries[start : start + CHUNK]))
        new: list[list[int]] = [[] for _ in rows]
        live = list(range(len(rows)))
        logits = dict(zip(live, last, strict=True))
        for step in range(max_new_tokens):
            if step < forced and stops:  # as transformers: no stop before min_new_tokens
                for seq in live:
                    logits[seq][stops] = -np.inf
            tokens = {seq: int(logits[seq].argmax()) for seq in live}
            for seq, token in tokens.items():
                new[seq].append(token)
            if streamer is not None:
                streamer.put(
                    torch.tensor([tokens.get(seq, self.pad_token_id) for seq in range(len(rows))])
                )
            live = [seq for seq in live if tokens[seq] not in stops]
            if not live or step + 1 == max_new_tokens:
                break
            out = self._decode([(tokens[seq], len(rows[seq]) + step, seq, True) for seq in live])
            logits = dict(zip(live, out, strict=True))
        width = input_ids.shape[1]
        result = torch.full((len(rows), width + max(len(n) for n in new)), self.pad_token_id)
        result[:, :width] = input_ids
        for i, tokens_of_row in enumerate(new):
            result[i, width : width + len(tokens_of_row)] = torch.tensor(tokens_of_row)
        return result.long()

    def weight_counts(self) -> WeightCounts:
        """Counted from the file: every tensor's weights (dequantized by the ``gguf``
        package, so a code at its zero point counts as zero), and the decoder's
        projections alone."""
        import numpy as np
        from gguf import GGUFReader
        from gguf.quants import dequantize

        total = nonzero = layers = layers_nonzero = 0
        for tensor in GGUFReader(self.path).tensors:
            values = dequantize(tensor.data, tensor.tensor_type)
            size, nonzeros = int(values.size), int(np.count_nonzero(values))
            total += size
            nonzero += nonzeros
            if tensor.name.split(".")[-2] in LAYER_TENSORS:
                layers += size
                layers_nonzero += nonzeros
        return WeightCounts(total, nonzero, layers, layers_nonzero)

    def bytes_per_token(self) -> int:
        """Bytes of the file's tensors one decoding step reads: all of them, except the
        token embeddings, of which a step reads one row, unless the output head is the
        embedding table (no ``output.weight``), which then reads all of it."""
        from gguf import GGUFReader

        tensors = {t.name: t for t in GGUFReader(self.path).tensors}
        total = sum(int(t.n_bytes) for t in tensors.values())
        embeddings = tensors.get("token_embd.weight")
        if embeddings is not None and "output.weight" in tensors:
            rows = int(embeddings.shape[-1])  # gguf shapes list the fastest dimension first
            total -= int(embeddings.n_bytes) - int(embeddings.n_bytes) // rows
        return total

    def close(self) -> None:
        if self._ctx is not None:
            self._lib.llama_free(self._ctx)
            self._ctx = None
        if self._batch is not None:
            self._lib.llama_batch_free(self._batch)
            self._batch = None
        if self._model is not None:
            self._lib.llama_model_free(self._model)
            self._model = None

    def __del__(self) -> None:
        # Not contextlib.suppress: at interpreter exit this may run after the module's
        # globals are gone, and the library with them.
        try:  # noqa: SIM105
            self.close()
        except Exception:
            pass
