"""Interchange formats deploy targets write, for engines outside unbottle.

- compressed-tensors ``pack-quantized`` (vLLM's native format, and what transformers
  loads on CPU): :func:`write_compressed_tensors` rewrites a packed ``rtn``/``gptq``
  variant code for code; :data:`COMPRESSED_TENSORS` is the pinned requirement.
- GGUF (llama.cpp, Ollama): :func:`write_gguf` writes F16, Q8_0, or Q4_0/Q8_0 copied
  exactly from a symmetric group-32 variant (:data:`EXACT_GRIDS`) and Q4_1 from an int4
  group-32 one with zero points (:data:`ZERO_POINT_GRIDS`; :func:`exact_gguf_type` picks
  the type that holds a variant); :func:`check_writable` refuses, before any work, a
  variant or architecture the file cannot hold;
  :class:`LlamaCppRunner` runs a GGUF bundle in llama.cpp itself, for the evaluation
  metrics (:func:`require_llama_cpp`: the one-line refusal where llama-cpp-python is
  missing; :data:`LLAMA_CPP_INSTALL`: the line that installs it);
  :func:`quantize_gguf` quantizes a float GGUF file with llama.cpp's own types
  (:data:`LLAMA_CPP_QUANT_TYPES`), and :func:`write_quantized_gguf` writes a float model
  in one of them.
"""

from __future__ import annotations

from unbottle.core.models.compressed_checkpoint import (
    COMPRESSED_TENSORS,
    load_compressed_tensors,
    write_compressed_tensors,
)
from unbottle.core.models.gguf_writer import (
    EXACT_GRIDS,
    ZERO_POINT_GRIDS,
    check_writable,
    exact_gguf_type,
    write_gguf,
)
from unbottle.core.models.llama_cpp import (
    LLAMA_CPP_INSTALL,
    LLAMA_CPP_QUANT_TYPES,
    LlamaCppRunner,
    quantize_gguf,
    require_llama_cpp,
    write_quantized_gguf,
)

__all__ = [
    "COMPRESSED_TENSORS",
    "EXACT_GRIDS",
    "LLAMA_CPP_INSTALL",
    "LLAMA_CPP_QUANT_TYPES",
    "ZERO_POINT_GRIDS",
    "LlamaCppRunner",
    "check_writable",
    "exact_gguf_type",
    "load_compressed_tensors",
    "quantize_gguf",
    "require_llama_cpp",
    "write_compressed_tensors",
    "write_gguf",
    "write_quantized_gguf",
]
