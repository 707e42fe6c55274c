"""How the order of a batch's rows moves llama.cpp's decode speed, with a cache per sequence.

`unbottle serve` runs a GGUF file in llama.cpp with one stream of cache cells per request
(``kv_unified`` off, as llama-server's slots), and rows join and leave the batch in any
order of their sequence ids. This decodes the same rows (prompts of ``--prompt-tokens``
random tokens, then ``--steps`` greedy steps, every row in one ``llama_decode`` a step)
with the rows' sequence ids ascending, descending and shuffled, each as given and sorted
by id, in ``--rounds`` interleaved rounds, and prints tokens/s (median over rounds) and
whether every order gave the same tokens.

    python bench/llama_cpp_row_order.py BUNDLE_OR_GGUF_DIR --rows 8 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import time
from pathlib import Path

import numpy as np


def decode_rows(model, path, n_vocab, prompts, ids, steps, threads, sort):
    """Prefill each prompt into its sequence id, then ``steps`` greedy steps of all rows;
    returns (decode tokens/s, the tokens)."""
    from unbottle.core.models import llama_cpp

    lib = llama_cpp.llama_library()
    rows = len(prompts)
    context = max(len(p) for p in prompts) + steps + 1
    ctx = llama_cpp.new_context(model, path, context * rows, rows, False, threads)
    batch = lib.llama_batch_init(llama_cpp.CHUNK, 0, 1)
    try:
        last = []
        for prompt, seq in zip(prompts, ids, strict=True):
            entries = [(t, pos, seq, pos == len(prompt) - 1) for pos, t in enumerate(prompt)]
            last.append(llama_cpp.decode_entries(ctx, batch, entries, n_vocab, path)[-1])
        tokens = [int(np.argmax(x)) for x in last]
        positions = [len(p) for p in prompts]
        generated = [[t] for t in tokens]
        order = sorted(range(rows), key=lambda r: ids[r]) if sort else list(range(rows))
        started = time.perf_counter()
        for _ in range(steps):
            entries = [(tokens[r], positions[r], ids[r], True) for r in order]
            logits = llama_cpp.decode_entries(ctx, batch, entries, n_vocab, path)
            for i, r in enumerate(order):
                tokens[r] = int(np.argmax(logits[i]))
                positions[r] += 1
                generated[r].append(tokens[r])
        elapsed = time.perf_counter() - started
    finally:
        lib.llama_batch_free(batch)
        lib.llama_free(ctx)
    return rows * steps / elapsed, generated


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", type=Path, help="A directory holding one .gguf file.")
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=22)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    from unbottle.core.models import llama_cpp

    (path,) = sorted(args.bundle.glob("*.gguf"))
    lib = llama_cpp.llama_library()
    model = llama_cpp.load_llama_model(path)
    n_vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(model))
    rng = random.Random(0)
    prompts = [
        [rng.randrange(100, n_vocab) for _ in range(args.prompt_tokens)] for _ in range(args.rows)
    ]
    shuffled = list(range(args.rows))
    rng.shuffle(shuffled)
    orders = {
        "ascending": list(range(args.rows)),
        "descending": list(range(args.rows - 1, -1, -1)),
        "shuffled": shuffled,
    }
    cases = [(name, sort) for sort in (False, True) for name in orders]
    speeds: dict[str, list[float]] = {f"{n}{' sorted' * s}": [] for n, s in cases}
    outputs = {}
    for round_index in range(args.rounds):
        shift = round_index % len(cases)
        for name, sort in cases[shift:] + cases[:shift]:
            label = f"{name}{' sorted' * sort}"
            speed, generated = decode_rows(
                model, path, n_vocab, prompts, orders[name], args.steps, args.threads, sort
            )
            speeds[label].append(speed)
            outputs[label] = generated
    same = all(tokens == outputs["ascending"] for tokens in outputs.values())
    print(f"{'rows given in order':<22} {'tokens/s (median)':>18}  rounds")
    for label, values in speeds.items():
        rounds = ", ".join(f"{v:.1f}" for v in values)
        print(f"{label:<22} {statistics.median(values):>18.1f}  {rounds}")
    print(f"the same tokens in every order: {same}")
    lib.llama_model_free(model)
    if args.json:
        result = {
            "bundle": str(args.bundle),
            "rows": args.rows,
            "steps": args.steps,
            "threads": args.threads,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
            "tokens_per_s": speeds,
            "same_tokens": same,
            "system_info": lib.llama_print_system_info().decode(),
        }
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
