"""Tune on some seeds, report on others, with every baseline at an NFE no larger than the method's.

For one pair, sampler and step count T the harness evaluates, on the evaluation seeds: strong, weak and (when
known) ideal at T steps; each W2SD variant with its (lambda, strength) tuned on the tuning seeds, and the
self-reflection control (the same settings with weak := strong). Each W2SD run's NFE is a budget for the
baseline families, each tuned on the tuning seeds over its candidates whose NFE fits the budget:

- ``strong``: strong alone at the best step count (the ladder, T and the budget itself);
- ``ag``: autoguidance ``D_s + w (D_s - D_w)`` on every step, w and the step count tuned;
- ``ag_interval``: the same with the difference only on a sigma window, w and the window tuned;
- ``re-sampling`` (Euler-based) and ``restart`` (Heun-based), their settings tuned.

``best`` holds every family, and W2SD over all variants, tuned at the paper setting's NFE (3T - 2): the verdict.
All runs of a seed share the initial noise and the reference samples, so comparisons are paired.
"""
import dataclasses

import k_diffusion.sampling as K
import torch

from .. import guidance
from ..nfe import CallCounter
from ..tuning import largest_steps, reflected, select, stand_in
from .methods import (AUTOGUIDANCE_WINDOWS, AUTOGUIDANCE_WS, METHODS, OWN_SAMPLER, RESAMPLING_FRACS, RESTARTS,
                      W2SD_VARIANTS)

FAMILIES = ('strong', 'ag', 'ag_interval', 're-sampling', 'restart')
LADDER = (4, 6, 8, 10, 13, 17, 22, 28, 36, 49, 64, 73, 100, 148)


@dataclasses.dataclass
class Suite:
    """What a quality suite varies and measures.

    ``metric(pair, samples, seed) -> dict`` scores samples against reference data for ``seed`` (tuning and
    evaluation seeds are disjoint, and so must their references be); ``primary`` names the key compared (lower
    is better).
    """
    name: str
    pairs: list
    metric: object
    primary: str
    samplers: tuple
    steps: tuple
    tune_seeds: list
    eval_seeds: list
    n_tune: int
    n_eval: int
    grid: list                      # (lam_frac, strength) candidates for the tuned W2SD variants
    ag_ws: tuple = AUTOGUIDANCE_WS
    ag_windows: tuple = AUTOGUIDANCE_WINDOWS
    resampling_fracs: tuple = RESAMPLING_FRACS
    restarts: tuple = RESTARTS
    ladder: tuple = LADDER
    sigma_min: float = 0.002
    sigma_max: float = 80.
    variants: tuple = tuple(W2SD_VARIANTS)
    families: tuple = FAMILIES


@dataclasses.dataclass
class Result:
    method: str
    steps: int
    params: dict
    nfe: int
    values: list                    # the primary metric per evaluation seed
    means: dict                     # every metric, averaged over the evaluation seeds


class Runner:
    def __init__(self, suite):
        self.suite = suite
        self._cache = {}

    def sigmas(self, steps):
        return K.get_sigmas_karras(steps, self.suite.sigma_min, self.suite.sigma_max)

    def sample(self, pair, sampler, method, steps, params, seed, n):
        """Samples and the counted NFE of one run."""
        counter = CallCounter()
        counted = pair.with_denoisers(counter.wrap(pair.strong, 'strong'), counter.wrap(pair.weak, 'weak'),
                                      None if pair.ideal is None else counter.wrap(pair.ideal, 'ideal'))
        sigmas = self.sigmas(steps)
        x = torch.randn(n, *pair.shape, generator=torch.Generator().manual_seed(seed)) * sigmas[0]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 1_000_003)    # ancestral noise: paired across methods, caller's RNG untouched
            samples = METHODS[method](counted, sampler, x, sigmas, **params)
        return samples, counter.total

    def score(self, pair, sampler, method, steps, params, seed, n):
        sampler = OWN_SAMPLER.get(method, sampler)
        key = (pair.name, sampler, method, steps, tuple(sorted(params.items())), seed, n)
        if key not in self._cache:
            samples, nfe = self.sample(pair, sampler, method, steps, params, seed, n)
            self._cache[key] = self.suite.metric(pair, samples, seed), nfe
        return self._cache[key]

    def tune_score(self, pair, sampler, method, steps, params):
        s = self.suite
        return sum(self.score(pair, sampler, method, steps, params, seed, s.n_tune)[0][s.primary]
                   for seed in s.tune_seeds) / len(s.tune_seeds)

    def evaluate(self, pair, sampler, method, steps, params):
        s = self.suite
        runs = [self.score(pair, sampler, method, steps, params, seed, s.n_eval) for seed in s.eval_seeds]
        means = {k: sum(m[k] for m, _ in runs) / len(runs) for k in runs[0][0]}
        return Result(method, steps, params, runs[0][1], [m[s.primary] for m, _ in runs], means)

    def tuned(self, pair, sampler, candidates, budget=None):
        """The candidate ``(method, steps, params)`` with the best tuning score, evaluated; its counted NFE is
        checked against ``budget``."""
        best = select(candidates, lambda c: self.tune_score(pair, sampler, *c))
        res = self.evaluate(pair, sampler, *best)
        if budget is not None and res.nfe > budget:
            raise AssertionError(f'{res.method} used {res.nfe} NFE, over the budget {budget}')
        return res

    def nfe(self, pair, sampler, method, steps, params):
        """The NFE of one run, counted on stand-in denoisers (no model runs)."""
        stand_ins = pair.with_denoisers(stand_in, stand_in, None)
        return self.sample(stand_ins, OWN_SAMPLER.get(method, sampler), method, steps, params, 0, 1)[1]

    def candidates(self, pair, sampler, family, budget, steps):
        """``(method, steps, params)`` candidates of a baseline family with NFE <= budget: each setting at the
        largest ladder step count that fits (see :func:`~w2sd_samplers.tuning.largest_steps`)."""
        s = self.suite
        ladder = [n for n in s.ladder if n >= 2]

        def fit(method, params, counts=ladder):
            return largest_steps(lambda n: self.nfe(pair, sampler, method, n, params), budget, counts)
        if family == 'strong':
            return [('strong', n, {}) for n in sorted({*s.ladder, steps, budget}) if fit('strong', {}, [n])]
        if family == 'ag':              # w does not change the NFE; T itself is a candidate too
            counts = {fit('autoguidance', {'w': 1.}), fit('autoguidance', {'w': 1.}, [steps])} - {None}
            return [('autoguidance', n, {'w': w}) for n in sorted(counts) for w in s.ag_ws]
        if family == 'ag_interval':
            out = []
            for window in s.ag_windows:
                n = fit('autoguidance', {'w': 1., 'window': window})
                out += [] if n is None else [('autoguidance', n, {'w': w, 'window': window}) for w in s.ag_ws]
            return out
        if family == 're-sampling':
            out = []
            for f in s.resampling_fracs:
                n = fit('re-sampling', {'lam_frac': f})
                out += [] if n is None else [('re-sampling', n, {'lam_frac': f})]
            return out
        if family == 'restart':
            out = []
            for r in s.restarts:
                def nfe(n):
                    try:
                        guidance.restart_plan(self.sigmas(n), sigma_lo=r['lo'], sigma_hi=r['hi'], restart_k=r['k'])
                    except ValueError:          # sigma_lo snapped to a level at or above sigma_hi
                        return None
                    return self.nfe(pair, sampler, 'restart', n, r)
                n = largest_steps(nfe, budget, ladder)
                out += [] if n is None else [('restart', n, r)]
            return out
        raise ValueError(f'unknown baseline family {family!r}')

    def baselines(self, pair, sampler, budget, steps):
        """Every baseline family tuned at NFE <= budget (families with no candidate that fits are left out)."""
        out = {}
        for family in self.suite.families:
            cands = self.candidates(pair, sampler, family, budget, steps)
            if cands:
                out[family] = self.tuned(pair, sampler, cands, budget)
        return out

    def w2sd_candidates(self, name, steps):
        fixed, grid = W2SD_VARIANTS[name]
        return [('w2sd', steps, dict(fixed, lam_frac=f, strength=st)) for f, st in (grid or self.suite.grid)]

    def compare(self, pair, sampler, steps):
        """Results for one pair, sampler and T: {'strong', 'weak', ['ideal'], 'variants', 'budget', 'best'}."""
        s = self.suite
        out = {m: self.evaluate(pair, sampler, m, steps, {}) for m in ('strong', 'weak')}
        if pair.ideal is not None:
            out['ideal'] = self.evaluate(pair, sampler, 'ideal', steps, {})
        out['variants'] = {}
        for name in s.variants:
            w2sd = self.tuned(pair, sampler, self.w2sd_candidates(name, steps))
            out['variants'][name] = {
                'w2sd': w2sd,
                'self': self.evaluate(pair, sampler, 'self-reflection', steps, w2sd.params),
                'baselines': self.baselines(pair, sampler, w2sd.nfe, steps),
            }
        budget = steps + 2 * reflected(steps, 1.)
        every = [c for name in s.variants for c in self.w2sd_candidates(name, steps)]
        out['budget'] = budget
        out['best'] = {'w2sd': self.tuned(pair, sampler, every, budget), **self.baselines(pair, sampler, budget, steps)}
        return out
