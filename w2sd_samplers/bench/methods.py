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
    ``kind`` names the situation for the verdict table (aligned, opposite, missing mode, ...)."""

    def __init__(self, name, strong, weak, shape, ideal=None, note='', kind=''):
        self.name, self.strong, self.weak, self.shape, self.ideal, self.note = name, strong, weak, shape, ideal, note
        self.kind = kind

    def with_denoisers(self, strong, weak, ideal):
        return Pair(self.name, strong, weak, self.shape, ideal, self.note, self.kind)


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

# W2SD variants: fixed options and the tuning grid of (lam_frac, strength). 'paper' is the paper's own setting.
W2SD_VARIANTS = {
    'paper': (dict(form='paper', weak_sigma='current'), [(1.0, 1.0)]),
    'paper-tuned': (dict(form='paper', weak_sigma='current'), None),
    'next': (dict(form='paper', weak_sigma='next'), None),
    'anchored': (dict(form='anchored', weak_sigma='current'), None),
}
AUTOGUIDANCE_WS = (0.05, 0.1, 0.25, 0.5, 1., 2.)
# guidance intervals (Kynkaanniemi et al. 2024): the difference only for lo <= sigma <= hi; (0.28, 5.42) is theirs
AUTOGUIDANCE_WINDOWS = ((0.28, 5.42), (1., 80.), (0.002, 1.))
RESAMPLING_FRACS = (0.3, 0.6, 1.)
RESTARTS = (dict(lo=0.3, hi=2., k=2), dict(lo=1., hi=5., k=2), dict(lo=2., hi=10., k=1))
