"""Where a study run's time goes: start-up per stage (TensorFlow in train; evaluate runs LiteRT),
compilation, training, evaluation, DVC's own work, and the study's own bookkeeping; and what DVC's
run-cache saves on a revisit.

In a fresh git + DVC copy of this project (default params, `dvc repro` once, committed):
- start-up: `python -c "import stages.<name>"` for train and evaluate, ended as a stage ends
  (os._exit, no interpreter teardown), median of 3;
- the stages run by hand in the workspace (`python -m stages.train`, then `evaluate`): their wall
  time, and from `metrics/timings.json` the first epoch (compiles the loop) and the others;
- `dvc exp run --temp` of new params, twice, each stage's span read from DVC's own output lines
  (stamped as they arrive): what is left of the wall time is DVC's (copying the workspace,
  hashing, caching, committing the experiment);
- a revisit of the same params (the run-cache serves train and evaluate);
- the study's bookkeeping per run: reading the experiment's metrics back through DVC.

    .venv/bin/python benchmarks/study_cost.py
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project root: stages/, tests/
from tests.harness import ENV, git_project, run

STAGE_ENV = {**ENV, "PYTHONUNBUFFERED": "1"}


def wall(cmd: list[str], cwd: Path) -> float:
    began = time.perf_counter()
    run(cmd, cwd)
    return time.perf_counter() - began


def stamped(cmd: list[str], cwd: Path) -> tuple[float, list[tuple[float, str]]]:
    """Run `cmd`; its wall time and each output line with the moment it arrived."""
    began = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=STAGE_ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = [(time.perf_counter() - began, line.rstrip()) for line in proc.stdout]  # type: ignore[union-attr]
    if proc.wait():
        raise SystemExit(f"{' '.join(cmd)} failed:\n" + "\n".join(line for _, line in lines))
    return time.perf_counter() - began, lines


def stage_spans(lines: list[tuple[float, str]]) -> dict[str, float]:
    """Seconds from each stage's `> python -m stages.<name>` line to DVC's next `Updating lock file`."""
    spans, current = {}, None
    for t, line in lines:
        if line.startswith("> python -m stages."):
            current = (line.split("stages.")[1].split()[0], t)
        elif line.startswith("Updating lock file") and current:
            spans[current[0]] = t - current[1]
            current = None
    return spans


def main() -> None:
    repo = Path(tempfile.mkdtemp(prefix="bench-study-cost-")) / "lab"
    git_project(repo)
    run(["dvc", "repro"], repo)
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "dvc repro", "--allow-empty"], repo)
    py = sys.executable
    imports = {s: [py, "-c", f"import os, stages.{s}; os._exit(0)"] for s in ("train", "evaluate")}
    startup = {s: statistics.median(wall(cmd, repo) for _ in range(3)) for s, cmd in imports.items()}
    train_s = wall([py, "-m", "stages.train"], repo)
    timings = json.loads((repo / "metrics/timings.json").read_text())
    epochs = timings["epoch_s"]
    compile_s = epochs[0] - statistics.median(epochs[1:])
    fit_s = sum(epochs) - compile_s
    eval_s = wall([py, "-m", "stages.evaluate"], repo)
    run(["git", "checkout", "-q", "--", "."], repo)
    exps = []
    for seed in (7, 8):
        total, lines = stamped(
            ["dvc", "exp", "run", "--temp", "--name", f"cost-{seed}", "-S", f"train.seed={seed}"], repo
        )
        exps.append((total, stage_spans(lines)))
    revisit, _ = stamped(["dvc", "exp", "run", "--temp", "--name", "cost-7-again", "-S", "train.seed=7"], repo)
    os.chdir(repo)
    from commands import study_worker

    began = time.perf_counter()
    study_worker.read_metrics(study_worker.find_experiment("cost-7"))
    read_s = time.perf_counter() - began

    total = statistics.median(t for t, _ in exps)
    spans = {k: statistics.median(s.get(k, 0.0) for _, s in exps) for k in ("check", "train", "evaluate")}
    dvc_s = total - sum(spans.values())
    print("## one study run (dvc exp run --temp, new params, 10 epochs on the bundled sample), median of 2")
    print(f"wall time: {total:5.1f} s")
    print(f"  check stage:               {spans['check']:5.1f} s")
    print(f"  train stage:               {spans['train']:5.1f} s   (by hand: {train_s:.1f} s, of which:")
    print(f"    TensorFlow start-up:     {startup['train']:5.1f} s    python -c 'import stages.train', median of 3")
    print(f"    compiling the loop:      {compile_s:5.1f} s    epoch 1 - median of epochs 2-10")
    print(f"    training (10 epochs):    {fit_s:5.1f} s")
    print(f"    data, model, saving:     {train_s - startup['train'] - compile_s - fit_s:5.1f} s)")
    print(f"  evaluate stage:            {spans['evaluate']:5.1f} s   (by hand: {eval_s:.1f} s, of which:")
    print(f"    start-up (no TensorFlow): {startup['evaluate']:4.1f} s")
    print(f"    loading, predicting, plots: {eval_s - startup['evaluate']:5.1f} s)")
    print(f"  DVC's own work:            {dvc_s:5.1f} s   (start-up, workspace copy, hashing, caching, commit)")
    print(f"study bookkeeping per run:   {read_s:5.1f} s   (reading its metrics back through DVC; Optuna: ms)")
    print(f"revisit (run-cache):         {revisit:5.1f} s   ({total / revisit:.1f}x faster than a new run)")


if __name__ == "__main__":
    main()
