"""Memory of an onnxruntime-genai build: where ``build_genai_bundle`` peaks, and how high.

Builds the genai bundle of a packed variant (``runtime: genai``'s export,
``plugins/quantization/genai.py``) in this process while a thread samples the resident
memory every 20 ms together with the innermost frame of the builder, onnx or unbottle code
running then. Reports the peak, the peak of each phase (the builder's pass over the
quantized layers, the builder writing its graph, unbottle's pass over the graph) and the
frames at the five highest samples.

By default glibc's mmap threshold is fixed first, as the compress stage's calibration pass
leaves it (``unbottle.core.heap.return_large_frees_to_the_os``); ``--default-malloc``
leaves glibc's own adjusting threshold, as a fresh process calling the builder has it.

    python bench/genai_build_memory.py PACKED_DIR [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

import psutil


def frames_of_interest(frame) -> list[str]:
    """The stack's frames in onnx, onnxruntime-genai and unbottle code, outermost first."""
    stack = traceback.extract_stack(frame) if frame is not None else []
    return [
        f"{f.filename.split('site-packages/')[-1]}:{f.name}:{f.lineno}"
        for f in stack
        if any(key in f.filename for key in ("onnxruntime_genai", "onnx", "unbottle", "plugins"))
    ]


def phase_of(frames: list[str]) -> str:
    """The step of ``build_genai_bundle`` a sample's stack is in."""
    names = " ".join(frames)
    if frames and frames[-1].endswith(":<module>:" + frames[-1].rsplit(":", 1)[-1]):
        return "imports"
    if "write_gptq_checkpoint" in names:
        return "unbottle writing the GPTQ checkpoint"
    if "create_model" in names:
        if "quantized_model.py" in names:
            return "the builder reading and repacking the quantized layers"
        return "the builder making and writing its graph"
    if "build_genai_bundle" in names:
        return "unbottle's pass over the graph"
    return "the rest"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("packed", type=Path, help="A packed variant (quantization.json).")
    parser.add_argument("--default-malloc", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if not (args.packed / "quantization.json").is_file():
        raise SystemExit(f"{args.packed}: not a packed variant (no quantization.json)")

    from unbottle.core.heap import return_large_frees_to_the_os
    from unbottle.plugins.quantization.genai import build_genai_bundle

    if not args.default_malloc:
        return_large_frees_to_the_os()
    process, main_thread = psutil.Process(), threading.get_ident()
    samples: list[tuple[float, float, list[str]]] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            frames = frames_of_interest(sys._current_frames().get(main_thread))
            samples.append((time.perf_counter(), process.memory_info().rss / 2**20, frames))
            time.sleep(0.02)

    before = process.memory_info().rss / 2**20
    sampler = threading.Thread(target=sample, daemon=True)
    started = time.perf_counter()
    sampler.start()
    with tempfile.TemporaryDirectory() as tmp:
        facts = build_genai_bundle(args.packed, Path(tmp) / "genai", work_dir=Path(tmp))
    seconds = time.perf_counter() - started
    done.set()
    sampler.join()

    phases: dict[str, float] = {}
    for _, rss, frames in samples:
        phase = phase_of(frames)
        phases[phase] = max(phases.get(phase, 0.0), rss)
    highest = sorted(samples, key=lambda s: -s[1])[:5]
    result = {
        "packed": str(args.packed),
        "malloc": "glibc default" if args.default_malloc else "mmap threshold fixed at 1 MiB",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "rss_before_mb": before,
        "peak_rss_mb": max(s[1] for s in samples),
        "seconds": seconds,
        "phase_peaks_mb": phases,
        "highest": [{"rss_mb": rss, "frames": frames[-3:]} for _, rss, frames in highest],
        "facts": facts,
    }
    print(f"{args.packed}: built in {seconds:.1f} s; {result['malloc']}")
    print(f"resident before {before:,.0f} MB, peak {result['peak_rss_mb']:,.0f} MB")
    for phase, rss in sorted(phases.items(), key=lambda kv: -kv[1]):
        print(f"  {rss:7,.0f} MB  {phase}")
    print("highest samples:")
    for entry in result["highest"]:
        print(f"  {entry['rss_mb']:7,.0f} MB  {' <- '.join(reversed(entry['frames']))}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
