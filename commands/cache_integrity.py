"""Does DVC's cache (and a remote) hold every object dvc.lock records, with the right bytes? And repair.

DVC trusts what it has stored. A cache file is made read-only once written and is not hashed again
(dvc-data's `LocalHashFileDB.check` returns early for mode 0444), so a byte flipped in the cache is
pushed and pulled while `dvc status` is clean. A remote that holds a directory's `.dir` listing is
assumed to hold every file in it (`dvc_data.hashfile.status`: "If .dir hash exists in the ODB,
assume directory contents"), so a file object deleted from a remote is never sent again and `dvc
status -c` says "in sync". And `dvc repro` exits 0 when an output could not be copied into a full
cache. This module looks at each object itself: it exists (`HashFileDB.exists`), and its bytes
hash to its name (`intact`: dvc-data's `file_md5`, which reads every byte). `repair` puts a good copy back from
the workspace, the cache or the remote, through DVC's own object stores (`HashFileDB.add`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dvc_data.hashfile.hash import file_md5
from dvc_data.hashfile.tree import Tree

if TYPE_CHECKING:
    from dvc.repo import Repo
    from dvc_data.hashfile.db import HashFileDB


@dataclass(frozen=True)
class Entry:
    """One stored object: a file of an output, or a directory output's `.dir` listing.

    `path`: where it lives in the workspace (`models/model.keras`; `models/` for the listing);
    `oid`: its md5 (the listing's ends in `.dir`); `hash_name`: DVC's hash (`md5`);
    `cache`: the object store of DVC's cache that holds it.
    """

    path: str
    oid: str
    hash_name: str
    cache: HashFileDB


def entries(repo: Repo) -> Iterator[Entry]:
    """Every object of every cached output that the checked-out dvc.lock records (at `repo.switch(rev)`'s
    revision when called inside it). A directory whose listing is not in the cache yields the listing
    alone (its files cannot be known without it)."""
    for out in repo.index.outs:
        if not out.use_cache or not out.hash_info or not out.hash_info.value:
            continue
        path = str(out)
        if not out.hash_info.isdir:
            yield Entry(path, out.hash_info.value, out.hash_name, out.cache)
            continue
        yield Entry(f"{path}/", out.hash_info.value, out.hash_name, out.cache)
        try:
            tree = Tree.load(out.cache, out.hash_info)
        except (FileNotFoundError, ValueError):  # the listing is missing or not a listing
            continue
        for key, _, info in tree:
            yield Entry(f"{path}/{'/'.join(key)}", info.value, out.hash_name, out.cache)


def intact(db: HashFileDB, entry: Entry) -> bool:
    """True when `db` holds the object and its bytes hash to its name (every byte is read)."""
    where = db.oid_to_path(entry.oid)
    try:
        return file_md5(where, db.fs, name=entry.hash_name) == entry.oid.removesuffix(".dir")
    except FileNotFoundError:
        return False


def repair(entry: Entry, sources: list[tuple[HashFileDB | None, str]], dest: HashFileDB) -> str | None:
    """Put a good copy of `entry` into `dest` from the first source that holds one; its name, or None.

    `sources`: (object store, name) pairs, or (None, name) for the workspace file at `entry.path`.
    A bad copy in `dest` is removed first, as DVC does when it finds one (`HashFileDB.check`); each
    source's copy is read once, into `dest`, and kept only if its bytes hash to the object's name.
    """
    from dvc_objects.fs.local import LocalFileSystem

    if dest.exists(entry.oid):
        dest.delete(entry.oid)
    for db, name in sources:
        if db is None and entry.oid.endswith(".dir"):  # a listing has no workspace file
            continue
        fs, where = (LocalFileSystem(), entry.path) if db is None else (db.fs, db.oid_to_path(entry.oid))
        try:
            dest.add(where, fs, entry.oid, check_exists=False)
        except (FileNotFoundError, IsADirectoryError):  # this source does not hold it
            continue
        if intact(dest, entry):
            return name
        with suppress(FileNotFoundError):  # (a store that verifies what it is given removed it already)
            dest.delete(entry.oid)
    return None


def not_in_cache(repo: Repo) -> list[str]:
    """The paths of the recorded objects that DVC's cache does not hold (existence only: fast)."""
    return [entry.path for entry in entries(repo) if not entry.cache.exists(entry.oid)]


def check_runs_outside_workspace(repo: Repo) -> None:
    """Raise StageError when DVC cannot run `--temp` or queued experiments from `repo`.

    DVC (3.67) writes its cache folder's path into each such experiment's config with configobj,
    which encodes as ASCII: a non-ASCII letter in that path (a project under `lab-ü/`) fails every
    run in setup, and `dvc exp run --run-all` then waits for it forever (`wait_for_start`).
    """
    from pipeline.errors import StageError

    cache = repo.cache.local_cache_dir
    if cache and not cache.isascii():
        raise StageError(
            f"DVC cannot run experiments outside the workspace (--temp, its queue) here: its cache folder {cache} "
            "has non-ASCII letters, which DVC writes into each run's config as ASCII. Give DVC a cache with an "
            "ASCII path (dvc cache dir --local /path/without/accents), or move the project"
        )
