"""The onnxruntime-genai bundle: a packed variant's own codes in onnxruntime-genai's graph.

onnxruntime-genai's model builder (``onnxruntime_genai.models.builder``, Microsoft) writes
a decoder with fused ``GroupQueryAttention``, rotary embeddings and ``MatMulNBits``
layers, and its C++ generation loop runs it; on SmolLM2 its int4 build decoded 2x to 3x
faster than unbottle's optimum-exported edge bundle (BENCHMARKS.md). Given a quantized
checkpoint instead of a float one, the builder takes the codes as they are
(``quantized_model.py``), so GPTQ's quality survives at genai's speed.

What the 0.11.4 builder reads for ``quant_method: gptq`` (read from its source, checked
by ``tests/test_genai_bundle.py``): safetensors with, per Linear ``<name>``,

- ``<name>.qweight``: int32 (in * bits / 32, out), codes packed along ``in``,
  ``32 // bits`` to a word, the first in the low bits;
- ``<name>.qzeros``: int32 (groups, out * bits / 32), zero points packed along ``out``,
  stored minus one (AutoGPTQ's original "v1" convention: the builder adds one back);
  always present, also for symmetric grids (the builder reads no ``sym`` flag);
- ``<name>.scales``: float16 (groups, out);
- ``<name>.g_idx``: int32 (in,), the group of each input column; always present (the
  builder takes the layer's width from it);

and ``config.json``'s ``quantization_config``: ``bits`` (4 or 8 here: what ONNX Runtime's
CPU ``MatMulNBits`` runs), ``group_size`` (-1 for per-channel) and ``desc_act`` (when
true, ``g_idx`` goes into the graph; when false the builder assumes contiguous groups).
Every other tensor (embeddings, norms) is read as it is. The builder dequantizes and
rounds back with the same scales and zero points before packing for ``MatMulNBits``,
which gives the same codes (checked here after the build).

Where unbottle departs from what the builder would do:

- Act-order groups: ``MatMulNBits`` with a ``g_idx`` input takes a slow dequantizing path.
  As in the edge bundle (:mod:`unbottle.plugins.quantization.matmulnbits`), the codes are
  stored with columns sorted by group and a ``Gather`` permutes the layer's input the
  same way (x W^T = x[:, p] W[:, p]^T), so the fast kernel runs. ``down_proj``'s input
  is gate's and up's outputs multiplied element by element, so their output rows are
  stored in its order instead and it needs no ``Gather``.
- Gate and up, which read the same input, become one ``MatMulNBits`` node and a
  ``Split`` (:func:`~unbottle.plugins.quantization.matmulnbits.fuse_matmuls_sharing_input`;
  the builder already fuses q, k and v): the same outputs to the bit with one kernel
  launch fewer per layer, 3 to 5% more tokens/s at batch 1 on SmolLM2 (BENCHMARKS.md).
- Symmetric grids: the builder stores zero points for them too, all the grid's midpoint,
  which ``MatMulNBits`` assumes when it has none; they are dropped, so the bundle has the
  format and bytes of genai's own symmetric int4 builds.
- The output head, when the variant quantized it (``quantize_head``), goes into the
  checkpoint dequantized, the builder keeps it float, and its ``MatMul`` is then replaced
  by a ``MatMulNBits`` node holding the variant's codes
  (:func:`~unbottle.plugins.quantization.matmulnbits.replace_matmuls`), with the untied
  embedding table in float (one row read per token). The builder repacks a quantized
  layer through int64 bit planes, 64 bytes per weight at once: for SmolLM2's head (28M
  weights, 1.8 GB at once) that was the whole build's peak, 2.6 GB against 1.7 GB now,
  and at 1.7B's width 7.7 against 3.7 GB (``bench/genai_build_memory.py``). On SmolLM2 a
  GPTQ int4 head reads half the int8 head's bytes per token for x1.009 perplexity
  (BENCHMARKS.md).
- The output head, not quantized in the variant (tied to the embeddings), is left to the
  builder's own int8 round-to-nearest (``head: int8``, its ``rtn_last``; the embeddings
  then read the same int8 table), its default symmetric int4 (``head: int4``, with a
  float embedding table of its own, as in genai's own int4 builds) or kept float
  (``head: float``). On SmolLM2 the head is 28M of 135M weights: int8 reads a quarter of
  the float head's bytes per token at no measurable loss, int4 an eighth but cost
  perplexity x1.30 of dense against x1.09 (docs/compression.md).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import logging
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from unbottle import ConfigError, DataError

#: The version this bundle was checked against, and what installs it.
GENAI = "onnxruntime-genai==0.11.4"
GENAI_INSTALL = f"pip install '{GENAI}' onnx-ir"
#: The weight widths the builder packs and ONNX Runtime's CPU MatMulNBits runs.
GENAI_BITS = (4, 8)
#: What happens to the (unquantized) output head.
HEADS = ("int8", "int4", "float")
WEIGHTS = "model.safetensors"
#: The output head's module name, and the builder's name for its MatMul node.
HEAD, HEAD_NODE = "lm_head", "/lm_head/MatMul"


def require_genai(what: str) -> None:
    """One line naming the install command when the optional library is missing."""
    if importlib.util.find_spec("onnxruntime_genai") is None or (
        importlib.util.find_spec("onnx_ir") is None
    ):
        raise ConfigError(f"{what}: onnxruntime-genai is not installed: `{GENAI_INSTALL}`")


def genai_problem(meta: dict[str, Any], shapes: dict[str, tuple[int, int]]) -> str | None:
    """Why the genai builder cannot take this packed variant, or None when it can.

    ``meta`` is the variant's quantization config, ``shapes`` each quantized module's
    (out_features, in_features).
    """
    from unbottle.plugins.quantization.matmulnbits import block_size_problem

    bits, group_size = int(meta["bits"]), meta["group_size"]
    if bits not in GENAI_BITS:
        allowed = " or ".join(f"int{b}" for b in GENAI_BITS)
        return f"int{bits} weights; the genai builder packs {allowed}"
    per_word = 32 // bits
    for name, (out, n) in shapes.items():
        problem = block_size_problem(group_size, n)
        if problem:
            return f"{name}: {problem}"
        # The head's codes go into the graph directly, not through the checkpoint's words.
        if name != HEAD and (n % per_word or out % per_word):
            return f"{name}: {out}x{n} is not a multiple of {per_word} (GPTQ int32 packing)"
    return None


def _pack_int32(values: Any, bits: int) -> Any:
    """(rows, cols) codes -> (rows * bits / 32, cols) int32, packed along rows, first low."""
    import torch

    per_word = 32 // bits
    rows, cols = values.shape
    grouped = values.to(torch.int64).reshape(rows // per_word, per_word, cols)
    shifts = torch.arange(0, 32, bits, dtype=torch.int64).view(1, per_word, 1)
    words = (grouped << shifts).sum(dim=1)  # (rows / per_word, cols), in [0, 2^32)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def write_gptq_checkpoint(packed_dir: Path, out_dir: Path) -> dict[str, Any]:
    """Write the packed variant in ``packed_dir`` as a GPTQ checkpoint the genai builder
    reads (the layout in the module docstring), code for code.

    Writes ``model.safetensors`` and ``config.json`` into ``out_dir``; the tokenizer is
    the caller's. A quantized output head is written dequantized, as ``lm_head.weight``
    (its codes go into the graph after the build: the module docstring). Returns
    ``desc_act`` (whether any layer has act-order groups), ``quantized_layers`` and
    ``quantized_head`` (whether the output head is one of them).
    """
    import torch
    from safetensors.torch import load_file, save_file

    from unbottle.compression import dequantize_groups, read_quantization_config, unpack

    packed_dir, out_dir = Path(packed_dir), Path(out_dir)
    meta = read_quantization_config(packed_dir)
    bits, group_size = int(meta["bits"]), meta["group_size"]
    state = load_file(str(packed_dir / WEIGHTS))
    shapes = {}
    for name in meta["modules"]:
        if f"{name}.qweight" not in state or f"{name}.scales" not in state:
            raise DataError(f"{packed_dir}: quantized module {name} is missing from its weights")
        shapes[name] = packed_shape(state[f"{name}.qweight"], state[f"{name}.scales"], meta)
    problem = genai_problem(meta, shapes)
    if problem:
        raise ConfigError(f"{packed_dir}: {problem}")

    mask, desc_act = 2**bits - 1, False
    tensors: dict[str, torch.Tensor] = {}
    for name, (out, n) in shapes.items():
        scales = state.pop(f"{name}.scales")  # (out, G) float16
        groups = scales.shape[1]
        codes = unpack(state.pop(f"{name}.qweight"), bits, n)  # (out, in) uint8
        qzeros = state.pop(f"{name}.qzeros", None)
        if qzeros is None:
            zeros = torch.full((out, groups), 2 ** (bits - 1), dtype=torch.int64)
        else:
            zeros = unpack(qzeros, bits, groups).to(torch.int64)  # (out, G)
        g_idx = state.pop(f"{name}.g_idx", None)
        bias = state.pop(f"{name}.bias", None)
        if name == HEAD:
            weight = dequantize_groups(codes, scales, zeros.to(torch.uint8), g_idx)
            tensors[f"{name}.weight"] = weight.contiguous()  # (out, in) float32
            if bias is not None:
                tensors[f"{name}.bias"] = bias.contiguous()
            continue
        contiguous = torch.arange(n, dtype=torch.int32) // (n // groups)
        if g_idx is None:
            g_idx = contiguous
        elif not torch.equal(g_idx.to(torch.int32), contiguous):
            desc_act = True
        tensors[f"{name}.qweight"] = _pack_int32(codes.t(), bits)  # (in * bits / 32, out)
        stored_zeros = (zeros - 1) & mask  # the builder adds the one back
        tensors[f"{name}.qzeros"] = (
            _pack_int32(stored_zeros, bits).t().contiguous()
        )  # (G, out * bits / 32)
        tensors[f"{name}.scales"] = scales.t().contiguous().to(torch.float16)  # (G, out)
        tensors[f"{name}.g_idx"] = g_idx.to(torch.int32).contiguous()
        if bias is not None:
            tensors[f"{name}.bias"] = bias.contiguous()
    tensors.update({k: v.contiguous() for k, v in state.items()})  # embeddings, norms
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / WEIGHTS), metadata={"format": "pt"})
    config = json.loads((packed_dir / "config.json").read_text(encoding="utf-8"))
    if not config.get("architectures"):
        # The builder picks its graph by architecture; a config saved from a bare model
        # class may lack it.
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        causal_lm = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.get("model_type", ""))
        if causal_lm is None:
            raise ConfigError(
                f"{packed_dir}: model_type {config.get('model_type')!r} is not a causal LM"
            )
        config["architectures"] = [causal_lm]
    config["quantization_config"] = {
        "quant_method": "gptq",
        "bits": bits,
        "group_size": group_size or -1,
        "desc_act": desc_act,
        "sym": bool(meta["symmetric"]),
        "checkpoint_format": "gptq",
    }
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return {
        "desc_act": desc_act,
        "quantized_layers": len(shapes),
        "quantized_head": HEAD in shapes,
    }


def packed_head(packed_dir: Path) -> Any:
    """The packed variant's output head as a ``QuantizedLinear``, read alone from its file."""
    from safetensors import safe_open

    from unbottle.compression import QuantizedLinear, read_quantization_config

    meta = read_quantization_config(packed_dir)
    with safe_open(str(Path(packed_dir) / WEIGHTS), framework="pt") as weights:
        names = set(weights.keys())
        tensors = {
            part: weights.get_tensor(f"{HEAD}.{part}") if f"{HEAD}.{part}" in names else None
            for part in ("qweight", "scales", "qzeros", "g_idx", "bias")
        }
    out, in_features = packed_shape(tensors["qweight"], tensors["scales"], meta)
    return QuantizedLinear(
        in_features,
        out,
        bits=int(meta["bits"]),
        group_size=meta["group_size"],
        kernel="on-the-fly",
        **tensors,
    )


def packed_shape(qweight: Any, scales: Any, meta: dict[str, Any]) -> tuple[int, int]:
    """A packed Linear's (out_features, in_features), from its codes and scales."""
    out, groups = scales.shape
    if meta["group_size"]:
        return out, meta["group_size"] * groups
    return out, qweight.shape[1] * 8 // int(meta["bits"])  # per channel: the packed row's


def sort_act_order_groups(model: Any) -> int:
    """Replace each ``MatMulNBits`` node's ``g_idx`` input by a ``Gather`` of its input
    columns in group order and codes stored in that order (see the module docstring).

    Edits the ONNX ``model`` in place; returns how many nodes it changed.
    """
    import numpy as np
    import torch
    from onnx import helper, numpy_helper

    from unbottle.compression import pack, unpack
    from unbottle.plugins.quantization.matmulnbits import set_nodes, sorted_input

    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    nodes, changed, orders = [], 0, {}
    for node in graph.node:
        inputs = list(node.input)
        if node.op_type != "MatMulNBits" or len(inputs) < 5 or not inputs[4]:
            nodes.append(node)
            continue
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        n, k, bits, block = (attributes[key] for key in ("N", "K", "bits", "block_size"))
        g_idx = torch.from_numpy(numpy_helper.to_array(initializers[inputs[4]]).astype(np.int64))
        groups = k // block
        if not torch.equal(torch.bincount(g_idx, minlength=groups), torch.full((groups,), block)):
            raise DataError(f"{node.name}: its g_idx groups are not {block} columns each")
        order = torch.argsort(g_idx, stable=True)  # (K,): columns sorted by group
        b = initializers[inputs[1]]
        codes = unpack(torch.from_numpy(numpy_helper.to_array(b).reshape(n, -1).copy()), bits, k)
        sorted_codes = pack(codes.index_select(1, order), bits).reshape(n, groups, -1)
        b.CopyFrom(numpy_helper.from_array(sorted_codes.numpy(), b.name))
        # Layers fed the same input share GPTQ's Hessian and so its order (gate and up;
        # q, k and v are one fused node): one Gather serves them all.
        key = (inputs[0], order.numpy().tobytes())
        if key not in orders and _permute_producers(graph, inputs[0], order, initializers):
            orders[key] = inputs[0]  # down_proj: gate and up already give sorted columns
        inputs[0] = sorted_input(
            graph,
            nodes,
            orders,
            inputs[0],
            order.numpy(),
            order_name=f"{inputs[4]}.input_order",
            name=f"{node.name}/input_sorted",
        )
        inputs[4] = ""
        while inputs and not inputs[-1]:
            inputs.pop()
        del node.input[:]
        node.input.extend(inputs)
        nodes.append(node)
        changed += 1
    set_nodes(graph, nodes)
    return changed


def build_genai_bundle(
    packed_dir: Path,
    out_dir: Path,
    *,
    head: str = HEADS[0],
    accuracy_level: int = 4,
    work_dir: Path | None = None,
) -> dict[str, Any]:
    """Build the onnxruntime-genai bundle of the packed variant in ``packed_dir``.

    Writes ``model.onnx`` (+ ``model.onnx.data``), ``genai_config.json``, the tokenizer and
    the model's ``config.json`` and ``generation_config.json`` into ``out_dir``, once all
    of it is built. ``head`` is what the output head becomes (:data:`HEADS`) when the
    variant left it float (one quantized with ``quantize_head`` keeps its codes: "variant"),
    ``accuracy_level`` MatMulNBits' compute type (4: int8 activations, ONNX Runtime's fast
    CPU path; 0: float32, exact). Returns facts: ``genai_bytes``, ``nbits_layers`` (nodes),
    ``fused_layers`` (merged into another's node), ``act_order_layers``, ``bits``,
    ``block_size``, ``head``, ``accuracy_level``, ``desc_act``.
    """
    from unbottle.compression import trim_heap
    from unbottle.plugins.quantization.matmulnbits import (
        ACCURACY_LEVELS,
        fuse_matmuls_sharing_input,
        replace_matmuls,
    )

    require_genai("onnxruntime-genai bundle")
    if head not in HEADS:
        raise ConfigError(f"head: {head!r}; one of {', '.join(HEADS)}")
    if accuracy_level not in ACCURACY_LEVELS:
        raise ConfigError(f"accuracy_level: {accuracy_level}; one of {ACCURACY_LEVELS}")
    import onnx

    packed_dir, out_dir = Path(packed_dir), Path(out_dir)
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        checkpoint, built = Path(tmp) / "gptq", Path(tmp) / "genai"
        facts = write_gptq_checkpoint(packed_dir, checkpoint)
        for name in packed_dir.iterdir():  # the tokenizer: the builder copies it along
            if name.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
                shutil.copy2(name, checkpoint / name.name)
        meta = json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))
        options: dict[str, Any] = {
            "int4_accuracy_level": accuracy_level,
            "int4_block_size": meta["quantization_config"]["group_size"],
        }
        if facts["quantized_head"]:
            # The variant's own head codes (quantize_head), put in after the build; the
            # builder keeps the head float and the untied embedding table float.
            head = "variant"
            options.update(int4_nodes_to_exclude=[HEAD_NODE], shared_embeddings=False)
        elif head == "int8":
            # Asymmetric: the builder's symmetric int8 head leaves out the zero points its
            # shared embedding table reads (0.11.4).
            options.update(int4_algo_config="rtn_last", int4_is_symmetric=False)
        elif head == "int4":
            # The builder's default, as in its own int4 builds: a symmetric int4 head and a
            # float embedding table of its own (a shared int4 table fails to build in 0.11.4).
            options.update(shared_embeddings=False)
        else:
            # Not shared: 0.11.4 would point the embeddings at a quantized head that is
            # then not written.
            options.update(int4_nodes_to_exclude=[HEAD_NODE], shared_embeddings=False)
        if options["int4_block_size"] == -1:
            options["int4_block_size"] = 32
        log = io.StringIO()  # the builder prints and logs each step
        try:
            with logs_into(log), contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                from onnxruntime_genai.models.builder import create_model

                create_model(
                    None,
                    str(checkpoint),
                    str(built),
                    "int4",
                    "cpu",
                    str(Path(tmp) / "cache"),
                    **options,
                )
        except Exception as e:
            raise DataError(f"{packed_dir}: the onnxruntime-genai builder failed: {e}") from e
        trim_heap()  # the builder's model, freed: not under the graph loaded next
        graph = onnx.load(str(built / "model.onnx"))
        act_order = sort_act_order_groups(graph)
        if facts["quantized_head"]:
            head_layer = packed_head(packed_dir)
            weight = head_layer.dequantized_weight()
            replace_matmuls(graph, {HEAD: head_layer}, {HEAD: weight}, accuracy_level)
            del head_layer, weight
            trim_heap()  # the float head and its copies, before the graph is written
        drop_midpoint_zero_points(graph)
        fused = fuse_matmuls_sharing_input(graph)
        nbits = sum(node.op_type == "MatMulNBits" for node in graph.graph.node)
        (built / "model.onnx").unlink()
        (built / "model.onnx.data").unlink()
        onnx.save(
            graph,
            str(built / "model.onnx"),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location="model.onnx.data",
        )
        del graph
        # The model's, for readers; and its chat template, which transformers keeps in a
        # file of its own that the builder's copy of the tokenizer leaves out.
        for name in ("config.json", "generation_config.json", "chat_template.jinja"):
            if (packed_dir / name).is_file():
                shutil.copy2(packed_dir / name, built / name)
        out_dir.mkdir(parents=True, exist_ok=True)
        for path in built.iterdir():
            shutil.move(str(path), str(out_dir / path.name))
    return {
        "genai_bytes": sum(p.stat().st_size for p in out_dir.glob("model.onnx*")),
        "nbits_layers": nbits,
        "fused_layers": fused,
        "act_order_layers": act_order,
        "bits": meta["quantization_config"]["bits"],
        "block_size": meta["quantization_config"]["group_size"],
        "head": head,
        "accuracy_level": accuracy_level,
        "desc_act": facts["desc_act"],
    }


@contextlib.contextmanager
def logs_into(stream: io.StringIO) -> Iterator[None]:
    """Within the block, the root logger writes INFO and above into ``stream`` alone; after
    it, the root logger is as it was. onnxruntime's quantizer, which the builder imports,
    calls ``logging.basicConfig`` at INFO on import (a handler on stderr for the whole
    process) and logs a line per graph node it leaves alone: thousands on a real model."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    root.handlers = [logging.StreamHandler(stream)]  # basicConfig then adds none
    root.setLevel(logging.INFO)
    try:
        yield
    finally:
        root.handlers = handlers
        root.setLevel(level)


def drop_midpoint_zero_points(model: Any) -> int:
    """Remove the zero-point input of every ``MatMulNBits`` node whose zero points are all
    the midpoint of its grid (8 for int4, 128 for int8), which the operator assumes when
    it has none: the same products, without reading the zero points. Returns how many."""
    import numpy as np
    from onnx import numpy_helper

    graph = model.graph
    initializers = {i.name: i for i in graph.initializer}
    dropped = 0
    for node in graph.node:
        if (
            node.op_type != "MatMulNBits"
            or len(node.input) < 4
            or node.input[3] not in initializers
        ):
            continue
        attributes = {a.name: a.i for a in node.attribute}
        bits, n = attributes["bits"], attributes["N"]
        blocks = -(-attributes["K"] // attributes["block_size"])
        stored = numpy_helper.to_array(initializers[node.input[3]]).reshape(n, -1)  # uint8
        per_byte = 8 // bits
        values = np.stack([(stored >> (bits * i)) & ((1 << bits) - 1) for i in range(per_byte)], -1)
        if not (values.reshape(n, -1)[:, :blocks] == 1 << (bits - 1)).all():  # padding aside
            continue
        zero_points = node.input[3]
        if len(node.input) == 4:
            node.input.pop()
        else:
            node.input[3] = ""  # an absent optional input: g_idx and bias keep their places
        dropped += 1
        if not any(zero_points in other.input for other in graph.node):
            graph.initializer.remove(initializers.pop(zero_points))
    return dropped


#: Ops that act on each element alone: permuting their inputs' last axis permutes their
#: output's the same way.
_ELEMENTWISE = {"Mul", "Sigmoid", "QuickGelu", "Silu", "Gelu", "FastGelu", "Relu", "Tanh"}


def _permute_producers(graph: Any, tensor: str, order: Any, initializers: dict) -> bool:
    """Make ``tensor``'s last axis come out in ``order`` by permuting the output rows of
    the ``MatMulNBits`` nodes it is computed from elementwise (down_proj's input: the
    gate and up projections through the activation and their product), so no ``Gather``
    is needed. Returns False, changing nothing, where the graph is any other shape."""
    import numpy as np
    from onnx import helper, numpy_helper

    producer = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    if len(consumers.get(tensor, [])) != 1:  # only the layer that sorts its columns
        return False
    seen, matmuls, pending = set(), [], [tensor]
    while pending:
        node = producer.get(pending.pop())
        if node is None:
            return False  # a graph input
        if id(node) in seen:
            continue
        seen.add(id(node))
        if node.op_type == "MatMulNBits":
            matmuls.append(node)
        elif node.op_type in _ELEMENTWISE:
            for source in node.input:
                if source in initializers:
                    if np.prod(initializers[source].dims) > 1:  # a per-channel constant
                        return False
                else:
                    pending.append(source)
        else:
            return False
    # Nothing else may read what is being permuted.
    for node in graph.node:
        if id(node) not in seen or node.output[0] == tensor:
            continue
        if any(id(c) not in seen for out in node.output for c in consumers.get(out, [])):
            return False
    if not matmuls:
        return False
    rows = np.asarray(order)
    n = len(rows)
    for node in matmuls:
        if {a.name: helper.get_attribute_value(a) for a in node.attribute}["N"] != n:
            return False
    for node in matmuls:
        # B, scales, zero points, (g_idx), bias: every per-output tensor follows its row.
        for i, name in enumerate(node.input[1:], start=1):
            if not name or i == 4:
                continue
            init = initializers[name]
            array = numpy_helper.to_array(init)
            permuted = array.reshape(n, -1)[rows].reshape(array.shape)
            init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(permuted), name))
    return True
