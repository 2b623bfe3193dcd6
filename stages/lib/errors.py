"""The one error type stages report, and the wrapper that turns it into a clean exit.

A stage's `main()` raises `StageError` (or a subclass) for anything the user can fix: a bad
parameter, an unreachable or corrupt download. `run(main)` prints it as a single line on stderr
and exits with status 2; an interrupt exits with 130. Outputs are written atomically
(`stages.lib.atomic`), so neither case leaves a half-written file behind.
"""

from __future__ import annotations

import sys
from collections.abc import Callable


class StageError(Exception):
    """A problem the user can fix; its message says what is wrong and what is allowed."""


class ParamError(StageError):
    """A value in params.yaml is wrong; `key` is its dotted name, e.g. `train.optimizer.momentum`."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"params.yaml: {key}: {message}")
        self.key = key


class DataError(StageError):
    """A dataset could not be fetched, or what was fetched is not what was expected."""


def run(main: Callable[[], None]) -> None:
    """Run a stage's `main`, exiting non-zero with one readable line on a user error."""
    try:
        main()
    except StageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: no output was written; run the stage again to recover", file=sys.stderr)
        sys.exit(130)
