"""Atomic outputs: write beside the target, flush to disk, then rename into place.

A stage that fails, is interrupted or is killed (even SIGKILL) leaves either the previous
output or the new one at each path, never a mix. Files: written to a fresh temporary, fsync'd,
renamed over the target (one atomic `rename`), then the folder is fsync'd. Folders: the new
one is built beside the old, the old is renamed aside, the new renamed in, and only then is
the old one deleted. A kill between those two renames leaves the old folder aside under a
`.NAME.old.tmp` name: the next write of that output (or `recover`) puts it back first. Every
temporary that a killed process left is removed the next time that output is written.
"""

from __future__ import annotations

import glob
import json
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

_ACTIVE: dict[Path, Path] = {}  # temporary -> final, for the writes under way in this process


def abandon_all() -> None:
    """Drop every write under way (for a signal handler about to exit): temporaries removed, and
    a folder renamed aside put back if the new one was not yet in place."""
    for tmp, final in list(_ACTIVE.items()):
        _remove(tmp)
        _put_back(final)
    _ACTIVE.clear()


def _aside(final: Path) -> Path:
    return final.with_name(f".{final.name}.old.tmp")


def _put_back(final: Path) -> None:
    """Stopped between the two renames of a folder write: the old folder comes back."""
    aside = _aside(final)
    if aside.exists() and not final.exists():
        os.replace(aside, final)


def recover(path: str | os.PathLike[str]) -> None:
    """Undo what a killed write of `path` left: put an old folder back, delete its temporaries.

    Temporaries are matched by the output's whole name (`metrics/eval.json` and `metrics/eval`
    are two outputs). Those of a process that is still running (their name holds its pid) are
    left alone, and so are this process's own writes under way.
    """
    final = Path(path)
    _put_back(final)
    aside = _aside(final)
    pattern = re.compile(rf"\.{re.escape(final.name)}\.(\d+)-[0-9a-f]+\.tmp")
    for stale in final.parent.glob(f".{glob.escape(final.name)}.*.tmp"):
        match = pattern.fullmatch(stale.name)
        if stale == aside or (match and stale not in _ACTIVE and not _alive(int(match.group(1)))):
            _remove(stale)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # not one of this process's writes under way (checked first): left by an earlier one
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def target(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside `path`; move it onto `path` when the body succeeds.

    Works for a file or a folder: whatever the body creates at the yielded path replaces
    `path` whole. On any exception (or signal) the temporary is removed and `path` is untouched.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    recover(final)
    # A name no other process will pick (pid + 64 random bits); the body creates a file or folder there.
    tmp = final.with_name(f".{final.name}.{os.getpid()}-{secrets.token_hex(8)}.tmp")
    _ACTIVE[tmp] = final
    try:
        try:
            yield tmp
        except OSError as exc:  # a full disk, a quota: name the output it was writing
            if exc.filename is None:
                exc.filename = str(final)
            raise
        _sync(tmp)
        if tmp.is_dir() and final.exists():
            aside = _aside(final)
            os.replace(final, aside)  # the old folder stays whole until the new one is in place
            os.replace(tmp, final)
            _sync_dir(final.parent)
            _remove(aside)
        else:
            os.replace(tmp, final)
            _sync_dir(final.parent)
    finally:
        _remove(tmp)
        _ACTIVE.pop(tmp, None)


def write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write `text` as UTF-8, atomically, whatever the locale's encoding (a report's "—" on a Latin-1 server)."""
    with target(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def save_figure(figure: Any, path: str | os.PathLike[str], **savefig: Any) -> None:
    """Save a matplotlib figure to `path` atomically, in the format its suffix names (.png, .svg, ...)."""
    with target(path) as tmp:
        figure.savefig(tmp, format=Path(path).suffix.lstrip(".").lower() or None, **savefig)


def write_json(path: str | os.PathLike[str], data: Any) -> None:
    """Write `data` as indented JSON, atomically; NaN or infinity is a ValueError (not JSON)."""
    write_text(path, json.dumps(data, indent=2, sort_keys=False, allow_nan=False) + "\n")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


def _sync(path: Path) -> None:
    """fsync a file, or every file and folder below a folder."""
    if path.is_dir():
        for sub in sorted(path.rglob("*"), reverse=True):
            if sub.is_file():
                _fsync(sub, os.O_RDONLY)
        for folder in [*sorted((p for p in path.rglob("*") if p.is_dir()), reverse=True), path]:
            _sync_dir(folder)
    elif path.exists():
        _fsync(path, os.O_RDONLY)


def _sync_dir(folder: Path) -> None:
    _fsync(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))


def _fsync(path: Path, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
