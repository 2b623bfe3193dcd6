"""The experiment loop against `import tensorflow`: what a user waits for, before and after a change.

Two scratch git + DVC copies of the project: this working tree, and an earlier commit (`--before`,
by default the last one whose evaluate and predict imported TensorFlow), each `dvc repro`'d once
and committed. In every round, interleaved so that machine noise falls on all alike, it times:

- `python -c "import tensorflow"`: the yardstick every other number is divided by;
- `dvc exp run -S train.seed=N` in the workspace (new params each time: no run-cache hit);
- `dvc exp run --temp ...`: what each study trial runs;
- a queued experiment: `dvc exp run --queue ...` then `dvc exp run --run-all` (DVC's worker included);
- `python -m commands.predict` of one image, with its peak memory (the child's own rusage);
- `python -m stages.check` with optimizer options, loss arguments and a schedule set.

Prints the medians, each as a ratio to the import measured in the same run.

    .venv/bin/python benchmarks/experiment_loop.py [--rounds 3] [--before REV]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project root: stages/, tests/
from tests.harness import CODE, ENV, ROOT, git_project, run, write_params

BEFORE = "2ecab4b"  # the last commit whose evaluate and predict ran Keras on TensorFlow
OPTIONS = {
    "train": {
        "optimizer": {"name": "sgd", "learning_rate": 0.01, "momentum": 0.9, "nesterov": True},
        "loss": "categorical_crossentropy",
        "loss_args": {"label_smoothing": 0.1},
        "lr_schedule": {"name": "cosine_decay", "decay_steps": 1000},
    }
}


def timed(cmd: list[str], cwd: Path) -> tuple[float, int]:
    """Wall seconds and peak resident memory (MB) of one command, which must succeed."""
    began = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - began
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed in {cwd}:\n{proc.stderr.read().decode()}")  # type: ignore[union-attr]
    return seconds, usage.ru_maxrss // 1024


def project(base: Path, name: str, rev: str | None) -> Path:
    """A trained, committed git + DVC copy of the working tree (rev None) or of commit `rev`."""
    repo = base / name
    if rev is None:
        git_project(repo)
    else:
        repo.mkdir(parents=True)
        archive = subprocess.run(["git", "archive", rev], cwd=ROOT, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(repo)], input=archive, check=True)
        for command in (["git", "init", "-q", "-b", "main"], ["git", "add", "-A"], ["git", "commit", "-qm", rev]):
            run(command, repo)
    run(["dvc", "repro"], repo)
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "dvc repro", "--allow-empty"], repo)
    x = np.load(repo / "data/raw/dataset.npz")["x_test"][0]
    Image.fromarray(255 - x).resize((280, 280)).save(repo.parent / f"{name}-digit.png")  # a person's page
    options = repo.parent / f"{name}-options"
    options.mkdir()
    (options / ".dvc").mkdir()  # check holds its lock in a DVC project
    for package in CODE:
        (options / package).symlink_to(repo / package)
    write_params(options, OPTIONS)
    return repo


def measure(repo: Path, seed: int) -> dict[str, tuple[float, int]]:
    py = sys.executable
    results = {
        "dvc exp run (workspace)": timed(["dvc", "exp", "run", "-S", f"train.seed={seed}"], repo),
        "dvc exp run --temp (a study trial)": timed(
            ["dvc", "exp", "run", "--temp", "-S", f"train.seed={seed + 1000}"], repo
        ),
    }
    run(["git", "checkout", "-q", "params.yaml"], repo)
    run(["dvc", "exp", "run", "--queue", "-S", f"train.seed={seed + 2000}"], repo)
    results["queued experiment (--run-all)"] = timed(["dvc", "exp", "run", "--run-all"], repo)
    results["predict, one image"] = timed(
        [py, "-m", "commands.predict", str(repo.parent / f"{repo.name}-digit.png")], repo
    )
    results["check with optimizer options"] = timed([py, "-m", "stages.check"], repo.parent / f"{repo.name}-options")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--before", default=BEFORE, help=f"the commit to compare with ({BEFORE})")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="bench-loop-"))
    repos = {"before": project(base, "before", args.before), "now": project(base, "now", None)}
    yardstick: list[float] = []
    samples: dict[str, dict[str, list[tuple[float, int]]]] = {name: {} for name in repos}
    for r in range(args.rounds):
        yardstick.append(timed([sys.executable, "-c", "import tensorflow"], ROOT)[0])
        for name, repo in repos.items():
            for what, value in measure(repo, 100 + r).items():
                samples[name].setdefault(what, []).append(value)
    tf = statistics.median(yardstick)
    print(f"## the experiment loop, median of {args.rounds} rounds, {os.cpu_count()} cores")
    print(f'`python -c "import tensorflow"`: {tf:.2f} s\n')
    print(f"| what | before ({args.before}) | now | before / import | now / import |")
    print("|---|---|---|---|---|")
    for what in samples["now"]:
        cells, ratios = [], []
        for name in repos:
            seconds = statistics.median(s for s, _ in samples[name][what])
            mb = max(m for _, m in samples[name][what])
            cells.append(f"{seconds:.2f} s" + (f", {mb} MB" if what.startswith(("predict", "check")) else ""))
            ratios.append(f"{seconds / tf:.2f}x")
        print(f"| {what} | {' | '.join(cells)} | {' | '.join(ratios)} |")


if __name__ == "__main__":
    main()
