"""W2SD (Weak-to-Strong Diffusion) node pack for ComfyUI.

Clone the w2sd-samplers repository into ``ComfyUI/custom_nodes/`` (or link this folder there). The pack uses the
installed ``w2sd_samplers`` library if there is one, else the one in the checkout this folder lives in; inside
ComfyUI the library uses ComfyUI's own ``comfy.k_diffusion``, so the PyPI k-diffusion is not needed.
"""
import importlib.util
import os
import sys


def _load_library_from_checkout():
    """Import ``w2sd_samplers`` from this checkout without putting the checkout on ``sys.path``.

    On ``sys.path``, the checkout's other top-level folders (tests, benchmarks, wrappers) would become importable
    by those bare names in the whole ComfyUI process.
    """
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(__file__))))
    package = os.path.join(root, 'w2sd_samplers')
    if not os.path.isfile(os.path.join(package, '__init__.py')):
        raise ImportError('the W2SD node pack needs the w2sd_samplers library: clone the whole w2sd-samplers '
                          'repository into ComfyUI/custom_nodes/, or pip install it into ComfyUI\'s Python')
    spec = importlib.util.spec_from_file_location('w2sd_samplers', os.path.join(package, '__init__.py'),
                                                  submodule_search_locations=[package])
    module = importlib.util.module_from_spec(spec)
    sys.modules['w2sd_samplers'] = module
    spec.loader.exec_module(module)


if importlib.util.find_spec('w2sd_samplers') is None:
    _load_library_from_checkout()

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402

__all__ = ['NODE_CLASS_MAPPINGS', 'NODE_DISPLAY_NAME_MAPPINGS']
