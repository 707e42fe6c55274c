"""The serving engine's token choice, before and now: greedy or sampled.

Between two decode steps the engine picks each row's next token from its (V,) logits.

- Greedy. Before: torch's argmax, which torch splits across its intra-op threads (the
  second may wait for a core the runtime's own threads still spin on). Now: numpy's, on
  the calling thread. Both return the first of equal maxima: the same tokens.
- Sampled (``--temperature``, ``--top-p``). Before: a softmax, a sort of the whole
  vocabulary for the nucleus and ``torch.multinomial`` over it. Now: the nucleus from
  ``topk`` of the likeliest few (widened until their mass reaches top_p) and one uniform
  draw through the cumulative distribution. The same distribution (tests check it), other
  draws for a seed.

One process per bundle: the engine on the bundle (2 threads), and in each round one
decode of ``--new-tokens`` steps for ``--batch`` sequences with each choice, in
alternating order; decode tokens/s is ``batch x new`` over the time of ``new + 1`` tokens
less the time of 1 (the prefill). Each bundle's rows, the per-round ratios and their median
go to ``--json``.

    python bench/choice_ab.py genai=BUNDLE gguf=BUNDLE --temperature 0.7 --top-p 0.9 --batch 8
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import labelled_bundles

import unbottle.core.serving.engine as engine_module
from unbottle.core.serving.engine import SamplingParams, Sequence, load_bundle

CHOICE_NOW = engine_module._choose


def choice_before(logits: Any, params: SamplingParams, generator: Any) -> int:
    """The engine's choice before cbf873a (greedy) and before the top-k nucleus (sampled)."""
    import torch

    if params.temperature < engine_module.GREEDY_BELOW:
        return int(logits.argmax())
    temperature = max(params.temperature, engine_module.MIN_TEMPERATURE)
    probs = torch.softmax(logits / temperature, dim=-1)
    if params.top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(0) - sorted_probs < params.top_p
        keep[0] = True
        pick = torch.multinomial(sorted_probs * keep, 1, generator=generator)
        return int(order[pick])
    return int(torch.multinomial(probs, 1, generator=generator))


def measure(
    bundle: Path, rounds: int, new: int, threads: int, batch: int, sampling: dict[str, float]
) -> dict[str, Any]:
    loaded = load_bundle(bundle, {"threads": threads, "max_batch": max(8, batch)})
    engine = loaded.engine()
    engine.start()
    ids = loaded.tokenizer("The history of the city of Paris begins", add_special_tokens=False)[
        "input_ids"
    ]
    greedy = sampling["temperature"] < engine_module.GREEDY_BELOW
    arms = {"before": choice_before, "now": CHOICE_NOW}
    speeds: dict[str, list[float]] = {name: [] for name in arms}
    texts: dict[str, set[str]] = {name: set() for name in arms}

    def run(tokens: int, seed: int) -> list[Sequence]:
        done = threading.Semaphore(0)
        seqs = [
            Sequence(
                ids,
                SamplingParams(max_tokens=tokens, ignore_eos=True, seed=seed + i, **sampling),
                lambda seq, text, finish: finish and done.release(),
            )
            for i in range(batch)
        ]
        engine.submit(seqs)
        for _ in seqs:
            done.acquire()
        return seqs

    try:
        for r in range(rounds):
            order = list(arms.items()) if r % 2 == 0 else list(arms.items())[::-1]
            for name, choose in order:
                engine_module._choose = choose
                started = time.perf_counter()
                run(1, r)
                prefill = time.perf_counter() - started
                started = time.perf_counter()
                seqs = run(new + 1, r)
                whole = time.perf_counter() - started
                speeds[name].append(batch * new / (whole - prefill))
                texts[name].update(seq.text for seq in seqs)
    finally:
        engine_module._choose = CHOICE_NOW
        engine.stop()
    before, now = speeds.values()
    ratios = [b / a for a, b in zip(before, now, strict=True)]
    return {
        "speeds": speeds,
        "ratio_per_round": ratios,
        "ratio_median": statistics.median(ratios),
        "faster_rounds": sum(r > 1 for r in ratios),
        # Sampled draws differ by design; greedy tokens must not.
        "same_tokens": texts["before"] == texts["now"] if greedy else None,
    }


def time_alone(vocabulary: int, sampling: dict[str, float], calls: int = 200) -> dict[str, float]:
    """Milliseconds a call of each choice takes on random logits of ``vocabulary``."""
    import torch

    logits = torch.randn(vocabulary, generator=torch.Generator().manual_seed(0)) * 3
    params = SamplingParams(max_tokens=1, **sampling)
    out = {}
    for name, choose in (("before", choice_before), ("now", CHOICE_NOW)):
        generator = torch.Generator().manual_seed(0)
        for _ in range(5):
            choose(logits, params, generator)
        started = time.perf_counter()
        for _ in range(calls):
            choose(logits, params, generator)
        out[name] = 1000 * (time.perf_counter() - started) / calls
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundles", nargs="+", help="LABEL=BUNDLE")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1, help="Sequences decoded together.")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy.")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results = {}
    sampling = {"temperature": args.temperature, "top_p": args.top_p}
    alone = time_alone(49_152, sampling)
    print(
        f"one choice on 49,152 random logits: {alone['before']:.3f} ms before, "
        f"{alone['now']:.3f} ms now",
        flush=True,
    )
    print("| bundle | before tokens/s | now tokens/s | × (median of rounds) "
          "| rounds faster | same tokens |\n|---|---:|---:|---:|---:|---|", flush=True)  # fmt: skip
    for label, path in labelled_bundles(args.bundles):
        result = measure(path, args.rounds, args.new_tokens, args.threads, args.batch, sampling)
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
            "batch": args.batch,
            "sampling": sampling,
            "ms_per_choice_alone": alone,
            "results": results,
        }
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
