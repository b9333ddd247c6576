"""CogVideoX (``CogVideoXTransformer3DModel``) as a k-diffusion denoiser: v-prediction on a shifted,
zero-terminal-SNR table.

Latents are ``[B, F, C, H, W]`` (latent frames second). Extra args: ``encoder_hidden_states [B, L, D]`` (T5
states; with sincos position embeddings L must equal the config's ``max_text_seq_length``). Models with rotary
position embeddings (5b, 1.5) get them computed from the latent size, as the pipeline does; pass
``image_rotary_emb`` yourself to override.
"""
from torch import nn

from .vp import alphas_cumprod, alphas_cumprod_from_config, cast_tree, require_diffusers, vp_denoiser

# snr_shift_scale from the HF scheduler configs: 3.0 for CogVideoX-2b, 1.0 for 5b; both zero terminal SNR.
SNR_SHIFT = {'2b': 3.0, '5b': 1.0}


class CogVideoXNet(nn.Module):
    """Calls a CogVideoX transformer by keyword in its own dtype: ``(x_vp, t, **cond) -> v``."""

    def __init__(self, transformer):
        super().__init__()
        self.transformer = transformer

    def rotary_emb(self, x):
        from diffusers.models.embeddings import get_3d_rotary_pos_embed
        from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid
        c = self.transformer.config
        p, p_t = c.patch_size, c.patch_size_t
        grid = (x.shape[-2] // p, x.shape[-1] // p)
        base_h, base_w = c.sample_height // p, c.sample_width // p
        if p_t is None:
            crops = get_resize_crop_region_for_grid(grid, base_w, base_h)
            return get_3d_rotary_pos_embed(embed_dim=c.attention_head_dim, crops_coords=crops, grid_size=grid,
                                           temporal_size=x.shape[1], device=x.device)
        return get_3d_rotary_pos_embed(embed_dim=c.attention_head_dim, crops_coords=None, grid_size=grid,
                                       temporal_size=(x.shape[1] + p_t - 1) // p_t, grid_type='slice',
                                       max_size=(base_h, base_w), device=x.device)

    def forward(self, x, t, encoder_hidden_states, image_rotary_emb=None, **cond):
        if image_rotary_emb is None and self.transformer.config.use_rotary_positional_embeddings:
            image_rotary_emb = self.rotary_emb(x)
        dtype = self.transformer.dtype
        return self.transformer(hidden_states=x.to(dtype), timestep=t,
                                encoder_hidden_states=encoder_hidden_states.to(dtype),
                                image_rotary_emb=image_rotary_emb, **cast_tree(cond, dtype), return_dict=False)[0]


def cogvideox_denoiser(transformer, scheduler=None, *, variant=None, quantize=False):
    """A k-diffusion denoiser over a ``CogVideoXTransformer3DModel``.

    The table comes from ``scheduler`` (e.g. the pipeline's ``CogVideoXDDIMScheduler``, whose config holds
    ``snr_shift_scale`` and ``rescale_betas_zero_snr``) or from ``variant`` '2b' / '5b'. The zero-terminal-SNR
    end is clamped (sigma_max 4518.8 on 5b), so Karras and exponential schedules stay finite.
    """
    diffusers = require_diffusers()
    if not isinstance(transformer, diffusers.CogVideoXTransformer3DModel):
        raise TypeError(f'cogvideox_denoiser needs a CogVideoXTransformer3DModel, got {type(transformer).__name__}')
    if scheduler is not None:
        config = getattr(scheduler, 'config', scheduler)
        table, pred = alphas_cumprod_from_config(config), config.get('prediction_type', 'epsilon')
    elif variant in SNR_SHIFT:
        table = alphas_cumprod('scaled_linear', 0.00085, 0.012, snr_shift_scale=SNR_SHIFT[variant],
                               zero_terminal_snr=True)
        pred = 'v_prediction'
    else:
        raise TypeError(f"cogvideox_denoiser needs scheduler=<the pipeline scheduler> or variant='2b' or '5b', "
                        f'got variant={variant!r}')
    return vp_denoiser(CogVideoXNet(transformer), table.to(transformer.device), pred, quantize)
