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


class OnnxDynamicInt8:
    """Export to ONNX and quantize weights to int8 with ONNX Runtime."""

    name = "onnx-dynamic-int8"
    output_format = "onnx"

    class Config(StrategyConfig):
        per_channel: bool = True
        # The instruction set whose int8 kernels the quantized graph targets.
        isa: Literal["avx2", "avx512", "avx512_vnni", "arm64"] = "avx2"

    def __init__(self, config: Config) -> None:
        self.config = config

    def quantize(self, model_dir: Path, out_dir: Path, ctx: CompressContext) -> dict[str, float]:
        from optimum.onnxruntime import ORTModelForCausalLM, ORTQuantizer
        from optimum.onnxruntime.configuration import AutoQuantizationConfig

        make_config = getattr(AutoQuantizationConfig, self.config.isa)
        qconfig = make_config(is_static=False, per_channel=self.config.per_channel)
        with tempfile.TemporaryDirectory(dir=ctx.work_dir) as tmp:
            export_dir = Path(tmp) / "fp32"
            ORTModelForCausalLM.from_pretrained(
                model_dir, export=True, use_cache=True
            ).save_pretrained(export_dir)
            fp32_bytes = sum(p.stat().st_size for p in export_dir.glob("*.onnx*"))
            quantized_dir = Path(tmp) / "int8"
            ORTQuantizer.from_pretrained(export_dir).quantize(
                save_dir=quantized_dir, quantization_config=qconfig
            )
            for path in quantized_dir.iterdir():
                shutil.move(str(path), out_dir / path.name)
            for name in ("generation_config.json",):
                if (export_dir / name).is_file():
                    shutil.copy2(export_dir / name, out_dir / name)
        ctx.tokenizer.save_pretrained(out_dir)
        int8_bytes = sum(p.stat().st_size for p in Path(out_dir).glob("*.onnx*"))
        return {
            "onnx_fp32_bytes": fp32_bytes,
            "onnx_int8_bytes": int8_bytes,
            "size_ratio": int8_bytes / fp32_bytes,
        }


@hookimpl
def register_quantizers(register):
    register(OnnxDynamicInt8)
