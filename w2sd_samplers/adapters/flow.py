"""Rectified-flow models as k-diffusion denoisers: SD3 / SD3.5, Flux, Wan 2.1 and the DiT-MoE RF checkpoints.

A flow model sees ``x_t = (1 - t) x0 + t eps`` and predicts the velocity ``v = eps - x0``. That path is
k-diffusion's VE path rescaled: with ``sigma = t / (1 - t)`` (``t = sigma / (1 + sigma)``), ``x_t = x / (1 + sigma)``
for the VE sample ``x = x0 + sigma eps``, and the denoised estimate is ``x0 = x_t - t v``. In this form every
k-diffusion sampler (ancestral and SDE ones included) runs the model's own process; Euler reproduces
diffusers' ``FlowMatchEulerDiscreteScheduler`` step for step.

Shift. The flow shift ``t' = s t / (1 + (s - 1) t)`` is ``sigma' = s sigma``: it only chooses the sigma grid, so it
lives in the schedules below and not in the denoiser. SD3 uses s = 3, Wan 2.1 s = 5 (720p) or 3 (480p), Flux
s = e^mu with mu growing with the image's token count (:func:`flux_shift`), Flux-schnell and DiT-MoE s = 1.

The cap. t = 1 is sigma = infinity, which no sampler can start from. The schedules clamp t to ``t_max``
(default ``T_MAX = 0.9999``, sigma_max = 9999): the first model call then sees ``0.9999 eps`` at timestep 999.9
instead of ``eps`` at 1000, a 1e-4 relative change of the start. Keep latents in float32 while sampling
(they reach about 1e4 at the first step).

Conditioning layouts (extra args; ``cfg.CFGDenoiser`` batches ``cond``/``uncond``, the rest is shared):
  SD3: ``encoder_hidden_states [B, L, D]``, ``pooled_projections [B, P]`` per branch; other transformer
  keywords (``skip_layers``, ``joint_attention_kwargs``) pass through.
  Flux: ``encoder_hidden_states``, ``pooled_projections`` per branch; shared ``guidance`` (a number or ``[B]``,
  the distilled guidance of Flux-dev, not CFG), ``img_ids`` / ``txt_ids`` (built as the pipeline does when
  absent). Latents stay ``[B, C, H, W]``: the adapter packs them into 2x2 tokens for the model and unpacks the
  output, so noise and sampler math see ordinary images.
  Wan: ``encoder_hidden_states [B, L, D]`` per branch; for image-to-video ``encoder_hidden_states_image`` per
  branch (or shared) and the shared ``condition`` (mask and image latents) concatenated to the input channels.
  DiT-MoE RF: ``class_labels [B]`` (the null class ``num_classes`` for CFG).
"""
import math

import torch
from torch import nn

from .. import _kdiff
from .vp import cast_tree, require_diffusers

T_MAX = 0.9999
# Smallest t of the 1000-step training grids (diffusers' FlowMatchEulerDiscreteScheduler): the low end of
# the Karras and exponential schedules before the shift.
T_MIN = 1 / 1000
SHIFTS = {'sd3': 3.0, 'wan-480p': 3.0, 'wan-720p': 5.0, 'flux-schnell': 1.0, 'ditmoe': 1.0}
SCHEDULE_KINDS = ('uniform', 'karras', 'exponential')


def repeat_batch(value, n):
    """A batch-first tensor repeated to ``n`` rows: shared extra args follow CFG's doubled batch."""
    if value.shape[0] == n:
        return value
    if n % value.shape[0]:
        raise ValueError(f'a shared extra arg has batch {value.shape[0]}, which does not divide the batch {n}')
    return value.repeat(n // value.shape[0], *[1] * (value.ndim - 1))


def _require_type(obj, cls_name, fn_name):
    cls = getattr(require_diffusers(), cls_name)
    if not isinstance(obj, cls):
        raise TypeError(f'{fn_name} needs a diffusers {cls_name}, got {type(obj).__name__}')


class FlowDenoiser(nn.Module):
    """k-diffusion denoiser over a velocity network ``net(x_t, timestep[B], **cond) -> v``.

    ``timestep = timestep_scale * t``: 1000 for SD3 and Wan (diffusers passes scheduler timesteps), 1 for Flux
    (the transformer multiplies by 1000 itself) and DiT-MoE (raw t). Sigma math runs in float32 and the
    denoised output is float32 whatever the network's dtype.
    """

    def __init__(self, net, timestep_scale=1000.):
        super().__init__()
        if not callable(net):
            raise TypeError(f'FlowDenoiser needs a callable velocity network, got {type(net).__name__}')
        self.net = net
        self.timestep_scale = float(timestep_scale)

    def forward(self, x, sigma, **cond):
        x, sigma = x.float(), sigma.float()
        t = sigma / (1 + sigma)
        t_ = _kdiff.sampling().utils.append_dims(t, x.ndim)
        x_t = x * (1 - t_)
        v = self.net(x_t, t * self.timestep_scale, **cond).float()
        return x_t - t_ * v


def shift_t(t, shift):
    """The flow shift ``s t / (1 + (s - 1) t)`` (diffusers' ``shift``; Flux's exponential shift with s = e^mu)."""
    return shift * t / (1 + (shift - 1) * t)


def t_to_sigma(t, t_max=T_MAX):
    """VE sigmas ``t / (1 - t)`` of flow times, t clamped to ``t_max`` (t = 0 stays sigma = 0)."""
    t = torch.as_tensor(t, dtype=torch.float64).clamp(max=t_max)
    return (t / (1 - t)).float()


def _check_schedule_args(n, shift, t_max):
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f'the number of steps must be a positive integer, got {n!r}')
    if not shift > 0:
        raise ValueError(f'shift must be > 0, got {shift!r}')
    if not 0 < t_max < 1:
        raise ValueError(f't_max (the cap on flow time t = 1, where sigma is infinite) must lie in (0, 1), '
                         f'got {t_max!r}')


def flow_sigmas(n, shift=1., kind='uniform', *, t_max=T_MAX, t_min=T_MIN, rho=7., device='cpu'):
    """``n``-step VE sigmas plus a trailing 0 for a flow model with the given shift.

    kind: 'uniform' takes t = 1, (n-1)/n, ..., 1/n, shifted, t clamped to ``t_max``: Flux's pipeline grid
    and DiT-MoE's Euler sampler. 'karras' and 'exponential' are k-diffusion's schedules between the shifted
    ``t_min`` and ``t_max`` in sigma. For a pipeline's exact grid, use :func:`scheduler_sigmas`.
    """
    _check_schedule_args(n, shift, t_max)
    if kind == 'uniform':
        t = shift_t(torch.linspace(1, 1 / n, n, dtype=torch.float64), shift)
        return torch.cat([t_to_sigma(t, t_max), torch.zeros(1)]).to(device)
    if not 0 < t_min < t_max:
        raise ValueError(f't_min must lie in (0, t_max), got {t_min!r}')
    K = _kdiff.sampling()
    lo = float(t_to_sigma(shift_t(torch.tensor(t_min, dtype=torch.float64), shift), t_max))
    hi = t_max / (1 - t_max)
    if kind == 'karras':
        return K.get_sigmas_karras(n, lo, hi, rho, device=device)
    if kind == 'exponential':
        return K.get_sigmas_exponential(n, lo, hi, device=device)
    raise ValueError(f'schedule kind must be one of {SCHEDULE_KINDS}, got {kind!r}')


def scheduler_sigmas(scheduler, t_max=T_MAX):
    """The VE sigmas of a flow scheduler's current grid, after its ``set_timesteps`` (the native schedule).

    Works for any scheduler whose ``sigmas`` are flow times ending in 0 (``FlowMatchEulerDiscreteScheduler``,
    UniPC or DPM-Solver with ``use_flow_sigmas``); the leading t = 1 is clamped to ``t_max``.
    """
    t = getattr(scheduler, 'sigmas', None)
    if not isinstance(t, torch.Tensor) or t.ndim != 1 or len(t) < 2 or float(t[-1]) != 0 or float(t.max()) > 1:
        raise ValueError('scheduler_sigmas needs a flow-matching scheduler after set_timesteps(): its sigmas '
                         'must be flow times in [0, 1] ending in 0')
    if not 0 < t_max < 1:
        raise ValueError(f't_max must lie in (0, 1), got {t_max!r}')
    return t_to_sigma(t.cpu(), t_max).to(t.device)


def flux_shift(latent_height, latent_width, base_seq_len=256, max_seq_len=4096, base_shift=0.5, max_shift=1.15):
    """Flux-dev's resolution-dependent shift e^mu for ``[B, 16, H, W]`` latents (diffusers' ``calculate_shift``).

    mu is linear in the packed token count (H/2)(W/2): 0.5 at 256 tokens, 1.15 at 4096 (1024 x 1024 pixels).
    """
    seq = (latent_height // 2) * (latent_width // 2)
    mu = base_shift + (max_shift - base_shift) * (seq - base_seq_len) / (max_seq_len - base_seq_len)
    return math.exp(mu)


class SD3Net(nn.Module):
    """Calls an ``SD3Transformer2DModel`` by keyword in its own dtype: ``(x_t, 1000 t, **cond) -> v``."""

    def __init__(self, transformer):
        super().__init__()
        self.transformer = transformer

    def forward(self, x, timestep, encoder_hidden_states, pooled_projections, **kwargs):
        dtype = self.transformer.dtype
        return self.transformer(hidden_states=x.to(dtype), timestep=timestep,
                                encoder_hidden_states=encoder_hidden_states.to(dtype),
                                pooled_projections=pooled_projections.to(dtype), **cast_tree(kwargs, dtype),
                                return_dict=False)[0]


def sd3_denoiser(transformer):
    """A k-diffusion denoiser over a diffusers ``SD3Transformer2DModel`` (SD3, SD3.5; sample with shift 3)."""
    _require_type(transformer, 'SD3Transformer2DModel', 'sd3_denoiser')
    return FlowDenoiser(SD3Net(transformer), timestep_scale=1000.)


def pack(x):
    """Flux's 2x2 packing ``[B, C, H, W] -> [B, (H/2)(W/2), 4C]``."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens, height, width):
    """The inverse of :func:`pack` for latents of the given height and width."""
    b, _, d = tokens.shape
    return tokens.view(b, height // 2, width // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(
        b, d // 4, height, width)


def flux_img_ids(height, width, device=None):
    """Position ids ``[(H/2)(W/2), 3] = (0, row, col)`` of the packed tokens of ``[B, C, H, W]`` latents."""
    rows, cols = torch.meshgrid(torch.arange(height // 2), torch.arange(width // 2), indexing='ij')
    return torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).float().to(device)


class FluxNet(nn.Module):
    """Calls a ``FluxTransformer2DModel`` on packed tokens: ``([B, C, H, W] x_t, t, **cond) -> [B, C, H, W] v``."""

    def __init__(self, transformer):
        super().__init__()
        self.transformer = transformer

    def forward(self, x, timestep, encoder_hidden_states, pooled_projections, guidance=None, img_ids=None,
                txt_ids=None, **kwargs):
        b, _, h, w = x.shape
        if h % 2 or w % 2:
            raise ValueError(f'Flux latents need even height and width, got {h}x{w}')
        dtype = self.transformer.dtype
        if img_ids is None:
            img_ids = flux_img_ids(h, w, x.device)
        if txt_ids is None:
            txt_ids = torch.zeros(encoder_hidden_states.shape[1], 3, device=x.device)
        if self.transformer.config.guidance_embeds:
            if guidance is None:
                raise ValueError('this Flux transformer is guidance-distilled (Flux-dev): pass guidance=<number> '
                                 'in extra_args (3.5 is the usual value)')
            guidance = repeat_batch(torch.as_tensor(guidance, dtype=torch.float32, device=x.device).reshape(-1), b)
        elif guidance is not None:
            raise ValueError('this Flux transformer has no guidance embedding (schnell-like): drop guidance from '
                             'extra_args and use CFG for guidance')
        v = self.transformer(hidden_states=pack(x).to(dtype), timestep=timestep, guidance=guidance,
                             encoder_hidden_states=encoder_hidden_states.to(dtype),
                             pooled_projections=pooled_projections.to(dtype), img_ids=img_ids.to(dtype),
                             txt_ids=txt_ids.to(dtype), **cast_tree(kwargs, dtype), return_dict=False)[0]
        return unpack(v, h, w)


def flux_denoiser(transformer):
    """A k-diffusion denoiser over a diffusers ``FluxTransformer2DModel`` on ``[B, C, H, W]`` latents.

    Schedules: shift :func:`flux_shift` for Flux-dev, 1 for schnell.
    """
    _require_type(transformer, 'FluxTransformer2DModel', 'flux_denoiser')
    return FlowDenoiser(FluxNet(transformer), timestep_scale=1.)


class WanNet(nn.Module):
    """Calls a ``WanTransformer3DModel`` by keyword on ``[B, C, F, H, W]`` latents: ``(x_t, 1000 t, **cond) -> v``."""

    def __init__(self, transformer):
        super().__init__()
        self.transformer = transformer

    def forward(self, x, timestep, encoder_hidden_states, condition=None, **kwargs):
        if condition is not None:
            # Image-to-video: the mask and image latents ride along as extra input channels, unscaled.
            x = torch.cat([x, repeat_batch(condition.to(x.dtype), x.shape[0])], dim=1)
        dtype = self.transformer.dtype
        return self.transformer(hidden_states=x.to(dtype), timestep=timestep,
                                encoder_hidden_states=encoder_hidden_states.to(dtype), **cast_tree(kwargs, dtype),
                                return_dict=False)[0]


def wan_denoiser(transformer):
    """A k-diffusion denoiser over a diffusers ``WanTransformer3DModel`` (Wan 2.1; shift 5 at 720p, 3 at 480p)."""
    _require_type(transformer, 'WanTransformer3DModel', 'wan_denoiser')
    return FlowDenoiser(WanNet(transformer), timestep_scale=1000.)


class DiTMoEFlowNet(nn.Module):
    """Calls a DiT-MoE repo model ``DiT.forward(x, t, y)``: ``(x_t, t, class_labels) -> v`` (first C channels)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, timestep, class_labels):
        dtype = next(self.model.parameters()).dtype
        return self.model(x=x.to(dtype), t=timestep.to(dtype), y=class_labels)[:, :x.shape[1]]


def ditmoe_flow_denoiser(model):
    """A k-diffusion denoiser over a rectified-flow DiT-MoE checkpoint (XL/2-8E2A, G/2-16E2A; the repo's
    ``models.DiT``). These were trained on raw t in [0, 1] with no shift; the repo samples with
    ``flow_sigmas(n, 1., 'uniform')``'s grid.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f'ditmoe_flow_denoiser needs the DiT-MoE torch module, got {type(model).__name__}')
    return FlowDenoiser(DiTMoEFlowNet(model), timestep_scale=1.)
