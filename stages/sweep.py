"""Run a grid of experiments on DVC's queue and say which failed: `python -m stages.sweep -S KEY=A,B ... --jobs N`.

Queues every combination of the `-S` values (DVC's own grid syntax, `dvc exp run --queue -S
train.loss=a,b -S train.optimizer.name=x,y`), runs them with N queue workers (`dvc exp run
--run-all --jobs N`), then checks each queued experiment's state in `dvc exp show`, and that
DVC's cache holds every output it records. DVC's `--run-all` exits 0 even when experiments failed
(and an output that did not fit into the cache is only a warning); this command names each failed
one, with the command that shows its log, and exits 2. Params that ran before come from DVC's run-cache.
Not a DVC stage: it drives DVC.

    python -m stages.sweep -S train.loss=binary_crossentropy,poisson -S train.optimizer.name=adam,sgd --jobs 2
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys

import dvc.api

from stages.lib import cache_integrity, errors, runner


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m stages.sweep", description=__doc__.splitlines()[0])
    parser.add_argument("-S", "--set-param", action="append", default=[], metavar="KEY=A,B", help="as dvc exp run -S")
    parser.add_argument("--jobs", type=int, default=1, help="DVC queue workers (default 1)")
    return parser.parse_args()


def run_dvc(*args: str) -> str:
    """Run `dvc ARGS`, its output shown as it goes; its stdout returned. Raises StageError if it fails."""
    proc = subprocess.run(["dvc", *args], stdout=subprocess.PIPE, text=True, check=False)
    sys.stdout.write(proc.stdout)
    if proc.returncode != 0:
        raise errors.StageError(f"`dvc {' '.join(args)}` failed (exit {proc.returncode}); its output is above")
    return proc.stdout


def main() -> None:
    args = parse_args()
    grid = [f"-S{setting}" for setting in args.set_param]
    queued = re.findall(r"Queued experiment '([^']+)'", run_dvc("exp", "run", "--queue", *grid))
    run_dvc("exp", "run", "--run-all", "--jobs", str(args.jobs))
    states = {row.get("Experiment"): row.get("State") for row in dvc.api.exp_show() if row.get("Experiment")}
    failed = [name for name in queued if states.get(name) != "Success"]
    if failed:
        names = ", ".join(f"{name} ({states.get(name) or 'missing'})" for name in failed)
        raise errors.StageError(
            f"{len(failed)} of {len(queued)} experiments did not finish: {names}. See why: dvc queue logs {failed[0]}"
        )
    uncached = not_in_cache(queued)
    if uncached:
        raise errors.StageError(
            f"{len(uncached)} of {len(queued)} experiments have outputs that are not in DVC's cache (its disk may be "
            f"full): {'; '.join(f'{name}: {paths}' for name, paths in uncached.items())}. Make room, then "
            f"`dvc exp remove {' '.join(uncached)}` and run the sweep again"
        )
    print(f"all {len(queued)} experiments finished")


def not_in_cache(names: list[str]) -> dict[str, str]:
    """The experiments whose recorded outputs DVC's cache does not hold: {name: "path, path"}."""
    from dvc.repo import Repo

    found = {}
    with Repo(".") as repo:
        for name in names:
            with repo.switch(name):
                missing = cache_integrity.not_in_cache(repo)
            if missing:
                found[name] = ", ".join(missing)
    return found


if __name__ == "__main__":
    runner.run(main, writes_outputs=False)
