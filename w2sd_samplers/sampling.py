"""W2SD versions of k-diffusion's samplers.

Each ``sample_w2sd_X`` takes ``sample_X``'s arguments plus the keyword-only W2SD options of
:class:`w2sd_samplers.reflect.Reflection` (``weak`` is required). Every step first calls the reflection (the
identity on unreflected steps), then takes ``sample_X``'s own step; with reflection off (``lam=0`` or
``strength=0``) the result equals ``k_diffusion.sampling.sample_X``'s bit for bit. Helpers and noise come from
the active k-diffusion copy (``_kdiff``), so host seeds are kept; reflections draw no noise.
"""
import functools
import importlib
import inspect
import math
import numbers
import warnings

import torch
from tqdm.auto import tqdm, trange

from . import _kdiff
from .reflect import Reflection, check_sigmas, check_x

OPTION_NAMES = tuple(p.name for p in inspect.signature(Reflection).parameters.values()
                     if p.kind is p.KEYWORD_ONLY)


def w2sd_signature(fn):
    """Decorator of a W2SD sampler ``fn(model, x, sigmas, ..., **w2sd)``, for writing one outside this module (the
    webui twins do): shows the W2SD options in ``inspect.signature`` / ``help`` in place of ``**w2sd`` (hosts read
    the signature), and reports an unknown keyword against ``fn``."""
    params = [p for p in inspect.signature(fn).parameters.values() if p.kind is not p.VAR_KEYWORD]
    options = [p for p in inspect.signature(Reflection).parameters.values() if p.kind is p.KEYWORD_ONLY]

    @functools.wraps(fn)
    def sample(*args, **kwargs):
        unknown = sorted(kwargs.keys() - {p.name for p in params + options})
        if unknown:
            raise TypeError(f'{fn.__name__}() got an unexpected keyword argument {unknown[0]!r} (W2SD options: '
                            f'{", ".join(OPTION_NAMES)})')
        check_sampler_options(sample.__signature__.bind_partial(*args, **kwargs).arguments)
        return fn(*args, **kwargs)
    sample.__signature__ = inspect.Signature(params + options)
    return sample


def check_sampler_options(arguments):
    """Check a sampler call's ``callback`` and noise options (``arguments``: name -> value) before any work; NaN or
    inf options would give a NaN result in k-diffusion's samplers too."""
    callback = arguments.get('callback')
    if callback is not None and not callable(callback):
        raise TypeError(f'callback must be a function of the step dict (or None), got {type(callback).__name__}')
    for name in ('eta', 's_noise', 's_churn', 's_tmin', 's_tmax', 'r'):
        value = arguments.get(name)
        if isinstance(value, numbers.Real) and not (math.isfinite(value) or name == 's_tmax' and value == math.inf):
            raise ValueError(f'{name} must be a finite number, got {value!r}')


def _setup(model, x, sigmas, extra_args, w2sd):
    check_x(x)
    extra_args = {} if extra_args is None else extra_args
    refl = Reflection(model, sigmas, extra_args, **w2sd)
    return refl.main, extra_args, refl, x.new_ones([x.shape[0]])


def _sigma_fn(t):
    return t.neg().exp()


def _t_fn(sigma):
    return sigma.log().neg()


def _churn(x, sigmas, i, s_churn, s_tmin, s_tmax, s_noise):
    """Karras et al.'s stochastic churn: raise sigma_i to sigma_hat by adding noise."""
    gamma = min(s_churn / (len(sigmas) - 1), 2 ** 0.5 - 1) if s_tmin <= sigmas[i] <= s_tmax else 0.
    eps = _kdiff.randn_like(x) * s_noise
    sigma_hat = sigmas[i] * (gamma + 1)
    if gamma > 0:
        x = x + eps * (sigma_hat ** 2 - sigmas[i] ** 2) ** 0.5
    return x, sigma_hat


def _churned_derivative(model, x, sigmas, i, extra_args, s_in, callback, s_churn, s_tmin, s_tmax, s_noise):
    """The start of a churned step (Euler, Heun, DPM2, HeunPP2): churn, one model call, the callback; returns
    ``(x, sigma_hat, d)``."""
    x, sigma_hat = _churn(x, sigmas, i, s_churn, s_tmin, s_tmax, s_noise)
    denoised = model(x, sigma_hat * s_in, **extra_args)
    if callback is not None:
        callback({'x': x, 'i': i, 'sigma': sigmas[i], 'sigma_hat': sigma_hat, 'denoised': denoised})
    return x, sigma_hat, _kdiff.sampling().to_d(x, sigma_hat, denoised)


def _refuse_repeats(sampler, sigmas, divides):
    """Refuse a repeated sigma (a zero-length step) whose length a step of ``sampler`` divides by: the result
    would be NaN, as k-diffusion's (or the host's) own sampler's is. ``divides(i, s)`` lists the steps whose
    lengths step i divides by (multistep coefficients; the Brownian tree's noise, normalised by its step), with
    ``s`` the schedule as a list; other zero-length steps run as in k-diffusion."""
    s = sigmas.tolist()
    zero = {j for j in range(len(s) - 1) if s[j] == s[j + 1] > 0}
    for i in range(len(s) - 1) if zero else ():
        hit = sorted(zero.intersection(divides(i, s)))
        if hit:
            j = hit[0]
            raise ValueError(f'sigmas repeats {s[j]:g} (entries {j} and {j + 1}): step {i} of {sampler} divides by '
                             f'the length of that zero-length step (in its multistep history or its Brownian '
                             f'noise), which makes the result NaN, as with k-diffusion\'s own sampler; drop the '
                             f'repeat, e.g. torch.unique_consecutive(sigmas)')


def _brownian_default(x, sigmas, noise_sampler):
    if noise_sampler is not None:
        return noise_sampler
    K = _kdiff.sampling()
    sigma_min, sigma_max = sigmas[sigmas > 0].min(), sigmas.max()
    tree = K.BrownianTreeNoiseSampler(x, sigma_min, sigma_max)

    def brownian(sigma, sigma_next):
        # torchsde rounds the tree's ends to its tolerance (1e-6), so a query at exactly sigma_max lies just past the
        # end: it warns and clamps, which gives the right noise (k-diffusion's, bit for bit). Only that warning goes.
        with warnings.catch_warnings():
            warnings.filterwarnings('ignore', message='Should have t[ab][<>]=t[01]', category=UserWarning)
            return tree(sigma, sigma_next)
    return brownian


@w2sd_signature
@torch.no_grad()
def sample_w2sd_euler(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0., s_tmin=0.,
                      s_tmax=float('inf'), s_noise=1., **w2sd):
    """Euler steps (Karras et al. 2022, Algorithm 2) with W2SD reflections."""
    model, extra_args, refl, s_in = _setup(model, x, sigmas, extra_args, w2sd)
    for i in trange(len(sigmas) - 1, disable=disable):
        x = refl(x, i)
        x, sigma_hat, d = _churned_derivative(model, x, sigmas, i, extra_args, s_in, callback, s_churn, s_tmin,
                                              s_tmax, s_noise)
        x = x + d * (sigmas[i + 1] - sigma_hat)
    return x


@w2sd_signature
@torch.no_grad()
def sample_w2sd_euler_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1.,
                                noise_sampler=None, **w2sd):
    """Ancestral Euler steps with W2SD reflections (the reflection spans sigma_i -> sigma_{i+1})."""
    K = _kdiff.sampling()
    model, extra_args, refl, s_in = _setup(model, x, sigmas, extra_args, w2sd)
    noise_sampler = K.default_noise_sampler(x) if noise_sampler is None else noise_sampler
    for i in trange(len(sigmas) - 1, disable=disable):
        x = refl(x, i)
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        sigma_down, sigma_up = K.get_ancestral_step(sigmas[i], sigmas[i + 1], eta=eta)
        if callback is not None:
            callback({'x': x, 'i': i, 'sigma': sigmas[i], 'sigma_hat': sigmas[i], 'denoised': denoised})
        d = K.to_d(x, sigmas[i], denoised)
        x = x + d * (sigma_down - sigmas[i])
        if sigmas[i + 1] > 0:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


@w2sd_signature
@torch.no_grad()
def sample_w2sd_heun(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0., s_tmin=0.,
                     s_tmax=float('inf'), s_noise=1., **w2sd):
    """Heun steps (Karras et al. 2022, Algorithm 2) with W2SD reflections."""
    K = _kdiff.sampling()
    model, extra_args, refl, s_in = _setup(model, x, sigmas, extra_args, w2sd)
    for i in trange(len(sigmas) - 1, disable=disable):
        x = refl(x, i)
        x, sigma_hat, d = _churned_derivative(model, x, sigmas, i, extra_args, s_in, callback, s_churn, s_tmin,
                                              s_tmax, s_noise)
        dt = sigmas[i + 1] - sigma_hat
        if sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = K.to_d(x_2, sigmas[i + 1], model(x_2, sigmas[i + 1] * s_in, **extra_args))
            x = x + (d + d_2) / 2 * dt
    return x


@w2sd_signature
@torch.no_grad()
def sample_w2sd_dpm_2(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0., s_tmin=0.,
                      s_tmax=float('inf'), s_noise=1., **w2sd):
    """DPM-Solver-2-style midpoint steps (k-diffusion's dpm_2) with W2SD reflections."""
    K = _kdiff.sampling()
    model, extra_args, refl, s_in = _setup(model, x, sigmas, extra_args, w2sd)
    for i in trange(len(sigmas) - 1, disable=disable):
        x = refl(x, i)
        x, sigma_hat, d = _churned_derivative(model, x, sigmas, i, extra_args, s_in, callback, s_churn, s_tmin,
                                              s_tmax, s_noise)
        if sigmas[i + 1] == 0:
            x = x + d * (sigmas[i + 1] - sigma_hat)
        else:
            sigma_mid = sigma_hat.log().lerp(sigmas[i + 1].log(), 0.5).exp()
            x_2 = x + d * (sigma_mid - sigma_hat)
            d_2 = K.to_d(x_2, sigma_mid, model(x_2, sigma_mid * s_in, **extra_args))
            x = x + d_2 * (sigmas[i + 1] - sigma_hat)
    return x


@w2sd_signature
@torch.no_grad()
def sample_w2sd_dpm_2_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1.,
                                noise_sampler=None, **w2sd):
    """Ancestral DPM-Solver-2 steps with W2SD reflections."""
    K = _kdiff.sampling()
    model, extra_args, refl, s_in = _setup(model, x, sigmas, extra_args, w2sd)
    noise_sampler = K.default_noise_sampler(x) if noise_sampler is None else noise_sampler
    for i in trange(len(sigmas) - 1, disable=disable):
        x = refl(x, i)
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        sigma_down, sigma_up = K.get_ancestral_step(sigmas[i], sigmas[i + 1], eta=eta)
        if callback is not None:
            callback({'x': x, 'i': i, 'sigma': sigmas[i], 'sigma_hat': sigmas[i], 'denoised': denoised})
        d = K.to_d(x, sigmas[i], denoised)
        if sigma_down == 0:
            x = x + d * (sigma_down - sigmas[i])
        else:
            sigma_mid = sigmas[i].log().lerp(sigma_down.log(), 0.5).exp()
            x_2 = x + d * (sigma_mid - sigmas[i])
            d_2 = K.to_d(x_2, sigma_mid, model(x_2, sigma_mid * s_in, **extra_args))
            x = x + d_2 * (sigma_down - sigmas[i])
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


@w2sd_signature
@torch.no_grad()
def sample_w2sd_lms(model, x, sigmas, extra_args=None, callback=None, disable=None, order=4, **w2sd):
    """Linear multistep with W2SD reflections; the derivative history carries across reflections."""
    K = _kdiff.sampling()
    model, extra_args, refl, s_in = _setup(model, x, sigmas, extra_args, w2sd)
    _refuse_repeats('lms', sigmas, lambda i, s: range(max(i - order + 1, 0), i))
    sigmas_cpu = sigmas.detach().cpu().numpy()
    ds = []
    for i in trange(len(sigmas) - 1, disable=disable):
        x = refl(x, i)
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        ds = (ds + [K.to_d(x, sigmas[i], denoised)])[-order:]
        if callback is not None:
            callback({'x': x, 'i': i, 'sigma': sigmas[i], 'sigma_hat': sigmas[i], 'denoised': denoised})
        cur_order = min(i + 1, order)
        coeffs = [K.linear_multistep_coeff(cur_order, sigmas_cpu, i, j) for j in range(cur_order)]
        x = x + sum(coeff * d for coeff, d in zip(coeffs, reversed(ds)))
    return x


@w2sd_signature
@torch.no_grad()
def sample_w2sd_dpmpp_2s_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.,
                                   s_noise=1., noise_sampler=None, **w2sd):
    """Ancestral DPM-Solver++(2S) with W2SD reflections."""
    K = _kdiff.sampling()
    model, extra_args, refl, s_in = _setup(model, x, sigmas, extra_args, w2sd)
    noise_sampler = K.default_noise_sampler(x) if noise_sampler is None else noise_sampler
    for i in trange(len(sigmas) - 1, disable=disable):
        x = refl(x, i)
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        sigma_down, sigma_up = K.get_ancestral_step(sigmas[i], sigmas[i + 1], eta=eta)
        if callback is not None:
            callback({'x': x, 'i': i, 'sigma': sigmas[i], 'sigma_hat': sigmas[i], 'denoised': denoised})
        if sigma_down == 0:
            x = x + K.to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        else:
            t, t_next = _t_fn(sigmas[i]), _t_fn(sigma_down)
            r = 1 / 2
            h = t_next - t
            s = t + r * h
            x_2 = (_sigma_fn(s) / _sigma_fn(t)) * x - (-h * r).expm1() * denoised
            denoised_2 = model(x_2, _sigma_fn(s) * s_in, **extra_args)
            x = (_sigma_fn(t_next) / _sigma_fn(t)) * x - (-h).expm1() * denoised_2
        if sigmas[i + 1] > 0:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


@w2sd_signature
@torch.no_grad()
def sample_w2sd_dpmpp_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1.,
                          noise_sampler=None, r=1 / 2, **w2sd):
    """DPM-Solver++ (stochastic) with W2SD reflections; Brownian-tree noise by default, as k-diffusion."""
    K = _kdiff.sampling()
    model, extra_args, refl, s_in = _setup(model, x, sigmas, extra_args, w2sd)
    brownian = noise_sampler is None
    _refuse_repeats('dpmpp_sde', sigmas, lambda i, s: [i] if brownian and s[i + 1] > 0 else [])
    noise_sampler = _brownian_default(x, sigmas, noise_sampler)
    for i in trange(len(sigmas) - 1, disable=disable):
        x = refl(x, i)
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({'x': x, 'i': i, 'sigma': sigmas[i], 'sigma_hat': sigmas[i], 'denoised': denoised})
        if sigmas[i + 1] == 0:
            x = x + K.to_d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
        else:
            t, t_next = _t_fn(sigmas[i]), _t_fn(sigmas[i + 1])
            h = t_next - t
            s = t + h * r
            fac = 1 / (2 * r)
            sd, su = K.get_ancestral_step(_sigma_fn(t), _sigma_fn(s), eta)
            s_ = _t_fn(sd)
            x_2 = (_sigma_fn(s_) / _sigma_fn(t)) * x - (t - s_).expm1() * denoised
            x_2 = x_2 + noise_sampler(_sigma_fn(t), _sigma_fn(s)) * s_noise * su
            denoised_2 = model(x_2, _sigma_fn(s) * s_in, **extra_args)
            sd, su = K.get_ancestral_step(_sigma_fn(t), _sigma_fn(t_next), eta)
            t_next_ = _t_fn(sd)
            denoised_d = (1 - fac) * denoised + fac * denoised_2
            x = (_sigma_fn(t_next_) / _sigma_fn(t)) * x - (t - t_next_).expm1() * denoised_d
            x = x + noise_sampler(_sigma_fn(t), _sigma_fn(t_next)) * s_noise * su
    return x


@w2sd_signature
@torch.no_grad()
def sample_w2sd_dpmpp_2m(model, x, sigmas, extra_args=None, callback=None, disable=None, **w2sd):
    """DPM-Solver++(2M) with W2SD reflections; the previous denoised estimate carries across reflections."""
    model, extra_args, refl, s_in = _setup(model, x, sigmas, extra_args, w2sd)
    _refuse_repeats('dpmpp_2m', sigmas, lambda i, s: [i - 1] if i >= 1 and s[i + 1] > 0 else [])
    old_denoised = None
    for i in trange(len(sigmas) - 1, disable=disable):
        x = refl(x, i)
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({'x': x, 'i': i, 'sigma': sigmas[i], 'sigma_hat': sigmas[i], 'denoised': denoised})
        t, t_next = _t_fn(sigmas[i]), _t_fn(sigmas[i + 1])
        h = t_next - t
        if old_denoised is None or sigmas[i + 1] == 0:
            x = (_sigma_fn(t_next) / _sigma_fn(t)) * x - (-h).expm1() * denoised
        else:
            r = (t - _t_fn(sigmas[i - 1])) / h
            denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (_sigma_fn(t_next) / _sigma_fn(t)) * x - (-h).expm1() * denoised_d
        old_denoised = denoised
    return x


@w2sd_signature
@torch.no_grad()
def sample_w2sd_dpmpp_2m_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1.,
                             noise_sampler=None, solver_type='midpoint', **w2sd):
    """DPM-Solver++(2M) SDE (midpoint or heun) with W2SD reflections."""
    if solver_type not in {'heun', 'midpoint'}:
        raise ValueError(f"solver_type must be 'heun' or 'midpoint', got {solver_type!r}")
    model, extra_args, refl, s_in = _setup(model, x, sigmas, extra_args, w2sd)
    brownian, heun = noise_sampler is None and bool(eta), solver_type == 'heun'
    _refuse_repeats('dpmpp_2m_sde', sigmas, lambda i, s: [i - 1] * (i >= 1) + [i] * (brownian or heun and i >= 1)
                    if s[i + 1] > 0 else [])
    noise_sampler = _brownian_default(x, sigmas, noise_sampler)
    # h starts as None, as in ComfyUI's and Forge's copies: k-diffusion 0.1.1 fails on a one-step schedule into 0.
    old_denoised, h_last, h = None, None, None
    for i in trange(len(sigmas) - 1, disable=disable):
        x = refl(x, i)
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({'x': x, 'i': i, 'sigma': sigmas[i], 'sigma_hat': sigmas[i], 'denoised': denoised})
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            t, s = -sigmas[i].log(), -sigmas[i + 1].log()
            h = s - t
            eta_h = eta * h
            x = sigmas[i + 1] / sigmas[i] * (-eta_h).exp() * x + (-h - eta_h).expm1().neg() * denoised
            if old_denoised is not None:
                r = h_last / h
                if solver_type == 'heun':
                    x = x + ((-h - eta_h).expm1().neg() / (-h - eta_h) + 1) * (1 / r) * (denoised - old_denoised)
                else:
                    x = x + 0.5 * (-h - eta_h).expm1().neg() * (1 / r) * (denoised - old_denoised)
            if eta:
                noise = noise_sampler(sigmas[i], sigmas[i + 1])
                x = x + noise * sigmas[i + 1] * (-2 * eta_h).expm1().neg().sqrt() * s_noise
        old_denoised, h_last = denoised, h
    return x


@w2sd_signature
@torch.no_grad()
def sample_w2sd_dpmpp_3m_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1.,
                             noise_sampler=None, **w2sd):
    """DPM-Solver++(3M) SDE with W2SD reflections; two past denoised estimates carry across reflections."""
    model, extra_args, refl, s_in = _setup(model, x, sigmas, extra_args, w2sd)
    brownian = noise_sampler is None and bool(eta)
    _refuse_repeats('dpmpp_3m_sde', sigmas, lambda i, s: [*range(max(i - 2, 0), i)] + [i] * (i >= 1 or brownian)
                    if s[i + 1] > 0 else [])
    noise_sampler = _brownian_default(x, sigmas, noise_sampler)
    denoised_1, denoised_2, h, h_1, h_2 = None, None, None, None, None  # h: as in sample_w2sd_dpmpp_2m_sde
    for i in trange(len(sigmas) - 1, disable=disable):
        x = refl(x, i)
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({'x': x, 'i': i, 'sigma': sigmas[i], 'sigma_hat': sigmas[i], 'denoised': denoised})
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            t, s = -sigmas[i].log(), -sigmas[i + 1].log()
            h = s - t
            h_eta = h * (eta + 1)
            x = torch.exp(-h_eta) * x + (-h_eta).expm1().neg() * denoised
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (denoised - denoised_1) / r0
                d1_1 = (denoised_1 - denoised_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_2 = h_eta.neg().expm1() / h_eta + 1
                phi_3 = phi_2 / h_eta - 0.5
                x = x + phi_2 * d1 - phi_3 * d2
            elif h_1 is not None:
                phi_2 = h_eta.neg().expm1() / h_eta + 1
                x = x + phi_2 * ((denoised - denoised_1) / (h_1 / h))
            if eta:
                noise = noise_sampler(sigmas[i], sigmas[i + 1])
                x = x + noise * sigmas[i + 1] * (-2 * h * eta).expm1().neg().sqrt() * s_noise
        denoised_1, denoised_2 = denoised, denoised_1
        h_1, h_2 = h, h_1
    return x


@w2sd_signature
@torch.no_grad()
def sample_w2sd_dpm_fast(model, x, sigma_min, sigma_max, n, extra_args=None, callback=None, disable=None, eta=0.,
                         s_noise=1., noise_sampler=None, **w2sd):
    """DPM-Solver-Fast (fixed steps, uniform in log sigma) with a reflection before each of its steps.

    ``n`` counts model calls, as in k-diffusion; the schedule is ``floor(n / 3) + 1`` steps from sigma_max to
    sigma_min (> 0), so the last step does not end at 0 and ``lam`` counts those steps.
    """
    K = _kdiff.sampling()
    if sigma_min <= 0 or sigma_max <= 0:
        raise ValueError('sigma_min and sigma_max must not be 0')
    noise_sampler = K.default_noise_sampler(x) if noise_sampler is None else noise_sampler
    with tqdm(total=n, disable=disable) as pbar:
        solver = K.DPMSolver(None, eps_callback=pbar.update)  # the model comes with the reflection below
        t_start, t_end = solver.t(torch.tensor(sigma_max)), solver.t(torch.tensor(sigma_min))
        m = n // 3 + 1
        ts = torch.linspace(t_start, t_end, m + 1, device=x.device)
        orders = [3] * (m - 2) + [2, 1] if n % 3 == 0 else [3] * (m - 1) + [n % 3]
        solver.model, solver.extra_args, refl, _ = _setup(model, x, solver.sigma(ts), extra_args, w2sd)
        steps = {1: solver.dpm_solver_1_step, 2: solver.dpm_solver_2_step, 3: solver.dpm_solver_3_step}
        for i, order in enumerate(orders):
            x = refl(x, i)
            t, t_next = ts[i], ts[i + 1]
            if eta:
                sd, su = K.get_ancestral_step(solver.sigma(t), solver.sigma(t_next), eta)
                t_next_ = torch.minimum(t_end, solver.t(sd))
                su = (solver.sigma(t_next) ** 2 - solver.sigma(t_next_) ** 2) ** 0.5
            else:
                t_next_, su = t_next, 0.
            eps, eps_cache = solver.eps({}, 'eps', x, t)
            if callback is not None:
                callback({'x': x, 'i': i, 't': t, 't_up': t, 'denoised': x - solver.sigma(t) * eps,
                          'sigma': solver.sigma(t), 'sigma_hat': solver.sigma(t)})
            x, _ = steps[order](x, t, t_next_, eps_cache=eps_cache)
            x = x + su * s_noise * noise_sampler(solver.sigma(t), solver.sigma(t_next))
    return x


@w2sd_signature
@torch.no_grad()
def sample_w2sd_heunpp2(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0., s_tmin=0.,
                        s_tmax=float('inf'), s_noise=1., **w2sd):
    """HeunPP2 (ComfyUI's and Forge's: Heun, then a third-order rule using sigma_{i+2}) with W2SD reflections."""
    K = _kdiff.sampling()
    model, extra_args, refl, s_in = _setup(model, x, sigmas, extra_args, w2sd)
    s_end = sigmas[-1]
    for i in trange(len(sigmas) - 1, disable=disable):
        x = refl(x, i)
        x, sigma_hat, d = _churned_derivative(model, x, sigmas, i, extra_args, s_in, callback, s_churn, s_tmin,
                                              s_tmax, s_noise)
        dt = sigmas[i + 1] - sigma_hat
        if sigmas[i + 1] == s_end:
            x = x + d * dt
            continue
        x_2 = x + d * dt
        d_2 = K.to_d(x_2, sigmas[i + 1], model(x_2, sigmas[i + 1] * s_in, **extra_args))
        if sigmas[i + 2] == s_end:
            w2 = sigmas[i + 1] / (2 * sigmas[0])
            x = x + (d * (1 - w2) + d_2 * w2) * dt
            continue
        x_3 = x_2 + d_2 * (sigmas[i + 2] - sigmas[i + 1])
        d_3 = K.to_d(x_3, sigmas[i + 2], model(x_3, sigmas[i + 2] * s_in, **extra_args))
        w = 3 * sigmas[0]
        w2, w3 = sigmas[i + 1] / w, sigmas[i + 2] / w
        x = x + ((1 - w2 - w3) * d + w2 * d_2 + w3 * d_3) * dt
    return x


def _ipndm_step(order, i, sigmas, x, d, b):
    """IPNDM's fixed-step Adams-Bashforth step from the derivative ``d`` and the history ``b`` (newest last), in the
    hosts' operation order, so that off is bit for bit."""
    h = sigmas[i + 1] - sigmas[i]
    if order == 1:
        return x + h * d
    if order == 2:
        return x + h * (3 * d - b[-1]) / 2
    if order == 3:
        return x + h * (23 * d - 16 * b[-1] + 5 * b[-2]) / 12
    return x + h * (55 * d - 59 * b[-1] + 37 * b[-2] - 9 * b[-3]) / 24


def _ipndm_v_step(order, i, sigmas, x, d, b):
    """IPNDM_V's variable-step step (zju-pi diff-solvers, as ComfyUI and Forge ship it)."""
    h_n = sigmas[i + 1] - sigmas[i]
    if order == 1:
        return x + h_n * d
    h_n_1 = sigmas[i] - sigmas[i - 1]
    if order == 2:
        return x + h_n * ((2 + (h_n / h_n_1)) / 2 * d + -(h_n / h_n_1) / 2 * b[-1])
    h_n_2 = sigmas[i - 1] - sigmas[i - 2]
    temp = (1 - h_n / (3 * (h_n + h_n_1)) * (h_n * (h_n + h_n_1)) / (h_n_1 * (h_n_1 + h_n_2))) / 2
    if order == 3:
        return x + h_n * (((2 + (h_n / h_n_1)) / 2 + temp) * d
                          + (-(h_n / h_n_1) / 2 - (1 + h_n_1 / h_n_2) * temp) * b[-1] + temp * h_n_1 / h_n_2 * b[-2])
    h_n_3 = sigmas[i - 2] - sigmas[i - 3]
    weight = (1 - h_n / (3 * (h_n + h_n_1))) / 2 + (1 - h_n / (2 * (h_n + h_n_1))) * h_n / (6 * (h_n + h_n_1 + h_n_2))
    temp2 = weight * (h_n * (h_n + h_n_1) * (h_n + h_n_1 + h_n_2)) / (h_n_1 * (h_n_1 + h_n_2) * (h_n_1 + h_n_2 + h_n_3))
    r = h_n_1 * (h_n_1 + h_n_2) / (h_n_2 * (h_n_2 + h_n_3))
    return x + h_n * (((2 + (h_n / h_n_1)) / 2 + temp + temp2) * d
                      + (-(h_n / h_n_1) / 2 - (1 + h_n_1 / h_n_2) * temp - (1 + (h_n_1 / h_n_2) + r) * temp2) * b[-1]
                      + (temp * h_n_1 / h_n_2 + ((h_n_1 / h_n_2) + r * (1 + h_n_2 / h_n_3)) * temp2) * b[-2]
                      + -temp2 * r * h_n_1 / h_n_2 * b[-3])


def _multistep(step, model, x, sigmas, extra_args, callback, disable, max_order, w2sd, denoise_to_zero=False):
    """The loop of IPNDM, IPNDM_V and DEIS: ``x = step(order, i, sigmas, x, d, history)``, with the derivative
    history carried across reflections, as in ``sample_w2sd_lms``. ``denoise_to_zero``: a step into sigma 0 returns
    the denoised estimate (ComfyUI's IPNDM*) instead of stepping there (Forge's)."""
    model, extra_args, refl, s_in = _setup(model, x, sigmas, extra_args, w2sd)
    buffer = []  # previous derivatives, newest last
    for i in trange(len(sigmas) - 1, disable=disable):
        x = refl(x, i)
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({'x': x, 'i': i, 'sigma': sigmas[i], 'sigma_hat': sigmas[i], 'denoised': denoised})
        d = (x - denoised) / sigmas[i]
        x = denoised if denoise_to_zero and sigmas[i + 1] == 0 else step(min(max_order, i + 1), i, sigmas, x, d,
                                                                              buffer)
        buffer = (buffer + [d])[-(max_order - 1):]
    return x


@w2sd_signature
@torch.no_grad()
def sample_w2sd_ipndm(model, x, sigmas, extra_args=None, callback=None, disable=None, max_order=4,
                      denoise_to_zero=True, **w2sd):
    """IPNDM (fixed-step Adams-Bashforth on the derivative, up to 4th order) with W2SD reflections.

    ``denoise_to_zero=True`` ends a schedule at sigma 0 with the denoised estimate, as ComfyUI does; ``False``
    takes the Adams-Bashforth step into 0, as Forge does.
    """
    return _multistep(_ipndm_step, model, x, sigmas, extra_args, callback, disable, max_order, w2sd,
                      denoise_to_zero)


@w2sd_signature
@torch.no_grad()
def sample_w2sd_ipndm_v(model, x, sigmas, extra_args=None, callback=None, disable=None, max_order=4,
                        denoise_to_zero=True, **w2sd):
    """IPNDM_V (variable-step Adams-Bashforth, up to 4th order) with W2SD reflections; ``denoise_to_zero`` as in
    ``sample_w2sd_ipndm``."""
    check_sigmas(sigmas)
    _refuse_repeats('ipndm_v', sigmas, lambda i, s: [] if denoise_to_zero and s[i + 1] == 0 else
                    range(max(i - max_order + 1, 0), i))
    return _multistep(_ipndm_v_step, model, x, sigmas, extra_args, callback, disable, max_order, w2sd,
                      denoise_to_zero)


@w2sd_signature
@torch.no_grad()
def sample_w2sd_deis(model, x, sigmas, extra_args=None, callback=None, disable=None, max_order=3, deis_mode='tab',
                     **w2sd):
    """DEIS (exponential-integrator multistep; coefficients from the active copy's ``deis`` module, which ComfyUI's
    and Forge's have and PyPI k-diffusion has not) with W2SD reflections; the derivative history carries across
    reflections."""
    check_sigmas(sigmas)  # before the host's coefficient code sees them
    K = _kdiff.sampling()
    try:
        deis = importlib.import_module(K.__name__.rpartition('.')[0] + '.deis')
    except ImportError as e:
        raise ImportError(f'sample_w2sd_deis needs a k-diffusion copy with a deis module (ComfyUI\'s or Forge\'s); '
                          f'{K.__name__} has none: use another sampler') from e
    coeff_list = deis.get_deis_coeff_list(sigmas, max_order, deis_mode=deis_mode)

    def step(order, i, sigmas, x, d, b):
        if order == 1 or sigmas[i + 1] <= 0:
            return x + (sigmas[i + 1] - sigmas[i]) * d
        x = x + coeff_list[i][0] * d
        for c, b_j in zip(coeff_list[i][1:], reversed(b)):
            x = x + c * b_j
        return x
    return _multistep(step, model, x, sigmas, extra_args, callback, disable, max_order, w2sd)


@w2sd_signature
@torch.no_grad()
def sample_w2sd_res_multistep(model, x, sigmas, extra_args=None, callback=None, disable=None, s_noise=1.,
                              noise_sampler=None, eta=0., **w2sd):
    """ComfyUI's res_multistep (the second-order RES multistep of arXiv 2308.02157; ``eta > 0``: its ancestral form)
    with W2SD reflections; the previous denoised estimate and sigma_down carry across reflections."""
    K = _kdiff.sampling()
    model, extra_args, refl, s_in = _setup(model, x, sigmas, extra_args, w2sd)
    _refuse_repeats('res_multistep', sigmas, lambda i, s: [i - 1] if i >= 1 and s[i + 1] > 0 else [])
    noise_sampler = K.default_noise_sampler(x) if noise_sampler is None else noise_sampler
    phi1_fn = lambda t: torch.expm1(t) / t  # noqa: E731
    phi2_fn = lambda t: (phi1_fn(t) - 1.0) / t  # noqa: E731
    old_sigma_down, old_denoised = None, None
    for i in trange(len(sigmas) - 1, disable=disable):
        x = refl(x, i)
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        sigma_down, sigma_up = K.get_ancestral_step(sigmas[i], sigmas[i + 1], eta=eta)
        if callback is not None:
            callback({'x': x, 'i': i, 'sigma': sigmas[i], 'sigma_hat': sigmas[i], 'denoised': denoised})
        if sigma_down == 0 or old_denoised is None:
            x = x + K.to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        else:
            t, t_old, t_next, t_prev = (_t_fn(sigmas[i]), _t_fn(old_sigma_down), _t_fn(sigma_down),
                                        _t_fn(sigmas[i - 1]))
            h = t_next - t
            c2 = (t_prev - t_old) / h
            phi1_val, phi2_val = phi1_fn(-h), phi2_fn(-h)
            b1 = torch.nan_to_num(phi1_val - phi2_val / c2, nan=0.0)
            b2 = torch.nan_to_num(phi2_val / c2, nan=0.0)
            x = _sigma_fn(h) * x + h * (b1 * denoised + b2 * old_denoised)
        if sigma_up > 0:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
        old_denoised, old_sigma_down = denoised, sigma_down
    return x


def with_reflection(sampler):
    """W2SD version of a single-step k-diffusion-style sampler.

    ``sampler(model, x, sigmas, extra_args=None, callback=None, disable=None, **kwargs)`` is run one step at a
    time on ``sigmas[i:i+2]``, with a reflection before each reflected step. Only for samplers whose step i
    depends on nothing but x, sigmas[i] and sigmas[i+1]: multistep history, ``s_churn`` (scaled by the step
    count) and defaults built from the whole schedule (Brownian trees: pass ``noise_sampler``) would change.
    """
    @functools.wraps(sampler)
    @torch.no_grad()
    def sample(model, x, sigmas, extra_args=None, callback=None, disable=None, **kwargs):
        w2sd = {k: kwargs.pop(k) for k in OPTION_NAMES if k in kwargs}
        check_sampler_options({'callback': callback, **kwargs})
        model, extra_args, refl, _ = _setup(model, x, sigmas, extra_args, w2sd)
        for i in trange(len(sigmas) - 1, disable=disable):
            x = refl(x, i)
            step_callback = None if callback is None else functools.partial(_renumber, callback, i)
            x = sampler(model, x, sigmas[i:i + 2], extra_args=extra_args, callback=step_callback, disable=True,
                        **kwargs)
        return x
    return sample


def _renumber(callback, i, d):
    callback({**d, 'i': i})


# The samplers that run on a sigma schedule with any k-diffusion copy: dpm_fast takes (sigma_min, sigma_max, n),
# and deis needs a host's deis module.
SAMPLERS = {name[len('sample_w2sd_'):]: fn for name, fn in globals().items()
            if name.startswith('sample_w2sd_') and name not in {'sample_w2sd_dpm_fast', 'sample_w2sd_deis'}}
