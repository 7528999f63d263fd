"""Intervals over seeds: the mean with its 95% confidence interval (Student's t over the seeds),
and paired differences against a baseline run with the same seeds.

A seed fixes everything random in a run (data split, partition, initialisation, sampling), so
two methods run with the same seeds share those draws: the per-seed differences remove what the
seed alone explains, and their interval is narrower than the two intervals side by side. A
method wins (loses) against the baseline only when the paired interval lies above (below) zero."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

LEVEL = 0.95


@dataclass
class Interval:
    n: int  # values (seeds) behind it
    mean: float
    low: float  # nan with fewer than 2 values: no interval
    high: float

    @property
    def half(self) -> float:
        return (self.high - self.low) / 2


def t_interval(values: list[float], level: float = LEVEL) -> Interval:
    """mean ± t_{(1+level)/2, n-1} * s / sqrt(n), s the sample standard deviation (n - 1)."""
    from scipy.stats import t

    xs = [float(v) for v in values]
    if not xs:
        return Interval(0, math.nan, math.nan, math.nan)
    mean = statistics.fmean(xs)
    if len(xs) < 2:
        return Interval(1, mean, math.nan, math.nan)
    half = float(t.ppf((1 + level) / 2, len(xs) - 1)) * statistics.stdev(xs) / math.sqrt(len(xs))
    return Interval(len(xs), mean, mean - half, mean + half)


def paired(method: dict[int, float], baseline: dict[int, float], level: float = LEVEL) -> Interval:
    """The interval of method - baseline over the seeds both have (seed -> figure)."""
    common = sorted(set(method) & set(baseline))
    return t_interval([method[s] - baseline[s] for s in common], level)


def verdict(diff: Interval) -> str:
    """"wins" / "loses" when the paired interval excludes zero, else "no significant difference"."""
    if diff.n < 2 or math.isnan(diff.low):
        return "too few paired seeds to tell"
    if diff.low > 0:
        return "wins"
    if diff.high < 0:
        return "loses"
    return "no significant difference"
