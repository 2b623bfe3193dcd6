"""Does DVC's cache (and a remote) hold every output dvc.lock records, byte for byte? And repair it.

    python -m stages.cache_check                     # every object is in the cache (`make repro` runs this)
    python -m stages.cache_check --verify            # ... and its bytes hash to its name
    python -m stages.cache_check --remote storage    # ... and the remote holds it too (--verify: downloads it)
    python -m stages.cache_check --verify --remote storage --repair   # puts good copies back
    python -m stages.cache_check --rev exp-a --rev HEAD~1            # what these commits/experiments record

What DVC does not check itself (`stages/lib/cache_integrity.py`): an output that `dvc repro` could
not copy into a full cache (it only warns, and exits 0); a cache file whose bytes changed (DVC does
not read its read-only cache files again); a file deleted from a remote that still has its
directory's listing (`dvc status -c` says "in sync" and `dvc push` sends nothing). `--repair` copies
a good object into the cache from the workspace (a file whose bytes match) or the remote, and onto
the remote from the cache. Exit 2, with one line, when something is missing or corrupt after that.
Not a DVC stage.
"""

from __future__ import annotations

import argparse
import contextlib
from typing import TYPE_CHECKING

from stages.lib import cache_integrity, runner
from stages.lib.errors import StageError

if TYPE_CHECKING:
    from dvc_data.hashfile.db import HashFileDB


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m stages.cache_check", description=__doc__.splitlines()[0])
    parser.add_argument("--verify", action="store_true", help="read every object and check its hash")
    parser.add_argument("--remote", metavar="NAME", help="check this DVC remote too (see: dvc remote list)")
    parser.add_argument("--repair", action="store_true", help="put good copies back where one is missing or bad")
    parser.add_argument("--rev", action="append", metavar="REV", help="a commit or experiment (default: the workspace)")
    return parser.parse_args()


def main() -> None:
    from dvc.exceptions import DvcException  # a second's import: after --help

    args = parse_args()
    try:
        problems, checked = survey(args)
    except DvcException as exc:  # not a DVC repository, an unknown remote or revision, a remote that fails
        raise StageError(" ".join(str(exc).split())) from None
    where = f"DVC's cache and remote '{args.remote}'" if args.remote else "DVC's cache"
    if problems:
        advice = (
            "no good copy is left in the workspace, the cache or the remote: `dvc repro --force` makes the outputs "
            "again (the same params give the same bytes), or pull them from another clone's cache"
            if args.repair
            else "run this again with --repair: it copies good objects into the cache from the workspace or the "
            "remote, and onto the remote from the cache (make room first if a disk is full)"
        )
        print("\n".join(problems))
        shown = ", ".join(problems[:4]) + (f" and {len(problems) - 4} more (listed above)" if len(problems) > 4 else "")
        raise StageError(f"{len(problems)} object(s) are not right in {where}: {shown}; {advice}")
    how = "read and hashed" if args.verify else "present"
    print(f"all {len(checked)} objects that dvc.lock records are {how} in {where}")


def survey(args: argparse.Namespace) -> tuple[list[str], set[str]]:
    """(what is wrong, each object checked once) over the workspace's or each `--rev`'s records."""
    from dvc.repo import Repo

    checked: set[str] = set()
    problems: list[str] = []
    remotes: dict[str, HashFileDB] = {}
    with Repo(".") as repo:
        for rev in args.rev or [None]:
            with repo.switch(rev) if rev else contextlib.nullcontext():
                for entry in cache_integrity.entries(repo):
                    if entry.oid in checked:
                        continue
                    checked.add(entry.oid)
                    remote = None
                    if args.remote:
                        if entry.hash_name not in remotes:
                            remotes[entry.hash_name] = repo.cloud.get_remote_odb(args.remote, hash_name=entry.hash_name)
                        remote = remotes[entry.hash_name]
                    problems += check(entry, remote, args)
    return problems, checked


def check(entry: cache_integrity.Entry, remote: HashFileDB | None, args: argparse.Namespace) -> list[str]:
    """What is wrong with one object, after `--repair` tried to mend it: ['<path> (missing from the cache)']."""
    test = cache_integrity.intact if args.verify else cache_integrity.present
    into_cache = [(None, "the workspace")] + ([(remote, f"remote '{args.remote}'")] if remote else [])
    problems = []
    for db, place, sources in (
        (entry.cache, "the cache", into_cache),
        (remote, f"remote '{args.remote}'", [(entry.cache, "the cache")]),
    ):
        if db is None or test(db, entry):
            continue
        state = "corrupt in" if db.exists(entry.oid) else "missing from"
        fixed = cache_integrity.repair(entry, sources, db) if args.repair else None
        if fixed:
            print(f"repaired {entry.path} ({state} {place}) from {fixed}")
        else:
            problems.append(f"{entry.path} ({state} {place})")
    return problems


if __name__ == "__main__":
    runner.run(main, writes_outputs=False)
