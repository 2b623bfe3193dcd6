"""The study's statistics against scipy and against intervals worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from commands.statistics import ACCURACY, DIFFERENCE, mean_ci, paired_difference_ci, wilson_ci

A = [0.93, 0.95, 0.94, 0.92, 0.96]
B = [0.92, 0.93, 0.93, 0.92, 0.94]


def test_mean_ci_is_scipys_t_interval() -> None:
    iv = mean_ci(A)
    low, high = stats.t.interval(0.95, len(A) - 1, loc=np.mean(A), scale=stats.sem(A))
    assert iv.mean == pytest.approx(0.94) and iv.n == 5
    assert (iv.low, iv.high) == (pytest.approx(low, abs=1e-12), pytest.approx(high, abs=1e-12))


def test_mean_ci_by_hand() -> None:
    """0.90, 0.92, 0.91: mean 0.91, s = 0.01, s/sqrt(3) = 0.0057735, t(0.975, 2) = 4.302653 -> +/- 0.024841."""
    iv = mean_ci([0.90, 0.92, 0.91])
    assert iv.low == pytest.approx(0.885159, abs=1e-6) and iv.high == pytest.approx(0.934841, abs=1e-6)


def test_paired_difference_by_hand_and_against_scipy() -> None:
    """Differences 0.01, 0.02, 0.01, 0, 0.02: mean 0.012, s = sqrt(70e-6) = 0.0083666, s/sqrt(5) = 0.0037417,
    t(0.975, 4) = 2.776445 -> +/- 0.010389."""
    iv = paired_difference_ci(A, B)
    assert iv.mean == pytest.approx(0.012) and iv.n == 5
    assert iv.low == pytest.approx(0.001611, abs=1e-6) and iv.high == pytest.approx(0.022389, abs=1e-6)
    ref = stats.ttest_rel(A, B).confidence_interval()
    assert (iv.low, iv.high) == (pytest.approx(ref.low, abs=1e-12), pytest.approx(ref.high, abs=1e-12))


def test_pairing_narrows_the_interval_of_correlated_runs() -> None:
    """The same seeds share most of their noise: the paired interval excludes 0, the unpaired one does not."""
    paired = paired_difference_ci(A, B)
    unpaired = stats.ttest_ind(A, B).confidence_interval()
    assert paired.low > 0 > unpaired.low
    assert paired.high - paired.low < unpaired.high - unpaired.low


def test_no_interval_from_two_seeds_and_none_beyond_the_parameters_range() -> None:
    """Two seeds: t(0.975, 1) = 12.7 standard errors, so no interval at all, and the report says so. Three seeds
    near 1.0: the t-interval's upper end (1.0176 here) is cut at 1, the accuracy's range (Mandelkern 2002)."""
    two = mean_ci([0.93, 0.95], ACCURACY)
    assert (two.low, two.high, two.n) == (None, None, 2)
    assert paired_difference_ci([0.93, 0.95], [0.92, 0.90], DIFFERENCE).as_dict()["ci95"] == [None, None]
    near = [0.98, 0.99, 0.999]
    raw = stats.ttest_1samp(near, 0.0).confidence_interval()
    iv = mean_ci(near, ACCURACY)
    assert raw.high > 1 and iv.high == 1.0 and iv.low == pytest.approx(raw.low) and iv.low <= iv.mean <= iv.high
    assert mean_ci(near).high == pytest.approx(raw.high)  # no bounds given: scipy's interval as it is
    diff = paired_difference_ci([1.0, 1.0, 0.99], [0.1, 0.02, 0.5], DIFFERENCE)
    assert -1 <= diff.low <= diff.mean <= diff.high == 1.0


def test_wilson_is_scipys_interval_of_one_runs_accuracy_on_its_test_digits() -> None:
    """941 of 1,000 digits right, z = 1.959964: center (0.941 + z^2/2000) / (1 + z^2/1000) = 0.939312, half-width
    z * sqrt(0.941 * 0.059 / 1000 + z^2 / 4e6) / (1 + z^2/1000) = 0.014673 -> [0.924639, 0.953985]."""
    low, high = wilson_ci(0.941, 1000)
    ref = stats.binomtest(941, 1000).proportion_ci(confidence_level=0.95, method="wilson")
    assert (low, high) == (ref.low, ref.high)
    assert low == pytest.approx(0.924639, abs=1e-6) and high == pytest.approx(0.953985, abs=1e-6)
    assert wilson_ci(1.0, 1000)[1] == 1.0


def test_edge_cases_give_json_safe_values() -> None:
    one = mean_ci([0.9])
    assert (one.mean, one.low, one.high, one.n) == (0.9, None, None, 1)
    same = mean_ci([0.9, 0.9, 0.9])
    assert same.low == same.high == same.mean == 0.9
    zero = paired_difference_ci([0.9, 0.8, 0.7], [0.9, 0.8, 0.7])
    assert (zero.mean, zero.low, zero.high) == (0.0, 0.0, 0.0)
    assert all(v is None or math.isfinite(v) for v in mean_ci([0.1, 0.2, 0.4]).as_dict()["ci95"])
    with pytest.raises(ValueError, match="equally long"):
        paired_difference_ci([0.9, 0.8], [0.9])
    with pytest.raises(ValueError, match="at least one"):
        mean_ci([])
