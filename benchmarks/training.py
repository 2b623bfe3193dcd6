"""The train stage against the tutorial's plain `model.fit`, at the same math, side by side.

Same model (Flatten -> Dense(128, relu) -> Dense(10, sigmoid)), binary_crossentropy, Adam
(lr 0.001), batch 32, validation_split 0.1, so the same number of updates. Prints:

1. speed: the marginal fit time of an epoch (fit time at 5 epochs minus at 1, over 4) on
   `--images` images tiled from the bundled sample's real digits, each run a fresh process,
   the tutorial, the stage, the stage without its portable pins (XLA and oneDNN for this CPU)
   and the stage without XLA interleaved, `--rounds` times; medians and the ratios to the
   tutorial, and portable against host-native;
2. accuracy: test accuracy on the bundled sample after 10 epochs, `--seeds` seeds each (the
   tutorial's script has no seed: each of its runs is a fresh draw), means and the difference;
3. memory: the train stage's peak RSS on `--images` images (from the kernel, os.wait4);
4. growth: the stage's epoch time (median of epochs 2-5, timed inside the stage) at 10%, 33% and
   100% of `--images`, and the straight line through them (fixed cost per epoch + cost per
   image) with each point's distance from it.

Uses the bundled sample (scaled x / 255, as normalize's default), so it runs offline anywhere.

    .venv/bin/python benchmarks/training.py [--images 60000] [--rounds 3] [--seeds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from ruamel.yaml import YAML

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline import params
from stages.download import download

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = download(params.DataParams())  # the bundled real digits, offline
TUTORIAL_MATH = {"loss": "binary_crossentropy", "epochs": 1, "batch_size": 32, "validation_split": 0.1}


def workdir(images: int | None, seed: int = 42) -> Path:
    """A folder the train stage runs in: params.yaml at the tutorial's math, data/normalized."""
    folder = Path(tempfile.mkdtemp(prefix="bench-train-"))
    (folder / "data/normalized").mkdir(parents=True)
    (folder / "data/normalized/stats.json").write_text(json.dumps({"method": "scale", "mean": 0.0, "std": 1.0}))
    data = {k: v.astype(np.float32) / 255 if k.startswith("x") else v for k, v in SAMPLE.items()}
    if images:  # tile the sample's real digits up to `images`
        reps = -(-images // len(data["x_train"]))
        data["x_train"] = np.tile(data["x_train"], (reps, 1, 1))[:images]
        data["y_train"] = np.tile(data["y_train"], reps)[:images]
    np.savez(folder / "data/normalized/dataset.npz", **data)
    yaml = YAML()
    config = yaml.load(ROOT / "params.yaml")
    config["train"].update({**TUTORIAL_MATH, "seed": seed})
    config["model"].update({"hidden_units": [128], "activation": "relu", "output_activation": "sigmoid"})
    yaml.dump(config, folder / "params.yaml")
    return folder


# The stage with `stages/__init__.py`'s portable pins undone, as it ran before them: XLA and oneDNN
# compile and dispatch for this CPU, oneDNN's graph rewrites on (TensorFlow's default).
HOST_NATIVE = (
    "import os, runpy, stages\n"
    "os.environ.update(XLA_FLAGS='', TF_ENABLE_ONEDNN_OPTS='1'); os.environ.pop('ONEDNN_MAX_CPU_ISA')\n"
    "runpy.run_module('stages.train', run_name='__main__', alter_sys=True)\n"
)


def run_stage(folder: Path, epochs: int, jit_compile: bool = True, host_native: bool = False) -> dict[str, float]:
    """Fit seconds and peak RSS (MB) of `python -m stages.train` in `folder` (`host_native`: without the
    portable pins)."""
    yaml = YAML()
    config = yaml.load(folder / "params.yaml")
    config["train"]["epochs"] = epochs
    config["train"]["speed"]["jit_compile"] = jit_compile
    yaml.dump(config, folder / "params.yaml")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"}
    command = [sys.executable, "-c", HOST_NATIVE] if host_native else [sys.executable, "-m", "stages.train"]
    proc = subprocess.Popen(command, cwd=folder, env=env, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"train stage failed in {folder} (exit {proc.returncode})")
    fit_s = json.loads((folder / "metrics/timings.json").read_text())["train_time_s"]
    return {"fit_s": fit_s, "peak_rss_mb": usage.ru_maxrss / 1024}


def test_accuracy(folder: Path) -> float:
    """The shipped model's accuracy on the sample's test digits, as evaluate computes it."""
    code = (
        "import json, keras, numpy as np\n"
        "d = np.load('data/normalized/dataset.npz'); s = json.load(open('data/normalized/stats.json'))\n"
        "raw = np.clip(np.rint((d['x_test'] * s['std'] + s['mean']) * 255), 0, 255).astype('uint8')\n"
        "p = keras.saving.load_model('models/model.keras').predict(raw, verbose=0).argmax(1)\n"
        "print(float((p == d['y_test']).mean()))\n"
    )
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    out = subprocess.run([sys.executable, "-c", code], cwd=folder, env=env, capture_output=True, text=True, check=True)
    return float(out.stdout.split()[-1])


def run_tutorial(folder: Path, epochs: int) -> dict[str, float]:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    out = folder / "tutorial.json"
    script = str(ROOT / "benchmarks/tutorial.py")
    subprocess.run([sys.executable, script, str(epochs), str(out)], cwd=folder, env=env, check=True)
    return json.loads(out.read_text())


def marginal_epoch(run: object, folder: Path) -> float:
    """(fit time at 5 epochs - fit time at 1 epoch) / 4: an epoch without start-up and compilation."""
    return (run(folder, 5)["fit_s"] - run(folder, 1)["fit_s"]) / 4  # type: ignore[operator]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=60_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--parts", default="speed,accuracy,memory,growth", help="which of them, comma-separated")
    args = parser.parse_args()
    parts = args.parts.split(",")

    big = workdir(args.images)
    if "speed" in parts:
        speed_part(big, args.images, args.rounds)
    if "accuracy" in parts:
        accuracy_part(args.seeds)
    if "memory" in parts:
        print(f"## memory: train stage peak RSS, {args.images:,} images, 4 epochs")
        print(f"{run_stage(big, 4)['peak_rss_mb']:.0f} MB")
    shutil.rmtree(big)
    if "growth" in parts:
        growth_part(args.images)


def speed_part(big: Path, images: int, rounds: int) -> None:
    def without_xla(folder: Path, epochs: int) -> dict[str, float]:
        return run_stage(folder, epochs, jit_compile=False)

    def host_native(folder: Path, epochs: int) -> dict[str, float]:
        return run_stage(folder, epochs, host_native=True)

    runs = {
        "tutorial model.fit": run_tutorial,
        "train stage (portable: the default)": run_stage,
        "train stage, host-native (before the portable pins)": host_native,
        "train stage, jit_compile false": without_xla,
    }
    speed: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            speed[name].append(marginal_epoch(run, big))
    print(f"## speed: marginal fit time per epoch, {images:,} images, batch 32, median of {rounds}")
    tutorial = statistics.median(speed["tutorial model.fit"])
    for name in runs:
        seconds = statistics.median(speed[name])
        print(f"{name}: {seconds:.3f} s   speed-up: {tutorial / seconds:.2f}x")
    portable = statistics.median(speed["train stage (portable: the default)"])
    native = statistics.median(speed["train stage, host-native (before the portable pins)"])
    print(f"portable / host-native: {portable / native:.2f}x the time per epoch")


def accuracy_part(seeds: int) -> None:
    accuracy: dict[str, list[float]] = {"tutorial": [], "stage": []}
    for seed in range(seeds):
        sample = workdir(None, seed=seed)
        accuracy["tutorial"].append(run_tutorial(sample, 10)["test_accuracy"])
        run_stage(sample, 10)
        accuracy["stage"].append(test_accuracy(sample))
        shutil.rmtree(sample)
    t_acc, s_acc = statistics.mean(accuracy["tutorial"]), statistics.mean(accuracy["stage"])
    print(f"## accuracy: bundled sample, 10 epochs, mean of {seeds} seeds (each: tutorial, stage)")
    print(f"tutorial: {t_acc:.4f} {accuracy['tutorial']}   stage: {s_acc:.4f} {accuracy['stage']}")
    print(f"difference: {100 * (s_acc - t_acc):+.2f} points")


def growth_part(images: int) -> None:
    print("## growth: train stage time per epoch (median of epochs 2-5) by training-set size")
    sizes, seconds = [images // 10, images // 3, images], []
    for size in sizes:  # one process each; the median of epochs 2-5 (the first compiles)
        folder = workdir(size)
        run_stage(folder, 5)
        seconds.append(statistics.median(json.loads((folder / "metrics/timings.json").read_text())["epoch_s"][1:]))
        shutil.rmtree(folder)
    slope, fixed = np.polyfit(sizes, seconds, 1)  # least squares: seconds = fixed + slope * images
    for size, measured in zip(sizes, seconds, strict=True):
        line = fixed + slope * size
        print(f"{size:>7,} images: {measured:.3f} s per epoch (the line: {line:.3f} s, {measured / line - 1:+.0%})")
    print(f"a straight line: {1e3 * fixed:.0f} ms per epoch fixed + {1e6 * slope:.2f} ms per 1,000 images")


if __name__ == "__main__":
    main()
