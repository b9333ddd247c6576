"""The methods compared, as a registry: name -> function ``(pair, sampler, x, sigmas, **params) -> samples``.

Every method samples from the same initial noise ``x`` (paired seeds) with a k-diffusion sampler of the given
name. NFE is not declared here: the harness counts the calls of the pair's denoisers.
"""
import k_diffusion.sampling as K

from .. import guidance, pairs
from ..sampling import SAMPLERS
from ..tuning import reflected


class Pair:
    """A named (strong, weak) pair of denoisers on data of ``shape``; ``ideal`` (optional) is the exact target;
    ``kind`` names the situation for the verdict table (aligned, opposite, missing mode, ...).

    ``group`` names the pair across retrained models (``model`` is the training seed; a verdict row holds for a
    group only if it holds for every model); ``cells`` (optional) overrides the suite's (sampler, T) cells.
    """

    def __init__(self, name, strong, weak, shape, ideal=None, note='', kind='', group=None, model=0, cells=None):
        self.name, self.strong, self.weak, self.shape, self.ideal, self.note = name, strong, weak, shape, ideal, note
        self.kind, self.group, self.model, self.cells = kind, group or name, model, cells

    def with_denoisers(self, strong, weak, ideal):
        return Pair(self.name, strong, weak, self.shape, ideal, self.note, self.kind, self.group, self.model,
                    self.cells)


def _plain(denoiser):
    def run(pair, sampler, x, sigmas):
        return getattr(K, f'sample_{sampler}')(denoiser(pair), x, sigmas, disable=True)
    return run


def _w2sd(self_reflection=False):
    def run(pair, sampler, x, sigmas, *, lam_frac, strength, form='paper', weak_sigma='current'):
        weak = pair.strong if self_reflection else pair.weak
        return SAMPLERS[sampler](pair.strong, x, sigmas, disable=True, weak=weak, strength=strength, form=form,
                                 weak_sigma=weak_sigma, lam=reflected(len(sigmas) - 1, lam_frac))
    return run


def _autoguidance(pair, sampler, x, sigmas, *, w, window=None):
    guided = guidance.difference_guidance(pairs.weights(pair.strong, pair.weak), w, sigma_window=window)
    return getattr(K, f'sample_{sampler}')(guided, x, sigmas, disable=True)


def _resampling(pair, sampler, x, sigmas, *, lam_frac):
    return guidance.sample_resampling(pair.strong, x, sigmas, disable=True,
                                      lam=reflected(len(sigmas) - 1, lam_frac))


def _restart(pair, sampler, x, sigmas, *, lo, hi, k, steps=3):
    return guidance.sample_restart(pair.strong, x, sigmas, disable=True, sigma_lo=lo, sigma_hi=hi, restart_k=k,
                                   restart_steps=steps)


METHODS = {
    'strong': _plain(lambda p: p.strong),
    'weak': _plain(lambda p: p.weak),
    'ideal': _plain(lambda p: p.ideal),
    'w2sd': _w2sd(),
    'self-reflection': _w2sd(self_reflection=True),
    'autoguidance': _autoguidance,
    're-sampling': _resampling,     # Euler-based whatever the sampler (W2SD paper Algorithm 2)
    'restart': _restart,            # Heun-based whatever the sampler (Xu et al. 2023)
}
OWN_SAMPLER = {'re-sampling': 'euler', 'restart': 'heun'}

# The tuning grids of protocol v3 (benchmarks/README.md), in their written order (the order breaks ties).
# W2SD variants: fixed options and the (lam_frac, strength) candidates; 'paper' is the paper's own setting.
LAM_FRACS = (0.3, 0.6, 1.)
STRENGTHS = (0.1, 0.25, 0.5, 1., 2.)
W2SD_GRID = tuple((f, st) for f in LAM_FRACS for st in STRENGTHS)
W2SD_VARIANTS = {
    'paper': (dict(form='paper', weak_sigma='current'), ((1., 1.),)),
    'next': (dict(form='paper', weak_sigma='next'), None),
    'anchored': (dict(form='anchored', weak_sigma='current'), None),
}
AUTOGUIDANCE_WS = (0.05, 0.1, 0.25, 0.5, 1., 2., 4., 8.)
# guidance intervals (Kynkaanniemi et al. 2024): the difference only for lo <= sigma <= hi; (0.28, 5.42) is theirs
AUTOGUIDANCE_WINDOWS = ((0.28, 5.42), (1., 80.), (0.002, 1.))
RESAMPLING_FRACS = (0.1, 0.2, 0.3, 0.5, 0.7, 1.)
RESTARTS = tuple(dict(lo=lo, hi=hi, k=k) for lo, hi in ((0.3, 2.), (1., 5.), (2., 10.), (0.5, 10.)) for k in (1, 2, 4))


def edges(method, params, grids):
    """The tuned values of a setting that sit at an end of their grid that the grid could extend past (lambda =
    T - 1, one restart and the budget's step count are natural ends, not marked). ``grids`` holds the suite's
    ``w2sd_grid``, ``ag_ws``, ``resampling_fracs`` and ``restarts``."""
    out = []
    if method in ('w2sd', 'self-reflection') and (params['form'], params['weak_sigma']) != ('paper', 'current'):
        fracs, strengths = sorted({f for f, _ in grids.w2sd_grid}), sorted({st for _, st in grids.w2sd_grid})
        out += [f'strength {params["strength"]:g}'] if params['strength'] in (strengths[0], strengths[-1]) else []
        out += [f'λ fraction {params["lam_frac"]:g}'] if params['lam_frac'] == fracs[0] < 1 else []
    if method == 'autoguidance' and params['w'] in (min(grids.ag_ws), max(grids.ag_ws)):
        out.append(f'w {params["w"]:g}')
    if method == 're-sampling' and params['lam_frac'] == min(grids.resampling_fracs) < 1:
        out.append(f'λ fraction {params["lam_frac"]:g}')
    if method == 'restart' and params['k'] == max(r['k'] for r in grids.restarts) > 1:
        out.append(f'k {params["k"]}')
    return out
