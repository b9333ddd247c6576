"""`w2sd eval`'s pieces without a model: the statistics, the results store, the report tables, the tuning split
and selection, and the recommendation's host values."""
import json
import math
import pathlib
import re
import statistics

import pytest

from w2sd_samplers import stats
from w2sd_samplers.eval import methods as M, recommend, report, store as store_mod, summary, tune
from w2sd_samplers.eval.store import Store, settings_hash
from w2sd_samplers.errors import UsageError

ROOT = pathlib.Path(__file__).resolve().parents[1]
Z = statistics.NormalDist().inv_cdf(0.975)


def test_wilson_interval_closed_forms():
    # at p = 1 the Wilson bounds are n / (n + z^2) and 1; at p = 0, 0 and z^2 / (n + z^2) (solve the score equation)
    assert stats.wilson(12, 12) == pytest.approx((12 / (12 + Z * Z), 1.))
    assert stats.wilson(12, 12)[0] == pytest.approx(0.7575, abs=1e-4)       # the "about [0.76, 1.00]"
    assert stats.wilson(0, 12) == pytest.approx((0., Z * Z / (12 + Z * Z)))
    # p = 1/2: centre 1/2, half-width z sqrt(1/(4n) + z^2/(4n^2)) / (1 + z^2/n)
    n = 40
    half = Z * math.sqrt(1 / (4 * n) + Z * Z / (4 * n * n)) / (1 + Z * Z / n)
    assert stats.wilson(20, n) == pytest.approx((0.5 - half, 0.5 + half))
    assert all(math.isnan(v) for v in stats.wilson(0, 0))


def test_win_rate_of_a_clean_sweep_has_a_wilson_interval_not_a_point():
    rows = [dict(prompt_index=p, seed=s, method=m, scores={'clip': v}) for p in range(6) for s in range(2)
            for m, v in (('a', 2. + p), ('b', 1. + p))]
    c = report.compare(rows, 'clip', 'a', 'b', 0.1)
    assert (c.wins, c.items, c.prompts) == (12, 12, 6)
    assert report.win_cell(c) == '1.00 [0.76, 1.00]'


def test_cluster_bootstrap_keeps_the_seeds_of_a_prompt_together():
    import numpy as np
    rng = np.random.default_rng(3)
    groups = [[float(v)] for v in rng.normal(0.3, 1., 30)]
    mean, [ci] = stats.cluster_bootstrap(groups)
    assert mean == pytest.approx(np.mean(groups))
    # one value per group: the ordinary bootstrap of a mean, whose interval is about mean +- z sd / sqrt(n)
    sd = float(np.std(groups, ddof=1)) / math.sqrt(30)
    assert ci[0] == pytest.approx(mean - Z * sd, abs=0.35 * sd) and ci[1] == pytest.approx(mean + Z * sd, abs=0.35 * sd)
    # seeds that repeat their prompt's value add no information: the interval must not shrink (an item bootstrap
    # would narrow it by sqrt(2))
    assert stats.cluster_bootstrap([g * 2 for g in groups])[1][0] == pytest.approx(ci, abs=1e-12)
    # nested levels, and the degenerate cases
    _, (ci95, ci90) = stats.cluster_bootstrap(groups, levels=(0.95, 0.90))
    assert ci95[0] < ci90[0] < ci90[1] < ci95[1]
    assert math.isnan(stats.cluster_bootstrap([[1., 2.]])[1][0][0])
    assert stats.cluster_bootstrap([[0.], [0.], [0.]])[1][0] == (0., 0.)


def test_variance_components_by_hand_and_the_power_table():
    # groups (1, 3) and (5, 7): within = (1+1+1+1)/2 = 2; between mean square 2 (2-4)^2 + 2 (6-4)^2 = 16; n0 = 2
    assert stats.variance_components([[1., 3.], [5., 7.]]) == pytest.approx((7., 2.))
    with pytest.raises(ValueError):
        stats.variance_components([[1., 2.]])
    # differences with between-prompt variance 7 and within 2: s seeds per prompt give prompt means of variance
    # 7 + 2 / s, and the table's counts are the paired t-test's for that standard deviation
    rows = rows_of([[1., 3.], [5., 7.]])
    table = report.power_table(rows, 's', 'w', 'p', 1.5)
    body = [[int(v) for v in line.strip('| ').split(' | ')] for line in table if re.match(r'\| \d', line)]
    assert [b[0] for b in body] == [1, 2, 4, 8]
    for s, *counts in body:
        assert counts == [stats.pairs_for_power(math.sqrt(7 + 2 / s), k * 1.5) for k in (1, 2, 4)]
    assert body[0][1] > body[3][1] >= body[3][3]                     # more seeds, larger differences: fewer
    assert report.power_table(rows_of([[1.], [2.]]), 's', 'w', 'p', 1.) == []      # one seed: no within part
    # large differences against a small spread: scipy's nct.cdf gives nan there; power must stay a number, 1 at
    # the limit, and the counts must not grow with the difference
    assert all(stats.paired_power(0.4, d, n) == pytest.approx(1.) for d in (3.8, 10.) for n in (4, 5, 6))
    assert [stats.pairs_for_power(0.4, d) for d in (0.95, 1.9, 3.8)] == sorted(
        [stats.pairs_for_power(0.4, d) for d in (0.95, 1.9, 3.8)], reverse=True)


def rows_of(diffs, method='w', reference='p'):
    """Rows whose paired differences are ``diffs[prompt][seed]``."""
    out = []
    for pi, ds in enumerate(diffs):
        for seed, d in enumerate(ds):
            out += [dict(prompt_index=pi, seed=seed, method=reference, scores={'s': 10.}),
                    dict(prompt_index=pi, seed=seed, method=method, scores={'s': 10. + d})]
    return out


@pytest.mark.parametrize('diffs, margin, verdict', [
    ([[1.0, 1.2], [0.9, 1.1], [1.3, 0.8], [1.0, 1.05]], 0.1, 'better'),
    ([[-1.0, -1.2], [-0.9, -1.1], [-1.3, -0.8], [-1.0, -1.05]], 0.1, 'worse'),
    ([[0.01, -0.02], [0.0, 0.01], [-0.01, 0.02], [0.015, -0.01]], 0.1, 'equivalent'),
    ([[1.0, -1.2], [-0.9, 1.1], [1.3, -0.8], [-1.0, 1.05]], 0.1, 'inconclusive'),
    ([[0.0, 0.0], [0.0, 0.0]], 0.1, 'identical'),
    ([[0.5, 0.4]], 0.1, 'too few prompts'),
])
def test_paired_verdicts(diffs, margin, verdict):
    c = report.compare(rows_of(diffs), 's', 'w', 'p', margin)
    assert c.verdict == verdict
    assert c.mean == pytest.approx(statistics.fmean(d for ds in diffs for d in ds))


def test_margin_default_is_a_share_of_the_reference_spread_or_absolute():
    rows = [dict(prompt_index=i, seed=0, method='p', scores={'s': float(v)}) for i, v in enumerate((1, 2, 3, 4))]
    assert report.margin(rows, 's', 'p', {}) == pytest.approx(report.DEFAULT_MARGIN * statistics.stdev([1, 2, 3, 4]))
    assert report.margin(rows, 's', 'p', {'sd': 0.5}) == pytest.approx(0.5 * statistics.stdev([1, 2, 3, 4]))
    assert report.margin(rows, 's', 'p', {'s': 0.3}) == 0.3
    assert report.margin_rule({}).startswith(f'{report.DEFAULT_MARGIN:g} standard deviations') and \
        '(the default)' in report.margin_rule({})
    assert 'fixed: s ±0.3' in report.margin_rule({'s': 0.3, 'sd': 0.2}) and 'default' not in report.margin_rule(
        {'sd': 0.2})


def test_unscored_rows_drop_out_of_the_pairs_and_extremes_are_sorted():
    rows = rows_of([[2.], [-3.], [1.], [0.5]])
    rows.append(dict(prompt_index=4, seed=0, method='w', scores=None, error='not scored: the image is black'))
    rows.append(dict(prompt_index=4, seed=0, method='p', scores={'s': 1.}))
    assert sorted(report.differences(rows, 's', 'w', 'p')) == [0, 1, 2, 3]
    helps, hurts = report.extremes(rows, 's', 'w', 'p', k=2)
    assert helps == [(0, 2.), (2, 1.)] and hurts == [(1, -3.)]


def test_per_prompt_csv(tmp_path):
    import csv
    rows = [dict(prompt_index=0, prompt='a "cat", sitting', seed=3, method='w', steps=4, nfe=10, seconds=0.25,
                 scores={'clip': 31.5, 'aesthetic': 5.}, image='images/x.png'),
            dict(prompt_index=1, prompt='b', seed=3, method='w', steps=4, nfe=10, seconds=0.5, scores=None,
                 error='not scored: the image is black', image='images/y.png')]
    report.per_prompt_csv(tmp_path / 'p.csv', rows, ['clip', 'aesthetic'])
    got = list(csv.DictReader(open(tmp_path / 'p.csv', encoding='utf-8')))
    assert got[0]['prompt'] == 'a "cat", sitting' and got[0]['clip'] == '31.5' and got[0]['nfe'] == '10'
    assert got[0]['stage'] == 'eval'
    assert got[1]['clip'] == '' and got[1]['error'].startswith('not scored')


# --- the results store -------------------------------------------------------------------------------------------

def row(pi, seed, method='m'):
    return dict(prompt_index=pi, seed=seed, method=method, scores={'s': 1.}, image='images/x.png')


def test_a_kill_on_any_byte_of_the_last_row_never_loses_a_counted_row(tmp_path):
    """The resumed run's 'done' set (rows read before appending) must equal what is on disk after the writer has
    dropped the torn tail: a row counted as done and then dropped is a lost row."""
    whole = ''.join(json.dumps(row(0, s)) + '\n' for s in range(3)).encode()
    last = (json.dumps(row(1, 0)) + '\n').encode()
    for cut in range(len(last) + 1):
        out = tmp_path / f'cut{cut}'
        out.mkdir()
        (out / 'shard-0.jsonl').write_bytes(whole + last[:cut])
        s = Store(out)
        done = {store_mod.key(r) for r in s.rows()}
        s.writer(0).close()
        assert {store_mod.key(r) for r in s.rows()} == done, cut
        assert ((1, 0, 'm') in done) == (cut == len(last)), cut
        assert (out / 'shard-0.jsonl').read_bytes() in (whole, whole + last)


def test_writer_appends_whole_lines(tmp_path):
    s = Store(tmp_path)
    w = s.writer(0)
    w.write(row(0, 0))
    w.write(row(0, 1))
    w.close()
    data = (tmp_path / 'shard-0.jsonl').read_bytes()
    assert data.endswith(b'\n') and [store_mod.key(r) for r in s.rows()] == [(0, 0, 'm'), (0, 1, 'm')]


def test_lines_that_are_not_rows_are_skipped_and_reported(tmp_path):
    lines = [json.dumps(row(0, 0)), '{"prompt_index": 1}', '[1, 2]', 'garbage', '\x00\x00', '"text"',
             json.dumps(dict(row(0, 1), seed='1')), json.dumps(row(0, 2))]
    (tmp_path / 'shard-0.jsonl').write_bytes(('\n'.join(lines) + '\n').encode() + b'\xff\xfe\n')
    shards = Store(tmp_path).read()
    assert [store_mod.key(r) for r in shards.rows] == [(0, 0, 'm'), (0, 2, 'm')]
    assert [n for _, n in shards.skipped] == [2, 3, 4, 5, 6, 7, 9]
    assert shards.report().startswith('skipped 7 line(s) that are not rows (shard-0.jsonl line 2')


def test_settings_refusal_names_the_changed_setting_and_prompts_may_grow(tmp_path):
    s = Store(tmp_path / 'out')
    settings = dict(model='/m', strength=1.0, scorer=['clip:/c'])
    assert s.check(settings, ['a', 'b'], resume=False) is None
    s.create(settings, ['a', 'b'], split=[1])
    with pytest.raises(UsageError, match=r"--strength 0\.5 \(the run in --out has 1\.0\)") as e:
        s.check(dict(settings, strength=0.5), ['a', 'b'], resume=True)
    assert 'hash' not in str(e.value)
    with pytest.raises(UsageError, match='pass --resume'):
        s.check(settings, ['a', 'b'], resume=False)
    with pytest.raises(UsageError, match="--prompts: prompt 2 is 'c', the run in --out has 'b'"):
        s.check(settings, ['a', 'c'], resume=True)
    assert s.check(settings, ['a', 'b', 'c'], resume=True)['split'] == [1]
    s.create(settings, ['a', 'b', 'c'], split=[0, 2])        # extended: the stored split stays
    stored = json.loads((tmp_path / 'out' / 'settings.json').read_text())
    assert stored['prompts'] == ['a', 'b', 'c'] and stored['split'] == [1]
    assert stored['hash'] == settings_hash(settings)


# --- tuning ------------------------------------------------------------------------------------------------------

def test_tuning_split_spreads_and_is_stable_when_prompts_are_appended():
    assert tune.split(8, 0.25) == [3, 7]
    assert tune.split(10, 0.5) == [1, 3, 5, 7, 9]
    assert tune.split(12, 1 / 3) == tune.split(12, 1 / 3)[:4] == [2, 5, 8, 11]
    for n in range(1, 30):
        assert tune.split(n, 0.3) == [i for i in tune.split(n + 7, 0.3) if i < n]
        assert len(tune.split(n, 0.3)) == math.floor(n * 0.3 + 1e-9)


def test_tuning_candidates_and_scores():
    plan, asked = {('w2sd-anchored', 1.): None}, []

    def planner(method, params):
        asked.append((method, params))
        return plan.get((method, params.get('lam_frac')), 5)
    cands = tune.candidates(['plain-nfe', 'w2sd-anchored', 'autoguidance'], planner, 12)
    # planned once per reflected share (strength changes no call count), once for autoguidance (nor does w)
    assert sorted(p['lam_frac'] for m, p in asked if m == 'w2sd-anchored') == [0.3, 0.6, 1.]
    assert [m for m, _ in asked].count('autoguidance') == 1
    assert [c.steps for c in cands if c.method == 'plain-nfe'] == [3, 6, 9, 12]
    w2sd = [c for c in cands if c.method == 'w2sd-anchored']
    assert len(w2sd) == 6 and all(c.options['lam_frac'] != 1. for c in w2sd)        # the None plans are out
    assert len([c for c in cands if c.method == 'autoguidance']) == len(tune.GRID['autoguidance'])
    a, b = cands[:2]
    rows = [dict(method=a.label(), scores={'s': 1.}), dict(method=a.label(), scores={'s': 3.}),
            dict(method=b.label(), scores={'s': 5.}), dict(method=b.label(), scores=None)]
    assert tune.scores(rows, 's', [a, b]) == {a: 2.}


def test_ties_go_to_the_earlier_family():
    assert summary.best(['x', 'y', 'z'], {'x': 1., 'y': 2., 'z': 2.}.get) == 'y'
    assert summary.best(['x', 'y'], {'x': math.nan, 'y': 0.}.get) == 'y'
    assert summary.best([], {}.get) is None


# --- the recommendation's host values ----------------------------------------------------------------------------

def comfy_inputs():
    text = (ROOT / 'wrappers' / 'comfyui' / 'nodes.py').read_text()
    return set(re.findall(r"'(\w+)': \(", text))


def webui_labels():
    """The panel's labels, as the webui extension defines them (options.LABELS)."""
    text = (ROOT / 'wrappers' / 'sd_webui' / 'w2sd_sdwebui' / 'options.py').read_text()
    return re.findall(r"'\w+': '([^']+)'", re.search(r'LABELS = \{(.*?)\}', text, re.S).group(1))


@pytest.mark.parametrize('kind, value, scales, strong, weak', [
    ('cfg', 0., None, 5.5, 0.),
    ('prompt', 'a plain cat', None, 1., 1.),
    ('lora', 'style.safetensors', (0.8, -1.5), 1., 1.),
    ('weights', 'weak_model', None, 1., 1.),
])
def test_recommended_values_use_the_hosts_names(kind, value, scales, strong, weak):
    from w2sd_samplers.cli import build_parser
    setting = M.Setting.of('w2sd-paper', 17, lam_frac=0.6, strength=0.5)
    run = recommend.Run(kind, value, scales, 5.5, strong, weak, 'dpmpp_2m', 'karras')
    comfy, webui, generate = recommend.instructions(setting, run)
    lam = round(0.6 * 16)
    names = {k: v.rstrip(',;.') for k, v in re.findall(r'`(\w+)` (\S+)', comfy)}
    assert set(names) <= comfy_inputs(), set(names) - comfy_inputs()
    assert names['lam'] == str(lam) and names['steps'] == '17' and names['strength'] == '0.5'
    assert names['form'] == 'paper' and names['scheduler'] == 'karras' and names['weak_cfg'] == f'{weak:g}'
    labels = webui_labels()
    used = ['Enable', 'Weak model', 'Reflected steps lambda', 'Reflection strength', 'Weak sigma'] + \
        {'cfg': ['Weak CFG'], 'prompt': ['Weak prompt', 'Reflection CFG'], 'lora': ['Weak LoRA multiplier'],
         'weights': ['Reflection CFG']}[kind]
    for name in used:
        assert name in webui and any(label.startswith(name) for label in labels), name
    assert f'Reflected steps lambda {lam}' in webui and '"W2SD DPM++ 2M"' in webui
    argv = re.fullmatch(r'- \*\*w2sd generate\*\*: `w2sd (generate .*)`', generate).group(1)
    import shlex
    args = build_parser().parse_args(shlex.split(argv))
    assert (args.steps, args.lam, args.strength, args.form, args.sampler, args.schedule) == \
        (17, lam, 0.5, 'paper', 'dpmpp_2m', 'karras')
    assert {'cfg': args.weak_cfg == weak, 'prompt': args.weak_prompt == value,
            'lora': (args.lora, tuple(args.lora_scales)) == (value, scales),
            'weights': args.weak_model == value}[kind]


def test_settings_the_hosts_cannot_take_are_said():
    anchored = M.Setting.of('w2sd-anchored', 17, lam_frac=0.6, strength=0.5)
    nxt = M.Setting.of('w2sd-next', 17, lam_frac=0.6, strength=0.5)
    run = recommend.Run('cfg', 0., None, 5.5, 5.5, 0., 'euler', 'native')
    _, webui, _ = recommend.instructions(anchored, run)
    assert 'paper form only' in webui
    _, webui, generate = recommend.instructions(nxt, run)
    assert 'Weak sigma next' in webui and 'no weak-sigma flag' in generate
    split_cfg = recommend.Run('prompt', 'x', None, 5.5, 1., 2., 'euler', 'native')
    assert 'one Reflection CFG' in recommend.instructions(anchored.__class__.of('w2sd-paper', 9, lam_frac=1.,
                                                                                 strength=1.), split_cfg)[1]


def test_recommendation_uses_the_tuned_ranking_and_never_a_family_with_unscorable_images():
    def rows_for(method, setting, values, error_at=None):
        return [dict(prompt_index=pi, seed=0, method=method, setting=f'{method} {setting}', steps=8,
                     params=dict(lam_frac=0.6, strength=0.5) if method.startswith('w2sd') else {},
                     scores=None if pi == error_at else {'s': v},
                     **({'error': 'not scored: the image is black'} if pi == error_at else {}))
                for pi, v in enumerate(values)]
    base = [1., 2., 3., 4., 5., 6.]
    rows = (rows_for('plain-nfe', 'T=12', base) + rows_for('w2sd-paper', 'T=8 lam_frac=0.6 strength=0.5',
                                                           [v + 1 for v in base])
            + rows_for('autoguidance', 'T=6 w=1', [v + 0.5 for v in base]))
    methods = ['plain-nfe', 'w2sd-paper', 'autoguidance']
    margins = {('s', r): 0.1 for r in ('plain-nfe', 'autoguidance')}
    run = recommend.Run('cfg', 0., None, 5.5, 5.5, 0., 'euler', 'karras')
    # ranked by the tuning scores: autoguidance won the tuning, so it is the one tested, and it is better
    tuning = tune.Tuning([], {'a': 0.1, 'b': 0.2}, {'w2sd-paper': 'a', 'autoguidance': 'b'}, [], [], 0, 0.)
    text = '\n'.join(summary.recommendation(rows, methods, 's', margins, tuning, run, 12))
    assert 'use autoguidance (T=6 w=1):** s +0.5 [0.5, 0.5] better against plain-nfe' in text
    assert "W2SD's best setting here is **w2sd-paper**" in text and '`lam` 4' in text
    # W2SD tuned best, but one of its evaluation images is black: it is not recommended, and that is said
    tuning.scores = {'a': 0.3, 'b': 0.2}
    rows[len(base) + 2] = rows_for('w2sd-paper', 'T=8 lam_frac=0.6 strength=0.5', base, error_at=2)[2]
    text = '\n'.join(summary.recommendation(rows, methods, 's', margins, tuning, run, 12))
    assert text.startswith('**No method is reliably better than plain sampling at this budget**')
    assert 'gave 1 unscorable image(s)' in text


def test_strength_and_w_change_no_call_count():
    """Why tune.candidates plans once per setting without its strength or w: the counted calls are the same."""
    import k_diffusion.sampling as K
    from w2sd_samplers import pairs, toy
    roles = pairs.weights(toy.four_modes([.1, .3, .3, .3]), toy.four_modes([0., 1., 1., 1.]))
    sigmas = K.get_sigmas_karras(9, 0.01, 40.)
    for method, grid in tune.GRID.items():
        if method == 'plain-nfe':
            continue
        counts = {}
        for params in grid:
            key = tuple((k, v) for k, v in sorted(params.items()) if k not in ('strength', 'w'))
            counts.setdefault(key, set()).add(tuple(sorted(M.dry_nfe(method, roles, sigmas, 'euler',
                                                                     params).items())))
        assert all(len(c) == 1 for c in counts.values()), method
