"""The ComfyUI nodes of Flux2Local (V3 schema API, ``comfy_api.latest``).

Imported only inside ComfyUI (the root ``__init__.py`` guards it). Node IDs are permanent public
API: saved workflows refer to them.

Why V3 only (no V1 classes): V3 exists since ComfyUI 0.3.48, and the subset used here (``io.Schema``
with node_id/display_name/category/description/inputs/outputs, ``io.Custom`` socket types, widget
inputs with ``tooltip``/``optional``/``display_name``, ``io.NodeOutput``, ``comfy_entrypoint``
returning a ``ComfyExtension``) has the same signatures in 0.3.64 and in the pinned v0.12.1+1. The
one newer feature, ``io.Autogrow`` (image inputs that appear as the previous one is connected), is
used when present; without it FLUX.2 Multi-Reference declares the same input ids
(``images.image_1`` ... ``images.image_10``) as plain inputs, so saved workflows work on both.
Checked by running the shared workflows on both trees (tests/comfyui runs the pinned one).
"""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from . import memory
from .conditioning import Flux2LocalEncodePrompt, Flux2LocalMultiReference
from .loaders import Flux2LocalModelLoader, Flux2LocalTextEncoderLoader, Flux2LocalVAELoader
from .lora import Flux2LocalLoRALoader
from .native_nodes import Flux2LocalToNativeModel
from .safety import Flux2LocalCheckProvenance, Flux2LocalContentFilter, Flux2LocalSaveImage
from .sampler import Flux2LocalSampler
from .vae_nodes import Flux2LocalVAEDecode, Flux2LocalVAEEncode

NODES: list[type[io.ComfyNode]] = [
    Flux2LocalModelLoader,
    Flux2LocalLoRALoader,
    Flux2LocalTextEncoderLoader,
    Flux2LocalEncodePrompt,
    Flux2LocalMultiReference,
    Flux2LocalSampler,
    Flux2LocalVAELoader,
    Flux2LocalVAEDecode,
    Flux2LocalVAEEncode,
    Flux2LocalContentFilter,
    Flux2LocalSaveImage,
    Flux2LocalCheckProvenance,
    Flux2LocalToNativeModel,
]


class Flux2LocalExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


async def comfy_entrypoint() -> Flux2LocalExtension:
    from ..flux2_core.text_encoders import clear_caches

    # Not in ComfyExtension.on_load: ComfyUI 0.3.64 never calls it.
    memory.install_hooks()
    # ComfyUI's own pinned bytes count against our pinned limit; "unload all" releases kept pins.
    memory.configure_host_memory()
    # "Free model and node cache" must not leave prompt embeddings or tokenizers behind.
    memory.on_unload_all(clear_caches)
    return Flux2LocalExtension()
