"""What `GradientStats` (train.log_gradients) costs, against the epoch it is logged for.

The default model (Flatten -> Dense(128, relu) -> Dense(10, softmax), sparse crossentropy, Adam,
batch 32) trained by the pipeline's loop (`pipeline.engine`) for 10 epochs on the bundled
sample's 3,600 training digits (the smallest epoch, so the hardest case for a fixed cost per
epoch), alternately with and without the callback (probe batch: 64 digits, as train's), 3 times each, in
one process. Prints the callback's own time per epoch (timed around its hooks), the median epoch,
the ratio, the whole fit's time both ways, and checks that logging changed no weight.

    .venv/bin/python benchmarks/gradient_stats.py [--images 60000]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project root: stages/, tests/

import keras
import numpy as np
import tensorflow as tf

from pipeline import datasets, engine, params
from pipeline.gradient_stats import GradientStats
from stages.download import download

EPOCHS, REPEATS = 10, 3
PROBE = 64  # stages/train.py's PROBE_ROWS


class Timed(GradientStats):
    """GradientStats with a stopwatch around its hooks (`setup`: on_train_begin and the first epoch's)."""

    spent = 0.0
    setup = 0.0

    def on_train_begin(self, logs: dict | None = None) -> None:
        began = time.perf_counter()
        super().on_train_begin(logs)
        Timed.setup += time.perf_counter() - began

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        began = time.perf_counter()
        super().on_epoch_begin(epoch, logs)
        if epoch == 0:  # traces the snapshot function: a one-off
            Timed.setup += time.perf_counter() - began
        else:
            Timed.spent += time.perf_counter() - began

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        began = time.perf_counter()
        super().on_epoch_end(epoch, logs)
        if epoch == 0:  # traces the statistics function: a one-off, like the loop's own compilation
            Timed.setup += time.perf_counter() - began
        else:
            Timed.spent += time.perf_counter() - began


def fit(x: np.ndarray, y: np.ndarray, with_stats: bool) -> tuple[float, list[float], list[np.ndarray]]:
    keras.utils.set_random_seed(42)
    model = keras.Sequential(
        [keras.Input((28, 28)), keras.layers.Flatten(), keras.layers.Dense(128, activation="relu"),
         keras.layers.Dense(10, activation="softmax")]
    )  # fmt: skip
    loss, optimizer = keras.losses.SparseCategoricalCrossentropy(), keras.optimizers.Adam(0.001)
    metrics = lambda: [keras.metrics.SparseCategoricalAccuracy(name="accuracy")]  # noqa: E731
    loop = engine.Loop(model, loss, metrics, optimizer, tf.distribute.get_strategy(),
                       steps_per_execution=256, jit_compile=True)  # fmt: skip
    callbacks = [Timed(loss, x[:PROBE], y[:PROBE])] if with_stats else []
    began = time.perf_counter()
    loop.fit(x, y, epochs=EPOCHS, batch_size=32, validation_split=0.1, seed=42, callbacks=callbacks, verbose=0)
    return time.perf_counter() - began, loop.epoch_seconds, [w.numpy() for w in model.weights]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=0, help="tile the training digits to this many (0: as is)")
    images = parser.parse_args().images
    engine.set_threads(1)
    tf.config.experimental.enable_op_determinism()
    data = download(params.DataParams())
    x, y = data["x_train"].astype("float32") / 255, data["y_train"]
    if images:
        reps = -(-images // len(x))
        x, y = np.concatenate([x] * reps)[:images], np.concatenate([y] * reps)[:images]
    fit(x, y, True)  # warm-up: TensorFlow's and XLA's first-call costs, both ways
    fit(x, y, False)
    plain, logged, epochs, spent, setup = [], [], [], [], []
    for _ in range(REPEATS):
        Timed.spent = Timed.setup = 0.0
        seconds, epoch_s, w_logged = fit(x, y, True)
        logged.append(seconds)
        spent.append(Timed.spent / (EPOCHS - 1))  # epochs 2-10; epoch 1's hooks trace, counted as setup
        setup.append(Timed.setup)
        seconds, epoch_s, w_plain = fit(x, y, False)
        plain.append(seconds)
        epochs += epoch_s[1:]  # epoch 1 compiles
        same = all(np.array_equal(a, b) for a, b in zip(w_logged, w_plain, strict=True))
    per_epoch, epoch = statistics.median(spent), statistics.median(epochs)
    n_train = datasets.fit_validation_counts(len(x), 0.1)[0]
    print(f"## GradientStats on {n_train} training digits, {EPOCHS} epochs, probe batch {PROBE}, medians of {REPEATS}")
    print(f"callback per epoch: {per_epoch * 1000:.2f} ms; epoch (2-{EPOCHS}): {epoch * 1000:.1f} ms; "
          f"ratio {per_epoch / epoch:.1%} (budget 5%)")  # fmt: skip
    print(f"once per fit (tracing the gradient function): {statistics.median(setup):.2f} s")
    print(f"whole fit: {statistics.median(plain):.2f} s without, {statistics.median(logged):.2f} s with")
    print(f"weights identical with and without: {same}")
    if not same:
        raise SystemExit("logging gradients changed the training")


if __name__ == "__main__":
    main()
