"""The one error type stages report, and the wrapper that turns every failure into one clean line.

A stage's `main()` raises `StageError` (or a subclass) for anything the user can fix: a bad
parameter, an unreachable or corrupt download. `run(main)` prints it as a single line on
stderr and exits with status 2. A file-system error (disk full, permission denied, read-only
folder) is also one line, exit 2. Ctrl-C exits 130 and SIGTERM 143, each with a line saying
that the previous outputs were kept: outputs are written atomically (`stages.lib.atomic`) and
DVC keeps them (`persist: true`). A stage also ends, the same way, when the `dvc` that started
it is killed. Anything else is a bug: one line, exit 1, and the traceback with
`STAGES_TRACEBACK=1`.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import select
import signal
import sys
import threading
import traceback
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from stages.lib import atomic

KEPT = "the previous outputs are kept; run it again (dvc repro) to recover"


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


SIGNALS = {
    signal.SIGINT: (f"interrupted (Ctrl-C): {KEPT}", 130),
    signal.SIGTERM: (f"terminated (SIGTERM, or dvc was stopped): {KEPT}", 143),
}


def _on_signal(signum: int, frame: FrameType | None) -> None:
    """Stop here, without unwinding through TensorFlow (its threads may be mid-step): drop the
    writes under way, say so, and exit at once."""
    atomic.abandon_all()
    _fail(*SIGNALS[signal.Signals(signum)], now=True)


SHELLS = {"sh", "dash", "bash", "zsh", "ksh", "mksh", "fish", "busybox"}


def _end_with_parent() -> None:
    """End this stage, as if by SIGTERM, when the `dvc` that started it dies, so no stage outlives it.

    DVC runs the command in `$SHELL -c` (or `/bin/sh -c` when SHELL is unset). bash then becomes
    the stage, but dash (Debian's /bin/sh) waits for it as its parent and outlives a killed dvc,
    so the process watched is the parent, or the parent's parent when the parent is that shell."""
    if not sys.platform.startswith("linux"):  # pragma: no cover
        return
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: the parent's death
    runner = os.getppid()
    if Path(f"/proc/{runner}/comm").read_text().strip() in SHELLS:
        runner = int(Path(f"/proc/{runner}/stat").read_text().rpartition(")")[2].split()[1])
    try:
        handle = os.pidfd_open(runner)  # readable once that process has ended
    except ProcessLookupError:  # already gone
        handle = None
    if handle is None or runner == 1:  # gone before we looked (its children go to init)
        _on_signal(signal.SIGTERM, None)
    else:
        threading.Thread(target=_wait_for_end, args=(handle,), daemon=True, name="end-with-dvc").start()


def _wait_for_end(handle: int) -> None:
    select.select([handle], [], [])
    os.kill(os.getpid(), signal.SIGTERM)  # handled by `_on_signal` on the main thread


def _only_one(name: str) -> None:
    """Hold an exclusive lock for this stage in this workspace, or stop with a clear line."""
    if not Path(".dvc").is_dir():  # not run in a DVC project: nothing to share
        return
    lock_dir = Path(".dvc/tmp")
    lock_dir.mkdir(exist_ok=True)
    handle = open(lock_dir / f"stage-{name}.lock", "a+")  # noqa: SIM115 - held until the process ends
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise StageError(
            f"another `{name}` is running in this folder; two runs in one workspace would overwrite each "
            "other's outputs. Run experiments one at a time, or queue them: dvc exp run --queue ..., then "
            "dvc exp run --run-all (each runs in its own copy)"
        ) from None
    _HELD.append(handle)


_HELD: list = []


def run(main: Callable[[], None]) -> None:
    """Run a stage's `main`, exiting non-zero with one readable line on any failure."""
    for signum in SIGNALS:
        signal.signal(signum, _on_signal)
    if hasattr(signal, "SIGXFSZ"):  # a file-size limit (ulimit -f): an OSError to report, not a silent kill
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        _end_with_parent()
        module = getattr(sys.modules.get("__main__"), "__spec__", None)
        _only_one(module.name if module else Path(sys.argv[0]).stem)
        main()
    except StageError as exc:
        _fail(f"error: {exc}", 2)
    except OSError as exc:  # disk full, permission denied, read-only folder, file-size limit
        where = f"{exc.filename}: " if exc.filename else ""
        _fail(f"error: cannot read or write {where}{exc.strerror or exc}; {KEPT}", 2)
    except MemoryError:
        _fail(f"error: out of memory (try a smaller train.batch_size or model); {KEPT}", 2)
    except Exception as exc:  # a bug, not a user error: still one line, unless asked for more
        if os.environ.get("STAGES_TRACEBACK"):
            traceback.print_exc()
        _fail(f"internal error: {type(exc).__name__}: {exc} (a bug; STAGES_TRACEBACK=1 shows where)", 1)


def _fail(line: str, status: int, now: bool = False) -> None:
    """Print one line and exit; `now` skips interpreter teardown, which TensorFlow's threads can
    crash when a signal stopped them mid-step (the outputs were already cleaned up above)."""
    print(" ".join(line.split()), file=sys.stderr, flush=True)
    if now:
        sys.stdout.flush()
        os._exit(status)
    sys.exit(status)
