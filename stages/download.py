"""Stage `download`: params `data.*` -> data/raw/dataset.npz (uint8 Keras layout).

Fetches the chosen source (the bundled 5,000-digit MNIST sample by default, full MNIST or
Fashion-MNIST from the Keras mirror, or `data.url`), verifies its sha256, validates shapes,
dtype and labels, and writes one uniform npz: x_train, y_train, x_test, y_test. numpy only.
"""

from __future__ import annotations

from pathlib import Path

from stages.lib import datasets, params, runner

OUT = Path("data/raw/dataset.npz")


def main() -> None:
    p = params.load()
    dataset = datasets.download(p.data)
    datasets.save_npz(OUT, {k: dataset[k] for k in datasets.KEYS})
    print(f"{p.data.source}: {len(dataset['y_train'])} train and {len(dataset['y_test'])} test images -> {OUT}")


if __name__ == "__main__":
    runner.run(main)
