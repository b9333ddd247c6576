"""Official-code parity: W2SD as the authors' SDXL script runs it (diffusers >= 0.22 scheduler semantics).

The official ``reflection_operation`` calls ``DDIMInverseScheduler.step(eps_w, timesteps[i + 1], x')``, which from
diffusers 0.22 applies the inverse coefficients of ``t_{i+2} -> t_{i+1}`` rather than Eq. 5's ``t_{i+1} -> t_i``,
and the result is then used as the latent at ``t_i``. The weak UNet sees the VP latent ``a_{i+1} x'`` with the
label ``t_i``. In k-diffusion coordinates (``a_k = 1 / sqrt(1 + sigma_k^2)``) one official reflection is::

    x'  = x + (sigma_{i+1} - sigma_i) * eps_s(x, sigma_i)                          # DDIM = Euler
    x'' = (a_{i+1} / a_i) x'                   eps_w = (x'' - D_w(x'', sigma_i)) / sigma_i
    x~  = (a_{i+1} / a_i) * [(a_{i+1} / a_{i+2}) x' + (sigma_{i+1} - sigma_{i+2}) eps_w]

On SDXL's 50-step "leading" grid this injects 0.97-0.99x the paper-exact inversion noise for most steps, up to
1.68x near the end and 0.12x at the last reflection (measured against the paper-exact form). The official DDIM run ends at
``abar_0`` (``set_alpha_to_one=False``), i.e. sigma 0.0292, not 0: :func:`parity_sigmas` builds that schedule.
For the paper-exact algorithm use ``sample_w2sd_euler`` (``weak_sigma='current'``) instead.
"""
import torch
from tqdm.auto import trange

from . import _kdiff
from .adapters.vp import spaced_timesteps, timestep_sigmas
from .reflect import check_sigmas, checked, resolve_extra_args


def _alpha(sigma):
    return (1 + sigma ** 2) ** -0.5


def reflect_official(x, i, sigmas, strong, weak, strong_extra_args=None, weak_extra_args=None):
    """One reflection of the official code at step ``i`` of ``sigmas`` (needs ``sigmas[i + 2]``)."""
    if not 0 <= i < len(sigmas) - 2:
        raise ValueError(f'the official reflection at step {i} needs sigmas[{i + 2}]; '
                         f'the schedule has {len(sigmas)} entries')
    s0, s1, s2 = sigmas[i], sigmas[i + 1], sigmas[i + 2]
    if not float(s1) > 0:
        raise ValueError('the official reflection needs sigmas[i + 1] > 0')
    s_in = x.new_ones([x.shape[0]])
    ea_s = {} if strong_extra_args is None else strong_extra_args
    ea_w = {} if weak_extra_args is None else weak_extra_args
    x1 = x + (s1 - s0) * (x - checked('strong', strong)(x, s0 * s_in, **ea_s)) / s0
    ratio = _alpha(s1) / _alpha(s0)
    x2 = ratio * x1
    eps_w = (x2 - checked('weak', weak)(x2, s0 * s_in, **ea_w)) / s0
    return ratio * ((_alpha(s1) / _alpha(s2)) * x1 + (s1 - s2) * eps_w)


def parity_sigmas(denoiser, n=50, steps_offset=1):
    """The official SDXL grid: ``n`` "leading" timesteps (981, 961, ... for n = 50), then ``abar_0``."""
    return timestep_sigmas(denoiser, spaced_timesteps(n, 'leading', steps_offset, len(denoiser.sigmas)),
                           final='alpha0')


@torch.no_grad()
def sample_w2sd_official(model, x, sigmas, extra_args=None, callback=None, disable=None, *, weak,
                         weak_extra_args=None, strong=None, strong_extra_args=None, lam=None):
    """W2SD with the official code's reflection and DDIM (= Euler) main steps; ``lam=0`` is ``sample_euler``.

    ``sigmas`` may end above 0 (as :func:`parity_sigmas` does); the result is then the VE latent at
    ``sigmas[-1]``, whose VP latent (what diffusers decodes) is ``x / sqrt(1 + sigmas[-1] ** 2)``.
    ``lam``: reflect the first ``lam`` steps (default and maximum: all but the last). Extra args for a role: a
    dict or a function of the main extra_args; ``strong`` defaults to ``model``.
    """
    check_sigmas(sigmas)
    n = len(sigmas) - 1
    lam = n - 1 if lam is None else lam
    if isinstance(lam, bool) or not isinstance(lam, int) or not 0 <= lam <= n - 1:
        raise ValueError(f'lam must be an integer in [0, {n - 1}] (the last step cannot reflect), got {lam!r}')
    if weak is None or not callable(weak):
        raise TypeError('sample_w2sd_official needs weak=<callable D(x, sigma, **extra_args)>')
    extra_args = {} if extra_args is None else extra_args
    main, strong = checked('main', model), model if strong is None else strong
    s_in = x.new_ones([x.shape[0]])
    for i in trange(n, disable=disable):
        if i < lam and sigmas[i + 1] > 0:
            ea_s = extra_args if strong_extra_args is None else resolve_extra_args(strong_extra_args, extra_args)
            ea_w = extra_args if weak_extra_args is None else resolve_extra_args(weak_extra_args, extra_args)
            x = reflect_official(x, i, sigmas, strong, weak, ea_s, ea_w)
        denoised = main(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({'x': x, 'i': i, 'sigma': sigmas[i], 'sigma_hat': sigmas[i], 'denoised': denoised})
        x = x + _kdiff.sampling().to_d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
    return x
