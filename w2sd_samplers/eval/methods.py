"""The compared methods on one pipeline pair, each run at a :class:`Setting` (step count and parameters).

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
    'plain-nfe': None,          # plain sampling at the largest (or, with --tune, the best) step count in the budget
    'w2sd-paper': dict(form='paper', weak_sigma='current'),
    'w2sd-next': dict(form='paper', weak_sigma='next'),
    'w2sd-anchored': dict(form='anchored', weak_sigma='current'),
    'autoguidance': None,       # difference guidance D_main + w (D_strong - D_weak) on every step
    'autoguidance-interval': None,  # the same, on a sigma window only (a guidance interval)
    'z-sampling': None,         # W2SD-paper on the CFG pair's roles (CFG pairs only)
}
W2SD = tuple(m for m, form in METHODS.items() if form is not None)
GUIDANCE = ('autoguidance', 'autoguidance-interval')


@dataclasses.dataclass(frozen=True)
class Setting:
    """One method at one step count: ``params`` are ``lam_frac``, ``strength`` and optionally ``window`` for W2SD
    and Z-Sampling, ``w`` and optionally ``window`` for autoguidance, nothing for plain sampling."""
    method: str
    steps: int
    params: tuple = ()          # sorted (name, value) pairs: hashable and JSON-friendly through dict()

    @classmethod
    def of(cls, method, steps, **params):
        return cls(method, steps, tuple(sorted((k, tuple(v) if isinstance(v, list) else v)
                                               for k, v in params.items())))

    @property
    def options(self):
        return dict(self.params)

    def label(self):
        """'w2sd-anchored T=17 lam_frac=0.6 strength=0.5' (the tuning rows' method name)."""
        text = ' '.join(f'{k}={_text(v)}' for k, v in self.params)
        return f'{self.method} T={self.steps}' + (f' {text}' if text else '')


def _text(value):
    return '-'.join(f'{v:g}' for v in value) if isinstance(value, tuple) else f'{value:g}'


def roles_for(method, pair):
    """The roles ``method`` samples with: the pair's, or for Z-Sampling its CFG-pair roles."""
    if method != 'z-sampling':
        return pair.roles
    main, weak = pair.roles.extra_args, pair.roles.leg('weak')[1]
    return guidance.z_sampling(pair.den, main['cond'], main['uncond'], scale=main['cond_scale'],
                               weak_scale=weak['cond_scale'])


def run(method, roles, x, sigmas, sampler, params):
    """``method``'s samples from ``x`` on ``sigmas`` with ``roles``, a k-diffusion ``sampler`` and ``params``
    (:class:`Setting`'s)."""
    if method.startswith('plain') or method in GUIDANCE:
        model = roles.main if method.startswith('plain') else guidance.difference_guidance(
            roles, params['w'], sigma_window=params.get('window'))
        return getattr(_kdiff.sampling(), f'sample_{sampler}')(model, x, sigmas, extra_args=roles.extra_args,
                                                               disable=True)
    w2sd = dict(METHODS.get(method) or {}, strength=params['strength'])
    if params.get('window') is not None:
        w2sd['sigma_window'] = params['window']
    else:
        w2sd['lam'] = reflected(len(sigmas) - 1, params['lam_frac'])
    return SAMPLERS[sampler](roles.main, x, sigmas, extra_args=roles.extra_args, disable=True, **roles.w2sd(**w2sd))


def counted(roles, counter, denoiser=None):
    """``roles`` with each role's calls counted under its name (and, for a dry run, replaced by ``denoiser``)."""
    def wrap(d, role):
        return None if d is None else counter.wrap(denoiser or d, role)
    return dataclasses.replace(roles, main=wrap(roles.main, 'main'), strong=wrap(roles.strong, 'strong'),
                               weak=wrap(roles.weak, 'weak'))


def dry_nfe(method, roles, sigmas, sampler, params):
    """Denoiser calls per role of ``method`` on ``sigmas``, counted on a stand-in denoiser (no model runs)."""
    counter = CallCounter()
    run(method, counted(roles, counter, stand_in), sigmas.new_zeros([1, 1]), sigmas, sampler, params)
    return counter.counts


def choose_steps(method, roles, sigmas_of, budget, sampler, params):
    """The largest step count whose counted NFE is <= ``budget`` (:func:`~w2sd_samplers.tuning.largest_steps`),
    or None when even that count leaves the weak leg unused (a 'W2SD' or guidance run that would be plain
    sampling)."""
    def nfe(steps):
        return sum(dry_nfe(method, roles, sigmas_of(steps), sampler, params).values())
    # one call per step at least: more than `budget` steps never fit
    steps = largest_steps(nfe, budget, range(1, budget + 1))
    if steps is None or (not method.startswith('plain')
                         and not dry_nfe(method, roles, sigmas_of(steps), sampler, params)['weak']):
        return None
    return steps
