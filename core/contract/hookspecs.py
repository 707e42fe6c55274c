"""The plugin contract: one hook per kind of strategy.

Every hook is a *registration* hook, one per kind of strategy, made from the table of
kinds (:mod:`unbottle.core.contract.kinds`), which documents each. unbottle calls it
once while it loads plugins and passes a ``register`` callback; an implementation calls
``register(StrategyClass)`` for each strategy it provides. The host, not the plugin,
decides what a duplicate name means (it is an error naming both providers). Strategies
are then chosen by the ``name`` that params.yaml gives, never by the order in which
hooks ran.

A strategy is a small class with:

- ``name``: the string users write in params.yaml;
- ``Config``: a pydantic model (subclass of :class:`unbottle.StrategyConfig`) that
  validates the strategy's own options, so an unknown key or a value out of range fails
  before any work starts;
- a constructor taking that config, and the one method of its protocol in
  :mod:`unbottle.core.contract.strategies`.

Hook arguments may be added in later versions, never renamed or removed; an
implementation may accept only the arguments it uses (pluggy passes them by name).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy

from unbottle.core.contract.kinds import KINDS, Kind

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
