"""Run a grid of experiments on DVC's queue, then report them: `python -m commands.sweep -S KEY=A,B ... --jobs N`.

Queues every combination of the `-S` values (DVC's own grid syntax, `dvc exp run --queue -S
train.loss=a,b -S train.optimizer.name=x,y`), starts N queue workers (`dvc queue start -j N`)
and waits for exactly those experiments, a line as each one ends. Then it writes the table and
picture of the experiments it ran (`commands.report`) to `--out` (by default
`reports/sweeps/<the grid>/`, so a small grid never replaces the published one) and checks that
DVC's cache holds every output they record. It exits 2, after the report of those that finished,
naming each failed experiment with the command that shows its log. It never waits forever: DVC's
`--run-all` waits for a run that failed in setup, and for workers that died, with no end.
Params that ran before come from DVC's run-cache. Not a DVC stage: it drives DVC.

    python -m commands.sweep -S train.loss=binary_crossentropy,poisson -S train.optimizer.name=adam,sgd --jobs 2
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
import sys
import time
from itertools import chain
from pathlib import Path
from typing import Any

import dvc.api
import psutil
from dvc.repo import Repo

from commands import cache_integrity, report
from pipeline import errors, runner

POLL_S = 2.0  # how often the queue is looked at
START_S = 60.0  # workers not seen by then never started
WORKER_LOGS = ".dvc/tmp/exps/celery/dvc-exp-worker-*.out"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m commands.sweep", description=__doc__.splitlines()[0])
    parser.add_argument("-S", "--set-param", action="append", default=[], metavar="KEY=A,B", help="as dvc exp run -S")
    parser.add_argument("--jobs", type=int, default=1, help="DVC queue workers (default 1)")
    parser.add_argument("--out", type=Path, help="folder for its compare.md and compare.png (reports/sweeps/<grid>)")
    parser.add_argument("--readme", type=Path, help="also fill the compare block of this page")
    return parser.parse_args()


def grid_folder(settings: list[str]) -> Path:
    """reports/sweeps/<the grid>: `-S train.loss=a,b -S train.optimizer.name=adam` -> loss=a+b_optimizer.name=adam."""
    pairs = (setting.partition("=") for setting in settings)
    parts = [f"{key.removeprefix('train.')}={values.replace(',', '+')}" for key, _, values in pairs]
    name = re.sub(r"[^\w.+=-]", "-", "_".join(parts)) or "sweep"
    if len(name) > 80:
        name = f"{name[:60]}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"
    return Path("reports/sweeps") / name


def run_dvc(*args: str) -> str:
    """Run `dvc ARGS`, its output shown as it goes; its stdout returned. Raises StageError if it fails."""
    proc = subprocess.run(["dvc", *args], stdout=subprocess.PIPE, text=True, check=False)
    sys.stdout.write(proc.stdout)
    if proc.returncode != 0:
        raise errors.StageError(f"`dvc {' '.join(args)}` failed (exit {proc.returncode}); its output is above")
    return proc.stdout


def run_queued(repo: Repo, names: list[str], jobs: int) -> None:
    """Start `jobs` queue workers and return once none of `names` is queued or running.

    Raises StageError when the workers stop (or never start) while some are still waiting; those are
    stopped and taken off the queue first, as they are when Ctrl-C or SIGTERM stops the sweep.
    """
    queue = repo.experiments.celery_queue
    queue.start_workers(count=jobs)
    print(f"running {len(names)} experiments on {jobs} DVC queue workers (follow one: dvc queue logs NAME -f)")
    began, seen, waiting = time.monotonic(), False, set(names)
    runner.on_signal(lambda: stop(sorted(waiting)))
    while waiting:
        time.sleep(POLL_S)
        pending = {entry.name for entry in chain(queue.iter_queued(), queue.iter_active())}
        for name in sorted(waiting - pending):
            waiting.discard(name)
            print(f"  {len(names) - len(waiting)} of {len(names)} ended after {time.monotonic() - began:.0f} s: {name}")
        alive = workers_alive(queue)
        seen = seen or alive
        if waiting and not alive and (seen or time.monotonic() - began > START_S):
            left = sorted(waiting)
            raise errors.StageError(
                f"DVC's queue workers stopped with {len(left)} of {len(names)} experiments unfinished "
                f"({', '.join(left)}); {stop(left)}. Why they stopped: tail {WORKER_LOGS}. Run the sweep again: "
                "what finished comes from the run-cache"
            )


def workers_alive(queue: Any) -> bool:
    """Whether one of DVC's queue workers is running: the process DVC records for it (celery's own
    answer, `worker_status`, can lag its start by seconds, and comes after a one-second wait)."""
    records = [json.loads(path.read_text(encoding="utf-8")) for path in Path(queue.wdir).glob("dvc-exp-worker-*.json")]
    if not records:
        return bool(queue.worker_status())
    return any(r.get("returncode") is None and psutil.pid_exists(r["pid"]) for r in records)


def stop(names: list[str]) -> str:
    """Stop what is left of `names` on DVC's queue and take them off it; returns the line's words.

    `dvc queue kill --force` ends a running one (its stage ends with its `dvc`); once it is gone, a
    second kill has DVC mark it failed, and only then does `dvc queue remove` take it (a queued one at once).
    """
    if not names:
        return ""
    for _ in range(20):
        subprocess.run(["dvc", "queue", "kill", "--force", *names], capture_output=True, check=False)
        if subprocess.run(["dvc", "queue", "remove", *names], capture_output=True, check=False).returncode == 0:
            return f"the sweep's {len(names)} unfinished experiments were stopped and taken off DVC's queue"
        time.sleep(0.5)
    return f"its {len(names)} unfinished experiments were stopped; `dvc queue remove {' '.join(names)}` clears them"


def main() -> None:
    args = parse_args()
    out = args.out or grid_folder(args.set_param)
    grid = [f"-S{setting}" for setting in args.set_param]
    with Repo(".") as repo:
        cache_integrity.check_runs_outside_workspace(repo)
        queued = re.findall(r"Queued experiment '([^']+)'", run_dvc("exp", "run", "--queue", *grid))
        run_queued(repo, queued, args.jobs)
    rows = dvc.api.exp_show()
    states = {row.get("Experiment"): row.get("State") for row in rows if row.get("Experiment")}
    ran = [e for e in report.experiments(rows) if e.name in queued]
    if ran:
        report.write(ran, out, args.readme)
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
    print(f"all {len(queued)} experiments finished -> {out / 'compare.md'}")


def not_in_cache(names: list[str]) -> dict[str, str]:
    """The experiments whose recorded outputs DVC's cache does not hold: {name: "path, path"}."""
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
