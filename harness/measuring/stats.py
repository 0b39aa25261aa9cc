"""Summary statistics for repeated measurement windows, with intervals whose coverage is what they say.

A metered run gives few windows (3 by default). A percentile bootstrap of 3 values returns about
[min, max], which covers the true median only ~75% of the time (1 - 2 x 0.5^3), whatever it is
labelled. The interval here is Student's t on the per-window figures, with ``k - 1`` degrees of
freedom: its coverage is the stated level at any ``k >= 2`` when the windows are independent and
their per-image figures roughly normal (window means of many images are), and it widens as ``k``
shrinks (t = 4.30 at k = 3, 2.78 at k = 5, 2.26 at k = 10, for 95%). One window has no interval.

The per-image figure of a window set is a ratio: total energy over total images. Windows of unequal
length (a window repeats the work until it is long enough) are weighted by their images this way;
the median of per-window figures would over-weight short, coarsely quantised windows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

#: Confidence level of every interval in a record (``energy_ci95_j``, ``duration_ci95_s``).
CI_LEVEL = 0.95
CI_METHOD = "Student t on per-window figures (k - 1 degrees of freedom), ratio estimator of total / images"


def t_quantile(level: float, dof: int) -> float:
    """Two-sided Student t quantile: ``P(|T| <= q) = level`` for ``dof`` degrees of freedom."""
    from scipy.stats import t  # lazy: scipy is heavy and only summaries need it

    return float(t.ppf(0.5 + level / 2, dof))


@dataclass(frozen=True)
class Interval:
    """An estimate per unit with its confidence interval.

    Attributes:
        estimate: Total over units (``sum(totals) / sum(units)``).
        low: Lower end, or ``None`` with fewer than two windows.
        high: Upper end, or ``None`` with fewer than two windows.
        half_width: ``(high - low) / 2``, or ``None``.
        level: Confidence level of the interval (0.95).
        windows: Number of windows it is computed from.
    """

    estimate: float
    low: float | None
    high: float | None
    half_width: float | None
    level: float
    windows: int

    def as_list(self) -> list[float] | None:
        return None if self.low is None or self.high is None else [self.low, self.high]


def ratio_interval(totals: list[float], units: list[float], level: float = CI_LEVEL) -> Interval:
    """``sum(totals) / sum(units)`` with a t-interval from the spread between windows.

    The standard error is that of the ratio estimator, ``sqrt(sum((y_i - R x_i)^2) / (k (k - 1))) / mean(x)``;
    with equal ``units`` it is the usual standard error of the mean of ``y_i / x``.

    Args:
        totals: Per-window totals (joules, seconds).
        units: Per-window units (images), all positive.
        level: Confidence level.
    """
    if not totals or len(totals) != len(units):
        raise ValueError("need one unit count per total, and at least one window")
    if any(u <= 0 for u in units):
        raise ValueError(f"units must be positive, got {units}")
    k = len(totals)
    ratio = math.fsum(totals) / math.fsum(units)
    if k < 2:
        return Interval(ratio, None, None, None, level, k)
    mean_units = math.fsum(units) / k
    residual = math.fsum((y - ratio * x) ** 2 for y, x in zip(totals, units, strict=True))
    se = math.sqrt(residual / (k * (k - 1))) / mean_units
    half = t_quantile(level, k - 1) * se
    if half == 0.0:
        return Interval(ratio, ratio, ratio, 0.0, level, k)
    return Interval(ratio, ratio - half, ratio + half, half, level, k)


def mean_interval(values: list[float], level: float = CI_LEVEL) -> Interval:
    """Mean of ``values`` with its t-interval (every value one window)."""
    return ratio_interval(list(values), [1.0] * len(values), level)
