"""Stage `train`: data/normalized/{dataset.npz, stats.json} -> models/, metrics/train/.

Builds Flatten -> Dense(hidden_units, activation) [-> Dropout] -> Dense(10) from `model.*`,
ending as `losses.head` decides for the loss (its activation, logits or not), and trains it
with the loss and optimizer from `train.*` through `pipeline.engine`'s loop (model.fit's math,
compiled; on one machine or several, `train.distribute`) and dvclive's `DVCLiveCallback`:
per-epoch loss/accuracy curves (train and validation) and a summary with the last epoch and the
saved one (the epoch whose weights the model ends with). Seeded and deterministic on CPU: the same params give the
same bytes; the training time goes to the log line and to git-ignored `metrics/timings.json`.
What it saves stands on its own (`pipeline.serving`): raw uint8 images in, probabilities
out, as a LiteRT flatbuffer, a Keras file and a SavedModel, with its card (`models/model.json`).
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import keras
import tensorflow as tf
from dvclive import Live
from dvclive.keras import DVCLiveCallback

from pipeline import atomic, datasets, engine, export, losses, optimizers, params, runner, serving
from pipeline.errors import StageError
from pipeline.gradient_stats import GradientStats

DATA = Path("data/normalized/dataset.npz")
STATS = Path("data/normalized/stats.json")
LIVE_DIR = Path("metrics/train")
TIMINGS = Path("metrics/timings.json")  # git-ignored, not a DVC output
PROBE_ROWS = 64  # the fixed batch train.log_gradients measures gradients on (benchmarks/gradient_stats.py)


def configure(t: params.TrainParams) -> tuple[tf.distribute.Strategy, list[keras.callbacks.Callback]]:
    """Threads, the distribution strategy, Keras' one-step trial of the params' arguments, seeds, op
    determinism and the precision policy, in that order; with the callbacks that watch the cluster
    (multi_worker only). The trial (what check's signature test cannot judge: Keras' own first step)
    runs before the seed is set, so the model's initial weights never depend on whether it ran."""
    engine.set_threads(t.speed.threads)
    outputs = (LIVE_DIR, serving.MODEL_DIR, TIMINGS)
    watch = [engine.ClusterDeadline(t.cluster_timeout_s, outputs)] if t.distribute == "multi_worker" else []
    strategy = engine.strategy_for(t.distribute)  # first: multi_worker must start before other ops
    engine.trial(t)
    keras.utils.set_random_seed(t.seed)
    tf.config.experimental.enable_op_determinism()
    if t.mixed_precision:  # float16 where a GPU has fast float16; on a CPU bfloat16
        gpu = bool(tf.config.list_physical_devices("GPU"))
        keras.mixed_precision.set_global_policy("mixed_float16" if gpu else "mixed_bfloat16")
    return strategy, watch


def build_model(m: params.ModelParams, wiring: losses.Head) -> keras.Sequential:
    """The tutorial's MLP: Flatten -> Dense(units, activation) [-> Dropout] ... -> Dense(10, wiring.activation)."""
    layers: list[keras.layers.Layer] = [keras.Input(shape=(28, 28)), keras.layers.Flatten()]
    for units in m.hidden_units:
        layers.append(keras.layers.Dense(units, activation=m.activation))
        if m.dropout > 0:
            layers.append(keras.layers.Dropout(m.dropout))
    # float32 outputs under mixed precision too (the same layer when it is off)
    layers.append(keras.layers.Dense(losses.NUM_CLASSES, activation=wiring.activation, dtype="float32"))
    return keras.Sequential(layers, name="mlp")


def build_optimizer(t: params.TrainParams) -> keras.optimizers.Optimizer:
    """`train.optimizer` (and its schedule), wrapped for loss scaling under mixed_float16."""
    optimizer = optimizers.build(t.optimizer, t.lr_schedule)
    if keras.mixed_precision.global_policy().name == "mixed_float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def early_stopping(es: params.EarlyStoppingParams) -> keras.callbacks.EarlyStopping | None:
    """Keras' EarlyStopping from `train.early_stopping`, or None when it is off."""
    if not es.enabled:
        return None
    return keras.callbacks.EarlyStopping(
        monitor=es.monitor,
        mode="max" if es.monitor.endswith("accuracy") else "min",  # Keras cannot tell for this loop's metrics
        patience=es.patience,
        min_delta=es.min_delta,
        restore_best_weights=es.restore_best_weights,
    )


def saved_epoch(history: dict[str, list[float]], stopper: keras.callbacks.EarlyStopping | None) -> int:
    """0-based epoch whose weights the model ends with: the one EarlyStopping restored, else the last."""
    if stopper is not None and stopper.restore_best_weights and stopper.best_weights is not None:
        return int(stopper.best_epoch)
    return len(history["loss"]) - 1


class StopOnDivergence(keras.callbacks.Callback):
    """End training with one line once a logged loss or metric is NaN or infinite.

    Keras' own TerminateOnNaN stops quietly, and the run would ship a NaN model. Raises StageError.
    """

    def __init__(self, optimizer: params.Named) -> None:
        super().__init__()
        self.optimizer = optimizer

    def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
        bad = {name: value for name, value in (logs or {}).items() if not math.isfinite(value)}
        if bad:
            values = ", ".join(f"{name} {value}" for name, value in bad.items())
            lr = self.optimizer.kwargs.get("learning_rate", "its default")
            raise StageError(
                f"training diverged at epoch {epoch + 1} ({values}); nothing was saved. Try a smaller "
                f"train.optimizer.learning_rate (now {lr}), +train.optimizer.clipnorm=1.0, or another optimizer"
            )


def write_timings(seconds: float, epoch_seconds: list[float]) -> None:
    """The training time, to git-ignored TIMINGS: it differs from run to run, so it stays out of the tracked
    outputs (same params, same bytes)."""
    epoch_s = [round(s, 4) for s in epoch_seconds]
    atomic.write_json(TIMINGS, {"train_time_s": round(seconds, 3), "epochs_run": len(epoch_s), "epoch_s": epoch_s})


def main() -> None:
    p = params.load()
    t = p.train
    strategy, watch = configure(t)
    data = datasets.load_npz(DATA)
    datasets.check_sizes(len(data["y_train"]), len(data["y_test"]), t)
    x, y = data["x_train"], losses.encode_labels(data["y_train"], losses.LOSSES[t.loss])
    multi = t.distribute == "multi_worker"
    if multi:  # before the model: its variables are the cluster's first collectives (the chief's values)
        with engine.cluster_errors():
            engine.check_agreement(strategy, engine.fingerprint(p.model_dump(), x, y, DATA))
    wiring = losses.head(t.loss, p.model.output_activation, t.from_logits)
    with strategy.scope():
        model, optimizer = build_model(p.model, wiring), build_optimizer(t)
    loss = losses.build(t.loss, t.loss_args, from_logits=wiring.from_logits)
    loop = engine.Loop(
        model, loss, lambda: losses.metrics(t.loss, from_logits=wiring.from_logits), optimizer, strategy,
        steps_per_execution=t.speed.steps_per_execution, jit_compile=t.speed.jit_compile,
    )  # fmt: skip
    stopper = early_stopping(t.early_stopping)
    callbacks = [*watch, StopOnDivergence(t.optimizer), *([stopper] if stopper else [])]

    def fit(**kwargs: object) -> dict[str, list[float]]:
        with engine.cluster_errors():
            return loop.fit(x, y, epochs=t.epochs, batch_size=t.batch_size, validation_split=t.validation_split,
                            seed=t.seed, **kwargs)  # fmt: skip

    if not engine.is_chief(strategy):  # another worker of a multi_worker run: train, write nothing
        fit(callbacks=callbacks, verbose=0)
        with engine.cluster_errors():
            engine.finish(strategy)  # waits for the chief's outputs; StageError if it failed to write them
        print("worker done: the chief wrote the outputs")
        return

    trained = False  # multi_worker: once trained, the other workers wait for the chief's word on the outputs
    try:
        with atomic.target(LIVE_DIR) as live_dir, atomic.target(serving.MODEL_DIR) as model_dir:
            with Live(str(live_dir), save_dvc_exp=False, dvcyaml=None) as live:
                # before dvclive's callback, so that it logs the keys GradientStats adds
                probe = [GradientStats(loss, x[:PROBE_ROWS], y[:PROBE_ROWS])] if t.log_gradients else []
                start = time.perf_counter()
                verbose = 1 if sys.stdout.isatty() else 2  # a progress bar at a terminal, a line an epoch in a log
                history = fit(callbacks=[*probe, DVCLiveCallback(live=live), *callbacks], verbose=verbose)
                seconds, trained = time.perf_counter() - start, True
                saved = saved_epoch(history, stopper)  # the summary describes the model that is saved
                live.summary["epochs_run"] = len(history["loss"])
                live.summary["saved"] = {"epoch": saved + 1, **{k: v[saved] for k, v in history.items()}}
            stats = json.loads(STATS.read_text(encoding="utf-8"))
            shipped = export.standalone(model, stats, t, wiring, optimizer)
            export.save(shipped, model_dir, serving.card(t.loss, wiring, stats))
            params.check_unchanged(p, "model", "train")  # before the outputs move into place
        write_timings(seconds, loop.epoch_seconds)
    except Exception as exc:
        if multi and trained:
            said = f"cannot write {exc.filename}: {exc.strerror}" if isinstance(exc, OSError) else str(exc)
            engine.finish(strategy, " ".join(said.split()))
        raise
    if multi:
        engine.finish(strategy)
    print(f"trained {len(history['loss'])} epochs in {seconds:.1f}s; saved epoch {saved + 1} -> {serving.MODEL_DIR}/")


if __name__ == "__main__":
    runner.run(main)
