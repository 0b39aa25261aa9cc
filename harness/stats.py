"""Summary statistics for repeated measurements: median and a bootstrap 95% confidence interval."""

from __future__ import annotations

import numpy as np

BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0


def median_ci95(values: list[float]) -> tuple[float, list[float]]:
    """Median of ``values`` and a percentile-bootstrap 95% CI of the median.

    The resampling is seeded, so the same values give the same interval. With one value the
    interval collapses to that value (NB: that says nothing about spread; the record keeps ``repeats``).
    """
    if not values:
        raise ValueError("no values")
    a = np.asarray(values, dtype=np.float64)
    med = float(np.median(a))
    if len(a) == 1 or np.all(a == a[0]):
        return med, [med, med]
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    idx = rng.integers(0, len(a), size=(BOOTSTRAP_RESAMPLES, len(a)))
    meds = np.median(a[idx], axis=1)
    lo, hi = np.percentile(meds, [2.5, 97.5])
    return med, [float(lo), float(hi)]
