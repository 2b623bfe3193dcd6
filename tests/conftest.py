"""Shared fixtures on top of `tests.harness`: a scratch project, a slice of the real bundled MNIST sample,
and the order in which the modules run."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import numpy as np
import pytest

from tests.harness import ROOT, copy_code, shared_template


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A scratch copy of the stage code and params.yaml, for running stages as a user would."""
    copy_code(tmp_path)
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    return tmp_path


@pytest.fixture(scope="session")
def sample() -> dict[str, np.ndarray]:
    """The real bundled MNIST sample (uint8 Keras layout), read once per session."""
    from pipeline import params
    from stages.download import download

    return download(params.DataParams())


@pytest.fixture(scope="session")
def small(sample: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """1,000 train and 300 test real digits scaled to [0, 1]: enough to learn, quick to fit."""
    return {
        "x_train": sample["x_train"][:1000].astype(np.float32) / 255,
        "y_train": sample["y_train"][:1000],
        "x_test": sample["x_test"][:300].astype(np.float32) / 255,
        "y_test": sample["y_test"][:300],
    }


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The longest modules first (`slow(minutes=...)`; a stable sort keeps each module's order),
    so that the xdist workers of `make test` (one module at a time each) finish near each other."""

    def minutes(item: pytest.Item) -> float:
        marker = item.get_closest_marker("slow")
        return marker.kwargs.get("minutes", 1) if marker else 0

    items.sort(key=lambda item: -minutes(item))


def pytest_configure(config: pytest.Config) -> None:
    """The xdist controller picks the run's id itself, so that it knows which shared template to remove."""
    if not hasattr(config, "workerinput") and hasattr(config.option, "testrunuid") and not config.option.testrunuid:
        config.option.testrunuid = uuid.uuid4().hex


def pytest_unconfigure(config: pytest.Config) -> None:
    if not hasattr(config, "workerinput") and getattr(config.option, "testrunuid", None):
        shutil.rmtree(shared_template(config.option.testrunuid), ignore_errors=True)
