"""Stable Video Diffusion (``UNetSpatioTemporalConditionModel``) as a k-diffusion denoiser: continuous EDM
with v-prediction.

SVD is already in k-diffusion's VE form with sigma_data = 1: the network sees ``c_in x`` with
``c_in = 1 / sqrt(sigma^2 + 1)`` at the continuous timestep ``c_noise = ln(sigma) / 4`` and predicts v, so
``D = x / (sigma^2 + 1) - v sigma / sqrt(sigma^2 + 1)`` (diffusers' ``EulerDiscreteScheduler`` with
``timestep_type='continuous'``, ``prediction_type='v_prediction'``; ComfyUI's V_PREDICTION on
ModelSamplingContinuousEDM). Its sigma range is 0.002 ... 700; the pipeline samples a Karras grid on it.

Latents are ``[B, F, 4, H, W]`` (frames second). Extra args:
  per branch: ``image_latents [B, F or 1, 4, H, W]`` (the VAE latent of the conditioning image, repeated over
  frames, neither scaled by the VAE factor nor by c_in) and ``encoder_hidden_states [B, 1, D]`` (its CLIP image
  embedding); the unconditional branch uses zeros for both, as the pipeline does.
  shared: ``added_time_ids [B, 3] = (fps - 1, motion_bucket_id, noise_aug_strength)``.
Guidance: diffusers scales it per frame, ``linspace(min_guidance_scale, max_guidance_scale, F)``;
:func:`frame_guidance` builds that scale; :class:`~w2sd_samplers.cfg.CFGDenoiser` applies a tensor scale.
"""
import torch
from torch import nn

from .. import _kdiff
from .flow import repeat_batch
from .vp import cast_tree, require_diffusers

SIGMA_MIN, SIGMA_MAX = 0.002, 700.


class SVDDenoiser(nn.Module):
    """k-diffusion denoiser over a diffusers ``UNetSpatioTemporalConditionModel`` (SVD, SVD-XT)."""

    def __init__(self, unet, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX):
        super().__init__()
        if not isinstance(unet, require_diffusers().UNetSpatioTemporalConditionModel):
            raise TypeError(f'SVDDenoiser needs a diffusers UNetSpatioTemporalConditionModel, '
                            f'got {type(unet).__name__}')
        self.unet = unet
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)

    def forward(self, x, sigma, image_latents, encoder_hidden_states, added_time_ids, **kwargs):
        x, sigma = x.float(), sigma.float()
        s = _kdiff.sampling().utils.append_dims(sigma, x.ndim)
        dtype = self.unet.dtype
        image_latents = image_latents.float().expand(-1, x.shape[1], -1, -1, -1)
        sample = torch.cat([x / (s ** 2 + 1) ** 0.5, image_latents], dim=2).to(dtype)
        v = self.unet(sample=sample, timestep=sigma.log() / 4, encoder_hidden_states=encoder_hidden_states.to(dtype),
                      added_time_ids=repeat_batch(added_time_ids, x.shape[0]).to(dtype),
                      **cast_tree(kwargs, dtype), return_dict=False)[0].float()
        return x / (s ** 2 + 1) - v * s / (s ** 2 + 1) ** 0.5

    def schedule(self, n, kind='karras', rho=7.):
        """``n``-step sigmas plus a trailing 0 on the model's range: 'karras' (the pipeline's) or 'exponential'."""
        K = _kdiff.sampling()
        if kind == 'karras':
            return K.get_sigmas_karras(n, self.sigma_min, self.sigma_max, rho)
        if kind == 'exponential':
            return K.get_sigmas_exponential(n, self.sigma_min, self.sigma_max)
        raise ValueError(f"schedule kind must be 'karras' or 'exponential', got {kind!r}")


def svd_denoiser(unet):
    """A :class:`SVDDenoiser` on ``unet``'s device."""
    return SVDDenoiser(unet).to(unet.device)


def frame_guidance(num_frames, min_guidance_scale=1., max_guidance_scale=3., device=None):
    """SVD's per-frame CFG scale ``[1, F, 1, 1, 1]``: linear from the first frame to the last."""
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
        raise ValueError(f'num_frames must be a positive integer, got {num_frames!r}')
    return torch.linspace(min_guidance_scale, max_guidance_scale, num_frames, device=device).view(1, -1, 1, 1, 1)
