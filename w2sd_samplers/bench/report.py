"""Markdown tables and PNG plots of the benchmark results."""
import statistics

import torch

from ..stats import holm, mean_ci, paired_p
from ..tuning import reflected

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


def _median(values):
    values = [v for v in values if v == v]
    return fmt(statistics.median(values)) if values else 'n/a'


def _sign(a, b):
    """+1 if a's mean is lower (better) than b's, -1 if higher."""
    return 1 if statistics.fmean(a.values) < statistics.fmean(b.values) else -1


class Tests:
    """Paired t-tests of one table, Holm-corrected together: ``add(a, b)`` returns a handle, ``cell(h)`` the text
    '×0.52 (p .003, Holm .04)', ``count(hs)`` better / worse counts at Holm-adjusted p < ALPHA."""

    def __init__(self):
        self.pairs, self.raw = [], []

    def add(self, a, b):
        self.pairs.append((a, b))
        self.raw.append(paired_p(a.values, b.values))
        return len(self.raw) - 1

    def adjusted(self):
        return holm(self.raw)

    def verdict(self, h, adjusted=True):
        p = (self.adjusted() if adjusted else self.raw)[h]
        return 0 if p >= ALPHA else _sign(*self.pairs[h])

    def cell(self, h):
        return f'{_rel(*self.pairs[h])} (p {self.raw[h]:.2g}, Holm {self.adjusted()[h]:.2g})'

    def count(self, handles):
        holm_v = [self.verdict(h) for h in handles]
        raw_v = [self.verdict(h, adjusted=False) for h in handles]
        return (f'{holm_v.count(1)} / {holm_v.count(-1)} ({raw_v.count(1)} / {raw_v.count(-1)} raw) '
                f'of {len(handles)}')


NAMES = {'strong': 'strong alone', 'ag': 'autoguidance', 'ag_interval': 'AG interval', 're-sampling': 'Re-Sampling',
         'restart': 'Restart', 'w2sd': 'W2SD'}


def settings(res):
    """The tuned settings of a result, in words."""
    p, n = res.params, res.steps
    if res.method in ('w2sd', 'self-reflection'):
        form = '' if 'form' not in p else (' anchored' if p['form'] == 'anchored' else
                                            f' weak@{p.get("weak_sigma", "current")}')
        return f"λ={reflected(n, p['lam_frac'])}, s={p['strength']:g}{form}"
    if res.method == 'autoguidance':
        window = f', σ∈[{p["window"][0]:g}, {p["window"][1]:g}]' if p.get('window') else ''
        return f'w={p["w"]:g}{window}, {n} steps'
    if res.method == 're-sampling':
        return f'λ={reflected(n, p["lam_frac"])}, {n} steps'
    if res.method == 'restart':
        return f'[{p["lo"]:g}, {p["hi"]:g}]×{p["k"]}, {n} Heun steps'
    return f'{n} steps'


def verdict_rows(suite, results):
    """One row per pair: the family to use (the most cells won at the paper setting's NFE), how it compares
    with strong alone at its best step count and with the best other family of each cell (Holm over the suite)."""
    s = suite
    cells = [(sampler, t) for sampler in s.samplers for t in s.steps]
    tests, rows = Tests(), []
    for p in s.pairs:
        best = [results[p.name][c]['best'] for c in cells]
        common = [f for f in best[0] if all(f in b for b in best)]    # a family may not fit a small budget
        best = [{f: b[f] for f in common} for b in best]
        wins = {}
        for b in best:
            winner = min(b, key=lambda f: statistics.fmean(b[f].values))
            wins[winner] = wins.get(winner, 0) + 1
        # ranking by ratio; an undefined ratio (strong's energy at the noise floor) ranks last
        ratio = {f: statistics.median([r if (r := _ratio(b[f], b['strong'])) == r else float('inf') for b in best])
                 for f in common}
        use = max(common, key=lambda f: (wins.get(f, 0), -ratio[f]))
        others = [min((f for f in b if f != use), key=lambda f: statistics.fmean(b[f].values)) for b in best]
        rows.append(dict(pair=p, use=use, wins=wins.get(use, 0), n=len(cells), best=best, others=others,
                         vs_strong=[tests.add(b[use], b['strong']) for b in best if use != 'strong'],
                         vs_next=[tests.add(b[use], b[o]) for b, o in zip(best, others)],
                         w2sd=[tests.add(b['w2sd'], b['strong']) for b in best]))
    head = (s.samplers[0], s.steps[0])
    out = [f'| pair | kind | use | cells won | ×strong alone (median) | better / worse than strong alone | '
           'next best (most cells) | ×next best (median) | better / worse than next best | '
           'W2SD ×strong alone (median) | W2SD better / worse than strong alone | '
           f'at {head[0]} T={head[1]}: use / strong alone / next best |', '|' + '---|' * 12]
    for r in rows:
        b = r['best'][cells.index(head)]
        o = r['others'][cells.index(head)]
        names = [NAMES[f] for f in r['others']]
        nxt = max(set(names), key=names.count)
        out.append(f'| {r["pair"].name} | {r["pair"].kind} | **{NAMES[r["use"]]}** | {r["wins"]} of {r["n"]} | '
                   + (f'{_median([_ratio(x[r["use"]], x["strong"]) for x in r["best"]])} | '
                      f'{tests.count(r["vs_strong"])} | ' if r['use'] != 'strong' else '1 | - | ')
                   + f'{nxt} | {_median([_ratio(x[r["use"]], x[f]) for x, f in zip(r["best"], r["others"])])} | '
                   f'{tests.count(r["vs_next"])} | '
                   f'{_median([_ratio(x["w2sd"], x["strong"]) for x in r["best"]])} | {tests.count(r["w2sd"])} | '
                   f'{_ci(b[r["use"]].values)} / {_ci(b["strong"].values)} / {NAMES[o]} {_ci(b[o].values)} |')
    return out, rows


def _setup_text(s):
    return (f'Primary metric: **{s.primary}** (lower is better). Samplers {", ".join(s.samplers)}; '
            f'T in {{{", ".join(map(str, s.steps))}}}; Karras schedule sigma {s.sigma_max:g} -> {s.sigma_min:g}. '
            f'Tuned on seeds {s.tune_seeds} ({s.n_tune} samples each), reported on the disjoint seeds '
            f'{s.eval_seeds} ({s.n_eval} samples each) against disjoint references: mean ± 95% t-interval over '
            f'seeds, ratios of means, paired t-tests; "better / worse" counts cells at Holm-adjusted p < {ALPHA} '
            f'over all the cells of that column (raw p < {ALPHA} in parentheses). W2SD grid (fraction of the T-1 '
            f'reflectable steps, strength): {s.grid}; the `paper` variant is fixed at λ = T-1, strength 1, weak at '
            'the current sigma; `next` puts the weak leg at sigma_next; `anchored` evaluates both legs at (x, sigma). '
            '`self` is the self-reflection control (the same W2SD settings with weak := strong). Every baseline is '
            'tuned on the tuning seeds at an NFE no larger than the W2SD run it is compared with: strong alone at '
            f'the best step count of {list(s.ladder)}, T and the NFE itself; autoguidance `D_s + w (D_s - D_w)` '
            f'with w in {list(s.ag_ws)} on every step (largest ladder step count that fits, and T) or only for '
            f'sigma in one of the windows {[list(w) for w in s.ag_windows]} (guidance interval); Re-Sampling '
            f'(Euler, λ fraction in {list(s.resampling_fracs)}); Restart (Heun, [sigma_lo, sigma_hi]×k in '
            f'{[(r["lo"], r["hi"], r["k"]) for r in s.restarts]}, 3 steps per restart). Counted NFE never exceeds '
            'the budget (checked on every run).')


def quality_section(suite, results, header):
    """The markdown section of one quality suite (setup, summary, per-pair tables), its verdict table and rows."""
    s = suite
    verdict_table, rows = verdict_rows(s, results)
    out = [f'## {header}', '', _setup_text(s), '',
           'The verdict table of this suite is at the top of RESULTS.md.']
    out += ['', '### W2SD variants against each baseline at NFE <= the variant\'s', '',
            'Median ratio of means over pairs and T, and better / worse counts.', '',
            '| variant | sampler | ×strong(T) | ' + ' | '.join(f'×{NAMES[f]}' for f in s.families)
            + ' | self ×strong(T) |', '|' + '---|' * (len(s.families) + 4)]
    tests = Tests()
    handles = {}
    for v in s.variants:
        for sampler in s.samplers:
            for p in s.pairs:
                for t in s.steps:
                    r = results[p.name][sampler, t]
                    c = r['variants'][v]
                    handles[p.name, sampler, t, v, 'T'] = tests.add(c['w2sd'], r['strong'])
                    handles[p.name, sampler, t, v, 'self'] = tests.add(c['self'], r['strong'])
                    for f, b in c['baselines'].items():
                        handles[p.name, sampler, t, v, f] = tests.add(c['w2sd'], b)
    for v in s.variants:
        for sampler in s.samplers:
            keys = [(p.name, sampler, t, v) for p in s.pairs for t in s.steps]

            def col(f):
                hs = [handles[k + (f,)] for k in keys if k + (f,) in handles]
                return f'{_median([_ratio(*tests.pairs[h]) for h in hs])}: {tests.count(hs)}'
            out.append(f'| {v} | {sampler} | {col("T")} | ' + ' | '.join(col(f) for f in s.families)
                       + f' | {col("self")} |')
    for p in s.pairs:
        out += ['', f'### {p.name}', '', p.note, '',
                "W2SD against strong alone at T and each baseline family at NFE <= the W2SD run's (ratio of "
                'means, raw p, Holm-adjusted p):', '',
                '| sampler | T | strong(T) | variant | settings | NFE | W2SD | ×strong(T) | '
                + ' | '.join(f'×{NAMES[f]}' for f in s.families) + ' | self ×strong(T) |',
                '|' + '---|' * (len(s.families) + 9)]
        for sampler in s.samplers:
            for t in s.steps:
                r = results[p.name][sampler, t]
                for v, c in r['variants'].items():
                    k = (p.name, sampler, t, v)
                    fam = [tests.cell(handles[k + (f,)]) if k + (f,) in handles else 'no fit' for f in s.families]
                    out.append(f'| {sampler} | {t} | {_ci(r["strong"].values)} | {v} | {settings(c["w2sd"])} | '
                               f'{c["w2sd"].nfe} | {_ci(c["w2sd"].values)} | {tests.cell(handles[k + ("T",)])} | '
                               + ' | '.join(fam) + f' | {tests.cell(handles[k + ("self",)])} |')
        out += ['', 'Every family at the paper setting\'s NFE (the verdict\'s runs): mean ± interval, NFE, tuned '
                'settings.',
                '', '| sampler | T | budget | ' + ' | '.join(NAMES[f] for f in ('w2sd',) + s.families) + ' |',
                '|' + '---|' * (len(s.families) + 4)]
        for sampler in s.samplers:
            for t in s.steps:
                r = results[p.name][sampler, t]
                out.append(f'| {sampler} | {t} | {r["budget"]} | ' + ' | '.join(
                    f'{_ci(r["best"][f].values)} ({r["best"][f].nfe}; {settings(r["best"][f])})' if f in r['best']
                    else 'no fit' for f in ('w2sd',) + s.families) + ' |')
        out += secondary_table(s, p, results)
    return '\n'.join(out) + '\n', verdict_table, rows


def secondary_table(suite, pair, results):
    """All metrics (means over evaluation seeds) of every method at the middle T with the first sampler."""
    sampler, t = suite.samplers[0], suite.steps[len(suite.steps) // 2]
    r = results[pair.name][sampler, t]
    rows = [('strong', r['strong']), ('weak', r['weak'])] + ([('ideal denoiser', r['ideal'])] if 'ideal' in r else [])
    for v, c in r['variants'].items():
        rows += [(f'W2SD {v}', c['w2sd']), (f'self {v}', c['self'])]
    rows += [(f'{NAMES[f]} ({settings(b)})', b) for f, b in r['best'].items() if f != 'w2sd']
    keys = list(r['strong'].means)
    out = ['', f'All metrics, {sampler}, T={t} (means over evaluation seeds; baselines at NFE <= {r["budget"]}):', '',
           '| method | NFE | ' + ' | '.join(keys) + ' |', '|' + '---|' * (len(keys) + 2)]
    for name, res in rows:
        out.append(f'| {name} | {res.nfe} | ' + ' | '.join(fmt(res.means[k]) for k in keys) + ' |')
    return out


def plot_quality_vs_nfe(suite, results, path, sampler=None):
    """Primary metric against NFE, one panel per pair: strong alone at every step count evaluated, the W2SD
    variants, and the other baseline families at the paper setting's NFE."""
    sampler = sampler or suite.samplers[0]
    n = len(suite.pairs)
    plt, fig, axes = _figure(n, min(n, 4), 4., 3.2)
    for ax, p in zip(axes.flat, suite.pairs):
        strong = {}
        for t in suite.steps:
            r = results[p.name][sampler, t]
            for res in [r['strong'], r['best']['strong']] + [c['baselines']['strong'] for c in r['variants'].values()]:
                strong[res.nfe] = statistics.fmean(res.values)
        xs = sorted(strong)
        ax.plot(xs, [strong[x] for x in xs], 'k.-', label='strong alone')
        for i, v in enumerate(suite.variants):
            pts = [(results[p.name][sampler, t]['variants'][v]['w2sd'].nfe,
                    statistics.fmean(results[p.name][sampler, t]['variants'][v]['w2sd'].values)) for t in suite.steps]
            ax.plot(*zip(*pts), 'o--', color=f'C{i}', label=f'W2SD {v}')
        for i, f in enumerate(f for f in suite.families if f != 'strong'):
            pts = sorted((results[p.name][sampler, t]['best'][f].nfe,
                          statistics.fmean(results[p.name][sampler, t]['best'][f].values))
                         for t in suite.steps if f in results[p.name][sampler, t]['best'])
            if pts:
                ax.plot(*zip(*pts), 'sv^Dx'[i] + ':', color=f'C{i + len(suite.variants)}', label=NAMES[f])
        ax.set_xscale('log')
        if suite.primary == 'fd':
            ax.set_yscale('log')
        else:       # an unbiased energy distance can dip below 0 at the noise floor, a TV can be 0
            ax.set_yscale('symlog', linthresh=1e-3)
            ax.set_ylim(bottom=-1e-3)
        ax.set_title(p.name, fontsize=9)
        ax.set_xlabel('NFE')
        ax.set_ylabel(suite.primary)
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f'{suite.name}: {suite.primary} against NFE ({sampler}, evaluation seeds)')
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
