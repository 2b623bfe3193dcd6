"""`make sweep` one experiment at a time against DVC's queue with several workers, in one run.

In a fresh git + DVC clone of this project (default params, `dvc repro` once), the loss x
optimizer grid is queued and run with `dvc exp run --run-all -j 1`, then removed, queued again
and run with `-j JOBS`. Prints both wall times, the ratio, and whether every experiment's
metrics (test accuracy and loss, per params) are the same both ways, to the last digit.

    .venv/bin/python benchmarks/sweep.py [--jobs 2] [--losses a,b,...] [--optimizers x,y]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import dvc.api

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project root: stages/, tests/
from tests.harness import ROOT, run

LOSSES = (
    "sparse_categorical_crossentropy,categorical_crossentropy,binary_crossentropy,categorical_focal_crossentropy,"
    "binary_focal_crossentropy,kl_divergence,poisson,categorical_hinge,squared_hinge,mean_squared_error"
)


def column(row: dict, name: str) -> object:
    """DVC prefixes a column with its file only where two files share the name."""
    return next(row[key] for key in (name, f"params.yaml:{name}", f"metrics/eval.json:{name}") if key in row)


def sweep(repo: Path, losses: str, optimizers: str, jobs: int) -> tuple[float, dict[tuple, tuple]]:
    """Queue the grid, run it with `jobs` workers; wall seconds and {(loss, optimizer): metrics}."""
    grid = ["-S", f"train.loss={losses}", "-S", f"train.optimizer.name={optimizers}"]
    run(["dvc", "exp", "run", "--queue", *grid], repo)
    start = time.perf_counter()
    run(["dvc", "exp", "run", "--run-all", "--jobs", str(jobs)], repo)
    seconds = time.perf_counter() - start
    results = {}
    for row in dvc.api.exp_show(repo=str(repo)):
        if row.get("Experiment"):
            key = (column(row, "train.loss"), column(row, "train.optimizer.name"))
            results[key] = (column(row, "test.accuracy"), column(row, "test.log_loss"))
    failed = run(["dvc", "queue", "status"], repo).stdout.count("Failed")
    if failed:
        raise SystemExit(f"{failed} experiments failed: dvc queue logs in {repo}")
    run(["dvc", "exp", "remove", "--all-commits"], repo)
    shutil.rmtree(repo / ".dvc/cache/runs", ignore_errors=True)  # the next sweep trains too, not restores
    return seconds, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--losses", default=LOSSES)
    parser.add_argument("--optimizers", default="adam,sgd,rmsprop")
    args = parser.parse_args()
    repo = Path(tempfile.mkdtemp(prefix="bench-sweep-")) / "lab"
    run(["git", "clone", "-q", str(ROOT), str(repo)], ROOT)
    run(["dvc", "repro"], repo)
    run(["git", "commit", "-qam", "dvc repro", "--allow-empty"], repo)
    count = len(args.losses.split(",")) * len(args.optimizers.split(","))
    one, results_one = sweep(repo, args.losses, args.optimizers, 1)
    many, results_many = sweep(repo, args.losses, args.optimizers, args.jobs)
    print(f"## sweep: {count} experiments, {os.cpu_count()} cores")
    print(f"one at a time: {one:.0f} s   {args.jobs} queue workers: {many:.0f} s   speed-up: {one / many:.2f}x")
    same = results_one == results_many and len(results_one) == count
    print(f"every experiment's test accuracy and loss the same both ways: {'yes' if same else 'NO'}")
    if not same:
        for key in sorted(set(results_one) | set(results_many)):
            print(f"  {key}: {results_one.get(key)} vs {results_many.get(key)}")
        raise SystemExit(1)


if __name__ == "__main__":
    main()
