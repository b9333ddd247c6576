"""Markdown tables and PNG plots of the benchmark results."""
import statistics

import torch

from .stats import mean_ci, paired_p

ALPHA = 0.05


def fmt(v):
    return f'{v:.3g}' if abs(v) >= 1e-3 or v == 0 else f'{v:.2e}'


def _ci(values):
    m, h = mean_ci(values)
    return f'{fmt(m)} ± {fmt(h)}'


def _ratio(a, b):
    """Ratio of evaluation-seed means; nan when the baseline's mean is <= 0 (an unbiased energy distance at the
    noise floor can be negative)."""
    ma, mb = statistics.fmean(a.values), statistics.fmean(b.values)
    return ma / mb if mb > 0 else float('nan')


def _rel(a, b):
    """'×0.52', or the difference of means 'Δ+0.012' when the ratio is undefined."""
    r = _ratio(a, b)
    return f'×{r:.2f}' if r == r else f'Δ{statistics.fmean(a.values) - statistics.fmean(b.values):+.2g}'


def _cmp(a, b):
    """'×0.52 (p=0.003)' for a against b, with the paired t-test."""
    return f'{_rel(a, b)} (p={paired_p(a.values, b.values):.2g})'


def _median(values):
    values = [v for v in values if v == v]
    return fmt(statistics.median(values)) if values else 'n/a'


def verdict(a, b):
    """+1 if a is significantly lower (better) than b, -1 if significantly higher, 0 otherwise."""
    if paired_p(a.values, b.values) >= ALPHA:
        return 0
    return 1 if statistics.fmean(a.values) < statistics.fmean(b.values) else -1


def settings(res):
    p = res.params
    return f"λ={round(p['lam_frac'] * (res.steps - 1))}, s={p['strength']:g}"


def quality_section(suite, results, header):
    """The markdown section of one quality suite: setup, summary, plain verdicts, per-pair tables."""
    s = suite
    out = [f'## {header}', '',
           f'Primary metric: **{s.primary}** (lower is better). Samplers {", ".join(s.samplers)}; '
           f'T in {{{", ".join(map(str, s.steps))}}}; Karras schedule sigma {s.sigma_max:g} -> {s.sigma_min:g}. '
           f'Tuned on seeds {s.tune_seeds} ({s.n_tune} samples each), reported on the disjoint seeds '
           f'{s.eval_seeds} ({s.n_eval} samples each): mean ± 95% t-interval over seeds, ratios of means, paired '
           f't-tests (p < {ALPHA} counts as significant). W2SD grid (fraction of the T-1 reflectable steps, strength): '
           f'{s.grid}; the `paper` variant is fixed at λ = T-1, strength 1, weak at the current sigma. '
           'Baselines at the W2SD run\'s NFE: strong alone with NFE steps (`strong@NFE`) and autoguidance '
           '`D_s + w (D_s - D_w)` with NFE // 2 steps, w tuned on the tuning seeds over '
           f'{list(s.ag_ws)}. `self` is the self-reflection control: the same W2SD settings with weak := strong.', '']
    out += ['### Summary over pairs and T', '',
            '| variant | sampler | median ×strong(T) | median ×strong@NFE | better / worse than strong@NFE '
            '| median ×AG@NFE | better / worse than AG | median self ×strong(T) |', '|' + '---|' * 8]
    for v in s.variants:
        for sampler in s.samplers:
            cells = [results[p.name][sampler, t]['variants'][v] | {'strong': results[p.name][sampler, t]['strong']}
                     for p in s.pairs for t in s.steps]
            vs_nfe = [verdict(c['w2sd'], c['strong_nfe']) for c in cells]
            vs_ag = [verdict(c['w2sd'], c['ag']) for c in cells]
            med = lambda key, num='w2sd': _median([_ratio(c[num], c[key]) for c in cells])
            out.append(f'| {v} | {sampler} | {med("strong")} | {med("strong_nfe")} | '
                       f'{vs_nfe.count(1)} / {vs_nfe.count(-1)} of {len(cells)} | {med("ag")} | '
                       f'{vs_ag.count(1)} / {vs_ag.count(-1)} of {len(cells)} | {med("strong", "self")} |')
    out += ['', '### What helps and what hurts', '',
            'Per pair: the settings (variant/sampler/T) where W2SD is significantly better or worse than strong '
            'alone at the same NFE, with the ratio; then the count against autoguidance at the same NFE.', '']
    for p in s.pairs:
        helps, hurts, ag = [], [], []
        for sampler in s.samplers:
            for t in s.steps:
                for v, c in results[p.name][sampler, t]['variants'].items():
                    tag = f'{v}/{sampler}/T={t} {_rel(c["w2sd"], c["strong_nfe"])}'
                    {1: helps, -1: hurts, 0: []}[verdict(c['w2sd'], c['strong_nfe'])].append(tag)
                    ag.append(verdict(c['w2sd'], c['ag']))
        out.append(f'- **{p.name}** ({p.note}): against strong at the same NFE W2SD helps in {len(helps)} and '
                   f'hurts in {len(hurts)} of {len(ag)} settings; against autoguidance at the same NFE it is better '
                   f'in {ag.count(1)} and worse in {ag.count(-1)}.'
                   + (f' Helps: {", ".join(helps)}.' if helps else '') + (f' Hurts: {", ".join(hurts)}.' if hurts else ''))
    for p in s.pairs:
        out += ['', f'### {p.name}', '', p.note, '',
                '| sampler | T | strong | weak | variant | settings | NFE | W2SD | ×strong(T) | ×strong@NFE | '
                'AG (w) | ×AG | self ×strong(T) |', '|' + '---|' * 13]
        for sampler in s.samplers:
            for t in s.steps:
                r = results[p.name][sampler, t]
                for v, c in r['variants'].items():
                    out.append(f'| {sampler} | {t} | {_ci(r["strong"].values)} | {_ci(r["weak"].values)} | {v} | '
                               f'{settings(c["w2sd"])} | {c["w2sd"].nfe} | {_ci(c["w2sd"].values)} | '
                               f'{_cmp(c["w2sd"], r["strong"])} | {_cmp(c["w2sd"], c["strong_nfe"])} | '
                               f'{_ci(c["ag"].values)} ({c["ag"].params["w"]:g}) | {_cmp(c["w2sd"], c["ag"])} | '
                               f'{_cmp(c["self"], r["strong"])} |')
        out += secondary_table(s, p, results)
    return '\n'.join(out) + '\n'


def secondary_table(suite, pair, results):
    """All metrics (means over evaluation seeds) of every method at the middle T with the first sampler."""
    sampler, t = suite.samplers[0], suite.steps[len(suite.steps) // 2]
    r = results[pair.name][sampler, t]
    rows = [('strong', r['strong']), ('weak', r['weak'])] + ([('ideal denoiser', r['ideal'])] if 'ideal' in r else [])
    for v, c in r['variants'].items():
        rows += [(f'W2SD {v}', c['w2sd']), (f'self {v}', c['self']), (f'strong@NFE ({c["strong_nfe"].nfe})',
                                                                        c['strong_nfe']),
                 (f'AG@NFE w={c["ag"].params["w"]:g}', c['ag'])]
    keys = list(r['strong'].means)
    out = ['', f'All metrics, {sampler}, T={t} (means over evaluation seeds):', '',
           '| method | NFE | ' + ' | '.join(keys) + ' |', '|' + '---|' * (len(keys) + 2)]
    seen = set()
    for name, res in rows:
        if name in seen:
            continue
        seen.add(name)
        out.append(f'| {name} | {res.nfe} | ' + ' | '.join(fmt(res.means[k]) for k in keys) + ' |')
    return out


def plot_quality_vs_nfe(suite, results, path, sampler=None):
    """Primary metric against NFE, one panel per pair: strong alone at every step count run, W2SD variants, AG."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    sampler = sampler or suite.samplers[0]
    n = len(suite.pairs)
    cols = min(n, 4)
    fig, axes = plt.subplots((n + cols - 1) // cols, cols, figsize=(4 * cols, 3.2 * ((n + cols - 1) // cols)),
                             squeeze=False)
    for ax, p in zip(axes.flat, suite.pairs):
        strong = {}
        for t in suite.steps:
            r = results[p.name][sampler, t]
            strong[r['strong'].nfe] = statistics.fmean(r['strong'].values)
            for c in r['variants'].values():
                strong[c['strong_nfe'].nfe] = statistics.fmean(c['strong_nfe'].values)
        xs = sorted(strong)
        ax.plot(xs, [strong[x] for x in xs], 'k.-', label='strong alone')
        for i, v in enumerate(suite.variants):
            pts = [(results[p.name][sampler, t]['variants'][v]['w2sd'].nfe,
                    statistics.fmean(results[p.name][sampler, t]['variants'][v]['w2sd'].values)) for t in suite.steps]
            ax.plot(*zip(*pts), 'o--', color=f'C{i}', label=f'W2SD {v}')
        pts = sorted({(c['ag'].nfe, statistics.fmean(c['ag'].values)) for t in suite.steps
                      for c in results[p.name][sampler, t]['variants'].values()})
        ax.plot(*zip(*pts), 's:', color='C7', label='autoguidance')
        ax.set_xscale('log')
        if suite.primary == 'energy':      # the unbiased estimate can dip below 0 at the noise floor
            ax.set_yscale('symlog', linthresh=1e-3)
            ax.set_ylim(bottom=-1e-3)
        else:
            ax.set_yscale('log')
        ax.set_title(p.name, fontsize=9)
        ax.set_xlabel('NFE')
        ax.set_ylabel(suite.primary)
    for ax in list(axes.flat)[n:]:
        ax.axis('off')
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f'{suite.name}: {suite.primary} against NFE ({sampler}, evaluation seeds)')
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_panels(panels, path, title, kind):
    """``panels``: list of (label, samples). kind 'points' (2-D scatter) or 'digits' (8x8 image grids)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(panels), figsize=(3.4 * len(panels), 3.6), squeeze=False)
    for ax, (label, x) in zip(axes.flat, panels):
        if kind == 'points':
            ax.scatter(x[:, 0], x[:, 1], s=1, alpha=0.4)
            ax.set_xlim(-8, 8)
            ax.set_ylim(-8, 8)
            ax.set_aspect('equal')
        else:
            tiles = torch.nn.functional.pad(x[:100].clamp(-1, 1).reshape(10, 10, 8, 8), (1, 1, 1, 1), value=-1)
            grid = tiles.permute(0, 2, 1, 3).reshape(100, 100)
            ax.imshow(grid, cmap='gray_r', vmin=-1, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
        ax.set_title(label, fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
