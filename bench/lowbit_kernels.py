"""Micro-benchmark: one Linear layer at decode, float32 against the packed layer's kernels.

Which kernel should ``QuantizedLinear`` (core/models/lowbit.py) use on this CPU? For each
of SmolLM2-135M's Linear shapes (in -> out: 576 -> 576 q/o, 576 -> 192 k/v, 576 -> 1536
gate/up, 1536 -> 576 down), at batch 1 and 8 (one token per sequence, as in decode), on
one thread, it times in the same process:

- ``fp32``: ``nn.Linear`` with the dequantized weight (the reference, ratio 1);
- ``dequantized``, ``on-the-fly``, ``int4pack``: ``QuantizedLinear`` with each kernel,
  int4 asymmetric groups of 64 (GPTQ/RTN int4 g64);
- ``int8pack``: torch's ``_weight_int8pack_mm`` on a per-channel symmetric int8 weight
  (the only grid that op takes), called directly: the packed layer does not offer it.

Every figure is a ratio to ``fp32`` in the same run (the best of 5 repeats of N calls
each): above 1 is faster than float.

    .venv/bin/python bench/lowbit_kernels.py [--threads 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

SHAPES = ((576, 576), (576, 192), (576, 1536), (1536, 576))  # (in, out)
BATCHES = (1, 8)


def best_seconds(call: Callable[[], object], calls: int, repeats: int = 5) -> float:
    """The best mean time per call over ``repeats`` runs of ``calls`` calls (warm)."""
    for _ in range(3):
        call()
    best = float("inf")
    for _ in range(repeats):
        began = time.perf_counter()
        for _ in range(calls):
            call()
        best = min(best, (time.perf_counter() - began) / calls)
    return best


def measure(threads: int) -> list[dict[str, object]]:
    import torch

    from unbottle.core.compression.grids import Scheme, quantize_rtn
    from unbottle.core.models.lowbit import KERNELS, QuantizedLinear

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    rows = []
    for n_in, n_out in SHAPES:
        weight = torch.randn(n_out, n_in) * 0.02
        q4 = quantize_rtn(weight, Scheme(bits=4, group_size=64))
        layers = {k: QuantizedLinear.from_quantized(q4, 64, kernel=k) for k in KERNELS}
        dense = torch.nn.Linear(n_in, n_out, bias=False)
        dense.weight.data = q4.dequantize()
        q8 = quantize_rtn(weight, Scheme(bits=8, symmetric=True))
        int8 = (q8.codes.int() - 128).to(torch.int8)  # (out, in) signed codes
        int8_scales = q8.scales.float().reshape(-1)  # (out,)
        for batch in BATCHES:
            x = torch.randn(batch, n_in)
            with torch.inference_mode():
                calls = {
                    "fp32": partial(dense, x),
                    **{k: partial(layer, x) for k, layer in layers.items()},
                    "int8pack": partial(torch.ops.aten._weight_int8pack_mm, x, int8, int8_scales),
                }
                # Fewer calls for the slow kernels, so each shape takes about a second.
                seconds = {
                    k: best_seconds(c, 200 if k in ("fp32", "dequantized") else 20)
                    for k, c in calls.items()
                }
            rows.append(
                {
                    "shape": f"{n_in}x{n_out}",
                    "batch": batch,
                    "fp32_us": round(seconds["fp32"] * 1e6, 1),
                    **{f"{k}_x": round(seconds["fp32"] / s, 3) for k, s in seconds.items()},
                }
            )
            print(
                f"{n_in:>5} -> {n_out:<5} batch {batch}: fp32 {seconds['fp32'] * 1e6:7.0f} us  "
                + "  ".join(f"{k} x{seconds['fp32'] / s:.2f}" for k, s in seconds.items()),
                flush=True,
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    rows = measure(args.threads)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
