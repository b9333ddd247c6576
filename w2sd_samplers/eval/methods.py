"""The compared methods on one pipeline pair, each at the largest step count within the NFE budget.

No sampling math here: plain sampling is k-diffusion's, W2SD the library's samplers on the pair's
:class:`~w2sd_samplers.pairs.Roles`, autoguidance :func:`~w2sd_samplers.guidance.difference_guidance`, Z-Sampling
:func:`~w2sd_samplers.guidance.z_sampling`. NFE is counted by wrapping the role denoisers
(:class:`~w2sd_samplers.nfe.CallCounter`; one call = one batched CFG forward), also to choose the step count.
"""
import dataclasses

from .. import _kdiff, guidance
from ..nfe import CallCounter
from ..sampling import SAMPLERS
from ..tuning import largest_steps, reflected, stand_in

# name -> W2SD form options; None: not a W2SD run
METHODS = {
    'plain': None,              # plain sampling at --steps (the run you have today; NFE not matched)
    'plain-nfe': None,          # plain sampling at the largest step count within the budget
    'w2sd-paper': dict(form='paper', weak_sigma='current'),
    'w2sd-next': dict(form='paper', weak_sigma='next'),
    'w2sd-anchored': dict(form='anchored', weak_sigma='current'),
    'autoguidance': None,       # difference guidance D_main + w (D_strong - D_weak), with a sigma window
    'z-sampling': None,         # W2SD on the CFG pair with Z-Sampling's settings (CFG pairs only)
}


@dataclasses.dataclass(frozen=True)
class Options:
    sampler: str = 'euler'
    lam_frac: float = 1.            # reflected share of the T - 1 reflectable steps (1 = the paper's lambda)
    strength: float = 1.
    window: tuple = None            # W2SD sigma window (lo, hi), instead of lam_frac
    ag_w: float = 1.
    ag_window: tuple = None


def roles_for(method, pair):
    """The roles ``method`` samples with: the pair's, or for Z-Sampling its CFG-pair roles."""
    if method != 'z-sampling':
        return pair.roles
    main, weak = pair.roles.extra_args, pair.roles.leg('weak')[1]
    return guidance.z_sampling(pair.den, main['cond'], main['uncond'], scale=main['cond_scale'],
                               weak_scale=weak['cond_scale'])


def run(method, roles, x, sigmas, o):
    """``method``'s samples from ``x`` on ``sigmas`` with ``roles``."""
    K = _kdiff.sampling()
    plain = getattr(K, f'sample_{o.sampler}')
    if METHODS[method] is None and method != 'z-sampling':
        model = roles.main if method.startswith('plain') else guidance.difference_guidance(
            roles, o.ag_w, sigma_window=o.ag_window)
        return plain(model, x, sigmas, extra_args=roles.extra_args, disable=True)
    if method == 'z-sampling':
        w2sd = {}                   # Z-Sampling's own setting: every step but the last, strength 1
    elif o.window is not None:
        w2sd = dict(METHODS[method], strength=o.strength, sigma_window=o.window)
    else:
        w2sd = dict(METHODS[method], strength=o.strength, lam=reflected(len(sigmas) - 1, o.lam_frac))
    return SAMPLERS[o.sampler](roles.main, x, sigmas, extra_args=roles.extra_args, disable=True, **roles.w2sd(**w2sd))


def counted(roles, counter, denoiser=None):
    """``roles`` with each role's calls counted under its name (and, for a dry run, replaced by ``denoiser``)."""
    def wrap(d, role):
        return None if d is None else counter.wrap(denoiser or d, role)
    return dataclasses.replace(roles, main=wrap(roles.main, 'main'), strong=wrap(roles.strong, 'strong'),
                               weak=wrap(roles.weak, 'weak'))


def dry_nfe(method, roles, sigmas, o):
    """Denoiser calls per role of ``method`` on ``sigmas``, counted on a stand-in denoiser (no model runs)."""
    counter = CallCounter()
    run(method, counted(roles, counter, stand_in), sigmas.new_zeros([1, 1]), sigmas, o)
    return counter.counts


def choose_steps(method, roles, sigmas_of, budget, o):
    """The largest step count whose counted NFE is <= ``budget`` (:func:`~w2sd_samplers.tuning.largest_steps`),
    or None when even that count leaves the weak leg unused (a 'W2SD' or guidance run that would be plain
    sampling)."""
    def nfe(steps):
        return sum(dry_nfe(method, roles, sigmas_of(steps), o).values())
    # one call per step at least: more than `budget` steps never fit
    steps = largest_steps(nfe, budget, range(1, budget + 1))
    if steps is None or (not method.startswith('plain') and not dry_nfe(method, roles, sigmas_of(steps), o)['weak']):
        return None
    return steps
