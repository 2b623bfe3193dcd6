"""Means and paired differences over seeds with 95% intervals, and a test set's own sampling error, from scipy.

- `mean_ci`: the Student-t interval, mean +/- t(0.975, n-1) s / sqrt(n) (Wasserman, "All of Statistics", 2004,
  7.5; DeepOBS' error bars), `scipy.stats.ttest_1samp(x).confidence_interval()`; `paired_difference_ci`: the same
  on the per-seed differences a_i - b_i (what one seed's runs share cancels), `ttest_rel(a, b)`. Both intersected
  with the parameter's range when given (accuracy [0, 1], a difference [-1, 1]), which keeps their coverage
  (Mandelkern, "Setting Confidence Intervals for Bounded Parameters", Statistical Science 17(2), 2002). Below MIN_N
  values no interval (None, never NaN): with 2, t(0.975, 1) is 12.7 standard errors.
- `wilson_ci`: the Wilson score interval of one run's accuracy on n test digits, the test set's own sampling error
  (`scipy.stats.binomtest(k, n).proportion_ci(method="wilson")`; Wilson, JASA 22(158), 1927; Brown, Cai &
  DasGupta, "Interval Estimation for a Binomial Proportion", Statistical Science 16(2), 2001).
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
MIN_N = 3  # fewest values a t-interval is given for
ACCURACY = (0.0, 1.0)  # an accuracy's range
DIFFERENCE = (-1.0, 1.0)  # a difference of two accuracies'


@dataclass(frozen=True)
class Interval:
    """A mean and its confidence interval over `n` values (`low`/`high` None when n < MIN_N)."""

    mean: float
    low: float | None
    high: float | None
    n: int

    def as_dict(self) -> dict:
        return {"mean": self.mean, "ci95": [self.low, self.high], "n": self.n}


def _interval(values: np.ndarray, test: Callable[[], Any], bounds: tuple[float, float] | None) -> Interval:
    mean, (lowest, highest) = float(np.mean(values)), bounds or (-math.inf, math.inf)
    if len(values) < MIN_N:
        return Interval(mean, None, None, len(values))
    low = high = mean  # no spread: the interval is the point (scipy warns and divides by 0)
    if not np.all(values == values[0]):
        with warnings.catch_warnings(action="ignore", category=RuntimeWarning):
            low, high = test().confidence_interval(confidence_level=CONFIDENCE)
    low, high = (float(v) if math.isfinite(v) else None for v in (max(low, lowest), min(high, highest)))
    return Interval(mean, low, high, len(values))


def mean_ci(values: Sequence[float], bounds: tuple[float, float] | None = None) -> Interval:
    """The mean of `values` with its 95% Student-t interval (scipy.stats.ttest_1samp), within `bounds`
    (e.g. ACCURACY) when given; no interval below MIN_N values."""
    x = np.asarray(values, dtype=float)
    if len(x) == 0:
        raise ValueError("mean_ci needs at least one value")
    return _interval(x, lambda: stats.ttest_1samp(x, 0.0), bounds)


def paired_difference_ci(a: Sequence[float], b: Sequence[float], bounds: tuple[float, float] | None = None) -> Interval:
    """Mean of a_i - b_i (pairs: the same seed) with its 95% Student-t interval (scipy.stats.ttest_rel), within
    `bounds` (e.g. DIFFERENCE) when given; no interval below MIN_N pairs."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(x) != len(y) or len(x) == 0:
        raise ValueError(f"paired_difference_ci needs two equally long, non-empty samples (got {len(x)} and {len(y)})")
    return _interval(x - y, lambda: stats.ttest_rel(x, y), bounds)


def wilson_ci(accuracy: float, n: int) -> list[float]:
    """[low, high]: the 95% Wilson score interval of one run's accuracy on `n` test digits, k = round(accuracy * n)
    of them right (scipy.stats.binomtest(k, n).proportion_ci): the test set's own sampling error."""
    ci = stats.binomtest(round(accuracy * n), n).proportion_ci(confidence_level=CONFIDENCE, method="wilson")
    return [float(ci.low), float(ci.high)]
