"""The int4/int8 edge bundle: a packed variant as an ONNX graph of ``MatMulNBits`` layers.

ONNX Runtime's contrib op ``com.microsoft.MatMulNBits`` multiplies by a block-quantized
weight: for an (N, K) weight, ``B`` (uint8, (N, K / block_size, block_size * bits / 8))
holds the codes of each output row in blocks of ``block_size`` input columns, two 4-bit
codes to a byte with the first in the low nibble; ``scales`` (N * blocks) one scale per
block; ``zero_points`` (uint8, (N * ceil(blocks * bits / 8))) the zero points packed the
same way per row, or 2^(bits-1) when absent; the weight is (q - z) * s. That is the packed
format's own grid (core/models/lowbit.py: same codes, same nibble order, same per-row
packing of zero points), so the graph carries the variant's codes, scales and zero points
unchanged: a GPTQ result keeps GPTQ's quality and is not quantized again. ONNX Runtime
takes block sizes that are powers of two of at least 16 and, on CPU, bits 4 and 8.

Act-order groups (``g_idx``, GPTQ's ``desc_act``) are not contiguous columns. Columns
sorted by group are, so the codes are stored column-permuted and a ``Gather`` permutes
the layer's input the same way (x W^T = x[:, p] W[:, p]^T): the fast kernel runs, where
``MatMulNBits``' own ``g_idx`` input would take a slower dequantizing path.

How it is built: the variant is dequantized into a float model, exported with a KV cache
by optimum (the same export as the ``onnx`` deploy target), and each quantized Linear's
``MatMul`` (found by its node name, ``/model/layers.0/mlp/up_proj/MatMul``, and checked
to hold exactly the dequantized weight) is replaced by a ``MatMulNBits`` node fed by the
packed codes. The embeddings and the output head stay float, as in onnxruntime-genai's
own int4 builds.

Layers that read the same input (q, k and v; gate and up) become one ``MatMulNBits`` node
whose codes, scales and zero points are theirs stacked along the output axis, followed by
a ``Split`` (:func:`fuse_matmuls_sharing_input`): each output column is computed from its
own row alone, so the outputs are the same to the bit, with one kernel launch and one
activation quantization where there were several.

``accuracy_level`` is the op's compute type: 0 dequantizes to float32 (the torch packed
model's logits to float rounding), 4 quantizes each row's activations to int8 per block
and runs integer dot products (ONNX Runtime's fast CPU path; about 3x a float32 MatMul at
decode on SmolLM2's shapes, AVX2, with logits within about 1% of the float path). Rows
are quantized independently, so a row's result does not depend on its batch.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from unbottle import ConfigError, DataError

#: The weight widths ONNX Runtime's CPU MatMulNBits kernel runs (checked against ORT 1.32).
NBITS = (4, 8)
#: Compute types: 0 float32 (exact), 1 float32, 2 float16, 3 bfloat16, 4 int8 activations.
ACCURACY_LEVELS = (0, 1, 2, 3, 4)


def block_size_problem(group_size: int | None, in_features: int | None = None) -> str | None:
    """Why a grid with these groups cannot be a MatMulNBits block, or None when it can.

    Per-channel grids (``group_size`` None) are one block per row: ``in_features`` long.
    """
    block = group_size or in_features
    if block is None:
        return "per-channel grids (group_size null) need a power-of-two layer width"
    if block < 16 or block & (block - 1):
        what = f"group_size {group_size}" if group_size else f"a per-channel row of {block}"
        return f"{what} is not a power of two of at least 16 (MatMulNBits block sizes)"
    return None


def export_matmulnbits(
    packed_dir: Path,
    out_dir: Path,
    *,
    accuracy_level: int = 4,
    work_dir: Path | None = None,
) -> dict[str, Any]:
    """Write ``model.onnx`` (MatMulNBits layers), ``config.json`` and
    ``generation_config.json`` for the packed variant in ``packed_dir`` into ``out_dir``.

    The tokenizer is the caller's to save. Returns facts: ``onnx_nbits_bytes``,
    ``nbits_layers``, ``fused_layers`` (how many share a node with others),
    ``bits``, ``block_size``, ``accuracy_level``.
    """
    import onnx
    import torch

    from unbottle.compression import load_packed, read_quantization_config, save_model
    from unbottle.plugins.quantization import export_onnx

    packed_dir, out_dir = Path(packed_dir), Path(out_dir)
    meta = read_quantization_config(packed_dir)
    bits, group_size = int(meta["bits"]), meta["group_size"]
    if bits not in NBITS:
        raise ConfigError(
            f"{packed_dir}: int{bits} weights; MatMulNBits runs "
            f"{' or '.join(f'int{b}' for b in NBITS)}"
        )
    if accuracy_level not in ACCURACY_LEVELS:
        raise ConfigError(f"accuracy_level: {accuracy_level}; one of {ACCURACY_LEVELS}")
    model, tokenizer = load_packed(packed_dir, kernel="on-the-fly")
    layers = {name: model.get_submodule(name) for name in meta["modules"]}
    for name, layer in layers.items():
        problem = block_size_problem(group_size, layer.in_features)
        if problem:
            raise ConfigError(f"{packed_dir}: {name}: {problem}")

    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        # The float model the packed one stands for: optimum exports the graph around it.
        weights = {}
        with torch.no_grad():
            for name, layer in layers.items():
                weights[name] = layer.dequantized_weight()  # (out, in)
                linear = torch.nn.Linear(
                    layer.in_features, layer.out_features, bias=layer.bias is not None
                )
                linear.weight.copy_(weights[name])
                if layer.bias is not None:
                    linear.bias.copy_(layer.bias)
                model.set_submodule(name, linear)
        float_dir, export_dir = Path(tmp) / "float", Path(tmp) / "onnx"
        save_model(model, tokenizer, float_dir)
        del model
        export_dir.mkdir()
        export_onnx(float_dir, export_dir, int8=False, work_dir=Path(tmp))
        graph_model = onnx.load(str(export_dir / "model.onnx"))
        replace_matmuls(graph_model, layers, weights, accuracy_level)
        fused = fuse_matmuls_sharing_input(graph_model)
        graph_model.metadata_props.add(key="unbottle.quantization", value=str(meta["method"]))
        out_dir.mkdir(parents=True, exist_ok=True)
        onnx.save(graph_model, str(out_dir / "model.onnx"))
        for name in ("config.json", "generation_config.json"):
            if (export_dir / name).is_file():
                shutil.copy2(export_dir / name, out_dir / name)
    return {
        "onnx_nbits_bytes": (out_dir / "model.onnx").stat().st_size,
        "nbits_layers": len(layers),
        "fused_layers": fused,
        "bits": bits,
        "block_size": group_size or 0,
        "accuracy_level": accuracy_level,
    }


def _module_of(node: Any) -> str | None:
    """``/model/layers.0/mlp/up_proj/MatMul`` -> ``model.layers.0.mlp.up_proj``."""
    if node.op_type != "MatMul" or not node.name.endswith("/MatMul"):
        return None
    return node.name[1 : -len("/MatMul")].replace("/", ".")


def replace_matmuls(
    model: Any, layers: dict[str, Any], weights: dict[str, Any], accuracy_level: int
) -> None:
    """Replace the ``MatMul`` of each of ``layers`` (packed Linears by module name) in
    ``model`` by a ``MatMulNBits`` node holding its codes; each ``MatMul`` must multiply
    by exactly ``weights[name]`` (its dequantized (out, in) weight)."""
    import numpy as np
    import torch
    from onnx import helper, numpy_helper

    from unbottle.compression import pack, unpack

    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    nodes, replaced, dropped = [], set(), set()
    sorted_inputs: dict[tuple[str, bytes], str] = {}  # (input, column order): its Gather's
    for node in graph.node:
        name = _module_of(node)
        if name not in layers:
            nodes.append(node)
            continue
        layer, (x, w) = layers[name], node.input
        n, k, bits = layer.out_features, layer.in_features, layer.bits
        block = layer.group_size or k
        if w not in initializers or not np.array_equal(
            numpy_helper.to_array(initializers[w]), weights[name].t().numpy()
        ):
            raise DataError(f"ONNX export: {node.name} does not multiply by {name}'s weight")
        codes = unpack(layer.qweight, bits, k)  # (N, K) uint8
        if layer.g_idx is not None:
            g_idx = layer.g_idx.long()
            if not torch.equal(
                torch.bincount(g_idx, minlength=layer.groups), torch.full((layer.groups,), block)
            ):
                raise DataError(f"{name}: its g_idx groups are not {block} columns each")
            order = torch.argsort(g_idx, stable=True)  # (K,): columns sorted by group
            codes = codes.index_select(1, order)
            # Layers fed the same input share GPTQ's Hessian and so its order (q, k and v;
            # gate and up): one Gather serves them, and they can then share one node.
            x = sorted_input(
                graph,
                nodes,
                sorted_inputs,
                x,
                order.numpy(),
                order_name=f"{name}.input_order",
                name=f"{node.name[: -len('MatMul')]}input_sorted",
            )
        blocks = k // block
        tensors = {
            f"{name}.qweight": pack(codes, bits).reshape(n, blocks, block * bits // 8),
            f"{name}.scales": layer.scales.float().reshape(-1),  # (N * blocks,)
        }
        if layer.qzeros is not None:
            tensors[f"{name}.qzeros"] = layer.qzeros.reshape(-1)  # per row, packed like codes
        for key, tensor in tensors.items():
            graph.initializer.append(numpy_helper.from_array(tensor.contiguous().numpy(), key))
        nodes.append(
            helper.make_node(
                "MatMulNBits",
                [x, *tensors],
                list(node.output),
                name=f"{node.name}NBits",
                domain="com.microsoft",
                K=k,
                N=n,
                bits=bits,
                block_size=block,
                accuracy_level=accuracy_level,
            )
        )
        replaced.add(name)
        dropped.add(w)
    missing = sorted(set(layers) - replaced)
    if missing:
        raise DataError(f"ONNX export: no MatMul node found for {', '.join(missing)}")
    set_nodes(graph, nodes, dropped)
    if not any(op.domain == "com.microsoft" for op in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))


def fuse_matmuls_sharing_input(model: Any) -> int:
    """Merge the ``MatMulNBits`` nodes that read the same input with the same ``K``, bits,
    block size, compute type and inputs present into one node over their stacked rows,
    whose output a ``Split`` gives back as the original outputs (see the module
    docstring). Nodes with ``g_idx`` or a bias are left alone, and so is a graph of an
    opset before 13.

    Edits the ONNX ``model`` in place; returns how many nodes were merged into others.
    """
    import numpy as np
    from onnx import helper, numpy_helper

    graph = model.graph
    opset = next((op.version for op in model.opset_import if op.domain in ("", "ai.onnx")), 0)
    if opset < 13:  # Split takes its sizes as an input from opset 13 on
        return 0
    initializers = {init.name: init for init in graph.initializer}
    all_nodes = list(graph.node)  # one wrapper per node, so ids stay stable below

    def signature(node: Any) -> tuple | None:
        inputs = list(node.input)
        if node.op_type != "MatMulNBits" or len(inputs) > 4:  # g_idx or bias: not here
            return None
        if not all(name in initializers for name in inputs[1:] if name):
            return None
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        kept = tuple(sorted((k, v) for k, v in attributes.items() if k != "N"))
        return inputs[0], kept, tuple(bool(name) for name in inputs[1:])

    groups: dict[tuple, list[Any]] = {}
    for node in all_nodes:
        key = signature(node)
        if key is not None:
            groups.setdefault(key, []).append(node)
    replacement: dict[int, list[Any]] = {}  # the first member's id: the nodes in its place
    merged: set[int] = set()
    unstacked: set[str] = set()  # the members' own tensors, dropped once stacked
    for members in groups.values():
        if len(members) < 2:
            continue
        sizes = [
            {a.name: helper.get_attribute_value(a) for a in node.attribute}["N"] for node in members
        ]
        names = [node.name.rsplit("/", 2) for node in members]  # [parent, layer, op]
        parent = names[0][0] if all(len(n) == 3 and n[0] == names[0][0] for n in names) else ""
        fused = f"{parent}/{'+'.join(n[-2] for n in names)}/MatMulNBits"
        inputs = [members[0].input[0]]
        for slot, role in enumerate(("codes", "scales", "zero_points"), start=1):
            if slot >= len(members[0].input) or not members[0].input[slot]:
                inputs.append("")
                continue
            stacked = np.concatenate(
                [numpy_helper.to_array(initializers[node.input[slot]]) for node in members]
            )  # every per-output tensor is row-major in N: stacking stacks the rows
            inputs.append(f"{fused}.{role}")
            graph.initializer.append(numpy_helper.from_array(stacked, inputs[-1]))
        while not inputs[-1]:
            inputs.pop()
        attributes = {a.name: helper.get_attribute_value(a) for a in members[0].attribute}
        attributes["N"] = sum(sizes)
        split_sizes = f"{fused}.split_sizes"
        graph.initializer.append(
            numpy_helper.from_array(np.array(sizes, dtype=np.int64), split_sizes)
        )
        replacement[id(members[0])] = [
            helper.make_node(
                "MatMulNBits",
                inputs,
                [f"{fused}/output_0"],
                name=fused,
                domain="com.microsoft",
                **attributes,
            ),
            helper.make_node(
                "Split",
                [f"{fused}/output_0", split_sizes],
                [node.output[0] for node in members],
                name=f"{fused}/Split",
                axis=-1,
            ),
        ]
        merged |= {id(node) for node in members[1:]}
        unstacked |= {name for node in members for name in node.input[1:] if name}
    if not replacement:
        return 0
    nodes = []
    for node in all_nodes:
        if id(node) in merged:
            continue
        nodes.extend(replacement.get(id(node), [node]))
    set_nodes(graph, nodes, unstacked)
    return len(merged)


def sorted_input(
    graph: Any,
    nodes: list[Any],
    sorted_inputs: dict[tuple[str, bytes], str],
    source: str,
    order: Any,
    *,
    order_name: str,
    name: str,
) -> str:
    """``source`` with its last axis in ``order`` (an int64 (K,) array): a ``Gather``
    named ``name`` appended to ``nodes`` the first time a source and order are asked for,
    its output's name from ``sorted_inputs`` after that."""
    from onnx import helper, numpy_helper

    key = (source, order.tobytes())
    if key not in sorted_inputs:
        graph.initializer.append(numpy_helper.from_array(order, order_name))
        nodes.append(
            helper.make_node("Gather", [source, order_name], [name], f"{name}/Gather", axis=-1)
        )
        sorted_inputs[key] = name
    return sorted_inputs[key]


def set_nodes(graph: Any, nodes: list[Any], dropped: set[str] | None = None) -> None:
    """Make ``nodes`` the graph's nodes, and drop the initializers named in ``dropped``
    (every one, when None) that no node and no graph output reads any more."""
    graph.ClearField("node")
    graph.node.extend(nodes)
    still_used = {name for node in graph.node for name in node.input}
    still_used |= {output.name for output in graph.output}
    kept = [
        init
        for init in graph.initializer
        if init.name in still_used or (dropped is not None and init.name not in dropped)
    ]
    graph.ClearField("initializer")
    graph.initializer.extend(kept)
