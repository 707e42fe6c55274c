"""Reading and tokenizing a corpus: time and memory of ``read_text`` and ``encode_stream``.

Pretraining, calibration and perplexity read a corpus file (``read_text``) and turn it
into one stream of token ids (``encode_stream``), both in
``unbottle.core.models.loading``. Each is compared with the way it was written before, in
fresh processes, alternating, on ``--megabytes`` of the demo world's prose (repeated to
reach the size):

- tokenizing: at first, a tokenizer call per document, every id appended to one Python
  list, then ``torch.tensor``; then (until 9d2115f) batches of 1,024 documents through
  transformers' tokenizer call, which builds a dict of lists per document before the ids
  are taken (now the Rust tokenizer is called directly: ``encode_texts``);
- reading the corpus as JSONL (one ``{"text": ..., "meta": {...}}`` per document): before,
  the whole file read and decoded, split into lines, every record parsed and kept, then
  the texts joined.

It reports the seconds, the peak resident memory above the process's baseline (for
tokenizing: the corpus text loaded, the tokenizer ready) and checks that both ways give
the same result.

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


def call_stream(tokenizer, text: str):
    """``encode_stream`` until 9d2115f: batches of documents through transformers' call."""
    import itertools

    import numpy as np
    import torch

    from unbottle.core.models.loading import ENCODE_BATCH, documents

    eos, pieces = [tokenizer.eos_token_id], [np.empty(0, np.int64)]
    docs = iter(documents(text))
    while batch := list(itertools.islice(docs, ENCODE_BATCH)):
        encoded = tokenizer(batch, add_special_tokens=False)["input_ids"]
        ids = itertools.chain.from_iterable(d + eos for d in encoded)
        pieces.append(np.fromiter(ids, np.int64))
    return torch.from_numpy(np.concatenate(pieces))


def whole_file_jsonl(path: Path) -> str:
    """The earlier JSONL read: the file decoded whole, split, every record kept."""
    from unbottle.core.models.loading import DOCUMENT_BREAK

    content = path.read_bytes().decode("utf-8")
    records = [json.loads(line) for line in content.split("\n") if line.strip()]
    return DOCUMENT_BREAK.join(record["text"] for record in records)


def reset_peak_rss() -> float:
    """Reset this process's peak resident memory to its current one (Linux: writing 5 to
    /proc/self/clear_refs) and return it, in MB: a high-water mark left by the imports
    would otherwise hide the work's own peak."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_mb("VmRSS")


def _status_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"no {key} in /proc/self/status")


#: What each child process measures, by name: (task, the way).
METHODS = {
    "encode_stream": ("encode", "now"),
    "batched, transformers' call": ("encode", "call"),
    "per-document list": ("encode", "before"),
    "read_text, streamed": ("read", "now"),
    "whole file, every record": ("read", "before"),
}


def child(method: str, corpus: Path, tokenizer_dir: Path) -> None:
    from unbottle.core.models.loading import documents, encode_stream, read_text

    task, way = METHODS[method]
    if task == "encode":
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        text = corpus.read_text(encoding="utf-8")
        encode = {"now": encode_stream, "call": call_stream, "before": naive_stream}[way]
        encode(tokenizer, text[:10_000])  # first calls: imports and lazy set-up
        baseline = reset_peak_rss()
        start = time.perf_counter()
        stream = encode(tokenizer, text)
        seconds = time.perf_counter() - start
        result, count = stream.numpy().tobytes(), stream.numel()
    else:
        jsonl = corpus.with_suffix(".jsonl")
        baseline = reset_peak_rss()
        start = time.perf_counter()
        text = read_text(jsonl, "corpus") if way == "now" else whole_file_jsonl(jsonl)
        seconds = time.perf_counter() - start
        # The same documents: read_text ends each with a page break, the old way joined
        # them with one.
        result, count = "\0".join(documents(text)).encode(), len(text)
    peak = _status_mb("VmHWM")
    print(
        json.dumps(
            {
                "seconds": seconds,
                "peak_above_baseline_mb": peak - baseline,
                "count": count,  # tokens, or characters read
                "sha256": hashlib.sha256(result).hexdigest(),
            }
        )
    )


def make_corpus(path: Path, megabytes: int) -> None:
    """``path`` (plain text) and the same documents as JSONL beside it."""
    from unbottle.core.data.demo import DemoDataConfig, generate_demo_data
    from unbottle.core.models.loading import documents

    prose = generate_demo_data(DemoDataConfig(seed=0, people=5000, renderings=3))
    block = prose["corpus/train.txt"].strip() + "\n\n"
    repeats = max(1, round(megabytes * 1e6 / len(block)))
    path.write_text(block * repeats, encoding="utf-8")
    with open(path.with_suffix(".jsonl"), "w", encoding="utf-8") as f:
        for r in range(repeats):
            for i, doc in enumerate(documents(block)):
                f.write(json.dumps({"text": doc, "meta": {"shard": r, "index": i}}) + "\n")


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

    methods = tuple(METHODS)
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
        jsonl_mb = corpus.with_suffix(".jsonl").stat().st_size / 1e6
    for task in ("encode", "read"):
        digests = {run["sha256"] for m in methods if METHODS[m][0] == task for run in runs[m]}
        if len(digests) != 1:
            raise SystemExit(f"{task}: the ways gave different results")
    rows = {
        m: {
            "seconds": statistics.median(run["seconds"] for run in runs[m]),
            "peak_above_baseline_mb": statistics.median(
                run["peak_above_baseline_mb"] for run in runs[m]
            ),
        }
        for m in methods
    }
    tokens = runs["encode_stream"][0]["count"]
    text_mb = runs["read_text, streamed"][0]["count"] / 1e6  # characters: ASCII prose
    print(f"\n{size_mb:.1f} MB of text, {tokens:,} tokens, {args.rounds} rounds (medians)\n")
    print("| task | method | seconds | peak memory above baseline (MB) | per unit |")
    print("|---|---|---:|---:|---:|")
    for m, row in rows.items():
        peak = row["peak_above_baseline_mb"]
        if METHODS[m][0] == "encode":
            task, unit = "tokenize", f"{peak * 2**20 / tokens:.1f} bytes a token"
        else:
            task, unit = "read the JSONL", f"{peak / text_mb:.1f} x the text"
        print(f"| {task} | {m} | {row['seconds']:.1f} | {peak:,.0f} | {unit} |")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                    "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
                    "megabytes": size_mb,
                    "jsonl_megabytes": jsonl_mb,
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
