"""Runs that must not end "successfully" but wrong: divergence, every documented early-stopping
monitor, the epoch the summary names, splits that leave nothing, arguments that do nothing,
integers where Keras wants floats, mixed precision with logits, and the tutorial's own configuration.
Real training on the bundled sample, in copies of the tests' trained projects (tests/harness.py).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline import datasets, params
from pipeline.errors import ParamError
from tests.harness import BIN, dvc_project, run, trained_project, write_params

PYTHON = sys.executable


@pytest.fixture
def project_copy(tmp_path: Path) -> Path:
    """Each test its own copy of the tests' 1-epoch project (data, model, params): tests do not see each
    other's runs. The stages run as plain scripts in it (its git and DVC are not used)."""
    dvc_project(tmp_path / "p")
    return tmp_path / "p"


def train(project: Path, overrides: dict) -> tuple[int, str]:
    write_params(project, overrides)
    proc = run([PYTHON, "-m", "stages.train"], project, check=False)
    return proc.returncode, proc.stdout + proc.stderr


def model_bytes(project: Path) -> dict[str, bytes]:
    return {str(p.relative_to(project)): p.read_bytes() for p in sorted((project / "models").rglob("*")) if p.is_file()}


DIVERGING = {
    "sgd-lr-1e30": {"train": {"epochs": 3, "optimizer": {"name": "sgd", "learning_rate": 1e30}}},
    "sgd-momentum-mse-linear": {
        "model": {"output_activation": "linear"},
        "train": {"epochs": 3, "loss": "mean_squared_error", "optimizer": {"name": "sgd", "learning_rate": 50, "momentum": 0.9}},  # noqa: E501
    },
}  # fmt: skip


@pytest.mark.pipeline(seconds=7)
@pytest.mark.parametrize("case", DIVERGING)
def test_a_diverging_run_stops_with_one_line_and_keeps_the_previous_model(project_copy: Path, case: str) -> None:
    before = model_bytes(project_copy)
    status, output = train(project_copy, DIVERGING[case])
    lines = [line for line in output.splitlines() if line.startswith("error:")]
    assert status == 2 and len(lines) == 1, output
    assert "training diverged at epoch 1" in lines[0] and "train.optimizer.learning_rate" in lines[0]
    assert "nan" in lines[0].lower() or "inf" in lines[0].lower()
    assert model_bytes(project_copy) == before


@pytest.mark.parametrize("monitor", ["val_loss", "val_accuracy", "loss", "accuracy"])
def test_every_early_stopping_monitor_stops_training_when_it_stops_improving(monitor: str, small: dict) -> None:
    """The tutorial's "train until the loss stops decreasing", for each documented monitor, wired as train wires
    it (its EarlyStopping on the loop's logs): with patience 0 and a min_delta no epoch can reach, training
    stops after epoch 2, and the saved epoch is the first (restore_best_weights)."""
    import keras
    import tensorflow as tf

    from pipeline import engine, losses
    from stages import train

    p = params.parse({"train": {"epochs": 5, "early_stopping": {"enabled": True, "monitor": monitor, "patience": 0,
                                                                "min_delta": 10.0}}})  # fmt: skip
    keras.utils.set_random_seed(p.train.seed)
    wiring = losses.head(p.train.loss)
    model = train.build_model(p.model, wiring)
    loss = losses.build(p.train.loss, {}, from_logits=False)
    metrics = lambda: losses.metrics(p.train.loss, from_logits=False)  # noqa: E731
    loop = engine.Loop(model, loss, metrics, train.build_optimizer(p.train), tf.distribute.get_strategy(),
                       steps_per_execution=256, jit_compile=False)  # fmt: skip
    stopper = train.early_stopping(p.train.early_stopping)
    data = {k: v[:400] for k, v in small.items()}
    history = loop.fit(data["x_train"], data["y_train"], epochs=5, batch_size=32, validation_split=0.1, seed=1,
                       callbacks=[stopper], verbose=0)  # fmt: skip
    assert len(history["loss"]) == 2 and monitor in history, sorted(history)
    assert train.saved_epoch(history, stopper) == 0


@pytest.mark.pipeline(seconds=10)
def test_the_summary_names_the_epoch_whose_weights_were_saved(project_copy: Path) -> None:
    """restore_best_weights with a min_delta: Keras restores the epoch *it* judged best; that is the one reported."""
    es = {"enabled": True, "monitor": "val_loss", "patience": 2, "min_delta": 0.03, "restore_best_weights": True}
    status, output = train(project_copy, {"train": {"epochs": 8, "early_stopping": es}})
    assert status == 0, output
    summary = json.loads((project_copy / "metrics/train/metrics.json").read_text())
    saved = summary["saved"]
    assert f"saved epoch {saved['epoch']}" in output and saved["epoch"] < summary["epochs_run"] < 8, summary
    curve = (project_copy / "metrics/train/plots/metrics/eval/loss.tsv").read_text().splitlines()
    assert len(curve) == 1 + summary["epochs_run"]  # the curves end where training ended
    # The shipped model (uint8 in) on the validation split (the last tenth of the training set):
    raw = np.load(project_copy / "data/raw/dataset.npz")
    n_fit, _ = datasets.fit_validation_counts(len(raw["y_train"]), 0.1)
    import keras

    model = keras.saving.load_model(project_copy / "models/model.keras", safe_mode=True)
    scores = model.evaluate(raw["x_train"][n_fit:], raw["y_train"][n_fit:], verbose=0, return_dict=True)
    assert scores["loss"] == pytest.approx(saved["eval"]["loss"] if "eval" in saved else saved["val_loss"], abs=2e-4)


SPLITS = [
    ({"train": {"validation_split": 0.9999}}, "train.validation_split", "leaves 0 of 4000 examples to train on"),
    ({"train": {"batch_size": 5000}}, "train.batch_size", "leaves 4000 training examples (of 5000)"),
    ({"train": {"batch_size": 3700}}, "train.validation_split", "leaves 3600 of 4000 examples"),
    ({"data": {"test_fraction": 0.0002}}, "data.test_fraction", "into 4999 train and 1 test; a stratified split"),
    ({"train": {"validation_split": 1e-17}}, "train.validation_split", "is 0 validation examples"),
    ({"data": {"test_fraction": 0.998}}, "data.test_fraction", "leaves 10 training examples (of 5000)"),
]


@pytest.mark.parametrize(("overrides", "key", "counts"), SPLITS)
def test_splits_that_leave_a_set_empty_or_under_a_batch_are_refused_at_check(
    project: Path, monkeypatch: pytest.MonkeyPatch, overrides: dict, key: str, counts: str
) -> None:
    """check (its main, in-process: it needs no data, only the params and the source's known sizes)."""
    from stages import check

    write_params(project, overrides)
    monkeypatch.chdir(project)
    with pytest.raises(ParamError) as refused:
        check.main()
    assert f"error: {refused.value}".startswith(f"error: params.yaml: {key}: ") and counts in str(refused.value)


SCHEDULE = {"name": "cosine_decay", "decay_steps": 10, "initial_learning_rate": 0.1}
ADAM_01 = {"name": "adam", "learning_rate": 0.01}
FOCAL = "binary_focal_crossentropy"
NO_EFFECT = [
    ({"loss": FOCAL, "loss_args": {"alpha": 0.9}}, "loss_args.alpha", "apply_class_balancing: true"),
    ({"optimizer": {"name": "sgd", "nesterov": True}}, "optimizer.nesterov", "momentum > 0"),
    ({"optimizer": {"name": "adam", "ema_momentum": 0.9}}, "optimizer.ema_momentum", "use_ema: true"),
    ({"optimizer": {"name": "adamw", "ema_overwrite_frequency": 5}}, "optimizer.ema_overwrite_frequency", "use_ema:"),
    ({"optimizer": ADAM_01, "lr_schedule": SCHEDULE}, "optimizer.learning_rate", "0.1) sets"),
    ({"optimizer": {"name": "adam", "use_ema": True}, "early_stopping": {"enabled": True}}, "optimizer.use_ema",
     "restore_best_weights: true: as in model.fit"),
]  # fmt: skip
WITH_WHAT_IT_NEEDS = [
    {"loss": FOCAL, "loss_args": {"alpha": 0.9, "apply_class_balancing": True}},
    {"optimizer": {"name": "sgd", "nesterov": True, "momentum": 0.9}},
    {"optimizer": {"name": "adam", "ema_momentum": 0.9, "use_ema": True}},
    {"optimizer": {"name": "adamw", "ema_overwrite_frequency": 5, "use_ema": True}},
    {"optimizer": {"name": "adam", "learning_rate": 0.1}, "lr_schedule": SCHEDULE},
    {
        "optimizer": {"name": "adam", "use_ema": True},
        "early_stopping": {"enabled": True, "restore_best_weights": False},
    },
]


@pytest.mark.parametrize(("case", "fixed"), zip(NO_EFFECT, WITH_WHAT_IT_NEEDS, strict=True))
def test_an_argument_that_would_do_nothing_is_refused_naming_what_it_needs(case: tuple, fixed: dict) -> None:
    section, key, needs = case
    with pytest.raises(ParamError) as exc:
        params.parse({"train": section})
    assert exc.value.key == f"train.{key}" and needs in str(exc.value)
    assert params.parse({"train": fixed})  # with what it needs, accepted


def test_an_integer_learning_rate_is_a_number() -> None:
    """`dvc exp run -S train.optimizer.learning_rate=1` writes the integer 1."""
    from pipeline import engine, optimizers

    for optimizer in ({"name": "sgd", "learning_rate": 1}, {"name": "sgd", "learning_rate": 1, "momentum": 0}):
        p = params.parse({"train": {"optimizer": optimizer}})
        built = optimizers.build(p.train.optimizer, p.train.lr_schedule)
        assert float(built.learning_rate) == 1.0
        engine.trial(p.train)  # train's one-step trial (run when another option is present) accepts it too


@pytest.mark.pipeline(seconds=9)
def test_mixed_precision_trains_on_logits_and_ships_float32_probabilities(project_copy: Path) -> None:
    """Trained in bfloat16 on a CPU (the loop's arithmetic), on logits; shipped computing in float32 from the
    same float32 weights, so that the Keras file, the SavedModel and the LiteRT model (no bfloat16 kernels)
    agree, and ending in the softmax."""
    import keras
    import tensorflow as tf

    status, output = train(project_copy, {"train": {"epochs": 2, "mixed_precision": True, "from_logits": True}})
    assert status == 0, output
    summary = json.loads((project_copy / "metrics/train/metrics.json").read_text())
    assert summary["saved"]["accuracy"] > 0.7  # it did train, in bfloat16
    raw = np.load(project_copy / "data/raw/dataset.npz")
    model = keras.saving.load_model(project_copy / "models/model.keras", safe_mode=True)
    dense = [layer.dtype_policy.name for layer in model.layers if isinstance(layer, keras.layers.Dense)]
    assert dense == ["float32", "float32"]
    out = model.predict(raw["x_test"], verbose=0)
    assert out.dtype == np.float32 and np.allclose(out.sum(axis=1), 1, atol=1e-5)
    assert (out.argmax(axis=1) == raw["y_test"]).mean() > 0.7
    served = tf.saved_model.load(str(project_copy / "models/saved_model")).signatures["serving_default"]
    (result,) = served(image=tf.constant(raw["x_test"][:20])).values()
    assert result.dtype == tf.float32 and np.allclose(result.numpy().sum(axis=1), 1, atol=1e-5)


@pytest.mark.pipeline(seconds=4)
def test_every_confusion_normalization_draws_its_picture_and_changes_no_metric(
    project_copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """evaluate (its main, here in-process, on the trained copy) for each `evaluate.confusion_normalize`
    ("none": the copy's own run): a new picture each, the same metrics."""
    from stages import evaluate

    monkeypatch.chdir(project_copy)
    metrics = (project_copy / "metrics/eval.json").read_text()
    pictures = {(project_copy / "metrics/eval/confusion_matrix.png").read_bytes()}
    for normalize in ("actual", "predicted", "all"):
        write_params(project_copy, {"train": {"epochs": 1}, "evaluate": {"confusion_normalize": normalize}})
        evaluate.main()
        png = (project_copy / "metrics/eval/confusion_matrix.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and png not in pictures, normalize
        assert (project_copy / "metrics/eval.json").read_text() == metrics, normalize
        pictures.add(png)


@pytest.mark.pipeline(seconds=14)
def test_an_argument_set_to_its_default_trains_the_same_model(project_copy: Path) -> None:
    """`momentum: 0.0` is SGD's default: train's one-step trial of the argument (run only when there is
    one) must not move the seeded start, or the same math would give other weights."""
    plain = {"train": {"epochs": 1, "optimizer": {"name": "sgd", "learning_rate": 0.1}}}
    assert train(project_copy, plain)[0] == 0
    without = model_bytes(project_copy)
    spelled_out = {"train": {"epochs": 1, "optimizer": {"name": "sgd", "learning_rate": 0.1, "momentum": 0.0}}}
    status, output = train(project_copy, spelled_out)
    assert status == 0, output
    # the LiteRT file holds the weights and the math; model.keras and the SavedModel also record the
    # optimizer's arguments and TensorFlow's function counters, which the trial moves on
    assert model_bytes(project_copy)["models/model.tflite"] == without["models/model.tflite"]


@pytest.mark.pipeline(seconds=7)
def test_use_ema_ships_the_moving_averages(project_copy: Path) -> None:
    """Keras issue 18949: model.fit ends by swapping each weight for its moving average
    (`finalize_variable_values`); the loop must too, before the model is exported, or `use_ema: true`
    ships the very weights of the run without it (the copy's own run: the same params but use_ema)."""
    without = model_bytes(project_copy)["models/model.tflite"]
    status, output = train(project_copy, {"train": {"epochs": 1, "optimizer": {"use_ema": True}}})
    assert status == 0, output
    same = model_bytes(project_copy)["models/model.tflite"] == without
    assert not same, "use_ema: true shipped the weights of the run without it"
    import keras

    model = keras.saving.load_model(project_copy / "models/model.keras", safe_mode=True)
    averages = {v.path: v for v in model.optimizer.variables if v.path.endswith("_average")}
    assert len(averages) == len(model.trainable_variables) == 4, sorted(averages)
    for weight, average in zip(model.trainable_variables, averages.values(), strict=True):
        np.testing.assert_array_equal(weight.numpy(), average.numpy())


@pytest.mark.pipeline(seconds=14)
def test_the_tutorials_configuration_matches_sparse_categorical_crossentropy(tmp_path: Path) -> None:
    """Flatten -> Dense(128, relu) -> Dense(10, sigmoid), binary_crossentropy, Adam, 10 epochs: within 2
    points of the committed sparse_categorical_crossentropy (the tests' trained project: the same params
    but the loss), its `accuracy` the top-1 one, its `binary_accuracy` (higher: 9 of 10 answers are "no")
    under its own name."""
    project = trained_project(tmp_path / "p")
    committed = json.loads((project / "metrics/eval.json").read_text())["test"]["accuracy"]
    write_params(project, {"model": {"output_activation": "sigmoid"}, "train": {"loss": "binary_crossentropy"}})
    for stage in ("train", "evaluate"):
        run([str(BIN / "python"), "-m", f"stages.{stage}"], project)
    tutorial = json.loads((project / "metrics/eval.json").read_text())["test"]["accuracy"]
    assert json.loads((project / "metrics/eval/metrics.json").read_text())["binary_accuracy"] > tutorial
    assert tutorial > 0.85 and abs(tutorial - committed) <= 0.02, (tutorial, committed)
