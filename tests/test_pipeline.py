"""End to end: the real `dvc` CLI on a copy of the project in a temporary git repository.

Each test has its own copy of the tests' project (`dvc repro` at 1 epoch, committed: tests/harness.py).
Same params giving the same bytes is tests/test_same_bytes.py's and tests/test_sharing.py's (a fresh
clone); the tutorial's 10 epochs are tests/test_training_outcomes.py's.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests.harness import BIN, ENV, STAGES, dvc_project, reset_worktree, run, write_params

pytestmark = pytest.mark.pipeline(seconds=3)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A git + DVC copy of the project with `dvc repro` run once at 1 epoch (each test its own)."""
    path = tmp_path / "repo"
    proc = dvc_project(path)
    for stage in STAGES:
        assert f"Running stage '{stage}'" in proc.stdout
    assert "Test accuracy: " in proc.stdout
    return path


def load_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def test_every_output_exists_and_the_accuracy_comes_from_the_models_predictions(repo: Path) -> None:
    import keras
    from sklearn.metrics import accuracy_score  # not at collection (docs/testing.md)

    raw = np.load(repo / "data/raw/dataset.npz")
    assert raw["x_train"].dtype == np.uint8 and raw["x_train"].shape == (4000, 28, 28)
    norm = np.load(repo / "data/normalized/dataset.npz")
    assert norm["x_test"].dtype == np.float32 and norm["x_test"].min() >= 0 and norm["x_test"].max() <= 1
    model = keras.saving.load_model(repo / "models/model.keras", safe_mode=True)
    predicted = model.predict(raw["x_test"], verbose=0).argmax(axis=1)  # raw uint8 in: it normalizes itself
    test = load_json(repo / "metrics/eval.json")["test"]
    scores = load_json(repo / "metrics/eval/metrics.json")
    assert list(test) == ["accuracy", "log_loss"] and 0 < test["accuracy"] <= 1
    assert test["accuracy"] == pytest.approx(accuracy_score(norm["y_test"], predicted), abs=1e-6)
    assert test["accuracy"] == pytest.approx(model.evaluate(raw["x_test"], raw["y_test"], verbose=0)[1], abs=1e-6)
    assert set(scores) >= {"precision_macro", "recall_macro", "f1_macro", "f1_per_class"}
    assert len(scores["f1_per_class"]) == 10
    train = load_json(repo / "metrics/train/metrics.json")
    assert train["epochs_run"] == 1 and train["saved"]["epoch"] == 1
    tsv = (repo / "metrics/train/plots/metrics/eval/accuracy.tsv").read_text().splitlines()
    assert tsv[0] == "step\taccuracy" and len(tsv) == 2
    confusion = load_json(repo / "metrics/eval/plots/sklearn/confusion_matrix.json")
    assert len(confusion) == scores["n_test"] and set(confusion[0]) == {"actual", "predicted"}
    assert (repo / "metrics/eval/confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_dvc_sees_metrics_and_plots_with_no_flags(repo: Path) -> None:
    shown = json.loads(run(["dvc", "metrics", "show", "--json"], repo).stdout)
    files = shown[""]["data"] if "" in shown else next(iter(shown.values()))["data"]
    assert set(files) == {"metrics/eval.json"}  # the headline; the rest on request, below
    more = run(["dvc", "metrics", "show", "metrics/eval/metrics.json", "metrics/train/metrics.json"], repo).stdout
    assert "f1_macro" in more and "epochs_run" in more
    plots = run(["dvc", "plots", "show", "--json"], repo).stdout
    for name in ("confusion_matrix.json", "Loss per epoch", "Accuracy per epoch", "confusion_matrix.png"):
        assert name in plots


def test_a_second_repro_reruns_nothing(repo: Path) -> None:
    proc = run(["dvc", "repro"], repo)
    assert "Running stage" not in proc.stdout
    assert "Data and pipelines are up to date." in proc.stdout


@pytest.mark.pipeline(seconds=15)
def test_an_experiment_reruns_only_train_and_evaluate_and_metrics_diff_shows_it(repo: Path) -> None:
    """`-S` values as DVC writes them (YAML 1.2: `2e-3` is the number 0.002) read as meant by every stage."""
    proc = run(["dvc", "exp", "run", "-S", "train.epochs=2", "-S", "train.optimizer.learning_rate=2e-3"], repo)
    ran = [stage for stage in STAGES if f"Running stage '{stage}'" in proc.stdout]
    assert ran == ["check", "train", "evaluate"], proc.stdout
    assert "learning_rate: 0.002" in (repo / "params.yaml").read_text()
    diff = json.loads(run(["dvc", "metrics", "diff", "--json"], repo).stdout)
    assert set(diff["metrics/eval.json"]) == {"test.accuracy", "test.log_loss"}
    summary = ["dvc", "metrics", "diff", "--json", "--targets", "metrics/train/metrics.json"]
    assert json.loads(run(summary, repo).stdout)["metrics/train/metrics.json"]["epochs_run"] == {
        "old": 1,
        "new": 2,
        "diff": 1,
    }
    params = json.loads(run(["dvc", "params", "diff", "--json"], repo).stdout)["params.yaml"]
    assert params["train.epochs"] == {"old": 1, "new": 2, "diff": 1}
    assert params["train.optimizer.learning_rate"]["new"] == 0.002
    shown = run(["dvc", "exp", "show", "--json"], repo).stdout
    assert '"epochs": 2' in shown
    report = run([str(BIN / "python"), "-m", "commands.report", "--out", "reports"], repo)
    table = (repo / "reports/compare.md").read_text()
    assert "| experiment | loss | optimizer |" in table and "| 2 |" in table and "| 1 |" in table
    assert (repo / "reports/compare.png").stat().st_size > 10_000
    assert "experiments ->" in report.stdout


def test_a_normalized_confusion_png_changes_only_the_picture(repo: Path) -> None:
    metrics = (repo / "metrics/eval.json").read_text()
    png = (repo / "metrics/eval/confusion_matrix.png").read_bytes()
    write_params(repo, {"evaluate": {"confusion_normalize": "true"}})
    run([str(BIN / "python"), "-m", "stages.evaluate"], repo)
    assert (repo / "metrics/eval.json").read_text() == metrics
    assert (repo / "metrics/eval/confusion_matrix.png").read_bytes() != png


@pytest.mark.pipeline(seconds=8)
def test_an_interrupted_training_leaves_the_previous_outputs_and_no_temporaries(repo: Path) -> None:
    """Ctrl-C of the train stage itself (no dvc around it, which would delete the outputs first); a recovery
    after dvc is stopped is tests/test_safe_experiments.py's."""
    model, metrics = repo / "models/model.keras", repo / "metrics/train/metrics.json"
    before = model.read_bytes(), metrics.read_bytes()
    write_params(repo, {"train": {"epochs": 200}})
    proc = subprocess.Popen(
        [str(BIN / "python"), "-m", "stages.train"],
        cwd=repo,
        text=True,
        env={**ENV, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("Epoch 2/"):
            proc.send_signal(signal.SIGINT)
            break
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert stderr.strip().splitlines()[-1].startswith("interrupted (Ctrl-C): the previous outputs are kept")
    assert (model.read_bytes(), metrics.read_bytes()) == before
    leftovers = [p.name for d in ("models", "metrics") for p in (repo / d).iterdir() if ".tmp" in p.name]
    assert leftovers == []


def test_bad_params_stop_dvc_repro_with_the_message_and_change_nothing(repo: Path) -> None:
    lock = (repo / "dvc.lock").read_text()
    write_params(repo, {"train": {"loss": "binary_crossentropy"}, "model": {"output_activation": "softmax"}})
    proc = run(["dvc", "repro"], repo, check=False)
    assert proc.returncode != 0
    assert "error: params.yaml: model.output_activation: 'softmax' does not fit loss 'binary_crossentropy'" in (
        proc.stdout + proc.stderr
    )
    assert (repo / "dvc.lock").read_text() == lock
    # DVC removes a stage's outputs before running it; nothing is lost: the model is in the DVC
    # cache and the metrics in git, so restoring the params and checking out brings all back.
    reset_worktree(repo)
    run(["dvc", "checkout", "--force"], repo)
    assert os.path.exists(repo / "models/model.keras")
    assert "Data and pipelines are up to date." in run(["dvc", "status"], repo).stdout
