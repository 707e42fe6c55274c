"""Loads strategy plugins from the ``unbottle`` entry-point group and indexes them.

Built-in strategies come through the same group as third-party ones (see pyproject.toml),
so ``unbottle plugins`` shows both the same way. A plugin that fails to import is
reported by name and distribution; ``UNBOTTLE_DISABLE_PLUGINS=a,b`` skips plugins by
entry-point or distribution name, so a broken plugin never locks a user out.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from importlib.metadata import EntryPoint, entry_points
from types import TracebackType
from typing import Any

import pluggy
from pydantic import BaseModel

from unbottle.core.contract import hookspecs
from unbottle.core.contract.errors import PluginError, UnknownStrategyError
from unbottle.core.contract.kinds import KINDS

ENTRY_POINT_GROUP = "unbottle"
DISABLE_ENV = "UNBOTTLE_DISABLE_PLUGINS"


@dataclass(frozen=True)
class StrategyInfo:
    """One registered strategy and where it came from."""

    kind: str
    name: str
    cls: type[Any]
    plugin: str
    distribution: str
    version: str

    @property
    def provider(self) -> str:
        return f"plugin '{self.plugin}' ({self.distribution} {self.version})"


@dataclass(frozen=True)
class LoadedPlugin:
    """One plugin module, loaded from an entry point."""

    name: str
    module: str
    distribution: str
    version: str

    def describe(self) -> str:
        return f'plugin "{self.name}" ({self.distribution} {self.version})'


class Registry:
    """Every installed strategy, by kind and name, and the plugins' lifecycle hooks."""

    def __init__(self, plugin_manager: pluggy.PluginManager | None = None) -> None:
        self._strategies: dict[str, dict[str, StrategyInfo]] = {kind: {} for kind in KINDS}
        self.plugins: list[LoadedPlugin] = []
        if plugin_manager is None:
            plugin_manager = pluggy.PluginManager(hookspecs.PROJECT_NAME)
            plugin_manager.add_hookspecs(hookspecs)
        self._pm = plugin_manager

    @property
    def hook(self) -> Any:
        """The lifecycle hooks of every loaded plugin: ``registry.hook.after_stage(...)``."""
        return self._pm.hook

    def lifecycle_hooks(self) -> list[tuple[str, LoadedPlugin]]:
        """(hook name, plugin) for every lifecycle hook a loaded plugin implements."""
        registration = set(KINDS.values())
        found = []
        for plugin in self.plugins:
            module = self._pm.get_plugin(plugin.name)
            for caller in self._pm.get_hookcallers(module) or []:
                if caller.name not in registration:
                    found.append((caller.name, plugin))
        return sorted(found, key=lambda item: (item[0], item[1].name))

    def plugin_at(self, traceback: TracebackType | None) -> LoadedPlugin | None:
        """The plugin whose code was running, innermost first, where ``traceback`` was
        raised; None when no plugin was on the stack (a bug of unbottle's own)."""
        from unbottle.core.store.code import code_path, code_unit, contains

        roots = [(code_path(code_unit(p.module)), p) for p in self.plugins]
        frames = []
        while traceback is not None:
            frames.append(traceback.tb_frame.f_code.co_filename)
            traceback = traceback.tb_next
        for filename in reversed(frames):
            for root, plugin in roots:
                if root is not None and contains(root, filename):
                    return plugin
        return None

    def add(self, info: StrategyInfo) -> None:
        existing = self._strategies[info.kind].get(info.name)
        if existing is not None:
            raise PluginError(
                f"Two plugins provide the {KINDS[info.kind].label} '{info.name}': "
                f"{existing.provider} and {info.provider}. Uninstall one, or skip one with "
                f"{DISABLE_ENV}={existing.plugin} or {DISABLE_ENV}={info.plugin}."
            )
        self._strategies[info.kind][info.name] = info

    def names(self, kind: str) -> list[str]:
        return sorted(self._strategies[kind])

    def all(self) -> list[StrategyInfo]:
        return [info for kind in KINDS for _, info in sorted(self._strategies[kind].items())]

    def get(self, kind: str, name: str) -> StrategyInfo:
        try:
            return self._strategies[kind][name]
        except KeyError:
            installed = ", ".join(self.names(kind)) or "none"
            raise UnknownStrategyError(
                f"Unknown {KINDS[kind].label} '{name}'. Installed: {installed}."
            ) from None

    def create(self, kind: str, name: str, options: dict[str, Any] | None = None) -> Any:
        """Instantiate a strategy with validated options."""
        info = self.get(kind, name)
        return info.cls(info.cls.Config(**(options or {})))


def _disabled_from_env() -> set[str]:
    raw = os.environ.get(DISABLE_ENV, "")
    return {part.strip() for part in raw.split(",") if part.strip()}


def _dist_of(ep: EntryPoint) -> tuple[str, str]:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return "unknown distribution", "?"
    return dist.metadata["Name"], dist.version


def _check_strategy(cls: Any, kind: str, plugin: str, dist: str) -> None:
    where = f'plugin "{plugin}" ({dist})'
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise PluginError(f"{where} registered a strategy ({kind}) without a string `name`.")
    config = getattr(cls, "Config", None)
    if not (isinstance(config, type) and issubclass(config, BaseModel)):
        raise PluginError(f"{where}: {KINDS[kind].label} '{name}' has no pydantic `Config`.")
    for method in KINDS[kind].methods:
        if not callable(getattr(cls, method, None)):
            raise PluginError(f"{where}: {KINDS[kind].label} '{name}' has no `{method}` method.")


def load_registry(
    eps: Iterable[EntryPoint] | None = None, *, disabled: Iterable[str] | None = None
) -> Registry:
    """Import every plugin of the entry-point group and collect its strategies."""
    skip = set(disabled) if disabled is not None else _disabled_from_env()
    eps = list(entry_points(group=ENTRY_POINT_GROUP) if eps is None else eps)

    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    loaded: list[tuple[str, Any, str, str]] = []
    for ep in sorted(eps, key=lambda e: e.name):
        dist, version = _dist_of(ep)
        if ep.name in skip or dist in skip:
            continue
        try:
            module = ep.load()
            pm.register(module, name=ep.name)
        except Exception as e:
            raise PluginError(
                f'Error loading plugin "{ep.name}" ({dist} {version}): '
                f"{type(e).__name__}: {e}. Skip it with {DISABLE_ENV}={ep.name}."
            ) from e
        loaded.append((ep.name, module, dist, version))
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as e:
        raise PluginError(f"A plugin implements a hook that does not exist: {e}") from e

    registry = Registry(pm)
    registry.plugins = [LoadedPlugin(n, m.__name__, d, v) for n, m, d, v in loaded]
    for plugin_name, module, dist, version in loaded:
        others = [m for _, m, _, _ in loaded if m is not module]
        for kind, spec in KINDS.items():
            hook = pm.subset_hook_caller(spec.hook, remove_plugins=others)

            def register(
                cls: Any,
                *,
                _kind: str = kind,
                _p: str = plugin_name,
                _d: str = dist,
                _v: str = version,
            ) -> None:
                _check_strategy(cls, _kind, _p, f"{_d} {_v}")
                registry.add(StrategyInfo(_kind, cls.name, cls, _p, _d, _v))

            hook(register=register)
    return registry


@cache
def get_registry() -> Registry:
    """The process-wide registry, loaded on first use."""
    return load_registry()
