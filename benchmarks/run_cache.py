"""DVC's run-cache: an experiment whose params ran before, against a fresh one, in one run.

In a fresh git + DVC clone of this project (default params, `dvc repro` once, committed):
`dvc exp run -S train.seed=7` (new params: check, train and evaluate run), then back to the
committed params (`-S train.seed=42`: served by the run-cache), then `-S train.seed=7` again
(served by the run-cache). Prints each wall time and the ratio fresh / revisit.

    .venv/bin/python benchmarks/run_cache.py
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project root: stages/, tests/
from tests.harness import ROOT, run


def timed_exp(repo: Path, change: str) -> tuple[float, list[str]]:
    start = time.perf_counter()
    out = run(["dvc", "exp", "run", "-S", change], repo).stdout
    ran = [line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")]
    return time.perf_counter() - start, ran


def main() -> None:
    repo = Path(tempfile.mkdtemp(prefix="bench-run-cache-")) / "lab"
    run(["git", "clone", "-q", str(ROOT), str(repo)], ROOT)
    run(["dvc", "repro"], repo)
    run(["git", "commit", "-qam", "dvc repro", "--allow-empty"], repo)
    fresh, ran_fresh = timed_exp(repo, "train.seed=7")
    back, ran_back = timed_exp(repo, "train.seed=42")
    revisit, ran_revisit = timed_exp(repo, "train.seed=7")
    print("## run-cache: dvc exp run, default params (10 epochs on the bundled sample)")
    print(f"new params (train.seed=7):          {fresh:5.1f} s   ran: {', '.join(ran_fresh) or 'nothing'}")
    print(f"back to the committed (seed=42):    {back:5.1f} s   ran: {', '.join(ran_back) or 'nothing'}")
    print(f"revisit (train.seed=7 again):       {revisit:5.1f} s   ran: {', '.join(ran_revisit) or 'nothing'}")
    print(f"fresh / revisit: {fresh / revisit:.1f}x")
    # check depends on params.yaml's bytes, which `-S` rewrites in DVC's layout: it may run (0.3 s)
    if {"train", "evaluate"} & {*ran_back, *ran_revisit}:
        raise SystemExit("a revisit trained or evaluated: the run-cache did not serve it")


if __name__ == "__main__":
    main()
