"""The training engine: model.fit's math (every optimizer option against fit itself), data-parallel on two workers
(and what they must agree on), its params, its benchmark."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import keras
import numpy as np
import pytest

from tests.harness import CODE, ENV, ROOT, free_ports, run, wait_for, write_params

PYTHON = sys.executable
QUIET = {**ENV, "TF_CPP_MIN_LOG_LEVEL": "2"}

pytestmark = pytest.mark.slow(minutes=2)  # subprocesses: stages, TensorFlow in each


@pytest.mark.parametrize(
    ("strategy", "jit", "optimizer"),
    [("none", "jit", "sgd"), ("none", "nojit", "adam"), ("mirrored", "nojit", "sgd"), ("mirrored", "nojit", "adam")],
)
def test_the_loop_takes_the_same_steps_as_keras_train_step(strategy: str, jit: str, optimizer: str) -> None:
    """Same batches, same initial weights: the loop ends where Keras's own step ends (two
    replicas: each computes half of every batch and the optimizer sums their gradients)."""
    proc = run([PYTHON, "-m", "tests.engine_math", strategy, jit, optimizer], ROOT)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["replicas"] == (2 if strategy == "mirrored" else 1)
    assert result["max_weight_difference"] < 1e-5
    np.testing.assert_allclose(result["losses"], result["reference_losses"], rtol=1e-5)


def with_data(project: Path, small: dict[str, np.ndarray]) -> Path:
    (project / "data/normalized").mkdir(parents=True)
    np.savez(project / "data/normalized/dataset.npz", **small)
    (project / "data/normalized/stats.json").write_text(json.dumps({"method": "scale", "mean": 0.0, "std": 1.0}))
    return project


def beside(chief: Path, factory: pytest.TempPathFactory, name: str = "worker1") -> Path:
    """Another folder sharing the chief's code and data (links), for a worker of its own params."""
    other = factory.mktemp(name)
    for part in (*CODE, "data"):
        os.symlink(chief / part, other / part)
    return other


def start_workers(folders: tuple[Path, Path]) -> list[subprocess.Popen]:
    """`python -m stages.train` in both folders: workers 0 (the chief) and 1 on localhost (stderr piped)."""
    workers = [f"127.0.0.1:{port}" for port in free_ports(2)]
    config = [json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": i}}) for i in (0, 1)]
    return [
        subprocess.Popen(
            [PYTHON, "-m", "stages.train"], cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            env={**QUIET, "TF_CONFIG": config[i]},
        )
        for i, folder in enumerate(folders)
    ]  # fmt: skip


def test_two_workers_on_localhost_train_like_one_and_only_the_chief_writes(
    project: Path, small: dict[str, np.ndarray], tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The default model, 2 epochs, global batch 32: worker 0 (the chief) and worker 1 each
    compute half of every batch; the result matches one process training on whole batches."""
    chief = with_data(project, small)
    other = beside(chief, tmp_path_factory)
    single = beside(chief, tmp_path_factory, "single")
    write_params(single, {"train": {"epochs": 2}})
    for folder in (chief, other):
        write_params(folder, {"train": {"epochs": 2, "distribute": "multi_worker"}})
    workers = [f"127.0.0.1:{port}" for port in free_ports(2)]
    procs = []
    for i, folder in enumerate((chief, other)):  # the second starts later: the chief waits for it
        if i:
            time.sleep(3)
        procs.append(subprocess.Popen(
            [PYTHON, "-m", "stages.train"],
            cwd=folder,
            env={
                **QUIET,
                "TF_CONFIG": json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": i}}),
            },
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        ))  # fmt: skip
    outputs = [proc.communicate(timeout=300)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outputs
    assert "worker done: the chief wrote the outputs" in outputs[1]
    assert sorted(p.name for p in other.iterdir()) == sorted(["data", "params.yaml", *CODE])  # nothing written
    run([PYTHON, "-m", "stages.train"], single, check=True)

    two, one = (json.loads((f / "metrics/train/metrics.json").read_text()) for f in (chief, single))
    assert two["epochs_run"] == one["epochs_run"] == 2
    for split in ("train", "eval"):  # float sums in another order, 2 x 29 updates later
        assert two[split]["loss"] == pytest.approx(one[split]["loss"], rel=1e-3)
        assert two[split]["accuracy"] == pytest.approx(one[split]["accuracy"], abs=0.01)
    images = (small["x_test"] * 255).round().astype("uint8")
    models = [keras.saving.load_model(f / "models/model.keras") for f in (chief, single)]
    probabilities = [model.predict(images, verbose=0) for model in models]
    np.testing.assert_allclose(probabilities[0], probabilities[1], atol=1e-3)


@pytest.mark.parametrize(
    "stop", [("stage", 143, "terminated"), ("child", 2, "error: the process training the model was killed by SIGKILL")]
)
def test_a_chief_stopped_mid_training_ends_both_workers_with_one_line_each(
    project: Path, small: dict[str, np.ndarray], tmp_path_factory: pytest.TempPathFactory, stop: tuple[str, int, str]
) -> None:
    """`docker stop` of the chief while the cluster trains (SIGTERM to the stage), or the OOM killer
    (SIGKILL to the child that runs TensorFlow): the chief says which in one line and leaves no
    temporaries; the other worker, whose peer is gone, says that in one line (exit 2)."""
    chief = with_data(project, small)
    other = beside(chief, tmp_path_factory)
    for folder in (chief, other):
        write_params(folder, {"train": {"epochs": 500, "distribute": "multi_worker"}})
    procs = start_workers((chief, other))
    wait_for(lambda: list(chief.glob("metrics/.train.*.tmp/plots/metrics/train/loss.tsv")), 120, "the first epoch")
    whom, status, said = stop
    if whom == "stage":
        procs[0].send_signal(signal.SIGTERM)
    else:
        children = Path(f"/proc/{procs[0].pid}/task/{procs[0].pid}/children").read_text(encoding="utf-8")
        os.kill(int(children.split()[0]), signal.SIGKILL)
    lines = [proc.communicate(timeout=120)[1] for proc in procs]
    assert procs[0].returncode == status and lines[0].strip().splitlines()[-1].startswith(said), lines[0]
    assert not list(chief.glob("metrics/.*.tmp")) and not (chief / "models").exists()
    line = lines[1].strip().splitlines()[-1]
    assert procs[1].returncode == 2 and line.startswith("error: train.distribute: multi_worker: another"), lines[1]


DISAGREEMENTS = {  # (worker 1's params, whether its data differs by one pixel, what the line names)
    "epochs": ({"epochs": 2}, False, "train.epochs: chief 1, worker 1 2;"),
    "batch_size": ({"batch_size": 64}, False, "train.batch_size: chief 32, worker 1 64;"),
    "data": ({}, True, "the training data (data/normalized/dataset.npz): chief 1000 examples, sha256 "),
}


@pytest.mark.parametrize("case", DISAGREEMENTS)
def test_workers_that_disagree_on_params_or_data_all_stop_before_training_naming_both_values(
    project: Path, small: dict[str, np.ndarray], tmp_path_factory: pytest.TempPathFactory, case: str
) -> None:
    """The chief ran `dvc exp run -S train.epochs=...`, worker 1 its committed params (or other data):
    every worker stops with the same line, naming the key and both values, exit 2; nothing written."""
    changes, other_data, named = DISAGREEMENTS[case]
    chief = with_data(project, small)
    other = tmp_path_factory.mktemp("worker1")
    for package in CODE:
        os.symlink(chief / package, other / package)
    if other_data:
        x = small["x_train"].copy()
        x[0, 0, 0] = 1.0
        with_data(other, {**small, "x_train": x})
    else:
        os.symlink(chief / "data", other / "data")
    common = {"epochs": 1, "distribute": "multi_worker", "cluster_timeout_s": 120}
    write_params(chief, {"train": {**common, "speed": {"threads": 2}}})  # a per-host setting: no disagreement
    write_params(other, {"train": {**common, **changes}})
    procs = start_workers((chief, other))
    lines = [(proc.communicate(timeout=120)[1].strip().splitlines() or [""])[-1] for proc in procs]
    assert [proc.returncode for proc in procs] == [2, 2], ([proc.returncode for proc in procs], lines)
    for line in lines:
        assert line.startswith("error: train.distribute: multi_worker: workers disagree on ") and named in line, lines
        assert line.endswith("run every worker with the same params.yaml and data"), lines
    assert not (chief / "models").exists() and not (chief / "metrics").exists()


def test_a_worker_does_not_say_done_when_the_chief_fails_after_training(
    project: Path, small: dict[str, np.ndarray], tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The chief trains, writes the model, then cannot write metrics/timings.json (a folder there): it
    fails, and worker 1, which trained its share, fails with the chief's line rather than "worker done"."""
    chief = with_data(project, small)
    other = beside(chief, tmp_path_factory)
    for folder in (chief, other):
        write_params(folder, {"train": {"epochs": 1, "distribute": "multi_worker"}})
    (chief / "metrics/timings.json").mkdir(parents=True)
    procs = start_workers((chief, other))
    lines = [(proc.communicate(timeout=120)[1].strip().splitlines() or [""])[-1] for proc in procs]
    assert [proc.returncode for proc in procs] == [2, 2], ([proc.returncode for proc in procs], lines)
    assert lines[0].startswith("error: cannot read or write metrics/.timings.json.") and "Is a directory" in lines[0]
    assert lines[1].startswith("error: train.distribute: multi_worker: the chief failed after training: cannot "
                               "write metrics/.timings.json."), lines  # fmt: skip
    assert lines[1].endswith("Is a directory"), lines


def test_a_worker_that_never_starts_ends_the_run_at_the_deadline_and_a_signal_ends_it_sooner(
    project: Path, small: dict
) -> None:
    """TF_CONFIG names two workers; only worker 0 runs. TensorFlow would wait for worker 1 forever,
    in C holding the GIL, with its own SIGTERM handler: the stage's process keeps out of it
    (TensorFlow runs in its child) and ends the wait at the deadline, on Ctrl-C and on SIGTERM."""
    chief = with_data(project, small)
    workers = [f"127.0.0.1:{port}" for port in free_ports(2)]
    env = {**QUIET, "TF_CONFIG": json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": 0}})}
    write_params(chief, {"train": {"distribute": "multi_worker", "cluster_timeout_s": 5}})
    train = [PYTHON, "-m", "stages.train"]
    proc = subprocess.run(train, cwd=chief, env=env, capture_output=True, text=True, timeout=120, check=False)
    line = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2, proc.stderr
    assert line.startswith("error: train.distribute: multi_worker: the cluster did not"), line
    assert "within 5 s (train.cluster_timeout_s)" in line and not (chief / "models").exists()

    write_params(chief, {"train": {"distribute": "multi_worker", "cluster_timeout_s": 600}})
    for signum, status, said in [(signal.SIGINT, 130, "interrupted (Ctrl-C)"), (signal.SIGTERM, 143, "terminated")]:
        waiting = subprocess.Popen(train, cwd=chief, env=env, stderr=subprocess.PIPE, text=True)
        tensorflow = waiting_for_the_cluster(waiting.pid)
        waiting.send_signal(signum)  # to the stage, as Ctrl-C, `kill` or `docker stop` would
        _, stderr = waiting.communicate(timeout=10)  # not 600 s: the signal ends the wait
        assert waiting.returncode == status, stderr
        assert stderr.strip().splitlines()[-1].startswith(said), stderr
        assert not Path(f"/proc/{tensorflow}").exists() and not (chief / "models").exists()


def waiting_for_the_cluster(stage: int, timeout: float = 60) -> int:
    """The pid of the stage's child that runs TensorFlow, once it waits for the cluster (its gRPC
    threads have started: dozens of them)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        children = Path(f"/proc/{stage}/task/{stage}/children").read_text(encoding="utf-8").split()
        status = Path(f"/proc/{children[0]}/status").read_text(encoding="utf-8") if children else ""
        if children and int(status.split("Threads:")[1].split()[0]) > 50:
            time.sleep(1)  # into the wait itself
            return int(children[0])
        time.sleep(0.2)
    raise AssertionError(f"stage {stage} did not start waiting for the cluster within {timeout} s")


def test_multi_worker_without_tf_config_is_one_line_before_anything_is_written(project: Path, small: dict) -> None:
    with_data(project, small)
    write_params(project, {"train": {"distribute": "multi_worker"}})
    env = {k: v for k, v in QUIET.items() if k != "TF_CONFIG"}
    proc = subprocess.run(
        [PYTHON, "-m", "stages.train"], cwd=project, env=env, capture_output=True, text=True, check=False
    )
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "multi_worker needs TF_CONFIG" in lines[0], proc.stderr
    assert not (project / "models").exists() and not (project / "metrics").exists()


def test_mixed_precision_trains_and_ships_float32_probabilities(project: Path, small: dict[str, np.ndarray]) -> None:
    with_data(project, small)
    write_params(project, {"train": {"epochs": 3, "mixed_precision": True}})
    run([PYTHON, "-m", "stages.train"], project)
    model = keras.saving.load_model(project / "models/model.keras")
    dense = [layer.dtype_policy.name for layer in model.layers if isinstance(layer, keras.layers.Dense)]
    # trained in bfloat16 on a CPU (the loop's arithmetic); shipped computing in float32 from the same float32
    # weights, so that the Keras file, the SavedModel and the LiteRT model (no bfloat16 kernels) agree
    assert dense == ["float32", "float32"]
    summary = json.loads((project / "metrics/train/metrics.json").read_text())
    assert summary["saved"]["accuracy"] > 0.7  # it did train, in bfloat16
    probabilities = model.predict((small["x_test"] * 255).round().astype("uint8"), verbose=0)
    assert probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities.sum(axis=1), 1, atol=1e-3)
    assert (probabilities.argmax(axis=1) == small["y_test"]).mean() > 0.7  # 1,000 digits, 3 epochs


def test_the_training_benchmark_runs_on_tiny_sizes() -> None:
    """`make bench`'s script end to end, small enough for the suite; its figures are not checked."""
    proc = run([PYTHON, "benchmarks/training.py", "--images", "600", "--rounds", "1", "--parts", "speed,memory"], ROOT)
    assert proc.stdout.count("speed-up:") == 4 and "portable / host-native" in proc.stdout and " MB" in proc.stdout, (
        proc.stdout
    )


# Every optimizer argument Keras' model.fit treats specially (use_ema: finalize_variable_values at the end;
# loss_scale_factor and LossScaleOptimizer: scale_loss in the step), and those optimizer.apply acts on
# (clipping, accumulation, EMA updates and overwrites, weight decay, iterations for a schedule).
DECAY = keras.optimizers.schedules.ExponentialDecay(0.01, decay_steps=2, decay_rate=0.5)
FIT_OPTIONS = {
    "plain": {},
    "use_ema": {"use_ema": True, "ema_momentum": 0.9},
    "use_ema+ema_overwrite_frequency": {"use_ema": True, "ema_momentum": 0.9, "ema_overwrite_frequency": 3},
    "use_ema+early_stopping": {"use_ema": True, "ema_momentum": 0.9},  # fit: averages swapped in, then best restored
    "gradient_accumulation_steps": {"gradient_accumulation_steps": 3},
    "gradient_accumulation_steps+schedule": {"gradient_accumulation_steps": 2, "learning_rate": DECAY},
    "loss_scale_factor": {"loss_scale_factor": 128.0},
    "loss_scale_optimizer": {},  # mixed_float16's wrapper (dynamic loss scaling), here around float32
    "global_clipnorm": {"global_clipnorm": 0.05},
    "clipnorm": {"clipnorm": 0.02},
    "clipvalue": {"clipvalue": 0.002},
    "weight_decay": {"weight_decay": 0.5},
}


@pytest.mark.parametrize("case", FIT_OPTIONS)
def test_the_loop_ends_where_model_fit_ends_for_every_optimizer_option(case: str) -> None:
    """A tiny model, 3 epochs of 7 batches (the last partial) in the loop's own shuffled order, from the
    same weights: once through `keras.Model.fit` (fed those batches in order), once through
    `engine.Loop.fit`. The weights each ends with (those train exports), the losses and the optimizer's
    iterations must agree. With EarlyStopping (stops after epoch 2, restores epoch 1) fit swaps the
    averages in, then restores the best epoch's weights over them: the loop must do both, in that order."""
    import tensorflow as tf

    from pipeline import engine

    n, batch, epochs, seed = 100, 16, 3, 5
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(n, 6)).astype(np.float32), rng.integers(0, 10, n).astype(np.int32)

    def build() -> tuple[keras.Model, keras.optimizers.Optimizer]:
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, "relu"), keras.layers.Dense(10, "softmax")])
        optimizer = keras.optimizers.AdamW(**{"learning_rate": 0.01, "weight_decay": 0.0, **FIT_OPTIONS[case]})
        if case == "loss_scale_optimizer":
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
        return model, optimizer

    def stopper() -> list[keras.callbacks.Callback]:
        return [keras.callbacks.EarlyStopping("loss", 10.0, restore_best_weights=True)] if "early" in case else []

    def batches() -> Iterator[tuple[np.ndarray, np.ndarray]]:  # the loop's: a permutation an epoch, last one partial
        order_rng = np.random.default_rng(seed)
        for _ in range(epochs):
            order = order_rng.permutation(n)
            for start in range(0, n, batch):
                yield x[order[start : start + batch]], y[order[start : start + batch]]

    reference, keras_optimizer = build()
    reference.compile(optimizer=keras_optimizer, loss=keras.losses.SparseCategoricalCrossentropy())
    steps = -(-n // batch)
    fitted = reference.fit(batches(), steps_per_epoch=steps, epochs=epochs, shuffle=False, callbacks=stopper(),
                           verbose=0).history  # fmt: skip

    model, optimizer = build()
    loop = engine.Loop(
        model, keras.losses.SparseCategoricalCrossentropy(), lambda: [], optimizer, tf.distribute.get_strategy(),
        steps_per_execution=4, jit_compile=True,
    )  # fmt: skip
    history = loop.fit(x, y, epochs=epochs, batch_size=batch, validation_split=0.0, seed=seed, callbacks=stopper(),
                       verbose=0)  # fmt: skip
    assert len(history["loss"]) == len(fitted["loss"]) == (2 if "early" in case else epochs)
    np.testing.assert_allclose(history["loss"], fitted["loss"], rtol=1e-5)
    assert int(optimizer.iterations) == int(keras_optimizer.iterations)
    for ours, keras_own in zip(model.get_weights(), reference.get_weights(), strict=True):
        np.testing.assert_allclose(ours, keras_own, atol=2e-6)
