"""The ``awq`` quantizer: AWQ (Lin et al., 2023) into unbottle's packed int4/int8 format.

Everything here comes from unbottle's public API (``unbottle`` and
``unbottle.compression``): the block-by-block calibration pass with mean |x| and the
input Hessian per layer group, the architecture table that names each group's feeder,
round-to-nearest on group grids, and the packed format's writer. The algorithm is in
:mod:`unbottle_awq.awq`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from unbottle import CompressContext, ConfigError, Regex, StrategyConfig, hookimpl
from unbottle.compression import DEFAULT_LAYERS, Scheme


class Awq:
    """Activation-aware scales, folded into the preceding norm or projection, then
    round-to-nearest onto int4/int8 group grids, stored packed."""

    name = "awq"
    output_format = "packed"

    class Config(StrategyConfig):
        bits: Literal[4, 8] = 4
        #: Input columns per group (the paper's 128); null: one grid per output channel.
        group_size: int | None = Field(128, ge=1)
        #: AWQ's grids have zero points; symmetric ones are allowed too.
        symmetric: bool = False
        #: After scaling, search each group's clipping range, weighted by each input
        #: channel's activation energy (AWQ's weight clipping, as in its reference code).
        clip_search: bool = True
        #: How many exponents alpha in [0, 1) the scale search tries (0, 1/grid, ...).
        grid: int = Field(20, ge=1)
        #: Which Linear layers to quantize (a regex over module names).
        layers: Regex = DEFAULT_LAYERS
        #: Calibration sequences per forward pass.
        batch_size: int = Field(8, ge=1)

        def scheme(self) -> Scheme:
            return Scheme(
                bits=self.bits,
                group_size=self.group_size,
                symmetric=self.symmetric,
                clip_search=self.clip_search,
            )

    def __init__(self, config: Config) -> None:
        self.config = config

    def quantize(self, model_dir: Path, out_dir: Path, ctx: CompressContext) -> dict[str, float]:
        from unbottle.compression import check_group_size, find_linears, load_model, save_packed
        from unbottle_awq.awq import awq_model

        c = self.config
        if not ctx.calibration:
            raise ConfigError(
                "compress.calibration.samples: 0 calibration samples; awq needs at least 1"
            )
        model, _ = load_model(model_dir)
        layers = find_linears(model, c.layers)
        if not layers:
            raise ConfigError(f"awq.layers: {c.layers!r} matches no Linear layer of the model")
        check_group_size(layers, c.scheme(), "awq")
        quantized, metrics = awq_model(
            model, ctx.calibration, layers, c.scheme(), grid=c.grid, batch_size=c.batch_size
        )
        facts = save_packed(
            model,
            ctx.tokenizer,
            quantized,
            out_dir,
            method=self.name,
            group_size=c.group_size,
            symmetric=c.symmetric,
            options=c.model_dump(mode="json"),
            source_dir=model_dir,
        )
        return {
            "bits": c.bits,
            "group_size": c.group_size or 0,  # 0: per output channel
            **facts,
            **metrics,
        }


@hookimpl
def register_quantizers(register: Any) -> None:
    register(Awq)
