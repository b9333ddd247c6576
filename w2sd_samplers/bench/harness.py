"""Tune on some seeds, report on others, with every family at an NFE no larger than the paper's W2SD setting.

For one pair, sampler and step count T the harness runs protocol v3 (benchmarks/README.md): at the budget of the
paper's setting (NFE 3T - 2), every family's candidates that fit are scored on the tuning seeds and the best one
(``tuning.select``: ties to the earliest candidate in the written order) is evaluated on the evaluation seeds:

- ``strong``: strong alone at the best step count (the ladder, T and the budget itself);
- ``ag``: autoguidance ``D_s + w (D_s - D_w)`` on every step, w and the step count tuned;
- ``ag_interval``: the same with the difference only on a sigma window, w, the window and the step count tuned;
- ``re-sampling`` (Euler-based) and ``restart`` (Heun-based), their settings and step counts tuned;
- ``w2sd``: every W2SD variant and setting at T.

On a full pair and cell (``Suite.full``) also: strong, weak and (when known) ideal at T, each W2SD variant tuned
on its own with the self-reflection control (the same settings with weak := strong). All runs of a seed share the
initial noise and the reference samples, so comparisons are paired.
"""
import dataclasses
import math
import time

import k_diffusion.sampling as K
import torch

from .. import guidance
from ..nfe import CallCounter
from ..tuning import largest_steps, reflected, select, stand_in
from .methods import (AUTOGUIDANCE_WINDOWS, AUTOGUIDANCE_WS, METHODS, OWN_SAMPLER, RESAMPLING_FRACS, RESTARTS,
                      W2SD_GRID, W2SD_VARIANTS, edges)

# the verdict's families, in the protocol's order (which breaks ties)
FAMILIES = ('strong', 'ag', 'ag_interval', 're-sampling', 'restart', 'w2sd')
LADDER = (4, 6, 8, 10, 13, 17, 22, 28, 36, 49, 64, 73, 100, 148)


@dataclasses.dataclass
class Suite:
    """What a quality suite varies and measures.

    ``metric(pair, samples, seed) -> dict`` scores samples against reference data for ``seed`` (tuning and
    evaluation seeds are disjoint, and so must their references be); ``primary`` names the key compared (lower
    is better). A pair's cells are ``pair.cells`` or every (sampler, T) of ``samplers`` x ``steps``.
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
    w2sd_grid: tuple = W2SD_GRID    # (lam_frac, strength) candidates of the tuned W2SD variants
    ag_ws: tuple = AUTOGUIDANCE_WS
    ag_windows: tuple = AUTOGUIDANCE_WINDOWS
    resampling_fracs: tuple = RESAMPLING_FRACS
    restarts: tuple = RESTARTS
    ladder: tuple = LADDER
    sigma_min: float = 0.002
    sigma_max: float = 80.
    variants: tuple = tuple(W2SD_VARIANTS)
    families: tuple = FAMILIES
    # where the variants and controls are also run: pairs of these training seeds and groups (None: all), in
    # their first ``full_cells`` cells (None: all)
    full_models: tuple = (0,)
    full_groups: tuple = None
    full_cells: int = None

    def cells(self, pair):
        return list(pair.cells or [(sampler, t) for sampler in self.samplers for t in self.steps])

    def full(self, pair, cell):
        return (pair.model in self.full_models and (self.full_groups is None or pair.group in self.full_groups)
                and cell in self.cells(pair)[:self.full_cells])


@dataclasses.dataclass
class Result:
    method: str
    steps: int
    params: dict
    nfe: int
    values: list                    # the primary metric per evaluation seed
    means: dict                     # every metric, averaged over the evaluation seeds
    seconds: float = math.nan       # wall seconds per sample (evaluation runs, this machine)
    tune: float = math.nan          # the tuning-seed mean that selected it
    n_settings: int = 0             # how many candidates it was selected from
    edges: list = dataclasses.field(default_factory=list)   # tuned values at an extendable end of their grid


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
        """(metrics, NFE, wall seconds) of one run, cached."""
        sampler = OWN_SAMPLER.get(method, sampler)
        key = (pair.name, sampler, method, steps, tuple(sorted(params.items())), seed, n)
        if key not in self._cache:
            start = time.perf_counter()
            samples, nfe = self.sample(pair, sampler, method, steps, params, seed, n)
            took = time.perf_counter() - start
            self._cache[key] = self.suite.metric(pair, samples, seed), nfe, took
        return self._cache[key]

    def tune_score(self, pair, sampler, method, steps, params):
        s = self.suite
        return sum(self.score(pair, sampler, method, steps, params, seed, s.n_tune)[0][s.primary]
                   for seed in s.tune_seeds) / len(s.tune_seeds)

    def evaluate(self, pair, sampler, method, steps, params):
        s = self.suite
        runs = [self.score(pair, sampler, method, steps, params, seed, s.n_eval) for seed in s.eval_seeds]
        means = {k: sum(m[k] for m, _, _ in runs) / len(runs) for k in runs[0][0]}
        return Result(method, steps, params, runs[0][1], [m[s.primary] for m, _, _ in runs], means,
                      seconds=sum(t for _, _, t in runs) / (len(runs) * s.n_eval))

    def tuned(self, pair, sampler, candidates, budget=None):
        """The candidate ``(method, steps, params)`` picked on the tuning seeds by ``tuning.select``, evaluated;
        its counted NFE is checked against ``budget``."""
        method, steps, params = select(candidates, lambda c: self.tune_score(pair, sampler, *c))
        res = self.evaluate(pair, sampler, method, steps, params)
        if budget is not None and res.nfe > budget:
            raise AssertionError(f'{res.method} used {res.nfe} NFE, over the budget {budget}')
        res.tune, res.n_settings = self.tune_score(pair, sampler, method, steps, params), len(candidates)
        res.edges = edges(method, params, self.suite)
        if method == 'strong' and steps == min(self.suite.ladder):
            res.edges.append(f'{steps} steps')
        return res

    def nfe(self, pair, sampler, method, steps, params):
        """The NFE of one run, counted on stand-in denoisers (no model runs)."""
        stand_ins = pair.with_denoisers(stand_in, stand_in, None)
        return self.sample(stand_ins, OWN_SAMPLER.get(method, sampler), method, steps, params, 0, 1)[1]

    def candidates(self, pair, sampler, family, budget, steps):
        """``(method, steps, params)`` candidates of a family with NFE <= budget, in the protocol's order: each
        baseline setting at the largest ladder step count that fits (:func:`~w2sd_samplers.tuning.largest_steps`)
        and at T."""
        s = self.suite
        ladder = [n for n in s.ladder if n >= 2]

        def counts(method, params):
            def nfe(n):
                if method == 'restart':
                    try:
                        guidance.restart_plan(self.sigmas(n), sigma_lo=params['lo'], sigma_hi=params['hi'],
                                              restart_k=params['k'])
                    except ValueError:          # sigma_lo snapped to a level at or above sigma_hi
                        return None
                return self.nfe(pair, sampler, method, n, params)
            return sorted({largest_steps(nfe, budget, ladder), largest_steps(nfe, budget, [steps])} - {None})
        if family == 'strong':
            return [('strong', n, {}) for n in sorted({*s.ladder, steps, budget}) if n <= budget]
        if family == 'w2sd':
            return [c for name in s.variants for c in self.w2sd_candidates(name, steps)]
        if family == 'ag':              # w does not change the NFE
            return [('autoguidance', n, {'w': w}) for n in counts('autoguidance', {'w': 1.}) for w in s.ag_ws]
        if family == 'ag_interval':
            return [('autoguidance', n, {'w': w, 'window': window}) for window in s.ag_windows
                    for n in counts('autoguidance', {'w': 1., 'window': window}) for w in s.ag_ws]
        if family == 're-sampling':
            return [('re-sampling', n, {'lam_frac': f}) for f in s.resampling_fracs
                    for n in counts('re-sampling', {'lam_frac': f})]
        if family == 'restart':
            return [('restart', n, r) for r in s.restarts for n in counts('restart', r)]
        raise ValueError(f'unknown family {family!r}')

    def w2sd_candidates(self, name, steps):
        fixed, grid = W2SD_VARIANTS[name]
        return [('w2sd', steps, dict(fixed, lam_frac=f, strength=st)) for f, st in (grid or self.suite.w2sd_grid)]

    def compare(self, pair, sampler, steps):
        """Results for one pair, sampler and T: {'budget', 'best'} and where ``Suite.full`` also 'strong', 'weak',
        ['ideal'] and 'variants' (each W2SD variant tuned on its own, with its self-reflection control)."""
        s = self.suite
        budget = steps + 2 * reflected(steps, 1.)
        out = {'budget': budget, 'best': {}}
        for family in s.families:            # a family may not fit a small budget: then it is left out
            cands = self.candidates(pair, sampler, family, budget, steps)
            if cands:
                out['best'][family] = self.tuned(pair, sampler, cands, budget)
        if s.full(pair, (sampler, steps)):
            out['strong'] = self.evaluate(pair, sampler, 'strong', steps, {})
            out['weak'] = self.evaluate(pair, sampler, 'weak', steps, {})
            if pair.ideal is not None:
                out['ideal'] = self.evaluate(pair, sampler, 'ideal', steps, {})
            out['variants'] = {}
            for name in s.variants:
                w2sd = self.tuned(pair, sampler, self.w2sd_candidates(name, steps), budget)
                out['variants'][name] = {
                    'w2sd': w2sd, 'self': self.evaluate(pair, sampler, 'self-reflection', steps, w2sd.params)}
        return out
