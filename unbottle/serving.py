"""The serving engine, for deploy targets that build a bundle it runs.

:class:`ServeConfig` holds the server's options and is written to :data:`SERVE_CONFIG` in
a bundle; :data:`CHAT_TEMPLATE` is the chat template a bundle's tokenizer gets;
:func:`load_bundle` loads a bundle as the server would, and its ``engine()`` generates
with :class:`SamplingParams`; :class:`OnnxBackend` runs an ONNX bundle;
:func:`load_onnx_causal_lm` loads one in optimum, with the head size a pruned model's
config gives. The built-in
``server`` deploy target (``unbottle.plugins.deploy``) is an example.
"""

from __future__ import annotations

from unbottle.core.models.runtimes import head_size_is_its_own, load_onnx_causal_lm
from unbottle.core.serving.engine import (
    CHAT_TEMPLATE,
    SERVE_CONFIG,
    OnnxBackend,
    SamplingParams,
    ServeConfig,
    load_bundle,
)

__all__ = [
    "CHAT_TEMPLATE",
    "SERVE_CONFIG",
    "OnnxBackend",
    "SamplingParams",
    "ServeConfig",
    "head_size_is_its_own",
    "load_bundle",
    "load_onnx_causal_lm",
]
