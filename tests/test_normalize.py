"""normalize: the tutorial's scaling and train-set standardization, statistics saved beside the data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from stages import normalize
from tests.harness import BIN, run, write_params


def test_scale_maps_pixels_into_0_1(sample: dict[str, np.ndarray]) -> None:
    stats = normalize.statistics(sample["x_train"], "scale")
    x = normalize.apply(sample["x_train"], stats)
    assert x.dtype == np.float32
    assert x.min() == 0.0 and x.max() == 1.0
    np.testing.assert_allclose(x, sample["x_train"] / 255.0, rtol=1e-6)


def test_standardize_uses_train_statistics_only(sample: dict[str, np.ndarray]) -> None:
    stats = normalize.statistics(sample["x_train"], "standardize")
    x_train = normalize.apply(sample["x_train"], stats)
    assert abs(float(x_train.mean())) < 1e-4 and abs(float(x_train.std()) - 1) < 1e-4
    x_test = normalize.apply(sample["x_test"], stats)
    assert abs(float(x_test.mean())) > 1e-4  # test data is transformed with the train statistics, not its own
    assert 0.05 < stats["mean"] < 0.3 and 0.2 < stats["std"] < 0.5  # MNIST: mostly black, ~0.13 / ~0.31


@pytest.mark.pipeline(seconds=3)
def test_stage_writes_data_and_reusable_statistics(project: Path) -> None:
    python = str(BIN / "python")
    write_params(project, {"normalize": {"method": "standardize"}})
    downloaded = run([python, "-m", "stages.download"], project)
    assert downloaded.stderr == ""  # the bundled file is copied: no progress bar left in the log
    said = run([python, "-m", "stages.normalize"], project).stdout.strip()
    out = project / "data/normalized"
    stats = json.loads((out / "stats.json").read_text())
    raw = np.load(project / "data/raw/dataset.npz")
    norm = np.load(out / "dataset.npz")
    assert stats["method"] == "standardize"
    np.testing.assert_allclose(norm["x_test"], normalize.apply(raw["x_test"], stats), rtol=1e-6)
    np.testing.assert_array_equal(norm["y_test"], raw["y_test"])
    assert sorted(p.name for p in out.iterdir()) == ["dataset.npz", "stats.json"]
    assert said == (
        f"normalize (standardize): pixels x -> (x / 255 - {stats['mean']:.4f}) / {stats['std']:.4f} (the train "
        "split's mean, std) -> data/normalized"
    )
    write_params(project, {"normalize": {"method": "scale"}})
    said = run([python, "-m", "stages.normalize"], project).stdout.strip()
    assert said == "normalize (scale): pixels x -> x / 255 -> data/normalized"  # not "mean 0.0000, std 1.0000"
