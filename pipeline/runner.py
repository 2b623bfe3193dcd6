"""Run a stage or command: one readable line and a non-zero exit for every failure, wherever it runs.

`run(main)` is every entry point's last line: a `StageError` is `error: ...` (exit 2), under DVC
with the command that restores the outputs DVC deleted; a file-system error on a user's path or a
full disk the same; Ctrl-C one line (exit 130), SIGTERM one line (exit 143); anything else a bug,
`internal error: ...` (exit 1; `STAGES_TRACEBACK=1` shows where). Nothing depends on the parent
(PID 1, PPID 0, nohup, DVC's queue), but a stage DVC started (`DVC_STAGE` set) ends as on SIGTERM
when that `dvc` ends. Two runs in one workspace are DVC's to refuse (its lock on each stage's outputs).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import select
import signal
import sys
import threading
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from pipeline import atomic
from pipeline.errors import ParamError, StageError

UNDER_DVC = "DVC_STAGE" in os.environ  # set by `dvc repro` / `dvc exp run` for the command of each stage
RESTORE = "dvc checkout --force puts back the outputs dvc.lock records"  # what DVC deleted, from its cache
KEPT = RESTORE if UNDER_DVC else "the previous outputs are kept; run it again to recover"
SIGNALS = {signal.SIGINT: ("interrupted (Ctrl-C)", 130),
           signal.SIGTERM: ("terminated (SIGTERM, or dvc was stopped)", 143)}  # fmt: skip
# Errors of the machine, not of a path the user named: still one line, not a bug.
RESOURCE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.EACCES, errno.EPERM}
_kept = KEPT  # what a failure line promises; nothing for a command that writes no DVC output
_stopping = threading.Lock()  # one line per process, whichever thread ends it first
_ON_SIGNAL: list[Callable[[], str]] = []
_CHILD: list[tuple[int, tuple[Path, ...]]] = []  # `fork_watched`'s child, and the outputs it writes


def run(main: Callable[[], None], *, writes_outputs: bool = True) -> None:
    """Run `main`, then exit at once (its outputs are written and fsync'd: no interpreter teardown); on
    any failure one line and a non-zero exit. `writes_outputs=False`: a command that writes no DVC output."""
    global _kept  # noqa: PLW0603 - set once per process
    _kept = KEPT if writes_outputs else ""
    for stream in (sys.stdout, sys.stderr):  # a name or a "—" the locale cannot encode is escaped, not fatal
        stream.reconfigure(errors="backslashreplace")
    try:
        guard()
        main()
        _end("", 0)
    except ParamError as exc:  # refused by check, before DVC deleted any other stage's outputs
        _fail(f"error: {exc}", 2)
    except StageError as exc:
        _fail(_with_kept(f"error: {exc}") if UNDER_DVC else f"error: {exc}", 2)
    except BrokenPipeError:  # the reader went away (`| head`): nothing more to say, as `cat` says nothing
        os._exit(128 + signal.SIGPIPE)
    except OSError as exc:
        if exc.filename is None and exc.errno not in RESOURCE_ERRNOS:
            _internal(exc)
        where = f"{exc.filename}: " if exc.filename else ""
        _fail(_with_kept(f"error: cannot read or write {where}{exc.strerror or exc}"), 2)
    except MemoryError:
        _fail(_with_kept("error: out of memory (a smaller model, batch or dataset needs less)"), 2)
    except Exception as exc:  # a bug, not a user error: still one line
        _internal(exc)


def guard() -> None:
    """Ctrl-C and SIGTERM as one line wherever the process waits, and under DVC an end with its `dvc`.
    Called by `run`, and first by `stages/__init__.py`: before a stage's imports (TensorFlow's take seconds)."""
    if signal.getsignal(signal.SIGTERM) is _on_signal:  # once per process
        return
    for signum in SIGNALS:
        signal.signal(signum, _on_signal)
    # Python runs a handler between bytecodes only, not while the main thread waits in C (a TensorFlow
    # call): the signal's number also goes down a pipe, read by a thread that ends the process.
    reader, writer = os.pipe()
    os.set_blocking(writer, False)
    signal.set_wakeup_fd(writer, warn_on_full_buffer=False)
    _thread(lambda: [_on_signal(n) for chunk in iter(lambda: os.read(reader, 64), b"") for n in chunk if n in SIGNALS])
    if hasattr(signal, "SIGXFSZ"):  # a file-size limit (ulimit -f): an OSError to report, not a silent kill
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    if UNDER_DVC:  # where no `dvc` is found (no /proc or pidfd, PPID 0), the stage just runs
        with contextlib.suppress(OSError, AttributeError):
            dvc = os.pidfd_open(_dvc_ancestor())  # readable once that process has ended, even by SIGKILL
            _thread(lambda: (select.select([dvc], [], []), _on_signal(signal.SIGTERM)))


def on_signal(hook: Callable[[], str]) -> None:
    """Call `hook` when Ctrl-C or SIGTERM stops this process, before it exits; its text ends the line."""
    _ON_SIGNAL.append(hook)


def fork_watched(seconds: float, line: str, outputs: tuple[Path, ...] = ()) -> Callable[[], None]:
    """Fork: the child returns and goes on with the stage (TensorFlow's multi-worker start-up waits in C
    holding the GIL, and takes SIGTERM over); this process, outside TensorFlow, watches it. On Ctrl-C,
    SIGTERM or the end of dvc it SIGKILLs the child and says the signal's line; if the child has not
    called the returned function (its first step) within `seconds`, `error: {line}` (exit 2); a child
    killed by a signal (the OOM killer) is one line, exit 2; else it exits as the child did. The child
    ignores SIGINT and SIGTERM and dies with this process; its writes under way to `outputs` are dropped.
    """
    reader, writer = os.pipe()
    parent = os.getpid()
    sys.stdout.flush()
    sys.stderr.flush()
    signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)  # no signal between the fork and the roles
    pid = os.fork()
    if pid == 0:
        for signum in SIGNALS:
            signal.signal(signum, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)
        die_with_parent(signal.SIGKILL, parent)
        os.close(reader)
        return lambda: os.close(writer)  # the pipe's end: the first step finished
    _CHILD.append((pid, outputs))
    os.close(writer)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)
    if not select.select([reader], [], [], seconds)[0]:  # neither a first step nor an exit
        _fail(_with_kept(f"error: {line}"), 2)
    status = os.waitpid(pid, 0)[1]  # (reaped by a signal's handler first: ChildProcessError while it exits)
    _CHILD.clear()  # reaped: its pid is no longer its own
    if not os.WIFSIGNALED(status):
        _fail("", os.waitstatus_to_exitcode(status))  # the child said why, if it failed
    for path in outputs:  # the writes it had under way
        atomic.recover(path)
    name = signal.Signals(os.WTERMSIG(status)).name
    why = " (out of memory? the kernel's OOM killer sends it)" if name == "SIGKILL" else ""
    _fail(_with_kept(f"error: the process training the model was killed by {name}{why}"), 2)


def die_with_parent(signum: int = signal.SIGKILL, parent: int | None = None) -> None:
    """Have the kernel send this process `signum` when its parent ends, even by SIGKILL (Linux's
    PR_SET_PDEATHSIG; elsewhere a no-op); with `parent`, end now if that parent has already gone."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signum, 0, 0, 0)  # 1: PR_SET_PDEATHSIG
    if parent is not None and os.getppid() != parent:
        os._exit(1)


def _dvc_ancestor() -> int:
    """The nearest ancestor whose command is `dvc ...` or `python -m dvc ...`: DVC runs a stage in
    `$SHELL -c` (bash becomes the stage, dash stays between). OSError if none (PPID 0: no /proc/0)."""
    pid = os.getppid()
    for _ in range(4):
        argv = [os.path.basename(arg) for arg in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:3]]
        if b"dvc" in argv[:2] or argv[1:] == [b"-m", b"dvc"]:
            return pid
        pid = int(Path(f"/proc/{pid}/stat").read_bytes().rpartition(b")")[2].split()[1])
    raise ProcessLookupError("no dvc among this process's ancestors")


def _thread(target: Callable[[], object]) -> None:
    threading.Thread(target=target, daemon=True).start()


def _with_kept(line: str) -> str:
    return f"{line}; {_kept}" if _kept else line


def _internal(exc: BaseException) -> NoReturn:
    if os.environ.get("STAGES_TRACEBACK"):
        traceback.print_exception(exc)
    _fail(f"internal error: {type(exc).__name__}: {exc} (a bug; STAGES_TRACEBACK=1 shows where)", 1)


def _on_signal(signum: int, frame: object = None) -> None:
    """Stop here, without unwinding through TensorFlow (its threads may be mid-step): drop the writes
    under way, say so, exit. The signal seen a second time (by the other thread) returns."""
    if _stopping.acquire(blocking=False):
        with contextlib.suppress(OSError):  # a write under way, dropped
            atomic.abandon_all()
        what, status = SIGNALS[signal.Signals(signum)]
        said = "; ".join(filter(None, [_kept, *(hook() for hook in _ON_SIGNAL)]))
        _end(f"{what}: {said}" if said else what, status)


def _fail(line: str, status: int) -> NoReturn:
    if not _stopping.acquire(blocking=False):  # another thread is ending this process
        threading.Event().wait()
    _end(line, status)


def _end(line: str, status: int) -> NoReturn:
    """End `fork_watched`'s child (its temporaries removed), print `line` and exit now, without interpreter
    teardown: TensorFlow's takes seconds and can crash on threads a signal stopped mid-step. Every output
    is written, fsync'd and renamed into place (`pipeline.atomic`) or dropped by then."""
    for pid, outputs in _CHILD:
        with contextlib.suppress(ProcessLookupError, ChildProcessError):  # ended, or reaped by the main thread
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        for path in outputs:
            atomic.recover(path)
    if line:
        print(" ".join(line.split()), file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
