"""The plugin contract: one registration hook per kind of strategy, and lifecycle hooks.

Registration hooks (``register_*``) are made from the table of kinds
(:mod:`unbottle.core.contract.kinds`), one per kind of strategy, which documents each.
unbottle calls each once while it loads plugins and passes a ``register`` callback; an
implementation calls ``register(StrategyClass)`` for each strategy it provides. The host,
not the plugin, decides what a duplicate name means (it is an error naming both
providers). Strategies are then chosen by the ``name`` that params.yaml gives, never by
the order in which hooks ran.

A strategy is a small class with:

- ``name``: the string users write in params.yaml;
- ``Config``: a pydantic model (subclass of :class:`unbottle.StrategyConfig`) that
  validates the strategy's own options, so an unknown key or a value out of range fails
  before any work starts;
- a constructor taking that config, and the one method of its protocol in
  :mod:`unbottle.core.contract.strategies`.

Lifecycle hooks (``after_stage``, ``on_train_log``, ``register_commands``; the pattern of
kedro's ``after_node_run`` and llm's ``register_commands``) let a plugin watch a run
without changing it: experiment tracking (the built-in MLflow tracker,
:mod:`unbottle.plugins.mlflow_tracker`), notifications, extra commands. Every plugin that
implements one is called; return values are ignored. They run in the process that does
the work (under torchrun, on rank 0 only); an exception raised in one stops the run,
named by plugin like any plugin failure.

Hook arguments may be added in later versions, never renamed or removed; an
implementation may accept only the arguments it uses (pluggy passes them by name).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pluggy

from unbottle.core.contract.kinds import KINDS, Kind

if TYPE_CHECKING:
    import typer

PROJECT_NAME = "unbottle"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)

Register = Callable[[type[Any]], None]


def _registration_hook(kind: Kind) -> Callable[[Register], None]:
    """The hook specification of one kind: ``<kind.hook>(register)``, documented by the
    kind's entry in :data:`unbottle.core.contract.kinds.KINDS`."""

    def hook(register: Register) -> None:
        """Filled in from the kind's entry."""

    hook.__name__ = hook.__qualname__ = kind.hook
    hook.__doc__ = kind.doc
    hook.__module__ = __name__
    return hookspec(hook)


# One registration hook per kind of strategy, named and documented by the table of kinds
# (`register_parallelism`, `register_optimizers`, `register_pruners`, ...).
for _kind in KINDS.values():
    globals()[_kind.hook] = _registration_hook(_kind)
del _kind


@hookspec
def after_stage(stage: str, artifact_dir: Path, metrics: dict[str, Any]) -> None:
    """Called after a stage has written its output, by ``unbottle stage``, ``unbottle run``
    and ``dvc repro`` alike; not called for a stage that was skipped as up to date.

    - ``stage``: ``pretrain``, ``finetune``, ``compress``, ``evaluate`` or ``deploy``;
    - ``artifact_dir``: the stage's finished output directory (``artifacts/<stage>``). Its
      ``manifest.json`` holds the config, strategies, inputs and fingerprint; evaluate's
      holds ``evaluation.json`` (one row per variant) and ``report.md``;
    - ``metrics``: what the stage measured, as written to ``metrics/<stage>.json`` plus
      the timings (evaluate: ``{"variants": {name: row}}``).

    Treat the directory as read-only: the stage's fingerprint covers its files.
    """


@hookspec
def on_train_log(stage: str, step: int, metrics: dict[str, float]) -> None:
    """Called after every optimizer step of a training loop, on the main process.

    - ``stage``: what is training: ``pretrain``, ``finetune``, or ``distill`` (the ``kd``
      distiller inside compress);
    - ``step``: the optimizer step just finished, counted from 1 (a resumed run goes on
      from its checkpoint's step);
    - ``metrics``: ``loss`` (mean over the global batch), ``lr`` (the learning rate of the
      first parameter group) and ``tokens_per_s`` (since this run started).

    Keep it cheap or buffer: it runs inside the loop.
    """


@hookspec
def register_commands(cli: typer.Typer) -> None:
    """Add subcommands to the ``unbottle`` command line.

    Called once when the ``unbottle`` command starts, with its ``typer.Typer`` app;
    add commands with ``@cli.command()`` (or a group with ``cli.add_typer``). Import
    heavy libraries inside the command, so that ``unbottle --help`` stays fast. A plugin
    that fails to load is reported before any command runs
    (``UNBOTTLE_DISABLE_PLUGINS`` skips it).
    """
