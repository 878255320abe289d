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

from ..flux2_core.errors import InputError
from ..flux2_core.sampling import DOWNSCALE, MAX_SIDE, MIN_SIDE, SCHEDULERS, SOLVERS, validate_size
from . import memory
from .common import auto_zero, latent_samples, user_errors
from .types import CATEGORY, Flux2Conditioning, Flux2Model

log = logging.getLogger(__name__)

# validate_inputs' default for the optional latent: ComfyUI passes None when it is linked.
_UNCONNECTED = object()


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


def _either(name: str, ours, native, tooltip: str):
    """An input taking our socket type or ComfyUI's (io.MultiType; older ComfyUI: ours only)."""
    multi = getattr(io, "MultiType", None)
    if multi is None:
        return ours.Input(name, tooltip=tooltip)
    return multi.Input(name, types=[ours, native], tooltip=tooltip)


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
                _either(
                    "model",
                    Flux2Model,
                    io.Model,
                    tooltip="From FLUX.2 Model Loader or LoRA Loader; or a native FLUX.2 MODEL (FLUX.2 To Native "
                    "MODEL, UNETLoader, ComfyUI-GGUF ...), which ComfyUI's own sampling then runs with its patches "
                    "(LoRA loaders, EasyCache ...).",
                ),
                _either(
                    "conditioning",
                    Flux2Conditioning,
                    io.Conditioning,
                    tooltip="From FLUX.2 Encode Prompt or FLUX.2 Multi-Reference; or a native CONDITIONING "
                    "(CLIPTextEncode on a FLUX.2 CLIPLoader, ReferenceLatent, FluxGuidance ...).",
                ),
                io.Int.Input(
                    "width",
                    default=1024,
                    min=MIN_SIDE,
                    max=MAX_SIDE,
                    step=DOWNSCALE,
                    tooltip="Image width in pixels: a multiple of 16, at most 4 MP with the height (e.g. 1024x1024, "
                    "1360x768, 2048x2048). Checked before anything loads. Ignored when a latent is connected.",
                ),
                io.Int.Input(
                    "height",
                    default=1024,
                    min=MIN_SIDE,
                    max=MAX_SIDE,
                    step=DOWNSCALE,
                    tooltip="Image height in pixels: a multiple of 16, at most 4 MP with the width. Checked before "
                    "anything loads. Ignored when a latent is connected.",
                ),
                io.Int.Input(
                    "seed",
                    default=0,
                    min=0,
                    max=0xFFFFFFFFFFFFFFFF,
                    control_after_generate=True,
                    tooltip="Noise seed (ComfyUI's convention: the same seed gives the same noise as native "
                    "sampling). 'randomize' below picks a new one after every run; with 'fixed' a second Run "
                    "with nothing changed does nothing (ComfyUI reuses the cached image).",
                ),
                io.Int.Input(
                    "steps",
                    default=0,
                    min=0,
                    max=200,
                    tooltip="Sampling steps; auto (0) = the model's default: 4 for distilled [klein], 50 for [dev] "
                    "and base [klein] (28 is a good trade-off for [dev]).",
                    **auto_zero("steps"),
                ),
                io.Float.Input(
                    "guidance",
                    default=0.0,
                    min=0.0,
                    max=30.0,
                    step=0.1,
                    tooltip="What it sets depends on the model (the node says which after a run). [dev]: embedded "
                    "guidance, 4 by default (higher follows the prompt more closely). Base [klein]: the CFG "
                    "scale, 4 by default (above 1 it also runs the negative prompt, twice the work). Distilled "
                    "[klein]: not used. auto (0) = the model's default.",
                    **auto_zero("guidance"),
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
                io.Conditioning.Input(
                    "negative",
                    optional=True,
                    tooltip="Only with a native CONDITIONING on a base [klein] model with CFG (guidance > 1): the "
                    "negative prompt (e.g. CLIPTextEncode of an empty prompt). FLUX.2 Encode Prompt's conditioning "
                    "carries its negative already.",
                ),
                io.Combo.Input(
                    "sampler_name",
                    options=list(SOLVERS),
                    default="euler",
                    optional=True,
                    tooltip="The solver: euler (FLUX.2's reference sampler), dpmpp_2m or res_multistep (second "
                    "order, as ComfyUI's samplers of the same names).",
                ),
                io.Combo.Input(
                    "scheduler",
                    options=list(SCHEDULERS),
                    default="flux2",
                    optional=True,
                    tooltip="The sigma schedule: flux2 (FLUX.2's own, shifted by image size and steps; "
                    "ComfyUI's Flux2Scheduler) or simple (ComfyUI's KSampler 'simple' on FLUX.2).",
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
    def validate_inputs(cls, width=None, height=None, latent=_UNCONNECTED):
        """ComfyUI's check when the prompt is queued, before any node runs: the output size.

        Values that come through a link are None here (the node checks them when it runs), and a
        connected latent decides the size itself. ComfyUI repeats the message under every input
        named here, so only the size's inputs are.
        """
        if width is None or height is None or latent is not _UNCONNECTED:
            return True
        try:
            validate_size(int(width), int(height))
        except InputError as e:
            return f"FLUX.2 Sampler: {e}"
        return True

    @classmethod
    @user_errors
    def execute(
        cls,
        model,
        conditioning,
        width,
        height,
        seed,
        steps,
        guidance,
        denoise,
        latent=None,
        negative=None,
        sampler_name="euler",
        scheduler="flux2",
    ):
        from ..flux2_core import (
            check_finite,
            check_latents,
            check_text_encoder,
            latent_shape,
            plan_sampling,
            reference_token_count,
            sample_latents,
        )
        from .native_sampling import route, run_native

        where = "FLUX.2 Sampler"
        # Native MODEL or CONDITIONING in: ours converted where our sampler reproduces it exactly,
        # else the work goes to ComfyUI's sampling (native_model True).
        model, conditioning, guidance, native_model = route(where, model, conditioning, negative, guidance)
        check_finite(where, guidance=guidance, denoise=denoise)
        if native_model:
            init = None if latent is None else latent_samples(where, "latent", latent)
            size = (width, height) if init is None else check_latents(init, where)
            settings = dict(seed=seed, steps=steps, guidance=guidance, denoise=denoise, init=init)
            samples = run_native(
                where, model, conditioning, negative, size, sampler_name, scheduler, **settings
            )
            return io.NodeOutput({"samples": samples})
        init = None if latent is None else latent_samples(where, "latent", latent)
        if init is not None:
            width, height = check_latents(init, where)  # the latent's size wins
        cfg = model.module.config
        # Everything is checked before any work: a clear message, nothing loaded on the GPU.
        plan = plan_sampling(
            cfg,
            width,
            height,
            reference_tokens=reference_token_count(conditioning.reference_latents),
            batch=1 if init is None else init.shape[0],
            steps=steps or None,  # 0 = the variant's default
            guidance=guidance or None,
        )
        check_text_encoder(
            cfg,
            conditioning.context_dim,
            conditioning.encoder_kind,
            model_name=model.source or model.label,
            encoder_name=conditioning.encoder_file or conditioning.encoder_kind,
        )
        # ComfyUI's noise convention (CPU generator seeded with `seed`), shape (B, 128, H/16, W/16).
        shape_ref = init if init is not None else torch.zeros(latent_shape(width, height))
        noise = comfy.sample.prepare_noise(shape_ref, seed)

        device = memory.compute_device()
        pbar = comfy.utils.ProgressBar(plan.steps)
        previewer = _previewer(device)

        def on_step(info) -> None:
            mm.throw_exception_if_processing_interrupted()
            preview = None
            if previewer is not None and info.denoised is not None:
                preview = previewer.decode_latent_to_preview_image("JPEG", info.denoised.float())
            pbar.update_absolute(info.step, info.total, preview)  # info.step is 1-based

        g = plan.guidance
        log.info(
            "Flux2Local: sampling %d steps of %s/%s at %dx%d (guidance: %s, seed %d)",
            plan.steps,
            sampler_name,
            scheduler,
            width,
            height,
            g.mode if g.scale is None else f"{g.mode} {g.scale:.2f}",
            seed,
        )
        batch = shape_ref.shape[0]
        with model.using(device):
            transformer = model.prepare(device, plan.activation_bytes, block_flops=plan.block_flops)

            def dev(t):  # embeddings (1, L, ctx) -> (batch, L, ctx) on the compute device
                return None if t is None else t.to(device).expand(batch, -1, -1)

            with _interruptible_blocks(transformer):
                samples = sample_latents(
                    # Each forward through the streamer's out-of-memory relief (when streamed).
                    transformer=model.guarded(transformer),
                    prompt_embeds=dev(conditioning.prompt_embeds),
                    negative_prompt_embeds=dev(conditioning.negative_embeds),
                    reference_latents=[r.to(device) for r in conditioning.reference_latents] or None,
                    width=width,
                    height=height,
                    steps=plan.steps,
                    guidance=guidance or None,
                    seed=seed,
                    noise=noise.to(device),
                    init_latents=None if init is None else init.to(device),
                    denoise=denoise if init is not None else 1.0,
                    callback=on_step,
                    sampler=sampler_name,
                    scheduler=scheduler,
                )
            if model.streamer is not None:
                log.info("Flux2Local: weight streaming: %s", model.streamer.telemetry(sync=True).summary())
        return io.NodeOutput({"samples": samples.to(memory.output_device(), torch.float32)})
