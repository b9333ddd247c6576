"""The summary of an eval run: Markdown table, image grid and win-rate plot from the merged rows."""
import math
import warnings

from ..stats import mean_ci

REFERENCES = ('plain', 'plain-nfe', 'autoguidance')


def win_rate(scores, reference, resamples=2000):
    """Share of paired items where ``scores`` beat ``reference`` (ties count half), with a bootstrap 95% interval
    (percentile method over items; ``nan`` bounds with fewer than 2 items)."""
    wins = [1. if a > b else .5 if a == b else 0. for a, b in zip(scores, reference)]
    rate = sum(wins) / len(wins)
    if len(wins) < 2 or len(set(wins)) == 1:
        return rate, (rate, rate) if len(wins) > 1 else (math.nan, math.nan)
    import numpy as np
    from scipy import stats
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')         # scipy warns on tiny or lumpy samples; the interval says enough
        ci = stats.bootstrap((np.array(wins),), np.mean, confidence_level=.95, n_resamples=resamples,
                             method='percentile', random_state=0).confidence_interval
    return rate, (float(ci.low), float(ci.high))


def _paired(rows, scorer, method, reference):
    by_item = {}
    for r in rows:
        by_item.setdefault((r['prompt_index'], r['seed']), {})[r['method']] = r['scores'][scorer]
    pairs = [(v[method], v[reference]) for v in by_item.values() if method in v and reference in v]
    return [a for a, _ in pairs], [b for _, b in pairs]


def _interval(rate, ci):
    return f'{rate:.2f}' if math.isnan(ci[0]) else f'{rate:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]'


def tables(rows, methods, scorers, fid=None):
    """Markdown: per scorer, each method's mean score, win rates against the references, NFE and time."""
    refs = [r for r in REFERENCES if r in methods]
    lines = []
    for scorer in scorers:
        lines += [f'### {scorer}', '',
                  '| method | steps | NFE | mean score (95% CI) | ' + ' | '.join(f'win rate vs {r}' for r in refs)
                  + ' | s / image | items |',
                  '|' + '---|' * (6 + len(refs))]
        for m in methods:
            mine = [r for r in rows if r['method'] == m]
            if not mine:
                continue
            mean, half = mean_ci([r['scores'][scorer] for r in mine]) if len(mine) > 1 else \
                (mine[0]['scores'][scorer], math.nan)
            wins = ['-' if r == m else _interval(*win_rate(*_paired(rows, scorer, m, r))) for r in refs]
            nfe = sorted({r['nfe'] for r in mine})
            seconds = sum(r['seconds'] for r in mine) / len(mine)
            ci = '' if math.isnan(half) else f' ± {half:.3g}'
            lines.append(f'| {m} | {mine[0]["steps"]} | {"/".join(map(str, nfe))} | {mean:.4g}{ci} | '
                         + ' | '.join(wins) + f' | {seconds:.3g} | {len(mine)} |')
        lines.append('')
    if fid:
        lines += ['### FID against the reference folder (lower is better)', '', '| method | FID |', '|---|---|']
        lines += [f'| {m} | {v:.4g} |' for m, v in fid.items()] + ['']
    return '\n'.join(lines)


def _plt():
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


def grid(path, rows, methods, prompts, open_image, max_prompts=6):
    """PNG grid: one row per prompt (its first seed), one column per method."""
    plt = _plt()
    seed = min(r['seed'] for r in rows)
    shown = sorted({r['prompt_index'] for r in rows})[:max_prompts]
    by = {(r['prompt_index'], r['method']): r for r in rows if r['seed'] == seed}
    fig, axes = plt.subplots(len(shown), len(methods), figsize=(1.8 * len(methods), 1.9 * len(shown)),
                             squeeze=False)
    for i, pi in enumerate(shown):
        for j, m in enumerate(methods):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            if (pi, m) in by:
                ax.imshow(open_image(by[pi, m]['image']))
            if i == 0:
                ax.set_title(m, fontsize=8)
            if j == 0:
                ax.set_ylabel(prompts[pi][:28], fontsize=7)
    fig.suptitle(f'seed {seed}', fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def winrate_plot(path, rows, methods, scorer):
    """Horizontal bars: each method's win rate (with its 95% interval) against each reference, for ``scorer``."""
    plt = _plt()
    refs = [r for r in REFERENCES if r in methods]
    others = [m for m in methods if m not in refs or len(refs) > 1]
    fig, ax = plt.subplots(figsize=(6, 0.5 + 0.35 * len(others) * max(len(refs), 1)))
    y = 0
    ticks = []
    for m in others:
        for ref in refs:
            if ref == m:
                continue
            a, b = _paired(rows, scorer, m, ref)
            if not a:
                continue
            rate, (lo, hi) = win_rate(a, b)
            err = None if math.isnan(lo) else [[rate - lo], [hi - rate]]
            label = None if f'vs {ref}' in ax.get_legend_handles_labels()[1] else f'vs {ref}'
            ax.barh(y, rate, xerr=err, color=f'C{refs.index(ref)}', capsize=3, label=label)
            ticks.append((y, f'{m} vs {ref}'))
            y += 1
    ax.axvline(.5, color='k', lw=.8, ls='--')
    ax.set_yticks([t for t, _ in ticks], [label for _, label in ticks], fontsize=8)
    ax.set_xlim(0, 1)
    ax.legend(fontsize=7, loc='lower right')
    ax.set_xlabel(f'paired win rate ({scorer}; 95% bootstrap interval)')
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
