"""Decode speed of the ``hf`` target's compressed-tensors bundle in transformers.

The ``hf`` deploy target writes a packed (``rtn``/``gptq``) variant as a compressed-tensors
checkpoint. Loaded by transformers as it is, each quantized Linear is compressed-tensors'
``CompressedLinear``: it decompresses its weight once, on its first call, but its forward
is wrapped to quantize the weight again at every call (for quantization-aware training).
unbottle's loader and the bundle's model card turn the wrapper off
(``model.apply(disable_quantization)``; ``core/models/loading.py``). This script times, in
one process, interleaved round by round (the order rotated each round):

- ``float``: the variant's float source directory (``--float``), the reference;
- ``transformers``: the bundle as ``AutoModelForCausalLM.from_pretrained`` loads it;
- ``unbottle``: the bundle through unbottle's loader (the card's code).

Each: greedy ``--new-tokens`` at batch 1 after a short prompt, through ``generate``, on
``--threads`` threads. Figures: median tokens/s over rounds, and the median (min–max) of
each round's ratio to ``float``; the largest logit difference between the two bundle
loads (they should agree to the bit).

    .venv/bin/python bench/hf_bundle_decode.py --bundle artifacts/deploy \\
        --float artifacts/finetune [--rounds 5] [--new-tokens 32] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

PROMPT = "Question: How many metres are in 3 km?\nAnswer:"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, required=True, help="the hf target's bundle")
    parser.add_argument("--float", type=Path, required=True, help="the float model it came from")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from unbottle.core.models.loading import load_model

    torch.set_num_threads(args.threads)
    ids = AutoTokenizer.from_pretrained(args.bundle)(PROMPT, return_tensors="pt")
    models = {
        "float": load_model(args.float)[0],
        "transformers": AutoModelForCausalLM.from_pretrained(args.bundle, dtype=torch.float32),
        "unbottle": load_model(args.bundle)[0],
    }
    with torch.inference_mode():
        logits = {name: models[name](**ids).logits for name in ("transformers", "unbottle")}
    difference = (logits["transformers"] - logits["unbottle"]).abs().max().item()

    def tokens_per_s(model) -> float:
        with torch.inference_mode():
            began = time.perf_counter()
            model.generate(
                **ids,
                max_new_tokens=args.new_tokens,
                min_new_tokens=args.new_tokens,
                do_sample=False,
            )
            return args.new_tokens / (time.perf_counter() - began)

    names = list(models)
    for name in names:  # warm: the first call decompresses
        tokens_per_s(models[name])
    rounds: list[dict[str, float]] = []
    for r in range(args.rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        rounds.append({name: tokens_per_s(models[name]) for name in order})
        print(f"round {r + 1}: " + ", ".join(f"{n} {rounds[-1][n]:.1f}" for n in names))

    print(f"\n{args.threads} thread(s), {args.new_tokens} new tokens, {args.rounds} rounds")
    print("| load | tokens/s | × float (min–max) |\n|---|---:|---:|")
    table = {}
    for name in names:
        ratios = [row[name] / row["float"] for row in rounds]
        table[name] = {
            "tokens_per_s": statistics.median(row[name] for row in rounds),
            "ratio": statistics.median(ratios),
            "ratio_range": [min(ratios), max(ratios)],
        }
        print(
            f"| {name} | {table[name]['tokens_per_s']:.1f} | {table[name]['ratio']:.2f} "
            f"({min(ratios):.2f}–{max(ratios):.2f}) |"
        )
    print(f"\nlargest logit difference, transformers against unbottle: {difference:.3g}")
    if args.json:
        result = {"args": {k: str(v) for k, v in vars(args).items()}, "rounds": rounds}
        result |= {"table": table, "max_logit_difference": difference}
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
