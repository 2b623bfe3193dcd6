"""Atomic outputs: built beside the target under a temporary name, fsync'd, then renamed into place.

A stage that fails, is interrupted or is killed (SIGKILL too) leaves at each path the previous
output or the new one, never a mix: a file is renamed over its target; an old folder is renamed
aside (`.NAME.old.tmp`), the new one in, and only then the old one deleted. What a killed write
leaves (`.NAME.PID-RANDOM.tmp`, git-ignored, or the old folder aside) is undone by the next write.
"""

from __future__ import annotations

import glob
import json
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

_ACTIVE: dict[Path, Path] = {}  # temporary -> output, for the writes under way in this process


@contextmanager
def target(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside `path` for the body to create a file or a folder at; it replaces
    `path` whole when the body succeeds. On an exception (or a signal) `path` is left as it was."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    recover(final)
    tmp = final.with_name(f".{final.name}.{os.getpid()}-{secrets.token_hex(8)}.tmp")
    _ACTIVE[tmp] = final
    try:
        try:
            yield tmp
        except OSError as exc:  # a full disk, a quota: name the output it was writing
            exc.filename = exc.filename or str(final)
            raise
        for part in [*tmp.rglob("*"), tmp] if tmp.is_dir() else [tmp]:
            _fsync(part)
        if tmp.is_dir() and final.exists():  # the old folder stays whole until the new one is in place
            os.replace(final, final.with_name(f".{final.name}.old.tmp"))
        os.replace(tmp, final)
        _fsync(final.parent)
    finally:
        _ACTIVE.pop(tmp, None)
        recover(final)  # the temporary if the body failed, the old folder


def recover(path: str | os.PathLike[str]) -> None:
    """Undo what a killed write of `path` left: the old folder back (or deleted, if the new one made it),
    temporaries removed but those of a process that runs (the pid in the name) and this process's
    writes under way. By the whole name: `metrics/eval.json` and `metrics/eval` are two outputs."""
    final = Path(path)
    aside = final.with_name(f".{final.name}.old.tmp")
    if aside.exists() and not final.exists():
        os.replace(aside, final)
    _remove(aside)
    for tmp in final.parent.glob(f".{glob.escape(final.name)}.*.tmp"):
        pid = tmp.name[len(final.name) + 2 :].split("-")[0]
        if pid.isdigit() and tmp not in _ACTIVE and not _alive(int(pid)):
            _remove(tmp)


def abandon_all() -> None:
    """Drop every write under way, as if its body had failed (for a signal handler about to exit)."""
    for tmp, final in list(_ACTIVE.items()):
        _ACTIVE.pop(tmp, None)
        recover(final)


def write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write `text` as UTF-8, atomically, whatever the locale's encoding (a report's "—" on a Latin-1 server)."""
    with target(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike[str], data: Any) -> None:
    """Write `data` as indented JSON, atomically; NaN or infinity is a ValueError (not JSON)."""
    write_text(path, json.dumps(data, indent=2, allow_nan=False) + "\n")


def save_figure(figure: Any, path: str | os.PathLike[str], **savefig: Any) -> None:
    """Save a matplotlib figure to `path` atomically, in the format its suffix names (.png, .svg, ...)."""
    with target(path) as tmp:
        figure.savefig(tmp, format=Path(path).suffix.lstrip(".").lower() or None, **savefig)


def _alive(pid: int) -> bool:
    """Whether `pid` is another process that runs (its writes may be under way)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        pass
    return pid != os.getpid()


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
