"""When copying a running llama.cpp sequence's cells beats computing a shared prompt start.

`unbottle serve` gives each GGUF request cells of its own (``kv_unified`` off). A prompt
whose start a running sequence holds (choices of one prompt, requests sharing a system
prompt that arrive together) can take a copy of that sequence's cells
(``llama_memory_seq_cp``) instead of computing the start again. Across sequences with
cells of their own, llama.cpp copies a sequence's whole share of the cache, ``context``
cells of every layer, whatever the start's length. This times, through the server's own
backend, a prompt of ``shared`` tokens held by a running sequence plus 8 of its own,
computed from nothing against copied, at each ``--context``: the copy's fixed cost
against the start's compute, which is what ``LlamaCppBackend.COPY_AT_LEAST`` weighs.

    python bench/llama_cpp_copy_cost.py GGUF_BUNDLE --context 8192 2048 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

SHARED = (8, 16, 32, 64, 128, 256)
TAIL = [42, 43, 44, 45, 46, 47, 48, 49]


def time_prefills(bundle: Path, context: int, threads: int, repeats: int) -> list[dict]:
    from unbottle.core.serving.engine import LlamaCppBackend

    backend = LlamaCppBackend(bundle, threads=threads, max_batch=8, context=context)
    try:
        running = [1000 + (i * 7) % 5000 for i in range(max(SHARED) + 1)]
        backend.prefill(running)  # a sequence that stays taken, holding `running`
        rows = []
        for shared in SHARED:
            ids = running[:shared] + TAIL
            row = {"context": context, "shared": shared}
            for label, at_least in (("computed_ms", 1 << 30), ("copied_ms", 1)):
                backend.COPY_AT_LEAST = at_least
                runs = []
                for _ in range(repeats):
                    started = time.perf_counter()
                    _, seq = backend.prefill(ids)
                    runs.append(time.perf_counter() - started)
                    assert backend.prompt_tokens_cached == (shared if at_least == 1 else 0)
                    backend._forget(seq)  # the next prompt finds nothing in the free cells
                    backend.release(seq)
                row[label] = statistics.median(runs) * 1000
            rows.append(row)
            print(
                f"context {context:>5}, shared {shared:>4}: computed {row['computed_ms']:6.1f} ms,"
                f" copied {row['copied_ms']:6.1f} ms"
            )
        return rows
    finally:
        backend.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", type=Path, help="A gguf bundle (or a folder with one file).")
    parser.add_argument("--context", type=int, nargs="+", default=[8192, 2048])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = [
        row
        for context in args.context
        for row in time_prefills(args.bundle, context, args.threads, args.repeats)
    ]
    if args.json:
        result = {
            "bundle": str(args.bundle),
            "threads": args.threads,
            "repeats": args.repeats,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
            "rows": rows,
        }
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
