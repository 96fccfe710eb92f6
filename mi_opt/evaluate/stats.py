"""Uncertainty of evaluation scores, and paired tests of a change between two models.

A score measured on n items is an estimate: with 40 items a true accuracy of 0.5 reads
anywhere from about 0.35 to 0.65. Every score mi-opt reports carries an interval, and a change
between two models is called significant only when a paired test on the *same* items says so:
pairing removes the item-to-item variation both models share, which dominates on small sets.

- 0/1 scores (exact match, accuracy): Clopper-Pearson exact interval; McNemar's exact test on
  the items where the two models disagree.
- any per-item score (perplexity windows, graded metrics): normal interval from the standard
  error; a paired bootstrap over items for the change, whose p-value is the two-sided share of
  resamples on the far side of zero.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from mi_opt.errors import MiOptError

LEVEL = 0.95              # coverage of every interval mi-opt reports
ALPHA = 1 - LEVEL         # a change is significant when its paired p-value is below this
BOOTSTRAP_ITERS = 2000    # resamples: the p-value's resolution is 1 / BOOTSTRAP_ITERS
BOOTSTRAP_SEED = 0        # fixed, so the same results always give the same interval


def _z(level: float) -> float:
    from scipy.stats import norm

    return float(norm.ppf(0.5 + level / 2))


def is_binary(values: Sequence[float]) -> bool:
    return all(v in (0, 1) for v in values)


def binomial_interval(k: int, n: int, level: float = LEVEL) -> tuple[float, float]:
    """Clopper-Pearson exact interval for k successes in n trials (never outside [0, 1])."""
    from scipy.stats import beta

    if n < 1 or not 0 <= k <= n:
        raise MiOptError(f"a binomial interval needs 0 <= k <= n and n >= 1 (got k={k}, n={n})")
    a = (1 - level) / 2
    low = 0.0 if k == 0 else float(beta.ppf(a, k, n - k + 1))
    high = 1.0 if k == n else float(beta.ppf(1 - a, k + 1, n - k))
    return low, high


def mean_stderr(values: Sequence[float]) -> float:
    """Standard error of the mean: sample standard deviation / sqrt(n) (0 for one value)."""
    x = np.asarray(values, dtype=float)
    return float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else 0.0


def score_summary(values: Sequence[float], level: float = LEVEL) -> dict:
    """{mean, stderr, interval, n, method} of per-item scores."""
    if not len(values):
        raise MiOptError("a score summary needs at least one item")
    mean, se = float(np.mean(values)), mean_stderr(values)
    if is_binary(values):
        interval, method = binomial_interval(int(sum(values)), len(values), level), "clopper-pearson"
    else:
        z = _z(level)
        interval, method = (mean - z * se, mean + z * se), "normal"
    return {"mean": mean, "stderr": se, "interval": list(interval), "n": len(values), "interval_method": method,
            "level": level}


def mcnemar_p(base: Sequence[float], other: Sequence[float]) -> float:
    """Exact two-sided McNemar test: under "no change", each discordant item is a fair coin."""
    from scipy.stats import binomtest

    gained = sum(1 for a, b in zip(base, other) if b > a)
    lost = sum(1 for a, b in zip(base, other) if b < a)
    if gained + lost == 0:
        return 1.0
    return float(binomtest(gained, gained + lost, 0.5).pvalue)


def _resample_statistic(base: np.ndarray, other: np.ndarray, statistic: Callable, iters: int,
                        seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(base), size=(iters, len(base)))
    return np.array([statistic(base[i], other[i]) for i in idx])


def paired_bootstrap(base: Sequence[float], other: Sequence[float],
                     statistic: Callable[[np.ndarray, np.ndarray], float] | None = None,
                     iters: int = BOOTSTRAP_ITERS, seed: int = BOOTSTRAP_SEED,
                     level: float = LEVEL) -> dict:
    """The change statistic(base, other) (default: mean(other) - mean(base)) with a percentile
    interval and a two-sided p-value, both from resampling the *pairs* of items.

    Arrays may be 2-D (items x columns) when the statistic needs more than one number per item
    (perplexity: nll sum and token count per window).
    """
    base_a, other_a = np.asarray(base, dtype=float), np.asarray(other, dtype=float)
    if base_a.shape != other_a.shape or len(base_a) < 1:
        raise MiOptError(f"a paired test needs the same items on both sides (got {base_a.shape} and "
                         f"{other_a.shape})")
    statistic = statistic or (lambda a, b: float(b.mean() - a.mean()))
    change = float(statistic(base_a, other_a))
    if np.array_equal(base_a, other_a):  # identical results: no resample can show a change
        return {"change": change, "interval": [change, change], "p_value": 1.0}
    draws = _resample_statistic(base_a, other_a, statistic, iters, seed)
    a = (1 - level) / 2
    low, high = np.quantile(draws, [a, 1 - a])
    # Two-sided: how often a resample lands on the other side of zero (or on it), doubled.
    far = min((draws <= 0).mean(), (draws >= 0).mean())
    return {"change": change, "interval": [float(low), float(high)], "p_value": float(min(1.0, 2 * far))}


def paired_change(base: Sequence[float], other: Sequence[float], level: float = LEVEL) -> dict:
    """Change of the mean per-item score between two models on the same items.

    {change, interval, p_value, significant, test, n}: McNemar's exact test when both are 0/1
    scores, a paired bootstrap otherwise; the interval is always the paired bootstrap's.
    """
    boot = paired_bootstrap(base, other, level=level)
    binary = is_binary(base) and is_binary(other)
    p = mcnemar_p(base, other) if binary else boot["p_value"]
    return {**boot, "p_value": p, "significant": p < 1 - level, "test": "mcnemar" if binary else "paired bootstrap",
            "n": len(base), "level": level}


def _perplexity_of(nll_sum: np.ndarray, tokens: np.ndarray) -> float:
    return math.exp(nll_sum.sum() / tokens.sum())


def perplexity_summary(window_nll: Sequence[float], window_tokens: Sequence[int], level: float = LEVEL) -> dict:
    """Perplexity's interval across windows: exp of the token-weighted mean NLL, its standard
    error taken over windows (tokens inside one window are not independent; windows nearly are)."""
    nll, tokens = np.asarray(window_nll, float), np.asarray(window_tokens, float)
    mean = nll.sum() / tokens.sum()
    per_window = nll / tokens
    # Ratio estimator's standard error (windows of equal length reduce it to the plain one).
    weights = tokens / tokens.mean()
    se = float(np.sqrt(((weights * (per_window - mean)) ** 2).sum() / (len(nll) * max(len(nll) - 1, 1))))
    z = _z(level)
    return {"nll_stderr": se, "interval": [math.exp(mean - z * se), math.exp(mean + z * se)],
            "n_windows": len(nll), "interval_method": "normal on mean nll over windows", "level": level}


def bits_per_byte_interval(window_nll: Sequence[float], window_tokens: Sequence[int], n_bytes: int,
                           level: float = LEVEL) -> list[float]:
    """Bits per byte's interval, by perplexity's method: the normal interval of the mean NLL per
    token over windows, converted. Bits per byte = mean NLL x tokens / (bytes x ln 2), and the
    tokens and bytes are those of the same fixed windows, so the conversion is a constant factor."""
    if n_bytes < 1:
        raise MiOptError(f"bits per byte needs at least one predicted byte (got {n_bytes})")
    summary = perplexity_summary(window_nll, window_tokens, level)
    mean = float(np.sum(window_nll) / np.sum(window_tokens))
    factor = float(np.sum(window_tokens)) / (n_bytes * math.log(2))
    half = _z(level) * summary["nll_stderr"]
    return [(mean - half) * factor, (mean + half) * factor]


def paired_perplexity_change(base_nll: Sequence[float], other_nll: Sequence[float], tokens: Sequence[int],
                             level: float = LEVEL) -> dict:
    """Change of perplexity (other - base) on the same windows, by a paired bootstrap over windows."""
    t = np.asarray(tokens, float)
    a = np.stack([np.asarray(base_nll, float), t], axis=1)
    b = np.stack([np.asarray(other_nll, float), t], axis=1)
    stat = lambda x, y: _perplexity_of(y[:, 0], y[:, 1]) - _perplexity_of(x[:, 0], x[:, 1])  # noqa: E731
    boot = paired_bootstrap(a, b, stat, level=level)
    return {**boot, "significant": boot["p_value"] < 1 - level, "test": "paired bootstrap over windows",
            "n": len(t), "level": level}


def _stderr_of(interval: Sequence[float], level: float) -> float:
    return (interval[1] - interval[0]) / (2 * _z(level))


def mean_of_scores(summaries: Sequence[dict], level: float = LEVEL) -> dict | None:
    """Interval of the mean of several tasks' scores (tasks independent): the task mean's error bar."""
    if not summaries or any(s is None for s in summaries):
        return None
    mean = float(np.mean([s["mean"] for s in summaries]))
    se = math.sqrt(sum(s["stderr"] ** 2 for s in summaries)) / len(summaries)
    z = _z(level)
    return {"mean": mean, "stderr": se, "interval": [mean - z * se, mean + z * se], "level": level}


def mean_of_changes(changes: Sequence[dict], level: float = LEVEL) -> dict | None:
    """Change of the mean of several tasks' scores from their paired changes (tasks independent;
    each one's standard error read back from its interval), with a normal test."""
    from scipy.stats import norm

    if not changes or any(c is None or "change" not in c for c in changes):
        return None
    change = float(np.mean([c["change"] for c in changes]))
    se = math.sqrt(sum(_stderr_of(c["interval"], level) ** 2 for c in changes)) / len(changes)
    if se == 0:
        p = 1.0 if change == 0 else 0.0
    else:
        p = float(2 * norm.sf(abs(change) / se))
    z = _z(level)
    return {"change": change, "interval": [change - z * se, change + z * se], "p_value": p,
            "significant": p < 1 - level, "test": "normal, from the tasks' paired changes", "level": level}
