"""Tune on some seeds, report on others, at matched NFE.

For one pair, sampler and step count T the harness evaluates, on the evaluation seeds:
strong, weak and (when known) ideal at T steps; each W2SD variant with its (lambda, strength) tuned on the tuning
seeds; the self-reflection control (the same settings with weak := strong); strong alone at the W2SD run's NFE;
autoguidance with its weight tuned at NFE // 2 steps (2 calls per step). All runs of a seed share the initial noise
and the reference samples, so comparisons are paired.
"""
import dataclasses

import k_diffusion.sampling as K
import torch

from ..nfe import CallCounter
from .methods import AUTOGUIDANCE_WS, METHODS, W2SD_VARIANTS


@dataclasses.dataclass
class Suite:
    """What a quality suite varies and measures.

    ``metric(pair, samples, seed) -> dict`` scores samples against reference data drawn for ``seed``; ``primary``
    names the key compared (lower is better).
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
    sigma_min: float = 0.002
    sigma_max: float = 80.
    variants: tuple = tuple(W2SD_VARIANTS)


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

    def sample(self, pair, sampler, method, steps, params, seed, n):
        """Samples and the counted NFE of one run."""
        counter = CallCounter()
        counted = pair.with_denoisers(counter.wrap(pair.strong, 'strong'), counter.wrap(pair.weak, 'weak'),
                                      None if pair.ideal is None else counter.wrap(pair.ideal, 'ideal'))
        sigmas = K.get_sigmas_karras(steps, self.suite.sigma_min, self.suite.sigma_max)
        x = torch.randn(n, *pair.shape, generator=torch.Generator().manual_seed(seed)) * sigmas[0]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 1_000_003)    # ancestral noise: paired across methods, caller's RNG untouched
            samples = METHODS[method](counted, sampler, x, sigmas, **params)
        return samples, counter.total

    def score(self, pair, sampler, method, steps, params, seed, n):
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

    def compare(self, pair, sampler, steps):
        """Results for one pair, sampler and T: {'strong': ..., 'variants': {name: {...}}}."""
        s = self.suite
        out = {m: self.evaluate(pair, sampler, m, steps, {}) for m in ('strong', 'weak')}
        if pair.ideal is not None:
            out['ideal'] = self.evaluate(pair, sampler, 'ideal', steps, {})
        out['variants'] = {}
        for name in s.variants:
            fixed, grid = W2SD_VARIANTS[name]
            candidates = [dict(fixed, lam_frac=f, strength=st) for f, st in (grid or s.grid)]
            best = min(candidates, key=lambda p: self.tune_score(pair, sampler, 'w2sd', steps, p))
            w2sd = self.evaluate(pair, sampler, 'w2sd', steps, best)
            ag_steps = max(w2sd.nfe // 2, 1)
            w = min(s.ag_ws, key=lambda w: self.tune_score(pair, sampler, 'autoguidance', ag_steps, {'w': w}))
            out['variants'][name] = {
                'w2sd': w2sd,
                'self': self.evaluate(pair, sampler, 'self-reflection', steps, best),
                'strong_nfe': self.evaluate(pair, sampler, 'strong', w2sd.nfe, {}),
                'ag': self.evaluate(pair, sampler, 'autoguidance', ag_steps, {'w': w}),
            }
        return out
