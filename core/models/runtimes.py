"""Run a model variant through the runtime that will serve it: torch or ONNX Runtime.

Evaluation metrics talk to a :class:`ModelRunner`, so the same metric measures a float
safetensors model in torch and an int8 ONNX model in ONNX Runtime.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from unbottle.core.contract.errors import DataError

if TYPE_CHECKING:
    import torch


class WeightCounts(NamedTuple):
    """Stored weight elements, and how many are nonzero: over every weight matrix and
    embedding, and over the decoder's linear layers alone.

    The layers are what a pruner prunes: every matrix multiply but the output head, which
    pruners leave dense with the embeddings. Over all weights, SmolLM2 pruned to 50% by
    Wanda reads 39.7%, and the 2-layer demo model's magnitude 50% reads 42.9%: the dense
    embedding table dilutes it. A weight stored as an integer code counts as zero where its
    code is its zero point.
    """

    total: int
    nonzero: int
    layers: int
    layers_nonzero: int


class ModelRunner(Protocol):
    format: str
    context: int
    #: Where the weights live and the work runs: "cpu" or a torch device such as "cuda:0".
    device: str

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids -> (B, T, V) float32 logits."""
        ...

    def generate(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int, **kw: Any
    ) -> torch.Tensor:
        """Greedy decoding. Returns (B, T + new) ids: the prompt included, then the new
        tokens; a row stops at the model's end-of-sequence token (pass ``eos_token_id=None``
        to decode exactly ``max_new_tokens``), and finished rows are padded."""
        ...

    def parameter_counts(self) -> tuple[int, int]:
        """(stored weight elements, of which nonzero)."""
        ...

    # Optional, and unbottle's runners have it: ``weight_counts() -> WeightCounts``, the
    # same counts and the decoder's linear layers' (the size metric's ``layer_sparsity``).
    # Optional: ``bytes_per_token() -> int``, the bytes of weights a decoding step reads
    # (the roofline metric's; without it, counted from a torch model or an ONNX graph).
    # Optional: ``runtime: str``, where the figures come from in words, for a model card
    # ("llama.cpp (...)"); without it, the card names the runner's ``format``.


class CountsWeights:
    """``parameter_counts`` from a runner's ``weight_counts``."""

    def weight_counts(self) -> WeightCounts:
        raise NotImplementedError

    def parameter_counts(self) -> tuple[int, int]:
        counts = self.weight_counts()
        return counts.total, counts.nonzero


def model_format(model_dir: Path) -> str:
    """The format of a model directory: ``hf`` (float safetensors), ``packed`` (low-bit
    weights with ``quantization.json``, see core/models/lowbit.py), ``genai`` (an
    onnxruntime-genai bundle: ``genai_config.json`` next to its ONNX graph) or ``onnx``."""
    model_dir = Path(model_dir)
    if (model_dir / "genai_config.json").is_file():
        return "genai"
    if (model_dir / "model.safetensors").is_file():
        return "packed" if (model_dir / "quantization.json").is_file() else "hf"
    if list(model_dir.glob("*.onnx")):
        return "onnx"
    gguf = sorted(model_dir.glob("*.gguf"))
    if gguf:
        raise DataError(
            f"{model_dir}: a GGUF bundle ({gguf[0].name}), for llama.cpp and Ollama "
            f"(`unbottle serve {model_dir}` runs it in llama.cpp); here only hf, packed, "
            "onnx and genai directories are read"
        )
    raise DataError(f"{model_dir}: neither model.safetensors nor an .onnx model is there")


def load_onnx_causal_lm(model_dir: Path, file_name: str, **kwargs: Any) -> Any:
    """optimum's ``ORTModelForCausalLM`` for an ONNX bundle, with a Llama's head size from
    its config. optimum 2.1 sizes a Llama's empty KV cache with hidden_size / heads, which
    is not the head size of a model whose heads were pruned (structured pruning keeps
    ``config.head_dim``): its first step failed on the cache's shape."""
    from optimum.onnxruntime import ORTModelForCausalLM

    model = ORTModelForCausalLM.from_pretrained(model_dir, file_name=file_name, **kwargs)
    if head_size_is_its_own(model.config):
        model.embed_size_per_head = model.config.head_dim
    return model


def head_size_is_its_own(config: Any) -> bool:
    """Whether a config's ``head_dim`` differs from hidden_size / heads (heads pruned)."""
    head_dim = getattr(config, "head_dim", None)
    heads = getattr(config, "num_attention_heads", None)
    return bool(head_dim and heads) and head_dim != config.hidden_size // heads


def load_torch_model(model_dir: Path) -> tuple[Any, Any]:
    """(model, tokenizer) of a float ("hf") or packed model directory, in torch."""
    if model_format(model_dir) == "packed":
        from unbottle.core.models.lowbit import load_packed

        return load_packed(model_dir)
    from unbottle.core.models.loading import load_model

    return load_model(model_dir)


class TorchRunner(CountsWeights):
    """A float or packed model in torch (a packed one dequantizes in each forward)."""

    format = "hf"

    def __init__(self, model_dir: Path, device: str = "cpu") -> None:
        self.format = model_format(model_dir)
        self.model, self.tokenizer = load_torch_model(model_dir)
        self.model.to(device).eval()
        self.device = device
        self.context = int(self.model.config.max_position_embeddings)

    @classmethod
    def of_model(cls, model: Any, tokenizer: Any) -> TorchRunner:
        """A runner over a float model a stage holds in memory, where its weights are;
        the caller puts it in eval mode."""
        runner = cls.__new__(cls)
        runner.model, runner.tokenizer = model, tokenizer
        runner.device = str(next(model.parameters()).device)
        runner.context = int(model.config.max_position_embeddings)
        return runner

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        import torch

        with torch.inference_mode():
            return self.model(input_ids=input_ids.to(self.device)).logits.float().cpu()

    def generate(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int, **kw: Any
    ) -> torch.Tensor:
        import torch

        with torch.inference_mode():
            return self.model.generate(
                input_ids=input_ids.to(self.device),
                attention_mask=attention_mask.to(self.device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=self.tokenizer.pad_token_id,
                **kw,
            ).cpu()

    def weight_counts(self) -> WeightCounts:
        import torch

        params = list(self.model.parameters())
        total = sum(p.numel() for p in params)
        nonzero = sum(int(p.count_nonzero()) for p in params)
        head = self.model.get_output_embeddings()
        layers = layers_nonzero = 0
        for module in self.model.modules():
            if hasattr(module, "weight_counts"):
                # A packed layer's weight is not a parameter: count the weights it stands for.
                layer_total, layer_nonzero = module.weight_counts()
                total += layer_total
                nonzero += layer_nonzero
            elif isinstance(module, torch.nn.Linear):
                layer_total = module.weight.numel()
                layer_nonzero = int(module.weight.count_nonzero())
            else:
                continue
            if module is not head:
                layers += layer_total
                layers_nonzero += layer_nonzero
        return WeightCounts(total, nonzero, layers, layers_nonzero)


def onnx_threads() -> int:
    """Intra-op threads for an ONNX Runtime session that evaluation runs: as many as torch
    runs on in this process, so that every runtime in one evaluation table decodes on the
    same cores. Left to their defaults (ONNX Runtime: half the logical CPUs; onnxruntime-
    genai started one worker that outlived the model), both decoded SmolLM2's genai bundle
    at one thread's speed on a 2-core VM, 0.73x to 0.82x of two, while the float model
    ran on torch's two."""
    import torch

    return torch.get_num_threads()


class OnnxRunner(CountsWeights):
    format = "onnx"
    device = "cpu"  # ONNX Runtime's CPU execution provider

    def __init__(self, model_dir: Path) -> None:
        import onnxruntime as ort
        from transformers import AutoTokenizer

        files = sorted(Path(model_dir).glob("*.onnx"))
        self.path = files[0]
        options = ort.SessionOptions()
        options.intra_op_num_threads = onnx_threads()
        self.model = load_onnx_causal_lm(model_dir, self.path.name, session_options=options)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.context = int(self.model.config.max_position_embeddings)

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        import torch

        mask = torch.ones_like(input_ids)
        return self.model(input_ids=input_ids, attention_mask=mask).logits.float()

    def generate(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int, **kw: Any
    ) -> torch.Tensor:
        return self.model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=self.tokenizer.pad_token_id,
            **kw,
        )

    def weight_counts(self) -> WeightCounts:
        import onnx
        from onnx import numpy_helper

        graph = onnx.load(str(self.path)).graph
        arrays = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
        return _count_weights(graph, arrays)


#: The ONNX operators that multiply by a weight matrix.
_MATMULS = ("MatMul", "Gemm", "MatMulNBits", "MatMulInteger")


def _count_weights(graph: Any, arrays: dict[str, Any]) -> WeightCounts:
    """The weight counts of an ONNX graph with these initializers."""
    import numpy as np

    total = nonzero = layers = layers_nonzero = 0
    head = _output_head(graph)
    counted: set[str] = set()
    for index, node in enumerate(graph.node):
        if node.op_type not in _MATMULS or node.input[1] not in arrays:
            continue  # not a weight: activations, or a matrix computed in the graph
        if node.op_type == "MatMulNBits":  # a block-quantized weight: count what it holds
            codes, zeros = _nbits_codes(node, arrays)  # (N, blocks, block), (N, blocks, 1)
            size, nonzeros = codes.size, int(np.count_nonzero(codes != zeros))
            counted.update(node.input[1:])
        elif node.op_type == "MatMulInteger":
            # Dynamic int8: a weight (K, N) of codes, zero where a code is its column's
            # zero point (per channel (N,), or one for the matrix).
            codes = arrays[node.input[1]]
            zero = arrays.get(node.input[3]) if len(node.input) > 3 and node.input[3] else None
            size = codes.size
            nonzeros = int(np.count_nonzero(codes != (0 if zero is None else zero)))
            counted.add(node.input[1])
        elif node.input[1] in counted or arrays[node.input[1]].ndim < 2:
            continue  # one matrix multiplied in two places, or not a matrix
        else:
            weight = arrays[node.input[1]]
            size, nonzeros = weight.size, int(np.count_nonzero(weight))
            counted.add(node.input[1])
        total += size
        nonzero += nonzeros
        if index != head:
            layers += size
            layers_nonzero += nonzeros
    for name, array in arrays.items():
        # The embeddings and any other matrix: not scales or shapes.
        if array.ndim >= 2 and name not in counted:
            total += array.size
            nonzero += int(np.count_nonzero(array))
    return WeightCounts(total, nonzero, layers, layers_nonzero)


def _output_head(graph: Any) -> int | None:
    """The index of the node that multiplies by the output head: the matrix multiply
    nearest the logits, walking the graph back from them (through a cast, a bias, a
    scale). None when no matrix multiply leads to them."""
    outputs = [o.name for o in graph.output]
    start = "logits" if "logits" in outputs else outputs[0]
    nodes = list(graph.node)
    producer = {name: i for i, node in enumerate(nodes) for name in node.output}
    frontier, seen = [start], {start}
    # Breadth first: the head is a step or two from the logits, while a shape computation
    # feeding them may reach back to a decoder layer's multiply.
    while frontier:
        index = producer.get(frontier.pop(0))
        if index is None:
            continue
        if nodes[index].op_type in _MATMULS:
            return index
        for name in nodes[index].input:
            if name and name not in seen:
                seen.add(name)
                frontier.append(name)
    return None


def _nbits_codes(node: Any, arrays: dict[str, Any]) -> tuple[Any, Any]:
    """A ``MatMulNBits`` node's unsigned codes (N, blocks, block) and zero points
    (N, blocks, 1), unpacked (plugins/quantization/matmulnbits.py documents the layout)."""
    import numpy as np
    from onnx import helper

    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    n, k, bits, block = attrs["N"], attrs["K"], attrs["bits"], attrs["block_size"]
    blocks = -(-k // block)

    def unpack(packed: Any, count: int) -> Any:  # (rows, bytes) -> (rows, count) codes
        shifts = np.arange(0, 8, bits, dtype=np.uint8)
        codes = (packed[..., None] >> shifts) & (2**bits - 1)  # first code in the low bits
        return codes.reshape(packed.shape[0], -1)[:, :count]

    codes = unpack(arrays[node.input[1]].reshape(n * blocks, -1), block).reshape(n, blocks, block)
    if len(node.input) > 3 and node.input[3]:
        zeros = unpack(arrays[node.input[3]].reshape(n, -1), blocks)[..., None]
    else:
        zeros = np.full((n, blocks, 1), 2 ** (bits - 1), dtype=np.uint8)
    return codes, zeros


class GenaiRunner(CountsWeights):
    """An onnxruntime-genai bundle, run by its own generator (its C++ decoding loop).

    ``weight_counts`` reads the same graph as :class:`OnnxRunner`'s; ``path`` is the
    graph, for the bytes-per-token count of the roofline metric.
    """

    format = "genai"
    device = "cpu"

    def __init__(self, model_dir: Path) -> None:
        import json

        try:
            import onnxruntime_genai as og
        except ImportError:
            from unbottle.core.contract.errors import ConfigError

            raise ConfigError(
                f"{model_dir}: an onnxruntime-genai bundle needs onnxruntime-genai: "
                "`pip install 'onnxruntime-genai==0.11.4' onnx-ir`"
            ) from None
        from transformers import AutoTokenizer

        self._og = og
        self.path = Path(model_dir) / "model.onnx"
        config = json.loads((Path(model_dir) / "genai_config.json").read_text(encoding="utf-8"))
        genai_config = og.Config(str(model_dir))
        options = config["model"]["decoder"].get("session_options", {})
        if "intra_op_num_threads" not in options:  # a bundle that names its threads keeps them
            threads = {"intra_op_num_threads": onnx_threads()}
            genai_config.overlay(json.dumps({"model": {"decoder": {"session_options": threads}}}))
        self.model = og.Model(genai_config)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.context = int(config["model"]["context_length"])
        self.pad_token_id = int(config["model"].get("pad_token_id", 0))

    def _generator(self, ids: Any, max_length: int, min_length: int = 0) -> Any:
        import numpy as np

        params = self._og.GeneratorParams(self.model)
        params.set_search_options(
            max_length=max_length, min_length=min_length, batch_size=ids.shape[0], do_sample=False
        )
        generator = self._og.Generator(self.model, params)
        generator.append_tokens(ids.numpy().astype(np.int32))  # (B, T): the prefill
        return generator

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        import numpy as np
        import torch

        # A full-context window generates nothing after it: max_length may not exceed it.
        generator = self._generator(input_ids, min(input_ids.shape[1] + 1, self.context))
        return torch.from_numpy(np.array(generator.get_output("logits"))).float()  # (B, T, V)

    def generate(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int, **kw: Any
    ) -> torch.Tensor:
        """Greedy decoding by genai's generator; ``eos_token_id=None`` or
        ``min_new_tokens`` force that many tokens, ``streamer`` gets the prompt, then each
        step's tokens. A left-padded batch is generated row by row without its padding
        (genai reads no padding mask) and comes back as the other runners return it: the
        (B, T) prompt as given, then each row's new tokens from column T on."""
        import torch

        if not bool(attention_mask.all()):
            width = input_ids.shape[1]
            new = []
            for ids, mask in zip(input_ids, attention_mask, strict=True):
                own = ids[mask.bool()][None]  # (1, n): the row without its padding
                row = self.generate(own, torch.ones_like(own), max_new_tokens, **kw)
                new.append(row[0, own.shape[1] :])
            out = torch.full((len(new), width + max(len(n) for n in new)), self.pad_token_id)
            out[:, :width] = input_ids
            for i, tokens in enumerate(new):
                out[i, width : width + len(tokens)] = tokens
            return out.long()
        length = input_ids.shape[1] + max_new_tokens
        forced = max_new_tokens if kw.get("eos_token_id", 0) is None else 0
        forced = max(forced, int(kw.get("min_new_tokens") or 0))
        generator = self._generator(input_ids, length, input_ids.shape[1] + forced)
        streamer = kw.get("streamer")
        if streamer is not None:
            streamer.put(input_ids)
        while not generator.is_done():
            generator.generate_next_token()
            if streamer is not None:
                streamer.put(torch.from_numpy(generator.get_next_tokens().copy()))
        rows = [torch.from_numpy(generator.get_sequence(i).copy()) for i in range(len(input_ids))]
        out = torch.full((len(rows), max(len(r) for r in rows)), self.pad_token_id)
        for i, r in enumerate(rows):
            out[i, : len(r)] = r
        return out.long()

    def weight_counts(self) -> WeightCounts:
        import math

        import numpy as np
        import onnx
        from onnx import helper, numpy_helper

        # onnx (and onnx_ir) refuse external data with several hard links, and the stages
        # hard-link artifacts: read the weights file's ranges directly.
        graph = onnx.load(str(self.path), load_external_data=False).graph
        arrays = {}
        for init in graph.initializer:
            if init.data_location != onnx.TensorProto.EXTERNAL:
                arrays[init.name] = numpy_helper.to_array(init)
                continue
            where = {entry.key: entry.value for entry in init.external_data}
            dtype = helper.tensor_dtype_to_np_dtype(init.data_type)
            flat = np.fromfile(
                self.path.parent / where["location"],
                dtype=dtype,
                count=math.prod(init.dims),
                offset=int(where.get("offset", 0)),
            )
            arrays[init.name] = flat.reshape(tuple(init.dims))
        return _count_weights(graph, arrays)


def load_runner(model_dir: Path, device: str = "cpu") -> ModelRunner:
    """The runner for a model directory; torch models go to ``device``, ONNX runs on CPU."""
    fmt = model_format(model_dir)
    if fmt == "genai":
        return GenaiRunner(model_dir)
    return OnnxRunner(model_dir) if fmt == "onnx" else TorchRunner(model_dir, device)
