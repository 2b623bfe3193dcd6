"""Stage `normalize`: data/raw/dataset.npz -> data/normalized/{dataset.npz, stats.json}.

`normalize.method: scale` divides pixels by 255 (the tutorial's choice, values in [0, 1]);
`standardize` also subtracts the train-set mean and divides by its standard deviation. The
statistics go to stats.json beside the data so that prediction can apply the same transform.
Images become float32, labels stay as they are. numpy only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline import atomic, datasets, params, runner

RAW = Path("data/raw/dataset.npz")
OUT = Path("data/normalized")


def statistics(x_train: np.ndarray, method: str) -> dict[str, float | str]:
    """The transform `(x / 255 - mean) / std` as numbers: mean 0, std 1 for `scale`."""
    if method == "scale":
        return {"method": method, "mean": 0.0, "std": 1.0}
    scaled = x_train.astype(np.float64) / 255.0
    return {"method": method, "mean": float(scaled.mean()), "std": float(scaled.std())}


def apply(x: np.ndarray, stats: dict[str, float | str]) -> np.ndarray:
    """Normalize uint8 images with `stats` (as written to stats.json) to float32."""
    return (x.astype(np.float32) / np.float32(255.0) - np.float32(stats["mean"])) / np.float32(stats["std"])


def main() -> None:
    p = params.load()
    method = p.normalize.method
    raw = datasets.load_npz(RAW)
    stats = statistics(raw["x_train"], method)
    with atomic.target(OUT) as tmp:
        tmp.mkdir()
        out = {**raw, "x_train": apply(raw["x_train"], stats), "x_test": apply(raw["x_test"], stats)}
        datasets.save_npz(tmp / "dataset.npz", out)
        atomic.write_json(tmp / "stats.json", stats)
    mean, std = stats["mean"], stats["std"]
    formula = "x / 255" if method == "scale" else f"(x / 255 - {mean:.4f}) / {std:.4f} (the train split's mean, std)"
    print(f"normalize ({method}): pixels x -> {formula} -> {OUT}")


if __name__ == "__main__":
    runner.run(main)
