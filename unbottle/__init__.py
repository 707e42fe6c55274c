"""unbottle: one reproducible LLM pipeline, pretrain -> finetune -> compress -> evaluate -> deploy.

What plugin authors import lives here; everything else is internal.
"""

from unbottle.core.contract.hookspecs import hookimpl
from unbottle.core.contract.strategies import (
    CompressContext,
    DeployContext,
    DeployTarget,
    Distiller,
    EvalContext,
    FinetuneMethod,
    Metric,
    OptimizerStrategy,
    ParallelismStrategy,
    Pruner,
    Quantizer,
    ReportColumn,
    StrategyConfig,
)

__version__ = "0.1.0"

__all__ = [
    "CompressContext",
    "DeployContext",
    "DeployTarget",
    "Distiller",
    "EvalContext",
    "FinetuneMethod",
    "Metric",
    "OptimizerStrategy",
    "ParallelismStrategy",
    "Pruner",
    "Quantizer",
    "ReportColumn",
    "StrategyConfig",
    "__version__",
    "hookimpl",
]
