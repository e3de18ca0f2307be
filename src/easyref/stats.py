"""Intervals of the evaluation's figures: a mean's t-interval, and a paired bootstrap over groups.

No torch here: the report, the gate and the tests read these without loading a model.

* :func:`mean_ci`: the mean of per-sample values and its Student-t interval (every metric of every method, and the
  reference gain).
* :func:`bootstrap_over_groups`: the mean of per-sample *differences* (method A minus method B on the same sample,
  caption and seed) with a percentile interval from resampling whole groups. Samples of one group share their
  references, so they are not independent; resampling groups (not samples) keeps that dependence in the interval,
  as the paper's comparisons are about groups.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Summary:
    """Mean of per-sample values with a two-sided confidence interval."""

    mean: float
    low: float
    high: float
    std: float
    count: int

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2


NAN_SUMMARY = Summary(mean=math.nan, low=math.nan, high=math.nan, std=math.nan, count=0)


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> Summary:
    """Mean and the ``confidence`` t-interval of the mean; NaNs are skipped. No values give all-NaN."""
    from scipy import stats

    xs = [float(v) for v in values if not math.isnan(float(v))]
    n = len(xs)
    if n == 0:
        return NAN_SUMMARY
    mean = sum(xs) / n
    if n == 1:  # no spread to estimate: the interval is unknown, not zero
        return Summary(mean=mean, low=math.nan, high=math.nan, std=math.nan, count=1)
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = float(stats.t.ppf((1 + confidence) / 2, n - 1)) * std / math.sqrt(n)
    return Summary(mean=mean, low=mean - half, high=mean + half, std=std, count=n)


def bootstrap_over_groups(
    values: Sequence[float],
    groups: Sequence[str],
    confidence: float = 0.95,
    resamples: int = 4000,
    seed: int = 0,
) -> Summary:
    """Mean of ``values`` (per-sample differences) and its percentile interval, resampling whole groups.

    Each resample draws as many groups as there are, with replacement, and takes the mean over all samples of the
    drawn groups (a group drawn twice counts twice). ``low`` / ``high`` are the ``(1 - confidence) / 2`` and
    ``(1 + confidence) / 2`` quantiles of those means, ``std`` their standard deviation (the bootstrap standard
    error), ``count`` the number of samples. NaNs are skipped; one group gives no interval (NaN bounds). The same
    ``seed`` gives the same interval.
    """
    import numpy as np

    if len(values) != len(groups):
        raise ValueError(f"{len(values)} values but {len(groups)} group labels")
    xs = np.asarray(values, dtype=np.float64)
    keep = ~np.isnan(xs)
    xs, labels = xs[keep], np.asarray(list(groups), dtype=object)[keep]
    if xs.size == 0:
        return NAN_SUMMARY
    mean = float(xs.mean())
    names, index = np.unique(labels.astype(str), return_inverse=True)
    if len(names) < 2:
        return Summary(mean=mean, low=math.nan, high=math.nan, std=math.nan, count=int(xs.size))
    sums = np.bincount(index, weights=xs, minlength=len(names))
    counts = np.bincount(index, minlength=len(names)).astype(np.float64)
    draws = np.random.default_rng(seed).integers(0, len(names), size=(resamples, len(names)))
    means = sums[draws].sum(axis=1) / counts[draws].sum(axis=1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return Summary(mean=mean, low=float(low), high=float(high), std=float(means.std(ddof=1)), count=int(xs.size))
