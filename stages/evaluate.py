"""Stage `evaluate`: models/ + the raw uint8 test set -> metrics/eval.json, metrics/eval/.

Runs the shipped model exactly as a user would, without TensorFlow: the LiteRT flatbuffer
(`pipeline.serving`), raw images in, the loss's outputs out; what they mean comes from the card
(`models/model.json`), not params.yaml. Scores the outputs with scikit-learn: top-1 accuracy,
the log loss of the class probabilities (one scale for every loss: `serving.class_probabilities`),
macro precision / recall / F1, per-class F1, and for one-vs-rest losses `binary_accuracy`.
`metrics/eval.json` holds the headline, `test.accuracy` and `test.log_loss` (what `dvc exp show`
leads with); the other scores go to `metrics/eval/metrics.json`. Writes the confusion matrix as
a DVC confusion plot (dvclive `log_sklearn_plot`) and as a PNG (`ConfusionMatrixDisplay`), and
prints the test accuracy as the tutorial does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from dvclive import Live
from sklearn.metrics import ConfusionMatrixDisplay, accuracy_score, log_loss, precision_recall_fscore_support

from pipeline import atomic, datasets, losses, params, runner, serving
from pipeline.errors import StageError

DATA = Path("data/raw/dataset.npz")
METRICS = Path("metrics/eval.json")
PLOTS_DIR = Path("metrics/eval")
# evaluate.confusion_normalize -> scikit-learn's `normalize` for the confusion matrix PNG
SKLEARN_NORMALIZE = {"none": None, "actual": "true", "predicted": "pred", "all": "all"}


def main() -> None:
    p = params.load()
    model, card = serving.load()
    data = datasets.load_npz(DATA)
    x, y_true = data["x_test"], data["y_test"].astype(int)

    outputs = model.predict(x, batch_size=p.evaluate.batch_size)
    if not np.isfinite(outputs).all():  # no NaN in a metrics file
        raise StageError(
            "the model's outputs are not finite numbers; retrain it (a smaller train.optimizer.learning_rate), "
            "or dvc checkout a good one"
        )
    y_pred = outputs.argmax(axis=1)
    classes = range(losses.NUM_CLASSES)
    probabilities = serving.class_probabilities(outputs, card["output"]["activation"])

    precision, recall, f1, _ = precision_recall_fscore_support(y_true, y_pred, labels=classes, zero_division=0)
    # The headline, what `dvc exp show` leads with: the test set's accuracy and log loss, named `test.*`.
    test = {"accuracy": accuracy_score(y_true, y_pred), "log_loss": log_loss(y_true, probabilities, labels=classes)}
    headline = {"test": test}
    scores = {
        "precision_macro": precision.mean(),  # macro: the unweighted mean over the ten classes
        "recall_macro": recall.mean(),
        "f1_macro": f1.mean(),
        "f1_per_class": {str(c): score for c, score in zip(classes, f1, strict=True)},
        "n_test": len(y_true),
    }
    spec = losses.LOSSES[card["loss"]]
    if spec.one_vs_rest:  # Keras' BinaryAccuracy: each of the ten outputs > 0.5, against the one-hot labels
        scores["binary_accuracy"] = ((outputs > 0.5) == losses.encode_labels(y_true, spec)).mean()

    with atomic.target(PLOTS_DIR) as plots_dir:
        with Live(str(plots_dir), save_dvc_exp=False, dvcyaml=None) as live:
            live.log_sklearn_plot(
                "confusion_matrix", y_true, y_pred, name="confusion_matrix.json", title="Confusion matrix (test set)"
            )
            live.summary.update(_plain(scores))  # dvclive's summary: metrics/eval/metrics.json
        normalize = SKLEARN_NORMALIZE[p.evaluate.confusion_normalize]
        display = ConfusionMatrixDisplay.from_predictions(
            y_true, y_pred, normalize=normalize, values_format=".2f" if normalize else "d", colorbar=False
        )
        accuracy = headline["test"]["accuracy"]
        display.ax_.set_title(f"{card['loss']}: test accuracy {accuracy:.4f}")
        display.figure_.savefig(plots_dir / "confusion_matrix.png", dpi=100, bbox_inches="tight")
        plt.close(display.figure_)
        params.check_unchanged(p, "evaluate")  # before the outputs move into place
    atomic.write_json(METRICS, _plain(headline))
    print(f"Test accuracy: {accuracy:.4f}")


def _plain(value: Any) -> Any:
    """numpy scalars and nested dicts as JSON-ready Python numbers."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value if isinstance(value, (int, str)) else round(float(value), 6)


if __name__ == "__main__":
    runner.run(main)
