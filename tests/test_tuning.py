"""w2sd_samplers.tuning: one way to find the largest step count within an NFE budget (counted on stand-in
denoisers), used by the benchmarks and by `w2sd eval`."""
import k_diffusion.sampling as K
import pytest

from w2sd_samplers import guidance, pairs, toy
from w2sd_samplers.bench import gmm, harness
from w2sd_samplers.eval import methods as M
from w2sd_samplers.tuning import largest_steps, reflected, select


def test_largest_steps_counts_every_candidate():
    nfe = {2: 4, 3: 9, 4: 7, 5: None, 6: 12}.get          # not monotone; 5 cannot run
    assert largest_steps(nfe, 8, [2, 3, 4, 5, 6]) == 4
    assert largest_steps(nfe, 12, [6, 5, 4, 3, 2]) == 6
    assert largest_steps(nfe, 3, [2, 3, 4]) is None


def test_select_breaks_ties_by_candidate_order():
    assert select(['a', 'b', 'c'], {'a': 2., 'b': 1., 'c': 1.}.get) == 'b'
    assert select(['c', 'b', 'a'], {'a': 2., 'b': 1., 'c': 1.}.get) == 'c'


def test_eval_finds_the_largest_count_when_a_sigma_window_makes_nfe_jump():
    # Euler W2SD reflecting the steps with 1 <= sigma <= 10 of a Karras schedule: 8 steps put 3 sigmas in the
    # window (14 calls), 9 steps only 2 (13 calls). A bisection over the step count stopped at 7.
    roles = pairs.weights(toy.four_modes([.1, .3, .3, .3]), toy.four_modes([0., 1., 1., 1.]))
    params = dict(window=(1., 10.), strength=1.)

    def sigmas(n):
        return K.get_sigmas_karras(n, 0.01, 40.)
    for n in range(2, 20):                 # the closed form: one call per step, two (the legs) per reflected step
        inside = int(((sigmas(n)[:-1] >= 1) & (sigmas(n)[:-1] <= 10)).sum())
        assert sum(M.dry_nfe('w2sd-paper', roles, sigmas(n), 'euler', params).values()) == n + 2 * inside
    assert M.choose_steps('w2sd-paper', roles, sigmas, 13, 'euler', params) == 9
    assert M.choose_steps('w2sd-paper', roles, sigmas, 12, 'euler', params) == 7


@pytest.mark.parametrize('sampler', ['euler', 'dpmpp_2m'])
def test_bench_candidates_are_the_largest_ladder_counts_whose_closed_form_nfe_fits(sampler):
    suite = harness.Suite('t', gmm.cases()[:1], gmm.metric, 'energy', (sampler,), (10,), [0], [1, 2], 10, 10,
                          [(1., 1.)], ladder=tuple(range(2, 40)))
    runner, pair = harness.Runner(suite), suite.pairs[0]

    def window_nfe(window):
        lo, hi = window
        return lambda n: n + sum(lo <= float(s) <= hi for s in runner.sigmas(n)[:-1])

    def restart_nfe(r):
        def nfe(n):
            try:
                plan = guidance.restart_plan(runner.sigmas(n), sigma_lo=r['lo'], sigma_hi=r['hi'], restart_k=r['k'])
            except ValueError:
                return None
            return guidance.restart_nfe(runner.sigmas(n), plan)
        return nfe
    # closed forms (k-diffusion's Euler and DPM++ 2M: one call per step)
    forms = {('autoguidance', None): lambda n: 2 * n}
    forms.update({('autoguidance', w): window_nfe(w) for w in suite.ag_windows})
    forms.update({('re-sampling', f): (lambda f: lambda n: n + reflected(n, f))(f) for f in suite.resampling_fracs})
    forms.update({('restart', tuple(r.items())): restart_nfe(r) for r in suite.restarts})
    for budget in (12, 19, 28, 40):
        for family in ('ag', 'ag_interval', 're-sampling', 'restart'):
            for method, n, params in runner.candidates(pair, sampler, family, budget, 10):
                key = params.get('window') if method == 'autoguidance' else params.get('lam_frac') \
                    if method == 're-sampling' else tuple(params.items())
                form = forms[method, key]
                assert runner.nfe(pair, sampler, method, n, params) == form(n)
                if n != 10:      # T itself is a candidate of every baseline family too (protocol v3)
                    fits = [m for m in suite.ladder if form(m) is not None and form(m) <= budget]
                    assert n == max(fits), (family, params, budget)
