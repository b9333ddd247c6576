"""ComfyUI entry point: a clone of this repository in ComfyUI/custom_nodes/ loads the W2SD node pack.

The library itself is the ``w2sd_samplers`` package (installed with pip as usual).
"""
import sys

# ComfyUI imports its own modules before any custom node. Elsewhere (pytest collects this folder as a package)
# there are no nodes to load, and the pack's ComfyUI imports would fail.
if 'comfy' in sys.modules:
    from .wrappers.comfyui import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: F401
