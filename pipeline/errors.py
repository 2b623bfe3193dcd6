"""The errors a user can fix, each printed by `pipeline.runner` as one `error:` line (exit 2).

A stage raises `StageError` (or a subclass) for anything the user can fix: a bad parameter, an
unreachable or corrupt download, an unreadable image. The message says what is wrong and what
is allowed; anything else that goes wrong is a bug, reported as an internal error.
"""

from __future__ import annotations


class StageError(Exception):
    """A problem the user can fix; its message says what is wrong and what is allowed."""


class ParamError(StageError):
    """A value in params.yaml is wrong; `key` is its dotted name, e.g. `train.optimizer.momentum`."""

    def __init__(self, key: str, message: str) -> None:
        key = key if key.isprintable() and not any(c.isspace() for c in key) else repr(key)  # a key "\n" too
        super().__init__(f"params.yaml: {key}: {message}")
        self.key = key


class DataError(StageError):
    """A dataset could not be fetched, or what was fetched is not what was expected."""
