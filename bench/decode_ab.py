"""Decode speed of bundles compared in one process, interleaved.

``bench/decode_real.py`` decodes every row in a fresh process, as a user's process would
run, in 5 rounds. On this 2-core VM a row's tokens/s moves by 20 to 30% from one process
to the next (a process's memory lands in one of two placements: a two-thread copy reads
about 44 or about 80 GB/s, stable within the process), so 5 paired rounds cannot tell a
10% difference. Here every bundle decodes in the same process, in turn, the order
rotated each round, in many short rounds: each per-round ratio compares bundles under
the same placement and the same moment's machine, and the rounds give a sign test.

Each round, each bundle: ``--new-tokens`` greedy steps at batch 1 after a prefill of
``--prompt-tokens`` held-out tokens (the text decode_real decodes), timed through
onnxruntime-genai's own generator for a genai bundle (decode_real's genai rows), else
through the serving engine's backend (a float or packed model in torch, an ONNX
bundle), as decode_real's other rows. The table gives each
bundle's median tokens/s, the median (min–max) of its per-round ratio to the first
bundle's, in how many rounds it was faster, and the chance of at least that many if the
two were equally fast (a one-sided sign test: each round a coin flip); a second table
pairs every two bundles the same way. The JSON keeps every round.

    .venv/bin/python bench/decode_ab.py REFERENCE=DIR NAME=DIR [NAME=DIR ...] \\
        [--rounds 21] [--threads 2] [--json out.json]

Every DIR is a bundle the serving engine loads (``bench/decode_real.py`` caches its
builds under ``$UNBOTTLE_CACHE_DIR/decode_real/``); the first is the reference. Torch
runs on ``--threads`` for a torch bundle and on one thread beside ONNX Runtime, as
``unbottle serve`` sets it. ``--file-mapped NAME`` loads that float (``hf``) bundle with
its weights left in the safetensors file's memory mapping, as transformers leaves them,
where unbottle copies them into the process's memory (``loading.into_process_memory``):

    .venv/bin/python bench/decode_ab.py copied=DIR mapped=DIR --file-mapped mapped
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import math
import os
import statistics
import sys
from pathlib import Path
from unittest import mock

import compress_real as real
from decode_real import (
    add_pages_option,
    decode_on_chosen_pages,
    engine_decode,
    genai_decode,
    genai_model,
    prompts_of,
)


def parse_bundles(values: list[str]) -> dict[str, Path]:
    bundles: dict[str, Path] = {}
    for value in values:
        name, _, where = value.partition("=")
        if not where or name in bundles:
            real.fail(f"{value!r}: give each bundle as NAME=DIR, each NAME once")
        if (
            not (Path(where) / "config.json").is_file()
            and not (Path(where) / "genai_config.json").is_file()
        ):
            real.fail(f"{where}: not a model directory (no config.json or genai_config.json)")
        bundles[name] = Path(where)
    if len(bundles) < 2:
        real.fail("give at least two bundles: the reference first, then the others")
    return bundles


def sign_test(wins: int, rounds: int) -> float:
    """P(at least ``wins`` of ``rounds`` fair coin flips come up heads)."""
    return sum(math.comb(rounds, k) for k in range(wins, rounds + 1)) / 2**rounds


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundles", nargs="+", help="NAME=DIR, the reference first")
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--threads", type=int, default=2, help="as decode_real: 2 cores")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--file-mapped",
        action="append",
        default=[],
        metavar="NAME",
        help="a float bundle whose weights stay in the file's mapping, as transformers loads",
    )
    add_pages_option(parser)
    args = parser.parse_args(argv)
    decode_on_chosen_pages(args)
    real.require_at_least_one(args, "rounds", "threads", "prompt_tokens", "new_tokens")
    bundles = parse_bundles(args.bundles)
    for name in args.file_mapped:
        if name not in bundles or not (bundles[name] / "model.safetensors").is_file():
            real.fail(f"--file-mapped {name}: name a float bundle (model.safetensors) given")

    import torch
    from transformers import AutoTokenizer

    from unbottle.core.huge_pages import huge_page_bytes
    from unbottle.core.models import loading
    from unbottle.core.serving.engine import TorchBackend, load_backend
    from unbottle.plugins.metrics import (
        memory_bandwidth,
        onnx_bytes_per_token,
        torch_bytes_per_token,
    )

    names = list(bundles)
    reference = names[0]
    tokenizer = AutoTokenizer.from_pretrained(bundles[reference])
    _, held_out = real.split_topics()
    prompt = prompts_of(real.token_stream(tokenizer, held_out), 1, args.prompt_tokens)
    decoders, bytes_per_token = {}, {}
    for name, path in bundles.items():
        if (path / "genai_config.json").is_file():
            model = genai_model(path, args.threads)
            decoders[name] = (1, functools.partial(genai_decode, model))
            bytes_per_token[name] = onnx_bytes_per_token(path / "model.onnx")
            continue
        if name in args.file_mapped:
            with mock.patch.object(loading, "into_process_memory", lambda model: None):
                backend = load_backend(path, args.threads)
        else:
            backend = load_backend(path, args.threads)
        torch_threads = args.threads if isinstance(backend, TorchBackend) else 1
        decoders[name] = (torch_threads, functools.partial(engine_decode, backend))
        bytes_per_token[name] = (
            torch_bytes_per_token(backend.model)
            if isinstance(backend, TorchBackend)
            else onnx_bytes_per_token(next(path.glob("*.onnx")))
        )

    def decode(name: str, steps: int) -> float:
        torch_threads, run = decoders[name]
        torch.set_num_threads(torch_threads)
        return run(prompt, steps)

    for name in names:
        decode(name, 8)  # warm-up: first-call costs
    real.progress(f"decode_ab: {len(names)} bundles, {args.rounds} rounds, {args.threads} threads")
    tokens_per_s: dict[str, list[float]] = {name: [] for name in names}
    for k in range(args.rounds):
        shift = k % len(names)
        for name in names[shift:] + names[:shift]:
            seconds = decode(name, args.new_tokens)
            tokens_per_s[name].append(args.new_tokens / seconds)
        real.progress(
            f"[round {k + 1}/{args.rounds}] "
            + ", ".join(f"{n} {tokens_per_s[n][-1]:.1f}" for n in names)
        )
    rows = []
    for name in names:
        ratios = [a / b for a, b in zip(tokens_per_s[name], tokens_per_s[reference], strict=True)]
        rows.append(
            {
                "name": name,
                "bundle": str(bundles[name]),
                "tokens_per_s": statistics.median(tokens_per_s[name]),
                "rounds": tokens_per_s[name],
                "ratio": {
                    "median": statistics.median(ratios),
                    "min": min(ratios),
                    "max": max(ratios),
                    "faster_rounds": sum(r > 1 for r in ratios),
                    "p_if_equal": sign_test(sum(r > 1 for r in ratios), len(ratios)),
                },
                "bytes_per_token": bytes_per_token[name],
            }
        )
    bandwidth = memory_bandwidth()  # this process's placement, for the record
    huge_page_mb = huge_page_bytes() / 2**20
    lines = [
        f"| bundle | tokens/s b1 | × {reference} (min–max) | rounds faster | p if equal "
        "| MB read per token |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        r = row["ratio"]
        lines.append(
            f"| {row['name']} | {row['tokens_per_s']:.1f} | {r['median']:.3f} "
            f"({r['min']:.3f}–{r['max']:.3f}) | {r['faster_rounds']}/{args.rounds} | "
            f"{r['p_if_equal']:.2g} | {row['bytes_per_token'] / 1e6:.1f} |"
        )
    # Every pair, paired the same way: row over column, median (rounds the row was faster).
    lines += ["", "| over → | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for a in names:
        cells = []
        for b in names:
            pairs = list(zip(tokens_per_s[a], tokens_per_s[b], strict=True))
            ratio = statistics.median(x / y for x, y in pairs)
            faster = sum(x > y for x, y in pairs)
            cells.append("–" if a == b else f"{ratio:.3f} ({faster}/{args.rounds})")
        lines.append(f"| {a} | " + " | ".join(cells) + " |")
    print("\n".join(lines))
    print(
        f"\nthis process's two-thread copy bandwidth: {bandwidth / 1e9:.1f} GB/s; "
        f"{huge_page_mb:,.0f} MB of its memory on huge pages"
    )
    if args.json:
        report = {
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": "python bench/decode_ab.py " + " ".join(argv),
            "machine": real.machine(),
            "settings": {k: v for k, v in vars(args).items() if k not in ("bundles", "json")},
            "bandwidth_gb_per_s": bandwidth / 1e9,
            "huge_page_mb": huge_page_mb,
            "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
            "rows": rows,
        }
        args.json.write_text(json.dumps(report, indent=2, default=str), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
