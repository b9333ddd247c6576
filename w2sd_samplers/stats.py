"""Seed handling and the statistics every table uses: means with 95% t-intervals, paired t-tests and Holm's
correction for the many comparisons of one table."""
import math


def _scipy_stats():
    try:
        from scipy import stats
    except ImportError as e:
        raise ImportError('the benchmarks need scipy: pip install scipy (in a w2sd-samplers checkout: '
                          'pip install -e ".[bench]")') from e
    return stats


def split_seeds(n_tune, n_eval, base=0):
    """Disjoint seed lists: hyperparameters are chosen on ``tune`` and reported on ``eval``."""
    if n_tune < 1 or n_eval < 2:
        raise ValueError(f'need n_tune >= 1 and n_eval >= 2 (for an interval), got {n_tune} and {n_eval}')
    tune = list(range(base, base + n_tune))
    return tune, list(range(base + n_tune, base + n_tune + n_eval))


def mean_ci(values, level=0.95):
    """Mean and the half-width of its two-sided t-interval."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float('nan')
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, _scipy_stats().t.ppf(0.5 + level / 2, n - 1) * sd / math.sqrt(n)


def paired_p(a, b):
    """Two-sided paired t-test p-value of ``a`` against ``b`` (same seeds, same order)."""
    if len(a) != len(b):
        raise ValueError(f'paired samples must have equal length, got {len(a)} and {len(b)}')
    if all(x == y for x, y in zip(a, b)):
        return 1.
    return float(_scipy_stats().ttest_rel(a, b).pvalue)


def holm(pvalues):
    """Holm's step-down adjusted p-values (same order): controls the family-wise error rate of the whole list."""
    order = sorted(range(len(pvalues)), key=lambda i: pvalues[i])
    adjusted, running = [0.] * len(pvalues), 0.
    for rank, i in enumerate(order):
        running = max(running, min(1., (len(pvalues) - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


def _diffs(a, b):
    if len(a) != len(b):
        raise ValueError(f'paired samples must have equal length, got {len(a)} and {len(b)}')
    d = [x - y for x, y in zip(a, b)]
    mean = sum(d) / len(d)
    return d, mean, math.sqrt(sum((v - mean) ** 2 for v in d) / (len(d) - 1))


def tost_p(a, b, margin):
    """Equivalence of paired ``a`` and ``b`` within ``±margin`` (two one-sided t-tests, Schuirmann 1987): the
    larger of the two one-sided p-values; below alpha, ``|mean(a - b)| < margin`` is shown at level alpha."""
    if not margin > 0:
        raise ValueError(f'margin must be > 0, got {margin!r}')
    d, mean, sd = _diffs(a, b)
    if sd == 0:
        return 0. if abs(mean) < margin else 1.
    t, se, df = _scipy_stats().t, sd / math.sqrt(len(d)), len(d) - 1
    return float(max(t.sf((mean + margin) / se, df), t.cdf((mean - margin) / se, df)))


def paired_power(sd, effect, n, alpha=0.05):
    """Power of the two-sided paired t-test at level ``alpha`` to detect a mean difference ``effect`` with ``n``
    pairs whose differences have standard deviation ``sd`` (non-central t)."""
    if n < 2:
        return float('nan')
    if sd == 0:
        return 1. if effect else alpha
    t, nct, df = _scipy_stats().t, _scipy_stats().nct, n - 1
    crit, nc = t.ppf(1 - alpha / 2, df), abs(effect) / sd * math.sqrt(n)
    # the far tail as sf at -nc: scipy's nct.cdf(-crit, df, nc) returns nan for some large nc
    return float(nct.sf(crit, df, nc) + nct.sf(crit, df, -nc))


def pairs_for_power(sd, effect, power=0.8, alpha=0.05, most=10_000):
    """The smallest number of pairs whose paired t-test reaches ``power`` for ``effect`` (None above ``most``)."""
    return next((n for n in range(2, most + 1) if paired_power(sd, effect, n, alpha) >= power), None)
