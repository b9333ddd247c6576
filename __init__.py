"""ComfyUI entry point: a clone of this repository in ComfyUI/custom_nodes/ loads the W2SD node pack.

The library itself is the ``w2sd_samplers`` package (installed with pip as usual).
"""
import sys

# ComfyUI imports its own modules before any custom node, and loads the pack as a package. Elsewhere there are no
# nodes to load: pytest collects this folder as a package, or, when the folder's name is not an identifier (a
# clone named w2sd-samplers), imports this file as a plain module, where a relative import fails.
if 'comfy' in sys.modules and __spec__ is not None and __spec__.submodule_search_locations is not None:
    from .wrappers.comfyui import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: F401
