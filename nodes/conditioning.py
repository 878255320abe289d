"""Prompt encoding and reference images: the nodes that build FLUX2LOCAL_CONDITIONING."""

from __future__ import annotations

import logging

import torch
from comfy_api.latest import io

from ..flux2_core.sampling import MAX_REFERENCES
from . import memory
from .common import ADVANCED, expect, image_batch, user_errors
from .holders import ModuleHolder, TextEncoderHolder
from .native_cond import to_native
from .progress import block_progress
from .types import CATEGORY, Conditioning, Flux2Conditioning, Flux2TextEncoder, Flux2Vae

log = logging.getLogger(__name__)

# Newer ComfyUI (the pinned v0.12.1 has it) grows image inputs as the previous one is connected
# (Autogrow). Older versions (0.3.64) get ten inputs images.image_1..10 instead (image_1 required);
# the node behaves the same and workflows use the same input names on both.
_AUTOGROW = getattr(io, "Autogrow", None)
IMAGE_NAMES = [f"image_{i}" for i in range(1, MAX_REFERENCES + 1)]


def _images_to_pil(images: torch.Tensor | None):
    """ComfyUI IMAGE (B, H, W, 3) in [0, 1] -> list of PIL images (for the VLM upsampler)."""
    if images is None:
        return None
    from PIL import Image

    arr = (images.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


def _encode_with_progress(
    holder: TextEncoderHolder, encoder, texts: list[tuple[str, str]]
) -> list[torch.Tensor]:
    """Encodes each (name, text) with a progress bar over the decoder layers on the node.

    Each encode goes through the holder's out-of-memory relief (a streamed encoder lowers its
    resident layers and encodes again). Returns the (1, 512, context_dim) embeddings on the
    offload device, in ``texts`` order.
    """
    layers = encoder.spec.layers_needed
    current = {"name": ""}

    def line(n: int) -> str:
        return f"{holder.label}: {current['name']}, layer {(n - 1) % layers + 1} of {layers}"

    out = []
    with block_progress(encoder, layers * len(texts), line) as bar:
        for i, (name, text) in enumerate(texts):
            current["name"], bar.count = name, i * layers  # a cached prompt runs no layers
            out.append(holder.run(encoder.encode, [text]).to(memory.offload_device()))
        bar.update(layers * len(texts))
    return out


class Flux2LocalEncodePrompt(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Flux2LocalEncodePrompt",
            display_name="FLUX.2 Encode Prompt",
            category=CATEGORY,
            description="Encodes the prompt with FLUX.2's text encoder; optionally rewrites it first (VLM upsampling).",
            inputs=[
                Flux2TextEncoder.Input("text_encoder", tooltip="From FLUX.2 Text Encoder Loader."),
                io.String.Input("prompt", multiline=True, default="", tooltip="What the image should show."),
                io.String.Input(
                    "negative_prompt",
                    multiline=True,
                    default="",
                    tooltip="Only used by the undistilled base models with CFG (guidance > 1); [klein] base "
                    "defaults to the empty prompt. Ignored by [dev] and distilled [klein].",
                ),
                io.Boolean.Input(
                    "upsample_prompt",
                    default=False,
                    tooltip="Let the text encoder (a VLM) rewrite the prompt into a more detailed one before encoding. "
                    "Needs an encoder that can write text: for [dev], Mistral Small 3.x from its Hugging Face "
                    "text_encoder/ folder (ComfyUI's Mistral files leave the output head out; the node says so).",
                ),
                io.Int.Input(
                    "upsample_seed",
                    default=0,
                    min=0,
                    max=0xFFFFFFFF,
                    tooltip="Seed of the prompt rewriting (only used when upsample_prompt is on).",
                    **ADVANCED,
                ),
                io.Int.Input(
                    "upsample_max_tokens",
                    default=512,
                    min=8,
                    max=2048,
                    tooltip="Most tokens the rewritten prompt may have (only used when upsample_prompt is on).",
                    **ADVANCED,
                ),
                io.Image.Input(
                    "upsample_images",
                    optional=True,
                    tooltip="Optional images the VLM looks at while rewriting the prompt (e.g. the image to edit).",
                ),
            ],
            outputs=[
                Flux2Conditioning.Output(
                    display_name="conditioning",
                    tooltip="Prompt embeddings for FLUX.2 Sampler / Multi-Reference.",
                ),
                io.String.Output(
                    display_name="prompt", tooltip="The prompt that was encoded (rewritten if upsampled)."
                ),
                io.Conditioning.Output(
                    display_name="CONDITIONING",
                    tooltip="The prompt as ComfyUI's CONDITIONING, for native nodes (ReferenceLatent, FluxGuidance, "
                    "BasicGuider/CFGGuider, Conditioning Combine, KSampler) and for FLUX.2 Sampler. [dev] gets "
                    "guidance 4 unless FluxGuidance sets another.",
                ),
                io.Conditioning.Output(
                    display_name="negative",
                    tooltip="The negative prompt as CONDITIONING (CFGGuider / KSampler negative for base [klein]); "
                    "zeros when no negative prompt was encoded, as ConditioningZeroOut gives.",
                ),
            ],
        )

    @classmethod
    @user_errors
    def execute(
        cls,
        text_encoder,
        prompt,
        negative_prompt,
        upsample_prompt,
        upsample_seed,
        upsample_max_tokens,
        upsample_images=None,
    ):
        from ..flux2_core import check_text

        where = "FLUX.2 Encode Prompt"
        expect(where, "text_encoder", text_encoder, TextEncoderHolder, "a FLUX.2 Text Encoder Loader output")
        check_text(where, "prompt", prompt)
        check_text(where, "negative_prompt", negative_prompt)
        if upsample_images is not None:
            image_batch(where, "upsample_images", upsample_images)
        device = memory.compute_device()
        with text_encoder.using(device):
            if upsample_prompt:
                writer = text_encoder.generator()  # built once, kept with the loaded encoder
                with writer.using(device):
                    prompt = writer.prepare(device).upsample(
                        prompt,
                        images=_images_to_pil(upsample_images),
                        seed=upsample_seed,
                        max_new_tokens=upsample_max_tokens,
                    )
                log.info("Flux2Local: upsampled prompt: %s", prompt)
            encoder = text_encoder.prepare(device)  # gives the generator's VRAM back first
            # The negative is needed only for CFG on base models (Qwen3 family) or when the user typed
            # one; skipping it saves a full pass of the 24B Mistral encoder for [dev].
            texts = [("prompt", prompt)]
            if encoder.kind == "qwen3" or negative_prompt.strip():
                texts.append(("negative prompt", negative_prompt))
            out = _encode_with_progress(text_encoder, encoder, texts)
            embeds, negative = out[0], (out[1] if len(out) > 1 else None)
        cond = Conditioning(
            prompt_embeds=embeds,
            negative_embeds=negative,
            context_dim=int(embeds.shape[-1]),
            encoder_kind=encoder.kind,
            encoder_file=text_encoder.source,
            prompt=prompt,
        )
        return io.NodeOutput(cond, prompt, to_native(cond), to_native(cond, negative=True))


def _image_inputs() -> list:
    if _AUTOGROW is not None:
        tip = "A reference image (IMAGE). The next input appears when this one is connected; up to 10."
        tmpl = _AUTOGROW.TemplateNames(io.Image.Input("image", tooltip=tip), names=IMAGE_NAMES, min=1)
        return [_AUTOGROW.Input("images", template=tmpl, tooltip="Reference images, 1 to 10.")]
    # Same input ids as Autogrow produces ("images.image_1"...), so saved workflows work on both.
    tip = "A reference image (IMAGE); image_1 is required, the others optional; up to 10."
    return [
        io.Image.Input(f"images.{name}", display_name=name, optional=i > 0, tooltip=tip)
        for i, name in enumerate(IMAGE_NAMES)
    ]


class Flux2LocalMultiReference(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Flux2LocalMultiReference",
            display_name="FLUX.2 Multi-Reference",
            category=CATEGORY,
            description="VAE-encodes 1 to 10 reference images and attaches them to the conditioning (editing, "
            "multi-reference generation).",
            inputs=[
                Flux2Conditioning.Input(
                    "conditioning", tooltip="From FLUX.2 Encode Prompt (may already hold references)."
                ),
                Flux2Vae.Input("vae", tooltip="From FLUX.2 VAE Loader."),
                io.Float.Input(
                    "megapixels_per_reference",
                    default=1.0,
                    min=0.0625,
                    max=4.0,
                    step=0.0625,
                    tooltip="Each reference is scaled (keeping its aspect ratio) to at most this many megapixels "
                    "before encoding. Fewer pixels = faster and less memory; 1.0 matches BFL's default.",
                ),
                *_image_inputs(),
            ],
            outputs=[
                Flux2Conditioning.Output(
                    display_name="conditioning",
                    tooltip="The conditioning with the reference latents attached.",
                ),
            ],
        )

    @classmethod
    @user_errors
    def execute(cls, conditioning, vae, megapixels_per_reference, images=None, **loose_images):
        from ..flux2_core import InputError, check_finite, prepare_reference_latents

        where = "FLUX.2 Multi-Reference"
        expect(
            where,
            "conditioning",
            conditioning,
            Conditioning,
            "a FLUX.2 Encode Prompt or Multi-Reference output",
        )
        expect(where, "vae", vae, ModuleHolder, "a FLUX.2 VAE Loader output")
        check_finite(where, megapixels_per_reference=megapixels_per_reference)
        # Autogrow passes {"image_1": ...} as `images`; older ComfyUI passes "images.image_1"=... keywords.
        named = dict(images or {}) | {k.removeprefix("images."): v for k, v in loose_images.items()}
        tensors = [image_batch(where, n, named[n]) for n in IMAGE_NAMES if named.get(n) is not None]
        # An IMAGE input may be a batch; every image in it is one reference.
        refs = [img[None] for t in tensors for img in t]
        total = len(conditioning.reference_latents) + len(refs)
        if not refs:
            raise InputError("FLUX.2 Multi-Reference: connect at least one image to image_1.")
        if total > MAX_REFERENCES:
            raise InputError(
                f"FLUX.2 Multi-Reference: {total} reference images ({len(conditioning.reference_latents)} already on "
                f"the conditioning + {len(refs)} here); FLUX.2 takes at most {MAX_REFERENCES}. Remove some images "
                "or split the batch."
            )
        device = memory.compute_device()
        with vae.using(device):
            model = vae.prepare(device)
            # IMAGE (1, H, W, 3) in [0, 1] -> (1, 3, H, W) in [-1, 1], the VAE's input convention.
            pixels = [r.movedim(-1, 1).to(device) * 2.0 - 1.0 for r in refs]
            pixel_budget = int(megapixels_per_reference * 1024 * 1024)
            latents = prepare_reference_latents(model, pixels, pixel_budget=pixel_budget)
        latents = [lat.to(memory.offload_device()) for lat in latents]
        return io.NodeOutput(conditioning.with_references(latents))
