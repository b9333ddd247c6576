"""W2SD's relatives on the same (strong, weak) pair, for comparisons at matched NFE.

- :func:`difference_guidance` (autoguidance when main is strong): ``D_main + w (D_strong - D_weak)`` as a denoiser
  for any sampler. W2SD at strength 1 is, to first order in the step size, Euler on this with ``w = 1``
  (the step error is O(h^2); tests/test_guidance.py checks that the gap shrinks like 1/T).
- :func:`z_sampling`: W2SD on a guidance pair (CFG 5.5 vs 0, every step but the last reflects).
- :func:`sample_resampling`: Re-Sampling (W2SD paper Algorithm 2): the reflection's weak inversion replaced by
  re-noising with fresh noise.
- :func:`sample_restart`: Restart sampling (Xu et al. 2023): Heun steps, and at chosen levels ``sigma_lo`` jumps
  back up to ``sigma_hi`` with fresh noise and re-integrates.
"""
import math

import torch
from tqdm.auto import trange

from . import _kdiff
from . import pairs
from .reflect import (check_denoiser, check_sigmas, check_x, checked, finite_number, legs_at, reflected_steps,
                      window_bounds)
from .sampling import check_sampler_options


def difference_guidance(roles, w=1., *, sigma_window=None):
    """``D = D_main + w (D_strong - D_weak)`` at ``(x, sigma)``, a k-diffusion denoiser taking the main extra args.

    With main = strong (``weights(strong, weak)`` without CFG) this is autoguidance, Karras et al.'s weight
    ``1 + w``; the paper's Auto-guidance baseline "w = 1" is ``w=1`` here. ``sigma_window=(lo, hi)`` applies the
    difference only for ``lo <= sigma <= hi`` (elsewhere D_main alone). NFE per call: 2 when the strong leg is the
    main one (3 otherwise), 1 outside the window; legs on one shared network (``pairs.SharedCFG``: guidance, prompt,
    LoRA and MoE pairs) run as one batched forward.
    """
    if not isinstance(roles, pairs.Roles):
        raise TypeError(f'difference_guidance needs a pairs.Roles, got {type(roles).__name__}')
    if not finite_number(w):
        raise ValueError(f'w must be a finite number (1.0 = W2SD\'s first-order twin), got {w!r}')
    lo, hi = window_bounds(sigma_window)

    def guided(x, sigma, **extra_args):
        inside = (sigma >= lo) & (sigma <= hi)
        if not inside.any():
            main, main_ea = roles.leg('main', extra_args)
            return main(x, sigma, **main_ea)
        names = ('main', 'weak') if roles.strong_is_main else ('main', 'strong', 'weak')
        outs = legs_at(x, sigma, [roles.leg(role, extra_args) for role in names], names)
        out, d_strong, d_weak = outs[0], outs[-2], outs[-1]
        scale = w * inside.to(out.dtype).reshape(-1, *[1] * (x.ndim - 1))
        return out + (d_strong - d_weak) * scale
    return guided


autoguidance = difference_guidance


def z_sampling(model, cond, uncond, *, scale=5.5, weak_scale=0., shared=None):
    """Z-Sampling (Bai et al. 2024) as W2SD roles: CFG ``scale`` strong and main, CFG ``weak_scale`` weak.

    Use with the default W2SD options (every step but the last reflects, one reflection per step = its
    ``T_max = 1``). To first order it is CFG at ``2 scale - weak_scale`` (11 for the defaults).
    """
    return pairs.guidance(model, cond, uncond, strong_scale=scale, weak_scale=weak_scale, shared=shared)


def _setup(model, x, sigmas, extra_args, callback):
    check_x(x)
    check_sigmas(sigmas)
    check_sampler_options({'callback': callback})
    if extra_args is not None and not isinstance(extra_args, dict):
        raise TypeError(f'extra_args must be a dict of keyword arguments for the model, '
                        f'got {type(extra_args).__name__}')
    return checked('main', check_denoiser('main', model)), {} if extra_args is None else extra_args, \
        x.new_ones([x.shape[0]])


@torch.no_grad()
def sample_resampling(model, x, sigmas, extra_args=None, callback=None, disable=None, *, lam=None,
                      noise_sampler=None):
    """Re-Sampling: on each of the first ``lam`` steps, an Euler step down to sigma_{i+1}, re-noised back to
    sigma_i with fresh noise (RePaint-style), then the regular Euler step.

    ``lam`` as in W2SD (default: every step but the last; never a step into sigma = 0). NFE:
    ``len(sigmas) - 1 + sum(reflected_steps(sigmas, lam))``.
    """
    K = _kdiff.sampling()
    model, extra_args, s_in = _setup(model, x, sigmas, extra_args, callback)
    noise_sampler = K.default_noise_sampler(x) if noise_sampler is None else noise_sampler
    resampled = reflected_steps(sigmas, lam)
    for i in trange(len(sigmas) - 1, disable=disable):
        if resampled[i]:
            x_down = x + K.to_d(x, sigmas[i], model(x, sigmas[i] * s_in, **extra_args)) * (sigmas[i + 1] - sigmas[i])
            x = x_down + noise_sampler(sigmas[i], sigmas[i + 1]) * (sigmas[i] ** 2 - sigmas[i + 1] ** 2) ** 0.5
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({'x': x, 'i': i, 'sigma': sigmas[i], 'sigma_hat': sigmas[i], 'denoised': denoised})
        x = x + K.to_d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
    return x


def heun_step(model, x, sigma, sigma_next, extra_args, s_in):
    """One Heun step of k-diffusion's ``sample_heun`` from ``sigma`` to ``sigma_next`` (Euler into sigma 0):
    ``(x_next, denoised at x)``. ``s_in``: ones of x's batch size (k-diffusion's per-sample sigma factor)."""
    K = _kdiff.sampling()
    denoised = model(x, sigma * s_in, **extra_args)
    d = K.to_d(x, sigma, denoised)
    x_next = x + d * (sigma_next - sigma)
    if sigma_next > 0:
        d_2 = K.to_d(x_next, sigma_next, model(x_next, sigma_next * s_in, **extra_args))
        x_next = x + (d + d_2) / 2 * (sigma_next - sigma)
    return x_next, denoised


def restart_plan(sigmas, restart_list=None, *, sigma_lo=None, sigma_hi=None, restart_k=1, restart_steps=3):
    """``{j: [(sigma_hi, k, steps), ...]}``: after landing on ``sigmas[j]`` restart ``k`` times from ``sigma_hi``.

    ``restart_list``: ``(sigma_lo, sigma_hi, k, steps)`` tuples, or the shorthand ``sigma_lo, sigma_hi,
    restart_k, restart_steps`` for one interval. Each ``sigma_lo`` snaps to the nearest positive interior sigma of
    the schedule (the Restart paper's practice), which must lie below ``sigma_hi``.
    """
    check_sigmas(sigmas)
    if restart_list is None:
        if sigma_lo is None or sigma_hi is None:
            raise ValueError('Restart needs restart_list=[(sigma_lo, sigma_hi, k, steps), ...] or sigma_lo=, '
                             'sigma_hi= (with restart_k=, restart_steps=)')
        restart_list = [(sigma_lo, sigma_hi, restart_k, restart_steps)]
    elif sigma_lo is not None or sigma_hi is not None:
        raise ValueError('give restart_list or sigma_lo/sigma_hi, not both')
    interior = [j for j in range(1, len(sigmas) - 1) if sigmas[j] > 0]
    if not interior:
        raise ValueError('Restart needs a schedule with at least one positive sigma between the first and the last')
    plan = {}
    for entry in restart_list:
        try:
            lo, hi, k, steps = entry
            lo, hi = float(lo), float(hi)
        except (TypeError, ValueError):
            raise ValueError(f'restart_list entries must be (sigma_lo, sigma_hi, k, steps), got {entry!r}') from None
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise ValueError(f'restart sigma_lo and sigma_hi must be finite numbers, got {lo} and {hi} in {entry!r}')
        for name, v in (('k', k), ('steps', steps)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f'restart {name} must be an integer >= 1, got {v!r} in {entry!r}')
        j = min(interior, key=lambda j: abs(float(sigmas[j]) - lo))
        if not hi > float(sigmas[j]):
            raise ValueError(f'sigma_hi ({hi}) must exceed sigma_lo, which snapped to the schedule\'s '
                             f'{float(sigmas[j]):.6g}')
        plan.setdefault(j, []).append((hi, k, steps))
    return plan


def restart_nfe(sigmas, plan):
    """Denoiser calls of :func:`sample_restart`: ``2 N - [sigmas[-1] == 0] + sum 2 k steps`` for N main steps."""
    return 2 * (len(sigmas) - 1) - int(float(sigmas[-1]) == 0) + sum(2 * k * n for v in plan.values()
                                                                       for _, k, n in v)


@torch.no_grad()
def sample_restart(model, x, sigmas, extra_args=None, callback=None, disable=None, *, restart_list=None,
                   sigma_lo=None, sigma_hi=None, restart_k=1, restart_steps=3, s_noise=1., noise_sampler=None):
    """Restart sampling (Xu et al. 2023): Heun steps (Karras et al. 2022) on ``sigmas``; on landing at a restart
    level sigma_lo, ``k`` times: add noise ``sqrt(sigma_hi^2 - sigma_lo^2) z`` and re-integrate sigma_hi -> sigma_lo
    in ``steps`` Heun steps on a Karras sub-schedule (rho 7). Options: see :func:`restart_plan`; NFE:
    :func:`restart_nfe`. The callback sees the main steps only. ``noise_sampler(sigma_hi, sigma_lo)`` is called
    once per restart and must draw fresh noise each time (k-diffusion's default does; a Brownian tree would
    repeat the same increment for repeated restarts).
    """
    K = _kdiff.sampling()
    model, extra_args, s_in = _setup(model, x, sigmas, extra_args, callback)
    if not finite_number(s_noise):
        raise ValueError(f's_noise must be a finite number (1 = unit-variance restart noise), got {s_noise!r}')
    plan = restart_plan(sigmas, restart_list, sigma_lo=sigma_lo, sigma_hi=sigma_hi, restart_k=restart_k,
                        restart_steps=restart_steps)
    for j, restarts in plan.items():
        for hi, _, _ in restarts:
            if not torch.isfinite(((hi ** 2 - sigmas[j] ** 2) ** 0.5).to(x.dtype)):
                raise ValueError(f'restart sigma_hi {hi:g} is too large for x of dtype {x.dtype}: its restart noise '
                                 f'sqrt(sigma_hi ** 2 - sigma_lo ** 2) overflows')
    noise_sampler = K.default_noise_sampler(x) if noise_sampler is None else noise_sampler
    for i in trange(len(sigmas) - 1, disable=disable):
        x_next, denoised = heun_step(model, x, sigmas[i], sigmas[i + 1], extra_args, s_in)
        if callback is not None:  # k-diffusion reports the step's starting point
            callback({'x': x, 'i': i, 'sigma': sigmas[i], 'sigma_hat': sigmas[i], 'denoised': denoised})
        x = x_next
        lo = sigmas[i + 1]
        for hi, k, steps in plan.get(i + 1, ()):
            sub = K.get_sigmas_karras(steps + 1, lo, hi, device=sigmas.device)[:-2].to(sigmas.dtype)
            sub = torch.cat([sub, lo.reshape(1)])  # land exactly on the schedule's sigma_lo
            for _ in range(k):
                x = x + noise_sampler(hi, lo) * s_noise * (hi ** 2 - lo ** 2) ** 0.5
                for s, s_next in zip(sub[:-1], sub[1:]):
                    x, _ = heun_step(model, x, s, s_next, extra_args, s_in)
    return x
