"""Stage `evaluate`: models/model.keras + test set -> metrics/eval.json, metrics/eval/.

Loads the model (safe_mode), computes the test loss with its own compiled loss, then predicts
and scores the predictions with scikit-learn: top-1 accuracy, macro precision / recall / F1,
per-class F1. Writes the confusion matrix as a DVC confusion plot (dvclive `log_sklearn_plot`)
and as a PNG (`ConfusionMatrixDisplay`), and prints the test accuracy as the tutorial does.
"""

from __future__ import annotations

from pathlib import Path

import keras
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from dvclive import Live
from sklearn.metrics import ConfusionMatrixDisplay, accuracy_score, precision_recall_fscore_support

from stages.lib import atomic, datasets, errors, params, registry

DATA = Path("data/normalized/dataset.npz")
MODEL = Path("models/model.keras")
METRICS = Path("metrics/eval.json")
PLOTS_DIR = Path("metrics/eval")


def main() -> None:
    p = params.load()
    spec = registry.LOSSES[p.train.loss]
    if not MODEL.exists():
        raise errors.StageError(f"{MODEL} not found; run the train stage first (dvc repro)")
    model = keras.saving.load_model(MODEL, safe_mode=True)
    data = datasets.load_npz(DATA)
    x, y_true = data["x_test"], data["y_test"].astype(int)

    keras_scores = model.evaluate(
        x, registry.encode_labels(y_true, spec), batch_size=p.evaluate.batch_size, return_dict=True, verbose=0
    )
    probabilities = registry.to_probabilities(
        model.predict(x, batch_size=p.evaluate.batch_size, verbose=0), spec, p.train.from_logits
    )
    y_pred = probabilities.argmax(axis=1)

    classes = range(registry.NUM_CLASSES)
    precision, recall, f1, _ = precision_recall_fscore_support(y_true, y_pred, labels=classes, zero_division=0)
    metrics = {
        "loss": keras_scores["loss"],
        "accuracy": accuracy_score(y_true, y_pred),
        "keras_accuracy": keras_scores["accuracy"],
        "precision_macro": precision.mean(),  # macro: the unweighted mean over the ten classes
        "recall_macro": recall.mean(),
        "f1_macro": f1.mean(),
        "f1_per_class": {str(c): score for c, score in zip(classes, f1, strict=True)},
        "n_test": len(y_true),
    }
    if "binary_accuracy" in keras_scores:
        metrics["binary_accuracy"] = keras_scores["binary_accuracy"]

    with atomic.target(PLOTS_DIR) as plots_dir:
        with Live(str(plots_dir), save_dvc_exp=False, dvcyaml=None) as live:
            live.log_sklearn_plot(
                "confusion_matrix", y_true, y_pred, name="confusion_matrix.json", title="Confusion matrix (test set)"
            )
        (plots_dir / "metrics.json").unlink(missing_ok=True)  # Live's empty summary; metrics go to eval.json
        normalize = None if p.evaluate.confusion_normalize == "none" else p.evaluate.confusion_normalize
        display = ConfusionMatrixDisplay.from_predictions(
            y_true, y_pred, normalize=normalize, values_format=".2f" if normalize else "d", colorbar=False
        )
        display.ax_.set_title(f"{p.train.loss}: test accuracy {metrics['accuracy']:.4f}")
        display.figure_.savefig(plots_dir / "confusion_matrix.png", dpi=100, bbox_inches="tight")
        plt.close(display.figure_)
    atomic.write_json(METRICS, {k: _plain(v) for k, v in metrics.items()})
    print(f"Test accuracy: {metrics['accuracy']:.4f}")


def _plain(value: object) -> object:
    """numpy scalars and nested dicts as JSON-ready Python numbers."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value if isinstance(value, (int, str)) else round(float(value), 6)


if __name__ == "__main__":
    errors.run(main)
