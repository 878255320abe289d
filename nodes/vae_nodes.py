"""FLUX.2 VAE Decode / Encode between ComfyUI's IMAGE and FLUX.2 LATENT."""

from __future__ import annotations

import logging

import torch
from comfy_api.latest import io

from ..flux2_core.sampling import DOWNSCALE
from . import memory
from .common import expect, image_batch, latent_samples, user_errors
from .holders import ModuleHolder
from .types import CATEGORY, Flux2Vae

log = logging.getLogger(__name__)

TILE_CHOICES = ["auto", "off", "512", "768", "1024"]


def _tile_arg(tile: str):
    """Node choice -> flux2_core's ``tile`` argument (None = never, "auto" = when memory is short)."""
    return {"auto": "auto", "off": None}.get(tile, int(tile) if tile.isdigit() else "auto")


def _run_with_oom_fallback(fn, x: torch.Tensor, tile: str, device: torch.device):
    """Runs ``fn(x, tile=...)``; on an out-of-memory error retries tiled (unless tiling is off)."""
    try:
        return fn(x, tile=_tile_arg(tile))
    except torch.OutOfMemoryError:
        if tile == "off":
            raise
        log.warning("Flux2Local: VAE ran out of memory on %s; retrying with 512-pixel tiles", device)
        memory.make_room(0, device)
        mm_empty()
        return fn(x, tile=512)


def _make_room_for(model, kind: str, height: int, width: int, batch: int, device: torch.device) -> None:
    """Asks ComfyUI (and our hook, for idle FLUX.2 models) for the untiled pass's activations, as
    ComfyUI's own VAE nodes do; "auto" tiling then sizes its tiles from what is free (a 4 MP decode
    on a 12 GiB card tiles even with everything else unloaded)."""
    from ..flux2_core.vae import activation_bytes

    dtype = next(model.parameters()).dtype
    memory.make_room(activation_bytes(model.config, kind, height, width, dtype, batch), device)


def mm_empty() -> None:
    import comfy.model_management as mm

    mm.soft_empty_cache()


class Flux2LocalVAEDecode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Flux2LocalVAEDecode",
            display_name="FLUX.2 VAE Decode",
            category=CATEGORY,
            description="Decodes FLUX.2 latents to an IMAGE; tiles by itself when memory is short.",
            inputs=[
                Flux2Vae.Input("vae", tooltip="From FLUX.2 VAE Loader."),
                io.Latent.Input(
                    "samples", tooltip="FLUX.2 LATENT (B, 128, H/16, W/16), e.g. from FLUX.2 Sampler."
                ),
                io.Combo.Input(
                    "tiling",
                    options=TILE_CHOICES,
                    default="auto",
                    tooltip="auto = tile only when the whole image would not fit in memory; off = never; a number "
                    "= always tile with tiles of that many pixels.",
                ),
            ],
            outputs=[
                io.Image.Output(
                    display_name="IMAGE", tooltip="Decoded image, ComfyUI IMAGE (B, H, W, 3) in 0..1."
                )
            ],
        )

    @classmethod
    @user_errors
    def execute(cls, vae, samples, tiling) -> io.NodeOutput:
        where = "FLUX.2 VAE Decode"
        expect(where, "vae", vae, ModuleHolder, "a FLUX.2 VAE Loader output")
        latents = latent_samples(where, "samples", samples)  # other models' latents: ComfyUI's VAE Decode
        device = memory.compute_device()
        with vae.using(device):
            model = vae.prepare(device)
            f = model.config.downscale
            _make_room_for(
                model, "decode", latents.shape[2] * f, latents.shape[3] * f, latents.shape[0], device
            )
            x = latents.to(device, next(model.parameters()).dtype)
            with torch.inference_mode():
                images = _run_with_oom_fallback(model.decode, x, tiling, device)
        # (B, 3, H, W) in [-1, 1] -> ComfyUI IMAGE (B, H, W, 3) in [0, 1], float32.
        images = ((images.float() + 1.0) / 2.0).clamp(0, 1).movedim(1, -1)
        return io.NodeOutput(images.to(memory.output_device()))


class Flux2LocalVAEEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Flux2LocalVAEEncode",
            display_name="FLUX.2 VAE Encode",
            category=CATEGORY,
            description="Encodes an IMAGE to FLUX.2 latents (for image-to-image); tiles by itself when memory is short.",
            inputs=[
                Flux2Vae.Input("vae", tooltip="From FLUX.2 VAE Loader."),
                io.Image.Input(
                    "pixels",
                    tooltip="Image to encode; it is cropped to a multiple of 16 pixels (FLUX.2's latent grid).",
                ),
                io.Combo.Input(
                    "tiling",
                    options=TILE_CHOICES,
                    default="auto",
                    tooltip="auto = tile only when memory is short; off = never; a number = tile size in pixels.",
                ),
            ],
            outputs=[
                io.Latent.Output(
                    display_name="LATENT",
                    tooltip="FLUX.2 LATENT {'samples': (B, 128, H/16, W/16)}, e.g. for FLUX.2 Sampler.",
                )
            ],
        )

    @classmethod
    @user_errors
    def execute(cls, vae, pixels, tiling) -> io.NodeOutput:
        from ..flux2_core import InputError

        where = "FLUX.2 VAE Encode"
        expect(where, "vae", vae, ModuleHolder, "a FLUX.2 VAE Loader output")
        image_batch(where, "pixels", pixels)
        h, w = pixels.shape[1] // DOWNSCALE * DOWNSCALE, pixels.shape[2] // DOWNSCALE * DOWNSCALE
        if h < DOWNSCALE or w < DOWNSCALE:
            raise InputError(
                f"{where}: the image is {pixels.shape[2]}x{pixels.shape[1]}; it needs at least "
                f"{DOWNSCALE}x{DOWNSCALE} pixels (one latent cell)."
            )
        device = memory.compute_device()
        with vae.using(device):
            model = vae.prepare(device)
            _make_room_for(model, "encode", h, w, pixels.shape[0], device)
            # IMAGE (B, H, W, 3) in [0, 1] -> (B, 3, h, w) in [-1, 1], cropped to the latent grid.
            x = pixels[:, :h, :w, :3].movedim(-1, 1).to(device, next(model.parameters()).dtype) * 2.0 - 1.0
            with torch.inference_mode():
                latents = _run_with_oom_fallback(model.encode, x, tiling, device)
        return io.NodeOutput({"samples": latents.float().to(memory.output_device())})
