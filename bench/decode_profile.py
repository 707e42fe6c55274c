"""Where a decode step of an ONNX bundle spends its time, and how fast its int4 kernels read.

Issue #14 asks for 50% of the memory-bandwidth roofline at batch 1. ``bench/decode_real.py``
gives the whole step's share; this script splits one bundle's step by operator, through
ONNX Runtime's own profiler, while unbottle's serving backend decodes (the code that
``unbottle serve`` runs: ``core/serving/engine.py``), and gives the bandwidth the
``MatMulNBits`` kernels alone draw: the bytes of their weights, scales and zero points per
step over their time per step. When that is below half the machine's bandwidth, no change
outside the kernel can reach the target.

``--against OTHER`` (repeatable) times other bundles' ``MatMulNBits`` nodes alone in the
same rounds, interleaved, each a ratio to BUNDLE's in the same round: two bundles' kernels
timed in separate runs differed by 30% on this machine where interleaved they were equal.

``--accuracy-levels`` also times the step with ``MatMulNBits``' other compute types (a copy
of the graph with the attribute rewritten; 1: float32, 2: float16, 3: bfloat16, 4: int8
activations), each level's tokens/s the median of ``--rounds`` interleaved runs.

    .venv/bin/python bench/decode_profile.py BUNDLE [--against OTHER] [--steps 128] \
        [--threads 2] [--accuracy-levels 1,4] [--rounds 5] [--json out.json]

BUNDLE is a ``genai`` or ``onnx`` bundle directory (``bench/decode_real.py`` caches its
builds under ``$UNBOTTLE_CACHE_DIR/decode_real/``).
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PROMPT_TOKENS = 64


def decode_steps(backend: Any, steps: int) -> float:
    """Seconds for ``steps`` greedy steps at batch 1 after a 64-token prefill."""
    import torch

    logits, cache = backend.prefill(list(range(1000, 1000 + PROMPT_TOKENS)))
    capacity = PROMPT_TOKENS + steps + 1
    buffers = [
        tuple(torch.nn.functional.pad(t, (0, 0, 0, capacity - t.shape[2])) for t in layer)
        for layer in cache
    ]
    token, width = logits.argmax()[None], PROMPT_TOKENS
    began = time.perf_counter()
    for _ in range(steps):
        mask = torch.ones(1, width + 1, dtype=torch.long)
        token = backend.decode(token, torch.tensor([width]), mask, buffers, width).argmax(-1)
        width += 1
    return time.perf_counter() - began


def nbits_bytes(model_file: Path) -> int:
    """Bytes of the initializers the MatMulNBits nodes read (codes, scales, zero points)."""
    import math

    import numpy as np
    import onnx
    from onnx import helper

    graph = onnx.load(str(model_file), load_external_data=False).graph
    sizes = {
        i.name: math.prod(i.dims) * np.dtype(helper.tensor_dtype_to_np_dtype(i.data_type)).itemsize
        for i in graph.initializer
    }
    names = {n for node in graph.node if node.op_type == "MatMulNBits" for n in node.input[1:]}
    return sum(sizes.get(n, 0) for n in names)


def profile(bundle: Path, steps: int, threads: int) -> dict[str, Any]:
    """Per-operator time per decode step, from ONNX Runtime's profiler."""
    import onnxruntime as ort

    from unbottle.core.serving.engine import load_backend

    backend = load_backend(bundle, threads)
    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "profile")
        model_file = next(bundle.glob("*.onnx"))
        backend.session = ort.InferenceSession(
            str(model_file), options, providers=["CPUExecutionProvider"]
        )
        seconds = decode_steps(backend, steps)
        events = json.loads(Path(backend.session.end_profiling()).read_text(encoding="utf-8"))
    per_op: collections.Counter[str] = collections.Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            per_op[event["args"]["op_name"]] += event["dur"]  # microseconds
    runs = steps + 1  # the prefill is one run too; its share is small and kept
    step_ms = {op: us / runs / 1e3 for op, us in per_op.most_common()}
    weights = nbits_bytes(model_file)
    nbits_ms = step_ms.get("MatMulNBits", 0.0)
    return {
        "wall_ms_per_step": 1e3 * seconds / steps,
        "kernel_ms_per_step": sum(step_ms.values()),
        "ms_per_step_by_op": step_ms,
        "matmulnbits_bytes": weights,
        "matmulnbits_gb_per_s": weights / (nbits_ms / 1e3) / 1e9 if nbits_ms else None,
    }


def kernels_alone(bundle: Path, threads: int) -> tuple[Any, dict[str, Any], int]:
    """A session of the bundle's MatMulNBits nodes alone: one graph holding every one of them
    (its weights, scales and zero points), each fed a row of its own width, run as one
    decode step would run them. Their bytes exceed the caches, so each run streams them from
    memory. Returns the session, its feed and the bytes one run reads."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    model = onnx.load(str(next(bundle.glob("*.onnx"))))  # with the external weights
    initializers = {i.name: i for i in model.graph.initializer}
    nodes, inputs, outputs, kept = [], {}, [], {}
    for node in model.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        k = {a.name: a.i for a in node.attribute}["K"]
        inputs.setdefault(k, helper.make_tensor_value_info(f"x{k}", TensorProto.FLOAT, [1, k]))
        out = f"{node.name}/y"
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        nodes.append(
            helper.make_node(
                "MatMulNBits",
                [f"x{k}", *node.input[1:]],
                [out],
                node.name,
                domain="com.microsoft",
                **attributes,
            )
        )
        outputs.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, None))
        kept.update({n: initializers[n] for n in node.input[1:] if n in initializers})
    graph = helper.make_graph(
        nodes, "matmulnbits", list(inputs.values()), outputs, list(kept.values())
    )
    alone = helper.make_model(graph, opset_imports=list(model.opset_import))
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    with tempfile.TemporaryDirectory() as tmp:
        onnx.save(alone, str(Path(tmp) / "alone.onnx"), save_as_external_data=True)
        session = ort.InferenceSession(
            str(Path(tmp) / "alone.onnx"), options, providers=["CPUExecutionProvider"]
        )
    feed = {f"x{k}": np.random.default_rng(0).standard_normal((1, k), np.float32) for k in inputs}
    session.run(None, feed)  # first-run costs (prepacking) are not bandwidth
    weights = sum(int(np.prod(i.dims)) * _itemsize(i) for i in kept.values())
    return session, feed, weights


def kernels_compared(
    bundles: list[Path], threads: int, rounds: int, repeats: int = 10
) -> dict[str, dict[str, float]]:
    """Each bundle's MatMulNBits nodes alone (``kernels_alone``), timed interleaved: in every
    round each bundle's best of ``repeats`` runs, one bundle after the other, so that the
    machine's drift falls on all alike. Per bundle: the median over rounds of that time and
    of the bandwidth it draws, and its ratio to the first bundle's time in the same round
    (median, min and max)."""
    built = [kernels_alone(bundle, threads) for bundle in bundles]
    times: list[list[float]] = [[] for _ in bundles]
    for _ in range(rounds):
        for i, (session, feed, _) in enumerate(built):
            run = functools.partial(session.run, None, feed)
            times[i].append(min(_timed(run) for _ in range(repeats)))
    out = {}
    for bundle, (_, _, weights), mine in zip(bundles, built, times, strict=True):
        ratios = [first / t for first, t in zip(times[0], mine, strict=True)]  # > 1: faster
        out[str(bundle)] = {
            "kernel_alone_ms": 1e3 * statistics.median(mine),
            "kernel_alone_gb_per_s": weights / statistics.median(mine) / 1e9,
            "kernel_bytes": weights,
            "speed_vs_first": statistics.median(ratios),
            "speed_vs_first_min": min(ratios),
            "speed_vs_first_max": max(ratios),
        }
    return out


def _timed(call: Any) -> float:
    began = time.perf_counter()
    call()
    return time.perf_counter() - began


def _itemsize(tensor: Any) -> int:
    import numpy as np
    from onnx import helper

    return np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize


def accuracy_levels(
    bundle: Path, levels: list[int], steps: int, threads: int, rounds: int
) -> dict[int, float]:
    """Median tokens/s of the bundle with each MatMulNBits compute type, interleaved."""
    import onnx

    from unbottle.core.serving.engine import load_backend

    backends = {}
    with tempfile.TemporaryDirectory() as tmp:
        for level in levels:
            copy = Path(tmp) / f"level{level}"
            shutil.copytree(bundle, copy)
            model_file = next(copy.glob("*.onnx"))
            graph = onnx.load(str(model_file), load_external_data=False)
            for node in graph.graph.node:
                for attribute in node.attribute:
                    if node.op_type == "MatMulNBits" and attribute.name == "accuracy_level":
                        attribute.i = level
            onnx.save(graph, str(model_file))
            backends[level] = load_backend(copy, threads)
            decode_steps(backends[level], 8)  # warm-up
        speeds: dict[int, list[float]] = {level: [] for level in levels}
        for _ in range(rounds):
            for level, backend in backends.items():
                speeds[level].append(steps / decode_steps(backend, steps))
    return {level: statistics.median(values) for level, values in speeds.items()}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--steps", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2, help="as decode_real: 2 cores")
    parser.add_argument("--accuracy-levels", default="", help="e.g. 1,3,4")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--against",
        type=Path,
        action="append",
        default=[],
        help="another bundle whose MatMulNBits kernels are timed in the same rounds",
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    for bundle in (args.bundle, *args.against):
        if not list(bundle.glob("*.onnx")):
            print(f"error: {bundle}: no .onnx model there", file=sys.stderr)
            return 2
    import torch

    from unbottle.plugins.metrics import memory_bandwidth

    torch.set_num_threads(args.threads)
    bandwidth = memory_bandwidth()
    report: dict[str, Any] = {
        "bundle": str(args.bundle),
        "threads": args.threads,
        "bandwidth_gb_per_s": bandwidth / 1e9,
        **profile(args.bundle, args.steps, args.threads),
    }
    print(
        f"{args.bundle}: {report['wall_ms_per_step']:.2f} ms per step "
        f"({report['kernel_ms_per_step']:.2f} ms in kernels), {args.threads} thread(s), "
        f"bandwidth {report['bandwidth_gb_per_s']:.1f} GB/s (a 256 MB copy)"
    )
    print("| operator | ms per step | share |\n|---|---:|---:|")
    for op, ms in report["ms_per_step_by_op"].items():
        if ms >= 0.005:
            print(f"| {op} | {ms:.3f} | {100 * ms / report['kernel_ms_per_step']:.0f}% |")
    gbps = report["matmulnbits_gb_per_s"]
    if gbps:
        print(
            f"MatMulNBits: {report['matmulnbits_bytes'] / 1e6:.1f} MB per step at {gbps:.1f} "
            f"GB/s, {100 * gbps / report['bandwidth_gb_per_s']:.0f}% of the bandwidth"
        )
    bundles = [args.bundle, *args.against]
    kernels = kernels_compared(bundles, args.threads, args.rounds)
    report["kernels_alone"] = kernels
    print(
        f"MatMulNBits alone, unprofiled ({args.rounds} interleaved rounds, each a bundle's best "
        "of 10 runs; medians):\n"
        "| bundle | ms per step | GB/s | % of the bandwidth | speed × the first |\n"
        "|---|---:|---:|---:|---:|"
    )
    for bundle, k in kernels.items():
        print(
            f"| {'/'.join(Path(bundle).parts[-2:])} | {k['kernel_alone_ms']:.2f} | "
            f"{k['kernel_alone_gb_per_s']:.1f} | "
            f"{100 * k['kernel_alone_gb_per_s'] / report['bandwidth_gb_per_s']:.0f}% | "
            f"{k['speed_vs_first']:.2f} ({k['speed_vs_first_min']:.2f}–"
            f"{k['speed_vs_first_max']:.2f}) |"
        )
    levels = [int(x) for x in args.accuracy_levels.split(",") if x.strip()]
    if levels:
        speeds = accuracy_levels(args.bundle, levels, args.steps, args.threads, args.rounds)
        report["tokens_per_s_by_accuracy_level"] = speeds
        for level, speed in speeds.items():
            print(f"accuracy_level {level}: {speed:.1f} tokens/s (median of {args.rounds})")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
