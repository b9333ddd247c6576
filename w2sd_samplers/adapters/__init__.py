"""Model families as k-diffusion denoisers ``D(x, sigma, **cond)``.

Submodules load lazily so that ``import w2sd_samplers.adapters`` needs neither diffusers nor the family code;
each adapter that needs diffusers says which extra to install. To add a family module, add its public names to
``_EXPORTS``.
"""
import importlib

_EXPORTS = {
    'vp': ('alphas_cumprod', 'alphas_cumprod_from_config', 'vp_denoiser', 'EpsDenoiser', 'VDenoiser',
           'spaced_timesteps', 'timestep_sigmas', 'schedule'),
    'unet': ('unet_denoiser', 'UNetNet'),
    'cogvideox': ('cogvideox_denoiser', 'CogVideoXNet'),
    'dit': ('dit_denoiser', 'ditmoe_denoiser', 'DiTNet', 'DiTMoENet'),
    'flow': ('FlowDenoiser', 'sd3_denoiser', 'flux_denoiser', 'wan_denoiser', 'ditmoe_flow_denoiser', 'flow_sigmas',
             'scheduler_sigmas', 'flux_shift', 'shift_t', 't_to_sigma'),
    'edm': ('SVDDenoiser', 'svd_denoiser', 'frame_guidance'),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name):
    if name not in _WHERE:
        raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
    return getattr(importlib.import_module(f'.{_WHERE[name]}', __name__), name)
