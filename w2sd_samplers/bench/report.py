"""The verdict of protocol v3 (benchmarks/README.md), markdown tables and PNG plots of the benchmark results.

Every choice here is a pure function of the saved per-seed results in a fixed order (families in ``FAMILIES``,
pairs and cells in the suite's order), so the tables do not depend on hash seeds or set order.
"""
import statistics

import torch

from ..stats import holm, mean_ci, paired_p, paired_power, tost_p
from ..tuning import reflected, select
from .harness import FAMILIES

PROTOCOL = 3
ALPHA = 0.05
MARGIN = 0.2        # equivalence margin and the effect the key comparison is powered for: 20% of AG interval's mean
POWER = 0.8
KEY = ('w2sd', 'ag_interval')


def fmt(v):
    return f'{v:.3g}' if abs(v) >= 1e-3 or v == 0 else f'{v:.2e}'


def _ci(values):
    m, h = mean_ci(values)
    return f'{fmt(m)} ± {fmt(h)}'


def _mean(res):
    return statistics.fmean(res.values)


def _ratio(a, b):
    """Ratio of evaluation-seed means; nan when the baseline's mean is <= 0 (an unbiased energy distance at the
    noise floor can be negative)."""
    mb = _mean(b)
    return _mean(a) / mb if mb > 0 else float('nan')


def _median(values):
    values = [v for v in values if v == v]
    return fmt(statistics.median(values)) if values else 'n/a'


def _spread(values):
    """'median [min, max]' of per-model values."""
    values = [v for v in values if v == v]
    if not values:
        return 'n/a'
    return fmt(statistics.median(values)) + (f' [{fmt(min(values))}, {fmt(max(values))}]' if len(values) > 1 else '')


NAMES = {'strong': 'strong alone', 'ag': 'autoguidance', 'ag_interval': 'AG interval', 're-sampling': 'Re-Sampling',
         'restart': 'Restart', 'w2sd': 'W2SD'}


def settings(res):
    """The tuned settings of a result, in words; a value at an extendable end of its grid is marked ⚠."""
    p, n = res.params, res.steps
    if res.method in ('w2sd', 'self-reflection'):
        form = ' anchored' if p['form'] == 'anchored' else f' weak@{p["weak_sigma"]}'
        text = f"λ={reflected(n, p['lam_frac'])}, s={p['strength']:g}{form}"
    elif res.method == 'autoguidance':
        window = f', σ∈[{p["window"][0]:g}, {p["window"][1]:g}]' if p.get('window') else ''
        text = f'w={p["w"]:g}{window}, {n} steps'
    elif res.method == 're-sampling':
        text = f'λ={reflected(n, p["lam_frac"])}, {n} steps'
    elif res.method == 'restart':
        text = f'[{p["lo"]:g}, {p["hi"]:g}]×{p["k"]}, {n} Heun steps'
    else:
        text = f'{n} steps'
    return text + (f' ⚠ edge: {", ".join(res.edges)}' if res.edges else '')


def _cell_winner(best):
    """The family with the lowest tuning-seed mean (ties to the earlier family in ``FAMILIES``)."""
    return select([f for f in FAMILIES if f in best], lambda f: best[f].tune)


def analyse(suite, results):
    """Protocol v3's decisions and tests for every pair of the suite, as plain data (see benchmarks/README.md).

    Per model and cell the winner is picked on tuning seeds; a model's ``use`` is the family that wins the most
    cells (ties to the earlier family). Tests on the evaluation seeds, each Holm-corrected over the suite: ``use``
    against strong alone (paired t), and the key comparison W2SD - AG interval (paired t; TOST within ±MARGIN of AG
    interval's mean), with the power of the paired t-test for a MARGIN difference at the observed spread.
    """
    cells = {p.name: suite.cells(p) for p in suite.pairs}
    per_model = []
    for p in suite.pairs:
        best = [results[p.name][c]['best'] for c in cells[p.name]]
        winners = [_cell_winner(b) for b in best]
        use = select([f for f in FAMILIES if f in best[0]], lambda f: -winners.count(f))
        per_model.append(dict(pair=p, best=best, cells=cells[p.name], winners=winners, use=use,
                              wins=winners.count(use)))
    use_p, key_p, tost = [], [], []
    for m in per_model:
        m['vs_strong'] = [len(use_p) + i for i in range(len(m['best']))] if m['use'] != 'strong' else []
        use_p += [paired_p(b[m['use']].values, b['strong'].values) for b in m['best']] if m['use'] != 'strong' \
            else []
        m['key'] = []
        for b in m['best']:
            if not all(f in b for f in KEY):
                continue
            w, a = b[KEY[0]], b[KEY[1]]
            margin = MARGIN * abs(_mean(a))
            d = [x - y for x, y in zip(w.values, a.values)]
            sd = statistics.stdev(d) if len(d) > 1 else float('nan')
            m['key'].append(dict(w2sd=w, ag=a, index=len(key_p), margin=margin,
                                 power=paired_power(sd, margin, len(d), ALPHA) if margin > 0 else float('nan')))
            key_p.append(paired_p(w.values, a.values))
            tost.append(tost_p(w.values, a.values, margin) if margin > 0 else 1.)
    use_h, key_h, tost_h = holm(use_p), holm(key_p), holm(tost)
    for m in per_model:
        m['vs_strong'] = [(use_p[i], use_h[i]) for i in m['vs_strong']]
        for k in m['key']:
            i = k['index']
            k.update(p=key_p[i], holm=key_h[i], tost=tost[i], tost_holm=tost_h[i])
            k['outcome'] = ('W2SD better' if _mean(k['w2sd']) < _mean(k['ag']) else 'AG interval better') \
                if key_h[i] < ALPHA else 'equivalent' if tost_h[i] < ALPHA else 'inconclusive'
    groups = []
    for p in suite.pairs:
        if not any(g['group'] == p.group for g in groups):
            models = [m for m in per_model if m['pair'].group == p.group]
            uses = [m['use'] for m in models]
            groups.append(dict(group=p.group, kind=p.kind, models=models,
                               use=uses[0] if uses.count(uses[0]) == len(uses) else None))
    return groups


def _counts(flags):
    """'b better / w worse of n' from (p, holm, sign) triples, Holm-adjusted (raw in parentheses)."""
    holm_b = sum(h < ALPHA and s > 0 for _, h, s in flags)
    holm_w = sum(h < ALPHA and s < 0 for _, h, s in flags)
    raw_b = sum(p < ALPHA and s > 0 for p, _, s in flags)
    raw_w = sum(p < ALPHA and s < 0 for p, _, s in flags)
    return f'{holm_b} / {holm_w} ({raw_b} / {raw_w} raw) of {len(flags)}'


OUTCOMES = ('W2SD better', 'AG interval better', 'equivalent', 'inconclusive')


def verdict_table(groups):
    """The verdict table: one row per pair (over its retrained models)."""
    out = ['| pair | kind | models | use (picked on tuning seeds) | cells won per model | use ×strong alone: '
           'median [min, max over models] | use better / worse than strong alone | W2SD ×AG interval | '
           'W2SD vs AG interval per cell: ' + ' / '.join(OUTCOMES) + ' | power for a 20% difference: median [min] | '
           'wall time per sample: use ×strong alone, W2SD ×AG interval |', '|' + '---|' * 11]
    for g in groups:
        models = g['models']
        if g['use'] is None:
            use = 'depends on the model: ' + ', '.join(f'm{m["pair"].model} {NAMES[m["use"]]}' for m in models)
        else:
            use = f'**{NAMES[g["use"]]}**'
        won = ', '.join(f'{m["wins"]}/{len(m["cells"])}' for m in models)
        vs_strong = [(p, h, 1 if _mean(b[m['use']]) < _mean(b['strong']) else -1)
                     for m in models for (p, h), b in zip(m['vs_strong'], m['best'])]
        per_model_ratio = [statistics.median([_ratio(b[m['use']], b['strong']) for b in m['best']]) for m in models]
        keys = [k for m in models for k in m['key']]
        key_ratio = [statistics.median([_ratio(k['w2sd'], k['ag']) for k in m['key']]) for m in models if m['key']]
        outcome = ' / '.join(str(sum(k['outcome'] == o for k in keys)) for o in OUTCOMES)
        powers = [k['power'] for k in keys if k['power'] == k['power']]
        power = f'{_median(powers)} [{fmt(min(powers))}]' if powers else 'n/a'
        wall_use = [b[m['use']].seconds / b['strong'].seconds for m in models for b in m['best']]
        wall_key = [k['w2sd'].seconds / k['ag'].seconds for k in keys]
        n = str(len(models)) if len(models) > 1 else '1 (exact)' if models[0]['pair'].ideal is not None else \
            '1 (not retrained)'
        out.append(f'| {g["group"]} | {g["kind"]} | {n} | {use} | {won} | '
                   + (f'{_spread(per_model_ratio)} | {_counts(vs_strong)} | ' if vs_strong else '1 | - | ')
                   + f'{_spread(key_ratio)} | {outcome} | {power} | {_median(wall_use)}, {_median(wall_key)} |')
    return out


def verdict_words(groups):
    """The plain reading of the verdict rows: which family to use, only where every retrained model agrees."""
    lines = []
    for g in groups:
        keys = [k['outcome'] for m in g['models'] for k in m['key']]
        same = keys and keys.count(keys[0]) == len(keys)
        key = (f'W2SD vs AG interval: {keys[0]} in every cell' if same else
               'W2SD vs AG interval: ' + ', '.join(f'{o} {keys.count(o)}' for o in OUTCOMES if o in keys)
               + ' (no single reading)')
        use = NAMES[g['use']] if g['use'] else 'depends on the model'
        if len(g['models']) == 1 and g['models'][0]['pair'].ideal is None:
            use += ' (one trained model, not retrained)'
        lines.append(f'- {g["group"]} ({g["kind"]}): use {use}; {key}.')
    return lines


def variant(params):
    """The W2SD variant a setting belongs to."""
    return 'anchored' if params['form'] == 'anchored' else 'next' if params['weak_sigma'] == 'next' else 'paper'


def w2sd_picks(groups):
    """((variant, λ fraction, strength), cells) of W2SD's tuned picks, most frequent first (ties in grid order)."""
    counts = {}
    for g in groups:
        for m in g['models']:
            for b in m['best']:
                p = b['w2sd'].params
                key = (variant(p), p['lam_frac'], p['strength'])
                counts[key] = counts.get(key, 0) + 1
    order = {'paper': 0, 'next': 1, 'anchored': 2}
    return sorted(counts.items(), key=lambda kv: (-kv[1], order[kv[0][0]], kv[0][1], kv[0][2]))


def _setup_text(s, groups):
    n_settings = {}
    for g in groups:
        for m in g['models']:
            for cell, b in zip(m['cells'], m['best']):
                for f in FAMILIES:
                    if f in b:
                        n_settings.setdefault((f, cell[1]), b[f].n_settings)
    steps = sorted({t for _, t in n_settings})
    counts = '; '.join(f'{NAMES[f]} ' + '/'.join(str(n_settings.get((f, t), 0)) for t in steps) for f in FAMILIES)
    return (f'Protocol v{PROTOCOL} (benchmarks/README.md). Primary metric: **{s.primary}** (lower is better). '
            f'Samplers {", ".join(s.samplers)}; T in {{{", ".join(map(str, s.steps))}}} (unless a pair lists its '
            f'own cells); Karras schedule sigma {s.sigma_max:g} -> {s.sigma_min:g}. Tuned on seeds {s.tune_seeds} '
            f'({s.n_tune} samples each), reported on the disjoint seeds {s.eval_seeds[0]}..{s.eval_seeds[-1]} '
            f'({len(s.eval_seeds)} seeds, {s.n_eval} samples each) against disjoint references: mean ± 95% '
            f't-interval over seeds, ratios of means, paired t-tests, Holm over the suite. Every family is tuned '
            f'at NFE <= the paper setting\'s (3T - 2); settings per family at T = {"/".join(map(str, steps))}: '
            f'{counts}. Grids: W2SD (λ fraction of T-1, strength) {list(s.w2sd_grid)} for the `next` and '
            f'`anchored` variants, plus the paper setting (λ = T-1, strength 1, weak at the current sigma); '
            f'autoguidance w in {list(s.ag_ws)} on every step or only in the sigma windows '
            f'{[list(w) for w in s.ag_windows]}; Re-Sampling λ fraction in {list(s.resampling_fracs)}; Restart '
            f'[sigma_lo, sigma_hi]×k in {[(r["lo"], r["hi"], r["k"]) for r in s.restarts]}; each baseline at the '
            'largest ladder step count that fits and at T; strong alone at every step count of '
            f'{list(s.ladder)}, T and the budget that fits. Counted NFE never exceeds the budget (checked on every '
            'run). ⚠ marks a tuned value at an end of its grid that the grid could extend past.')


def _key_text(k):
    return (f'{fmt(_mean(k["w2sd"]) - _mean(k["ag"]))} (p {k["p"]:.2g}, Holm {k["holm"]:.2g}; TOST ±{fmt(k["margin"])}'
            f' p {k["tost"]:.2g}, Holm {k["tost_holm"]:.2g}; power {k["power"]:.2f}): **{k["outcome"]}**')


def quality_section(suite, results, header):
    """The markdown section of one quality suite, and its verdict table and reading."""
    s = suite
    groups = analyse(s, results)
    out = [f'## {header}', '', _setup_text(s, groups), '', 'The verdict table of this suite is at the top of '
           'RESULTS.md.', '', '### Tuned values at a grid edge', '',
           '| family | cells with a tuned value at an edge | of |', '|---|---|---|']
    bests = [b for g in groups for m in g['models'] for b in m['best']]
    for f in FAMILIES:
        there = [b[f] for b in bests if f in b]
        out.append(f'| {NAMES[f]} | {sum(bool(r.edges) for r in there)} | {len(there)} |')
    out += ['', '### W2SD\'s tuned setting', '', 'How often each W2SD setting was W2SD\'s pick (tuning seeds, every '
            'model and cell of this suite):', '', '| variant | λ fraction | strength | cells |', '|---|---|---|---|']
    out += [f'| {v} | {f:g} | {st:g} | {n} |' for (v, f, st), n in w2sd_picks(groups)]
    for g in groups:
        out += ['', f'### {g["group"]}', '', g['models'][0]['pair'].note, '',
                'Every family at the paper setting\'s NFE (mean ± interval on the evaluation seeds; NFE; tuned '
                'settings; number of settings tuned over), and the key comparison W2SD - AG interval (difference of '
                'means, paired t-test, TOST, power for a 20% difference):', '',
                '| model | sampler | T | budget | ' + ' | '.join(NAMES[f] for f in FAMILIES)
                + ' | picked on tuning seeds | W2SD - AG interval |', '|' + '---|' * (len(FAMILIES) + 6)]
        for m in g['models']:
            keys = iter(m['key'])
            for (sampler, t), b, winner in zip(m['cells'], m['best'], m['winners']):
                r = results[m['pair'].name][sampler, t]
                fam = [f'{_ci(b[f].values)} ({b[f].nfe}; {settings(b[f])}; {b[f].n_settings})' if f in b
                       else 'no fit' for f in FAMILIES]
                key = _key_text(next(keys)) if all(f in b for f in KEY) else 'n/a'
                out.append(f'| m{m["pair"].model} | {sampler} | {t} | {r["budget"]} | ' + ' | '.join(fam)
                           + f' | {NAMES[winner]} | {key} |')
        full = [(m, c) for m in g['models'] for c in m['cells'] if 'variants' in results[m['pair'].name][c]]
        if full:
            out += ['', 'Strong, weak (and ideal) at T, each W2SD variant tuned on its own, and the self-reflection '
                    'control (the same settings with weak := strong): mean ± interval.', '',
                    '| model | sampler | T | strong(T) | weak(T) | ideal(T) | '
                    + ' | '.join(f'W2SD {v} | self {v}' for v in s.variants) + ' |',
                    '|' + '---|' * (6 + 2 * len(s.variants))]
            for m, (sampler, t) in full:
                r = results[m['pair'].name][sampler, t]
                var = [f'{_ci(c["w2sd"].values)} ({settings(c["w2sd"])}) | {_ci(c["self"].values)}'
                       for c in r['variants'].values()]
                out.append(f'| m{m["pair"].model} | {sampler} | {t} | {_ci(r["strong"].values)} | '
                           f'{_ci(r["weak"].values)} | {_ci(r["ideal"].values) if "ideal" in r else "-"} | '
                           + ' | '.join(var) + ' |')
            out += secondary_table(full[0][0]['pair'], full[0][1], results)
    return '\n'.join(out) + '\n', verdict_table(groups), groups


def secondary_table(pair, cell, results):
    """All metrics (means over evaluation seeds) of every method in one cell."""
    sampler, t = cell
    r = results[pair.name][sampler, t]
    rows = [('strong', r['strong']), ('weak', r['weak'])] + ([('ideal denoiser', r['ideal'])] if 'ideal' in r else [])
    for v, c in r['variants'].items():
        rows += [(f'W2SD {v}', c['w2sd']), (f'self {v}', c['self'])]
    rows += [(f'{NAMES[f]} ({settings(b)})', b) for f, b in r['best'].items()]
    keys = list(r['strong'].means)
    out = ['', f'All metrics, {pair.name}, {sampler}, T={t} (means over evaluation seeds; families at NFE <= '
           f'{r["budget"]}; s/sample is wall time on this machine):', '',
           '| method | NFE | ' + ' | '.join(keys) + ' | s/sample |', '|' + '---|' * (len(keys) + 3)]
    for name, res in rows:
        out.append(f'| {name} | {res.nfe} | ' + ' | '.join(fmt(res.means[k]) for k in keys)
                   + f' | {fmt(res.seconds)} |')
    return out


def plot_quality_vs_nfe(suite, results, path):
    """Primary metric against NFE for each pair's first model and first sampler: every family at the paper
    setting's NFE, T by T."""
    pairs = [p for p in suite.pairs if p.model == min(q.model for q in suite.pairs if q.group == p.group)]
    plt, fig, axes = _figure(len(pairs), min(len(pairs), 4), 4., 3.2)
    for ax, p in zip(axes.flat, pairs):
        cells = suite.cells(p)
        sampler = cells[0][0]
        ts = [t for s, t in cells if s == sampler]
        for i, f in enumerate(FAMILIES):
            pts = sorted((results[p.name][sampler, t]['best'][f].nfe, _mean(results[p.name][sampler, t]['best'][f]))
                         for t in ts if f in results[p.name][sampler, t]['best'])
            if pts:
                ax.plot(*zip(*pts), 'os^vDx'[i] + '--', color=f'C{i}', label=NAMES[f])
        ax.set_xscale('log')
        if suite.primary == 'fd':
            ax.set_yscale('log')
        else:       # an unbiased energy distance can dip below 0 at the noise floor, a TV can be 0
            ax.set_yscale('symlog', linthresh=1e-3)
            ax.set_ylim(bottom=-1e-3)
        ax.set_title(f'{p.name} ({sampler})', fontsize=9)
        ax.set_xlabel('NFE')
        ax.set_ylabel(suite.primary)
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f'{suite.name}: {suite.primary} against NFE (evaluation seeds)')
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _figure(n, cols, width, height):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for ax in list(axes.flat)[n:]:
        ax.axis('off')
    return plt, fig, axes


def plot_panels(panels, path, title, kind):
    """``panels``: list of (label, samples). kind 'points' (2-D scatter) or 'digits' (8x8 image grids)."""
    plt, fig, axes = _figure(len(panels), min(len(panels), 6), 3.4, 3.6)
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


def plot_image_rows(rows, path, title):
    """One row of RGB images ``[n, 3, H, W]`` in [-1, 1] per (label, images), the label on the left."""
    plt, fig, axes = _figure(len(rows), 1, 9., 0.75)
    for ax, (label, x) in zip(axes.flat, rows):
        x = torch.nn.functional.pad(x.clamp(-1, 1), (1, 1, 1, 1), value=0.)
        ax.imshow(((x + 1) / 2).permute(2, 0, 3, 1).reshape(x.shape[2], -1, 3).numpy())
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(label, rotation=0, ha='right', va='center', fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
