"""FLUX.2 Sampler: text-to-image, editing (references on the conditioning) and image-to-image."""

from __future__ import annotations

import logging
from contextlib import contextmanager

import comfy.model_management as mm
import comfy.sample
import comfy.utils
import torch
from comfy_api.latest import io

try:  # ComfyUI >= 0.3.72 (native FLUX.2) has the latent format; older versions get no previews.
    from comfy.latent_formats import Flux2 as _Flux2LatentFormat
except ImportError:
    _Flux2LatentFormat = None

from . import memory
from .common import user_errors
from .types import CATEGORY, Flux2Conditioning, Flux2Model

log = logging.getLogger(__name__)


def variant_defaults(cfg) -> tuple[int, float]:
    """(steps, guidance) used when the node's value is 0 = auto, from BFL's defaults.

    [dev] (guidance embedder): 50 steps, embedded guidance 4. Distilled [klein]: 4 steps, guidance
    fixed at 1 (no CFG). Base [klein]: 50 steps, CFG 4. Read from the config's flags rather than its
    variant name so custom-shaped checkpoints get the right family.
    """
    if cfg.guidance_embed:
        return 50, 4.0
    if cfg.distilled:
        return 4, 1.0
    return 50, 4.0


def activation_estimate(cfg, width: int, height: int, n_ref_tokens: int) -> int:
    """Rough activation peak of one transformer block in bytes, kept free when budgeting weights.

    Per token a block holds about 24 x hidden values at once (qkv 3H, SwiGLU 6H in + 3H out, attention
    output, residuals and modulated copies), in 2-byte compute dtype; tokens = image + references +
    512 text tokens.
    """
    tokens = (width // 16) * (height // 16) + n_ref_tokens + 512
    return tokens * cfg.hidden_size * 24 * 2


def _previewer(device: torch.device):
    """ComfyUI's latent previewer for FLUX.2 latents, or None (older ComfyUI, previews off)."""
    if _Flux2LatentFormat is None:
        return None
    import latent_preview

    try:
        return latent_preview.get_previewer(device, _Flux2LatentFormat())
    except Exception:  # a broken preview must never stop sampling
        log.debug("Flux2Local: no latent previewer", exc_info=True)
        return None


@contextmanager
def _interruptible_blocks(model: torch.nn.Module):
    """Checks ComfyUI's interrupt flag before every transformer block, so Cancel acts mid-step."""

    def check(_module, _args):
        mm.throw_exception_if_processing_interrupted()

    handles = []
    for path in getattr(model, "streamable_blocks", ()):
        for block in model.get_submodule(path):
            handles.append(block.register_forward_pre_hook(check))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class Flux2LocalSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Flux2LocalSampler",
            display_name="FLUX.2 Sampler",
            category=CATEGORY,
            description="Samples FLUX.2 latents: text-to-image, editing with references, image-to-image.",
            inputs=[
                Flux2Model.Input("model", tooltip="From FLUX.2 Model Loader."),
                Flux2Conditioning.Input(
                    "conditioning",
                    tooltip="From FLUX.2 Encode Prompt, or FLUX.2 Multi-Reference for editing.",
                ),
                io.Int.Input(
                    "width",
                    default=1024,
                    min=64,
                    max=8192,
                    step=16,
                    tooltip="Image width in pixels: a multiple of 16, at most 4 MP in total. Ignored when a latent is connected.",
                ),
                io.Int.Input(
                    "height",
                    default=1024,
                    min=64,
                    max=8192,
                    step=16,
                    tooltip="Image height in pixels: a multiple of 16, at most 4 MP in total. Ignored when a latent is connected.",
                ),
                io.Int.Input(
                    "seed",
                    default=0,
                    min=0,
                    max=0xFFFFFFFFFFFFFFFF,
                    control_after_generate=True,
                    tooltip="Noise seed (ComfyUI's convention, so the same seed gives the same noise as native sampling).",
                ),
                io.Int.Input(
                    "steps",
                    default=0,
                    min=0,
                    max=200,
                    tooltip="Sampling steps; 0 = the variant's default ([dev] 50, distilled [klein] 4, base [klein] 50).",
                ),
                io.Float.Input(
                    "guidance",
                    default=0.0,
                    min=0.0,
                    max=30.0,
                    step=0.1,
                    tooltip="0 = the variant's default. [dev]: embedded guidance (4). Base [klein]: CFG scale (4; "
                    "above 1 uses the negative prompt). Distilled [klein]: fixed at 1.",
                ),
                io.Float.Input(
                    "denoise",
                    default=1.0,
                    min=0.0,
                    max=1.0,
                    step=0.01,
                    tooltip="For image-to-image with a connected latent: how much to change it (1 = start from pure noise).",
                ),
                io.Latent.Input(
                    "latent",
                    optional=True,
                    tooltip="Optional FLUX.2 LATENT (e.g. from FLUX.2 VAE Encode) to start from: image-to-image. "
                    "Its size overrides width and height.",
                ),
            ],
            outputs=[
                io.Latent.Output(
                    display_name="LATENT",
                    tooltip="FLUX.2 latents {'samples': (B, 128, H/16, W/16)}, the same format as ComfyUI's native FLUX.2.",
                ),
            ],
        )

    @classmethod
    @user_errors
    def execute(cls, model, conditioning, width, height, seed, steps, guidance, denoise, latent=None):
        from ..flux2_core import InputError, block_flops, sample_latents, tokens_for, validate_size

        cfg = model.module.config
        init = None
        if latent is not None:
            init = latent["samples"]
            if init.ndim != 4 or init.shape[1] != 128:
                raise InputError(
                    f"FLUX.2 Sampler: the latent input has shape {tuple(init.shape)}; FLUX.2 latents are "
                    "(B, 128, H/16, W/16). Use FLUX.2 VAE Encode or EmptyFlux2LatentImage."
                )
            height, width = init.shape[2] * 16, init.shape[3] * 16
        validate_size(width, height)  # before any work: a clear message, nothing loaded on the GPU
        if conditioning.context_dim != cfg.context_dim:
            raise InputError(
                f"FLUX.2 Sampler: the conditioning comes from a text encoder of width {conditioning.context_dim} "
                f"({conditioning.encoder_kind}) but this {cfg.variant} model expects {cfg.context_dim}. Use the "
                "matching encoder: Mistral Small 3.x for [dev], Qwen3 4B for [klein] 4B, Qwen3 8B for [klein] 9B."
            )
        d_steps, d_guidance = variant_defaults(cfg)
        steps = steps or d_steps
        guidance = guidance or d_guidance
        # ComfyUI's noise convention (CPU generator seeded with `seed`), shape (1, 128, H/16, W/16).
        shape_ref = init if init is not None else torch.zeros(1, 128, height // 16, width // 16)
        noise = comfy.sample.prepare_noise(shape_ref, seed)

        device = memory.compute_device()
        pbar = comfy.utils.ProgressBar(steps)
        previewer = _previewer(device)

        def on_step(info) -> None:
            mm.throw_exception_if_processing_interrupted()
            preview = None
            if previewer is not None and info.denoised is not None:
                preview = previewer.decode_latent_to_preview_image("JPEG", info.denoised.float())
            pbar.update_absolute(info.step, info.total, preview)  # info.step is 1-based

        log.info(
            "Flux2Local: sampling %d steps at %dx%d (guidance %.2f, seed %d)",
            steps,
            width,
            height,
            guidance,
            seed,
        )
        with model.using(device):
            n_ref = sum(r.shape[-2] * r.shape[-1] for r in conditioning.reference_latents)
            batch = 1 if init is None else init.shape[0]
            # Per-block work of one step: true CFG (base models) runs a second pass per step.
            passes = batch * (2 if not cfg.guidance_embed and not cfg.distilled and guidance > 1 else 1)
            flops = block_flops(cfg, tokens_for(width, height, reference_tokens=n_ref)).per_block
            transformer = model.prepare(
                device,
                activation_estimate(cfg, width, height, n_ref),
                block_flops=tuple(f * passes for f in flops),
            )

            def dev(t):  # embeddings (1, L, ctx) -> (batch, L, ctx) on the compute device
                return None if t is None else t.to(device).expand(batch, -1, -1)

            with _interruptible_blocks(transformer):
                samples = sample_latents(
                    transformer=transformer,
                    prompt_embeds=dev(conditioning.prompt_embeds),
                    negative_prompt_embeds=dev(conditioning.negative_embeds),
                    reference_latents=[r.to(device) for r in conditioning.reference_latents] or None,
                    width=width,
                    height=height,
                    steps=steps,
                    guidance=guidance,
                    seed=seed,
                    noise=noise.to(device),
                    init_latents=None if init is None else init.to(device),
                    denoise=denoise if init is not None else 1.0,
                    callback=on_step,
                )
            if model.streamer is not None:
                log.info("Flux2Local: weight streaming: %s", model.streamer.telemetry(sync=True).summary())
        return io.NodeOutput({"samples": samples.to(memory.output_device(), torch.float32)})
