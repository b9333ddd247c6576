"""diffusers UNets as k-diffusion denoisers: SD 1.x (eps), SD 2.x (eps or v), SDXL, AnimateDiff, ModelScope.

Extra args (the conditioning layout, what ``cfg.CFGDenoiser`` batches):
  SD 1.x / 2.x, ModelScope: ``encoder_hidden_states [B, L, D]``.
  SDXL: also ``added_cond_kwargs={'text_embeds': [B, P], 'time_ids': [B, 6]}``.
  AnimateDiff (latents ``[B, C, F, H, W]``): ``encoder_hidden_states [B, L, D]``, one text per video; the
  adapter repeats it per frame, so cond and uncond batch at the video level.
Other UNet keywords (``cross_attention_kwargs``, ``timestep_cond``) pass through unchanged.
"""
from torch import nn

from .vp import alphas_cumprod, alphas_cumprod_from_config, cast_tree, require_diffusers, vp_denoiser

SD_SCHEDULE = dict(beta_schedule='scaled_linear', beta_start=0.00085, beta_end=0.012)
# The motion modules were trained with diffusers "linear" betas (LDM's sqrt_linear): sigma_max 25.1, not 14.6.
ANIMATEDIFF_SCHEDULE = dict(beta_schedule='linear', beta_start=0.00085, beta_end=0.012)
FAMILIES = {
    'sd1': (SD_SCHEDULE, 'epsilon'),
    'sd2': (SD_SCHEDULE, 'epsilon'),
    'sd2-v': (SD_SCHEDULE, 'v_prediction'),
    'sdxl': (SD_SCHEDULE, 'epsilon'),
    'animatediff': (ANIMATEDIFF_SCHEDULE, 'epsilon'),
    'modelscope': (SD_SCHEDULE, 'epsilon'),
}


class UNetNet(nn.Module):
    """Calls a diffusers UNet by keyword in its own dtype: ``(x_vp, t, **cond) -> raw prediction``."""

    def __init__(self, unet, frames_in_text=False):
        super().__init__()
        self.unet = unet
        self.frames_in_text = frames_in_text

    def forward(self, x, t, encoder_hidden_states, **cond):
        if self.frames_in_text and encoder_hidden_states.shape[0] == x.shape[0]:
            # UNetMotionModel folds frames into the batch and expects one text state per frame.
            encoder_hidden_states = encoder_hidden_states.repeat_interleave(x.shape[2], dim=0)
        dtype = self.unet.dtype
        return self.unet(sample=x.to(dtype), timestep=t, encoder_hidden_states=encoder_hidden_states.to(dtype),
                         **cast_tree(cond, dtype), return_dict=False)[0]


def unet_denoiser(unet, scheduler=None, *, family=None, prediction_type=None, quantize=False):
    """A k-diffusion denoiser over a diffusers UNet.

    The noise table and prediction type come from ``scheduler`` (a diffusers scheduler or its config: any of
    the pipeline's schedulers carries the training betas), or else from ``family`` (one of ``FAMILIES``).
    ``prediction_type`` overrides both (SD 2.x 768 is 'v_prediction', 2.x base 'epsilon').
    """
    diffusers = require_diffusers()
    motion = isinstance(unet, diffusers.UNetMotionModel)
    if not (motion or isinstance(unet, (diffusers.UNet2DConditionModel, diffusers.UNet3DConditionModel))):
        raise TypeError(f'unet_denoiser needs a diffusers UNet2DConditionModel, UNet3DConditionModel or '
                        f'UNetMotionModel, got {type(unet).__name__}')
    if scheduler is not None:
        config = getattr(scheduler, 'config', scheduler)
        table = alphas_cumprod_from_config(config)
        pred = config.get('prediction_type', 'epsilon')
    elif family is not None:
        if family not in FAMILIES:
            raise ValueError(f'family must be one of {sorted(FAMILIES)}, got {family!r}')
        sched, pred = FAMILIES[family]
        table = alphas_cumprod(**sched)
    else:
        raise TypeError('unet_denoiser needs the noise schedule: pass scheduler=<the pipeline scheduler> or '
                        f'family=<one of {sorted(FAMILIES)}>')
    net = UNetNet(unet, frames_in_text=motion)
    return vp_denoiser(net, table.to(unet.device), prediction_type or pred, quantize)
