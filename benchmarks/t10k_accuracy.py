"""Accuracy of the trained model on the real MNIST test set (10,000 digits), beside its own test split.

The default pipeline trains on 4,000 digits of the bundled sample and tests on 1,000; this
checks how that number holds up on the official 10,000-digit test set (`t10k`, IDX files in
`../shared/data/mnist-t10k/`, or `--idx-dir`). Run `make repro` first.

    .venv/bin/python benchmarks/t10k_accuracy.py [--idx-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.chdir(ROOT)
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from sklearn.metrics import accuracy_score, f1_score  # noqa: E402

from pipeline import datasets, serving  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--idx-dir", type=Path, default=ROOT.parent / "shared/data/mnist-t10k")
    idx_dir = parser.parse_args().idx_dir
    x = datasets.read_idx(idx_dir / "t10k-images-idx3-ubyte.gz")
    y = datasets.read_idx(idx_dir / "t10k-labels-idx1-ubyte.gz").astype(int)
    datasets.validate({"x_train": x, "y_train": y, "x_test": x, "y_test": y}, None)

    model, _ = serving.load()  # raw uint8 images in, probabilities out
    predicted = model.predict(x, batch_size=1024).argmax(axis=1)
    own = json.loads(Path("metrics/eval.json").read_text(encoding="utf-8"))["test"]
    scores = json.loads(Path("metrics/eval/metrics.json").read_text(encoding="utf-8"))
    print("| test set | digits | accuracy | macro F1 |")
    print("|---|---|---|---|")
    own_row = f"| {scores['n_test']} | {own['accuracy']:.4f} | {scores['f1_macro']:.4f} |"
    print(f"| pipeline's own split (metrics/eval.json) {own_row}")
    print(
        f"| official MNIST t10k | {len(y)} | {accuracy_score(y, predicted):.4f} "
        f"| {f1_score(y, predicted, average='macro'):.4f} |"
    )


if __name__ == "__main__":
    main()
