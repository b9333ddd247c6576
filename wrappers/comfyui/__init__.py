"""W2SD (Weak-to-Strong Diffusion) node pack for ComfyUI.

Install the library (``pip install --no-deps -e <w2sd-samplers checkout>``: inside ComfyUI its vendored
``comfy.k_diffusion`` is used, so the PyPI k-diffusion is not needed) and link or copy this folder into
``ComfyUI/custom_nodes/``. Without the install, the checkout this folder lives in is used.
"""
import importlib.util
import os
import sys

if importlib.util.find_spec('w2sd_samplers') is None:
    _root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(__file__))))
    if os.path.isdir(os.path.join(_root, 'w2sd_samplers')):
        sys.path.append(_root)

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402

__all__ = ['NODE_CLASS_MAPPINGS', 'NODE_DISPLAY_NAME_MAPPINGS']
