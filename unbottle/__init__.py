"""unbottle: one reproducible LLM pipeline, pretrain -> finetune -> compress -> evaluate -> deploy.

What plugin authors import lives here and in the public modules ``unbottle.compression``
(the compression toolkit), ``unbottle.training``, ``unbottle.evaluation``,
``unbottle.serving`` and ``unbottle.export``; everything under ``unbottle.core`` is
internal.
"""

from unbottle.core.contract.errors import ConfigError, DataError
from unbottle.core.contract.hookspecs import hookimpl
from unbottle.core.contract.strategies import (
    CompressContext,
    DataSplit,
    DeployContext,
    DeployTarget,
    Distiller,
    EvalContext,
    FinetuneMethod,
    Metric,
    ModelParallelStrategy,
    Objective,
    OptimizerStrategy,
    ParallelismStrategy,
    PretrainContext,
    Pruner,
    Quantizer,
    Regex,
    ReportColumn,
    StrategyConfig,
)
from unbottle.core.data.corpus import Corpus
from unbottle.core.models.runtimes import ModelRunner
from unbottle.core.training.loop import Batches

__version__ = "0.1.0"

__all__ = [
    "Batches",
    "CompressContext",
    "ConfigError",
    "Corpus",
    "DataError",
    "DataSplit",
    "DeployContext",
    "DeployTarget",
    "Distiller",
    "EvalContext",
    "FinetuneMethod",
    "Metric",
    "ModelParallelStrategy",
    "ModelRunner",
    "Objective",
    "OptimizerStrategy",
    "ParallelismStrategy",
    "PretrainContext",
    "Pruner",
    "Quantizer",
    "Regex",
    "ReportColumn",
    "StrategyConfig",
    "__version__",
    "hookimpl",
]
