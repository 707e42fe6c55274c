"""Tokenizing a corpus into the token stream: time and memory of ``encode_stream``.

Pretraining, calibration and perplexity read a corpus as one stream of token ids
(``unbottle.core.models.loading.encode_stream``). This compares it with the way it was
written before (a tokenizer call per document, every id appended to one Python list,
then ``torch.tensor``), each in a fresh process, alternating, on a corpus of
``--megabytes`` of the demo world's prose (repeated to reach the size). It reports the
seconds, the peak resident memory above the process's baseline (the corpus text loaded,
the tokenizer ready) and checks that both give the same ids.

    .venv/bin/python bench/encode_corpus.py [--megabytes 64] [--rounds 3] \\
        [--tokenizer DIR] [--json out.json]

The tokenizer is ``DIR``'s (a Hugging Face model directory), or a 4,096-token byte-level
BPE trained on the first megabyte.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def naive_stream(tokenizer, text: str):
    """The earlier ``encode_stream``: a call per document, one list of every id."""
    import torch

    from unbottle.core.models.loading import documents

    ids: list[int] = []
    for doc in documents(text):
        ids.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def child(method: str, corpus: Path, tokenizer_dir: Path) -> None:
    from transformers import AutoTokenizer

    from unbottle.core.models.loading import encode_stream

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    text = corpus.read_text(encoding="utf-8")
    encode = encode_stream if method == "encode_stream" else naive_stream
    encode(tokenizer, text[:10_000])  # first calls: imports and lazy set-up, not the work
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    stream = encode(tokenizer, text)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    digest = hashlib.sha256(stream.numpy().tobytes()).hexdigest()
    print(
        json.dumps(
            {
                "seconds": seconds,
                "peak_above_baseline_mb": (peak - baseline) / 1024,  # ru_maxrss is in KiB
                "tokens": stream.numel(),
                "sha256": digest,
            }
        )
    )


def make_corpus(path: Path, megabytes: int) -> None:
    from unbottle.core.data.demo import DemoDataConfig, generate_demo_data

    prose = generate_demo_data(DemoDataConfig(seed=0, people=5000, renderings=3))
    block = prose["corpus/train.txt"].strip() + "\n\n"
    path.write_text(block * max(1, round(megabytes * 1e6 / len(block))), encoding="utf-8")


def make_tokenizer(out: Path, corpus: Path) -> None:
    from unbottle.core.models.loading import documents, train_tokenizer

    sample = corpus.read_text(encoding="utf-8")[:1_000_000]
    train_tokenizer(documents(sample), 4096).save_pretrained(out)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--megabytes", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokenizer", type=Path)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child[0], Path(args.child[1]), Path(args.child[2]))
        return 0

    methods = ("encode_stream", "per-document list")
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        make_corpus(corpus, args.megabytes)
        tokenizer_dir = args.tokenizer or Path(tmp) / "tokenizer"
        if args.tokenizer is None:
            make_tokenizer(tokenizer_dir, corpus)
        for r in range(args.rounds):
            for method in methods if r % 2 == 0 else methods[::-1]:
                cmd = [sys.executable, __file__, "--child", method, str(corpus), str(tokenizer_dir)]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                runs[method].append(json.loads(out.strip().splitlines()[-1]))
                print(f"round {r + 1} {method}: {runs[method][-1]}", file=sys.stderr)
        size_mb = corpus.stat().st_size / 1e6
    digests = {run["sha256"] for m in methods for run in runs[m]}
    if len(digests) != 1:
        raise SystemExit("the two ways gave different token streams")
    rows = {
        m: {
            "seconds": statistics.median(run["seconds"] for run in runs[m]),
            "peak_above_baseline_mb": statistics.median(
                run["peak_above_baseline_mb"] for run in runs[m]
            ),
        }
        for m in methods
    }
    tokens = runs[methods[0]][0]["tokens"]
    print(f"\n{size_mb:.1f} MB of text, {tokens:,} tokens, {args.rounds} rounds (medians)\n")
    print("| method | seconds | tokens/s | peak memory above baseline (MB) | bytes per token |")
    print("|---|---:|---:|---:|---:|")
    for m, row in rows.items():
        print(
            f"| {m} | {row['seconds']:.1f} | {tokens / row['seconds']:,.0f} | "
            f"{row['peak_above_baseline_mb']:,.0f} | "
            f"{row['peak_above_baseline_mb'] * 2**20 / tokens:.1f} |"
        )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                    "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
                    "megabytes": size_mb,
                    "tokens": tokens,
                    "tokenizer": str(args.tokenizer or "bpe-4096 trained on the first MB"),
                    "medians": rows,
                    "runs": runs,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
