"""Official-code parity mode against the official algorithm run on diffusers' DDIM and DDIM-inverse schedulers."""
import pytest
import torch

diffusers = pytest.importorskip('diffusers')
import k_diffusion.sampling as K  # noqa: E402

from test_adapters_vp import sdxl_cond, tiny_sdxl_unet  # noqa: E402
from w2sd_samplers.adapters import unet_denoiser  # noqa: E402
from w2sd_samplers.cfg import CFGDenoiser  # noqa: E402
from w2sd_samplers.parity import parity_sigmas, reflect_official, sample_w2sd_official  # noqa: E402

STEPS, MAIN_CFG, STRONG_CFG, WEAK_CFG = 10, 5.5, 3.0, 1.0


def official_w2sd(strong_unet, weak_unet, cond, uncond, latents, steps):
    """The authors' loop (paper.md 1.4, 7.3) in plain diffusers: SDXL DDIM config, reflection_operation at every
    step but the last, the weak UNet on the denoised latent with label t_i, inverse step called with t_{i+1}."""
    config = dict(beta_schedule='scaled_linear', beta_start=0.00085, beta_end=0.012, steps_offset=1,
                  set_alpha_to_one=False, clip_sample=False, timestep_spacing='leading')
    scheduler = diffusers.DDIMScheduler(**config)
    inverse = diffusers.DDIMInverseScheduler.from_config(scheduler.config)
    scheduler.set_timesteps(steps)
    inverse.set_timesteps(steps)
    timesteps = scheduler.timesteps
    both = {k: torch.cat([uncond[k], cond[k]]) if k == 'encoder_hidden_states' else
            {kk: torch.cat([uncond[k][kk], cond[k][kk]]) for kk in cond[k]} for k in cond}

    def eps(unet, x, t, scale):
        e_u, e_c = unet(torch.cat([x, x]), t, **both).sample.chunk(2)
        return e_u + scale * (e_c - e_u)

    for i, t in enumerate(timesteps):
        if i < len(timesteps) - 1:
            denoised = scheduler.step(eps(strong_unet, latents, t, STRONG_CFG), t, latents).prev_sample
            latents = inverse.step(eps(weak_unet, denoised, t, WEAK_CFG), timesteps[i + 1], denoised).prev_sample
        latents = scheduler.step(eps(strong_unet, latents, t, MAIN_CFG), t, latents).prev_sample
    return latents


def roles(steps_unet, weak_unet):
    strong = CFGDenoiser(unet_denoiser(steps_unet, family='sdxl'))
    weak = CFGDenoiser(unet_denoiser(weak_unet, family='sdxl'))
    return strong, weak


def test_official_parity_matches_the_official_algorithm_on_diffusers_schedulers():
    strong_unet, weak_unet = tiny_sdxl_unet(0), tiny_sdxl_unet(1)
    cond, uncond = sdxl_cond(2, 1), sdxl_cond(2, 2)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    strong, weak = roles(strong_unet, weak_unet)
    main_args = {'cond': cond, 'uncond': uncond, 'cond_scale': MAIN_CFG}
    sigmas = parity_sigmas(strong.inner, STEPS)
    assert abs(float(sigmas[-1]) - 0.02917) < 1e-4           # ends at abar_0, not at 0
    with torch.no_grad():
        ref = official_w2sd(strong_unet, weak_unet, cond, uncond, latents, STEPS)
        x = sample_w2sd_official(strong, latents * (1 + sigmas[0] ** 2).sqrt(), sigmas, main_args, disable=True,
                                 weak=weak, weak_extra_args={**main_args, 'cond_scale': WEAK_CFG},
                                 strong_extra_args={**main_args, 'cond_scale': STRONG_CFG})
    got = x / (1 + sigmas[-1] ** 2).sqrt()
    assert float((got - ref).norm() / ref.norm()) < 1e-4


def test_parity_sampler_reduces_to_euler_and_checks_lam():
    strong, weak = roles(tiny_sdxl_unet(0), tiny_sdxl_unet(1))
    ea = {'cond': sdxl_cond(1, 1), 'uncond': sdxl_cond(1, 2), 'cond_scale': 2.}
    sigmas = parity_sigmas(strong.inner, 6)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * sigmas[0]
    with torch.no_grad():
        assert not torch.allclose(reflect_official(x, 1, sigmas, strong, weak, ea, ea), x)
        assert torch.equal(sample_w2sd_official(strong, x, sigmas, ea, disable=True, weak=weak, lam=0),
                           K.sample_euler(strong, x, sigmas, ea, disable=True))
    with pytest.raises(ValueError, match='lam'):
        sample_w2sd_official(strong, x, sigmas, ea, weak=weak, lam=len(sigmas) - 1)
    with pytest.raises(ValueError, match='needs sigmas'):
        reflect_official(x, len(sigmas) - 2, sigmas, strong, weak, ea, ea)
