"""The serving engine's greedy choice: torch's argmax (the engine before) against numpy's.

Between two decode steps the engine picks each row's next token from its (V,) logits.
torch splits an argmax over SmolLM2's 49,152 logits across its intra-op threads; on a
2-core machine the second thread may wait for a core that the runtime's own threads
(ONNX Runtime's, llama.cpp's) still spin on after their step. numpy's argmax runs on the
calling thread. Both return the first of equal maxima, so the tokens are the same.

One process per bundle: the engine on the bundle (2 threads), and in each round one
greedy decode of ``--new-tokens`` steps with each choice, in alternating order; decode
tokens/s is the time of ``new + 1`` tokens less the time of 1 (the prefill), over
``new``. Each bundle's rows, the per-round ratios and their median go to ``--json``.

    python bench/greedy_choice_ab.py genai=BUNDLE gguf=BUNDLE dense=DIR --rounds 10
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import labelled_bundles

import unbottle.core.serving.engine as engine_module
from unbottle.core.serving.engine import SamplingParams, load_bundle

NUMPY_CHOICE = engine_module._choose  # the engine's own, now numpy for greedy


def torch_choice(logits: Any, params: SamplingParams, generator: Any) -> int:
    """The engine's greedy choice before: torch's argmax, on torch's threads."""
    if params.temperature < engine_module.GREEDY_BELOW:
        return int(logits.argmax())
    return NUMPY_CHOICE(logits, params, generator)


def measure(bundle: Path, rounds: int, new: int, threads: int) -> dict[str, Any]:
    loaded = load_bundle(bundle, {"threads": threads})
    engine = loaded.engine()
    engine.start()
    ids = loaded.tokenizer("The history of the city of Paris begins", add_special_tokens=False)[
        "input_ids"
    ]
    arms = {"torch argmax (before)": torch_choice, "numpy argmax (now)": NUMPY_CHOICE}
    speeds: dict[str, list[float]] = {name: [] for name in arms}
    texts: dict[str, set[str]] = {name: set() for name in arms}
    try:
        for r in range(rounds):
            order = list(arms.items()) if r % 2 == 0 else list(arms.items())[::-1]
            for name, choose in order:
                engine_module._choose = choose
                started = time.perf_counter()
                engine.generate(ids, SamplingParams(max_tokens=1, ignore_eos=True))
                prefill = time.perf_counter() - started
                started = time.perf_counter()
                seq = engine.generate(ids, SamplingParams(max_tokens=new + 1, ignore_eos=True))
                whole = time.perf_counter() - started
                speeds[name].append(new / (whole - prefill))
                texts[name].add(seq.text)
    finally:
        engine_module._choose = NUMPY_CHOICE
        engine.stop()
    before, now = speeds.values()
    ratios = [b / a for a, b in zip(before, now, strict=True)]
    return {
        "speeds": speeds,
        "ratio_per_round": ratios,
        "ratio_median": statistics.median(ratios),
        "faster_rounds": sum(r > 1 for r in ratios),
        "same_tokens": len(set.union(*texts.values())) == 1,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundles", nargs="+", help="LABEL=BUNDLE")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results = {}
    print("| bundle | torch argmax tokens/s | numpy argmax tokens/s | × (median of rounds) "
          "| rounds faster | same tokens |\n|---|---:|---:|---:|---:|---|", flush=True)  # fmt: skip
    for label, path in labelled_bundles(args.bundles):
        result = measure(path, args.rounds, args.new_tokens, args.threads)
        results[label] = {"bundle": str(path), **result}
        before, now = (statistics.median(v) for v in result["speeds"].values())
        print(
            f"| {label} | {before:.1f} | {now:.1f} | {result['ratio_median']:.3f} | "
            f"{result['faster_rounds']}/{args.rounds} | {result['same_tokens']} |",
            flush=True,
        )
    if args.json:
        out = {
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
            "rounds": args.rounds,
            "new_tokens": args.new_tokens,
            "threads": args.threads,
            "results": results,
        }
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
