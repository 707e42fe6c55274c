"""The training loop, for strategies that train (a distiller, a finetuning method).

:func:`train` runs unbottle's loop (optimizer and parallelism strategies from the
registry, warmup and cosine schedule, gradient clipping, progress) over the batches a
``next_batch(step)`` callback returns, minimising ``loss_fn(model, batch)`` (the model's
own loss by default); :class:`TrainParams` holds its settings (``steps``,
``batch_size``, ``seq_len``, ``lr``, ``warmup_steps``, ``weight_decay``, ``log_every``
and the rest of ``params.yaml``'s ``train`` section); :func:`get_registry` is the registry
of installed strategies it takes; :func:`rng` is a seeded ``torch.Generator`` for
drawing batches reproducibly. The built-in ``kd`` distiller
(``unbottle.plugins.distillation``) is an example.

For parallelism strategies that shard the model (``unbottle.plugins.model_parallel``):
:class:`Split` tells the memory estimate each process's share, :func:`stage_layers` how
decoder layers split over pipeline stages, :data:`IGNORE_INDEX` the label the loss skips.
For pretraining objectives: :func:`build_model`, the Llama decoder ``pretrain.model``
describes (what ``clm`` trains); :func:`encode_texts`, the token ids of a list of texts
(the tokenizer's call, without its overhead). :func:`progress_bar`: a rich progress bar
for a long loop of a strategy's own (quiet when the output is not a terminal);
:func:`is_main_process`: whether this process is the one that writes and reports (rank 0
under torchrun; every process of a run prepares and trains its own copy).
"""

from __future__ import annotations

from unbottle.core.config.schema import TrainParams
from unbottle.core.models.loading import build_model, encode_texts
from unbottle.core.progress import progress_bar
from unbottle.core.registry import get_registry
from unbottle.core.training.loop import IGNORE_INDEX, is_main_process, rng, train
from unbottle.core.training.memory import Split, stage_layers

__all__ = [
    "IGNORE_INDEX",
    "Split",
    "TrainParams",
    "build_model",
    "encode_texts",
    "get_registry",
    "is_main_process",
    "progress_bar",
    "rng",
    "stage_layers",
    "train",
]
