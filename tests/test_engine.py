"""The training engine: model.fit's math (every optimizer option against fit itself), data-parallel on two workers
(and what they must agree on), its params, its benchmark."""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from pipeline import params
from tests.harness import CODE, ENV, ROOT, free_ports, listening, run, wait_for, write_params

PYTHON = sys.executable
QUIET = {**ENV, "TF_CPP_MIN_LOG_LEVEL": "2"}
several_processes = pytest.mark.system(seconds=15)  # two training processes (TensorFlow in each) on 127.0.0.1


@pytest.mark.pipeline(seconds=12)
def test_the_loop_takes_the_same_steps_as_keras_train_step() -> None:
    """Same batches, same initial weights: the loop ends where Keras's own step ends (two replicas:
    each computes half of every batch and the optimizer sums their gradients); SGD and Adam, XLA on
    and off. One process for every case (its two logical CPUs must exist before TensorFlow starts)."""
    proc = run([PYTHON, "-m", "tests.engine_math"], ROOT)
    results = [json.loads(line) for line in proc.stdout.strip().splitlines() if line.startswith("{")]
    assert [r["case"] for r in results] == [list(case) for case in engine_math_cases()], proc.stdout
    for result in results:
        assert result["replicas"] == (2 if result["case"][0] == "mirrored" else 1), result
        assert result["max_weight_difference"] < 1e-5, result
        np.testing.assert_allclose(result["losses"], result["reference_losses"], rtol=1e-5, err_msg=str(result))


def engine_math_cases() -> list[tuple[str, str, str]]:
    """tests/engine_math.py's cases, read from its source (importing it would start TensorFlow here)."""
    source = (ROOT / "tests/engine_math.py").read_text(encoding="utf-8")
    return ast.literal_eval(source.split("\nCASES = ", 1)[1].split("\n", 1)[0])


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


@pytest.mark.system(seconds=20)  # three training processes
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
    ports = free_ports(2)
    workers = [f"127.0.0.1:{port}" for port in ports]
    procs = []
    for i, folder in enumerate((chief, other)):  # the second starts once the chief waits for it
        if i:
            wait_for(lambda: listening(ports[0]) or procs[0].poll() is not None, 120, "the chief's cluster server")
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
    import keras

    images = (small["x_test"] * 255).round().astype("uint8")
    models = [keras.saving.load_model(f / "models/model.keras") for f in (chief, single)]
    probabilities = [model.predict(images, verbose=0) for model in models]
    np.testing.assert_allclose(probabilities[0], probabilities[1], atol=1e-3)


@several_processes
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
def test_workers_that_disagree_on_params_or_data_are_named_with_both_values(
    case: str, small: dict[str, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    """What each worker holds (`fingerprint`: every model and train key but the per-host ones, and the
    data's sha256) and the line `check_agreement` raises on every worker, naming the first key that differs;
    the exchange between the processes is the real one in the test below."""
    from pipeline import engine
    from pipeline.errors import StageError

    changes, other_data, named = DISAGREEMENTS[case]
    common = {"epochs": 1, "distribute": "multi_worker", "cluster_timeout_s": 120}
    chief = params.parse({"train": {**common, "speed": {"threads": 2}}})  # a per-host setting: no disagreement
    other = params.parse({"train": {**common, **changes}})
    x = small["x_train"].copy()
    if other_data:
        x[0, 0, 0] = 1.0
    data = Path("data/normalized/dataset.npz")
    held = [["chief", engine.fingerprint(chief.model_dump(), small["x_train"], small["y_train"], data)],
            ["worker 1", engine.fingerprint(other.model_dump(), x, small["y_train"], data)]]  # fmt: skip
    monkeypatch.setattr(engine, "exchange", lambda strategy, value: held)
    monkeypatch.setattr(engine, "task_name", lambda strategy: "chief")
    with pytest.raises(StageError) as said:
        engine.check_agreement(None, held[0][1])
    line = str(said.value)
    assert line.startswith("train.distribute: multi_worker: workers disagree on ") and named in line, line
    assert line.endswith("run every worker with the same params.yaml and data"), line


@several_processes
def test_workers_that_disagree_all_stop_before_training_with_the_same_line(
    project: Path, small: dict[str, np.ndarray], tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The chief and worker 1 hold data one pixel apart: both exchange what they hold and stop with the same
    line, exit 2, nothing written."""
    chief = with_data(project, small)
    other = tmp_path_factory.mktemp("worker1")
    for package in CODE:
        os.symlink(chief / package, other / package)
    x = small["x_train"].copy()
    x[0, 0, 0] = 1.0
    with_data(other, {**small, "x_train": x})
    common = {"epochs": 1, "distribute": "multi_worker", "cluster_timeout_s": 120}
    write_params(chief, {"train": {**common, "speed": {"threads": 2}}})  # a per-host setting: no disagreement
    write_params(other, {"train": common})
    procs = start_workers((chief, other))
    lines = [(proc.communicate(timeout=120)[1].strip().splitlines() or [""])[-1] for proc in procs]
    assert [proc.returncode for proc in procs] == [2, 2], ([proc.returncode for proc in procs], lines)
    assert lines[0] == lines[1] and DISAGREEMENTS["data"][2] in lines[0], lines
    assert lines[0].startswith("error: train.distribute: multi_worker: workers disagree on "), lines
    assert not (chief / "models").exists() and not (chief / "metrics").exists()


@several_processes
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


@pytest.mark.system(seconds=15)
def test_a_worker_that_never_starts_ends_the_run_at_the_deadline_and_a_signal_ends_it_sooner(
    project: Path, small: dict
) -> None:
    """TF_CONFIG names two workers; only worker 0 runs. TensorFlow would wait for worker 1 forever,
    in C holding the GIL, with its own SIGTERM handler: the stage's process keeps out of it
    (TensorFlow runs in its child) and ends the wait at the deadline, on Ctrl-C and on SIGTERM."""
    chief = with_data(project, small)
    ports = free_ports(2)
    workers = [f"127.0.0.1:{port}" for port in ports]
    env = {**QUIET, "TF_CONFIG": json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": 0}})}
    write_params(chief, {"train": {"distribute": "multi_worker", "cluster_timeout_s": 2}})
    train = [PYTHON, "-m", "stages.train"]
    proc = subprocess.run(train, cwd=chief, env=env, capture_output=True, text=True, timeout=120, check=False)
    line = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2, proc.stderr
    assert line.startswith("error: train.distribute: multi_worker: the cluster did not"), line
    assert "within 2 s (train.cluster_timeout_s)" in line and not (chief / "models").exists()

    write_params(chief, {"train": {"distribute": "multi_worker", "cluster_timeout_s": 600}})
    for signum, status, said in [(signal.SIGINT, 130, "interrupted (Ctrl-C)"), (signal.SIGTERM, 143, "terminated")]:
        waiting = subprocess.Popen(train, cwd=chief, env=env, stderr=subprocess.PIPE, text=True)
        tensorflow = waiting_for_the_cluster(waiting.pid, ports[0])
        waiting.send_signal(signum)  # to the stage, as Ctrl-C, `kill` or `docker stop` would
        _, stderr = waiting.communicate(timeout=10)  # not 600 s: the signal ends the wait
        assert waiting.returncode == status, stderr
        assert stderr.strip().splitlines()[-1].startswith(said), stderr
        assert not Path(f"/proc/{tensorflow}").exists() and not (chief / "models").exists()


def waiting_for_the_cluster(stage: int, port: int, timeout: float = 60) -> int:
    """The pid of the stage's child that runs TensorFlow, once it waits for the cluster: its server listens
    on worker 0's port (and waits there for worker 1)."""

    def child() -> int | None:
        children = Path(f"/proc/{stage}/task/{stage}/children").read_text(encoding="utf-8").split()
        return int(children[0]) if children and listening(port) else None

    return wait_for(child, timeout, f"stage {stage} to wait for the cluster on port {port}")


@pytest.mark.pipeline(seconds=6)
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


def load_benchmark() -> object:
    """benchmarks/training.py as a module (it is a script, not a package)."""
    spec = importlib.util.spec_from_file_location("training_benchmark", ROOT / "benchmarks/training.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_training_benchmark_computes_and_prints_every_part(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`make bench`'s training script with its runs faked (no training): every part's arithmetic and lines,
    from folders the train stage's params accept. Its figures are the benchmark's, not the tests'."""
    bench = load_benchmark()
    ran: list[tuple[str, int]] = []

    def fake(kind: str, fit_s: float) -> object:
        def run_it(folder: Path, epochs: int, **kwargs: object) -> dict[str, float]:
            loaded = params.load(folder / "params.yaml")  # what the stage would read
            assert loaded.train.loss == "binary_crossentropy" and loaded.model.output_activation == "sigmoid"
            assert {p.name for p in (folder / "data/normalized").iterdir()} == {"dataset.npz", "stats.json"}
            ran.append((kind if not kwargs else f"{kind} {sorted(kwargs.items())}", epochs))
            epoch_s = [2.0] + [0.5 * (1 + epochs / 10)] * (epochs - 1)
            (folder / "metrics").mkdir(exist_ok=True)
            timings = {"train_time_s": fit_s * epochs, "epoch_s": epoch_s}  # as the stage writes them
            (folder / "metrics/timings.json").write_text(json.dumps(timings))
            return {"fit_s": fit_s * epochs, "peak_rss_mb": 321.0, "test_accuracy": 0.9}

        return run_it

    monkeypatch.setattr(bench, "run_stage", fake("stage", 1.0))
    monkeypatch.setattr(bench, "run_tutorial", fake("tutorial", 2.0))
    monkeypatch.setattr(bench, "test_accuracy", lambda folder: 0.92)
    monkeypatch.setattr(sys, "argv", ["training.py", "--images", "600", "--rounds", "1", "--seeds", "1"])
    bench.main()
    out = capsys.readouterr().out
    assert out.count("speed-up:") == 4 and "tutorial model.fit: 2.000 s   speed-up: 1.00x" in out, out
    assert "train stage (portable: the default): 1.000 s   speed-up: 2.00x" in out, out
    assert "portable / host-native: 1.00x the time per epoch" in out and "321 MB" in out, out
    assert "tutorial: 0.9000 [0.9]   stage: 0.9200 [0.92]" in out and "difference: +2.00 points" in out, out
    assert "600 images: " in out and "a straight line: " in out, out
    assert ("stage [('host_native', True)]", 5) in ran and ("stage [('jit_compile', False)]", 1) in ran


@pytest.mark.pipeline(seconds=8)
def test_the_training_benchmark_runs_the_stage_as_it_ran_before_the_portable_pins() -> None:
    """The one piece of the benchmark the test above fakes: a real stage run (host-native, 1 epoch, 200
    images) timed from the stage's own metrics/timings.json, with its peak memory from the kernel."""
    bench = load_benchmark()
    folder = bench.workdir(200)
    try:
        measured = bench.run_stage(folder, 1, host_native=True)
        assert measured["fit_s"] > 0 and measured["peak_rss_mb"] > 100, measured
        assert len(json.loads((folder / "metrics/timings.json").read_text())["epoch_s"]) == 1
    finally:
        shutil.rmtree(folder)


# Every optimizer argument Keras' model.fit treats specially (use_ema: finalize_variable_values at the end;
# loss_scale_factor and LossScaleOptimizer: scale_loss in the step), and those optimizer.apply acts on
# (clipping, accumulation, EMA updates and overwrites, weight decay, iterations for a schedule).
DECAY = "ExponentialDecay(0.01, decay_steps=2, decay_rate=0.5)"  # built in the test: Keras is imported there
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
    import keras
    import tensorflow as tf

    from pipeline import engine

    options = dict(FIT_OPTIONS[case])
    if options.get("learning_rate") == DECAY:
        options["learning_rate"] = keras.optimizers.schedules.ExponentialDecay(0.01, decay_steps=2, decay_rate=0.5)
    n, batch, epochs, seed = 100, 16, 3, 5
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(n, 6)).astype(np.float32), rng.integers(0, 10, n).astype(np.int32)

    def build() -> tuple[keras.Model, keras.optimizers.Optimizer]:
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, "relu"), keras.layers.Dense(10, "softmax")])
        optimizer = keras.optimizers.AdamW(**{"learning_rate": 0.01, "weight_decay": 0.0, **options})
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
    # no XLA on either side: its compilations were most of this test's time, and the loop's XLA path is held
    # against Keras' own step in test_the_loop_takes_the_same_steps_as_keras_train_step
    reference.compile(optimizer=keras_optimizer, loss=keras.losses.SparseCategoricalCrossentropy(), jit_compile=False)
    steps = -(-n // batch)
    fitted = reference.fit(batches(), steps_per_epoch=steps, epochs=epochs, shuffle=False, callbacks=stopper(),
                           verbose=0).history  # fmt: skip

    model, optimizer = build()
    loop = engine.Loop(
        model, keras.losses.SparseCategoricalCrossentropy(), lambda: [], optimizer, tf.distribute.get_strategy(),
        steps_per_execution=4, jit_compile=False,
    )  # fmt: skip
    history = loop.fit(x, y, epochs=epochs, batch_size=batch, validation_split=0.0, seed=seed, callbacks=stopper(),
                       verbose=0)  # fmt: skip
    assert len(history["loss"]) == len(fitted["loss"]) == (2 if "early" in case else epochs)
    np.testing.assert_allclose(history["loss"], fitted["loss"], rtol=1e-5)
    assert int(optimizer.iterations) == int(keras_optimizer.iterations)
    for ours, keras_own in zip(model.get_weights(), reference.get_weights(), strict=True):
        np.testing.assert_allclose(ours, keras_own, atol=2e-6)
