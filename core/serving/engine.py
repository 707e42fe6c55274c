"""The serving engine: continuous batching over a KV cache, for torch, ONNX Runtime and
llama.cpp.

One thread owns the model. Between two decode steps it admits waiting requests (each is
prefilled on its own, exactly as if it ran alone, and its KV cache is stitched into the
running batch) and drops the ones that finished, so requests join and leave the batch at
every step instead of waiting for a whole batch to drain (the scheduling of Orca, Yu et
al., OSDI 2022, "iteration-level scheduling"; vLLM and TGI serve the same way).

The batch's cache is one preallocated tensor per layer and kind,
``(B, heads, capacity, head_dim)``, of which ``T`` columns are in use (the capacity grows
by doubling, up to the model's context, so a long context costs memory only when used):
each row's real
positions are a contiguous suffix of them (rows are left-padded with zeros), a ``(B, T)``
attention mask hides the padding, and a decode step writes one new column in place.
Each row is fed its own position ids, so rotary embeddings see the positions the row
would have alone; padded columns hold finite values that the mask removes, so a row's
attention is the same sum it would be alone, up to float rounding order. Greedy outputs
therefore match a solo run token for token (tests check this against ``transformers``'
``generate``).

One exception: ONNX Runtime's dynamic int8 quantization scales activations per tensor,
so the rows of a batch share one scale and a row's logits depend on its neighbours
(about 5e-3 on the tiny test model). For such a graph the engine decodes each sequence
on its own (``batch_invariant=True``, the default), still interleaved step by step with
the others; ``batch_invariant=False`` batches them anyway, for throughput.

The onnxruntime-genai bundle (plugins/quantization/genai.py) is served the same way, by
ONNX Runtime on its graph with the engine's cache (genai's own ``Generator`` owns its
cache and takes no rows mid-flight). Its fused attention (``GroupQueryAttention``) takes
no position ids: it reads each row's length off the attention mask and counts a row's
real columns from the left, writing its new column right after them. So for such a
backend (``right_padded``) the batch keeps every row's cache from column 0, padded on the
right, and rows of any lengths decode as one batch.

With ``speculative`` set, a sequence decoding alone checks a draft of its next tokens in
the same step (prompt lookup, :mod:`unbottle.core.serving.speculative`): the backend's
``verify`` runs them as one call, the engine chooses each position's token as a plain
step would and keeps the cache columns of those that match the draft.

A GGUF bundle runs in llama.cpp (:class:`LlamaCppBackend`), which keeps each sequence's
cache itself (``owns_cache``): the engine then holds one handle per row instead of
tensors, and the same scheduling admits, steps and drops rows.

:class:`EngineProcess` runs the same engine in a child process, so that the model's
Python work and a server's event loop do not share one interpreter lock. Nothing here
imports a web framework; :mod:`unbottle.core.serving.http` puts HTTP in front.
"""

from __future__ import annotations

import functools
import gc
import json
import logging
import os
import secrets
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from pydantic import Field, ValidationError

from unbottle.core.contract.errors import ConfigError, DataError
from unbottle.core.contract.strategies import StrategyConfig
from unbottle.core.serving.grammar import GrammarError, Grammars, mask_refused
from unbottle.core.serving.speculative import SpeculativeConfig, TokenHistory, draft_by_lookup
from unbottle.core.store.artifacts import path_kind

if TYPE_CHECKING:
    import torch

log = logging.getLogger("unbottle.serving")

SERVE_CONFIG = "serve.json"

#: The chat template deploy targets give a tokenizer that has none. It renders a
#: conversation in the question/answer format the pipeline finetunes on, so one user
#: message with the generation prompt is exactly ``core.task.prompt(question)``.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] in ('system', 'developer') -%}"
    "{{ message['content'] }}{{ '\\n' }}"
    "{%- elif message['role'] == 'user' -%}"
    "Question: {{ message['content'] }}{{ '\\n' }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "Answer: {{ message['content'] }}{{ eos_token }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}Answer:{%- endif -%}"
)


class ServeConfig(StrategyConfig):
    """How ``unbottle serve`` runs a bundle; the ``server`` deploy target writes it."""

    #: The model id clients name; default ``unbottle-<variant>``.
    model_name: str | None = Field(None, min_length=1, max_length=128)
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    #: Sequences decoded together in one step.
    max_batch: int = Field(8, ge=1, le=1024)
    #: Sequences waiting for a batch slot; beyond this a request gets 429.
    max_queue: int = Field(64, ge=0, le=100_000)
    #: The largest max_tokens a request may ask for; default: the model's context.
    max_tokens: int | None = Field(None, ge=1)
    #: Tokens one sequence may hold, prompt and completion; default: the model's context.
    #: llama.cpp (a GGUF bundle) allocates max_batch x context tokens of cache up front.
    context: int | None = Field(None, ge=2)
    #: A prompt reuses the keys and values computed for an earlier prompt (or, in llama.cpp,
    #: a finished request) that started with the same tokens, and computes only the rest.
    prompt_cache: bool = True
    #: Memory for the prompts' caches the engine keeps (torch and ONNX runtimes; llama.cpp
    #: reuses the cells of its sequences), the least recently used dropped first.
    prompt_cache_mb: int = Field(256, ge=1, le=1 << 20)
    #: Prompt tokens computed between two decode steps: a longer prompt is computed in
    #: parts, so the running sequences wait at most one part for their next token (vLLM's
    #: chunked prefill); 0: every admitted prompt whole before the next step.
    prefill_chunk: int = Field(128, ge=0, le=1 << 20)
    #: max_tokens of a completion request that names none (OpenAI's default is 16).
    default_max_tokens: int = Field(16, ge=1, le=4096)
    #: The largest ``n`` (choices per prompt).
    max_n: int = Field(4, ge=1, le=128)
    #: The most likeliest tokens a request may ask to see at each position (a completion's
    #: ``logprobs``, a chat's ``top_logprobs``; vLLM's ``max_logprobs``).
    max_logprobs: int = Field(20, ge=0, le=1024)
    max_body_bytes: int = Field(1 << 20, ge=1024, le=1 << 30)
    #: How long shutdown waits for in-flight requests before it cancels them.
    shutdown_timeout_s: float = Field(30.0, ge=0, le=3600)
    #: Decode row by row when batching would change a row's numbers (dynamic int8).
    batch_invariant: bool = True
    #: Intra-op threads of torch / ONNX Runtime; default: :func:`default_threads`.
    threads: int | None = Field(None, ge=1, le=4096)
    #: Run the engine in a child process, with its own interpreter lock, so the model's
    #: Python work and the HTTP event loop do not take turns; false: a thread.
    engine_process: bool = True
    #: A request's headers must arrive within this many seconds of the connection opening
    #: (or of the first byte of a later request on it); then the connection is closed.
    header_timeout_s: float = Field(10.0, gt=0, le=3600)
    #: A request's whole body must arrive within this many seconds of its headers (408).
    body_timeout_s: float = Field(30.0, gt=0, le=3600)
    #: Open connections at most; a connection beyond it gets 503 and is closed at once.
    max_connections: int = Field(256, ge=1, le=100_000)
    #: /health answers 503 when the engine has had work and made no progress this long.
    stall_timeout_s: float = Field(60.0, gt=0, le=86_400)
    #: Origins a browser may call the API from (CORS); none by default.
    cors_origins: tuple[str, ...] = ()
    #: Speculative decoding by prompt lookup (:mod:`unbottle.core.serving.speculative`)
    #: for a sequence decoding alone; none by default.
    speculative: SpeculativeConfig | None = None


def read_serve_config(bundle: Path, overrides: dict[str, Any] | None = None) -> ServeConfig:
    """The bundle's ``serve.json`` (if any) with ``overrides`` (None values ignored)."""
    path = Path(bundle) / SERVE_CONFIG
    data: dict[str, Any] = {}
    if path.is_file():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            raise DataError(f"{path}: not valid JSON") from None
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        return ServeConfig.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(p) for p in err["loc"]) or "serve config"
        raise ConfigError(f"serve: {key}: {err['msg']} (got {err.get('input')!r})") from None


# --------------------------------------------------------------------------- backends


class Backend(Protocol):
    """One forward pass of a causal LM with an explicit KV cache.

    A cache is a list, one entry per layer, of ``(keys, values)`` tensors shaped
    ``(B, kv_heads, T, head_dim)``. The engine's batch cache is preallocated,
    ``(B, kv_heads, capacity, head_dim)`` with ``width`` columns in use, so that a decode
    step writes one column in place instead of copying the whole cache.
    """

    format: str
    context: int
    #: True when a row's output depends on the other rows of its batch.
    couples_rows: bool
    #: True when the model reads each row's cache from column 0 and writes its new column at
    #: the row's length (the mask's row sum): the batch is then padded on the right.
    right_padded: bool
    #: True when the runtime keeps each sequence's cache itself (llama.cpp): ``prefill``
    #: returns a handle for it instead of tensors (and takes one as ``past``), ``decode``
    #: is given the rows' handles as ``buffers`` (and no mask), ``release(handle)`` frees
    #: one (:class:`_Slots`), and ``cached(ids)`` says how much of a prompt it holds.
    owns_cache: bool
    #: Tokens at the start of the last prompt given to ``prefill`` that it did not compute
    #: again: those of ``past``, or (``owns_cache``) those it found in its own cache.
    prompt_tokens_cached: int
    #: False when the cache cannot drop a sequence's last positions (a recurrent state):
    #: ``verify``'s refused tokens could not be taken back, so nothing speculates.
    rewinds: bool

    def prefill(
        self,
        ids: list[int],
        past: list[tuple[torch.Tensor, ...]] | None = None,
        all_logits: bool = False,
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, ...]]]:
        """A prompt alone: (V,) logits of its last position, and its (1, h, n, d) cache.
        ``past``: the (1, h, m, d) cache of its first m tokens (m < n), computed before;
        only the rest is computed. ``all_logits``: (n - m, V) logits of every position
        computed (a runtime that owns its cache then reuses none of it without ``past``),
        for the logprobs of a prompt's tokens."""
        ...

    def decode(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor,
        buffers: list[tuple[torch.Tensor, ...]],
        width: int,
    ) -> torch.Tensor:
        """One token per row: (B,) tokens at (B,) positions, a (B, width+1) mask over the
        cache's first ``width`` columns plus the new one -> (B, V) logits; the new keys and
        values are written into column ``width`` of the (B, h, capacity, d) ``buffers``
        (with ``right_padded``, into each row's column at its length: its mask row's sum
        less one).
        """
        ...

    def verify(self, tokens: list[int], position: int, buffers: Any, width: int) -> torch.Tensor:
        """Several tokens of one sequence decoding alone (speculative decoding's check):
        ``tokens`` at positions ``position``, ``position + 1``... after the ``width``
        columns of its (1, h, capacity, d) ``buffers``, all of them real -> (n, V)
        logits, row i after token i; their keys and values written into columns
        ``width`` to ``width + n - 1`` (``owns_cache``: appended to the handle
        ``buffers``' cells, which :meth:`truncate` cuts back)."""
        ...


class TorchBackend:
    """A Hugging Face-format model (safetensors) in torch, float or packed low-bit."""

    format = "hf"
    couples_rows = False
    right_padded = False
    owns_cache = False
    prompt_tokens_cached = 0
    rewinds = True

    def __init__(self, bundle: Path) -> None:
        import torch

        from unbottle.core.models.runtimes import load_torch_model, model_format

        self.format = model_format(bundle)
        self.model, _ = load_torch_model(bundle)
        self.model.eval()
        self.context = int(self.model.config.max_position_embeddings)
        self._torch = torch

    def prefill(
        self,
        ids: list[int],
        past: list[tuple[torch.Tensor, ...]] | None = None,
        all_logits: bool = False,
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, ...]]]:
        torch = self._torch
        self.prompt_tokens_cached = 0
        keep = 0 if all_logits else 1  # transformers: 0 keeps every position
        if past is None:
            with torch.inference_mode():
                out = self.model(
                    input_ids=torch.tensor([ids]), use_cache=True, logits_to_keep=keep
                )  # logits: (1, 1 or n, V)
            return _last_or_all(out.logits[0], all_logits), _layers(out.past_key_values)
        from transformers.cache_utils import Cache

        # The rest of the prompt written after the past's columns into buffers of n.
        kept, n = past[0][0].shape[2], len(ids)
        buffers = []
        for layer in past:
            room = [t.new_empty(t.shape[0], t.shape[1], n, t.shape[3]) for t in layer]
            for buffer, t in zip(room, layer, strict=True):
                buffer[:, :, :kept] = t
            buffers.append(tuple(room))
        cache = Cache(layers=[_slot_layer_class()(k, v, kept) for k, v in buffers])
        with torch.inference_mode():
            out = self.model(
                input_ids=torch.tensor([ids[kept:]]),
                position_ids=torch.arange(kept, n)[None],
                cache_position=torch.arange(kept, n),
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=keep,
            )
        self.prompt_tokens_cached = kept
        return _last_or_all(out.logits[0], all_logits), buffers

    def decode(self, tokens, positions, mask, buffers, width):
        from transformers.cache_utils import Cache

        torch = self._torch
        layer = _slot_layer_class()
        past = Cache(layers=[layer(keys, values, width) for keys, values in buffers])
        attention = mask  # (B, T+1); without padding transformers needs no mask at all
        if bool((mask == 0).any()):
            # The padding as a ready 4D mask: one query per row sees every real column.
            # (Left to transformers, a padded 2D mask is expanded through torch.vmap, whose
            # Python overhead made a decode step of 8 rows cost several of 1.)
            attention = mask[:, None, None, :].bool()  # (B, 1, 1, T+1)
            if self.model.config._attn_implementation != "sdpa":  # eager adds the mask
                attention = torch.zeros(attention.shape).masked_fill(
                    ~attention, torch.finfo(torch.float32).min
                )
        with torch.inference_mode():
            out = self.model(
                input_ids=tokens[:, None],  # (B, 1)
                attention_mask=attention,
                position_ids=positions[:, None],  # (B, 1)
                past_key_values=past,
                cache_position=torch.tensor([width]),
                use_cache=True,
            )
        return out.logits[:, -1].float()  # (B, V)

    def verify(self, tokens, position, buffers, width):
        from transformers.cache_utils import Cache

        torch = self._torch
        n, layer = len(tokens), _slot_layer_class()
        past = Cache(layers=[layer(keys, values, width) for keys, values in buffers])
        with torch.inference_mode():  # no mask: one row, all real, causal by cache_position
            out = self.model(
                input_ids=torch.tensor([tokens]),
                position_ids=torch.arange(position, position + n)[None],
                past_key_values=past,
                cache_position=torch.arange(width, width + n),
                use_cache=True,
            )
        return out.logits[0].float()  # (n, V)


def _last_or_all(logits: torch.Tensor, all_logits: bool) -> torch.Tensor:
    """(n, V) logits of a prompt's positions -> (V,) of the last, or all of them."""
    return logits.float() if all_logits else logits[-1].float()


def _layers(cache: Any) -> list[tuple[torch.Tensor, ...]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


@functools.cache
def _slot_layer_class() -> type:
    """A transformers cache layer over preallocated buffers: new columns are written in
    place, and attention reads a view of the columns in use."""
    from transformers.cache_utils import DynamicLayer

    class SlotLayer(DynamicLayer):
        def __init__(self, keys: torch.Tensor, values: torch.Tensor, width: int) -> None:
            super().__init__()
            self.buffers, self.width = (keys, values), width
            self.dtype, self.device = keys.dtype, keys.device
            self.keys, self.values = keys[:, :, :width], values[:, :, :width]
            self.is_initialized = True

        def update(self, key_states, value_states, cache_kwargs=None):
            keys, values = self.buffers
            end = self.width + key_states.shape[-2]
            keys[:, :, self.width : end] = key_states  # (B, h, new, d)
            values[:, :, self.width : end] = value_states
            self.width = end
            self.keys, self.values = keys[:, :, :end], values[:, :, :end]
            return self.keys, self.values

    return SlotLayer


# Operators of ONNX Runtime's dynamic quantization: their activation scale spans the batch.
_DYNAMIC_QUANT_OPS = {"DynamicQuantizeLinear", "MatMulInteger", "DynamicQuantizeMatMul"}


class OnnxBackend:
    """An ONNX graph with a KV cache, run by ONNX Runtime directly: optimum's export, or
    onnxruntime-genai's graph (a ``genai`` bundle, whose rows decode alone).

    The session is driven with the engine's own stitched cache, so ONNX bundles get
    continuous batching too; ``ORTModelForCausalLM`` (which the bundle also loads in)
    and genai's ``Generator`` would hide the cache.
    """

    format = "onnx"
    owns_cache = False
    prompt_tokens_cached = 0
    rewinds = True

    def __init__(self, bundle: Path, threads: int | None = None) -> None:
        import onnx
        import onnxruntime as ort
        import torch

        files = sorted(Path(bundle).glob("*.onnx"))
        if len(files) != 1:
            raise DataError(f"{bundle}: expected one .onnx model, found {len(files)}")
        genai_config = Path(bundle) / "genai_config.json"
        self.format = "genai" if genai_config.is_file() else "onnx"
        self.right_padded = self.format == "genai"
        self.context = int(_model_config(Path(bundle))[0]["max_position_embeddings"])
        graph = onnx.load(str(files[0]), load_external_data=False).graph
        self.couples_rows = any(node.op_type in _DYNAMIC_QUANT_OPS for node in graph.node)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or default_threads(self.format)
        self.session = ort.InferenceSession(
            str(files[0]), options, providers=["CPUExecutionProvider"]
        )
        names = {i.name: i for i in self.session.get_inputs()}
        self.layers = sum(
            1 for n in names if n.startswith("past_key_values.") and n.endswith(".key")
        )
        self.positions = "position_ids" in names
        if not self.layers or not (self.positions or self.right_padded):
            raise DataError(
                f"{files[0]}: the graph has no KV-cache or position_ids inputs; export it with "
                "the onnx deploy target (optimum, use_cache=True)"
            )
        shape = names["past_key_values.0.key"].shape  # [batch, heads, past, head_dim]
        self.heads, self.head_dim = int(shape[1]), int(shape[3])
        self.vocab = self.session.get_outputs()[0].shape[-1]  # logits: [batch, seq, vocab]
        self._bindings: dict[tuple[int, ...], Any] = {}  # cache placement -> its IO binding
        self._torch = torch

    def _run(self, ids, mask, positions, cache):
        feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
        if self.positions:  # genai's graph derives them from the mask
            feed["position_ids"] = positions.numpy()
        for i, (k, v) in enumerate(cache):
            feed[f"past_key_values.{i}.key"] = k.contiguous().numpy()
            feed[f"past_key_values.{i}.value"] = v.contiguous().numpy()
        logits, *present = self.session.run(None, feed)
        torch = self._torch
        new_cache = [
            (torch.from_numpy(present[2 * i]), torch.from_numpy(present[2 * i + 1]))
            for i in range(self.layers)
        ]
        return torch.from_numpy(logits), new_cache

    def prefill(
        self,
        ids: list[int],
        past: list[tuple[torch.Tensor, ...]] | None = None,
        all_logits: bool = False,
    ):
        torch = self._torch
        n = len(ids)
        empty = torch.zeros(1, self.heads, 0, self.head_dim)
        past = past or [(empty, empty)] * self.layers
        kept = past[0][0].shape[2]
        logits, cache = self._run(
            torch.tensor([ids[kept:]]),  # (1, n - kept)
            torch.ones(1, n, dtype=torch.long),
            torch.arange(kept, n)[None],
            past,
        )
        self.prompt_tokens_cached = kept
        return _last_or_all(logits[0], all_logits), cache

    def decode(self, tokens, positions, mask, buffers, width):
        return self._decode(tokens[:, None], positions[:, None], mask, buffers, width)[:, -1]

    def verify(self, tokens, position, buffers, width):
        torch, n = self._torch, len(tokens)
        positions = torch.arange(position, position + n)[None]
        mask = torch.ones(1, width + n, dtype=torch.long)
        return self._decode(torch.tensor([tokens]), positions, mask, buffers, width)[0]

    def _decode(self, ids, positions, mask, buffers, width):
        """(B, n) tokens at (B, n) positions after ``width`` columns -> (B, n, V) logits,
        their keys and values written into the buffers' next n columns."""
        if self.right_padded:
            return self._decode_in_place(ids, mask, buffers)
        in_use = [(k[:, :, :width], v[:, :, :width]) for k, v in buffers]
        logits, present = self._run(ids, mask, positions, in_use)
        end = width + ids.shape[1]
        for (keys, values), (new_keys, new_values) in zip(buffers, present, strict=True):
            keys[:, :, width:end] = new_keys[:, :, width:end]  # the new columns, (B, h, n, d)
            values[:, :, width:end] = new_values[:, :, width:end]
        return logits.float()

    def _decode_in_place(self, ids, mask, buffers):
        """genai's graph with each layer's past and present bound to the engine's buffer,
        as onnxruntime-genai's own generator runs it: the fused attention writes the new
        columns (after each row's length, read off the mask) into the buffer itself, so a
        step copies no cache in or out."""
        import numpy as np

        torch = self._torch
        if not all(t.is_contiguous() for layer in buffers for t in layer):
            raise ValueError("genai graphs decode in place: the cache buffers must be contiguous")
        # Binding 60 cache tensors took 0.3 ms, 7% of a SmolLM2 step at two threads; a
        # binding refers to memory by address, so one is kept per cache placement and a
        # step rebinds only the token, the mask and the logits.
        where = tuple((t.data_ptr(), *t.shape) for layer in buffers for t in layer)
        binding = self._bindings.get(where)
        if binding is None:
            if len(self._bindings) >= _BINDINGS_KEPT:
                self._bindings.clear()
            binding = self._bindings[where] = self.session.io_binding()
            for i, layer in enumerate(buffers):
                for kind, buffer in zip(("key", "value"), layer, strict=True):
                    shape, at = list(buffer.shape), buffer.data_ptr()
                    binding.bind_input(
                        f"past_key_values.{i}.{kind}", "cpu", 0, np.float32, shape, at
                    )
                    binding.bind_output(f"present.{i}.{kind}", "cpu", 0, np.float32, shape, at)
        binding.bind_cpu_input("input_ids", ids.numpy())
        binding.bind_cpu_input("attention_mask", mask.numpy())
        logits = torch.empty(*ids.shape, self.vocab)
        binding.bind_output("logits", "cpu", 0, np.float32, list(logits.shape), logits.data_ptr())
        self.session.run_with_iobinding(binding)
        return logits


class LlamaCppBackend:
    """A GGUF bundle run by llama.cpp, through llama-cpp-python's bindings of ``llama.h``
    (:mod:`unbottle.core.models.llama_cpp`), which keeps the cache itself.

    Each running sequence holds one of ``max_batch`` llama.cpp sequence ids, with cells of
    its own for ``context`` tokens (llama-server's slots): it is prefilled alone and
    decodes with the others in one ``llama_decode`` a step. The cache is allocated up
    front, ``max_batch`` x ``context`` tokens in float16: ``context`` in serve.json (or
    ``--context``) caps it below the model's.

    With ``prompt_cache`` (llama-server's ``cache_prompt``), a sequence that leaves keeps
    its cells until its id is taken again, and a prompt takes the free id whose cells
    hold the longest start of it: only the rest is computed. A chat's next turn, or
    requests sharing a system prompt, skip what was computed before. The reused cells
    were computed in other batches than a fresh prompt's would be, which moves the
    logits by float rounding, as decoding one token at a time already does. Without it,
    a sequence's cells are cleared when it leaves.
    """

    format = "gguf"
    couples_rows = False  # llama.cpp rounds each row's activations on their own
    right_padded = False
    owns_cache = True
    #: A prompt copies a running sequence's cells when they hold at least this many more
    #: of its first tokens than a free sequence's. llama.cpp copies a sequence's whole
    #: share of the cache (``context`` cells of every layer), whatever the start's length:
    #: for SmolLM2 Q4_0 on 2 cores about 32 ms at its 8,192-token context, the time it
    #: computes some 25 prompt tokens in, 12 ms at 2,048 (bench/llama_cpp_copy_cost.py).
    COPY_AT_LEAST = 32

    def __init__(
        self,
        bundle: Path,
        threads: int,
        max_batch: int,
        context: int | None = None,
        prompt_cache: bool = True,
    ) -> None:
        from unbottle.core.models import llama_cpp

        llama_cpp.require_llama_cpp(f"serve: {bundle}")
        self.path = llama_cpp.gguf_file(bundle)
        self._llama_cpp = llama_cpp
        self._lib = lib = llama_cpp.llama_library()
        self._model = llama_cpp.load_llama_model(self.path)
        self.n_vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(self._model))
        # A recurrent (or hybrid) model's state cannot drop its last positions.
        self.rewinds = not (
            lib.llama_model_is_recurrent(self._model) or lib.llama_model_is_hybrid(self._model)
        )
        trained = int(lib.llama_model_n_ctx_train(self._model))
        self.context = min(trained, context or trained)
        self._ctx = llama_cpp.new_context(
            self._model, self.path, self.context * max_batch, max_batch, False, threads
        )
        self._memory = lib.llama_get_memory(self._ctx)
        self._batch = lib.llama_batch_init(llama_cpp.CHUNK, 0, 1)
        self.prompt_cache = prompt_cache
        self.prompt_tokens_cached = 0
        self._free = list(range(max_batch))  # sequence ids, the longest free first
        #: The tokens whose keys and values each sequence's cells hold, from position 0.
        self._held: list[list[int]] = [[] for _ in range(max_batch)]

    def _start_of(self, ids: list[int], reuse: bool = True) -> tuple[int, int, int | None]:
        """Where a prompt starts: the free sequence to take, how many first tokens of
        ``ids`` its cells will hold (at most all but the last, whose logits are wanted),
        and the running sequence whose cells it copies first, or None.

        The free sequence whose cells hold the longest start (the one free longest on a
        tie); but when a running sequence holds at least :attr:`COPY_AT_LEAST` tokens
        more (choices of one prompt, requests sharing a system prompt that arrive
        together), the one free longest takes a copy of its cells. Without
        ``prompt_cache`` (or ``reuse``): the one free longest, from nothing."""
        best, kept = self._free[0], 0
        if not (self.prompt_cache and reuse):
            return best, kept, None
        for seq in self._free:
            common = _common_prefix(self._held[seq], ids, len(ids) - 1)
            if common > kept:
                best, kept = seq, common
        source, shared = None, kept + self.COPY_AT_LEAST - 1
        for seq in range(len(self._held)):
            if seq not in self._free:
                common = _common_prefix(self._held[seq], ids, len(ids) - 1)
                if common > shared:
                    source, shared = seq, common
        if source is None:
            return best, kept, None
        return self._free[0], shared, source

    def cached(self, ids: list[int]) -> int:
        """How many first tokens of ``ids`` :meth:`prefill` will not compute again: those
        a free sequence's cells hold, or a running one's that it copies."""
        return self._start_of(ids)[1] if self._free else 0

    def _take(self, ids: list[int], reuse: bool = True) -> tuple[int, int]:
        """:meth:`_start_of`, taken: the running sequence's cells copied in, if it says so,
        and the cells past the shared start cleared."""
        if not self._free:
            raise RuntimeError("llama.cpp: every sequence is taken (more rows than max_batch)")
        best, kept, source = self._start_of(ids, reuse)
        self._free.remove(best)
        if source is not None:
            # Across sequences with cells of their own, llama.cpp copies all of them (at
            # its next llama_decode, before that batch writes any).
            self._lib.llama_memory_seq_rm(self._memory, best, -1, -1)
            self._lib.llama_memory_seq_cp(self._memory, source, best, -1, -1)
            self._held[best] = list(self._held[source])
        # Cut the cells past the shared start. llama.cpp refuses to cut some caches
        # (recurrent state): then start over.
        cut = kept < len(self._held[best])
        if cut and not self._lib.llama_memory_seq_rm(self._memory, best, kept, -1):
            self._forget(best)
            kept = 0
        return best, kept

    def _forget(self, seq: int) -> None:
        """Clear a sequence's cells."""
        self._lib.llama_memory_seq_rm(self._memory, seq, -1, -1)
        self._held[seq] = []

    def _run(self, entries: list[tuple[int, int, int, bool]]) -> Any:
        """``entries`` in llama_decode calls of at most CHUNK tokens: (n, V) logits of
        those that want them."""
        import numpy as np

        chunk, decode = self._llama_cpp.CHUNK, self._llama_cpp.decode_entries
        parts = [
            decode(self._ctx, self._batch, entries[start : start + chunk], self.n_vocab, self.path)
            for start in range(0, len(entries), chunk)
        ]
        return np.concatenate(parts)

    def prefill(
        self, ids: list[int], past: int | None = None, all_logits: bool = False
    ) -> tuple[torch.Tensor, int]:
        """A prompt in a free sequence of its own: (V,) logits of its last position, and
        the sequence id, the handle of its cache. llama.cpp finds a cached start itself
        (not with ``all_logits``, whose cached positions would have none); ``past`` is the
        handle that an earlier call returned for the start of ``ids`` (the prompt computed
        in parts), whose cells go on from there."""
        import torch

        if past is None:
            seq, kept = self._take(ids, reuse=not all_logits)
        else:
            seq, kept = past, len(self._held[past])
        try:
            last = len(ids) - 1
            logits = self._run(
                [(ids[pos], pos, seq, all_logits or pos == last) for pos in range(kept, len(ids))]
            )
        except BaseException:  # the sequence is given back: the engine holds no handle
            self._forget(seq)
            self._free.append(seq)
            raise
        self._held[seq] = list(ids)
        self.prompt_tokens_cached = kept
        return torch.from_numpy(logits if all_logits else logits[-1]), seq

    def decode(self, tokens, positions, mask, buffers, width):
        import numpy as np
        import torch

        rows = list(zip(tokens.tolist(), positions.tolist(), buffers, strict=True))
        # In the order of the sequence ids: with a cache per sequence llama.cpp splits a
        # batch into micro-batches of ascending ids (split_equal, sequential), so rows in
        # the order requests came cost one graph each. 8 rows of SmolLM2 in descending
        # order decoded at 116 tokens/s, sorted at 395 (bench/llama_cpp_row_order.py).
        order = sorted(range(len(rows)), key=lambda r: rows[r][2])
        try:
            logits = self._run([(*rows[r], True) for r in order])
        except BaseException:  # which cells it wrote is unknown: none is kept for reuse
            for _, _, seq in rows:
                self._forget(seq)
            raise
        for token, _, seq in rows:
            self._held[seq].append(token)
        unsorted = np.empty_like(logits)
        unsorted[order] = logits
        return torch.from_numpy(unsorted)

    def verify(self, tokens, position, buffers, width):
        import torch

        seq = buffers
        try:
            logits = self._run([(t, position + i, seq, True) for i, t in enumerate(tokens)])
        except BaseException:
            self._forget(seq)
            raise
        self._held[seq].extend(tokens)
        return torch.from_numpy(logits)  # (n, V)

    def truncate(self, seq: int, length: int) -> None:
        """Keep a sequence's first ``length`` cells: the rest held tokens a check refused."""
        if length < len(self._held[seq]):
            if not self._lib.llama_memory_seq_rm(self._memory, seq, length, -1):
                raise RuntimeError("llama.cpp: this cache cannot drop its last cells")
            del self._held[seq][length:]

    def release(self, seq: int) -> None:
        """Free a sequence's id for the next prompt; its cells are kept for one that
        starts as it did (``prompt_cache``), else cleared."""
        if not self.prompt_cache:
            self._forget(seq)
        self._free.append(seq)  # the least recently used first

    def close(self) -> None:
        for free, handle in (
            ("llama_free", "_ctx"),
            ("llama_batch_free", "_batch"),
            ("llama_model_free", "_model"),
        ):
            if getattr(self, handle, None) is not None:
                getattr(self._lib, free)(getattr(self, handle))
                setattr(self, handle, None)

    def __del__(self) -> None:
        # Not contextlib.suppress: at interpreter exit this may run after the module's
        # globals are gone, and the library with them.
        try:  # noqa: SIM105
            self.close()
        except Exception:
            pass


def _common_prefix(held: list[int] | tuple[int, ...], ids: list[int], most: int) -> int:
    """How many first tokens of ``ids`` (at most ``most``) ``held`` starts with."""
    n = min(len(held), most)
    for i in range(n):
        if held[i] != ids[i]:
            return i
    return n


#: IO bindings kept per backend, one per cache placement (the batch's, or each row's when
#: rows decode one by one); more than this means the placements moved: all are dropped.
_BINDINGS_KEPT = 64


def default_threads(fmt: str) -> int:
    """The threads a bundle of format ``fmt`` is served on unless ``threads`` says.

    ONNX Runtime ("onnx", "genai") and llama.cpp ("gguf"): every core. Served over HTTP
    on 2 cores, with the client on the same cores, SmolLM2's genai bundle gave 1.12x the
    tokens/s of one thread with one stream and 1.23x with 8, better in each of 5 rounds
    (BENCHMARKS.md, "Serving threads"); llama.cpp, a thread pool of its own in the same
    place, is given the same. Torch ("hf", "packed"): every core but one, left to the
    HTTP event loop; there two threads gave 0.97x with one stream (each of 3 rounds
    slower) and 0.95x to 1.27x with 8.
    """
    cores = os.cpu_count() or 2
    return cores if fmt in ("onnx", "genai", "gguf") else max(1, cores - 1)


def bundle_format(bundle: Path) -> str:
    """:func:`~unbottle.core.models.runtimes.model_format`, and ``gguf`` for a directory
    holding a GGUF file (the ``gguf`` target's bundle), which the server runs in llama.cpp."""
    from unbottle.core.models.runtimes import model_format

    has_model = (bundle / "model.safetensors").is_file() or any(bundle.glob("*.onnx"))
    if not has_model and any(bundle.glob("*.gguf")):
        return "gguf"
    return model_format(bundle)


def load_backend(
    bundle: Path,
    threads: int | None = None,
    max_batch: int = 8,
    context: int | None = None,
    prompt_cache: bool = True,
) -> Backend:
    """The bundle's model in its runtime, on ``threads`` threads (default:
    :func:`default_threads`). ``max_batch`` and ``context`` size a cache that the runtime
    allocates up front (llama.cpp's); the engine's own grows as it is used, and a
    ``context`` below the model's ends its sequences there. ``prompt_cache``: see
    :class:`LlamaCppBackend`."""
    import torch

    bundle = Path(bundle)
    if not bundle.is_dir():
        raise DataError(f"{bundle}: no such bundle directory")
    fmt = bundle_format(bundle)
    threads = threads or default_threads(fmt)
    # Process-wide: the engine is the only torch user.
    if fmt in ("hf", "packed"):
        torch.set_num_threads(threads)  # the model runs in torch
        backend: Backend = TorchBackend(bundle)
    else:
        # ONNX Runtime's (or llama.cpp's) own pool runs the model on ``threads`` cores;
        # torch only keeps the engine's books (sampling, stitching caches), on one. Its
        # OpenMP workers, spinning after each small op, took the cores from ONNX
        # Runtime's: SmolLM2's genai bundle decoded 8 rows at 446 tokens/s with torch on
        # 2 threads, 600 to 726 on 1.
        torch.set_num_threads(1)
        if fmt == "gguf":
            return LlamaCppBackend(bundle, threads, max_batch, context, prompt_cache)
        backend = OnnxBackend(bundle, threads)  # optimum's export or genai's graph
    if context is not None:
        backend.context = min(backend.context, context)
    return backend


# --------------------------------------------------------------------------- requests


#: Temperatures below this sample greedily, and those below ``MIN_TEMPERATURE`` are raised
#: to it: dividing float32 logits by 1e-300 gives inf and then NaN probabilities. (vLLM
#: draws the same two lines, ``_SAMPLING_EPS`` and ``_MAX_TEMP``.)
GREEDY_BELOW = 1e-5
MIN_TEMPERATURE = 1e-2
#: How many of the likeliest tokens top-p sampling looks at first (then 8 times as many,
#: until their mass reaches top_p).
NUCLEUS_FIRST_K = 64
#: A seed is taken modulo 2**64, the range of ``torch.Generator.manual_seed``.
SEED_MODULUS = 1 << 64
#: Plain steps a speculating sequence takes at most before drafting again, after drafts
#: refused whole.
MOST_PAUSED_STEPS = 16
#: How often a busy engine reports its progress to the server when nothing else happens.
HEARTBEAT_S = 1.0


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False
    #: Each generated token's log-probability and this many of the likeliest tokens at its
    #: position, from the model's distribution (before temperature and top_p); None: none.
    logprobs: int | None = None
    #: The same for each prompt token after the first; the prompt is then computed from
    #: its first token, never from a cached start, whose positions have no logits.
    prompt_logprobs: int | None = None
    #: OpenAI's penalties, subtracted from the logits of tokens generated so far: once per
    #: occurrence (frequency), once for any (presence).
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    #: (token id, bias) pairs added to those tokens' logits before choosing.
    logit_bias: tuple[tuple[int, float], ...] = ()
    #: A grammar the text must keep to (``grammar.compile_grammar``'s output): tokens
    #: that cannot continue it are never chosen, and its end ends the sequence ("stop").
    grammar: str | None = None


#: A token's log-probability: (token id, logprob, ((id, logprob) of the likeliest, best
#: first)).
TokenLogprob = tuple[int, float, tuple[tuple[int, float], ...]]


def token_logprobs(logits: torch.Tensor, tokens: list[int], top: int) -> list[TokenLogprob]:
    """Each row of (n, V) ``logits`` scoring the token of that row, and its ``top``
    likeliest tokens."""
    import torch

    logprobs = torch.log_softmax(logits.float(), dim=-1)  # (n, V)
    top = min(top, logprobs.shape[-1])
    chosen = logprobs[torch.arange(len(tokens)), torch.tensor(tokens)].tolist()  # (n,)
    best: list[tuple[tuple[int, float], ...]] = [()] * len(tokens)
    if top:
        values, ids = logprobs.topk(top, dim=-1)  # (n, top) each
        best = [
            tuple(zip(row_ids, row_values, strict=True))
            for row_ids, row_values in zip(ids.tolist(), values.tolist(), strict=True)
        ]
    return list(zip(tokens, chosen, best, strict=True))


#: Receives (sequence, new text, finish reason or None) for one sequence.
Sink = Callable[["Sequence", str, "str | None"], None]
#: One decode step's events for all sequences, delivered at once (see ``Engine``).
Event = tuple["Sequence", str, "str | None"]


@dataclass(eq=False)
class Sequence:
    """One generation: a prompt, how to sample, and where its text goes."""

    prompt: list[int]
    params: SamplingParams
    sink: Sink
    index: int = 0
    #: Identifies the sequence between the server and an engine process.
    uid: int = 0
    generated: list[int] = field(default_factory=list)
    #: Tokens at the start of the prompt found in the cache (``prompt_cache``).
    cached_tokens: int = 0
    #: One entry per generated token, when ``params.logprobs`` asks for them.
    logprobs: list[TokenLogprob] = field(default_factory=list)
    #: One entry per prompt token (None for the first, which nothing scores), when
    #: ``params.prompt_logprobs`` asks for them.
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    cancelled: bool = False
    submitted_at: float = field(default_factory=time.perf_counter)
    _emitted: int = 0
    _prefix_offset: int = 0
    _read_offset: int = 0
    _generator: Any = None
    _matcher: Any = None  # the grammar's state after the tokens generated so far
    #: Speculative decoding: drafts refused in a row, and plain steps left before the next.
    _refused: int = 0
    _pause: int = 0
    _history: Any = None  # its tokens for the lookup (speculative.TokenHistory)

    @property
    def position(self) -> int:
        """Position id of the last generated token, the one fed to the next step."""
        return len(self.prompt) + len(self.generated) - 1


class QueueFull(Exception):
    """The engine's waiting queue cannot take the request."""


class Engine:
    """Continuous batching over one backend, in a thread of its own.

    ``submit`` is thread-safe and never blocks; results arrive through each sequence's
    sink, called from the engine thread, or, with ``on_events``, as one list per engine
    iteration (a server hands that list to its event loop in one wake-up instead of one
    per token).
    """

    def __init__(
        self,
        backend: Backend,
        tokenizer: Any,
        *,
        max_batch: int = 8,
        max_queue: int = 64,
        batch_invariant: bool = True,
        eos_token_ids: set[int] | None = None,
        prompt_cache_bytes: int = 0,
        prefill_chunk: int = 0,
        speculative: SpeculativeConfig | None = None,
        on_step: Callable[[int], None] | None = None,
        on_events: Callable[[list[Event]], None] | None = None,
    ) -> None:
        self.backend = backend
        # A backend whose rows' numbers depend on what is computed with them (dynamic
        # int8's scales span the tokens of a call) would give another prompt's numbers.
        keeps = prompt_cache_bytes and not backend.owns_cache and not backend.couples_rows
        self._prompts = _PromptStore(prompt_cache_bytes) if keeps else None
        # Dynamic int8 again: a prompt computed in parts would get other numbers.
        self.prefill_chunk = 0 if backend.couples_rows else prefill_chunk
        self._filling: deque[_Prefill] = deque()  # admitted, their prompts being computed
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.row_by_row = backend.couples_rows and batch_invariant
        # Checking several tokens in one call would change a coupled graph's numbers too.
        self.speculative = speculative
        if speculative is not None and self.row_by_row:
            self.speculative = None
            log.warning(
                "speculative decoding is off: this graph's rows share activation scales "
                "(dynamic int8), so checking several tokens at once would change them"
            )
        elif speculative is not None and not backend.rewinds:
            self.speculative = None
            log.warning(
                "speculative decoding is off: this model's cache cannot drop the positions "
                "of refused drafts (a recurrent state)"
            )
        #: Tokens drafted, and those of them the model chose, over the engine's life.
        self.drafted_tokens = self.accepted_tokens = 0
        self.eos = eos_token_ids if eos_token_ids is not None else {tokenizer.eos_token_id}
        self.grammars = Grammars(tokenizer, self.eos)
        self.on_step = on_step
        self.on_events = on_events
        self._events: list[Event] = []
        self._waiting: deque[Sequence] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._batch = self._new_batch()
        self._progress_at = time.monotonic()  # the end of the engine's last iteration
        self._reported: tuple[int, int, float] = (0, 0, 0.0)  # queue, running, when

    # -- public, thread-safe -------------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        """Sequences admitted: decoding, or their prompts being computed."""
        return len(self._batch.rows) + len(self._filling)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stalled_for(self) -> float:
        """Seconds the engine has had work and finished no iteration (0 when idle)."""
        if not self._waiting and not self.running:
            return 0.0
        return time.monotonic() - self._progress_at

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="unbottle-engine", daemon=True)
        self._thread.start()

    def submit(self, seqs: list[Sequence]) -> None:
        """Queue all of ``seqs`` or none: QueueFull when they do not fit."""
        with self._cond:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            if len(self._waiting) + len(seqs) > self.max_queue + self._free_slots():
                raise QueueFull(
                    f"the queue is full ({len(self._waiting)} waiting, limit {self.max_queue})"
                )
            if not self._waiting and not self.running:
                self._progress_at = time.monotonic()  # idle until now, not stalled
            self._waiting.extend(seqs)
            self._cond.notify()

    def cancel(self, seqs: list[Sequence]) -> None:
        """Stop generating for ``seqs`` (a client went away); no further sink calls."""
        with self._cond:
            for seq in seqs:
                seq.cancelled = True
            self._cond.notify()

    def stop(self, timeout: float = 10.0) -> None:
        """Abort whatever is still queued or running and end the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def generate(self, prompt: list[int], params: SamplingParams) -> Sequence:
        """Run one sequence to the end, blocking (for scripts and smoke checks)."""
        done = threading.Event()
        seq = Sequence(prompt, params, lambda s, text, finish: finish and done.set())
        self.submit([seq])
        done.wait()
        return seq

    # -- the engine thread ---------------------------------------------------------------

    def _new_batch(self) -> _Batch | _Slots:
        if self.backend.owns_cache:
            return _Slots(self.backend)
        return _Batch(self.backend.right_padded)

    def _free_slots(self) -> int:
        return max(0, self.max_batch - self.running)

    def _loop(self) -> None:
        import torch

        try:
            with torch.inference_mode():
                self._serve()
        except BaseException:
            # A bug outside any one sequence: fail everything rather than leave it hanging;
            # the thread ends, so ``alive`` turns false and the server answers 503.
            log.exception("the engine failed; failing %d sequences", self.running)
            with self._cond:
                self._stopping = True
                leftovers = [*self._waiting, *self._drop_filling(), *self._batch.rows]
                self._waiting.clear()
            for seq in leftovers:
                if not seq.cancelled and seq.finish_reason is None:
                    self._finish(seq, "error")
            self._flush(force=True)

    def _serve(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self._waiting and not self.running:
                    self._cond.wait()
                if self._stopping:
                    break
                while self._waiting and self.running < self.max_batch:
                    self._filling.append(_Prefill(self._waiting.popleft()))
            self._prefill_some()
            if self._batch.rows:
                try:
                    self._step()
                except Exception:  # a bug or out of memory: fail the batch, keep serving
                    log.exception("decode step failed; aborting %d sequences", self.running)
                    for seq in self._batch.rows:
                        self._finish(seq, "error")
                    self._batch.clear()
                    self._batch = self._new_batch()
            self._progress_at = time.monotonic()
            self._flush()
        with self._cond:
            leftovers = [*self._waiting, *self._drop_filling(), *self._batch.rows]
            self._waiting.clear()
        for seq in leftovers:
            if not seq.cancelled and seq.finish_reason is None:
                self._finish(seq, "abort")
        self._batch.clear()
        self._batch = self._new_batch()
        self._flush(force=True)

    def _prefill_some(self) -> None:
        """Compute the admitted prompts in turn, ``prefill_chunk`` positions in all this
        iteration (0: all of them); a prompt done joins the batch."""
        budget = self.prefill_chunk or 1 << 62
        while self._filling and budget > 0:
            job = self._filling[0]
            seq, prompt = job.seq, job.seq.prompt
            if seq.cancelled:
                self._drop_filling(1)
                continue
            past, start = job.past, job.done
            scored = seq.params.prompt_logprobs
            if not start and scored is None:  # the start of the prompt that is cached already
                if self._prompts is not None:
                    past = self._prompts.longest(prompt)
                    start = past[0][0].shape[2] if past is not None else 0
                elif self.backend.owns_cache:
                    start = self.backend.cached(prompt)
            end = min(len(prompt), start + budget)
            try:
                # (V,) logits of position end - 1, the (1, h, end, d) cache (or handle).
                logits, cache = self.backend.prefill(prompt[:end], past, scored is not None)
            except Exception:
                log.exception("prefill failed")
                self._filling.popleft()  # a backend gives back its handle when it fails
                self._finish(seq, "error")
                continue
            if scored is not None:  # (end - start, V) logits: row j scores token start + j + 1
                if not start:
                    seq.prompt_logprobs.append(None)
                following = prompt[start + 1 : end + 1]
                seq.prompt_logprobs.extend(
                    token_logprobs(logits[: len(following)], following, scored)
                )
                logits = logits[-1]
            if not job.done:
                seq.cached_tokens = self.backend.prompt_tokens_cached
            budget -= end - start
            job.done, job.past = end, cache
            if end == len(prompt):
                self._filling.popleft()
                if self._prompts is not None:
                    self._prompts.put(prompt, cache)
                self._admit(seq, logits, cache)

    def _drop_filling(self, count: int | None = None) -> list[Sequence]:
        """Take the first ``count`` (default all) prompts being computed off the engine,
        giving back what a backend holds for them; returns their sequences."""
        dropped = []
        while self._filling and (count is None or len(dropped) < count):
            job = self._filling.popleft()
            if self.backend.owns_cache and job.past is not None:
                self.backend.release(job.past)
            dropped.append(job.seq)
        return dropped

    def _admit(self, seq: Sequence, logits: torch.Tensor, cache: Any) -> None:
        """A sequence whose prompt is computed: its first token, then the batch."""
        if seq.params.temperature >= GREEDY_BELOW:
            import torch

            seed = seq.params.seed if seq.params.seed is not None else secrets.randbits(63)
            seq._generator = torch.Generator().manual_seed((seed + seq.index) % SEED_MODULUS)
        if not self._advance_or_fail(seq, logits):
            self._batch.add(seq, cache, self.backend.context)
        elif self.backend.owns_cache:  # done at its first token: its cache is not kept
            self.backend.release(cache)

    def _step(self) -> None:
        import torch

        batch = self._batch
        if self.speculative is not None and len(batch.rows) == 1:
            draft = self._draft(batch.rows[0])
            if draft:
                self._step_speculative(batch.rows[0], draft)
                return
        batch.make_room(self.backend.context)
        tokens = torch.tensor([s.generated[-1] for s in batch.rows])  # (B,)
        positions = torch.tensor([s.position for s in batch.rows])  # (B,)
        mask = batch.next_mask()  # (B, width + 1)
        if self.row_by_row:
            logits = self._decode_rows(tokens, positions, mask)
        else:
            logits = self.backend.decode(tokens, positions, mask, batch.buffers, batch.width)
        batch.mask, batch.width = mask, batch.width + 1
        if self.on_step is not None:
            self.on_step(len(batch.rows))
        finished = [
            r
            for r, seq in enumerate(batch.rows)
            if seq.cancelled or self._advance_or_fail(seq, logits[r])
        ]
        if finished and self._prompts is not None:
            # A chat's next turn starts with this turn's prompt and answer: keep both.
            for r in finished:
                seq = batch.rows[r]
                if seq.finish_reason in ("stop", "length"):  # the last token was not fed
                    self._prompts.put(seq.prompt + seq.generated[:-1], batch.row_cache(r))
        if finished:
            batch.remove(finished)

    def _draft(self, seq: Sequence) -> list[int]:
        """Tokens to check after the sequence's last one: as many as fit before its
        ``max_tokens`` (a step yields one more than it drafts) and the context.

        Under a grammar, the tokens it forces next if any (a schema's next key), else
        the lookup's; either cut where the grammar would refuse them, since the engine
        could never choose a token past that."""
        assert self.speculative is not None
        if seq._pause:
            seq._pause -= 1
            return []
        room = min(
            seq.params.max_tokens - len(seq.generated) - 1,
            self.backend.context - 1 - seq.position,
            self.speculative.num_speculative_tokens,
        )
        if room <= 0:
            return []
        matcher = seq._matcher
        draft = matcher.compute_ff_tokens()[:room] if matcher is not None else []
        if not draft:
            if seq._history is None:
                seq._history = TokenHistory()
            tokens = seq._history.extend(seq.prompt, seq.generated)
            draft = draft_by_lookup(tokens, self.speculative, room)
        if matcher is not None and draft:
            draft = draft[: matcher.validate_tokens(draft)]
        return draft

    def _step_speculative(self, seq: Sequence, draft: list[int]) -> None:
        """A lone sequence's step over its last token and a draft of the next: its tokens
        are chosen position by position, as one step each would choose them, until one
        differs from the draft (or the sequence ends); the cache keeps the columns of the
        tokens that led to them.

        Only a lone sequence speculates: its step is bound by reading the weights, which
        the extra positions share, and it has no neighbours whose cache columns would
        need the rows' different accepted lengths (vLLM's default stops speculating at
        larger batches too)."""
        import torch

        batch = self._batch
        tokens = [seq.generated[-1], *draft]
        batch.make_room(self.backend.context, len(tokens))
        # The row's cache: the batch's buffers, or (owns_cache) its handle.
        cache = batch.buffers[0] if self.backend.owns_cache else batch.buffers
        # (n, V): row i chooses the token after tokens[i].
        logits = self.backend.verify(tokens, seq.position, cache, batch.width)
        if self.on_step is not None:
            self.on_step(1)
        kept = 0  # columns of `tokens` whose keys and values stay: those that led somewhere
        for i, row in enumerate(logits):
            kept += 1
            done = seq.cancelled or self._advance_or_fail(seq, row)
            if done or i == len(draft) or seq.generated[-1] != draft[i]:
                break
        accepted = kept - 1
        if seq.finish_reason is not None and seq.generated[-1:] == draft[accepted:kept]:
            accepted += 1  # its last token was the draft's too
        self.drafted_tokens += len(draft)
        self.accepted_tokens += accepted
        # A draft refused whole cost its step more than a plain one and gave nothing: wait
        # 1, 2, 4... plain steps before the next while they keep being refused, so that
        # an answer that quotes nothing (JSON keys the prompt spells otherwise) pays little.
        seq._refused = 0 if accepted else seq._refused + 1
        seq._pause = min(MOST_PAUSED_STEPS, 1 << (seq._refused - 1)) if seq._refused else 0
        batch.width += kept
        if batch.mask is not None:  # a lone row has no padding
            batch.mask = torch.ones(1, batch.width, dtype=torch.long)
        if self.backend.owns_cache:
            self.backend.truncate(cache, seq.position)
        if seq.cancelled or seq.finish_reason is not None:
            if self._prompts is not None and seq.finish_reason in ("stop", "length"):
                self._prompts.put(seq.prompt + seq.generated[:-1], batch.row_cache(0))
            batch.remove([0])

    def _decode_rows(self, tokens, positions, mask):
        """Each row on its own, over its real columns only: exactly its solo computation."""
        import torch

        batch, rows = self._batch, []
        for r in range(len(batch.rows)):
            if batch.right_padded:  # its columns come first; the buffer row stays whole
                end = int(mask[r].sum())
                own = [(k[r : r + 1], v[r : r + 1]) for k, v in batch.buffers]
                row_mask, width = mask[r : r + 1, :end], end - 1
            else:
                start = int((mask[r] == 0).sum())  # padding is a prefix
                own = [(k[r : r + 1, :, start:], v[r : r + 1, :, start:]) for k, v in batch.buffers]
                row_mask, width = mask[r : r + 1, start:], batch.width - start
            logits = self.backend.decode(
                tokens[r : r + 1], positions[r : r + 1], row_mask, own, width
            )
            rows.append(logits[0])
        return torch.stack(rows)  # (B, V)

    def _advance_or_fail(self, seq: Sequence, logits: torch.Tensor) -> bool:
        """``_advance``; a sequence whose sampling or decoding raises fails alone ("error")."""
        try:
            return self._advance(seq, logits)
        except Exception:
            log.exception("sequence %d failed while choosing a token", seq.uid)
            self._finish(seq, "error")
            return True

    def _advance(self, seq: Sequence, logits: torch.Tensor) -> bool:
        """Append the next token chosen from (V,) logits; True when the sequence is done."""
        if seq.cancelled:
            return True
        params = seq.params
        scores = logits
        if params.frequency_penalty or params.presence_penalty or params.logit_bias:
            scores = _adjusted(logits, params, seq.generated)
        if params.grammar is not None:
            scores = self._constrained(seq, scores)
        token = _choose(scores, params, seq._generator)
        # Its logprob before the token itself: whoever reads `generated` finds it.
        if params.logprobs is not None:
            seq.logprobs.extend(token_logprobs(logits[None], [token], params.logprobs))
        seq.generated.append(token)
        if seq._matcher is not None and not seq._matcher.consume_token(token):
            raise GrammarError(f"the grammar refused token {token}: {seq._matcher.get_error()}")
        # EOS ends a sequence without text; any other token may complete a stop string.
        eos = token in self.eos and not params.ignore_eos
        finish = "stop" if eos else self._detokenize(seq)
        grammar_ended = seq._matcher is not None and seq._matcher.is_stopped()
        if finish is None and (
            grammar_ended
            or len(seq.generated) >= params.max_tokens
            or len(seq.prompt) + len(seq.generated) >= self.backend.context
        ):
            finish = "stop" if grammar_ended else "length"
            # A last token that ends inside a multi-byte character still counts.
            seq.text += self.tokenizer.decode(
                seq.generated[seq._read_offset :], skip_special_tokens=True
            )
        if finish is not None:
            self._finish(seq, finish)
            return True
        hold = max((len(s) for s in params.stop), default=1) - 1
        end = len(seq.text) - hold
        if end > seq._emitted:
            delta, seq._emitted = seq.text[seq._emitted : end], end
            self._emit(seq, delta, None)
        return False

    def _constrained(self, seq: Sequence, scores: torch.Tensor) -> torch.Tensor:
        """(V,) ``scores`` with minus infinity for every token the sequence's grammar
        refuses next. The matcher is made on the sequence's first token, here in the
        engine thread, so that a grammar that fails to build fails its sequence alone."""
        if seq._matcher is None:
            assert seq.params.grammar is not None
            seq._matcher = self.grammars.matcher(seq.params.grammar)
        return mask_refused(seq._matcher, scores)

    def _detokenize(self, seq: Sequence) -> str | None:
        """Extend seq.text with the newest token; "stop" if a stop string appeared.

        Decodes a short window of tokens (the incremental detokenization of TGI and vLLM),
        and waits while a byte-level token ends inside a multi-byte character.
        """
        ids = seq.generated
        decode = self.tokenizer.decode
        before = decode(ids[seq._prefix_offset : seq._read_offset], skip_special_tokens=True)
        after = decode(ids[seq._prefix_offset :], skip_special_tokens=True)
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return None
        new_text = after[len(before) :]
        seq._prefix_offset, seq._read_offset = seq._read_offset, len(ids)
        longest = max((len(s) for s in seq.params.stop), default=0)
        search_from = max(0, len(seq.text) - longest + 1)
        seq.text += new_text
        for stop in seq.params.stop:
            at = seq.text.find(stop, search_from)
            if at != -1:
                seq.text = seq.text[:at]
                return "stop"
        return None

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.finish_reason = reason
        if seq.cancelled:
            return
        delta = seq.text[seq._emitted :]
        seq._emitted = len(seq.text)
        self._emit(seq, delta, reason)

    def _emit(self, seq: Sequence, text: str, finish: str | None) -> None:
        if self.on_events is None:
            seq.sink(seq, text, finish)
        else:
            self._events.append((seq, text, finish))

    def _flush(self, force: bool = False) -> None:
        """Deliver this iteration's events. An engine process also reports, with or without
        events, when its queue or batch changed size (a cancelled row leaves silently) and,
        while busy, every ``HEARTBEAT_S``, so the server can tell a slow engine from a
        wedged one."""
        if self.on_events is None:
            return
        now = time.monotonic()
        counts = (self.queue_depth, self.running)
        queue, running, reported_at = self._reported
        busy = counts != (0, 0)
        if (
            self._events
            or force
            or counts != (queue, running)
            or (busy and now - reported_at >= HEARTBEAT_S)
        ):
            events, self._events = self._events, []
            self._reported = (*counts, now)
            self.on_events(events)


@dataclass
class _Prefill:
    """An admitted sequence whose prompt is being computed, in parts: ``done`` positions
    so far, and their cache (or the runtime's handle of it), the next part's past."""

    seq: Sequence
    done: int = 0
    past: Any = None


def _adjusted(logits: torch.Tensor, params: SamplingParams, generated: list[int]) -> torch.Tensor:
    """(V,) logits with OpenAI's penalties on the tokens generated so far (vLLM's
    semantics: the prompt's tokens are not penalized) and the logit bias."""
    import torch

    scores = logits.float().clone()
    if generated and (params.frequency_penalty or params.presence_penalty):
        counts = torch.bincount(torch.tensor(generated), minlength=len(scores))[: len(scores)]
        scores -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0)
    if params.logit_bias:
        tokens, biases = zip(*params.logit_bias, strict=True)
        scores[list(tokens)] += torch.tensor(biases)
    return scores


def _choose(logits: torch.Tensor, params: SamplingParams, generator: Any) -> int:
    """Greedy below ``GREEDY_BELOW``, else a sample from the top-p nucleus of (V,) logits."""
    import numpy as np
    import torch

    if params.temperature < GREEDY_BELOW:
        # In numpy, on this thread: torch splits a vocabulary-long argmax across its
        # threads, whose second may wait for a core that ONNX Runtime's or llama.cpp's
        # own threads still spin on after their step. A small gain at most
        # (bench/choice_ab.py: 0.99x to 1.06x per process, the GGUF file's
        # rows a little more often faster). Both take the first of equal maxima.
        if logits.dtype not in (torch.float32, torch.float16, torch.float64):
            logits = logits.float()
        return int(np.argmax(logits.detach().numpy()))
    probs = torch.softmax(logits.float() / max(params.temperature, MIN_TEMPERATURE), dim=-1)
    ids = None  # the candidates' token ids, when they are not the whole vocabulary
    if params.top_p < 1:
        # The nucleus from the likeliest few instead of a sort of the whole vocabulary
        # (2.9 ms a token for 49k logits, where topk takes 0.1): widen until the kept
        # tokens' mass reaches top_p, so the nucleus lies among them.
        k = NUCLEUS_FIRST_K
        while True:
            probs_k, ids = probs.topk(min(k, len(probs)))  # likeliest first
            if k >= len(probs) or float(probs_k.sum()) >= params.top_p:
                break
            k *= 8
        # Keep the smallest prefix whose mass reaches top_p, and the first token always
        # (a top_p below float32's smallest number would otherwise keep none).
        keep = probs_k.cumsum(0) - probs_k < params.top_p
        keep[0] = True
        probs, ids = probs_k[keep], ids[keep]
    # One uniform draw through the cumulative distribution (in float64, so that the
    # tail's tiny probabilities keep their share): torch.multinomial on 49k
    # probabilities took 1 ms, this 0.05.
    cumulative = probs.double().cumsum(0)
    total = float(cumulative[-1])
    if not 0 < total < float("inf"):  # NaN or infinite logits: fail the sequence, loudly
        raise ValueError(f"sampling: the probabilities sum to {total}, not a finite mass")
    drawn = torch.rand((), generator=generator, dtype=torch.float64) * total
    pick = min(int(torch.searchsorted(cumulative, drawn, right=True)), len(probs) - 1)
    return int(ids[pick]) if ids is not None else pick


class _PromptStore:
    """Prompts' caches kept after their prefill (and with their answers, once finished),
    for later prompts that start the same way (a shared system prompt, a chat's earlier
    turns), when the engine holds the cache
    (torch and ONNX runtimes; llama.cpp keeps its own cells). The least recently used go
    first beyond ``budget`` bytes or :attr:`MOST` prompts. A prompt's cache is kept as its
    prefill returned it; the batch copies it in and never writes to it."""

    #: Prompts kept at most, whatever their size: a lookup compares each one's tokens in
    #: Python, before the prompt is computed.
    MOST = 64

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.bytes = 0
        self.entries: OrderedDict[tuple[int, ...], list[tuple[torch.Tensor, ...]]]
        self.entries = OrderedDict()

    def longest(self, ids: list[int]) -> list[tuple[torch.Tensor, ...]] | None:
        """The cache of the longest start of ``ids`` held (all of it but the last token,
        whose logits are wanted, at most), or None."""
        best, kept = None, 0
        for tokens in self.entries:
            common = _common_prefix(tokens, ids, len(ids) - 1)
            if common > kept:
                best, kept = tokens, common
        if best is None:
            return None
        self.entries.move_to_end(best)
        return [tuple(t[:, :, :kept] for t in layer) for layer in self.entries[best]]

    def put(self, ids: list[int], cache: list[tuple[torch.Tensor, ...]]) -> None:
        size = sum(t.nbytes for layer in cache for t in layer)
        if size > self.budget:
            return
        key = tuple(ids)
        # A prompt this one starts with adds nothing now that this one is held.
        for tokens in [t for t in self.entries if key[: len(t)] == t]:
            self._drop(tokens)
        self.entries[key] = cache
        self.bytes += size
        while self.bytes > self.budget or len(self.entries) > self.MOST:
            self._drop(next(iter(self.entries)))

    def _drop(self, tokens: tuple[int, ...]) -> None:
        cache = self.entries.pop(tokens)
        self.bytes -= sum(t.nbytes for layer in cache for t in layer)


class _Batch:
    """The running sequences and their stitched KV cache.

    ``buffers`` hold ``(B, h, capacity, d)`` per layer and kind, of which the first
    ``width`` columns are in use, and ``mask`` (B, width) is 0 on each row's padding. Rows
    are left-padded (each row's real columns a suffix: a decode step writes column
    ``width`` of every row), or with ``right_padded`` padded on the right (its real
    columns a prefix: a step writes each row's column at its length). Joining and leaving
    copy the cache (rare); the capacity doubles when a step needs room, up to the model's
    context; a decode step only writes one column per row.
    """

    #: The least capacity a batch allocates, in columns.
    MIN_CAPACITY = 256

    def __init__(self, right_padded: bool = False) -> None:
        self.right_padded = right_padded
        self.rows: list[Sequence] = []
        self.buffers: list[tuple[torch.Tensor, ...]] = []
        self.width = 0
        self.mask: Any = None  # (B, width) long

    @property
    def capacity(self) -> int:
        return self.buffers[0][0].shape[2] if self.buffers else 0

    def _room(self, columns: int, context: int) -> int:
        """A capacity for ``columns`` columns: the next power of two, capped by the context."""
        return min(context, max(self.MIN_CAPACITY, self.capacity, 1 << (columns - 1).bit_length()))

    def add(self, seq: Sequence, cache: list[tuple[torch.Tensor, ...]], context: int) -> None:
        """Stitch in a prefilled sequence's (1, h, n, d) cache."""
        import torch

        n = cache[0][0].shape[2]
        width = max(n, self.width)
        capacity = self._room(width + 1, context)
        # Left-padded, the running rows move right to make room for a longer one.
        shift = 0 if self.right_padded else width - self.width
        new_at = slice(0, n) if self.right_padded else slice(width - n, width)
        rows = []
        for i, (keys, values) in enumerate(cache):
            for j, new in enumerate((keys, values)):
                buffer = torch.zeros(len(self.rows) + 1, new.shape[1], capacity, new.shape[3])
                if self.rows:
                    old = self.buffers[i][j][:, :, : self.width]
                    buffer[:-1, :, shift : shift + self.width] = old
                buffer[-1, :, new_at] = new[0]
                rows.append(buffer)
        self.buffers = [tuple(rows[i : i + 2]) for i in range(0, len(rows), 2)]
        mask = torch.zeros(len(self.rows) + 1, width, dtype=torch.long)
        if self.rows:
            mask[:-1, shift : shift + self.width] = self.mask
        mask[-1, new_at] = 1
        self.mask, self.width = mask, width
        self.rows.append(seq)

    def make_room(self, context: int, columns: int = 1) -> None:
        """Grow the buffers when the next step's ``columns`` would not fit."""
        import torch

        if self.width + columns <= self.capacity:
            return
        capacity = self._room(self.width + columns, context)
        if capacity <= self.capacity:
            return  # at the context: the engine ends sequences before they pass it
        grown = []
        for layer in self.buffers:
            bigger = []
            for buffer in layer:
                b, h, _, d = buffer.shape
                room = torch.zeros(b, h, capacity, d)
                room[:, :, : self.width] = buffer[:, :, : self.width]
                bigger.append(room)
            grown.append(tuple(bigger))
        self.buffers = grown

    def next_mask(self) -> torch.Tensor:
        """The (B, width + 1) mask of the next step: every row's new column added."""
        import torch

        rows = len(self.rows)
        if not self.right_padded:
            return torch.cat([self.mask, torch.ones(rows, 1, dtype=torch.long)], 1)
        mask = torch.cat([self.mask, torch.zeros(rows, 1, dtype=torch.long)], 1)
        mask[torch.arange(rows), self.mask.sum(1)] = 1  # right after each row's columns
        return mask

    def clear(self) -> None:
        self.rows, self.buffers, self.width, self.mask = [], [], 0, None

    def row_cache(self, r: int) -> list[tuple[torch.Tensor, ...]]:
        """Row ``r``'s real columns, (1, h, n, d) per layer and kind, copied out."""
        n = int(self.mask[r].sum())
        start = 0 if self.right_padded else self.width - n  # left padding is a prefix
        return [
            tuple(t[r : r + 1, :, start : start + n].clone() for t in layer)
            for layer in self.buffers
        ]

    def remove(self, rows: list[int]) -> None:
        import torch

        gone = set(rows)
        keep = [r for r in range(len(self.rows)) if r not in gone]
        self.rows = [self.rows[r] for r in keep]
        if not keep:
            self.buffers, self.width, self.mask = [], 0, None
            return
        index = torch.tensor(keep)
        mask = self.mask.index_select(0, index)  # (B', width)
        # Columns that are padding in every remaining row are dead weight: drop them.
        if self.right_padded:
            start, width = 0, int(mask.sum(1).max())
        else:
            start = int(mask.any(0).long().argmax())
            width = self.width - start
        buffers = []
        for layer in self.buffers:
            kept = []
            for buffer in layer:
                rows_kept = buffer.index_select(0, index)  # (B', h, capacity, d), a copy
                if start:
                    rows_kept[:, :, :width] = rows_kept[:, :, start : self.width].clone()
                kept.append(rows_kept)
            buffers.append(tuple(kept))
        self.buffers, self.width = buffers, width
        self.mask = mask[:, start : start + width].contiguous()


class _Slots:
    """The running sequences of a backend that keeps their caches itself
    (``owns_cache``): a handle per row, released when the row leaves. It has
    :class:`_Batch`'s interface, and no mask: such a runtime tracks each sequence's
    positions."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.rows: list[Sequence] = []
        self.buffers: list[Any] = []  # each row's handle
        self.width = 0
        self.mask: Any = None

    def add(self, seq: Sequence, handle: Any, context: int) -> None:
        self.rows.append(seq)
        self.buffers.append(handle)

    def make_room(self, context: int, columns: int = 1) -> None:
        """Nothing: the runtime holds a whole context for each row."""

    def next_mask(self) -> None:
        return None

    def remove(self, rows: list[int]) -> None:
        gone = set(rows)
        for r in sorted(gone):
            self.backend.release(self.buffers[r])
        keep = [r for r in range(len(self.rows)) if r not in gone]
        self.rows = [self.rows[r] for r in keep]
        self.buffers = [self.buffers[r] for r in keep]

    def clear(self) -> None:
        self.remove(list(range(len(self.rows))))


# --------------------------------------------------------------------------- bundles


@dataclass
class LoadedBundle:
    """A bundle's tokenizer and settings; the weights load when an engine needs them."""

    path: Path
    overrides: dict[str, Any]
    tokenizer: Any
    config: ServeConfig
    model_name: str
    format: str
    context: int
    eos_token_ids: set[int]
    #: Sampling defaults from the bundle's generation config (greedy unless it samples).
    default_temperature: float
    default_top_p: float
    _backend: Backend | None = None

    @property
    def backend(self) -> Backend:
        if self._backend is None:
            config = self.config
            self._backend = load_backend(
                self.path, config.threads, config.max_batch, self.context, config.prompt_cache
            )
        return self._backend

    def engine(
        self,
        on_step: Callable[[int], None] | None = None,
        on_events: Callable[[list[Event]], None] | None = None,
    ) -> Engine:
        """An engine in this process (a thread)."""
        return Engine(
            self.backend,
            self.tokenizer,
            max_batch=self.config.max_batch,
            max_queue=self.config.max_queue,
            batch_invariant=self.config.batch_invariant,
            eos_token_ids=self.eos_token_ids,
            prompt_cache_bytes=self.config.prompt_cache_mb << 20 if self.config.prompt_cache else 0,
            prefill_chunk=self.config.prefill_chunk,
            speculative=self.config.speculative,
            on_step=on_step,
            on_events=on_events,
        )

    def engine_process(
        self,
        on_step: Callable[[int], None] | None = None,
        on_events: Callable[[list[Event]], None] | None = None,
    ) -> EngineProcess:
        """An engine in a child process, driven through a pipe."""
        return EngineProcess(self, on_step=on_step, on_events=on_events)


def load_bundle(bundle: Path, overrides: dict[str, Any] | None = None) -> LoadedBundle:
    """A deployed bundle (hf, onnx, genai, gguf or server target), ready to serve."""
    bundle = Path(bundle)
    # Before the heavy imports: a typo should fail fast.
    if path_kind(bundle, "bundle") != "directory":
        raise DataError(f"{bundle}: no such bundle directory")
    config = read_serve_config(bundle, overrides)
    fmt = bundle_format(bundle)
    tokenizer_options: dict[str, Any] = {}
    if fmt == "gguf":  # the file is the model: its context and stop tokens are in it
        from unbottle.core.models.llama_cpp import MAX_SEQUENCES, require_llama_cpp

        require_llama_cpp(f"serve: {bundle}")
        if config.max_batch > MAX_SEQUENCES:
            raise ConfigError(
                f"serve: max_batch {config.max_batch}: llama.cpp decodes at most "
                f"{MAX_SEQUENCES} sequences together (a GGUF bundle)"
            )
        model_config, gguf_file = _gguf_config(bundle)
        # The gguf target writes the tokenizer beside the file; a bare file has its own.
        if not (bundle / "tokenizer.json").is_file():
            tokenizer_options["gguf_file"] = gguf_file
        generation = _read_json(bundle / "generation_config.json")
    else:
        model_config, generation = _model_config(bundle)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(bundle, **tokenizer_options)
    if tokenizer.chat_template is None:
        log.info("%s has no chat template; using unbottle's question/answer template", bundle)
        tokenizer.chat_template = CHAT_TEMPLATE
    eos = generation.get("eos_token_id", model_config.get("eos_token_id"))
    eos_ids = set(eos) if isinstance(eos, list) else {eos if eos is not None else -1}
    if fmt == "gguf":  # as llama-server and the deploy stage's llama.cpp runner stop
        eos_ids = (eos_ids - {-1}) | set(model_config["eos_token_id"])
    samples = bool(generation.get("do_sample", False))
    context = min(int(model_config["max_position_embeddings"]), config.context or 1 << 62)
    if fmt == "gguf":
        _check_llama_cache(model_config["cache_bytes_per_token"], context, config.max_batch)
    return LoadedBundle(
        path=bundle,
        overrides=dict(overrides or {}),
        tokenizer=tokenizer,
        config=config,
        model_name=config.model_name or _default_name(bundle),
        format=fmt,
        context=context,
        eos_token_ids=eos_ids,
        default_temperature=float(generation.get("temperature", 1.0)) if samples else 0.0,
        default_top_p=float(generation.get("top_p", 1.0)) if samples else 1.0,
    )


def _model_config(bundle: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """A bundle's ``config.json`` and ``generation_config.json``; for the folder of
    onnxruntime-genai's own builder, which writes neither, what serving needs of them from
    its ``genai_config.json``."""
    config = _read_json(bundle / "config.json")
    if not config and (bundle / "genai_config.json").is_file():
        return _genai_config(bundle)
    if "max_position_embeddings" not in config:
        raise DataError(f"{bundle}/config.json: no max_position_embeddings (the context)")
    return config, _read_json(bundle / "generation_config.json")


def _genai_config(bundle: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """What serving needs from an onnxruntime-genai bundle's ``genai_config.json``, named as
    in a ``config.json`` (the context, the end token) and a ``generation_config.json``
    (its ``search`` defaults)."""
    genai = _read_json(bundle / "genai_config.json")
    model, search = genai.get("model", {}), genai.get("search", {})
    if "context_length" not in model:
        raise DataError(f"{bundle}/genai_config.json: no model.context_length (the context)")
    config = {"max_position_embeddings": model["context_length"]}
    if "eos_token_id" in model:
        config["eos_token_id"] = model["eos_token_id"]
    keys = ("do_sample", "temperature", "top_p")
    return config, {key: search[key] for key in keys if key in search}


def _gguf_config(bundle: Path) -> tuple[dict[str, Any], str]:
    """What serving needs from a GGUF file, named as in a ``config.json``: the context it
    was trained for and the size of a token's cache (its metadata), and the tokens
    llama.cpp ends a generation at; and the file's name."""
    from gguf import GGUFReader

    from unbottle.core.models.llama_cpp import file_end_of_generation, gguf_file

    path = gguf_file(bundle)
    try:
        fields = GGUFReader(path).fields
        arch = fields["general.architecture"].contents()
        context = int(fields[f"{arch}.context_length"].contents())
        layers = int(fields[f"{arch}.block_count"].contents())
        heads_field = fields[f"{arch}.attention.head_count"]
        heads = int(heads_field.contents())
        kv_heads = fields.get(f"{arch}.attention.head_count_kv", heads_field)
        head_dim = int(fields[f"{arch}.embedding_length"].contents()) // heads
        key_dim, value_dim = (
            int(fields[key].contents()) if key in fields else head_dim
            for key in (f"{arch}.attention.key_length", f"{arch}.attention.value_length")
        )
    except (ValueError, KeyError, IndexError, OSError) as e:
        raise DataError(f"{path}: not a GGUF model file with a context length ({e})") from None
    per_layer = kv_heads.contents()  # one count, or one per layer
    kv_heads_total = sum(per_layer) if isinstance(per_layer, list) else int(per_layer) * layers
    stops = file_end_of_generation(path)
    return {
        "max_position_embeddings": context,
        "eos_token_id": stops,
        # llama.cpp's cache: float16 keys and values of every layer's KV heads.
        "cache_bytes_per_token": kv_heads_total * (key_dim + value_dim) * 2,
    }, path.name


def _check_llama_cache(bytes_per_token: int, context: int, max_batch: int) -> None:
    """Refuse in one line a llama.cpp cache larger than the free memory (it is allocated
    whole when the engine starts: max_batch sequences of context tokens); else log it."""
    import psutil

    from unbottle.core.training.memory import human

    need = bytes_per_token * context * max_batch
    free = int(psutil.virtual_memory().available)
    if need > free:
        raise ConfigError(
            f"serve: llama.cpp's cache of max_batch {max_batch} x context {context} tokens "
            f"needs {human(need)} ({human(bytes_per_token)} a token), and {human(free)} of "
            "memory is free; lower --context or --max-batch"
        )
    log.info("llama.cpp's cache: %d sequences of %d tokens, %s", max_batch, context, human(need))


# --------------------------------------------------------------------------- a process


class EngineProcess:
    """The same engine in a child process, with the interface of :class:`Engine`.

    A model step is mostly Python (the layers' dispatch), and so is an HTTP event loop;
    in one process they take turns on the interpreter lock, and every hand-over waits
    on the OS scheduler. In a child process the engine has a lock of its own; the server
    exchanges small messages with it over a pipe: prompts and cancellations one way, each
    step's new token ids and text the other. (vLLM runs its engine core in a separate
    process for the same reason.)
    """

    def __init__(
        self,
        bundle: LoadedBundle,
        *,
        on_step: Callable[[int], None] | None = None,
        on_events: Callable[[list[Event]], None] | None = None,
    ) -> None:
        self.bundle = bundle
        self.max_batch = bundle.config.max_batch
        self.max_queue = bundle.config.max_queue
        self.on_step = on_step
        self.on_events = on_events
        self._live: dict[int, Sequence] = {}
        self._lock = threading.Lock()
        self._next_uid = 0
        self._stopping = False
        self._queue_depth = 0
        self._running = 0
        self.drafted_tokens = self.accepted_tokens = 0  # the child's counts, as last heard
        self._heard_at = time.monotonic()  # the child's last message
        self._proc: Any = None
        self._conn: Any = None
        self._reader: threading.Thread | None = None

    @property
    def queue_depth(self) -> int:
        return self._queue_depth

    @property
    def running(self) -> int:
        return self._running

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.is_alive() and not self._stopping

    def stalled_for(self) -> float:
        """Seconds the child has had work and sent nothing (it reports at least every
        ``HEARTBEAT_S`` while busy); 0 when idle."""
        if not self._live:
            return 0.0
        return time.monotonic() - self._heard_at

    def start(self, timeout: float = 600.0) -> None:
        """Start the child and wait until its model is loaded."""
        import multiprocessing

        context = multiprocessing.get_context("spawn")  # no fork of a threaded parent
        self._conn, child_end = context.Pipe()
        self._proc = context.Process(
            target=_engine_main,
            args=(str(self.bundle.path), self.bundle.overrides, child_end),
            name="unbottle-engine",
            daemon=True,
        )
        self._proc.start()
        child_end.close()
        deadline = time.monotonic() + timeout
        while not self._conn.poll(0.1):
            if not self._proc.is_alive():
                raise RuntimeError(f"the engine process exited with {self._proc.exitcode}")
            if time.monotonic() > deadline:
                self._proc.kill()
                raise RuntimeError(f"the engine process did not start in {timeout:.0f} s")
        try:
            ready = self._conn.recv()
        except EOFError:  # it died while loading: say how
            self._proc.join(5)
            raise RuntimeError(
                f"the engine process exited with {self._proc.exitcode} while loading"
            ) from None
        assert ready == ("ready",)
        self._reader = threading.Thread(target=self._read, name="unbottle-engine-pipe")
        self._reader.start()

    def submit(self, seqs: list[Sequence]) -> None:
        with self._lock:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            waiting = max(0, len(self._live) - self.max_batch)
            if len(self._live) + len(seqs) > self.max_batch + self.max_queue:
                raise QueueFull(f"the queue is full ({waiting} waiting, limit {self.max_queue})")
            if not self._live:
                self._heard_at = time.monotonic()  # idle until now, not stalled
            for seq in seqs:
                self._next_uid += 1
                seq.uid = self._next_uid
                self._live[seq.uid] = seq
            self._conn.send(("submit", [(s.uid, s.prompt, s.params, s.index) for s in seqs]))

    def cancel(self, seqs: list[Sequence]) -> None:
        with self._lock:
            for seq in seqs:
                seq.cancelled = True
                self._live.pop(seq.uid, None)
            if not self._stopping:
                self._conn.send(("cancel", [s.uid for s in seqs]))

    def stop(self, timeout: float = 10.0) -> None:
        with self._lock:
            if self._proc is None or self._stopping:
                return
            self._stopping = True
            self._conn.send(("stop",))
        if self._reader is not None:
            self._reader.join(timeout)
        self._proc.join(timeout)
        if self._proc.is_alive():
            self._proc.kill()

    def _read(self) -> None:
        """Deliver the child's events until it stops (or dies: then fail what is left)."""
        try:
            while True:
                message = self._conn.recv()
                self._heard_at = time.monotonic()
                if message[0] == "stopped":
                    return
                _, updates, steps, self._queue_depth, self._running, speculated = message
                self.drafted_tokens, self.accepted_tokens = speculated
                events = []
                with self._lock:
                    for uid, tokens, logprobs, prompt_logprobs, cached, text, finish in updates:
                        seq = self._live.get(uid)
                        if seq is None:  # cancelled meanwhile
                            continue
                        seq.generated.extend(tokens)
                        seq.logprobs.extend(logprobs)
                        seq.prompt_logprobs.extend(prompt_logprobs)
                        seq.cached_tokens = cached
                        if finish is not None:
                            seq.finish_reason = finish
                            del self._live[uid]
                        events.append((seq, text, finish))
                if self.on_step is not None:
                    for size in steps:
                        self.on_step(size)
                self._deliver(events)
        except (EOFError, OSError):
            self._proc.join(5)
            log.error("the engine process died (exit code %s)", self._proc.exitcode)
            with self._lock:
                self._stopping = True
                lost, self._live = list(self._live.values()), {}
            for seq in lost:
                seq.finish_reason = "error"
            self._deliver([(seq, "", "error") for seq in lost])

    def _deliver(self, events: list[Event]) -> None:
        if not events:
            return
        if self.on_events is not None:
            self.on_events(events)
        else:
            for seq, text, finish in events:
                seq.sink(seq, text, finish)


def _engine_main(path: str, overrides: dict[str, Any], conn: Any) -> None:
    """The child's side of :class:`EngineProcess`."""
    import signal

    # Ctrl-C reaches the whole process group; the server decides when the engine stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    loaded = load_bundle(Path(path), overrides)
    live: dict[int, Sequence] = {}
    sent: dict[int, int] = {}  # uid -> tokens already sent to the parent
    steps: list[int] = []
    send_lock = threading.Lock()

    def on_events(events: list[Event]) -> None:  # in the engine thread
        updates = []
        for seq, text, finish in events:
            first = seq.uid not in sent  # the prompt's logprobs go with the first update
            done = sent.get(seq.uid, 0)
            updates.append(
                (
                    seq.uid,
                    seq.generated[done:],
                    seq.logprobs[done:],
                    seq.prompt_logprobs if first else [],
                    seq.cached_tokens,
                    text,
                    finish,
                )
            )
            sent[seq.uid] = len(seq.generated)
            if finish is not None:
                sent.pop(seq.uid, None)
                live.pop(seq.uid, None)
        sizes = steps[:]
        steps.clear()
        with send_lock:
            speculated = (engine.drafted_tokens, engine.accepted_tokens)
            conn.send(("events", updates, sizes, engine.queue_depth, engine.running, speculated))

    engine = loaded.engine(on_step=steps.append, on_events=on_events)
    # The server enforces the queue limit; the child takes whatever it is sent (its own
    # counts lag behind cancellations by a step, and a refusal here would kill it).
    engine.max_queue = 1 << 62
    engine.start()
    gc.freeze()  # the model and its libraries: no collection needs to walk them (http.py)
    with send_lock:
        conn.send(("ready",))

    def ignore(seq: Sequence, text: str, finish: str | None) -> None:
        """Events go out through on_events, never through a sink."""

    while True:
        try:
            if not conn.poll(HEARTBEAT_S):
                if not engine.alive:  # it failed: exit, so the server sees a dead engine
                    return
                continue
            message = conn.recv()
        except (EOFError, OSError):  # the server is gone
            engine.stop()
            return
        if message[0] == "submit":
            seqs = [
                Sequence(prompt, params, ignore, index=index, uid=uid)
                for uid, prompt, params, index in message[1]
            ]
            live.update((seq.uid, seq) for seq in seqs)
            engine.submit(seqs)
        elif message[0] == "cancel":
            engine.cancel([live.pop(uid) for uid in message[1] if uid in live])
        elif message[0] == "stop":
            engine.stop()
            with send_lock:
                conn.send(("stopped",))
            return


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _default_name(bundle: Path) -> str:
    variant = _read_json(bundle / "manifest.json").get("variant")
    return f"unbottle-{variant}" if variant else bundle.resolve().name
