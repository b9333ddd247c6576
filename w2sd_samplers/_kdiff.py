"""Resolves the k-diffusion copy the samplers should use.

Hosts ship their own copies: ComfyUI vendors ``comfy.k_diffusion``; A1111 and Forge put a top-level
``k_diffusion`` on ``sys.path`` (the same import name as the PyPI package) and replace its module-level ``torch``
to seed noise per image. Drawing helpers and noise through the active copy keeps the host's seeds.
"""
import importlib
import sys
import warnings

# k-diffusion imports clip-anytorch, whose `from pkg_resources import packaging` warns on every fresh process. The
# library imports this module before any k_diffusion import of its own, so the filter (that one message from that
# one module) keeps every `w2sd` command and sampler import quiet.
warnings.filterwarnings('ignore', message='pkg_resources is deprecated', category=UserWarning, module='clip')

_override = None


def set_backend(module):
    """Force a ``k_diffusion.sampling``-like module (``None`` restores automatic resolution)."""
    global _override
    _override = module


def sampling():
    """The active ``k_diffusion.sampling`` module, resolved at call time."""
    if _override is not None:
        return _override
    comfy = sys.modules.get('comfy.k_diffusion.sampling')
    if comfy is not None:
        return comfy
    try:
        return importlib.import_module('k_diffusion.sampling')
    except ImportError as e:
        raise ImportError('w2sd_samplers needs k-diffusion: pip install k-diffusion (or run inside ComfyUI, '
                          'A1111 or Forge, whose own copy is used)') from e


def randn_like(x):
    """Gaussian noise drawn the way the active copy draws it (through its possibly hijacked ``torch``)."""
    return sampling().torch.randn_like(x)
