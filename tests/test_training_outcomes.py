"""Runs that must not end "successfully" but wrong: divergence, every documented early-stopping
monitor, the epoch the summary names, splits that leave nothing, arguments that do nothing,
integers where Keras wants floats, mixed precision with logits. Real training on the bundled sample.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

from pipeline import datasets, engine, optimizers, params
from pipeline.errors import ParamError
from tests.harness import copy_code, run, write_params

PYTHON = sys.executable
pytestmark = pytest.mark.slow(minutes=2)  # on one core: schedules the longest first


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project copy with the data downloaded and normalized and one default model trained."""
    path = tmp_path_factory.mktemp("outcomes")
    copy_code(path)
    write_params(path, {"train": {"epochs": 1}})
    for stage in ("download", "normalize", "train"):
        run([PYTHON, "-m", f"stages.{stage}"], path)
    return path


@pytest.fixture
def project_copy(prepared: Path, tmp_path: Path) -> Path:
    """Each test its own copy (data, model, params): tests do not see each other's runs."""
    copy = tmp_path / "p"
    shutil.copytree(prepared, copy, ignore=shutil.ignore_patterns("__pycache__"))
    return copy


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
def test_every_early_stopping_monitor_runs(project_copy: Path, monitor: str) -> None:
    es = {"enabled": True, "monitor": monitor, "patience": 1}
    status, output = train(project_copy, {"train": {"epochs": 3, "early_stopping": es}})
    assert status == 0, output
    summary = json.loads((project_copy / "metrics/train/metrics.json").read_text())
    assert 1 <= summary["saved"]["epoch"] <= summary["epochs_run"] <= 3


def test_the_summary_names_the_epoch_whose_weights_were_saved(project_copy: Path) -> None:
    """restore_best_weights with a min_delta: Keras restores the epoch *it* judged best; that is the one reported."""
    es = {"enabled": True, "monitor": "val_loss", "patience": 2, "min_delta": 0.03, "restore_best_weights": True}
    status, output = train(project_copy, {"train": {"epochs": 8, "early_stopping": es}})
    assert status == 0, output
    saved = json.loads((project_copy / "metrics/train/metrics.json").read_text())["saved"]
    assert f"saved epoch {saved['epoch']}" in output
    # The shipped model (uint8 in) on the validation split (the last tenth of the training set):
    raw = np.load(project_copy / "data/raw/dataset.npz")
    n_fit, _ = datasets.fit_validation_counts(len(raw["y_train"]), 0.1)
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
    project_copy: Path, overrides: dict, key: str, counts: str
) -> None:
    write_params(project_copy, overrides)
    proc = run([PYTHON, "-m", "stages.check"], project_copy, check=False)
    assert proc.returncode == 2 and proc.stderr.startswith(f"error: params.yaml: {key}: ") and counts in proc.stderr


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


def test_an_integer_learning_rate_is_a_number(small: dict) -> None:
    """`dvc exp run -S train.optimizer.learning_rate=1` writes the integer 1."""
    for optimizer in ({"name": "sgd", "learning_rate": 1}, {"name": "sgd", "learning_rate": 1, "momentum": 0}):
        p = params.parse({"train": {"optimizer": optimizer}})
        built = optimizers.build(p.train.optimizer, p.train.lr_schedule)
        assert float(built.learning_rate) == 1.0
        engine.trial(p.train)  # train's one-step trial (run when another option is present) accepts it too


def test_mixed_precision_with_logits_ships_float32_probabilities(project_copy: Path) -> None:
    status, output = train(project_copy, {"train": {"mixed_precision": True, "from_logits": True}})
    assert status == 0, output
    raw = np.load(project_copy / "data/raw/dataset.npz")
    model = keras.saving.load_model(project_copy / "models/model.keras", safe_mode=True)
    out = model.predict(raw["x_test"][:200], verbose=0)
    assert out.dtype == np.float32 and np.allclose(out.sum(axis=1), 1, atol=1e-5)
    import tensorflow as tf

    served = tf.saved_model.load(str(project_copy / "models/saved_model")).signatures["serving_default"]
    (result,) = served(image=tf.constant(raw["x_test"][:20])).values()
    assert result.dtype == tf.float32 and np.allclose(result.numpy().sum(axis=1), 1, atol=1e-5)


@pytest.mark.parametrize("normalize", ["actual", "predicted", "all"])  # none: every other run
def test_every_confusion_normalization_runs(project_copy: Path, normalize: str) -> None:
    write_params(project_copy, {"train": {"epochs": 1}, "evaluate": {"confusion_normalize": normalize}})
    run([PYTHON, "-m", "stages.evaluate"], project_copy)
    png = (project_copy / "metrics/eval/confusion_matrix.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and json.loads((project_copy / "metrics/eval.json").read_text())["test"]


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


def test_use_ema_ships_the_moving_averages(project_copy: Path) -> None:
    """Keras issue 18949: model.fit ends by swapping each weight for its moving average
    (`finalize_variable_values`); the loop must too, before the model is exported, or `use_ema: true`
    ships the very weights of the run without it (the fixture's run: the same params but use_ema)."""
    without = model_bytes(project_copy)["models/model.tflite"]
    status, output = train(project_copy, {"train": {"epochs": 1, "optimizer": {"use_ema": True}}})
    assert status == 0, output
    same = model_bytes(project_copy)["models/model.tflite"] == without
    assert not same, "use_ema: true shipped the weights of the run without it"
    model = keras.saving.load_model(project_copy / "models/model.keras", safe_mode=True)
    averages = {v.path: v for v in model.optimizer.variables if v.path.endswith("_average")}
    assert len(averages) == len(model.trainable_variables) == 4, sorted(averages)
    for weight, average in zip(model.trainable_variables, averages.values(), strict=True):
        np.testing.assert_array_equal(weight.numpy(), average.numpy())
