"""Discrete VP (DDPM) models as k-diffusion denoisers: the schedule math shared by every VP family.

A VP model sees ``x_vp = sqrt(abar) x0 + sqrt(1 - abar) eps``; in k-diffusion's VE form ``x = x_vp / sqrt(abar)``
with ``sigma = sqrt((1 - abar) / abar)``. k-diffusion's ``DiscreteEpsDDPMDenoiser`` / ``DiscreteVDDPMDenoiser``
already carry that conversion and the sigma <-> timestep table; the classes here only add how a network is
called (keywords, dtype) through a ``net(x_vp, t, **cond)`` callable that each family module provides.

Sigma math stays in float32; the network sees its own dtype; the denoised output is float32.
"""
import math

import torch
from k_diffusion import external

from .. import _kdiff

# ComfyUI's clamp for zero-terminal-SNR tables: the last abar becomes this instead of 0 (sigma_max 4518.76).
ZSNR_LAST_ALPHA_CUMPROD = 4.8973451890853435e-08
PREDICTION_TYPES = ('epsilon', 'v_prediction')
SPACINGS = ('leading', 'trailing', 'linspace')


def alphas_cumprod(beta_schedule='scaled_linear', beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000,
                   *, snr_shift_scale=1., zero_terminal_snr=False, trained_betas=None):
    """The cumulative alpha table (float32) of a diffusers-style beta schedule.

    Names follow diffusers: ``scaled_linear`` (SD, SDXL, ModelScope, CogVideoX) is linear in sqrt(beta);
    ``linear`` (AnimateDiff, DiT) is linear in beta; ``squaredcos_cap_v2`` is the cosine schedule.
    ``snr_shift_scale`` s divides the SNR by s (CogVideoX; sigma -> sqrt(s) sigma). ``zero_terminal_snr``
    rescales the table to reach abar = 0 at the end (Lin et al. 2023), then clamps the last entry so that
    sigma_max stays finite.
    """
    n = num_train_timesteps
    if trained_betas is not None:
        betas = torch.as_tensor(trained_betas, dtype=torch.float64, device='cpu')
    elif beta_schedule == 'linear':
        betas = torch.linspace(beta_start, beta_end, n, dtype=torch.float64, device='cpu')
    elif beta_schedule == 'scaled_linear':
        betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, n, dtype=torch.float64, device='cpu') ** 2
    elif beta_schedule == 'squaredcos_cap_v2':
        def abar(t):
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        betas = torch.tensor([min(1 - abar((i + 1) / n) / abar(i / n), 0.999) for i in range(n)],
                             dtype=torch.float64, device='cpu')
    else:
        raise ValueError(f"beta_schedule must be 'linear', 'scaled_linear' or 'squaredcos_cap_v2' "
                         f"(or pass trained_betas), got {beta_schedule!r}")
    if betas.ndim != 1 or len(betas) == 0 or not (torch.isfinite(betas).all() and (betas >= 0).all()
                                                  and (betas < 1).all()):
        given = 'trained_betas' if trained_betas is not None else f'beta_start={beta_start!r}, beta_end={beta_end!r}'
        raise ValueError(f'the betas must be a non-empty list of numbers in [0, 1) (check {given} in the scheduler '
                         'config): others give NaN or infinite sigmas')
    if not (isinstance(snr_shift_scale, (int, float)) and math.isfinite(snr_shift_scale) and snr_shift_scale > 0):
        raise ValueError(f'snr_shift_scale must be a finite number > 0, got {snr_shift_scale!r}')
    ac = torch.cumprod(1 - betas, 0)
    ac = ac / (snr_shift_scale + (1 - snr_shift_scale) * ac)
    if zero_terminal_snr:
        root = ac.sqrt()
        root = (root - root[-1]) * root[0] / (root[0] - root[-1])
        ac = root ** 2
        ac[-1] = ZSNR_LAST_ALPHA_CUMPROD
    return ac.float()


def alphas_cumprod_from_config(config):
    """``alphas_cumprod`` from a diffusers scheduler config (a dict or FrozenDict)."""
    return alphas_cumprod(config.get('beta_schedule', 'linear'), config.get('beta_start', 0.0001),
                          config.get('beta_end', 0.02), config.get('num_train_timesteps', 1000),
                          snr_shift_scale=config.get('snr_shift_scale', 1.),
                          zero_terminal_snr=config.get('rescale_betas_zero_snr', False),
                          trained_betas=config.get('trained_betas'))


def require_diffusers():
    """Import diffusers, or say which extra provides it."""
    try:
        import diffusers
    except ImportError as e:
        raise ImportError('this adapter needs diffusers, transformers and peft: pip install "diffusers>=0.40" '
                          'transformers peft (in a w2sd-samplers checkout: pip install -e ".[diffusers]")') from e
    return diffusers


def cast_tree(value, dtype):
    """Floating tensors inside nested dicts/lists/tuples cast to ``dtype`` (others untouched)."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, dict):
        return {k: cast_tree(v, dtype) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(cast_tree(v, dtype) for v in value)
    return value


class _FloatIO:
    # Hosts may pass fp16 sigmas or latents; the scalings and the table lookup must run in float32.
    def forward(self, input, sigma, **cond):
        return super().forward(input.float(), sigma.float(), **cond)

    def _net_output(self, x, t, **cond):
        return self.inner_model(x, t, **cond).float()

    def schedule(self, n, kind='karras', **kwargs):
        """An ``n``-step sampling schedule for this model; see :func:`schedule`."""
        return schedule(self, n, kind, **kwargs)


class EpsDenoiser(_FloatIO, external.DiscreteEpsDDPMDenoiser):
    """k-diffusion denoiser over an eps-predicting ``net(x_vp, t, **cond)`` with the given abar table."""

    def get_eps(self, x, t, **cond):
        return self._net_output(x, t, **cond)


class VDenoiser(_FloatIO, external.DiscreteVDDPMDenoiser):
    """k-diffusion denoiser over a v-predicting ``net(x_vp, t, **cond)`` with the given abar table."""

    def get_v(self, x, t, **cond):
        return self._net_output(x, t, **cond)


def vp_denoiser(net, alphas_cumprod, prediction_type='epsilon', quantize=False):
    """An :class:`EpsDenoiser` or :class:`VDenoiser`; ``net(x_vp, t[B], **cond)`` returns the raw prediction.

    ``quantize=True`` feeds the nearest integer timestep (ComfyUI's choice); by default the timestep is
    interpolated in log sigma, which diffusers networks accept.
    """
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f'prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r} '
                         "(check the scheduler config's prediction_type)")
    cls = EpsDenoiser if prediction_type == 'epsilon' else VDenoiser
    device = alphas_cumprod.device if isinstance(alphas_cumprod, torch.Tensor) else 'cpu'  # not the default device
    return cls(net, torch.as_tensor(alphas_cumprod, dtype=torch.float32, device=device), quantize)


def spaced_timesteps(n, spacing='leading', steps_offset=0, num_train_timesteps=1000):
    """The ``n`` inference timesteps (noisiest first) of diffusers' ``timestep_spacing``."""
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= num_train_timesteps:
        raise ValueError(f'the number of steps must be an integer in [1, {num_train_timesteps}], got {n!r}')
    if spacing == 'leading':
        t = torch.arange(n - 1, -1, -1, dtype=torch.float64, device='cpu') * (num_train_timesteps // n) + steps_offset
    elif spacing == 'trailing':
        t = (num_train_timesteps - torch.arange(n, dtype=torch.float64, device='cpu') * (num_train_timesteps / n)).round() - 1
    elif spacing == 'linspace':
        t = torch.linspace(0, num_train_timesteps - 1, n, dtype=torch.float64, device='cpu').round().flip(0)
    else:
        raise ValueError(f'spacing must be one of {SPACINGS}, got {spacing!r}')
    return t.long()


def timestep_sigmas(denoiser, timesteps, final=0.):
    """The sigmas of integer ``timesteps`` in ``denoiser``'s table, then ``final`` (0 = a clean sample).

    ``final='alpha0'`` ends at the table's first sigma, as diffusers' DDIM with ``set_alpha_to_one=False``.
    """
    t = torch.as_tensor(timesteps, device='cpu').long()
    if t.ndim != 1 or len(t) == 0 or t.min() < 0 or t.max() >= len(denoiser.sigmas):
        raise ValueError(f'timesteps must be a 1-D list of integers in [0, {len(denoiser.sigmas) - 1}]')
    table = denoiser.sigmas.float().cpu()
    last = table[0] if final == 'alpha0' else table.new_tensor(float(final))
    return torch.cat([table[t], last.reshape(1)]).to(denoiser.sigmas.device)


def schedule(denoiser, n, kind='karras', *, rho=7., spacing='leading', steps_offset=0):
    """``n``-step sigmas (plus a trailing 0) for a VP denoiser.

    kind: 'karras' or 'exponential' on the model's sigma range (k-diffusion's schedules), or 'native' for the
    model's own discrete timestep grid with diffusers' ``spacing`` ('leading', 'trailing', 'linspace').
    """
    K = _kdiff.sampling()
    smin, smax = float(denoiser.sigma_min), float(denoiser.sigma_max)
    device = denoiser.sigmas.device
    if kind == 'karras':
        return K.get_sigmas_karras(n, smin, smax, rho, device=device)
    if kind == 'exponential':
        return K.get_sigmas_exponential(n, smin, smax, device=device)
    if kind == 'native':
        return timestep_sigmas(denoiser, spaced_timesteps(n, spacing, steps_offset, len(denoiser.sigmas)))
    raise ValueError(f"schedule kind must be 'karras', 'exponential' or 'native', got {kind!r}")
