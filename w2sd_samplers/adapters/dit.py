"""Class-conditional DiT models as k-diffusion denoisers: Meta's DiT (diffusers ``DiTTransformer2DModel``) and
the DDIM-family DiT-MoE checkpoints (S/2, B/2 of feizc/DiT-MoE; their rectified-flow XL/G checkpoints use the
flow adapter).

Both predict eps in the first C output channels and a learned variance in the other C, which is dropped. Both use
diffusers' "linear" betas 1e-4..0.02 (sigma 0.0100 ... 157.4). Extra args: ``class_labels [B]`` (long; the null
class for CFG is 1000 for ImageNet DiT, ``num_classes`` for DiT-MoE). ``CFGDenoiser`` guides every latent
channel, as diffusers' DiTPipeline does (the original repos guide only the first three).
"""
from torch import nn

from .vp import alphas_cumprod, alphas_cumprod_from_config, require_diffusers, vp_denoiser

DIT_SCHEDULE = dict(beta_schedule='linear', beta_start=0.0001, beta_end=0.02)


class DiTNet(nn.Module):
    """Calls a diffusers ``DiTTransformer2DModel`` by keyword: ``(x_vp, t, class_labels) -> eps``."""

    def __init__(self, transformer):
        super().__init__()
        self.transformer = transformer

    def forward(self, x, t, class_labels):
        out = self.transformer(hidden_states=x.to(self.transformer.dtype), timestep=t, class_labels=class_labels,
                               return_dict=False)[0]
        return out[:, :x.shape[1]]


class DiTMoENet(nn.Module):
    """Calls a DiT-MoE repo model ``DiT.forward(x, t, y)`` by keyword: ``(x_vp, t, class_labels) -> eps``.

    The DDIM checkpoints were trained on integer timesteps 0..999; fractional ones interpolate the embedding.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, t, class_labels):
        dtype = next(self.model.parameters()).dtype
        return self.model(x=x.to(dtype), t=t, y=class_labels)[:, :x.shape[1]]


def dit_denoiser(transformer, scheduler=None, quantize=False):
    """A k-diffusion denoiser over a diffusers ``DiTTransformer2DModel`` (table from ``scheduler`` if given)."""
    diffusers = require_diffusers()
    if not isinstance(transformer, diffusers.DiTTransformer2DModel):
        raise TypeError(f'dit_denoiser needs a DiTTransformer2DModel, got {type(transformer).__name__}')
    table = alphas_cumprod(**DIT_SCHEDULE) if scheduler is None else \
        alphas_cumprod_from_config(getattr(scheduler, 'config', scheduler))
    return vp_denoiser(DiTNet(transformer), table.to(transformer.device), 'epsilon', quantize)


def ditmoe_denoiser(model, quantize=False):
    """A k-diffusion denoiser over a DDIM-family DiT-MoE model (the repo's ``models.DiT``, learned sigma)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f'ditmoe_denoiser needs the DiT-MoE torch module, got {type(model).__name__}')
    device = next(model.parameters()).device
    return vp_denoiser(DiTMoENet(model), alphas_cumprod(**DIT_SCHEDULE).to(device), 'epsilon', quantize)
