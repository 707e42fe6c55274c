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


class LockedError(UnbottleError):
    """Another process is running the same stage in this workspace."""


#: The most characters of a user's value an error line repeats: a 50 MB string in
#: params must not become a 50 MB error line.
ECHO_LIMIT = 80


def shorten(text: object, limit: int = ECHO_LIMIT) -> str:
    """``text`` (a value's repr, a key) cut to ``limit`` characters with an ellipsis, and
    with control characters escaped: a key holding a newline (or U+001E, which
    ``splitlines`` also breaks at) must not split the error into two lines."""
    text = str(text)
    if not text[: limit + 1].isprintable():
        text = escaped(text[: limit * 4])
    if len(text) <= limit:
        return text
    return text[: limit - 1] + "…"


def escaped(text: str) -> str:
    """``text`` with its control characters written as escapes (``\\n``, ``\\x1e``)."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


#: The most characters of a path an error line shows: more than most real paths.
PATH_LIMIT = 240


def shorten_path(path: object, limit: int = PATH_LIMIT) -> str:
    """A path for an error line: whole if it fits, else its end, where the file's name is."""
    text = str(path)
    if not text[-(limit + 1) :].isprintable():
        text = escaped(text[-limit * 4 :])
    if len(text) <= limit:
        return text
    return "…" + text[-(limit - 1) :]


def echo(value: object, limit: int = ECHO_LIMIT) -> str:
    """A user's value as an error line shows it: its repr, at most ``limit`` characters."""
    return shorten(repr(value), limit)
