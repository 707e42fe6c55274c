"""Built-in quantization: ``onnx-dynamic-int8`` (ONNX Runtime through optimum).

The model is exported to ONNX with optimum, then ONNX Runtime's dynamic quantization
stores every MatMul weight as int8 with a scale (per output channel by default);
activations are quantized on the fly at run time. The result is a real int8 model: its
file is about a quarter of the float export.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Literal

from unbottle import CompressContext, StrategyConfig, hookimpl

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


@hookimpl
def register_quantizers(register):
    register(OnnxDynamicInt8)


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
