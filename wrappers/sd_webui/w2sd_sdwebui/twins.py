"""W2SD twins of the webui samplers that are not k-diffusion's classic eleven.

DPM fast, HeunPP2, IPNDM, IPNDM_V and DEIS are the library's (``w2sd_samplers.sampling``); A1111's Restart plan
is A1111's own, so its twin lives here. Each mirrors the host's function line for line, with ``x = refl(x, i)``
before step i of its schedule; with reflection off it is the host's sampler bit for bit. Read at A1111 v1.10.1
(``modules/sd_samplers_extra.py``, k-diffusion ab527a9) and Forge dfdcbab (``k_diffusion/sampling.py``).
Steps, helpers and noise come from the active k-diffusion copy (the host's).
"""
import functools

import torch
from tqdm.auto import tqdm

from w2sd_samplers import _kdiff
from w2sd_samplers.guidance import heun_step
from w2sd_samplers.reflect import Reflection, check_sigmas, check_x
from w2sd_samplers.sampling import SAMPLERS, sample_w2sd_deis, sample_w2sd_dpm_fast, w2sd_signature


def restart_schedule(sigmas, restart_list=None):
    """A1111's Restart plan: ``(sigmas, [(sigma, sigma_next, main step index or None), ...])``.

    ``restart_list=None`` with 20 or more steps swaps in a shorter Karras schedule and restarts at sigma 0.1 back
    up to 2 (A1111's automatic choice); the segments of a restart carry ``None``.
    """
    K = _kdiff.sampling()
    steps = sigmas.shape[0] - 1
    if restart_list is None:
        restart_list = {}
        if steps >= 20:
            restart_steps, restart_times = (steps // 4, 2) if steps >= 36 else (9, 1)
            sigmas = K.get_sigmas_karras(steps - restart_steps * restart_times, sigmas[-2].item(),
                                         sigmas[0].item(), device=sigmas.device)
            restart_list = {0.1: [restart_steps + 1, restart_times, 2]}
    restart_list = {int(torch.argmin(abs(sigmas - key), dim=0)): value for key, value in restart_list.items()}
    step_list = []
    for i in range(len(sigmas) - 1):
        step_list.append((sigmas[i], sigmas[i + 1], i))
        if i + 1 in restart_list:
            restart_steps, restart_times, restart_max = restart_list[i + 1]
            max_idx = int(torch.argmin(abs(sigmas - restart_max), dim=0))
            if max_idx < i + 1:
                sigma_restart = K.get_sigmas_karras(restart_steps, sigmas[i + 1].item(), sigmas[max_idx].item(),
                                                    device=sigmas.device)[:-1]
                step_list.extend((s, s_next, None) for _ in range(restart_times)
                                 for s, s_next in zip(sigma_restart[:-1], sigma_restart[1:]))
    return sigmas, step_list


@w2sd_signature
@torch.no_grad()
def sample_w2sd_restart(model, x, sigmas, extra_args=None, callback=None, disable=None, s_noise=1.,
                        restart_list=None, **w2sd):
    """A1111's Restart sampler (Heun steps, re-noised restarts) with reflections before the steps of its main
    schedule; the restart segments are not reflected. ``lam`` counts main steps."""
    check_sigmas(sigmas)
    sigmas, step_list = restart_schedule(sigmas, restart_list)
    refl = Reflection(model, sigmas, {} if extra_args is None else extra_args, **w2sd)
    model, extra_args, s_in = refl.main, refl.extra_args, check_x(x).new_ones([x.shape[0]])
    last_sigma = None
    for step_id, (sigma, sigma_next, i) in enumerate(tqdm(step_list, disable=disable)):
        if last_sigma is None:
            last_sigma = sigma
        elif last_sigma < sigma:
            x = x + _kdiff.randn_like(x) * s_noise * (sigma ** 2 - last_sigma ** 2) ** 0.5
        if i is not None:
            x = refl(x, i)
        x_next, denoised = heun_step(model, x, sigma, sigma_next, extra_args, s_in)
        if callback is not None:  # A1111 reports sigma_next as 'sigma'
            callback({'x': x, 'i': step_id, 'sigma': sigma_next, 'sigma_hat': sigma, 'denoised': denoised})
        x, last_sigma = x_next, sigma_next
    return x


def _stepping_into_zero(twin):
    """Forge's form of IPNDM*: the last step goes into sigma 0 (ComfyUI's returns the denoised estimate there)."""
    forge = functools.partial(twin, denoise_to_zero=False)
    forge.__name__ = twin.__name__  # hosts and the registry read it
    return forge


# Host function name -> twin. A1111's Restart is a callable in the host's table, keyed by its __name__.
TWINS = {'sample_dpm_fast': sample_w2sd_dpm_fast, 'restart_sampler': sample_w2sd_restart,
         'sample_heunpp2': SAMPLERS['heunpp2'], 'sample_deis': sample_w2sd_deis,
         'sample_ipndm': _stepping_into_zero(SAMPLERS['ipndm']),
         'sample_ipndm_v': _stepping_into_zero(SAMPLERS['ipndm_v'])}

# Host samplers W2SD cannot wrap, and why (shown in the console at startup and in docs/sd_webui.md).
REFUSED = {
    'sample_dpm_adaptive': 'adaptive step size: error control picks the steps from the trajectory, so there is no '
                           'fixed schedule to reflect on, and a reflected x would change which steps are taken',
}
