"""Bootstrap intervals over concepts and seeds, against a plain loop that does the same by hand."""

import numpy as np
import pytest

from cat_engine.cat import stats


def _loop_hierarchical(groups: dict, replicates: int, seed: int) -> list[float]:
    """The two-level bootstrap written out: concepts with replacement, then each one's seeds."""
    rng = np.random.default_rng(seed)
    names = list(groups)
    out = []
    for _ in range(replicates):
        means = []
        for _ in names:
            x = groups[names[rng.integers(len(names))]]
            means.append(np.mean([x[rng.integers(len(x))] for _ in x]))
        out.append(np.mean(means))
    return np.percentile(out, [2.5, 97.5]).tolist()


def test_hierarchical_matches_the_loop_within_monte_carlo_error():
    rng = np.random.default_rng(5)
    groups = {f"c{i}": list(rng.normal(0.1 * i, 0.05, size=3 + i % 3)) for i in range(6)}
    fast = stats.hierarchical(groups, replicates=20_000)
    slow = _loop_hierarchical(groups, 4_000, seed=1)
    assert fast["mean"] == pytest.approx(np.mean([np.mean(v) for v in groups.values()]))
    assert fast["ci"] == pytest.approx(slow, abs=0.01)
    assert fast["concepts"] == 6 and fast["n"] == sum(len(v) for v in groups.values())


def test_the_concepts_spread_counts_not_only_the_seeds():
    # Seeds agree within each concept, concepts disagree: resampling seeds alone would give a zero-width interval.
    groups = {"a": [0.0, 0.0, 0.0], "b": [1.0, 1.0, 1.0]}
    result = stats.hierarchical(groups)
    assert result["mean"] == 0.5 and result["ci"] == [0.0, 1.0]
    assert stats.seeds_only([0.2, 0.2, 0.2])["ci"] == [pytest.approx(0.2), pytest.approx(0.2)]


def test_every_concept_weighs_the_same_and_the_result_is_reproducible():
    groups = {"many": [1.0] * 10, "few": [0.0, 0.0]}
    assert stats.hierarchical(groups)["mean"] == 0.5
    assert stats.hierarchical(groups) == stats.hierarchical(groups)
    one = stats.seeds_only([0.1, 0.4, 0.3, 0.2])
    assert one["mean"] == pytest.approx(0.25) and one["ci"][0] < 0.25 < one["ci"][1]
    with pytest.raises(ValueError):
        stats.hierarchical({})
