"""Built-in quantization: ``rtn`` and ``gptq`` (packed low-bit weights), ``onnx-dynamic-int8``.

- ``rtn``: weight-only round-to-nearest, int4 or int8, per output channel or per group
  of input columns, symmetric or with zero points, optionally with a clipping search
  (``unbottle.compression``).
- ``gptq``: GPTQ (Frantar et al., 2022), the same grids, each layer quantized to keep
  its outputs on calibration data, block by block (``plugins/quantization/gptq.py``).

Both write the ``packed`` format (``unbottle.compression.save_packed``): the integer codes
packed into uint8 in safetensors with float16 scales and packed zero points; evaluation and
the ``server`` deploy target load it through ``QuantizedLinear``. With ``runtime: onnx``
they write the int4/int8 edge bundle instead: an ONNX graph whose Linear layers are ONNX
Runtime ``MatMulNBits`` nodes carrying the same codes, scales and zero points
(``plugins/quantization/matmulnbits.py``), evaluated and served in ONNX Runtime.

- ``onnx-dynamic-int8``: the model is exported to ONNX with optimum, then ONNX Runtime's
  dynamic quantization stores every MatMul weight as int8 with a scale (per output
  channel by default); activations are quantized on the fly at run time. The result is a
  real int8 model: its file is about a quarter of the float export.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from unbottle import CompressContext, ConfigError, Regex, StrategyConfig, hookimpl
from unbottle.compression import DEFAULT_LAYERS, Scheme

# The instruction sets whose int8 kernels ONNX Runtime's quantizer can target.
ISA = Literal["avx2", "avx512", "avx512_vnni", "arm64"]


class OnnxDynamicInt8:
    """Export to ONNX and quantize weights to int8 with ONNX Runtime."""

    name = "onnx-dynamic-int8"
    output_format = "onnx"

    class Config(StrategyConfig):
        per_channel: bool = True
        # The instruction set whose int8 kernels the quantized graph targets.
        isa: ISA = "avx2"

    def __init__(self, config: Config) -> None:
        self.config = config

    def quantize(self, model_dir: Path, out_dir: Path, ctx: CompressContext) -> dict[str, float]:
        facts = export_onnx(
            model_dir,
            out_dir,
            int8=True,
            per_channel=self.config.per_channel,
            isa=self.config.isa,
            work_dir=ctx.work_dir,
        )
        ctx.tokenizer.save_pretrained(out_dir)
        return facts


class WeightOnlyConfig(StrategyConfig):
    """The grid options ``rtn`` and ``gptq`` share."""

    bits: Literal[4, 8] = 4
    #: Input columns per group; null: one grid per output channel.
    group_size: int | None = Field(None, ge=1)
    #: Symmetric grids (zero point 2^(bits-1), not stored) or one zero point per group.
    symmetric: bool = False
    #: Search, per group, the shrink of the min/max range with the least squared error
    #: (rtn: of the weights; gptq: weighted per input by its activation energy, H_jj).
    clip_search: bool = False
    #: Which Linear layers to quantize (a regex over module names); it never selects the
    #: output head (see quantize_head), and the embeddings always stay float.
    layers: Regex = DEFAULT_LAYERS
    #: Quantize the output head too, by the same method and grid. A head tied to the
    #: embeddings is untied: the embedding table stays float (a step reads one row of it).
    #: On SmolLM2 the head is a fifth of the weights: GPTQ quantizes it for x1.009
    #: perplexity where round-to-nearest costs x1.16 (BENCHMARKS.md).
    quantize_head: bool = False
    #: Where the variant runs: ``torch`` (the packed safetensors format, unbottle's loader),
    #: ``onnx`` (an ONNX Runtime graph with MatMulNBits layers holding the same codes) or
    #: ``genai`` (onnxruntime-genai's graph and generator with the same codes, an int8
    #: output head unless quantize_head; the ``genai`` extra, plugins/quantization/genai.py).
    runtime: Literal["torch", "onnx", "genai"] = "torch"
    #: With runtime onnx or genai: MatMulNBits' compute type, 0 (float32, exact) to 4
    #: (int8 activations, ONNX Runtime's fast CPU path).
    accuracy_level: int = Field(4, ge=0, le=4)

    @model_validator(mode="after")
    def _onnx_blocks(self) -> WeightOnlyConfig:
        from unbottle.plugins.quantization.matmulnbits import block_size_problem

        problem = self.group_size and block_size_problem(self.group_size)
        if self.runtime in ("onnx", "genai") and problem:
            raise ValueError(f"runtime {self.runtime}: {problem}")
        return self

    def scheme(self) -> Scheme:
        return Scheme(
            bits=self.bits,
            group_size=self.group_size,
            symmetric=self.symmetric,
            clip_search=self.clip_search,
        )


def write_weight_only(
    config: WeightOnlyConfig, out_dir: Path, ctx: CompressContext, write_packed: Any
) -> dict[str, Any]:
    """``write_packed(dir)`` quantizes and writes the packed variant and returns its facts;
    with ``runtime: onnx`` or ``genai`` it goes to a temporary directory and ``out_dir``
    gets the bundle exported from it.

    ``write_packed`` loads the float model itself, so that it and the codes are freed when
    it returns, before the export, which reads the packed files only. On SmolLM2 the
    compress stage peaked at 4.7 GB when they stayed alive through onnxruntime-genai's
    build.
    """
    if config.runtime == "torch":
        return write_packed(out_dir)
    from unbottle.compression import trim_heap
    from unbottle.plugins.quantization.genai import build_genai_bundle, require_genai
    from unbottle.plugins.quantization.matmulnbits import export_matmulnbits

    if config.runtime == "genai":
        require_genai(f"{ctx.where or 'compress'}.runtime")  # before the quantizing
    export = build_genai_bundle if config.runtime == "genai" else export_matmulnbits
    with tempfile.TemporaryDirectory(dir=ctx.work_dir) as tmp:
        facts = write_packed(Path(tmp))
        trim_heap()  # hand what the quantizing freed back to the OS before the export grows
        facts.update(
            export(Path(tmp), out_dir, accuracy_level=config.accuracy_level, work_dir=ctx.work_dir)
        )
    ctx.tokenizer.save_pretrained(out_dir)
    return facts


def save_quantized(
    method: str,
    config: WeightOnlyConfig,
    model: Any,
    quantized: dict[str, Any],
    model_dir: Path,
    out_dir: Path,
    ctx: CompressContext,
) -> dict[str, Any]:
    """Write a weight-only variant in the packed format and return the facts every
    weight-only quantizer reports: bits, group size, what was written."""
    from unbottle.compression import save_packed

    facts = save_packed(
        model,
        ctx.tokenizer,
        quantized,
        out_dir,
        method=method,
        group_size=config.group_size,
        symmetric=config.symmetric,
        options=config.model_dump(mode="json"),
        source_dir=model_dir,
    )
    return {
        "bits": config.bits,
        "group_size": config.group_size or 0,  # 0: per output channel
        **facts,
    }


def _selected_linears(
    model: Any, config: WeightOnlyConfig, what: str, *, untie: bool = False
) -> list:
    """The Linears ``config.layers`` names (and the head with ``quantize_head``, untied
    from the embeddings with ``untie``), checked to fit the grid (a weightless copy of the
    model will do)."""
    from unbottle.compression import check_group_size, find_linears, output_head

    layers = find_linears(model, config.layers)
    if not layers:
        raise ConfigError(f"{what}.layers: {config.layers!r} matches no Linear layer of the model")
    if config.quantize_head:
        layers.append(output_head(model, untie=untie))
    check_group_size(layers, config.scheme(), what)
    return layers


def _check_model(model: Any, config: WeightOnlyConfig, where: str) -> None:
    """Refuse, before any work, a selection the grid or the runtime's format cannot hold."""
    layers = _selected_linears(model, config, where)
    if config.runtime == "genai":
        from unbottle.plugins.quantization.genai import genai_problem

        meta = {"bits": config.bits, "group_size": config.group_size}
        shapes = {name: (m.out_features, m.in_features) for name, m in layers}
        problem = genai_problem(meta, shapes)
        if problem:
            raise ConfigError(f"{where}.runtime: genai: {problem}")


def _load_and_select(model_dir: Path, config: WeightOnlyConfig, what: str) -> tuple[Any, list]:
    """The float model and the Linears to quantize, checked before any work."""
    from unbottle.compression import load_model

    model, _ = load_model(model_dir)
    return model, _selected_linears(model, config, what, untie=True)


class RoundToNearest:
    """Weight-only round-to-nearest onto int4/int8 grids, stored packed."""

    name = "rtn"
    output_format = "packed"
    Config = WeightOnlyConfig

    def __init__(self, config: WeightOnlyConfig) -> None:
        self.config = config
        self.output_format = {"torch": "packed"}.get(config.runtime, config.runtime)

    def check_model(self, model: Any, where: str) -> None:
        _check_model(model, self.config, where)

    def quantize(self, model_dir: Path, out_dir: Path, ctx: CompressContext) -> dict[str, float]:
        return write_weight_only(
            self.config, out_dir, ctx, lambda packed_dir: self._write(model_dir, packed_dir, ctx)
        )

    def _write(self, model_dir: Path, out_dir: Path, ctx: CompressContext) -> dict[str, Any]:
        import torch

        from unbottle.compression import quantize_rtn, weight_error

        c = self.config
        model, layers = _load_and_select(model_dir, c, ctx.where or self.name)
        scheme = c.scheme()
        with torch.no_grad():
            quantized = {name: quantize_rtn(linear.weight, scheme) for name, linear in layers}
            errors = [
                weight_error(linear.weight, quantized[name].dequantize()) for name, linear in layers
            ]
        return {
            **save_quantized(self.name, c, model, quantized, model_dir, out_dir, ctx),
            "mean_weight_error": sum(errors) / len(errors),
        }


class Gptq:
    """GPTQ (Frantar et al., 2022) onto int4/int8 grids, stored packed."""

    name = "gptq"
    output_format = "packed"

    class Config(WeightOnlyConfig):
        #: The clipping search, weighted by each input's activation energy (H_jj).
        clip_search: bool = True
        #: Quantize input columns in order of decreasing activation energy (desc_act).
        act_order: bool = True
        #: With act_order and groups: fit group grids up front on contiguous columns
        #: (no g_idx, so dequantizing is cheaper) instead of in activation order.
        static_groups: bool = False
        #: Dampening added to the Hessian's diagonal, a fraction of its mean.
        damp: float = Field(0.01, gt=0, lt=1)
        #: Columns per lazy batch update.
        block_size: int = Field(128, ge=1)
        #: Calibration sequences per forward pass of the block-by-block pass.
        batch_size: int = Field(8, ge=1)

    def __init__(self, config: Config) -> None:
        self.config = config
        self.output_format = {"torch": "packed"}.get(config.runtime, config.runtime)

    def check_model(self, model: Any, where: str) -> None:
        _check_model(model, self.config, where)

    def quantize(self, model_dir: Path, out_dir: Path, ctx: CompressContext) -> dict[str, float]:
        if not ctx.calibration:
            raise ConfigError(
                "compress.calibration.samples: 0 calibration samples; gptq needs at least 1"
            )
        return write_weight_only(
            self.config, out_dir, ctx, lambda packed_dir: self._write(model_dir, packed_dir, ctx)
        )

    def _write(self, model_dir: Path, out_dir: Path, ctx: CompressContext) -> dict[str, Any]:
        from unbottle.plugins.quantization.gptq import gptq_model

        c = self.config
        model, layers = _load_and_select(model_dir, c, ctx.where or self.name)
        quantized, metrics = gptq_model(
            model,
            ctx.calibration,
            layers,
            c.scheme(),
            act_order=c.act_order,
            static_groups=c.static_groups,
            damp=c.damp,
            block_size=c.block_size,
            batch_size=c.batch_size,
        )
        return {
            **save_quantized(self.name, c, model, quantized, model_dir, out_dir, ctx),
            **metrics,
        }


@hookimpl
def register_quantizers(register):
    register(OnnxDynamicInt8)
    register(RoundToNearest)
    register(Gptq)


def export_onnx(
    model_dir: Path,
    out_dir: Path,
    *,
    int8: bool,
    per_channel: bool = True,
    isa: ISA = "avx2",
    work_dir: Path | None = None,
) -> dict[str, float]:
    """Export a Hugging Face-format model to ONNX with a KV cache, optionally dynamic int8.

    Writes the ``.onnx`` graph (``model.onnx`` for float, ``model_quantized.onnx`` for
    int8), ``config.json`` and ``generation_config.json`` into ``out_dir``; the tokenizer is
    the caller's to save. The compress stage's ``onnx-dynamic-int8`` quantizer and the
    ``onnx`` deploy target both come through here, so the two produce the same graph.
    """
    from optimum.onnxruntime import ORTModelForCausalLM, ORTQuantizer
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        export_dir = Path(tmp) / "fp32"
        ORTModelForCausalLM.from_pretrained(model_dir, export=True, use_cache=True).save_pretrained(
            export_dir
        )
        fp32_bytes = sum(p.stat().st_size for p in export_dir.glob("*.onnx*"))
        if not int8:
            for path in export_dir.iterdir():
                shutil.move(str(path), Path(out_dir) / path.name)
            return {"onnx_fp32_bytes": fp32_bytes}
        qconfig = getattr(AutoQuantizationConfig, isa)(is_static=False, per_channel=per_channel)
        quantized_dir = Path(tmp) / "int8"
        ORTQuantizer.from_pretrained(export_dir).quantize(
            save_dir=quantized_dir, quantization_config=qconfig
        )
        for path in quantized_dir.iterdir():
            shutil.move(str(path), Path(out_dir) / path.name)
        for name in ("generation_config.json",):
            if (export_dir / name).is_file():
                shutil.copy2(export_dir / name, Path(out_dir) / name)
    int8_bytes = sum(p.stat().st_size for p in Path(out_dir).glob("*.onnx*"))
    return {
        "onnx_fp32_bytes": fp32_bytes,
        "onnx_int8_bytes": int8_bytes,
        "size_ratio": int8_bytes / fp32_bytes,
    }
