import argparse
import json
import math
import os
import subprocess
import sys
import warnings

import pytest
import torch

from w2sd_samplers import cli as main_cli, stats, toy, tuning
from w2sd_samplers.bench import digits, gmm, harness, methods, metrics, report, shapes
from w2sd_samplers.commands import bench as cli


def test_seed_split_is_disjoint():
    tune, ev = stats.split_seeds(3, 5, base=10)
    assert len(tune) == 3 and len(ev) == 5 and not set(tune) & set(ev)
    with pytest.raises(ValueError):
        stats.split_seeds(2, 1)


def test_mean_ci_matches_the_t_table():
    mean, half = stats.mean_ci([1., 2., 3.])
    assert mean == 2. and half == pytest.approx(4.3027 / math.sqrt(3), rel=1e-4)   # t_{0.975, 2} = 4.3027


def test_holm_adjusts_by_rank_and_stays_monotone():
    # by hand from Holm (1979): sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1, then a running maximum
    assert stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert stats.holm([0.5, 0.9]) == [1., 1.]      # 0.9 * 1 < 0.5 * 2: the running maximum carries 1


def test_paired_p_sees_a_consistent_shift_and_not_noise():
    a = [1., 2., 3., 4., 5.]
    assert stats.paired_p([x + 0.5 + 0.01 * i for i, x in enumerate(a)], a) < 1e-4
    assert stats.paired_p(a, a) == 1.
    with warnings.catch_warnings():
        warnings.simplefilter('error')                   # scipy's precision-loss warning on a constant shift
        assert stats.paired_p([x + 1. for x in [1., 2., 3., 4.]], [1., 2., 3., 4.]) == 0.


def test_tost_is_the_larger_of_two_one_sided_t_tests():
    from scipy import stats as sp
    g = torch.Generator().manual_seed(4)
    a = (torch.randn(12, generator=g, dtype=torch.float64) + 10).tolist()
    b = [x + 0.05 + 0.1 * float(e) for x, e in zip(a, torch.randn(12, generator=g, dtype=torch.float64))]
    d = [x - y for x, y in zip(a, b)]
    for margin in (0.02, 0.2, 1.):
        lower = sp.ttest_1samp([v + margin for v in d], 0., alternative='greater').pvalue
        upper = sp.ttest_1samp([v - margin for v in d], 0., alternative='less').pvalue
        assert stats.tost_p(a, b, margin) == pytest.approx(max(lower, upper), rel=1e-12)
    assert stats.tost_p(a, b, 1.) < 1e-6 and stats.tost_p(a, b, 0.02) > 0.5
    with pytest.raises(ValueError, match='margin'):
        stats.tost_p(a, b, 0.)


def test_power_matches_the_published_sample_size():
    # Cohen (1988) / G*Power: a one-sample (paired) t-test at d = 0.5, alpha 0.05 two-sided, needs n = 34 for 80%
    # power (power 0.808 there, 0.798 at n = 33)
    assert stats.paired_power(1., 0.5, 34) == pytest.approx(0.808, abs=0.002)
    assert stats.pairs_for_power(2., 1.) == 34 and stats.pairs_for_power(1., 0.) is None
    assert stats.paired_power(0.005, 0.0346, 8) == 1.       # a large effect: 1, not nan
    # large n: the normal approximation Phi(d sqrt(n) - z_0.975)
    assert stats.paired_power(1., 0.2, 400) == pytest.approx(0.5 * (1 + math.erf((4 - 1.959964) / 2 ** 0.5)),
                                                             abs=0.003)


def test_select_breaks_ties_by_the_written_order_and_never_picks_nan():
    cands = ['c', 'a', 'b', 'd']
    score = {'a': 1., 'b': 1., 'c': 2., 'd': float('nan')}
    assert tuning.select(cands, score.get) == 'a'
    assert tuning.select(['b', 'a'], score.get) == 'b'
    assert tuning.select(['d', 'c'], score.get) == 'c'
    with pytest.raises(ValueError):
        tuning.select([], score.get)


def _gauss_abs_mean(m, s):
    """E|Z| for Z ~ N(m, s^2)."""
    return s * math.sqrt(2 / math.pi) * math.exp(-m * m / (2 * s * s)) + m * math.erf(m / (s * math.sqrt(2)))


def test_energy_distance_against_closed_forms():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(3000, 1, generator=g), torch.randn(3000, 1, generator=g)
    assert abs(toy.energy_distance(x, y)) < 0.01
    d = 1.5
    exact = 2 * _gauss_abs_mean(d, math.sqrt(2)) - 2 * _gauss_abs_mean(0, math.sqrt(2))
    assert toy.energy_distance(x, y + d) == pytest.approx(exact, rel=0.05)


def test_frechet_against_scipy_and_closed_forms():
    import scipy.linalg
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(5, 5, generator=g, dtype=torch.float64), torch.randn(5, 5, generator=g, dtype=torch.float64)
    c1, c2 = a @ a.T + 0.1 * torch.eye(5), b @ b.T + 0.1 * torch.eye(5)
    mu1, mu2 = torch.randn(5, generator=g, dtype=torch.float64), torch.zeros(5, dtype=torch.float64)
    ref = float(((mu1 - mu2) ** 2).sum() + c1.trace() + c2.trace()
                - 2 * scipy.linalg.sqrtm((c1 @ c2).numpy()).real.trace())
    assert metrics.frechet_gaussians(mu1, c1, mu2, c2) == pytest.approx(ref, rel=1e-8)
    # diagonal covariances: |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2
    va, vb = torch.tensor([1., 4.]), torch.tensor([9., 1.])
    exact = 1. + (1 - 3) ** 2 + (2 - 1) ** 2
    assert metrics.frechet_gaussians([1., 0.], va.diag(), [0., 0.], vb.diag()) == pytest.approx(exact)
    xa = torch.randn(20000, 2, generator=g) * va.sqrt() + torch.tensor([1., 0.])
    xb = torch.randn(20000, 2, generator=g) * vb.sqrt()
    assert metrics.frechet_distance(xa, xb) == pytest.approx(exact, rel=0.05)


def test_precision_recall_and_class_balance():
    g = torch.Generator().manual_seed(2)
    real = torch.randn(300, 4, generator=g)
    assert metrics.precision_recall(real, real) == (1., 1.)
    assert metrics.precision_recall(real + 100, real) == (0., 0.)
    # half of the fake set sits on the data, half far away: precision 1/2, recall 1
    fake = torch.cat([real[:150], real[:150] + 100])
    p, r = metrics.precision_recall(fake, real)
    assert p == 0.5 and r > 0.4
    labels, ref = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 2, 2])
    assert metrics.class_balance_tv(labels, ref, 3) == pytest.approx(0.5 * (0.25 + 0.25 + 0.5))


def test_gmm_cases_have_the_stated_geometry():
    cases = {p.name: p for p in gmm.cases()}
    left = cases['1d-r2'].weak.weights[0]
    assert float(left) == pytest.approx(1 / (1 + math.exp(-2 * math.log(0.35 / 0.65))))
    for name, cos in (('2d-aligned', 1.), ('2d-orthogonal', 0.), ('2d-opposite', -1.)):
        p = cases[name]
        log = [m.weights.log() - m.weights.log().mean() for m in (p.ideal, p.strong, p.weak)]
        gap, diff = log[1] - log[0], log[2] - log[1]
        assert float(torch.cosine_similarity(gap, diff, 0)) == pytest.approx(cos, abs=1e-6)
    assert len(cases['2d-missing'].weak.means) == 3
    assert torch.equal(cases['2d-control'].strong.weights, cases['2d-control'].ideal.weights)


def _tiny_suite(pairs, samplers=('euler',), steps=(6,)):
    return harness.Suite('t', pairs, gmm.metric, 'energy', samplers, steps, [0], [1, 2], 48, 64,
                         w2sd_grid=((0.5, 1.), (1., 0.5)), ag_ws=(0.05, 1.), ag_windows=((0.28, 5.42), (1., 80.)),
                         resampling_fracs=(0.5, 1.), restarts=(dict(lo=1., hi=5., k=1),), ladder=(4, 6, 8, 12))


def test_nfe_is_counted_per_method():
    pair = gmm.cases()[0]
    run = harness.Runner(_tiny_suite([pair]))
    T, lam = 10, 9
    sigmas = run.sigmas(T)
    for sampler in ('euler', 'dpmpp_2m', 'euler_ancestral'):
        w2sd = dict(lam_frac=1., strength=1., form='paper', weak_sigma='next')
        assert run.sample(pair, sampler, 'w2sd', T, w2sd, 0, 8)[1] == T + 2 * lam
        assert run.sample(pair, sampler, 'self-reflection', T, dict(w2sd, lam_frac=0.5), 0, 8)[1] == T + 2 * 4
        assert run.sample(pair, sampler, 'autoguidance', T, {'w': 1.}, 0, 8)[1] == 2 * T
        inside = int(((sigmas[:-1] >= 1.) & (sigmas[:-1] <= 5.)).sum())
        assert 0 < inside < T
        assert run.sample(pair, sampler, 'autoguidance', T, {'w': 1., 'window': (1., 5.)}, 0, 8)[1] == T + inside
        assert run.sample(pair, sampler, 'strong', T, {}, 0, 8)[1] == T
    assert run.sample(pair, 'euler', 're-sampling', T, {'lam_frac': 0.5}, 0, 8)[1] == T + 4
    # Restart: Heun main steps (2 calls, 1 into sigma = 0) plus k restarts of 3 Heun steps each
    assert run.sample(pair, 'euler', 'restart', T, dict(lo=1., hi=5., k=2), 0, 8)[1] == 2 * T - 1 + 2 * 2 * 3


def test_w2sd_at_strength_zero_is_strong_and_runs_are_paired():
    pair = gmm.cases()[3]
    run = harness.Runner(_tiny_suite([pair]))
    for sampler in ('euler', 'euler_ancestral'):
        strong, _ = run.sample(pair, sampler, 'strong', 8, {}, 5, 16)
        off, _ = run.sample(pair, sampler, 'w2sd', 8, dict(lam_frac=1., strength=0.), 5, 16)
        assert torch.equal(strong, off)
        other_seed, _ = run.sample(pair, sampler, 'strong', 8, {}, 6, 16)
        assert not torch.equal(strong, other_seed)


def test_compare_tunes_on_tune_seeds_and_keeps_every_family_within_the_nfe():
    pair = gmm.cases()[0]
    suite = _tiny_suite([pair])
    run = harness.Runner(suite)
    T = 6
    out = run.compare(pair, 'euler', T)
    assert out['strong'].nfe == T and len(out['strong'].values) == 2
    assert out['variants']['paper']['w2sd'].params['lam_frac'] == 1.
    assert out['budget'] == 3 * T - 2 and max(r.nfe for r in out['best'].values()) <= out['budget']
    assert list(out['best']) == list(harness.FAMILIES)
    for family, b in out['best'].items():
        cands = run.candidates(pair, 'euler', family, out['budget'], T)
        scores = [run.tune_score(pair, 'euler', *c) for c in cands]
        assert b.n_settings == len(cands) and b.tune == min(scores)
        assert (b.method, b.steps, b.params) == cands[scores.index(min(scores))]
    # strong alone: every step count that fits, T and the budget included; the baselines at the largest fit and T
    assert [c[1] for c in run.candidates(pair, 'euler', 'strong', 16, T)] == [4, 6, 8, 12, 16]
    assert [c[1] for c in run.candidates(pair, 'euler', 'ag', 16, T)] == [6, 6, 8, 8]
    assert len(run.candidates(pair, 'euler', 'w2sd', 16, T)) == 1 + 2 * len(suite.w2sd_grid)
    for name, c in out['variants'].items():
        assert c['self'].params == c['w2sd'].params and c['self'].nfe == c['w2sd'].nfe
    # only tuning-seed runs are scored at n_tune; evaluation uses the disjoint seeds
    tuned_seeds = {k[5] for k in run._cache if k[6] == suite.n_tune}
    eval_seeds = {k[5] for k in run._cache if k[6] == suite.n_eval}
    assert tuned_seeds == set(suite.tune_seeds) and eval_seeds == set(suite.eval_seeds)


def test_edges_mark_tuned_values_at_an_extendable_end():
    s = _tiny_suite([])
    assert methods.edges('autoguidance', {'w': 1.}, s) == ['w 1']
    assert methods.edges('autoguidance', {'w': 0.05, 'window': (1., 80.)}, s) == ['w 0.05']
    anchored = dict(form='anchored', weak_sigma='current')
    assert methods.edges('w2sd', dict(anchored, lam_frac=1., strength=0.5), s) == ['strength 0.5']
    assert methods.edges('w2sd', dict(anchored, lam_frac=0.5, strength=0.5), s) == ['strength 0.5', 'λ fraction 0.5']
    assert methods.edges('w2sd', dict(anchored, lam_frac=1., strength=0.75), s) == []
    # the paper's fixed setting is not tuned; lambda = T - 1 and one restart are natural ends
    assert methods.edges('w2sd', dict(form='paper', weak_sigma='current', lam_frac=1., strength=1.), s) == []
    assert methods.edges('re-sampling', {'lam_frac': 1.}, s) == []
    assert methods.edges('restart', dict(lo=1., hi=5., k=1), s) == []


def _result(values, tune, seconds=1.):
    return harness.Result('x', 10, {}, 10, values, {}, seconds=seconds, tune=tune)


def test_verdict_ties_go_to_the_family_order_and_rows_need_every_model():
    from w2sd_samplers.bench.methods import Pair
    ev = [1., 2., 3., 4.]

    def best(tunes):
        return {f: _result([v + i for v in ev], t) for i, (f, t) in enumerate(zip(harness.FAMILIES, tunes))}
    # every family ties on the tuning seeds: strong alone, the first family, is picked
    pairs = [Pair(f'p/m{m}', None, None, (1,), group='p', model=m, cells=[('euler', 10)]) for m in (0, 1)]
    suite = _tiny_suite(pairs)
    tie = {'p/m0': {('euler', 10): {'best': best([1.] * 6)}}, 'p/m1': {('euler', 10): {'best': best([1.] * 6)}}}
    (g,) = report.analyse(suite, tie)
    assert g['use'] == 'strong' and [m['use'] for m in g['models']] == ['strong', 'strong']
    # model 1 picks W2SD (lowest tuning mean), model 0 AG interval: the row depends on the model
    split = {'p/m0': {('euler', 10): {'best': best([3, 3, 1, 3, 3, 2])}},
             'p/m1': {('euler', 10): {'best': best([3, 3, 2, 3, 3, 1])}}}
    (g,) = report.analyse(suite, split)
    assert g['use'] is None and [m['use'] for m in g['models']] == ['ag_interval', 'w2sd']
    assert 'depends on the model: m0 AG interval, m1 W2SD' in '\n'.join(report.verdict_table([g]))


def test_digits_data_and_cached_models(tmp_path, monkeypatch):
    x, y = digits.load('train')
    xh, yh = digits.load('held_out')
    assert x.shape == (1797 - 600, 64) and xh.shape == (600, 64) and x.min() == -1 and x.max() == 1
    assert set(y.tolist()) == set(range(10))
    monkeypatch.setattr(digits, 'STRONG', dict(width=16, depth=1, steps=16))
    monkeypatch.setattr(digits, 'SMALL', dict(width=8, depth=1, steps=16))
    monkeypatch.setattr(digits, 'EARLY_STEP', 8)
    first = digits.models(tmp_path, quick=True)
    assert len(list(tmp_path.glob('*.safetensors'))) == 4
    second = digits.models(tmp_path, quick=True)
    for a, b in zip(first, second):
        assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    strong, early = first[0], first[1]
    assert not torch.equal(strong.inner_model.net[0].weight, early.inner_model.net[0].weight)
    # with the strong model cached, the early checkpoint is rebuilt by replaying the strong run to the snapshot
    next(tmp_path.glob('digits-early-*.safetensors')).unlink()
    replayed = digits.models(tmp_path, quick=True)[1]
    assert all(torch.equal(p, q) for p, q in zip(early.state_dict().values(), replayed.state_dict().values()))
    out = strong(xh[:4], torch.full([4], 0.5))
    assert out.shape == (4, 64) and torch.isfinite(out).all()
    # tuning and evaluation seeds are scored against disjoint halves of the held-out digits
    metric = digits.DigitsMetric(first[3], tune_seeds=[0])
    (tune_feats, _), (eval_feats, _) = metric.refs[True], metric.refs[False]
    assert len(tune_feats) == len(eval_feats) == 300
    assert torch.cdist(tune_feats, eval_feats).min() > 0
    assert metric(None, xh[:300], 0)['fd'] == pytest.approx(0, abs=1e-4)
    assert metric(None, xh[:300], 5)['fd'] > 0.01


def test_shapes_read_off_is_exact_and_has_a_margin():
    assert float(shapes.template_probs(0.5).sum()) == pytest.approx(1.)
    idx, valid = shapes.read_off(shapes.TEMPLATES)
    assert torch.equal(idx, torch.arange(len(shapes.TEMPLATES))) and valid.all()
    # a green plus of side 8 at (x, y) = (8, 8), drawn by hand: bars of thickness 2 through its centre
    img = -torch.ones(3, 16, 16)
    img[1, 8:16, 11:13] = img[1, 11:13, 8:16] = 1.
    i, ok = shapes.read_off(img[None])
    assert ok.item() and shapes.ATTRS[:, i.item()].tolist() == [1, 1, 8, 8, 8]
    # the closest templates, a square and a plus at one place, differ in 64 - 28 = 36 pixels of one channel by 2:
    # RMS sqrt(36 * 4 / 768) = 0.433 > 2 * VALID_RMS, and their 50/50 blend (0.217 from each) is invalid
    flat = shapes.TEMPLATES.reshape(len(shapes.TEMPLATES), -1)
    dist = torch.cdist(flat, flat) / flat.shape[1] ** 0.5 + 9 * torch.eye(len(flat))
    assert float(dist.min()) == pytest.approx((36 * 4 / 768) ** 0.5)
    assert float(dist.min()) > 2 * shapes.VALID_RMS
    square = shapes.TEMPLATES[(shapes.ATTRS[0] == 0) & (shapes.ATTRS[1] == 1) & (shapes.ATTRS[3] == 8)
                              & (shapes.ATTRS[4] == 8)][0]
    blend = (square + img) / 2
    assert not shapes.read_off(blend[None])[1].item()
    stats_ = shapes.attribute_stats(torch.stack([img, blend]))
    assert stats_['valid'] == 0.5 and stats_['class_tv'] == pytest.approx(0.5 * (0.5 + 0. + 0.5))
    # asked for (square, plus): the plus is right, the blend invalid -> half the images are not of their label
    assert shapes.attribute_stats(torch.stack([blend, img]), torch.tensor([0, 1]))['class_tv'] == 0.5
    assert shapes.attribute_stats(torch.stack([square, img]), torch.tensor([1, 0]))['class_tv'] == 1.
    # many exact draws at 35% squares: the read-off finds the ratio within binomial noise (sd 0.005)
    x, _ = shapes.sample(8000, 0.35, torch.Generator().manual_seed(0))
    s = shapes.attribute_stats(x)
    assert s['valid'] == 1. and abs(s['ratio_err'] - 0.15) < 0.02 and s['attr_tv'] < 0.05
    assert s['class_tv'] == pytest.approx(s['ratio_err'])          # all valid: TV = |squares - 1/2|


def test_template_mixture_is_the_gaussian_mixture_denoiser():
    exact, reference = shapes.TemplateMixture(0.35), toy.GaussianMixture(
        shapes.TEMPLATES.reshape(len(shapes.TEMPLATES), -1), shapes.EXACT_STD, shapes.template_probs(0.35))
    x = 2 * torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    for sigma in (0.01, 0.3, 3., 80.):
        s = torch.full([6], sigma, dtype=torch.float64)
        # float64 on both sides: the two sums differ by rounding, O(768 * 1e-16) relative to outputs of size ~10
        assert torch.allclose(exact(x, s), reference(x, s), rtol=0, atol=1e-10)
    draws = exact.sample(4000, torch.Generator().manual_seed(0))
    assert abs(shapes.attribute_stats(draws.float())['ratio_err'] - 0.15) < 0.03


def _tiny_shapes(monkeypatch):
    monkeypatch.setattr(shapes, 'STRONG', dict(shapes.STRONG, channels=(8, 8), steps=40))
    monkeypatch.setattr(shapes, 'COND_STEPS', 40)


def test_shapes_models_are_cached_and_differ_only_as_stated(tmp_path, monkeypatch):
    _tiny_shapes(monkeypatch)
    first, clf = shapes.models(tmp_path, quick=True)
    assert len(list(tmp_path.glob('shapes-*.safetensors'))) == 6
    second, _ = shapes.models(tmp_path, quick=True)
    for name in first:
        assert all(torch.equal(p, q) for p, q in zip(first[name].state_dict().values(),
                                                     second[name].state_dict().values()))
    w = lambda name: first[name].inner_model.proj_in.weight
    assert not torch.equal(w('strong'), w('aligned')) and not torch.equal(w('aligned'), w('null'))
    # another training seed: other initial weights, other models
    other, _ = shapes.models(tmp_path, seed=1, quick=True, conditional=False)
    assert 'conditional' not in other and not torch.equal(w('strong'), other['strong'].inner_model.proj_in.weight)
    out = first['strong'](torch.zeros(2, 3, 16, 16), torch.full([2], 0.5))
    labels = first['conditional'](torch.zeros(2, 3, 16, 16), torch.full([2], 0.5), label=torch.tensor([0, 2]))
    assert out.shape == labels.shape == (2, 3, 16, 16) and torch.isfinite(out).all()
    assert not torch.equal(labels[0], labels[1])


def _bench(*argv):
    parser = argparse.ArgumentParser()
    cli.add_parser(parser.add_subparsers())
    args = parser.parse_args(['bench', *argv])
    return args.func(args)


def test_bench_cli_quick_gmm_writes_results(tmp_path, capsys):
    assert _bench('gmm', '--quick', '--out', str(tmp_path), '--no-progress') == 0
    assert str(tmp_path.resolve()) in capsys.readouterr().out
    text = (tmp_path / 'RESULTS.md').read_text()
    assert text.index('## Verdict') < text.index('## Gaussian mixtures')
    assert '2d-missing' in text and 'Quick mode' in text and 'Holm' in text
    for png in ('gmm_quality_vs_nfe.png', 'gmm_points_2d_missing.png'):
        assert (tmp_path / png).read_bytes()[:4] == b'\x89PNG'
    verdict = text[text.index('### gmm'):text.index('## Gaussian mixtures')]
    assert 'Quick mode: smoke-test sizes. These numbers are not results' in verdict
    # the tables re-rendered from the saved per-seed JSON are the same, under any hash seed
    assert _bench('gmm', '--quick', '--out', str(tmp_path), '--from-json') == 0
    assert (tmp_path / 'RESULTS.md').read_text() == text
    # the cells in two processes: the same numbers (wall times aside)
    assert _bench('gmm', '--quick', '--out', str(tmp_path / 'jobs'), '--no-progress', '--jobs', '2') == 0

    def numbers(x):
        return {k: numbers(v) for k, v in x.items() if k != 'seconds'} if isinstance(x, dict) else x
    assert numbers(json.loads((tmp_path / 'jobs' / 'gmm.json').read_text())) == \
        numbers(json.loads((tmp_path / 'gmm.json').read_text()))
    for hash_seed in ('1', '2'):
        subprocess.run([sys.executable, '-m', 'w2sd_samplers.bench', 'gmm', '--quick', '--out', str(tmp_path),
                        '--from-json'], check=True, env=dict(os.environ, PYTHONHASHSEED=hash_seed),
                       capture_output=True)
        assert (tmp_path / 'RESULTS.md').read_text() == text


def test_bench_cli_quick_shapes_writes_a_grid(tmp_path, monkeypatch):
    _tiny_shapes(monkeypatch)
    assert _bench('shapes', '--quick', '--out', str(tmp_path), '--no-progress') == 0
    text = (tmp_path / 'RESULTS.md').read_text()
    assert '## Shapes' in text and 'shapes-aligned' in text and 'shapes-cfg' in text and 'shapes-exact' in text
    assert '| shapes-aligned | aligned | 2 |' in text           # two training seeds in quick mode
    assert (tmp_path / 'shapes_grid_shapes-aligned.png').read_bytes()[:4] == b'\x89PNG'
    assert list((tmp_path / 'cache').glob('shapes-strong-*.safetensors'))


def _cli_error(capsys, *argv):
    with pytest.raises(SystemExit) as e:
        main_cli.main(['bench', *argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1
    return err


def test_bench_cli_errors_before_any_suite_runs(tmp_path, capsys, monkeypatch):
    out = tmp_path / 'out'
    if not torch.cuda.is_available():
        assert '--device cuda' in _cli_error(capsys, 'all', '--device', 'cuda', '--out', str(out))
    assert '--device' in _cli_error(capsys, 'overhead', '--device', 'nonsense', '--out', str(out))
    real = cli.importlib.util.find_spec
    monkeypatch.setattr(cli.importlib.util, 'find_spec', lambda name: None if name == 'scipy' else real(name))
    assert 'scipy' in _cli_error(capsys, 'gmm', '--out', str(out))
    monkeypatch.undo()
    assert not out.exists()
    # the repository's committed results are overwritten only with --force
    (tmp_path / 'RESULTS.md').write_text('committed')
    monkeypatch.setattr(cli, 'COMMITTED', tmp_path.resolve())
    assert '--force' in _cli_error(capsys, 'gmm', '--quick', '--out', str(tmp_path))
    assert (tmp_path / 'RESULTS.md').read_text() == 'committed'
    parser = argparse.ArgumentParser()
    cli.add_parser(parser.add_subparsers())
    assert parser.parse_args(['bench']).out == 'w2sd-bench'


def test_bench_refuses_a_file_for_a_folder_and_an_empty_folder_to_rewrite(tmp_path, capsys):
    a_file = tmp_path / 'file'
    a_file.write_text('x')
    assert f'--out {a_file}: is a file; give a folder' in _cli_error(capsys, 'gmm', '--quick', '--out', str(a_file))
    assert f'--cache {a_file}: is a file' in _cli_error(capsys, 'digits', '--quick', '--out', str(tmp_path / 'o'),
                                                        '--cache', str(a_file))
    empty = tmp_path / 'empty'
    empty.mkdir()
    assert '--from-json' in _cli_error(capsys, 'all', '--from-json', '--out', str(empty))
    assert list(empty.iterdir()) == [] and not (tmp_path / 'o').exists()


def test_overhead_counts_unet_passes_and_lora_bytes():
    from w2sd_samplers.bench import overhead
    T, lam = 4, 3
    plain, w2sd = overhead.unet_passes('tiny', T, lam)
    assert plain == 2 * T                  # CFG: uncond + cond per step
    assert w2sd == 2 * T + 2 * lam         # reflection legs at CFG 1: one pass each
    base, lora = overhead.lora_memory('tiny', rank=4)
    unet = overhead.build_unet('tiny')
    assert base == sum(p.numel() * 4 for p in unet.parameters())
    targets = [m for name, m in unet.named_modules()
               if any(name.endswith('.' + t) for t in overhead.LORA_TARGETS) and isinstance(m, torch.nn.Linear)]
    assert targets and lora == sum(4 * (m.in_features + m.out_features) * 4 for m in targets)
    rows = overhead.time_per_nfe('tiny', steps=3, samplers=['euler'], progress=False)
    assert rows[0][:2] == ('euler', 3 + 2 * 2) and rows[0][3] > 0


def test_overhead_runs_sdxl_style_conditioning():
    from w2sd_samplers.bench import overhead
    assert overhead.unet_passes('tiny-xl', 3, 2) == (6, 6 + 2 * 2)
    rows = overhead.time_per_nfe('tiny-xl', steps=2, samplers=['dpmpp_2m'], progress=False)
    assert rows[0][:2] == ('dpmpp_2m', 2 + 2)


def test_overhead_counts_launches_and_rows_of_each_pair_kind_batched_and_not():
    from w2sd_samplers.bench import overhead
    T, lam = 3, 2
    rows = {(kind, form): r for kind, form, *r in overhead.pair_batching('tiny', steps=T)}
    assert {kind for kind, _ in rows} == set(overhead.PAIR_KINDS)
    for (kind, form), (n, n_b, passes, passes_b, ratio) in rows.items():
        assert n == T + 2 * lam and ratio > 0
        assert n_b == (T + lam if form == 'anchored' else n)   # the anchored legs: one forward
    # guidance legs (5.5 vs 0) share the cond/uncond branches: 2T + 2 lam passes instead of 2T + 3 lam
    assert rows['guidance', 'anchored'][2:4] == [2 * T + 3 * lam, 2 * (T + lam)]
    assert rows['lora', 'anchored'][2:4] == [2 * T + 2 * lam] * 2  # CFG-1 legs: as many passes, fewer launches
