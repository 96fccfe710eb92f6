"""Intervals equal their formulas; identical results are never a significant change."""
import math

import numpy as np
import pytest
from scipy.stats import binom

from mi_opt.errors import MiOptError
from mi_opt.evaluate.stats import (binomial_interval, mcnemar_p, mean_of_changes, paired_bootstrap, paired_change,
                                   paired_perplexity_change, perplexity_summary, score_summary)


def test_clopper_pearson_matches_its_closed_forms():
    # k = 0 and k = n have closed forms: (0, 1 - (a/2)^(1/n)) and ((a/2)^(1/n), 1).
    assert binomial_interval(0, 10) == pytest.approx((0.0, 1 - 0.025 ** (1 / 10)))
    assert binomial_interval(10, 10) == pytest.approx((0.025 ** (1 / 10), 1.0))


@pytest.mark.parametrize("k,n", [(1, 10), (20, 40), (117, 200)])
def test_clopper_pearson_bounds_solve_the_binomial_tails(k, n):
    low, high = binomial_interval(k, n)
    # The definition: at p = low, seeing k or more has probability a/2; at p = high, k or fewer.
    assert binom.sf(k - 1, n, low) == pytest.approx(0.025, rel=1e-6)
    assert binom.cdf(k, n, high) == pytest.approx(0.025, rel=1e-6)
    assert low < k / n < high


def test_binomial_interval_refuses_impossible_counts():
    with pytest.raises(MiOptError, match="0 <= k <= n"):
        binomial_interval(5, 3)


def test_score_summary_uses_the_exact_interval_for_right_wrong_scores():
    s = score_summary([1, 0, 1, 1, 0, 0, 0, 1, 1, 1])
    assert s["mean"] == 0.6 and s["interval"] == pytest.approx(list(binomial_interval(6, 10)))
    assert s["stderr"] == pytest.approx(np.std([1, 0, 1, 1, 0, 0, 0, 1, 1, 1], ddof=1) / math.sqrt(10))
    graded = score_summary([0.2, 0.4, 0.9])
    assert graded["interval_method"] == "normal"


@pytest.mark.parametrize("seed", range(5))
def test_identical_results_are_never_significant(seed):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 2, 200).astype(float)
    same = paired_change(scores, scores.copy())
    assert same["change"] == 0 and same["p_value"] == 1.0 and not same["significant"]
    graded = rng.random(50)
    assert not paired_change(graded, graded.copy())["significant"]
    nll, tokens = rng.random(16) * 100, [255] * 16
    ppl = paired_perplexity_change(nll, nll.copy(), tokens)
    assert ppl["change"] == 0 and not ppl["significant"]


def test_mcnemar_counts_only_discordant_items():
    base = [1] * 30 + [0] * 30
    # 10 items lost, none gained: p = 2 * 0.5^10
    other = [0] * 10 + [1] * 20 + [0] * 30
    assert mcnemar_p(base, other) == pytest.approx(2 * 0.5 ** 10)
    assert paired_change(base, other)["significant"] and paired_change(base, other)["test"] == "mcnemar"


def test_a_large_paired_shift_is_significant_and_its_interval_covers_it():
    rng = np.random.default_rng(0)
    base = rng.normal(3.0, 1.0, 64)
    other = base + 0.3 + rng.normal(0, 0.05, 64)     # every window worse by about 0.3
    boot = paired_bootstrap(base, other)
    assert boot["interval"][0] < 0.3 < boot["interval"][1] and boot["p_value"] < 0.01


def test_perplexity_interval_brackets_the_perplexity():
    nll = np.array([3.1, 2.9, 3.4, 3.0]) * 100
    s = perplexity_summary(nll, [100] * 4)
    ppl = math.exp(nll.sum() / 400)
    assert s["interval"][0] < ppl < s["interval"][1]
    se = np.std(nll / 100, ddof=1) / 2           # equal windows: the plain standard error of window means
    assert s["nll_stderr"] == pytest.approx(se)


def test_task_mean_change_combines_task_changes():
    a = {"change": 0.1, "interval": [0.0, 0.2]}
    b = {"change": -0.1, "interval": [-0.2, 0.0]}
    out = mean_of_changes([a, b])
    assert out["change"] == pytest.approx(0.0) and not out["significant"]
    assert mean_of_changes([a, {"reason": "no items"}]) is None


def test_bits_per_byte_interval_is_perplexitys_nll_interval_converted():
    from mi_opt.evaluate.stats import bits_per_byte_interval

    nll, tokens, n_bytes = [300.0, 320.0, 290.0, 310.0], [100] * 4, 1500
    bpb = sum(nll) / math.log(2) / n_bytes
    low, high = bits_per_byte_interval(nll, tokens, n_bytes)
    assert low < bpb < high and (low + high) / 2 == pytest.approx(bpb)
    # the same interval as perplexity's, on the log scale: log(ppl bounds) x tokens / (bytes x ln 2)
    p_low, p_high = perplexity_summary(nll, tokens)["interval"]
    factor = sum(tokens) / (n_bytes * math.log(2))
    assert (low, high) == pytest.approx((math.log(p_low) * factor, math.log(p_high) * factor))
    with pytest.raises(MiOptError, match="at least one predicted byte"):
        bits_per_byte_interval(nll, tokens, 0)
