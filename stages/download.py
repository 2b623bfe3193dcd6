"""Stage `download`: params `data.*` -> data/raw/dataset.npz (uint8 Keras layout).

Fetches the chosen source (the bundled 5,000-digit MNIST sample by default, full MNIST or
Fashion-MNIST from the Keras mirror, or `data.url`), verifies its sha256 (`pipeline.fetch`),
validates shapes, dtype and labels, and writes one uniform npz: x_train, y_train, x_test, y_test.
numpy only.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from pipeline import datasets, fetch, params, runner
from pipeline.params import DataParams

OUT = Path("data/raw/dataset.npz")


def download(p: DataParams) -> dict[str, np.ndarray]:
    """Fetch and verify every file of `p.source`, read them, and validate the result. Raises DataError."""
    with tempfile.TemporaryDirectory(prefix="mnist-download-") as tmp:
        paths = {}
        for name, (url, sha256) in datasets.locations(p).items():
            paths[name] = Path(tmp, name)
            fetch.fetch(url, paths[name], sha256, deadline_s=p.timeout_s)
        return datasets.read(paths, p)


def main() -> None:
    p = params.load()
    dataset = download(p.data)
    datasets.save_npz(OUT, {k: dataset[k] for k in datasets.KEYS})
    print(f"{p.data.source}: {len(dataset['y_train'])} train and {len(dataset['y_test'])} test images -> {OUT}")


if __name__ == "__main__":
    runner.run(main)
