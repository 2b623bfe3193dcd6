"""Run a stage or command: one readable line and a non-zero exit for every failure, wherever it runs.

`run(main)` is every entry point's last line. A `main` that returns has written its outputs (and
fsync'd them): the process exits at once, skipping interpreter teardown. It prints a `StageError`
as `error: ...` (exit 2), under DVC followed by the command that restores the outputs DVC deleted (below),
a file-system error on a user's path or a full disk the same way, Ctrl-C as one line (exit 130)
and SIGTERM as one line (exit 143). Anything else is a bug: `internal error: ...` (exit 1), with
the traceback when `STAGES_TRACEBACK=1`.

Where a pipeline runs, nothing here depends on who the parent is: a stage runs the same as PID 1
in a container, from a shell whose parent is outside the PID namespace (PPID 0), detached with
`nohup`/`setsid`, and in DVC's queue. Only a stage started by DVC (DVC sets `DVC_STAGE` in its
environment) watches the `dvc` process that started it (through a pidfd, found among its nearest
ancestors by its command line), and stops as on SIGTERM when that `dvc` ends, so a killed `dvc`
leaves no stage behind. Where that `dvc` cannot be found (no /proc, PPID 0), the stage just runs.

What an interrupted run leaves: outputs are written atomically (`pipeline.atomic`), so a stage
run by hand keeps its previous outputs. Under DVC, which deletes a stage's outputs before running
it, `dvc checkout --force` puts back every output that dvc.lock records, byte for byte.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
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

from pipeline import atomic
from pipeline.errors import ParamError, StageError

UNDER_DVC = "DVC_STAGE" in os.environ  # set by `dvc repro` / `dvc exp run` for the command of each stage
KEPT = (
    "dvc checkout --force puts back the outputs dvc.lock records"
    if UNDER_DVC
    else "the previous outputs are kept; run it again to recover"
)
SIGNALS = {
    signal.SIGINT: ("interrupted (Ctrl-C)", 130),
    signal.SIGTERM: ("terminated (SIGTERM, or dvc was stopped)", 143),
}
# Errors of the machine, not of a path the user named: still one line, not a bug.
RESOURCE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.EACCES, errno.EPERM}


def run(main: Callable[[], None], *, writes_outputs: bool = True) -> None:
    """Run `main`, exiting non-zero with one readable line on any failure.

    `writes_outputs`: a pipeline stage; it holds this workspace's lock for its name, so two runs of
    one stage cannot overwrite each other's outputs. Commands that write no DVC output (predict,
    report) pass False and take no lock.
    """
    global _kept  # noqa: PLW0603 - what a failure line promises, set once per process
    _kept = KEPT if writes_outputs else ""
    for stream in (sys.stdout, sys.stderr):  # a name or a "—" the locale cannot encode is escaped, not fatal
        stream.reconfigure(errors="backslashreplace")
    try:
        guard()
        if writes_outputs:
            module = getattr(sys.modules.get("__main__"), "__spec__", None)
            _only_one(module.name if module else Path(sys.argv[0]).stem)
        main()
        _exit(0)  # succeeded: everything is written; no interpreter teardown
    except ParamError as exc:  # refused by check, before DVC deleted any other stage's outputs
        _fail(f"error: {exc}", 2)
    except StageError as exc:
        _fail(f"error: {exc}; {_kept}" if UNDER_DVC and _kept else f"error: {exc}", 2)
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


_guarded = False
_kept = KEPT
_stopping = threading.Lock()  # one signal line, whichever thread sees the signal first


def _with_kept(line: str) -> str:
    return f"{line}; {_kept}" if _kept else line


def guard() -> None:
    """Handle Ctrl-C and SIGTERM as one line, and (under DVC) end with the `dvc` that started this stage.

    Called by `run`, and earlier by `stages/__init__.py` for `python -m stages.<name>`, so that a
    signal during the stage's imports (TensorFlow's take seconds) is handled the same way. Once.
    """
    global _guarded  # noqa: PLW0603 - set once per process
    if _guarded:
        return
    _guarded = True
    for signum in SIGNALS:
        signal.signal(signum, _on_signal)
    # Python runs a handler only between bytecodes: a main thread blocked in C (a cluster's first
    # contact, a read) would never see it. The wakeup fd gets the signal's number at once, and a
    # thread handles it from there too.
    reader, writer = os.pipe()
    os.set_blocking(writer, False)
    signal.set_wakeup_fd(writer, warn_on_full_buffer=False)
    threading.Thread(target=_relay, args=(reader,), daemon=True, name="signals").start()
    if hasattr(signal, "SIGXFSZ"):  # a file-size limit (ulimit -f): an OSError to report, not a silent kill
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    if UNDER_DVC:
        _end_with_dvc()


def _internal(exc: BaseException) -> None:
    if os.environ.get("STAGES_TRACEBACK"):
        traceback.print_exception(exc)
    _fail(f"internal error: {type(exc).__name__}: {exc} (a bug; STAGES_TRACEBACK=1 shows where)", 1)


def _on_signal(signum: int, frame: FrameType | None) -> None:
    """Stop here, without unwinding through TensorFlow (its threads may be mid-step): drop the
    writes under way, say so, and exit at once."""
    if not _stopping.acquire(blocking=False):  # the other thread is already stopping the process
        return
    _end_children()
    atomic.abandon_all()
    what, status = SIGNALS[signal.Signals(signum)]
    said = "; ".join(filter(None, [_kept, *(hook() for hook in _ON_SIGNAL)]))
    _fail(f"{what}: {said}" if said else what, status)


_ON_SIGNAL: list[Callable[[], str]] = []


def on_signal(hook: Callable[[], str]) -> None:
    """Call `hook` when Ctrl-C or SIGTERM stops this process, before it exits; its text ends the line."""
    _ON_SIGNAL.append(hook)


_CHILDREN: list[int] = []  # the process that runs TensorFlow under `fork_watched`: it ends with this one
_CHILD_OUTPUTS: list[Path] = []  # what it writes: its temporaries are removed once it has ended


def fork_watched(seconds: float, line: str, outputs: tuple[Path, ...] = ()) -> Callable[[], None]:
    """Fork; return in the child, which goes on with the stage; this process becomes its watchdog.

    For TensorFlow's multi-worker start-up, which waits for the cluster in C holding the GIL (no
    thread of that process runs) and installs its own SIGTERM handler (its preemption notifier,
    which only takes note) for the rest of the run. This process never enters TensorFlow, so its
    handlers always run: on SIGINT or SIGTERM (or the end of dvc) it ends the child with SIGKILL,
    prints the signal's line and exits 130 or 143; when the child has not called the returned
    function (its first training step) within `seconds`, the same with `line` (an `error:` line,
    exit 2); otherwise it exits with the child's status, or, when a signal killed the child (the
    OOM killer's SIGKILL), says so in one line (exit 2). The child ignores SIGINT and SIGTERM
    (this process handles them) and dies with this process, even a SIGKILLed one. `outputs`: the
    paths the child writes (`atomic.target`); the writes it had under way are dropped once it ends.
    """
    reader, writer = os.pipe()
    parent = os.getpid()
    sys.stdout.flush()
    sys.stderr.flush()
    signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)  # no signal between the fork and the roles
    pid = os.fork()
    if pid == 0:
        os.close(reader)
        for signum in SIGNALS:
            signal.signal(signum, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)
        die_with_parent(signal.SIGKILL, parent)

        def done() -> None:
            os.write(writer, b"\xff")
            os.close(writer)

        return done
    _CHILDREN.append(pid)
    _CHILD_OUTPUTS.extend(outputs)
    os.close(writer)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)
    if not select.select([reader], [], [], seconds)[0]:  # neither a first step nor an exit
        if _stopping.acquire(blocking=False):
            _end_children()
            _fail(_with_kept(f"error: {line}"), 2)
    else:
        try:
            status = os.waitpid(pid, 0)[1]
        except ChildProcessError:  # a signal's handler took it
            status = 0
        if _stopping.acquire(blocking=False):
            code = os.waitstatus_to_exitcode(status)
            if code >= 0:  # the child said why, if it failed
                os._exit(code)
            _drop_child_writes()  # it is gone: reaped above
            why = " (out of memory? the kernel's OOM killer sends it)" if -code == signal.SIGKILL else ""
            name = signal.Signals(-code).name
            _fail(_with_kept(f"error: the process training the model was killed by {name}{why}"), 2)
    threading.Event().wait()  # a signal's handler (another thread) is ending this process


def die_with_parent(signum: int = signal.SIGKILL, parent: int | None = None) -> None:
    """Have the kernel send this process `signum` when its parent ends, even by SIGKILL (Linux's
    PR_SET_PDEATHSIG; elsewhere a no-op); with `parent`, end now if that parent has already gone."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signum, 0, 0, 0)  # 1: PR_SET_PDEATHSIG
    if parent is not None and os.getppid() != parent:
        os._exit(1)


def _end_children() -> None:
    """SIGKILL the process that runs TensorFlow (`fork_watched`), and wait until it is gone."""
    for pid in _CHILDREN:
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):  # already ended, or reaped by the main thread
            pass
    _drop_child_writes()


def _drop_child_writes() -> None:
    """Remove the temporaries of an ended child's writes (their names hold its pid)."""
    for path in _CHILD_OUTPUTS:
        atomic.recover(path)


def _relay(reader: int) -> None:
    """Handle SIGINT / SIGTERM from the wakeup fd: wherever the main thread is blocked."""
    while True:
        for signum in os.read(reader, 64):
            if signum in SIGNALS:
                _on_signal(signum, None)


def _end_with_dvc() -> None:
    """Stop as on SIGTERM when the `dvc` that started this stage ends (killed, even with SIGKILL).

    DVC runs a stage's command in `$SHELL -c` (or `/bin/sh -c`): the stage's parent is dvc, or a
    shell whose parent is dvc. The nearest ancestor whose command line is `dvc ...` is watched.
    """
    dvc = _find_dvc()
    if dvc is None:
        return
    try:
        handle = os.pidfd_open(dvc)  # readable once that process has ended
    except ProcessLookupError:  # it ended between finding it and opening it
        _on_signal(signal.SIGTERM, None)
    except (OSError, AttributeError):  # no pidfd here (not Linux, an old kernel, a sandbox): just run
        return
    else:
        threading.Thread(target=_stop_when_readable, args=(handle,), daemon=True, name="end-with-dvc").start()


def _find_dvc(levels: int = 4) -> int | None:
    """The pid of the nearest ancestor running dvc, or None (not found, or /proc not readable)."""
    pid = os.getppid()
    for _ in range(levels):
        if pid <= 0:  # the parent is outside this PID namespace
            return None
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if any(Path(os.fsdecode(arg)).name in ("dvc", "dvc.exe") for arg in argv[:2]) or argv[1:3] == [
                b"-m",
                b"dvc",
            ]:
                return pid
            pid = int(Path(f"/proc/{pid}/stat").read_text(encoding="ascii").rpartition(")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            return None
    return None


def _stop_when_readable(handle: int) -> None:
    select.select([handle], [], [])
    _on_signal(signal.SIGTERM, None)


def _only_one(name: str) -> None:
    """Hold an exclusive lock for this stage in this workspace, or stop with a clear line."""
    if not Path(".dvc").is_dir():  # not run in a DVC project: nothing to share
        return
    lock_dir = Path(".dvc/tmp")
    lock_dir.mkdir(exist_ok=True)
    handle = open(lock_dir / f"stage-{name}.lock", "a+", encoding="utf-8")  # noqa: SIM115 - held until the process ends
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise StageError(
            f"another `{name}` is running in this folder; two runs in one workspace would overwrite each "
            "other's outputs. Run experiments one at a time, or queue them: dvc exp run --queue ..., then "
            "dvc queue start (each runs in its own copy)"
        ) from None
    _HELD.append(handle)


_HELD: list = []


def _fail(line: str, status: int) -> None:
    """Print one line and exit."""
    print(" ".join(line.split()), file=sys.stderr, flush=True)
    _exit(status)


def _exit(status: int) -> None:
    """Exit now, without interpreter teardown: TensorFlow's takes over a second, and its threads can
    crash it when a signal stopped them mid-step. Every output is written, fsync'd and renamed
    into place (`pipeline.atomic`) or dropped before this is called; only the streams need a flush."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
