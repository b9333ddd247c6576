"""Classifier-free guidance as a k-diffusion denoiser, generic over conditioning layouts.

``CFGDenoiser(inner)(x, sigma, cond=..., uncond=..., cond_scale=s, **shared)`` computes
``D_u + s (D_c - D_u)`` where ``cond`` and ``uncond`` are the extra args of ``inner`` for each branch (dicts whose
tensors carry the batch dimension first, nested dicts and lists allowed, as SDXL's ``added_cond_kwargs``).
Both branches run as one batched forward; a number scale of exactly 1 skips the unconditional branch and 0 the
conditional one. Because the scale sits in extra_args, roles differ only by extra args:
``weak_extra_args=lambda ea: {**ea, 'cond_scale': 0.}``.
"""
import torch


def cat_conds(a, b):
    """Concatenate two extra-args structures along the batch dimension (non-tensor leaves must be equal)."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.shape[1:] != b.shape[1:]:
            raise ValueError(f'cond and uncond tensors must match beyond the batch dimension, '
                             f'got {tuple(a.shape)} and {tuple(b.shape)} (pad prompts to the same length)')
        return torch.cat([a, b])
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            raise ValueError(f'cond and uncond must have the same keys, got {sorted(a)} and {sorted(b)}')
        return {k: cat_conds(a[k], b[k]) for k in a}
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        return type(a)(cat_conds(u, v) for u, v in zip(a, b))
    if type(a) is type(b) and a == b:
        return a
    raise ValueError(f'cannot batch cond and uncond values {a!r} and {b!r}: tensors, dicts and lists of them, '
                     'or equal plain values are supported')


class CFGDenoiser:
    """Classifier-free guidance around a conditional k-diffusion denoiser ``inner(x, sigma, **cond)``."""

    def __init__(self, inner):
        if not callable(inner):
            raise TypeError(f'CFGDenoiser needs a callable denoiser, got {type(inner).__name__}')
        self.inner = inner

    def __call__(self, x, sigma, *, cond, uncond, cond_scale, **shared):
        # A tensor scale (per frame, as SVD's pipeline uses) broadcasts against the output and takes no shortcut.
        if not isinstance(cond_scale, torch.Tensor) and cond_scale == 1:
            return self.inner(x, sigma, **cond, **shared)
        if not isinstance(cond_scale, torch.Tensor) and cond_scale == 0:
            return self.inner(x, sigma, **uncond, **shared)
        both = self.inner(torch.cat([x, x]), torch.cat([sigma, sigma]), **cat_conds(uncond, cond), **shared)
        uncond_out, cond_out = both.chunk(2)
        return uncond_out + (cond_out - uncond_out) * cond_scale
