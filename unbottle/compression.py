"""The compression toolkit: what unbottle's own Wanda, SparseGPT and GPTQ are built on, and all
a third-party pruner or quantizer needs (``examples/unbottle-awq`` is built on it alone).

- **The calibration pass** (:func:`calibrate_sequentially`): the calibration sequences run
  block by block through the decoder; each group of Linears that share an input is handed
  to the method with its statistics (:class:`InputStats`: token count, summed squares per
  input channel, on request the input Hessian X^T X and mean |x| per channel, and the
  module that feeds the group) once they are complete, and later layers see the
  compressed earlier ones. :func:`calibrated_linears` names the Linears it reaches;
  :func:`damped_hessian_factor` (dead inputs fixed, damped, retried with more damping,
  factored: a :class:`DampedHessian`), :func:`inverse_cholesky_factor` and
  :func:`one_thread` are what GPTQ and SparseGPT factor Hessians with.
- **Architecture mappings** (:data:`ARCHITECTURES`): per ``config.model_type``, where the
  decoder blocks are and which Linears share an input, in data-flow order, with the norm
  or projection that feeds each group (:class:`Architecture`, :class:`LayerGroup`,
  :func:`architecture_of`, :func:`feeder_of`). A new architecture is one entry there.
- **Finding layers**: :func:`find_linears` (by regex, never the output head;
  :data:`DEFAULT_LAYERS` selects a Llama block's seven projections), :func:`output_head`
  (the head, untied from the embeddings on request),
  :func:`decoder_blocks` (from the table) and :func:`find_decoder_blocks` (any model).
- **Grids and rounding**: :class:`Scheme`, :func:`fit_grid`, :func:`quantize_codes`,
  :func:`dequantize_codes`, :func:`clamp_codes`, :func:`quantize_rtn`,
  :class:`QuantizedWeight`, :func:`dequantize_groups`, :func:`weight_error`,
  :func:`check_group_size`; bit packing with :func:`pack` / :func:`unpack`.
- **The packed low-bit format**: :func:`save_packed` writes a model whose Linears are
  :class:`QuantizedWeight` codes (what the ``packed`` output format of a quantizer means;
  evaluation, serving and the ``server`` deploy target read it with
  :func:`load_packed`); :data:`QUANT_CONFIG` is its metadata file.
- **Sparsity masks and budgets**: :func:`parse_pattern`, :func:`nm_prune_mask`,
  :func:`row_prune_mask`, :func:`wanda_scores`, :func:`exact_counts`,
  :func:`spread_sparsities`, :func:`outlier_ratio`, :func:`smallest`.
- :func:`trim_heap`: hand what the process freed back to the OS (glibc keeps it), between
  a quantizer's own work and an export that allocates on top of it.
- :func:`load_model`, the float model and tokenizer a quantizer's ``model_dir`` holds,
  and the errors to raise: :class:`ConfigError` (bad options for this model: one line,
  the CLI exits 2) and :class:`DataError`.

Importing this module is cheap: torch is imported by the functions that use it.
"""

from __future__ import annotations

from typing import Any

from unbottle.core.compression.calibration import (
    InputStats,
    Process,
    ProcessTogether,
    calibrate_sequentially,
    calibrated_linears,
    inverse_cholesky_factor,
    one_thread,
)
from unbottle.core.compression.grids import (
    QuantizedWeight,
    Scheme,
    check_group_size,
    clamp_codes,
    dequantize_codes,
    dequantize_groups,
    fit_grid,
    pack,
    packed_length,
    quantize_codes,
    quantize_rtn,
    unpack,
    weight_error,
)
from unbottle.core.compression.hessian import DampedHessian, damped_hessian_factor
from unbottle.core.compression.mappings import (
    ARCHITECTURES,
    DEFAULT_LAYERS,
    Architecture,
    LayerGroup,
    architecture_of,
    decoder_blocks,
    feeder_of,
    find_decoder_blocks,
    find_linears,
    output_head,
)
from unbottle.core.compression.sparsity import (
    PATTERN_HELP,
    even_split,
    exact_counts,
    nm_prune_mask,
    outlier_ratio,
    parse_pattern,
    row_prune_mask,
    smallest,
    spread_sparsities,
    wanda_scores,
)
from unbottle.core.contract.errors import ConfigError, DataError
from unbottle.core.heap import trim_heap
from unbottle.core.models.loading import load_model, save_model
from unbottle.core.models.lowbit import (
    FORMAT,
    QUANT_CONFIG,
    load_packed,
    read_quantization_config,
    save_packed,
    write_quantization_config,
)


def __getattr__(name: str) -> Any:
    # ``QuantizedLinear``, the layer a packed model's quantized Linears load as, is a torch
    # module class built on first use (PEP 562), so it is not in ``__all__``.
    if name == "QuantizedLinear":
        from unbottle.core.models import lowbit

        return lowbit.QuantizedLinear
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ARCHITECTURES",
    "DEFAULT_LAYERS",
    "FORMAT",
    "PATTERN_HELP",
    "QUANT_CONFIG",
    "Architecture",
    "ConfigError",
    "DampedHessian",
    "DataError",
    "InputStats",
    "LayerGroup",
    "Process",
    "ProcessTogether",
    "QuantizedWeight",
    "Scheme",
    "architecture_of",
    "calibrate_sequentially",
    "calibrated_linears",
    "check_group_size",
    "clamp_codes",
    "damped_hessian_factor",
    "decoder_blocks",
    "dequantize_codes",
    "dequantize_groups",
    "even_split",
    "exact_counts",
    "feeder_of",
    "find_decoder_blocks",
    "find_linears",
    "fit_grid",
    "inverse_cholesky_factor",
    "load_model",
    "load_packed",
    "nm_prune_mask",
    "one_thread",
    "outlier_ratio",
    "output_head",
    "pack",
    "packed_length",
    "parse_pattern",
    "quantize_codes",
    "quantize_rtn",
    "read_quantization_config",
    "row_prune_mask",
    "save_model",
    "save_packed",
    "smallest",
    "spread_sparsities",
    "trim_heap",
    "unpack",
    "wanda_scores",
    "weight_error",
    "write_quantization_config",
]
