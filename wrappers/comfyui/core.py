"""The ComfyUI side of W2SD without node classes: sampler list, options, roles, noise, the KSAMPLER function.

Nothing here imports ComfyUI at module level, so it runs (and is tested) with small stand-ins.

Roles reach the guider through a per-call copy of ``extra_args["model_options"]``: the strong and weak
reflection legs call ``model(x, sigma, **extra_args)`` exactly like the main step (so ComfyUI's inpaint blending
and PREDICT_NOISE wrappers apply to them), with the same extra_args keys, whose ``model_options`` carries
``ROLE_KEY``. A :class:`W2SDGuider` reads it to pick conds and CFG; a CFG override for a leg is installed as a
post-CFG function instead (the way ComfyUI's CFG++ samplers edit model_options).
"""
import functools
import inspect
import sys

from w2sd_samplers import _kdiff
from w2sd_samplers import sampling
from w2sd_samplers.reflect import finite_number
from w2sd_samplers.sampling import with_reflection

ROLE_KEY = 'w2sd_role'
ROLES = ('main', 'strong', 'weak')
WEAK_SIGMAS = ('current', 'next')
FORMS = ('paper', 'anchored')
CFG_SOURCES = ('auto', 'sampler', 'guider')
# The numeric widgets' ranges (the nodes build their widgets from these): ComfyUI checks a widget value against
# them, but lets NaN through and never checks a value that arrives over a link, so ``check_number`` does too.
RANGES = {
    'cfg': (0., 100.),  # the stock KSampler's
    'strong_cfg': (0., 100.),
    'weak_cfg': (0., 100.),
    'denoise': (0., 1.),
    'lam': (-1, 10000),
    'strength': (-10., 10.),
    'reflections': (1, 10),
}

# ComfyUI samplers whose step i reads nothing but x, sigmas[i] and sigmas[i+1] (and noise): ComfyUI's own
# sample_<value> runs them, one step at a time, with a reflection before each reflected step (with_reflection).
HOST_STEPS = {name: name for name in (
    'euler', 'euler_cfg_pp', 'euler_ancestral', 'euler_ancestral_cfg_pp', 'heun', 'exp_heun_2_x0',
    'exp_heun_2_x0_sde', 'dpm_2', 'dpm_2_ancestral', 'dpmpp_2s_ancestral', 'dpmpp_2s_ancestral_cfg_pp',
    'dpmpp_sde', 'dpmpp_sde_gpu', 'ddpm', 'lcm', 'seeds_2', 'seeds_3')}
HOST_STEPS['ddim'] = 'euler'  # ComfyUI's ddim is its euler with random inpaint noise
# Multistep samplers: the library's twins (sample_w2sd_<twin>, options) carry the history across reflections.
TWINS = {
    'lms': ('lms', {}),
    'dpmpp_2m': ('dpmpp_2m', {}),
    'dpmpp_2m_sde': ('dpmpp_2m_sde', {}),
    'dpmpp_2m_sde_gpu': ('dpmpp_2m_sde', {}),
    'dpmpp_2m_sde_heun': ('dpmpp_2m_sde', {'solver_type': 'heun'}),
    'dpmpp_2m_sde_heun_gpu': ('dpmpp_2m_sde', {'solver_type': 'heun'}),
    'dpmpp_3m_sde': ('dpmpp_3m_sde', {}),
    'dpmpp_3m_sde_gpu': ('dpmpp_3m_sde', {}),
    'heunpp2': ('heunpp2', {}),  # reads sigmas[i + 2] and the schedule's ends: a twin, not a step at a time
    'ipndm': ('ipndm', {}),
    'ipndm_v': ('ipndm_v', {}),
    'deis': ('deis', {}),
    'res_multistep': ('res_multistep', {}),
    'res_multistep_ancestral': ('res_multistep', {'eta': 1.}),
}
# ComfyUI's lms returns the denoised estimate at its step into sigma 0, where k-diffusion's (the twin's) takes
# one more LMS step: the twin runs to the last sigma > 0 and the pack denoises there (denoising_last_step).
DENOISE_LAST = ('lms',)
# Twins written in ComfyUI's operation order: off is ComfyUI's sampler bit for bit (the SDE twins differ by
# rounding: ComfyUI writes them in a half-log-SNR form).
BIT_EXACT_TWINS = ('lms', 'dpmpp_2m', 'heunpp2', 'ipndm', 'ipndm_v', 'deis', 'res_multistep',
                   'res_multistep_ancestral')
_HISTORY = 'multistep: its history must carry across reflections and the library has no W2SD twin of it yet'
REFUSED = {
    'dpm_fast': 'it makes its own schedule from sigma_min and sigma_max',
    'dpm_adaptive': 'it chooses its own step sizes',
    **{name: _HISTORY for name in (
        'dpmpp_2m_cfg_pp', 'res_multistep_cfg_pp', 'res_multistep_ancestral_cfg_pp', 'gradient_estimation',
        'gradient_estimation_cfg_pp', 'er_sde', 'sa_solver', 'sa_solver_pece', 'uni_pc', 'uni_pc_bh2')},
}
# In the order of ComfyUI's own sampler list.
SAMPLER_NAMES = [
    'euler', 'euler_cfg_pp', 'euler_ancestral', 'euler_ancestral_cfg_pp', 'heun', 'heunpp2', 'exp_heun_2_x0',
    'exp_heun_2_x0_sde', 'dpm_2', 'dpm_2_ancestral', 'lms', 'dpmpp_2s_ancestral', 'dpmpp_2s_ancestral_cfg_pp',
    'dpmpp_sde', 'dpmpp_sde_gpu', 'dpmpp_2m', 'dpmpp_2m_sde', 'dpmpp_2m_sde_gpu', 'dpmpp_2m_sde_heun',
    'dpmpp_2m_sde_heun_gpu', 'dpmpp_3m_sde', 'dpmpp_3m_sde_gpu', 'ddpm', 'lcm', 'ipndm', 'ipndm_v', 'deis',
    'res_multistep', 'res_multistep_ancestral', 'seeds_2', 'seeds_3', 'ddim']
# Random inpaint noise, as ComfyUI's sampler_object gives its ddim.
INPAINT_OPTIONS = {'ddim': {'random': True}}
# ComfyUI builds a Brownian tree over the whole schedule for these (on the CPU unless _gpu).
BROWNIAN = ('dpmpp_sde', 'dpmpp_sde_gpu', *[name for name in TWINS if 'sde' in name])
# ComfyUI switches these to forms written for flow (CONST) models; the library's twins are the VE-form originals.
NOT_FOR_FLOW = tuple(name for name in TWINS if 'sde' in name)


def check_sampler_name(name):
    if name in REFUSED:
        raise ValueError(f'W2SD: sampler_name {name!r} cannot run with W2SD reflections: {REFUSED[name]}. '
                         f'Use one of {SAMPLER_NAMES}')
    if name not in HOST_STEPS and name not in TWINS:
        raise ValueError(f'W2SD: sampler_name must be one of {SAMPLER_NAMES}, got {name!r}')


def check_number(name, value):
    """``value`` if it is a finite number in the ``RANGES`` of the widget ``name`` (an int where that is one),
    else a ``ValueError`` naming the widget and its range."""
    lo, hi = RANGES[name]
    whole = isinstance(lo, int)
    if not finite_number(value) or not lo <= value <= hi or (whole and not isinstance(value, int)):
        kind = 'an integer' if whole else 'a finite number'
        raise ValueError(f'W2SD: {name} must be {kind} in [{lo:g}, {hi:g}], got {value!r}')
    return value


def w2sd_options(lam=-1, strength=1., weak_sigma='current', form='paper', reflections=1):
    """Node widget values -> keyword options of ``sample_w2sd_*`` (``lam=-1``: every step but the last; a ``lam``
    of the step count or more is the same)."""
    lam, strength, reflections = (check_number(n, v) for n, v in
                                  (('lam', lam), ('strength', strength), ('reflections', reflections)))
    if weak_sigma not in WEAK_SIGMAS:
        raise ValueError(f'W2SD: weak_sigma must be one of {WEAK_SIGMAS}, got {weak_sigma!r}')
    if form not in FORMS:
        raise ValueError(f'W2SD: form must be one of {FORMS}, got {form!r}')
    return dict(lam=None if lam == -1 else lam, strength=float(strength), weak_sigma=weak_sigma, form=form,
                reflections=reflections)


NO_UNCOND = ('W2SD: a reflection CFG is set (W2SD Sampler strong_cfg / weak_cfg), but the guider has no negative '
             'conditioning (BasicGuider, or a model run without negative), so there is no unconditional prediction '
             'to recombine: use a CFGGuider or the W2SD Guider with a negative, or the W2SD Guider with weak conds '
             'and cfg_source = guider')


def cfg_override(cfg):
    """Post-CFG function recombining the leg's cond/uncond predictions at ``cfg``.

    CFG 1 is the conditional prediction itself, which needs no negative (the anchored form under a BasicGuider).
    """
    def post_cfg(args):
        if cfg == 1:
            return args['cond_denoised']
        # Without a negative ComfyUI passes uncond=None but a zero tensor as uncond_denoised.
        if args.get('uncond', ()) is None or args['uncond_denoised'] is None:
            raise ValueError(NO_UNCOND)
        cond, uncond = args['cond_denoised'], args['uncond_denoised']
        return uncond + (cond - uncond) * cfg
    return post_cfg


def role_model_options(model_options, role, cfg=None):
    """A copy of ``model_options`` tagged with ``role``; ``cfg`` (not None) overrides the leg's CFG scale."""
    if role not in ROLES:
        raise ValueError(f'W2SD: role must be one of {ROLES}, got {role!r}')
    options = {**model_options, ROLE_KEY: role}
    if cfg is not None:
        # A new list: the caller's sampler_post_cfg_function list stays as it was.
        options['sampler_post_cfg_function'] = [*model_options.get('sampler_post_cfg_function', []),
                                                cfg_override(cfg)]
        if cfg != 1:
            options['disable_cfg1_optimization'] = True
    return options


def role_extra_args(role, cfg=None):
    """``weak_extra_args``/``strong_extra_args`` function: the main extra_args with a role-tagged model_options."""
    def extra_args(main):
        return {**main, 'model_options': role_model_options(main.get('model_options', {}), role, cfg)}
    return extra_args


def noise_sampler(name, fn, x, sigmas, seed):
    """The noise sampler ComfyUI's ``sample_<name>`` builds by default (None if ``fn`` takes none), built once
    for the whole schedule, so that running the sampler step by step draws the same noise."""
    if 'noise_sampler' not in inspect.signature(fn).parameters:
        return None
    K = _kdiff.sampling()
    if name in BROWNIAN:
        sigma_min, sigma_max = sigmas[sigmas > 0].min(), sigmas.max()
        return K.BrownianTreeNoiseSampler(x, sigma_min, sigma_max, seed=seed, cpu=not name.endswith('_gpu'))
    return K.default_noise_sampler(x, seed=seed)


def host_step(fn, model):
    """ComfyUI's ``fn`` as the step function of ``with_reflection``.

    It runs on ``model`` itself (ComfyUI's samplers read ``model.inner_model`` for the model's sampling type) and
    on a copy of extra_args, into which the CFG++ samplers write their post-CFG function at every call.
    """
    def step(_, x, sigmas, extra_args=None, **kwargs):
        return fn(model, x, sigmas, extra_args=dict(extra_args), **kwargs)
    return step


def is_flow(model):
    """Is ``model`` (ComfyUI's KSamplerX0Inpaint -> guider -> BaseModel) a flow (CONST) model?"""
    model_sampling = sys.modules.get('comfy.model_sampling')
    if model_sampling is None:  # outside ComfyUI there are no flow models of its kind
        return False
    return isinstance(model.inner_model.inner_model.model_sampling, model_sampling.CONST)


def handles_roles(model):
    """Does the guider behind ``model`` (ComfyUI's KSamplerX0Inpaint) pick conds and CFG per role itself?"""
    return getattr(getattr(model, 'inner_model', None), 'handles_w2sd_roles', False)


def leg_cfgs(model, cfg_source, strong_cfg, weak_cfg):
    """The (strong, weak) CFG overrides for the reflection legs (None: the guider's own)."""
    if cfg_source not in CFG_SOURCES:
        raise ValueError(f'W2SD: cfg_source must be one of {CFG_SOURCES}, got {cfg_source!r}')
    for name, cfg in (('strong_cfg', strong_cfg), ('weak_cfg', weak_cfg)):
        if cfg is not None and not finite_number(cfg):  # NaN would run to an all-NaN latent
            raise ValueError(f'W2SD: {name} must be a finite number or None (the guider\'s own), got {cfg!r}')
    roles = handles_roles(model)
    if cfg_source == 'guider' and not roles:
        raise ValueError('W2SD: cfg_source = guider needs a W2SD Guider (connect one to SamplerCustomAdvanced), or set '
                         'cfg_source = auto / sampler to use the W2SD Sampler\'s strong_cfg / weak_cfg')
    if cfg_source == 'guider' or (cfg_source == 'auto' and roles):
        return None, None
    if weak_cfg is None and not roles:
        raise ValueError('W2SD: the weak reflection leg would equal the strong one: connect a W2SD Guider (weak conds '
                         'or hooks), or set weak_cfg on the W2SD Sampler')
    return strong_cfg, weak_cfg


def legs_coincide(model, strong_cfg, weak_cfg):
    """Do the strong and weak legs make the very same call (same conds, same CFG)?"""
    guider = model.inner_model
    if not handles_roles(model):
        return (getattr(guider, 'cfg', None) if strong_cfg is None else strong_cfg) == weak_cfg
    if not guider.weak_conds_are_strong:
        return False
    return ((guider.strong_cfg if strong_cfg is None else strong_cfg)
            == (guider.weak_cfg if weak_cfg is None else weak_cfg))


def denoising_last_step(fn):
    """``fn`` (a ``sample_w2sd_*`` twin) ending as ComfyUI's lms does: at a schedule's step into sigma 0 it returns
    the denoised estimate. That step never reflects, so ``lam`` keeps its meaning on the shortened schedule."""
    def sample(model, x, sigmas, extra_args=None, callback=None, disable=None, lam=None, **options):
        if len(sigmas) < 3 or sigmas[-1] != 0:
            return fn(model, x, sigmas, extra_args=extra_args, callback=callback, disable=disable, lam=lam,
                      **options)
        last = len(sigmas) - 2
        x = fn(model, x, sigmas[:-1], extra_args=extra_args, callback=callback, disable=disable,
               lam=last if lam is None else lam, **options)
        denoised = model(x, sigmas[last] * x.new_ones([x.shape[0]]), **extra_args)
        if callback is not None:
            callback({'x': x, 'i': last, 'sigma': sigmas[last], 'sigma_hat': sigmas[last], 'denoised': denoised})
        return denoised
    return sample


def sample(name, model, x, sigmas, extra_args=None, callback=None, disable=None, *, cfg_source='auto',
           strong_cfg=None, weak_cfg=None, **options):
    """KSAMPLER function: W2SD ``name`` with ComfyUI's noise, the roles routed through ``model``.

    ``cfg_source``: 'guider' (a W2SD Guider picks conds and CFG per role), 'sampler' (``strong_cfg`` /
    ``weak_cfg`` override the legs' CFG; None: the guider's own) or 'auto' (guider if it is a W2SD Guider).
    With a plain CFG guider ``weak_cfg`` is required: the weak leg can only differ by its CFG scale.
    """
    check_sampler_name(name)
    strong_cfg, weak_cfg = leg_cfgs(model, cfg_source, strong_cfg, weak_cfg)
    if name in NOT_FOR_FLOW and is_flow(model):
        raise ValueError(f'W2SD: {name} adds noise in the VE form, which does not fit this flow model; use one of '
                         f'{[n for n in SAMPLER_NAMES if n not in NOT_FOR_FLOW]}')
    if (options.get('form', 'paper') == 'paper' and options.get('strength', 1.) != 0
            and legs_coincide(model, strong_cfg, weak_cfg)):
        raise ValueError('W2SD: the weak reflection leg equals the strong one (same conds, same CFG), so the paper '
                         'form would only reflect the model onto itself: give the W2SD Guider weak_positive / '
                         'weak_negative (another prompt, or hooks), or a weak_cfg different from strong_cfg')
    if len(sigmas) <= 1:  # nothing to do: ComfyUI's samplers return x (SplitSigmas can give one sigma)
        return x
    extra_args = {} if extra_args is None else extra_args
    if name in TWINS:
        twin, twin_options = TWINS[name]
        fn = getattr(sampling, 'sample_w2sd_' + twin)
        if name in DENOISE_LAST:
            fn = denoising_last_step(fn)
        options.update(twin_options)
        if twin == 'res_multistep':  # ComfyUI (v0.33) scales its noise by the model's noise_scale
            model_sampling = model.inner_model.model_patcher.get_model_object('model_sampling')
            options['s_noise'] = options.get('s_noise', 1.) * getattr(model_sampling, 'noise_scale', 1.0)
    else:
        host = getattr(_kdiff.sampling(), 'sample_' + HOST_STEPS[name])
        fn = with_reflection(host_step(host, model))
    ns = noise_sampler(name, host if name in HOST_STEPS else fn, x, sigmas, extra_args.get('seed'))
    if ns is not None:
        options['noise_sampler'] = ns
    return fn(model, x, sigmas, extra_args=extra_args, callback=callback, disable=disable,
              weak=model, weak_extra_args=role_extra_args('weak', weak_cfg),
              strong=model, strong_extra_args=role_extra_args('strong', strong_cfg), **options)


def sampler_function(name):
    """``sample`` bound to a sampler name, for ``comfy.samplers.KSAMPLER(fn, extra_options=<options>)``."""
    check_sampler_name(name)
    return functools.partial(sample, name)
