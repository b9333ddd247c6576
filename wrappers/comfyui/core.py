"""The ComfyUI side of W2SD without node classes: options, roles, noise, the KSAMPLER function.

Nothing here imports ComfyUI at module level, so it runs (and is tested) with small stand-ins.

Roles reach the guider through a per-call copy of ``extra_args["model_options"]``: the strong and weak
reflection legs call ``model(x, sigma, **extra_args)`` exactly like the main step (so ComfyUI's inpaint blending
and PREDICT_NOISE wrappers apply to them), with the same extra_args keys, whose ``model_options`` carries
``ROLE_KEY``. A :class:`W2SDGuider` reads it to pick conds and CFG; with any other guider a CFG override for
the leg is installed as a post-CFG function instead (the way ComfyUI's CFG++ samplers edit model_options).
"""
import functools
import sys

from w2sd_samplers import _kdiff
from w2sd_samplers.sampling import SAMPLERS

ROLE_KEY = 'w2sd_role'
ROLES = ('main', 'strong', 'weak')
WEAK_SIGMAS = ('current', 'next')
FORMS = ('paper', 'anchored')

SAMPLER_NAMES = list(SAMPLERS)
# Noise the way ComfyUI's own sampler of that name draws it, seeded by extra_args['seed'].
GENERATOR_NOISE = ('euler_ancestral', 'dpm_2_ancestral', 'dpmpp_2s_ancestral')
BROWNIAN_NOISE = ('dpmpp_sde', 'dpmpp_2m_sde', 'dpmpp_3m_sde')
# ComfyUI switches these to rectified-flow variants for flow (CONST) models; ours are the VE-form originals.
NOT_FOR_FLOW = GENERATOR_NOISE + BROWNIAN_NOISE


def w2sd_options(lam=-1, strength=1., weak_sigma='current', form='paper', reflections=1):
    """Node widget values -> keyword options of ``sample_w2sd_*`` (``lam=-1``: every step but the last)."""
    if isinstance(lam, bool) or not isinstance(lam, int) or lam < -1:
        raise ValueError(f'lam must be an integer >= 0, or -1 for every step but the last; got {lam!r}')
    if weak_sigma not in WEAK_SIGMAS:
        raise ValueError(f'weak_sigma must be one of {WEAK_SIGMAS}, got {weak_sigma!r}')
    if form not in FORMS:
        raise ValueError(f'form must be one of {FORMS}, got {form!r}')
    return dict(lam=None if lam == -1 else lam, strength=float(strength), weak_sigma=weak_sigma, form=form,
                reflections=reflections)


def cfg_override(cfg):
    """Post-CFG function recombining the leg's cond/uncond predictions at ``cfg``."""
    def post_cfg(args):
        cond, uncond = args['cond_denoised'], args['uncond_denoised']
        if uncond is None:
            raise ValueError('a reflection CFG was set on the W2SD sampler, but the guider computes no '
                             'unconditional prediction (BasicGuider or a model without negative): use the W2SD '
                             'Guider with weak conds, or a CFGGuider with a negative')
        return uncond + (cond - uncond) * cfg
    return post_cfg


def role_model_options(model_options, role, cfg=None):
    """A copy of ``model_options`` tagged with ``role``; ``cfg`` (not None) overrides the leg's CFG scale."""
    if role not in ROLES:
        raise ValueError(f'role must be one of {ROLES}, got {role!r}')
    options = {**model_options, ROLE_KEY: role}
    if cfg is not None:
        # A new list: the caller's sampler_post_cfg_function list stays as it was.
        options['sampler_post_cfg_function'] = [*model_options.get('sampler_post_cfg_function', []),
                                                cfg_override(cfg)]
        options['disable_cfg1_optimization'] = True
    return options


def role_extra_args(role, cfg=None):
    """``weak_extra_args``/``strong_extra_args`` function: the main extra_args with a role-tagged model_options."""
    def extra_args(main):
        return {**main, 'model_options': role_model_options(main.get('model_options', {}), role, cfg)}
    return extra_args


def noise_sampler(name, x, sigmas, seed):
    """The noise sampler ComfyUI's ``sample_<name>`` builds by default, or None for a deterministic sampler."""
    K = _kdiff.sampling()
    if name in GENERATOR_NOISE:
        return K.default_noise_sampler(x, seed=seed)
    if name in BROWNIAN_NOISE:
        sigma_min, sigma_max = sigmas[sigmas > 0].min(), sigmas.max()
        return K.BrownianTreeNoiseSampler(x, sigma_min, sigma_max, seed=seed, cpu=True)
    return None


def is_flow(model):
    """Is ``model`` (ComfyUI's KSamplerX0Inpaint -> guider -> BaseModel) a flow (CONST) model?"""
    model_sampling = sys.modules.get('comfy.model_sampling')
    if model_sampling is None:  # outside ComfyUI there are no flow models of its kind
        return False
    return isinstance(model.inner_model.inner_model.model_sampling, model_sampling.CONST)


def handles_roles(model):
    """Does the guider behind ``model`` (ComfyUI's KSamplerX0Inpaint) pick conds and CFG per role itself?"""
    return getattr(getattr(model, 'inner_model', None), 'handles_w2sd_roles', False)


def sample(name, model, x, sigmas, extra_args=None, callback=None, disable=None, *, strong_cfg=None, weak_cfg=None,
           **options):
    """KSAMPLER function: ``sample_w2sd_<name>`` with ComfyUI's noise, the roles routed through ``model``.

    With a W2SD guider the guider picks conds and CFG per role; ``strong_cfg``/``weak_cfg``, when not None,
    override the CFG of that reflection leg (with a plain CFG guider ``weak_cfg`` is required: the weak leg can
    only differ by its CFG scale; ``strong_cfg`` defaults to the main CFG).
    """
    if name not in SAMPLERS:
        raise ValueError(f'sampler_name must be one of {SAMPLER_NAMES}, got {name!r}')
    if weak_cfg is None and not handles_roles(model):
        raise ValueError('the weak reflection leg would equal the strong one: connect a W2SD Guider (weak conds '
                         'or hooks), or set cfg_source = sampler and weak_cfg on the W2SD Sampler')
    if name in NOT_FOR_FLOW and is_flow(model):
        raise ValueError(f'{name} adds noise in the VE form, which does not fit this flow model; use one of '
                         f"{[n for n in SAMPLER_NAMES if n not in NOT_FOR_FLOW]}")
    if len(sigmas) <= 1:  # nothing to do: ComfyUI's samplers return x (SplitSigmas can give one sigma)
        return x
    extra_args = {} if extra_args is None else extra_args
    ns = noise_sampler(name, x, sigmas, extra_args.get('seed'))
    if ns is not None:
        options['noise_sampler'] = ns
    return SAMPLERS[name](model, x, sigmas, extra_args=extra_args, callback=callback, disable=disable,
                          weak=model, weak_extra_args=role_extra_args('weak', weak_cfg),
                          strong=model, strong_extra_args=role_extra_args('strong', strong_cfg), **options)


def sampler_function(name):
    """``sample`` bound to a sampler name, for ``comfy.samplers.KSAMPLER(fn, extra_options=<options>)``."""
    if name not in SAMPLERS:
        raise ValueError(f'sampler_name must be one of {SAMPLER_NAMES}, got {name!r}')
    return functools.partial(sample, name)
