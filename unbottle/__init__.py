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
    Objective,
    OptimizerStrategy,
    ParallelismStrategy,
    PretrainContext,
    Pruner,
    Quantizer,
    StrategyConfig,
)
from unbottle.core.training.loop import Batches

__version__ = "0.1.0"

__all__ = [
    "Batches",
    "CompressContext",
    "DeployContext",
    "DeployTarget",
    "Distiller",
    "EvalContext",
    "FinetuneMethod",
    "Metric",
    "Objective",
    "OptimizerStrategy",
    "ParallelismStrategy",
    "PretrainContext",
    "Pruner",
    "Quantizer",
    "StrategyConfig",
    "__version__",
    "hookimpl",
]
