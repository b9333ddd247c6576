"""Seed handling and the statistics every table uses: means with 95% t-intervals, paired t-tests and Holm's
correction for the many comparisons of one table; for paired comparisons over prompts (``w2sd eval``): Wilson
intervals of win rates, a bootstrap over groups (prompts, with their seeds) and variance components; TOST and
power of paired t-tests."""
import math
import statistics


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


def wilson(successes, n, level=0.95):
    """Wilson score interval of a proportion ``successes / n`` (``successes`` may count ties as halves); unlike
    the normal or a percentile-bootstrap interval it is not zero-width at 0 and 1. ``(nan, nan)`` for n = 0."""
    if n == 0:
        return math.nan, math.nan
    z = statistics.NormalDist().inv_cdf(0.5 + level / 2)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0., centre - half), min(1., centre + half)


def cluster_bootstrap(groups, levels=(0.95,), resamples=4000, seed=0):
    """Mean of every value in ``groups`` (lists of values, e.g. the seeds of each prompt) and its percentile
    bootstrap intervals at each of ``levels``, resampling whole groups: the values of a group (seeds of one prompt)
    are correlated, the groups (prompts) are the independent draws. ``nan`` intervals with fewer than 2 groups;
    when every resample gives the same mean (e.g. identical values) the interval is that point."""
    import numpy as np
    groups = [list(g) for g in groups if len(g)]
    if not groups:
        return math.nan, [(math.nan, math.nan) for _ in levels]
    sums = np.array([math.fsum(g) for g in groups])
    sizes = np.array([len(g) for g in groups], dtype=float)
    mean = float(sums.sum() / sizes.sum())
    if len(groups) < 2:
        return mean, [(math.nan, math.nan) for _ in levels]
    pick = np.random.default_rng(seed).integers(0, len(groups), size=(resamples, len(groups)))
    means = sums[pick].sum(1) / sizes[pick].sum(1)
    return mean, [tuple(float(q) for q in np.quantile(means, [0.5 - lv / 2, 0.5 + lv / 2])) for lv in levels]


def variance_components(groups):
    """``(between, within)`` variance components of values grouped by prompt (one-way random effects, method of
    moments; ``between`` is clipped at 0): a prompt's mean over s seeds varies as ``between + within / s``."""
    groups = [list(g) for g in groups if len(g)]
    k, n = len(groups), sum(len(g) for g in groups)
    if k < 2 or n <= k:
        raise ValueError(f'need at least 2 groups and more values than groups, got {k} groups of {n} values')
    grand = math.fsum(map(math.fsum, groups)) / n
    means = [math.fsum(g) / len(g) for g in groups]
    within = math.fsum((v - m) ** 2 for g, m in zip(groups, means) for v in g) / (n - k)
    between_ms = math.fsum(len(g) * (m - grand) ** 2 for g, m in zip(groups, means)) / (k - 1)
    n0 = (n - sum(len(g) ** 2 for g in groups) / n) / (k - 1)      # the mean group size of unbalanced designs
    return max(0., (between_ms - within) / n0), within


def paired_p(a, b):
    """Two-sided paired t-test p-value of ``a`` against ``b`` (same seeds, same order)."""
    if len(a) != len(b):
        raise ValueError(f'paired samples must have equal length, got {len(a)} and {len(b)}')
    if all(x == y for x, y in zip(a, b)):
        return 1.
    if len(a) > 1 and len({x - y for x, y in zip(a, b)}) == 1:  # a constant shift: t is infinite (scipy warns)
        return 0.
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
    # the far tail P(T < -crit) as sf at -nc by symmetry: scipy's nct.cdf(-crit, df, nc) returns nan for some large nc
    return float(nct.sf(crit, df, nc) + nct.sf(crit, df, -nc))


def pairs_for_power(sd, effect, power=0.8, alpha=0.05, most=10_000):
    """The smallest number of pairs whose paired t-test reaches ``power`` for ``effect`` (None above ``most``)."""
    return next((n for n in range(2, most + 1) if paired_power(sd, effect, n, alpha) >= power), None)
