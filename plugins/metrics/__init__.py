"""Built-in evaluation metrics: quality, cost and speed of one model variant.

Each measures a variant through its own runtime (a :class:`ModelRunner`), so an int8
ONNX model is timed in ONNX Runtime, not in torch.

- ``perplexity``: held-out text, sliding windows, exact count of scored tokens.
- ``answer_perplexity``: perplexity of the reference answers to the held-out questions,
  each rendered as finetuning rendered pairs, only the answer's tokens scored.
- ``accuracy``: exact match of greedy answers to held-out questions; with ``shots: k``
  also k-shot (k solved training pairs before each question, as in-context examples,
  Brown et al., 2020), side by side with zero-shot; and the share of empty answers.
- ``samples``: a few greedy continuations of held-out text, for a person to read.
- ``size``: bytes on disk, stored weights and nonzeros.
- ``memory``: peak memory while generating (RSS on CPU, the allocator's peak on GPU).
- ``speed``: time to first token, prefill and decode tokens/s at batch 1 and at a larger
  batch, request latency p50 and p95; warm-up runs are excluded.
- ``roofline``: decode tokens/s at batch 1 against the bound that the machine's measured
  memory bandwidth sets when every decoded token reads all the weights once
  (tokens/s <= bandwidth / bytes of weights read per token), as a percentage.

Every class lists what it ``produces`` (and which way is better), so params that gate on
a name no configured metric produces fail before any work.
"""

from __future__ import annotations

import functools
import math
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field

from unbottle import DataError, EvalContext, StrategyConfig, hookimpl


class Perplexity:
    """Perplexity of the held-out text, over sliding windows.

    Every token after the first is scored exactly once, with up to ``window - stride``
    tokens of context carried over from the previous window (``stride`` is at most
    ``window - 1``). The work is a token budget, not the whole text: at most
    ``max_tokens`` tokens are scored (the opening ``max_tokens + 1`` tokens of the held-out
    text), so a large held-out file costs no more than a small one, and a model's cost is
    its per-token cost times the budget.
    """

    name = "perplexity"
    produces: ClassVar[dict[str, str | None]] = {"perplexity": "lower", "perplexity_tokens": None}

    class Config(StrategyConfig):
        window: int | None = Field(None, ge=8)  # default: the model's context, at most 512
        stride: int | None = Field(None, ge=1)  # default: half the window
        # Scored tokens at most (None: the whole text); see docs/evaluation.md for sizing.
        max_tokens: int | None = Field(2048, ge=1)

    def __init__(self, config: Config) -> None:
        self.config = config

    def measure(self, model: Any, ctx: EvalContext) -> dict[str, float]:
        import torch

        from unbottle.evaluation import progress_bar

        window = self.config.window or min(model.context, 512)
        window = min(window, model.context)
        # Windows overlap by at least one token: the first token of a window has no
        # prediction inside it, so the window before must score it.
        stride = min(self.config.stride or max(1, window // 2), window - 1)
        budget = self.config.max_tokens
        if budget is not None and budget < window:
            raise DataError(
                f"perplexity.max_tokens: {budget} is smaller than the window of {window}; "
                "raise max_tokens or lower window"
            )
        # Only the scored tokens are tokenized; the first one is context only.
        ids = ctx.held_out_ids(None if budget is None else budget + 1)
        if ids.numel() < window + 1:
            raise DataError(
                f"perplexity: the held-out text has {ids.numel()} tokens, fewer than the "
                f"window of {window} + 1; give more text or a smaller window"
            )
        # The window starts, up to the first window that reaches the end of the text.
        starts = list(range(0, ids.numel() - 1, stride))
        starts = starts[: next(i + 1 for i, s in enumerate(starts) if s + window >= ids.numel())]
        nll, counted, scored_until = 0.0, 0, 0
        with progress_bar("perplexity", len(starts)) as advance:
            for start in starts:
                end = min(start + window, ids.numel())
                chunk = ids[start:end].unsqueeze(0)  # (1, T)
                logits = model.logits(chunk)[0, :-1]  # (T-1, V): predictions for chunk[1:]
                targets = chunk[0, 1:]
                losses = torch.nn.functional.cross_entropy(
                    logits.double(), targets, reduction="none"
                )  # (T-1,)
                first_new = max(scored_until - start - 1, 0)  # skip tokens scored already
                nll += float(losses[first_new:].sum())
                counted += int(losses.numel() - first_new)
                scored_until = end
                advance(tokens=counted)
        return {"perplexity": math.exp(nll / counted), "perplexity_tokens": counted}


class AnswerPerplexity:
    """Perplexity of the reference answers to the held-out questions, asked as finetuning
    asked them.

    Each held-out pair is rendered as finetuning rendered its training pairs (the chat
    template with its end-of-turn tokens, or the completion format), and only the
    answer's tokens are scored, given everything before them: the loss finetuning
    minimised, on pairs it never saw. ``accuracy`` moves only at an exact match, so it
    cannot tell apart variants that all answer a question wrong, a small model's usual
    case; perplexity on prose measures text a chat model is not asked (on SmolLM2, a
    distilled student that answered nothing read 0.18x its teacher's prose perplexity,
    BENCHMARKS.md). A pair longer than the model's context keeps its last tokens.
    """

    name = "answer_perplexity"
    produces: ClassVar[dict[str, str | None]] = {
        "answer_perplexity": "lower",
        "answer_tokens": None,
    }

    class Config(StrategyConfig):
        pass

    def __init__(self, config: Config) -> None:
        self.config = config

    def measure(self, model: Any, ctx: EvalContext) -> dict[str, float]:
        import torch

        from unbottle import evaluation as task

        prompt_format = ctx.prompt_format or task.PromptFormat()
        if not ctx.questions:
            raise DataError("answer_perplexity: data.qa_test holds no question/answer pair")
        nll, counted = 0.0, 0
        for pair in task.track(ctx.questions, "answer perplexity"):
            runs = prompt_format.segments(ctx.tokenizer, pair)
            ids = torch.tensor([i for run, _ in runs for i in run])[-model.context :]
            answer = torch.tensor([learned for run, learned in runs for _ in run])
            answer = answer[-model.context :][1:]  # which predictions score an answer token
            logits = model.logits(ids.unsqueeze(0))[0, :-1]  # (T-1, V): for ids[1:]
            losses = torch.nn.functional.cross_entropy(logits.double(), ids[1:], reduction="none")
            nll += float(losses[answer].sum())
            counted += int(answer.sum())
        return {"answer_perplexity": math.exp(nll / counted), "answer_tokens": counted}


class Accuracy:
    """Exact match of greedy answers to the held-out questions.

    With ``shots: k`` (k > 0) the questions are asked twice: zero-shot (``accuracy``) and
    after k solved examples from the training pairs (``accuracy_fewshot``), in the
    finetuning prompt format; the examples for each question are drawn by a generator
    seeded from the run's seed and the question's position, and never include the
    question itself (core/data/prompts.py).

    ``empty_answers`` is the share of zero-shot answers whose first line is empty: a
    compressed chat model that ends its turn at once scores as a wrong answer in
    accuracy, and as itself here, where a gate can refuse it even when perplexity on
    prose passes.
    """

    name = "accuracy"
    produces: ClassVar[dict[str, str | None]] = {
        "accuracy": "higher",
        "accuracy_fewshot": "higher",
        "empty_answers": "lower",
        "shots": None,
        "questions": None,
    }

    class Config(StrategyConfig):
        batch_size: int = Field(16, ge=1)
        max_new_tokens: int = Field(8, ge=1, le=256)
        samples: int = Field(5, ge=0)
        shots: int = Field(0, ge=0)  # solved examples before each question (0: zero-shot)

    def __init__(self, config: Config) -> None:
        self.config = config

    def measure(self, model: Any, ctx: EvalContext) -> dict[str, float]:
        accuracy, empty, samples = self._score(model, ctx, shots=0)
        ctx.samples["accuracy"] = samples
        figures = {"accuracy": accuracy, "empty_answers": empty, "questions": len(ctx.questions)}
        k = self.config.shots
        if k:
            figures["accuracy_fewshot"], _, ctx.samples["accuracy_fewshot"] = self._score(
                model, ctx, shots=k
            )
            figures["shots"] = k
        return figures

    def _score(self, model: Any, ctx: EvalContext, shots: int) -> tuple[float, float, list[dict]]:
        """(share correct, share empty, the first few samples)."""
        from unbottle import evaluation as task

        tokenizer = ctx.tokenizer
        tokenizer.padding_side = "left"  # generation continues from the right edge
        # Asked as finetuning taught and the server will ask: chat template or completion.
        prompt_format = ctx.prompt_format or task.PromptFormat()
        correct = empty = 0
        samples: list[dict[str, Any]] = []
        questions = ctx.questions
        for start in task.track(range(0, len(questions), self.config.batch_size), "accuracy"):
            batch = questions[start : start + self.config.batch_size]
            prompts = [
                prompt_format.few_shot_text(
                    tokenizer,
                    q,
                    task.choose_shots(ctx.train_pairs, q["question"], shots, ctx.seed, start + i)
                    if shots
                    else [],
                )
                for i, q in enumerate(batch)
            ]
            # Encoded as finetune encoded its prompts: without special tokens, so that a
            # tokenizer that adds BOS does not hand the model a prompt it never trained on.
            enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
            out = model.generate(
                enc["input_ids"],
                enc["attention_mask"],
                self.config.max_new_tokens,
                eos_token_id=tokenizer.eos_token_id,
            )
            texts = tokenizer.batch_decode(
                out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True
            )
            for pair, text in zip(batch, texts, strict=True):
                ok = task.exact_match(text, pair["answer"])
                correct += ok
                empty += not task.normalize(text)
                if len(samples) < self.config.samples:
                    samples.append(
                        {
                            "question": pair["question"],
                            "answer": pair["answer"],
                            "prediction": task.normalize(text),
                            "correct": ok,
                        }
                    )
        return correct / len(questions), empty / len(questions), samples


class Samples:
    """Greedy continuations of the openings of held-out documents, for a person to read.

    Numbers hide failure modes (repetition, gibberish after int8) that one glance at a
    sample shows; the report prints these under the table.
    """

    name = "samples"
    produces: ClassVar[dict[str, str | None]] = {"samples": None}

    class Config(StrategyConfig):
        count: int = Field(3, ge=1, le=100)
        prompt_words: int = Field(6, ge=1)
        max_new_tokens: int = Field(24, ge=1, le=1024)

    def __init__(self, config: Config) -> None:
        self.config = config

    def measure(self, model: Any, ctx: EvalContext) -> dict[str, float]:
        import itertools

        docs = list(itertools.islice(ctx.corpus.documents(), self.config.count))
        generations = []
        for doc in docs:
            prompt = " ".join(doc.split()[: self.config.prompt_words])
            # Documents are encoded without special tokens for training, so here too.
            enc = ctx.tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
            out = model.generate(
                enc["input_ids"],
                enc["attention_mask"],
                self.config.max_new_tokens,
                eos_token_id=ctx.tokenizer.eos_token_id,
            )
            text = ctx.tokenizer.decode(
                out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True
            )
            generations.append({"prompt": prompt, "continuation": text})
        ctx.samples["generations"] = generations
        return {"samples": len(generations)}


class Size:
    """Bytes on disk, stored weight elements and how many of them are nonzero.

    ``sparsity`` is the share of zeros over every stored weight; ``layer_sparsity`` over
    the decoder's linear layers alone, the layers a pruner prunes (embeddings and the
    output head stay dense), so a model pruned to 50% reads 50% there.
    """

    name = "size"
    produces: ClassVar[dict[str, str | None]] = {
        "size_bytes": "lower",
        "parameters": None,
        "nonzero_parameters": "lower",
        "sparsity": None,
        "layer_sparsity": None,
    }

    class Config(StrategyConfig):
        pass

    def __init__(self, config: Config) -> None:
        self.config = config

    def measure(self, model: Any, ctx: EvalContext) -> dict[str, float]:
        from unbottle.evaluation import MANIFEST, WeightCounts

        weights = [
            p
            for p in ctx.model_dir.iterdir()
            if p.is_file()
            and p.suffix in (".safetensors", ".onnx", ".data", ".gguf")
            and p.name != MANIFEST
        ]
        if hasattr(model, "weight_counts"):
            counts = model.weight_counts()
        else:  # a third party's runner may count only all of its weights
            counts = WeightCounts(*model.parameter_counts(), layers=0, layers_nonzero=0)
        figures = {
            "size_bytes": sum(p.stat().st_size for p in weights),
            "parameters": counts.total,
            "nonzero_parameters": counts.nonzero,
            "sparsity": 1 - counts.nonzero / counts.total if counts.total else 0.0,
        }
        if counts.layers:
            figures["layer_sparsity"] = 1 - counts.layers_nonzero / counts.layers
        return figures


# ----------------------------------------------------------------------- shared helpers


def prompt_batch(ctx: EvalContext, batch: int, tokens: int, what: str) -> Any:
    """``batch`` windows of ``tokens`` held-out tokens, each from a different place: (B, P)."""
    import torch

    # The windows are the opening batch * tokens ids, one after another: only those are
    # tokenized. A shorter text has its windows wrap around it.
    ids = ctx.held_out_ids(batch * tokens)
    if ids.numel() < tokens:
        raise DataError(
            f"{what}: the held-out text has {ids.numel()} tokens, fewer than prompt_tokens "
            f"({tokens}); give more text or fewer prompt_tokens"
        )
    span = ids.numel() - tokens + 1
    starts = [(i * tokens) % span for i in range(batch)]
    return torch.stack([ids[s : s + tokens] for s in starts])  # (B, P)


def check_fits(model: Any, prompt_tokens: int, new_tokens: int, what: str) -> None:
    if prompt_tokens + new_tokens > model.context:
        raise DataError(
            f"{what}: prompt_tokens + new_tokens = {prompt_tokens + new_tokens} exceeds the "
            f"model's context of {model.context}"
        )


class _TokenClock:
    """A generation streamer that only notes when each step's tokens arrive.

    ``generate`` calls ``put`` once with the prompt, then once per decoding step (with
    the whole batch's tokens), so the times split a request into prefill and decode.
    """

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: Any) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def timed_generate(model: Any, prompt: Any, new_tokens: int) -> tuple[float, float, float]:
    """One greedy request of exactly ``new_tokens``: (time to first token, decode, total)."""
    import torch

    clock = _TokenClock()
    mask = torch.ones_like(prompt)
    start = time.perf_counter()
    model.generate(
        prompt, mask, new_tokens, min_new_tokens=new_tokens, eos_token_id=None, streamer=clock
    )
    total = time.perf_counter() - start
    steps = clock.times[1:]  # times[0] is the prompt being echoed before any work
    if len(steps) != new_tokens:
        raise RuntimeError(f"expected {new_tokens} decoding steps, saw {len(steps)}")
    return steps[0] - start, steps[-1] - steps[0], total


def nearest_rank(sorted_values: list[float], q: float) -> float:
    """The q-quantile by the nearest-rank method (what p95 over n requests means)."""
    return sorted_values[min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))]


class Speed:
    """Latency and throughput of greedy decoding, warm-up runs excluded.

    At batch 1: time to first token (TTFT), prefill tokens/s (prompt tokens over TTFT),
    decode tokens/s (tokens after the first over the time they took: the median over the
    timed requests, with the slowest and fastest as ``_low`` and ``_high`` and their
    count as ``speed_requests``, so a reader and the report's Pareto frontier can tell a
    difference from noise), and the latency of the whole request at p50 and p95 over the
    timed runs. At ``batch_size``: aggregate decode tokens/s of that many requests
    decoded together.

    The work is a time budget, not a fixed count: at each batch size, timed requests
    repeat until ``repeats`` have run or they have taken ``budget_s / 2`` seconds (at
    least one always runs), so a large model is timed over fewer requests rather than
    for longer. Warm-up requests generate 2 tokens: enough to run prefill and a decoding
    step once (allocations, kernel selection) at a fraction of a request's cost.
    """

    name = "speed"
    produces: ClassVar[dict[str, str | None]] = {
        "ttft_s": "lower",
        "prefill_tokens_per_s": "higher",
        "decode_tokens_per_s": "higher",
        "decode_tokens_per_s_low": "higher",
        "decode_tokens_per_s_high": None,
        "speed_requests": None,
        "decode_tokens_per_s_batched": "higher",
        "batched_size": None,
        "latency_p50_s": "lower",
        "latency_p95_s": "lower",
        "tokens_per_s": "higher",
    }

    class Config(StrategyConfig):
        prompt_tokens: int = Field(32, ge=1)
        new_tokens: int = Field(32, ge=2)
        repeats: int = Field(5, ge=1)  # at most, per batch size
        warmup: int = Field(1, ge=0)
        batch_size: int = Field(8, ge=2)  # the larger batch; batch 1 is always measured
        budget_s: float = Field(6.0, gt=0)  # timed requests, both batch sizes together

    def __init__(self, config: Config) -> None:
        self.config = config

    def measure(self, model: Any, ctx: EvalContext) -> dict[str, float]:
        c = self.config
        check_fits(model, c.prompt_tokens, c.new_tokens, "speed")
        prompts = prompt_batch(ctx, c.batch_size, c.prompt_tokens, "speed")  # (B, P)
        single = prompts[:1]  # (1, P)

        runs = self.timed_runs(model, single)
        ttft = statistics.median(r[0] for r in runs)
        decode = statistics.median(r[1] for r in runs)
        steps = c.new_tokens - 1  # decoding steps after the first token
        each = sorted(steps / max(r[1], 1e-9) for r in runs)  # decode tokens/s per request
        latencies = sorted(r[2] for r in runs)
        batched = statistics.median(r[1] for r in self.timed_runs(model, prompts))
        p50 = nearest_rank(latencies, 0.5)
        return {
            "ttft_s": ttft,
            "prefill_tokens_per_s": c.prompt_tokens / ttft,
            "decode_tokens_per_s": steps / max(decode, 1e-9),
            "decode_tokens_per_s_low": each[0],
            "decode_tokens_per_s_high": each[-1],
            "speed_requests": len(runs),
            "decode_tokens_per_s_batched": c.batch_size * steps / max(batched, 1e-9),
            "batched_size": c.batch_size,
            "latency_p50_s": p50,
            "latency_p95_s": nearest_rank(latencies, 0.95),
            "tokens_per_s": c.new_tokens / p50,
        }

    def timed_runs(self, model: Any, prompts: Any) -> list[tuple[float, float, float]]:
        """Warm-up, then timed requests until ``repeats`` or half the time budget."""
        c = self.config
        for _ in range(c.warmup):
            timed_generate(model, prompts, 2)
        runs: list[tuple[float, float, float]] = []
        spent = 0.0
        while len(runs) < c.repeats and (not runs or spent < c.budget_s / 2):
            runs.append(timed_generate(model, prompts, c.new_tokens))
            spent += runs[-1][2]
        return runs


# ------------------------------------------------------------------------------ memory


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {field}")


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS; False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux >= 4.0: reset VmHWM
        _status_kib("VmHWM")
    except OSError:
        return False
    return True


def peak_rss_delta(fn: Callable[[], Any]) -> int:
    """How far the process's resident memory rose above its level before ``fn`` ran.

    On Linux the kernel's own peak mark is reset and read back, which misses nothing;
    elsewhere a thread samples the RSS (psutil) every half millisecond.
    """
    import psutil

    proc = psutil.Process()
    before = proc.memory_info().rss
    if _reset_peak_rss():
        fn()
        return max(0, _status_kib("VmHWM") * 1024 - before)
    peak = before
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, proc.memory_info().rss)
            time.sleep(0.0005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        fn()
    finally:
        done.set()
        sampler.join()
    return max(0, max(peak, proc.memory_info().rss) - before)


def peak_allocated_delta(fn: Callable[[], Any], device: str) -> int:
    """The CUDA caching allocator's peak above what was allocated before ``fn`` ran."""
    import torch

    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return max(0, torch.cuda.max_memory_allocated(device) - before)


class Memory:
    """Peak memory that generating a batch adds on top of the loaded model.

    On CPU the rise of the process's resident set (RSS) during the request: KV cache,
    activations and whatever buffers the runtime allocates. On a GPU the caching
    allocator's peak above what it held before. Measured in-process, after
    ``warmup`` requests, so list ``memory`` early in ``evaluate.metrics`` for the figure
    of a model that has just been loaded (later metrics would have warmed its buffers).
    """

    name = "memory"
    produces: ClassVar[dict[str, str | None]] = {"peak_memory_bytes": "lower"}

    class Config(StrategyConfig):
        batch_size: int = Field(8, ge=1)
        prompt_tokens: int = Field(32, ge=1)
        new_tokens: int = Field(32, ge=1)
        warmup: int = Field(0, ge=0)

    def __init__(self, config: Config) -> None:
        self.config = config

    def measure(self, model: Any, ctx: EvalContext) -> dict[str, float]:
        c = self.config
        check_fits(model, c.prompt_tokens, c.new_tokens, "memory")
        prompts = prompt_batch(ctx, c.batch_size, c.prompt_tokens, "memory")  # (B, P)

        def request() -> None:
            timed_generate(model, prompts, c.new_tokens)

        for _ in range(c.warmup):
            request()
        device = getattr(model, "device", "cpu")
        if str(device).startswith("cuda"):
            peak = peak_allocated_delta(request, device)
        else:
            peak = peak_rss_delta(request)
        return {"peak_memory_bytes": peak}


# ---------------------------------------------------------------------------- roofline


@functools.cache
def memory_bandwidth(device: str = "cpu", megabytes: int = 256, repeats: int = 5) -> float:
    """Bytes per second one large tensor copy moves on ``device``: best of ``repeats``.

    A copy reads ``megabytes`` and writes as many (STREAM's "copy" counts both), with
    arrays far larger than the caches, so this is the main memory's bandwidth as torch
    can use it. Measured once per process and device.
    """
    import torch

    n = megabytes * (1 << 20) // 4
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    cuda = device.startswith("cuda")
    dst.copy_(src)  # first touch: page faults are not bandwidth
    best = math.inf
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        dst.copy_(src)
        if cuda:
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * src.element_size() / best


def torch_bytes_per_token(model: Any) -> int:
    """Bytes of weights one decoding step reads from a torch model.

    Every parameter is read once per step, except an embedding table, of which a step
    reads one row per token, unless it is tied to the output head (then the head reads
    all of it). A packed low-bit layer (``unbottle.compression``) reads what its kernel
    reads: its packed codes, scales and zero points, or its cached float weight.
    """
    import torch

    embeddings = {
        id(m.weight): m.weight for m in model.modules() if isinstance(m, torch.nn.Embedding)
    }
    linear_weights = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    total = 0
    for p in model.parameters():  # deduplicated: a tied matrix appears once
        if id(p) in embeddings and id(p) not in linear_weights:
            total += p[0].numel() * p.element_size()
        else:
            total += p.numel() * p.element_size()
    return total + sum(m.read_bytes() for m in model.modules() if hasattr(m, "read_bytes"))


#: (op domain, op, input index) of the inputs an op reads one row of per token.
_ROW_READS = {
    ("", "Gather", 0),
    ("com.microsoft", "GroupQueryAttention", 7),  # cos_cache
    ("com.microsoft", "GroupQueryAttention", 8),  # sin_cache
    ("com.microsoft", "RotaryEmbedding", 2),  # cos_cache
    ("com.microsoft", "RotaryEmbedding", 3),  # sin_cache
    ("", "RotaryEmbedding", 1),  # ONNX's own (opset 23): cos_cache
    ("", "RotaryEmbedding", 2),  # sin_cache
}


def onnx_bytes_per_token(path: Path) -> int:
    """Bytes of initializers one decoding step reads from an ONNX graph.

    A tensor read one row per token costs one row: one that only feeds ``Gather`` as its
    data input (an embedding lookup) or a fused attention's rotary tables (the cos and sin
    caches of ``GroupQueryAttention`` and ``RotaryEmbedding``, read at the token's
    position). Every other weight, scale and zero point is read whole.
    """
    import numpy as np
    import onnx
    from onnx import helper

    graph = onnx.load(str(path), load_external_data=False).graph
    consumers: dict[str, list[tuple[str, str, int]]] = {}
    for node in graph.node:
        domain = "" if node.domain == "ai.onnx" else node.domain
        for i, name in enumerate(node.input):
            consumers.setdefault(name, []).append((domain, node.op_type, i))
    total = 0
    for init in graph.initializer:
        itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(init.data_type)).itemsize
        count = math.prod(init.dims)
        uses = consumers.get(init.name, [])
        if uses and all(use in _ROW_READS for use in uses) and len(init.dims) >= 2:
            count //= init.dims[0]  # one row of the table
        total += count * itemsize
    return total


class Roofline:
    """Decode tokens/s at batch 1 as a percentage of the memory-bandwidth bound.

    At batch 1 each decoding step reads every weight once, so tokens/s can be no more
    than bandwidth / bytes read per token. A low percentage means time goes elsewhere
    (framework overhead, kernels that do not stream); near 100% the variant can only get
    faster by reading fewer bytes (smaller weights), which is what quantization buys.
    """

    name = "roofline"
    produces: ClassVar[dict[str, str | None]] = {
        "memory_bandwidth_gb_per_s": None,
        "weight_bytes_per_token": "lower",
        "roofline_tokens_per_s": "higher",
        "roofline_pct": "higher",
    }
    requires: ClassVar[tuple[str, ...]] = ("decode_tokens_per_s",)

    class Config(StrategyConfig):
        bandwidth_megabytes: int = Field(256, ge=8)

    def __init__(self, config: Config) -> None:
        self.config = config

    def measure(self, model: Any, ctx: EvalContext) -> dict[str, float]:
        decode = ctx.measured.get("decode_tokens_per_s")
        if decode is None:
            raise DataError(
                "roofline: needs decode_tokens_per_s; list the speed metric before it in "
                "evaluate.metrics"
            )
        device = str(getattr(model, "device", "cpu"))
        bandwidth = memory_bandwidth(device, self.config.bandwidth_megabytes)
        if hasattr(model, "bytes_per_token"):  # a runner that knows its own (llama.cpp's)
            per_token = model.bytes_per_token()
        elif model.format in ("onnx", "genai"):
            per_token = onnx_bytes_per_token(model.path)
        else:
            per_token = torch_bytes_per_token(model.model)
        bound = bandwidth / per_token
        return {
            "memory_bandwidth_gb_per_s": bandwidth / 1e9,
            "weight_bytes_per_token": per_token,
            "roofline_tokens_per_s": bound,
            "roofline_pct": 100.0 * decode / bound,
        }


@hookimpl
def register_metrics(register):
    from unbottle.plugins.metrics.lm_eval import LmEvalTasks  # lm-eval itself loads lazily

    register(Perplexity)
    register(AnswerPerplexity)
    register(Accuracy)
    register(Samples)
    register(Size)
    register(Memory)
    register(Speed)
    register(Roofline)
    register(LmEvalTasks)
