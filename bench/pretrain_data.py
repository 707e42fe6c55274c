"""Pretraining's data, from disk: time and memory of the pretrain stage's data preparation.

Before training, the pretrain stage reads the corpus, trains its tokenizer on it and
turns it into the token ids the batches are cut from. Three ways, each in fresh
processes, alternating, on ``--megabytes`` of the demo world's prose as JSONL (the layout
of most pretraining dumps):

- ``in memory`` (before): the corpus read into one string, the tokenizer trained on the
  list of its documents, the ids an int64 tensor in memory (``read_text``,
  ``documents``, ``encode_stream``: what the stage did until this script was written);
- ``from disk`` (now): the documents read from the file as they are needed, the
  tokenizer trained on them as they come, the ids written to a uint16 token file and
  memory-mapped (``unbottle.core.data.corpus.Corpus``, as the stage calls it);
- ``from disk, cached``: the same with the tokenizer and the token file already in the
  cache, as a rerun or a resumed run finds them;
- with ``--sample-documents K``, ``from disk, tokenizer on a sample``: from disk, the
  tokenizer trained on K documents drawn at random (``pretrain.tokenizer.sample_documents``),
  so its tokenizer and ids differ from the others'.

The demo world's prose repeats a small vocabulary of words, and a tokenizer trainer's
memory grows with the distinct words it counts. ``--words N`` writes instead documents
of 300 words drawn from N random letter strings by a Zipf law (exponent 1.1), as real
text has many distinct words and a long tail of rare ones.

Each reports the seconds, the peak resident memory above the process's baseline (the
high-water mark, reset after the imports), the anonymous memory still held once the ids
are ready (what the training that follows keeps: a mapped token file is page cache, not
counted there), and checks that the first three give the same tokenizer and the same ids.

    .venv/bin/python bench/pretrain_data.py [--megabytes 64] [--rounds 3] [--vocab 8192] \\
        [--words N] [--sample-documents K] [--json out.json]

``--write-corpus PATH`` only writes the corpus (for a run of the stage itself).
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

sys.path.insert(0, str(Path(__file__).resolve().parent))

from encode_corpus import _status_mb, make_corpus, reset_peak_rss

WAYS = ("in memory", "from disk", "from disk, cached")
SAMPLED = "from disk, tokenizer on a sample"


def child(way: str, corpus: Path, cache: Path, vocab: int, sample: int | None) -> None:
    import numpy as np

    from unbottle.core.data.corpus import Corpus
    from unbottle.core.models.loading import (
        documents,
        encode_stream,
        read_text,
        train_tokenizer,
    )

    train_tokenizer(["warm up the imports"] * 4, 300)
    baseline, anonymous = reset_peak_rss(), _status_mb("RssAnon")
    start = time.perf_counter()
    if way == "in memory":
        text = read_text(corpus, "corpus")
        tokenizer = train_tokenizer(documents(text), vocab)
        ids = encode_stream(tokenizer, text)
    else:
        source = Corpus(corpus, "corpus", token_cache=cache)
        tokenizer = source.train_tokenizer(vocab, sample=sample if way == SAMPLED else None)
        ids = source.token_ids(tokenizer)
    seconds = time.perf_counter() - start
    peak, held = _status_mb("VmHWM") - baseline, _status_mb("RssAnon") - anonymous
    digest = hashlib.sha256()
    for block in range(0, ids.numel(), 1 << 24):  # hashed as int64, a block at a time
        digest.update(ids[block : block + (1 << 24)].numpy().astype(np.int64).tobytes())
    print(
        json.dumps(
            {
                "seconds": seconds,
                "peak_above_baseline_mb": peak,
                "anonymous_held_mb": held,
                "tokens": ids.numel(),
                "ids_sha256": digest.hexdigest(),
                "tokenizer_sha256": hashlib.sha256(
                    tokenizer.backend_tokenizer.to_str().encode()
                ).hexdigest(),
            }
        )
    )


def make_zipf_corpus(path: Path, megabytes: int, words: int) -> None:
    """``megabytes`` of JSONL documents of 300 words, each drawn from ``words`` random
    lowercase strings of 3 to 12 letters with a Zipf law (exponent 1.1), seeded."""
    import random
    import string

    import numpy as np

    pick = random.Random(0)
    lexicon = [
        "".join(pick.choices(string.ascii_lowercase, k=pick.randint(3, 12))) for _ in range(words)
    ]
    draw = np.random.default_rng(0)
    written = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < megabytes * 1e6:
            ranks = np.minimum(draw.zipf(1.1, 300), words) - 1
            line = json.dumps({"text": " ".join(lexicon[r] for r in ranks) + "."}) + "\n"
            f.write(line)
            written += len(line)


def write_jsonl_corpus(path: Path, megabytes: int, words: int) -> None:
    """The corpus the ways run on: the demo's prose, or a Zipf draw over ``words``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if words:
        make_zipf_corpus(path, megabytes, words)
        return
    text = path.with_suffix(".txt")
    make_corpus(text, megabytes)  # and the same documents as JSONL beside it
    text.unlink()
    if path != text.with_suffix(".jsonl"):
        text.with_suffix(".jsonl").replace(path)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--megabytes", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--words", type=int, default=0, help="a Zipf draw over N words")
    parser.add_argument("--sample-documents", type=int, help="a row training on K documents")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--write-corpus", type=Path, help="only write the JSONL corpus there")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        way, corpus, cache, vocab, sample = args.child
        child(way, Path(corpus), Path(cache), int(vocab), int(sample) or None)
        return 0

    if args.write_corpus:  # the corpus alone, for a run of the stage itself
        write_jsonl_corpus(args.write_corpus, args.megabytes, args.words)
        return 0
    ways = (*WAYS, SAMPLED) if args.sample_documents else WAYS
    runs: dict[str, list[dict]] = {way: [] for way in ways}
    with tempfile.TemporaryDirectory(dir=Path.home() / ".cache") as tmp:
        corpus = Path(tmp) / "corpus.jsonl"
        write_jsonl_corpus(corpus, args.megabytes, args.words)
        for r in range(args.rounds):
            cache = Path(tmp) / f"tokens-{r}"  # empty for "from disk", then filled by it
            order = ("in memory", "from disk") if r % 2 == 0 else ("from disk", "in memory")
            for way in (*order, "from disk, cached", *ways[len(WAYS) :]):
                where = cache if way != SAMPLED else Path(tmp) / f"sampled-{r}"
                cmd = [sys.executable, __file__, "--child", way, str(corpus), str(where)]
                cmd += [str(args.vocab), str(args.sample_documents or 0)]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                runs[way].append(json.loads(out.strip().splitlines()[-1]))
                print(f"round {r + 1} {way}: {runs[way][-1]}", file=sys.stderr)
        jsonl_mb = corpus.stat().st_size / 1e6
    for key in ("ids_sha256", "tokenizer_sha256"):
        if len({run[key] for way in WAYS for run in runs[way]}) != 1:
            raise SystemExit(f"the ways gave different results ({key})")
    figures = ("seconds", "peak_above_baseline_mb", "anonymous_held_mb")
    rows = {
        way: {figure: statistics.median(run[figure] for run in runs[way]) for figure in figures}
        for way in ways
    }
    tokens = runs[WAYS[0]][0]["tokens"]
    prose = f"a Zipf draw over {args.words:,} words" if args.words else "the demo's prose"
    print(
        f"\n{jsonl_mb:.1f} MB of JSONL ({prose}), {tokens:,} tokens, a {args.vocab:,}-token "
        f"tokenizer, {args.rounds} rounds (medians)\n"
    )
    print("| way | seconds | peak above baseline (MB) | per token | anonymous memory held (MB) |")
    print("|---|---:|---:|---:|---:|")
    for way, row in rows.items():
        peak = row["peak_above_baseline_mb"]
        print(
            f"| {way} | {row['seconds']:.1f} | {peak:,.0f} | "
            f"{peak * 2**20 / tokens:.1f} bytes | {row['anonymous_held_mb']:,.0f} |"
        )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                    "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
                    "jsonl_megabytes": jsonl_mb,
                    "tokens": tokens,
                    "vocab": args.vocab,
                    "words": args.words or None,
                    "sample_documents": args.sample_documents,
                    "medians": rows,
                    "runs": runs,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
