"""Does DVC's cache (and a remote) hold every output dvc.lock records, byte for byte? And repair it.

    python -m commands.cache_check                     # every object is in the cache (`make repro` runs this)
    python -m commands.cache_check --verify            # ... and its bytes hash to its name
    python -m commands.cache_check --remote storage    # ... and the remote holds it too (--verify: downloads it)
    python -m commands.cache_check --verify --remote storage --repair   # puts good copies back
    python -m commands.cache_check --rev exp-a --rev HEAD~1            # what these commits/experiments record

What DVC does not check itself (`commands/cache_integrity.py`): an output that `dvc repro` could
not copy into a full cache (it only warns, and exits 0); a cache file whose bytes changed (DVC does
not read its read-only cache files again); a file deleted from a remote that still has its
directory's listing (`dvc status -c` says "in sync" and `dvc push` sends nothing). `--repair` copies
a good object into the cache from the workspace (a file whose bytes match) or the remote, and onto
the remote from the cache. Exit 2, with one line, when something is missing or corrupt after that,
or when the remote does not answer within `--timeout` seconds (300). Not a DVC stage.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
from typing import TYPE_CHECKING

from commands import cache_integrity
from pipeline import runner
from pipeline.errors import StageError

if TYPE_CHECKING:
    from types import FrameType

    from dvc_data.hashfile.db import HashFileDB

PROG = "python -m commands.cache_check"


def parse_args() -> argparse.Namespace:
    def named(text: str) -> str:
        if not text.strip():
            raise argparse.ArgumentTypeError("must not be empty")
        return text

    def seconds(text: str) -> float:
        value = float(text)
        if not 0 < value <= 1e6:
            raise argparse.ArgumentTypeError(f"must be in (0, 1e6] seconds, got {text}")
        return value

    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("--verify", action="store_true", help="read every object and check its hash")
    parser.add_argument("--remote", type=named, metavar="NAME", help="check this DVC remote too (see: dvc remote list)")
    parser.add_argument("--repair", action="store_true", help="put good copies back where one is missing or bad")
    parser.add_argument(
        "--rev", type=named, action="append", metavar="REV", help="a commit or experiment (default: the workspace)"
    )
    parser.add_argument(
        "--timeout", type=seconds, default=300, metavar="S", help="for everything, at most (default 300)"
    )
    return parser.parse_args()


def main() -> None:
    from dvc.exceptions import DvcException  # a second's import: after --help

    args = parse_args()
    where = f"DVC's cache and remote '{args.remote}'" if args.remote else "DVC's cache"

    def too_long(signum: int, frame: FrameType | None) -> None:
        raise StageError(f"{where} did not answer within {args.timeout:g} s (--timeout); is the remote reachable?")

    signal.signal(signal.SIGALRM, too_long)
    signal.setitimer(signal.ITIMER_REAL, args.timeout)
    try:
        problems, checked = survey(args)
    except DvcException as exc:  # not a DVC repository, an unknown remote or revision, a remote that fails
        raise StageError(" ".join(str(exc).split())) from None
    except (StageError, KeyboardInterrupt):
        raise
    except Exception as exc:  # the remote's own library (botocore, ...) failing, or a local path
        if not args.remote or (isinstance(exc, OSError) and exc.filename):  # the runner's line names a local path
            raise
        said = " ".join(str(exc).split())[:300]
        raise StageError(f"remote '{args.remote}' failed: {type(exc).__name__}: {said} (dvc remote list)") from None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    if problems:
        print("\n".join(problems))
        shown = ", ".join(problems[:4]) + (f" and {len(problems) - 4} more (listed above)" if len(problems) > 4 else "")
        raise StageError(f"{len(problems)} object(s) are not right in {where}: {shown}; {advice(args, problems)}")
    how = "read and hashed" if args.verify else "present"
    print(f"all {len(checked)} objects that dvc.lock records are {how} in {where}")


def advice(args: argparse.Namespace, problems: list[str]) -> str:
    """What to run next, with the flags that found the problems."""
    flags = " ".join(["--verify"] * args.verify + [f"--remote {args.remote}"] * bool(args.remote)
                     + [f"--rev {rev}" for rev in args.rev or []])  # fmt: skip
    if not args.repair:
        return (
            f"`{PROG} {flags} --repair`".replace("  ", " ")
            + " copies good objects into the cache from the workspace or "
            "the remote, and onto the remote from the cache (make room first if a disk is full)"
            + ("" if args.verify else "; --verify also reads each object's bytes")
        )
    look = "" if args.remote else " add --remote NAME to look on a remote too (dvc remote list);"
    listing = " a directory's listing (NAME/) comes back from its intact files with `dvc commit -f`;" * any(
        "/ (" in problem for problem in problems
    )
    return (
        f"no good copy was found in the workspace, the cache{' or the remote' if args.remote else ''}:{look}{listing} "
        "else `dvc repro --force` makes the outputs again at the revision that records them (the same params "
        "give the same bytes)"
    )


def survey(args: argparse.Namespace) -> tuple[list[str], set[str]]:
    """(what is wrong, each object checked once) over the workspace's or each `--rev`'s records."""
    from dvc.repo import Repo

    found: dict[str, tuple[cache_integrity.Entry, str | None]] = {}  # oid -> (entry, the revision that named it)
    with Repo(".") as repo:
        for rev in args.rev or [None]:
            with repo.switch(rev) if rev else contextlib.nullcontext():
                for entry in cache_integrity.entries(repo):
                    found.setdefault(entry.oid, (entry, rev))
        remotes: dict[str, HashFileDB] = {}
        if args.remote:
            for entry, _ in found.values():
                if entry.hash_name not in remotes:
                    remotes[entry.hash_name] = repo.cloud.get_remote_odb(args.remote, hash_name=entry.hash_name)
    on_remote = {oid for name, db in remotes.items()
                 for oid in db.oids_exist([e.oid for e, _ in found.values() if e.hash_name == name])}  # fmt: skip
    problems = []
    for entry, rev in found.values():
        problems += check(entry, rev, remotes.get(entry.hash_name), entry.oid in on_remote, args)
    return problems, set(found)


def check(
    entry: cache_integrity.Entry, rev: str | None, remote: HashFileDB | None, on_remote: bool, args: argparse.Namespace
) -> list[str]:
    """What is wrong with one object, after `--repair` tried to mend it: ['<path> (missing from the cache)']."""
    into_cache = [(None, "the workspace")] + ([(remote, f"remote '{args.remote}'")] if remote else [])
    at = f" at {rev}" if rev else ""
    problems = []
    for db, place, sources, there in (
        (entry.cache, "the cache", into_cache, entry.cache.exists(entry.oid)),
        (remote, f"remote '{args.remote}'", [(entry.cache, "the cache")], on_remote),
    ):
        if db is None or (there and (not args.verify or cache_integrity.intact(db, entry))):
            continue
        state = "corrupt in" if there else "missing from"
        fixed = cache_integrity.repair(entry, sources, db) if args.repair else None
        if fixed:
            print(f"repaired {entry.path}{at} ({state} {place}) from {fixed}")
            continue
        removed = ", removed" if there and args.repair else ""
        problems.append(f"{entry.path}{at} ({state} {place}{removed})")
    return problems


if __name__ == "__main__":
    runner.run(main, writes_outputs=False)
