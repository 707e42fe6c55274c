"""Memory of an onnxruntime-genai build: where ``build_genai_bundle`` peaks, and how high.

Builds the genai bundle of a packed variant (``runtime: genai``'s export,
``plugins/quantization/genai.py``) in this process while a thread samples the resident
memory every 20 ms together with the innermost frame of the builder, onnx or unbottle code
running then. Reports the peak, the peak of each phase (the builder's pass over the
quantized layers, the builder writing its graph, unbottle's pass over the graph) and the
frames at the five highest samples.

``--shape`` builds instead a random-weight Llama at the width of a larger SmolLM2 (a few
layers: the output head, 49,152 rows, is what the shape changes most), quantized with RTN
int4 in groups of 64, the head too, and packed in a temporary folder first.

By default glibc's mmap threshold is fixed first, as the compress stage's calibration pass
leaves it (``unbottle.core.heap.return_large_frees_to_the_os``); ``--default-malloc``
leaves glibc's own adjusting threshold, as a fresh process calling the builder has it.

    python bench/genai_build_memory.py PACKED_DIR [--json out.json]
    python bench/genai_build_memory.py --shape smollm2-1.7b --layers 2
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
    if frames and ":<module>:" in frames[-1]:  # a module's top level, being imported
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


#: Llama shapes of SmolLM2's larger sizes (their config.json), all but the layer count.
SHAPES = {
    "smollm2-360m": dict(
        hidden_size=960, intermediate_size=2560, num_attention_heads=15, num_key_value_heads=5
    ),
    "smollm2-1.7b": dict(
        hidden_size=2048, intermediate_size=8192, num_attention_heads=32, num_key_value_heads=32
    ),
}


def random_packed_variant(shape: str, layers: int, out: Path) -> Path:
    """A random-weight Llama of ``shape`` with ``layers`` layers, RTN int4 g64 with its
    head, written as a packed variant into ``out``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from unbottle.compression import Scheme, output_head, quantize_rtn, save_packed
    from unbottle.core.models.loading import train_tokenizer

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=49_152,
        num_hidden_layers=layers,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        **SHAPES[shape],
    )
    model = LlamaForCausalLM(config).eval()
    linears = [(n, m) for n, m in model.named_modules() if n.endswith("proj")]
    linears.append(output_head(model, untie=True))
    scheme = Scheme(bits=4, group_size=64)
    codes = {name: quantize_rtn(module.weight.detach(), scheme) for name, module in linears}
    tokenizer = train_tokenizer(["the quick brown fox jumps over the lazy dog " * 8], 300)
    save_packed(
        model, tokenizer, codes, out, method="rtn", group_size=64, symmetric=False, options={}
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "packed", type=Path, nargs="?", help="A packed variant (quantization.json)."
    )
    parser.add_argument("--shape", choices=sorted(SHAPES), help="A random model instead.")
    parser.add_argument("--layers", type=int, default=2, help="With --shape (default 2).")
    parser.add_argument("--default-malloc", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if (args.packed is None) == (args.shape is None):
        raise SystemExit("give one of a packed variant and --shape")
    if args.shape and args.layers < 1:
        raise SystemExit("--layers must be at least 1")
    if args.packed and not (args.packed / "quantization.json").is_file():
        raise SystemExit(f"{args.packed}: not a packed variant (no quantization.json)")
    with tempfile.TemporaryDirectory() as scratch:
        if args.shape:
            from unbottle.compression import trim_heap

            args.packed = random_packed_variant(args.shape, args.layers, Path(scratch) / "packed")
            trim_heap()  # the float model made it: not part of the build's memory
        measure(args)


def measure(args: argparse.Namespace) -> None:
    """Build ``args.packed``'s genai bundle and report its memory."""

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
        "shape": args.shape and f"{args.shape}, {args.layers} layers, random weights",
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
