"""Compression: each variant is a recipe, an ordered list of prune/distill/quantize steps.

Every variant starts from the finetuned model. Prune and distill steps work on the float
model in memory; a quantize step, always the last, writes the quantized model. Each step
is recorded in the variant's manifest with its strategy, options, metrics and time.

The methods that calibrate (Wanda, SparseGPT, GPTQ, AWQ) see windows of token ids that
``compress.calibration.source`` names: the training text's prose, the question/answer
pairs rendered as finetuning rendered them (:func:`conversation_stream`), or half of
each. A chat model calibrated on prose alone is compressed for text it is never asked.
Distillation trains on the same source (``CompressContext.training_windows``).

Variants whose recipes share a prefix (``[distill kd]`` and ``[distill kd, quantize]``,
or the points of a sweep over the last step) reuse the float model after that prefix
instead of recomputing it: :class:`PrefixCache` keeps it on disk under a key that hashes
the input model, the calibration data, the seed, the stage's code and every step so far
(strategy, its validated options, its distribution and the hash of its source). A float
variant stored in the variant cache by an earlier run serves as the prefix its recipe
is. A stale or damaged entry is never used: its files are checked against their hashes,
and any difference in what went into it changes the key.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from unbottle.core.config.schema import CalibrationParams, CompressParams, CompressStep
from unbottle.core.contract.strategies import CompressContext
from unbottle.core.data.prompts import CHAT, PromptFormat, prompt_format_of
from unbottle.core.registry import Registry
from unbottle.core.stages.layout import StageResult, strategy_record
from unbottle.core.store.artifacts import (
    atomic_dir,
    file_hashes,
    read_manifest,
    tree_hash,
    write_json_atomic,
    write_manifest,
)
from unbottle.core.store.cache_pruning import mark_used
from unbottle.core.store.code import strategy_code_hash

if TYPE_CHECKING:
    from unbottle.core.store.cache import VariantCache

log = logging.getLogger("unbottle.compress")
VARIANTS_INDEX = "variants.json"
CACHE_RECORD = "prefix.json"


#: How a calibration window too long for its data is named in the error.
_CALIBRATION_ERRORS = {"what": "compress.calibration", "lower": "compress.calibration.seq_len"}


def calibration_batches(stream: Any, samples: int, seq_len: int, seed: int) -> list[Any]:
    """``samples`` windows of ``seq_len`` tokens, each a (1, T) LongTensor, drawn
    reproducibly from the 1-D ``stream`` of any integer type."""
    from unbottle.core.data.windows import text_windows
    from unbottle.core.training.loop import rng

    windows = text_windows(stream, samples, seq_len, rng(seed + 1), **_CALIBRATION_ERRORS)
    return [window.unsqueeze(0) for window in windows]


def conversation_stream(
    pairs: list[dict[str, Any]], prompt_format: PromptFormat, tokenizer: Any, seed: int
) -> tuple[Any, list[int]]:
    """The pairs as finetuning trained on them (the template, every turn, the answers),
    one after another in an order drawn from ``seed``: (1-D ids, where each pair starts)."""
    import random

    import torch

    from unbottle.core.contract.errors import DataError

    order = list(range(len(pairs)))
    random.Random(f"calibration:{seed}").shuffle(order)
    ids: list[int] = []
    starts = []
    for index in order:
        starts.append(len(ids))
        try:
            ids += [i for run, _ in prompt_format.segments(tokenizer, pairs[index]) for i in run]
        except DataError as e:
            raise DataError(f"data.qa_train: {e}") from None
    return torch.tensor(ids, dtype=torch.long), starts


def conversation_batches(
    ids: Any, starts: list[int], samples: int, seq_len: int, seed: int
) -> list[Any]:
    """``samples`` windows of ``seq_len`` tokens of the conversation stream, each a (1, T)
    LongTensor starting where a pair starts (core/data/windows.py says why), drawn
    reproducibly."""
    from unbottle.core.data.windows import pair_windows
    from unbottle.core.training.loop import rng

    windows = pair_windows(ids, starts, samples, seq_len, rng(seed + 2), **_CALIBRATION_ERRORS)
    return [window.unsqueeze(0) for window in windows]


#: The share of each calibration source's windows that are pairs (rounded up).
CONVERSATION_SHARE = {"train_text": 0.0, "qa_train": 1.0, "both": 0.5}


def calibration_source(cfg: CalibrationParams, prompt_format: PromptFormat) -> str:
    """The source ``cfg.source`` stands for: ``auto`` is ``both`` for a model finetuned in
    chat format (measured on SmolLM2: prose alone let a 2:4 model that answers nothing
    pass a perplexity gate, the pairs alone cost perplexity; BENCHMARKS.md) and
    ``train_text`` otherwise."""
    if cfg.source != "auto":
        return cfg.source
    return "both" if prompt_format.kind == CHAT else "train_text"


def read_conversations(
    cfg: CalibrationParams,
    *,
    qa_train: Path | None,
    tokenizer: Any,
    prompt_format: PromptFormat,
    seed: int,
) -> tuple[Any, list[int]] | None:
    """The pairs of ``qa_train`` as :func:`conversation_stream` renders them, when
    ``cfg.source`` takes pairs; None when it takes the prose alone."""
    from unbottle.core.data.prompts import read_pairs

    source = calibration_source(cfg, prompt_format)
    if source == "train_text":
        return None
    if qa_train is None or tokenizer is None:
        raise ValueError(f"calibration source {source}: needs qa_train and a tokenizer")
    pairs = read_pairs(qa_train, "data.qa_train")
    return conversation_stream(pairs, prompt_format, tokenizer, seed)


def calibration_windows(
    cfg: CalibrationParams,
    *,
    stream: Any,
    seed: int,
    conversations: tuple[Any, list[int]] | None = None,
    prompt_format: PromptFormat | None = None,
) -> list[Any]:
    """The calibration windows ``cfg.source`` names: windows of the training text's ids
    ``stream``, of the ``conversations`` (:func:`read_conversations`), or half of each
    (the pairs' half rounded up)."""
    import math

    prompt_format = prompt_format or PromptFormat()
    source = calibration_source(cfg, prompt_format)
    from_text = cfg.samples - math.ceil(cfg.samples * CONVERSATION_SHARE[source])
    windows = calibration_batches(stream, from_text, cfg.seq_len, seed) if from_text else []
    if from_text < cfg.samples:
        if conversations is None:
            raise ValueError(f"calibration source {source}: needs the conversations")
        ids, starts = conversations
        windows += conversation_batches(ids, starts, cfg.samples - from_text, cfg.seq_len, seed)
    log.info(
        "compress: calibration on %d windows of %d tokens: %d of the prose of "
        "data.train_text, %d of the pairs of data.qa_train in %s format (source %s%s)",
        cfg.samples,
        cfg.seq_len,
        from_text,
        cfg.samples - from_text,
        prompt_format.kind,
        cfg.source,
        f": {source}" if cfg.source == "auto" else "",
    )
    return windows


def compress_inputs(
    cfg: CompressParams, *, model: Path, train_text: str, qa_train: Path | None
) -> dict[str, str]:
    """What a compress run's caches key on, by content: the finetuned ``model``, the
    training text (its hash, ``train_text``) and, where the calibration source draws on
    them, the pairs of ``qa_train``, which calibration and distillation then read."""
    inputs = {"model": tree_hash(model), "train_text": train_text}
    source = calibration_source(cfg.calibration, prompt_format_of(model))
    if source != "train_text":
        if qa_train is None:
            raise ValueError(f"calibration source {source}: needs qa_train")
        inputs["qa_train"] = tree_hash(qa_train)
    return inputs


# ------------------------------------------------------------------------ prefix cache


class PrefixCache:
    """Float models after the first steps of a recipe, on disk, by content key.

    An entry is a directory ``<root>/<key>/`` holding the model in safetensors (through
    ``save_model``) and ``prefix.json``: the step records that made it and the sha256 of
    every file, checked before the entry is used.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def get(self, key: str) -> tuple[Any, list[dict[str, Any]]] | None:
        from unbottle.core.models.loading import load_model

        entry = self.root / key
        record_file = entry / CACHE_RECORD
        if not record_file.is_file():
            return None
        record = json.loads(record_file.read_text(encoding="utf-8"))
        if record.get("key") != key or record.get("files") != file_hashes(
            entry, exclude=(CACHE_RECORD,)
        ):
            log.warning("compress: cached prefix %s is damaged; recomputing it", key[:12])
            return None
        model, _ = load_model(entry)
        mark_used(record_file)
        return model, record["steps"]

    def put(self, key: str, model: Any, tokenizer: Any, steps: list[dict[str, Any]]) -> None:
        from unbottle.core.models.loading import save_model

        try:
            with atomic_dir(self.root / key) as tmp:
                save_model(model, tokenizer, tmp)
                write_json_atomic(
                    tmp / CACHE_RECORD,
                    {"key": key, "steps": steps, "files": file_hashes(tmp, exclude=())},
                )
        except OSError as e:  # another process wrote the same entry meanwhile: fine
            log.warning("compress: could not cache prefix %s: %s", key[:12], e)


@dataclass
class Workbench:
    """What every variant of one compress run starts from."""

    cfg: CompressParams
    model_path: Path
    train_text: Path
    seed: int
    registry: Registry
    base: Any
    tokenizer: Any
    stream: Any  # the training text's token ids, 1-D, mapped in their narrow type
    calibration: list[Any]
    plans: dict[str, list[tuple[CompressStep, Any]]]
    inputs: dict[str, str]
    calibration_source: str = "train_text"  # what the windows came from (auto resolved)
    conversations: tuple[Any, list[int]] | None = None  # the pairs, where the source has them

    def prefix_keys(self, name: str) -> list[str]:
        """The cache key of each float prefix of a variant's recipe: steps 1..k."""
        return prefix_keys(self.cfg, self.plans[name], self.inputs, self.seed, self.registry)

    def variant_key(self, name: str) -> str:
        """The cache key of a whole variant (see :func:`variant_key`)."""
        return variant_key(self.cfg, name, self.plans[name], self.inputs, self.seed, self.registry)

    def shared_prefixes(self) -> set[str]:
        """Keys of prefixes that more than one variant of this run starts with."""
        return shared_prefixes({name: self.prefix_keys(name) for name in self.plans})


def prefix_keys(
    cfg: CompressParams,
    plan: list[tuple[CompressStep, Any]],
    inputs: dict[str, str],
    seed: int,
    registry: Registry,
) -> list[str]:
    """The cache key of each float prefix of one recipe (steps 1..k), from content only:
    the input model and data hashes, calibration, seed and every step so far."""
    from unbottle.core.store.cache import code_hashes
    from unbottle.core.store.fingerprint import STAGE_CODE

    origin = {
        **inputs,  # the model, the training text, and the pairs if calibration reads them
        "calibration": cfg.calibration.model_dump(mode="json"),
        "seed": seed,
        # The calibration pass and the helpers the strategies share: a prefix kept across
        # runs (the sweep's cache, a float variant in the variant cache) is stale when
        # they change, as the stage's fingerprint is.
        "code": code_hashes(STAGE_CODE["compress"]),
    }
    keys: list[str] = []
    steps: list[dict[str, Any]] = []
    for step, strategy in plan:
        if step.action == "quantize":
            break  # a quantized model is an output, never a prefix
        info = registry.get(step.kind, step.strategy)
        steps.append(
            {
                "action": step.action,
                "strategy": step.strategy,
                "options": strategy.config.model_dump(mode="json"),
                "distribution": f"{info.distribution} {info.version}",
                "source": strategy_code_hash(info.cls),
            }
        )
        blob = json.dumps({"origin": origin, "steps": steps}, sort_keys=True)
        keys.append(hashlib.sha256(blob.encode()).hexdigest())
    return keys


def variant_key(
    cfg: CompressParams,
    name: str,
    plan: list[tuple[CompressStep, Any]],
    inputs: dict[str, str],
    seed: int,
    registry: Registry,
) -> str:
    """The key under which a finished variant is cached: its name (its manifest records
    it), every step of its recipe, the input model and text, calibration, seed and the
    compress stage's code. Any other variant's options are not part of it."""
    from unbottle.core.store.cache import code_hashes, digest, strategy_identity
    from unbottle.core.store.fingerprint import STAGE_CODE
    from unbottle.core.store.provenance import package_version

    return digest(
        {
            "variant": name,
            "inputs": inputs,
            "calibration": cfg.calibration.model_dump(mode="json"),
            "seed": seed,
            "steps": [
                {
                    "action": step.action,
                    **strategy_identity(
                        registry.get(step.kind, step.strategy),
                        strategy.config.model_dump(mode="json"),
                    ),
                }
                for step, strategy in plan
            ],
            "code": code_hashes(STAGE_CODE["compress"]),
            "unbottle": package_version("unbottle"),
        }
    )


def shared_prefixes(keys: dict[str, list[str]]) -> set[str]:
    """The prefix keys that more than one variant starts with."""
    counts = collections.Counter(k for variant_keys in keys.values() for k in variant_keys)
    return {key for key, n in counts.items() if n > 1}


def plan_prefixes(
    cfg: CompressParams, *, inputs: dict[str, str], seed: int, registry: Registry
) -> dict[str, list[str]]:
    """Each variant's prefix keys from the run's ``inputs`` (:func:`compress_inputs`),
    without loading the model (for schedulers)."""
    plans = {
        name: [(step, registry.create(step.kind, step.strategy, step.options)) for step in steps]
        for name, steps in cfg.variants.items()
    }
    return {name: prefix_keys(cfg, plan, inputs, seed, registry) for name, plan in plans.items()}


def build_order(keys: dict[str, list[str]]) -> list[list[str]]:
    """Variants in waves such that each shared prefix is computed once.

    The first variant to reach a shared prefix computes it; a variant that starts with a
    prefix another one computes runs in a later wave than that one, and finds it in the
    cache. Variants inside a wave are independent and may run in parallel.
    """
    shared = shared_prefixes(keys)
    computed_in: dict[str, int] = {}  # shared prefix key -> wave of the variant computing it
    waves: dict[str, int] = {}
    for name, variant_keys in keys.items():
        mine = [k for k in variant_keys if k in shared]
        waves[name] = max((computed_in[k] + 1 for k in mine if k in computed_in), default=0)
        for k in mine:
            computed_in.setdefault(k, waves[name])
    return [
        [name for name in keys if waves[name] == w]
        for w in range(max(waves.values(), default=-1) + 1)
    ]


def prepare(
    cfg: CompressParams,
    *,
    model: Path,
    train_text: Path,
    seed: int,
    registry: Registry,
    token_cache: Path | None = None,
    qa_train: Path | None = None,
) -> Workbench:
    """Check the input, resolve every step's strategy and load the model and data once.
    The training text's token ids come from (or go to) ``token_cache`` (see
    core/data/corpus.py); ``qa_train`` is read when the calibration source takes pairs."""
    from unbottle.core.data.corpus import Corpus
    from unbottle.core.models.loading import load_model
    from unbottle.core.store.artifacts import verify_artifact

    verify_artifact(model)
    # Resolve every step's strategy (and validate its options) before any work.
    plans = {
        name: [(step, registry.create(step.kind, step.strategy, step.options)) for step in steps]
        for name, steps in cfg.variants.items()
    }
    base, tokenizer = load_model(model)
    corpus = Corpus(train_text, "data.train_text", token_cache=token_cache)
    # The ids stay mapped from the token file in their narrow type: only the windows
    # drawn from them are held, so a pretraining corpus can be the calibration text.
    stream = corpus.token_ids(tokenizer)
    prompt_format = prompt_format_of(model)
    conversations = read_conversations(
        cfg.calibration,
        qa_train=qa_train,
        tokenizer=tokenizer,
        prompt_format=prompt_format,
        seed=seed,
    )
    calibration = calibration_windows(
        cfg.calibration,
        stream=stream,
        seed=seed,
        conversations=conversations,
        prompt_format=prompt_format,
    )
    return Workbench(
        cfg=cfg,
        model_path=model,
        train_text=train_text,
        seed=seed,
        registry=registry,
        base=base,
        tokenizer=tokenizer,
        stream=stream,
        calibration=calibration,
        plans=plans,
        inputs=compress_inputs(cfg, model=model, train_text=corpus.sha256, qa_train=qa_train),
        calibration_source=calibration_source(cfg.calibration, prompt_format),
        conversations=conversations,
    )


def build_variant(
    bench: Workbench,
    name: str,
    variant_dir: Path,
    *,
    cache: PrefixCache | None = None,
    keep: set[str] | None = None,
    variants: VariantCache | None = None,
) -> dict[str, Any]:
    """Run one variant's recipe and write it, with its manifest, into ``variant_dir``.

    With a cache, the longest float prefix found there is loaded instead of recomputed,
    and each float prefix computed here is stored when its key is in ``keep`` (or always,
    when ``keep`` is None). With ``variants``, a float variant of an earlier run whose
    whole recipe is a prefix of this one serves as that prefix too.
    """
    import torch

    from unbottle.core.models.loading import save_model

    plan = bench.plans[name]
    keys = bench.prefix_keys(name) if cache is not None or variants is not None else []
    current, records, start = None, [], 0
    for k in range(len(keys), 0, -1):
        hit = cache.get(keys[k - 1]) if cache is not None else None
        if hit is not None:
            current, records = hit
            log.info("compress %s: steps 1-%d reused from the prefix cache", name, k)
        elif variants is not None and (entry := variants.find_float(keys[k - 1])) is not None:
            current, records = float_variant(entry)
            log.info(
                "compress %s: steps 1-%d reused from the variant cache, where an earlier "
                "run stored them as the variant %s",
                name,
                k,
                read_manifest(entry)["config"]["variant"],
            )
        else:
            continue
        start = k
        break
    variant_dir.mkdir(parents=True, exist_ok=True)
    fmt = "hf"  # until a quantize step (always the last) writes its own format
    quantized = False
    for i in range(start, len(plan)):
        step, strategy = plan[i]
        log.info("compress %s: step %d/%d %s", name, i + 1, len(plan), step.describe())
        # Each step draws from its own seed, so it does the same whether the steps before
        # it ran in this process or came from the cache.
        torch.manual_seed(bench.seed + i)
        ctx = CompressContext(
            tokenizer=bench.tokenizer,
            calibration=bench.calibration,
            train_ids=bench.stream,
            seed=bench.seed,
            work_dir=variant_dir.parent,
            teacher=bench.base,
            where=f"compress.variants.{name}[{i}]",
            conversations=bench.conversations[0] if bench.conversations else None,
            conversation_starts=bench.conversations[1] if bench.conversations else (),
            conversation_share=CONVERSATION_SHARE[bench.calibration_source],
        )
        began = time.perf_counter()
        if step.action == "quantize":  # always the last step
            with tempfile.TemporaryDirectory(dir=variant_dir.parent) as float_dir:
                save_model(
                    bench.base if current is None else current, bench.tokenizer, Path(float_dir)
                )
                # The quantizer loads its own copy from float_dir: not holding this one
                # beside it is a model's worth less at the stage's peak.
                current = None
                step_metrics = strategy.quantize(Path(float_dir), variant_dir, ctx)
            fmt = strategy.output_format
            quantized = True
        else:
            if current is None:  # the working copy, made when a step first changes it
                current = copy.deepcopy(bench.base)
            if step.action == "prune":
                step_metrics = strategy.prune(current, ctx)
            else:
                current, step_metrics = strategy.distill(current, ctx)
        records.append(
            {
                "step": i + 1,
                "action": step.action,
                "strategy": strategy_record(bench.registry.get(step.kind, step.strategy)),
                "options": strategy.config.model_dump(mode="json"),
                "metrics": step_metrics,
                "seconds": round(time.perf_counter() - began, 3),
            }
        )
        if cache is not None and i < len(keys) and (keep is None or keys[i] in keep):
            cache.put(keys[i], current, bench.tokenizer, records)
    if not quantized:
        save_model(bench.base if current is None else current, bench.tokenizer, variant_dir)
    write_manifest(
        variant_dir,
        stage="compress",
        config={
            "variant": name,
            "calibration": {
                **bench.cfg.calibration.model_dump(),
                "source_used": bench.calibration_source,
            },
        },
        strategies={f"step{r['step']}_{r['action']}": r["strategy"] for r in records},
        inputs=bench.inputs,
        metrics={f"step{r['step']}_{k}": v for r in records for k, v in r["metrics"].items()},
        extra={
            "format": fmt,
            "steps": [{k: v for k, v in r.items() if k != "seconds"} for r in records],
        },
    )
    return {
        "format": fmt,
        "seconds": round(sum(r["seconds"] for r in records[start:]), 3),
        "reused_steps": start,
        # Per-step times land in metrics/compress_timing.json (`unbottle show` prints them).
        **{f"step{r['step']}_seconds": r["seconds"] for r in records[start:]},
        **{f"{r['action']}_{k}": v for r in records for k, v in r["metrics"].items()},
    }


def float_variant(entry: Path) -> tuple[Any, list[dict[str, Any]]]:
    """A float variant's model and step records, from its variant cache entry."""
    from unbottle.core.models.loading import load_model

    model, _ = load_model(entry)
    return model, list(read_manifest(entry)["steps"])


def write_index(
    out_dir: Path, cfg: CompressParams, inputs: dict[str, str], names: list[str]
) -> None:
    """The compress artifact's own files, once its variant directories are complete."""
    write_json_atomic(out_dir / VARIANTS_INDEX, names)
    write_manifest(
        out_dir,
        stage="compress",
        config=cfg.model_dump(mode="json"),
        strategies={},
        inputs=inputs,
        metrics={},
        extra={"variants": names},
    )


@contextlib.contextmanager
def prefix_cache(cache_dir: Path | None, near: Path) -> Iterator[PrefixCache]:
    """The given cache, or one that lasts this run only (a temporary sibling of ``near``)."""
    if cache_dir is not None:
        yield PrefixCache(cache_dir)
        return
    near.parent.mkdir(parents=True, exist_ok=True)
    # The pid in the name lets a later run sweep it away if this one is killed.
    prefix = f".{near.name}.prefixes.{os.getpid()}-"
    with tempfile.TemporaryDirectory(dir=near.parent, prefix=prefix) as tmp:
        yield PrefixCache(Path(tmp))


def compress(
    cfg: CompressParams,
    *,
    model: Path,
    train_text: Path,
    out_dir: Path,
    seed: int,
    registry: Registry,
    cache_dir: Path | None = None,
    variant_cache: Path | None = None,
    token_cache: Path | None = None,
    qa_train: Path | None = None,
) -> StageResult:
    """Build every variant into ``out_dir``.

    Shared recipe prefixes are computed once: in a cache that lasts this run, or in
    ``cache_dir``, which keeps every float prefix for later runs (sweeps) too. With
    ``variant_cache``, a variant whose key (:func:`variant_key`) is found there is linked
    from it unchanged instead of rebuilt, and every variant built is stored there. The
    training text's token ids are kept in ``token_cache`` (see core/data/corpus.py).
    """
    from unbottle.core.progress import progress_bar
    from unbottle.core.store.cache import VariantCache

    bench = prepare(
        cfg,
        model=model,
        train_text=train_text,
        seed=seed,
        registry=registry,
        token_cache=token_cache,
        qa_train=qa_train,
    )
    keep = None if cache_dir is not None else bench.shared_prefixes()
    variants = VariantCache(variant_cache) if variant_cache is not None else None
    metrics: dict[str, Any] = {}
    with (
        atomic_dir(out_dir) as tmp,
        prefix_cache(cache_dir, out_dir) as cache,
        progress_bar("compress", len(bench.plans)) as advance,
    ):
        for name in bench.plans:
            metrics[name] = reuse_or_build(bench, name, tmp / name, variants, cache, keep)
            advance()
        write_index(tmp, cfg, bench.inputs, list(bench.plans))
    return StageResult(out_dir, metrics)


def reuse_or_build(
    bench: Workbench,
    name: str,
    variant_dir: Path,
    variants: Any,
    cache: PrefixCache | None,
    keep: set[str] | None,
) -> dict[str, Any]:
    """A variant from the variant cache when its key is there and intact, else built (and
    stored there). A reused variant reports the metrics (and seconds) of the run that
    built it, plus ``reused: true`` (a run fact, kept with the timings)."""
    if variants is None:
        return build_variant(bench, name, variant_dir, cache=cache, keep=keep)
    key = bench.variant_key(name)
    record = variants.get(key)
    if record is not None:
        variants.restore(key, variant_dir)
        log.info(
            "compress %s: unchanged (key %s), reused from the variant cache with the "
            "metrics and seconds of the run that built it",
            name,
            key[:12],
        )
        return {**record["metrics"], "reused": True}
    built = build_variant(bench, name, variant_dir, cache=cache, keep=keep, variants=variants)
    plan = bench.plans[name]
    floating = bool(plan) and all(step.action != "quantize" for step, _ in plan)
    variants.put(key, variant_dir, built, bench.prefix_keys(name)[-1] if floating else None)
    return {**built, "reused": False}
