"""How much faster the stages that do not import TensorFlow start than train, the one that does.

Times `python -c "import stages.<name>"` for each stage (ended with os._exit, as a stage ends:
without interpreter teardown), interleaved, several rounds, and prints
the medians and the ratio to `train` (measured in the same run, so machine noise cancels out).

    .venv/bin/python benchmarks/startup.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("check", "download", "normalize", "train", "evaluate", "predict", "report")


def import_seconds(stage: str) -> float:
    start = time.perf_counter()
    code = f"import os, stages.{stage}; os._exit(0)"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    rounds = parser.parse_args().rounds
    times: dict[str, list[float]] = {s: [] for s in STAGES}
    for _ in range(rounds):
        for stage in STAGES:
            times[stage].append(import_seconds(stage))
    train = statistics.median(times["train"])
    print(f"| stage | start-up (median of {rounds}) | vs train |")
    print("|---|---|---|")
    for stage in STAGES:
        median = statistics.median(times[stage])
        print(f"| {stage} | {median:.2f} s | {median / train:.2f}x |")


if __name__ == "__main__":
    main()
