"""Paired comparison statistics against independent computations."""

import numpy as np
import pytest

from wavesweep.stats import mcnemar_exact, paired_comparison


def _mcnemar_oracle(b: int, c: int) -> float:
    """Exact two-sided McNemar p from scipy's binomial test (an independent implementation)."""
    from scipy.stats import binomtest

    return 1.0 if b + c == 0 else float(binomtest(b, b + c, 0.5, alternative="two-sided").pvalue)


@pytest.mark.parametrize("b,c", [(0, 0), (0, 5), (3, 3), (10, 2), (1, 30), (57, 40), (2400, 2600)])
def test_mcnemar_matches_binomial_sum(b, c):
    assert mcnemar_exact(b, c) == pytest.approx(_mcnemar_oracle(b, c), rel=1e-9, abs=1e-15)


def test_paired_comparison_counts_gap_and_interval():
    rng = np.random.default_rng(1)
    a = rng.random(500) < 0.8
    b = rng.random(500) < 0.7
    res = paired_comparison(a, b, n_boot=1000, seed=3)
    assert res.gap == pytest.approx(a.mean() - b.mean())
    assert res.only_a == int(np.sum(a & ~b)) and res.only_b == int(np.sum(~a & b))
    assert res.mcnemar_p == pytest.approx(_mcnemar_oracle(res.only_a, res.only_b))
    assert res.ci_low <= res.gap <= res.ci_high
    # the interval should be roughly gap +- 1.96 * SE of a paired difference
    d = a.astype(float) - b.astype(float)
    se = d.std(ddof=1) / np.sqrt(d.size)
    assert res.ci_high - res.ci_low == pytest.approx(2 * 1.96 * se, rel=0.2)
    assert paired_comparison(a, b, n_boot=1000, seed=3) == res  # seeded: reproducible


def test_identical_models_have_zero_gap_and_p_one():
    a = np.array([True, False, True, True])
    res = paired_comparison(a, a.copy())
    assert (res.gap, res.ci_low, res.ci_high, res.mcnemar_p) == (0.0, 0.0, 0.0, 1.0)


def test_mismatched_vectors_rejected():
    with pytest.raises(ValueError, match="equal in shape"):
        paired_comparison(np.ones(3, bool), np.ones(4, bool))


def test_mcnemar_is_exact_at_imagenet_scale():
    """Tens of thousands of discordant pairs (50,000 ImageNet validation images): the same exact
    p as scipy's binomial test (its speed against the code it replaced: bench/bench_speedups.py)."""
    assert mcnemar_exact(10_000, 12_000) == pytest.approx(_mcnemar_oracle(10_000, 12_000), rel=1e-9)
    assert mcnemar_exact(24_000, 26_000) == pytest.approx(_mcnemar_oracle(24_000, 26_000), rel=1e-9)


@pytest.mark.parametrize("b,c", [(222, 164), (10, 60), (3, 3), (0, 0)])
def test_mcnemar_takes_numpy_counts(b, c):
    """Counts recomputed from logged predictions come as NumPy ints (``np.sum``): the same exact p
    as from Python ints (int64 overflowed in the binomial terms and 2**n: p = 1.0 for (222, 164))."""
    assert mcnemar_exact(np.int64(b), np.int64(c)) == mcnemar_exact(b, c)
    assert mcnemar_exact(np.int64(b), np.int64(c)) == pytest.approx(_mcnemar_oracle(b, c), rel=1e-9, abs=1e-15)
