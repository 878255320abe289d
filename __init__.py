"""Flux2Local: FLUX.2 for ComfyUI on 12-24 GB cards.

ComfyUI loads this folder as ``custom_nodes/<any name>`` and registers the nodes through
``comfy_entrypoint`` (the V3 extension API; ComfyUI >= 0.3.48). Outside ComfyUI (tests, tools) the
package imports without registering anything, so ``flux2_core`` and ``weight_streaming`` stay usable.
"""

try:
    import comfy_api.latest  # noqa: F401  (present only inside ComfyUI >= 0.3.48)
except ImportError:
    _IN_COMFYUI = False
else:
    _IN_COMFYUI = True

# The editor extension (web/flux2local.js): advanced settings, "auto" labels, the detected model.
WEB_DIRECTORY = "./web"

if _IN_COMFYUI:
    from .nodes import comfy_entrypoint  # noqa: F401

    __all__ = ["comfy_entrypoint", "WEB_DIRECTORY"]
