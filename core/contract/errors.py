"""Errors that a user can fix: the CLI prints them as one line and exits with code 2."""

from __future__ import annotations


class UnbottleError(Exception):
    """A problem with the user's input (params, data, plugins), not a bug in unbottle."""


class ConfigError(UnbottleError):
    """params.yaml or a `-S` override is invalid."""


class PluginError(UnbottleError):
    """A plugin failed to load, or two plugins claim the same strategy."""


class UnknownStrategyError(UnbottleError):
    """params name a strategy that no installed plugin provides."""


class DataError(UnbottleError):
    """An input file is missing, empty or malformed."""


class GateError(UnbottleError):
    """No evaluated variant passes the quality gates (or the one named explicitly fails)."""
