"""The summary of an eval run from its rows: paired differences with intervals and equivalence verdicts, win rates,
per-prompt extremes, a power table, per_prompt.csv, the image grid and the paired-difference plot.

Rows of one (prompt, seed) share their initial noise, so methods are compared through the paired differences of
their scores. The prompts are the independent draws and the seeds of a prompt are correlated, so intervals come from
a bootstrap over prompts that keeps each prompt's seeds together (:func:`~w2sd_samplers.stats.cluster_bootstrap`).
"""
import csv
import dataclasses
import math

from ..stats import cluster_bootstrap, pairs_for_power, variance_components, wilson

DEFAULT_MARGIN = 0.1        # equivalence margin: this many standard deviations of the reference's scores


def scored(rows):
    """The rows that carry scores (rows with an error, e.g. a black image, carry none)."""
    return [r for r in rows if r.get('scores')]


def differences(rows, scorer, method, reference):
    """``{prompt_index: [score(method) - score(reference) per seed]}`` over the items where both were scored."""
    by_item = {}
    for r in scored(rows):
        by_item.setdefault((r['prompt_index'], r['seed']), {})[r['method']] = r['scores'][scorer]
    out = {}
    for (pi, _), v in sorted(by_item.items()):
        if method in v and reference in v:
            out.setdefault(pi, []).append(v[method] - v[reference])
    return out


def margin(rows, scorer, reference, spec):
    """The equivalence margin in score units: ``spec[scorer]`` when given (absolute), else ``spec['sd']`` (default
    :data:`DEFAULT_MARGIN`) standard deviations of ``reference``'s scores over its items."""
    if scorer in spec:
        return spec[scorer]
    values = [r['scores'][scorer] for r in scored(rows) if r['method'] == reference]
    if len(values) < 2:
        return math.nan
    mean = math.fsum(values) / len(values)
    return spec.get('sd', DEFAULT_MARGIN) * math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (len(values) - 1))


def margin_rule(spec):
    """The margins of ``spec`` (as :func:`margin` reads it) in words."""
    sd = spec.get('sd', DEFAULT_MARGIN)
    fixed = [f'{k} ±{v:g}' for k, v in spec.items() if k != 'sd']
    return (f'{sd:g} standard deviations of the reference\'s scores over its items'
            + ('' if 'sd' in spec else ' (the default)') + (f'; fixed: {", ".join(fixed)}' if fixed else '')
            + ' (--margin)')


@dataclasses.dataclass
class Comparison:
    """``method`` against ``reference`` on ``scorer``: mean paired difference, its 95% and 90% intervals, the
    equivalence margin, wins (ties count half) over ``items`` items of ``prompts`` prompts."""
    mean: float
    ci95: tuple
    ci90: tuple
    margin: float
    wins: float
    items: int
    prompts: int

    @property
    def verdict(self):
        """'better' / 'worse' (the 95% interval excludes 0), 'equivalent' (TOST at 5%: the 90% interval lies within
        +-margin), else 'inconclusive'; 'identical' when every difference is 0."""
        lo, hi = self.ci95
        if self.items and self.mean == 0 and lo == hi == 0:
            return 'identical'
        if math.isnan(lo):
            return 'too few prompts'
        if lo > 0:
            return 'better'
        if hi < 0:
            return 'worse'
        if -self.margin < self.ci90[0] and self.ci90[1] < self.margin:
            return 'equivalent'
        return 'inconclusive'

    def win_rate(self):
        """Share of items won, with its Wilson 95% interval (items taken as independent)."""
        return self.wins / self.items, wilson(self.wins, self.items)


def compare(rows, scorer, method, reference, margin_value):
    diffs = differences(rows, scorer, method, reference)
    mean, (ci95, ci90) = cluster_bootstrap(diffs.values(), levels=(0.95, 0.90))
    flat = [d for g in diffs.values() for d in g]
    wins = sum(1. if d > 0 else .5 if d == 0 else 0. for d in flat)
    return Comparison(mean, ci95, ci90, margin_value, wins, len(flat), len(diffs))


def fmt(v):
    return 'n/a' if v != v else f'{v:.3g}' if abs(v) >= 1e-3 or v == 0 else f'{v:.2e}'


def cell(c):
    """'+0.41 [0.12, 0.70] better' for a table."""
    if not c.items:
        return '-'
    lo, hi = c.ci95
    interval = '' if lo != lo else f' [{fmt(lo)}, {fmt(hi)}]'
    return f'{c.mean:+.3g}{interval} {c.verdict}'


def win_cell(c):
    if not c.items:
        return '-'
    rate, (lo, hi) = c.win_rate()
    return f'{rate:.2f} [{lo:.2f}, {hi:.2f}]'


def tables(rows, methods, scorers, references, margins, fid=None):
    """Markdown: per scorer, each method's mean score, paired difference and win rate against each reference."""
    lines = []
    for scorer in scorers:
        head = ''.join(f' | Δ vs {r} [95% CI] | win rate vs {r}' for r in references)
        lines += [f'### {scorer}', '',
                  'Equivalence margins: ' + ', '.join(f'{r} ±{fmt(margins[scorer, r])}' for r in references) + '.',
                  '', f'| method | steps | NFE | mean score{head} | s / image | items | errors |',
                  '|' + '---|' * (7 + 2 * len(references))]
        for m in methods:
            mine = [r for r in rows if r['method'] == m]
            ok = [r['scores'][scorer] for r in scored(mine)]
            if not mine:
                continue
            cells = []
            for ref in references:
                if ref == m:
                    cells += ['-', '-']
                    continue
                c = compare(rows, scorer, m, ref, margins[scorer, ref])
                cells += [cell(c), win_cell(c)]
            nfe = sorted({r['nfe'] for r in mine})
            seconds = sum(r['seconds'] for r in mine) / len(mine)
            mean = fmt(math.fsum(ok) / len(ok)) if ok else 'n/a'
            lines.append(f'| {m} | {"/".join(sorted({str(r["steps"]) for r in mine}))} | '
                         f'{"/".join(map(str, nfe))} | {mean} | ' + ' | '.join(cells)
                         + f' | {seconds:.3g} | {len(mine)} | {len(mine) - len(ok)} |')
        lines.append('')
    if fid:
        lines += ['### FID against the reference folder (lower is better)', '', '| method | FID |', '|---|---|']
        lines += [f'| {m} | {v:.4g} |' for m, v in fid.items()] + ['']
    return '\n'.join(lines)


def extremes(rows, scorer, method, reference, k=3):
    """The ``k`` prompts where ``method`` gains most over ``reference`` (mean over seeds) and the ``k`` where it
    loses most: ``(helps, hurts)``, each a list of ``(prompt_index, mean difference)``."""
    means = sorted(((math.fsum(d) / len(d), pi) for pi, d in differences(rows, scorer, method, reference).items()),
                   key=lambda t: (-t[0], t[1]))
    helps = [(pi, d) for d, pi in means[:k] if d > 0]
    hurts = [(pi, d) for d, pi in reversed(means[-k:]) if d < 0]
    return helps, hurts


def power_table(rows, scorer, method, reference, margin_value, seeds=(1, 2, 4, 8), alpha=0.05, power=0.8):
    """Markdown lines: prompts needed for ``power`` to detect a paired difference of 1, 2 and 4 margins at each
    number of seeds per prompt, from the variance components of this run's differences (a prompt's mean difference
    over s seeds varies as between + within / s; paired t-test over prompts); [] when they cannot be estimated
    (fewer than 2 prompts, or 1 seed each)."""
    diffs = list(differences(rows, scorer, method, reference).values())
    try:
        between, within = variance_components(diffs)
    except ValueError:
        return []
    if margin_value != margin_value or margin_value <= 0 or between + within == 0:
        return []
    sizes = (1, 2, 4)
    lines = [f'Prompts needed for {power:.0%} power (paired t-test over prompts, two-sided, alpha {alpha:g}) to '
             f'detect a mean paired difference of {method} vs {reference} on {scorer}, from this run\'s variance of '
             f'the differences (between prompts {fmt(between)}, between seeds of a prompt {fmt(within)}):', '',
             '| seeds per prompt | ' + ' | '.join(f'Δ = {fmt(k * margin_value)} ({k} x margin)' for k in sizes)
             + ' |', '|---|' + '---|' * len(sizes)]
    for s in seeds:
        sd = math.sqrt(between + within / s)
        lines.append(f'| {s} | ' + ' | '.join(str(pairs_for_power(sd, k * margin_value, power, alpha) or '> 10000')
                                              for k in sizes) + ' |')
    return lines


def per_prompt_csv(path, rows, scorers):
    """One line per row: stage (tune or eval; prompt indices count within each stage's prompts), prompt, seed,
    method, steps, NFE, seconds, each score, error."""
    with open(path, 'w', newline='', encoding='utf-8') as f:
        w = csv.writer(f)
        w.writerow(['stage', 'prompt_index', 'prompt', 'seed', 'method', 'steps', 'nfe', 'seconds', *scorers, 'error',
                    'image'])
        for r in rows:
            scores = r.get('scores') or {}
            w.writerow([r.get('stage', 'eval'), r['prompt_index'], r['prompt'], r['seed'], r['method'], r['steps'],
                        r['nfe'], f'{r["seconds"]:.4f}', *[scores.get(s, '') for s in scorers], r.get('error', ''),
                        r['image']])


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


def paired_plot(path, rows, methods, scorers, references, margins):
    """One panel per scorer: each method's mean paired difference against each reference, with its 95% interval
    and the equivalence band (+-margin) shaded."""
    plt = _plt()
    fig, axes = plt.subplots(len(scorers), 1, figsize=(6.5, 0.8 + 0.9 * len(scorers) * len(methods) ** .5 + 0.3
                                                         * len(methods) * len(references)), squeeze=False)
    for ax, scorer in zip(axes[:, 0], scorers):
        ticks = []
        for m in methods:
            for k, ref in enumerate(references):
                c = compare(rows, scorer, m, ref, margins[scorer, ref]) if m != ref else None
                if c is None or not c.items:
                    continue
                y = len(ticks)
                err = None if c.ci95[0] != c.ci95[0] else [[c.mean - c.ci95[0]], [c.ci95[1] - c.mean]]
                ax.errorbar(c.mean, y, xerr=err, fmt='o', color=f'C{k}', capsize=3,
                            label=f'vs {ref} (±margin shaded)' if not any(t[1].endswith(ref) for t in ticks)
                            else None)
                ax.fill_between([-c.margin, c.margin], y - .4, y + .4, color=f'C{k}', alpha=.12, lw=0)
                ticks.append((y, f'{m} vs {ref}'))
        ax.axvline(0, color='k', lw=.8, ls='--')
        ax.set_yticks([t for t, _ in ticks], [label for _, label in ticks], fontsize=7)
        ax.invert_yaxis()
        ax.set_title(f'{scorer}: mean paired difference (95% interval, bootstrap over prompts)', fontsize=8)
        if ticks:
            ax.legend(fontsize=6, loc='best')
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
