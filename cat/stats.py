"""Means and 95% bootstrap confidence intervals for experiments over concepts and seeds.

The toy-world experiment (cat/experiment.py) trains every method on several concepts with several
training seeds. The effect of CAT varies more between concepts than between seeds, so an interval
that resamples seeds alone would claim more than the data hold. :func:`hierarchical` resamples
both levels: the concepts with replacement, then, within each concept drawn, its seeds with
replacement (each draw of a concept independently). The estimate is the mean over concepts of the
mean over seeds, every concept weighing the same whatever its number of seeds; the interval is the
percentile interval of that estimate over the bootstrap replicates.

Paired differences (CAT - LoRA on the same concept and training seed) go in as the values; an
interval that excludes 0 is what "beyond the seed spread" means here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

LEVEL = 0.95
REPLICATES = 10_000
SEED = 0  # the bootstrap's own seed: the same data give the same interval


def interval(estimate: float, replicates: np.ndarray, level: float = LEVEL) -> dict:
    """``{"mean", "ci": [lo, hi], "n"...}`` from the bootstrap replicates' percentile interval."""
    tail = (1.0 - level) / 2.0 * 100.0
    lo, hi = np.percentile(replicates, [tail, 100.0 - tail])
    return {"mean": float(estimate), "ci": [float(lo), float(hi)]}


def seeds_only(values: Sequence[float], replicates: int = REPLICATES, seed: int = SEED) -> dict:
    """The mean of one concept's values and its 95% interval, resampling the seeds with replacement."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("no values to summarise")
    rng = np.random.default_rng(seed)
    draws = x[rng.integers(x.size, size=(replicates, x.size))].mean(axis=1)
    return interval(x.mean(), draws) | {"n": int(x.size)}


def hierarchical(
    by_concept: Mapping[str, Sequence[float]], replicates: int = REPLICATES, seed: int = SEED
) -> dict:
    """The mean over concepts of each concept's mean, and its 95% two-level bootstrap interval.

    Each replicate draws as many concepts as there are, with replacement; each concept drawn gets
    its own resample of its seeds, with replacement (a concept drawn twice is resampled twice).
    """
    groups = [np.asarray(v, dtype=np.float64) for v in by_concept.values() if len(v)]
    if not groups:
        raise ValueError("no values to summarise")
    rng = np.random.default_rng(seed)
    n = len(groups)
    chosen = rng.integers(n, size=(replicates, n))  # concept drawn into each slot of each replicate
    slot_means = np.empty((replicates, n))
    for c, x in enumerate(groups):
        where = chosen == c
        count = int(where.sum())
        if count:
            slot_means[where] = x[rng.integers(x.size, size=(count, x.size))].mean(axis=1)
    estimate = float(np.mean([x.mean() for x in groups]))
    return interval(estimate, slot_means.mean(axis=1)) | {
        "concepts": n,
        "n": int(sum(x.size for x in groups)),
    }


def sample_std(values: Sequence[float]) -> float:
    """The sample standard deviation (``n - 1``); ``nan`` for fewer than two values."""
    x = np.asarray(values, dtype=np.float64)
    return float(x.std(ddof=1)) if x.size > 1 else math.nan
