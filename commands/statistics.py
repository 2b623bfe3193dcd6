"""Means and paired differences with 95% confidence intervals, from scipy (no statistics by hand).

Both intervals are Student-t intervals, the textbook choice for a handful of seeds (Wasserman,
"All of Statistics", 2004, section 7.5 (t-based intervals); the same as DeepOBS' per-seed error bars):

- `mean_ci`: mean +/- t(0.975, n-1) * s / sqrt(n), from `scipy.stats.ttest_1samp(x).confidence_interval()`
  (https://docs.scipy.org/doc/scipy/reference/generated/scipy.stats.ttest_1samp.html);
- `paired_difference_ci`: the same interval on the per-seed differences a_i - b_i, from
  `scipy.stats.ttest_rel(a, b).confidence_interval()`
  (https://docs.scipy.org/doc/scipy/reference/generated/scipy.stats.ttest_rel.html). Pairing by seed
  removes what two configurations share at one seed (the same initial weights and batch order), so
  the interval is narrower than the difference of two unpaired means when runs are correlated.

With fewer than two values there is no interval: `low` and `high` are None (never NaN, which JSON cannot hold).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Interval:
    """A mean and its confidence interval over `n` values (`low`/`high` None when n < 2)."""

    mean: float
    low: float | None
    high: float | None
    n: int

    def as_dict(self) -> dict:
        return {"mean": self.mean, "ci95": [self.low, self.high], "n": self.n}

    def __str__(self) -> str:
        if self.low is None or self.high is None:
            return f"{self.mean:.4f} (n={self.n})"
        return f"{self.mean:.4f} [{self.low:.4f}, {self.high:.4f}]"


def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def _interval(values: np.ndarray, test: Callable[[], Any]) -> Interval:
    mean = float(np.mean(values))
    if len(values) < 2:
        return Interval(mean, None, None, len(values))
    if np.all(values == values[0]):  # no spread: the interval is the point (scipy warns and divides by 0)
        return Interval(mean, mean, mean, len(values))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        ci = test().confidence_interval(confidence_level=CONFIDENCE)
    return Interval(mean, _finite(ci.low), _finite(ci.high), len(values))


def mean_ci(values: Sequence[float]) -> Interval:
    """The mean of `values` with its 95% Student-t confidence interval (scipy.stats.ttest_1samp)."""
    x = np.asarray(values, dtype=float)
    if len(x) == 0:
        raise ValueError("mean_ci needs at least one value")
    return _interval(x, lambda: stats.ttest_1samp(x, 0.0))


def paired_difference_ci(a: Sequence[float], b: Sequence[float]) -> Interval:
    """Mean of a_i - b_i (pairs: the same seed) with its 95% Student-t interval (scipy.stats.ttest_rel)."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(x) != len(y) or len(x) == 0:
        raise ValueError(f"paired_difference_ci needs two equally long, non-empty samples (got {len(x)} and {len(y)})")
    return _interval(x - y, lambda: stats.ttest_rel(x, y))
