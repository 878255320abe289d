"""Loader nodes: FLUX.2 transformer, text encoder and VAE from ComfyUI's model folders."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import comfy.text_encoders
from comfy_api.latest import io

from . import memory
from .common import (
    ADVANCED,
    DTYPES,
    auto_zero,
    fingerprint,
    loading,
    model_choices,
    model_path_or_none,
    resolve_model_path,
    tokenizer_choices,
    user_errors,
)
from .holders import GIB, ModuleHolder, StreamingSettings, TextEncoderHolder, module_bytes
from .progress import ByteProgress
from .types import CATEGORY, Flux2Model, Flux2TextEncoder, Flux2Vae

log = logging.getLogger(__name__)

# The Qwen2.5/3 BPE vocabulary ComfyUI ships for its own [klein] text encoders.
COMFY_QWEN_TOKENIZER = Path(comfy.text_encoders.__path__[0]) / "qwen25_tokenizer"


def _fallback_tokenizers() -> list[str]:
    # ComfyUI's qwen_3_*.safetensors carry no tokenizer; ComfyUI itself uses the Qwen BPE files it ships,
    # so they are the last place looked when "auto" finds nothing next to the weights.
    return [str(COMFY_QWEN_TOKENIZER)] if COMFY_QWEN_TOKENIZER.is_dir() else []


def _weight_bytes(path: str) -> int:
    """Bytes of the weight files behind ``path`` (a file, or a folder's .safetensors shards)."""
    from ..flux2_core.checkpoint import path_identity

    found = path_identity(path)
    if len(found) > 1 or os.path.isdir(path):
        found = [(p, i) for p, i in found if p.endswith((".safetensors", ".gguf"))]
    return sum(ident.size for _, ident in found if ident is not None)


@contextmanager
def _loading_with_progress(path: str) -> Iterator:
    """``loading()`` with the bytes read shown on the loader node (Cancel stops the load)."""
    progress = ByteProgress(os.path.basename(os.path.normpath(path)), _weight_bytes(path))
    with loading(on_read=progress) as files:
        yield files
    progress.finish()


# How the node names what it detected (the variant rules themselves live in flux2_core).
_VARIANT_TITLES = {
    "dev": "[dev]",
    "klein-4b": "[klein] 4B",
    "klein-9b": "[klein] 9B",
    "klein-base-4b": "[klein] base 4B",
    "klein-base-9b": "[klein] base 9B",
    "klein-9b-kv": "[klein] 9B-KV",
}
_FORMAT_TITLES = {
    "bfl": "BFL safetensors",
    "comfyui": "ComfyUI safetensors",
    "diffusers": "diffusers folder",
    "bfl-fp8": "BFL FP8 safetensors",
    "comfy-fp8": "ComfyUI FP8 safetensors",
    "nvfp4": "NVFP4 safetensors",
    "gguf": "GGUF",
}
_GUIDANCE_TITLES = {
    "embedded": "embedded guidance {scale:g}, {steps} steps",
    "cfg": "CFG {scale:g} with the negative prompt, {steps} steps",
    "none": "distilled: {steps} steps, no guidance",
}


def _variant_title(cfg) -> str:
    """ "[klein] 4B" etc.; a file of no published size (e.g. a test model) says which kind it is."""
    if cfg.variant in _VARIANT_TITLES:
        return _VARIANT_TITLES[cfg.variant]
    kind = "[dev]" if cfg.guidance_embed else "[klein]" if cfg.distilled else "[klein] base"
    return f"{kind}-type model of no published size"


def _describe_model(model, path: str) -> tuple[str, dict]:
    """What the loader found: a few lines for the node and the log, and the editor's facts.

    Returns:
        (text, facts): ``facts`` tells the pack's web extension what "auto" means for this model
        (default steps and guidance, and which kind of guidance the sampler's widget sets).
    """
    from ..flux2_core.quant import format_quant_summary
    from ..flux2_core.sampling import plan_guidance

    cfg = model.config
    plan = plan_guidance(cfg, None)
    fmt = getattr(model, "checkpoint_format", "?")
    mix = format_quant_summary(getattr(model, "quant_summary", None) or {})
    title = _variant_title(cfg)
    lines = [
        f"FLUX.2 {title}: "
        + _GUIDANCE_TITLES[plan.mode].format(scale=plan.scale or 0.0, steps=plan.default_steps),
        " · ".join(
            x for x in (_FORMAT_TITLES.get(fmt, fmt), mix, f"{module_bytes(model) / GIB:.2f} GiB") if x
        ),
        f"{cfg.depth} double + {cfg.depth_single} single blocks, hidden {cfg.hidden_size}, "
        f"text width {cfg.context_dim}",
    ]
    facts = {
        "variant": cfg.variant,
        "title": title,
        "guidance": plan.mode,
        "default_steps": plan.default_steps,
        "default_guidance": plan.scale,
    }
    return "\n".join(lines), facts


class Flux2LocalModelLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Flux2LocalModelLoader",
            display_name="FLUX.2 Model Loader",
            category=CATEGORY,
            description="Loads a FLUX.2 transformer ([dev], [klein] 4B/9B, base, 9B-KV) with weight streaming for "
            "small cards. After a run the node shows what it found: variant, format, size, storage types.",
            inputs=[
                io.Combo.Input(
                    "model_name",
                    options=model_choices("diffusion_models"),
                    tooltip="Transformer file (.safetensors, .gguf) or diffusers folder in models/diffusion_models "
                    "or models/unet; the variant is read from the weights. On a 12 GB card: any [klein] 4B file "
                    "fits; [klein] 9B and [dev] run from FP8 or GGUF files (e.g. flux2_dev_fp8mixed, "
                    "flux2-dev-Q4_K_M.gguf) with the blocks that do not fit streamed from system RAM.",
                ),
                io.Combo.Input(
                    "dtype",
                    options=list(DTYPES),
                    default="bf16",
                    tooltip="Compute dtype. Keep bf16 (what FLUX.2 was trained in) on RTX 30xx and newer; fp16 "
                    "only on older cards without bf16; fp32 only for debugging on the CPU.",
                    **ADVANCED,
                ),
                io.Boolean.Input(
                    "keep_fp8",
                    default=True,
                    tooltip="Leave on. FP8 files keep their block weights in FP8: half the memory and half the "
                    "bytes streamed, which is what lets [dev] run on 12 GB. RTX 40xx and newer run FP8 matmuls "
                    "where the file has activation scales; older cards convert each layer just before use. "
                    "Off converts the weights to the compute dtype on load. GGUF and NVFP4 files always keep "
                    "their stored bytes.",
                    **ADVANCED,
                ),
                io.Float.Input(
                    "vram_budget_gb",
                    default=0.0,
                    min=0.0,
                    max=1024.0,
                    step=0.5,
                    tooltip="GPU memory for resident transformer weights, in GB; auto (0, recommended) takes "
                    "what is free after ComfyUI unloads other models, minus its reserve (--reserve-vram). "
                    "Blocks that do not fit are streamed from pinned RAM. On a 12 GB card leave it on auto; "
                    "set a number (e.g. 6) only to leave VRAM to other programs.",
                    **ADVANCED,
                    **auto_zero("memory"),
                ),
                io.Float.Input(
                    "pinned_ram_gb",
                    default=0.0,
                    min=0.0,
                    max=4096.0,
                    step=1.0,
                    tooltip="Cap on pinned (page-locked) system RAM for streamed blocks, in GB; auto (0) uses "
                    "ComfyUI's limit. Pinned RAM cannot be swapped out: with 32 GB of RAM and [dev], a cap "
                    "such as 16 keeps the rest of the system responsive; blocks past it stream from "
                    "ordinary memory, more slowly.",
                    **ADVANCED,
                    **auto_zero("memory"),
                ),
            ],
            outputs=[
                Flux2Model.Output(
                    display_name="model", tooltip="The loaded FLUX.2 transformer, for FLUX.2 Sampler."
                ),
                io.String.Output(
                    display_name="info",
                    tooltip="What was detected (also shown on the node after a run): variant, checkpoint "
                    "format with its storage mix (e.g. Q4_K 61%, Q6_K 30%, F32 9%), size in memory.",
                ),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, model_name, **_) -> str:
        # A file replaced, truncated or rewritten under the same name must be loaded again.
        return fingerprint(model_path_or_none("diffusion_models", model_name))

    @classmethod
    @user_errors
    def execute(cls, model_name, dtype, keep_fp8, vram_budget_gb, pinned_ram_gb) -> io.NodeOutput:
        from ..flux2_core import check_finite, load_transformer

        check_finite("FLUX.2 Model Loader", vram_budget_gb=vram_budget_gb, pinned_ram_gb=pinned_ram_gb)
        path = resolve_model_path("diffusion_models", model_name)
        with _loading_with_progress(path) as files:
            model = load_transformer(
                path, dtype=DTYPES[dtype], device=memory.offload_device(), keep_fp8=keep_fp8
            )
        holder = ModuleHolder(
            model,
            f"FLUX.2 {model.config.variant}",
            StreamingSettings(vram_budget_gb, pinned_ram_gb),
            source=path,
            files=files,
        )
        text, facts = _describe_model(model, path)
        log.info("Flux2Local: %s; file %s", text.replace("\n", "; "), path)
        # The editor shows "text" on the node (the pack's web extension) and uses the facts for
        # the labels of connected samplers; both are also in /history for API clients.
        ui = {"text": [text], "flux2local_model": [facts]}
        return io.NodeOutput(holder, f"{text}\nfile: {path}", ui=ui)


class Flux2LocalTextEncoderLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Flux2LocalTextEncoderLoader",
            display_name="FLUX.2 Text Encoder Loader",
            category=CATEGORY,
            description="Loads FLUX.2's text encoder: Mistral Small 3.x for [dev], Qwen3 4B/8B for [klein].",
            inputs=[
                io.Combo.Input(
                    "text_encoder_name",
                    options=model_choices("text_encoders"),
                    tooltip="Text-encoder file (.safetensors, or a llama.cpp .gguf of Qwen3 / Mistral Small 3.x) "
                    "or Hugging Face text_encoder/ folder in models/text_encoders: Mistral Small 3.x for [dev], "
                    "Qwen3 4B for [klein] 4B, Qwen3 8B for [klein] 9B. On a 12 GB card any of them works (the "
                    "layers are streamed); the fp8 files halve the RAM they need.",
                ),
                io.Combo.Input(
                    "tokenizer",
                    options=tokenizer_choices(),
                    default="auto",
                    tooltip="Leave on auto: the tokenizer next to the weights (Hugging Face folders, GGUF files), "
                    "else the one bundled for the detected encoder. The other choices are tokenizer folders "
                    "found in models/text_encoders, for files that come without one.",
                    **ADVANCED,
                ),
                io.Combo.Input(
                    "dtype",
                    options=list(DTYPES),
                    default="bf16",
                    tooltip="Compute dtype of the text encoder: bf16 on RTX 30xx and newer, fp16 on older cards.",
                    **ADVANCED,
                ),
            ],
            outputs=[
                Flux2TextEncoder.Output(
                    display_name="text_encoder", tooltip="The text encoder, for FLUX.2 Encode Prompt."
                ),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, text_encoder_name, tokenizer, **_) -> str:
        from ..flux2_core.text_encoders.tokenizer import tokenizer_files

        path = model_path_or_none("text_encoders", text_encoder_name)
        tok = None if tokenizer == "auto" else model_path_or_none("text_encoders", tokenizer)
        tokenizers = tokenizer_files(path, tok, _fallback_tokenizers()) if path else []
        return fingerprint(path, *tokenizers)

    @classmethod
    @user_errors
    def execute(cls, text_encoder_name, tokenizer, dtype) -> io.NodeOutput:
        from ..flux2_core import load_text_encoder

        path = resolve_model_path("text_encoders", text_encoder_name)
        tok = None if tokenizer == "auto" else resolve_model_path("text_encoders", tokenizer)
        kwargs = {"dtype": DTYPES[dtype], "device": memory.offload_device()}
        with _loading_with_progress(path) as files:
            encoder = load_text_encoder(
                path, tokenizer=tok, fallback_tokenizers=_fallback_tokenizers(), **kwargs
            )
        streaming = StreamingSettings() if getattr(encoder, "streamable_blocks", None) else None
        return io.NodeOutput(
            TextEncoderHolder(encoder, f"text encoder {encoder.kind}", streaming, source=path, files=files)
        )


class Flux2LocalVAELoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Flux2LocalVAELoader",
            display_name="FLUX.2 VAE Loader",
            category=CATEGORY,
            description="Loads the FLUX.2 VAE (flux2-vae.safetensors or BFL's ae.safetensors).",
            inputs=[
                io.Combo.Input(
                    "vae_name",
                    options=model_choices("vae"),
                    tooltip="FLUX.2 VAE file in models/vae (32 latent channels, batch-norm statistics).",
                ),
                io.Combo.Input(
                    "dtype",
                    options=list(DTYPES),
                    default="bf16",
                    tooltip="Compute dtype of the VAE: bf16 on RTX 30xx and newer, fp16 on older cards.",
                    **ADVANCED,
                ),
            ],
            outputs=[
                Flux2Vae.Output(
                    display_name="vae", tooltip="The FLUX.2 VAE, for decode, encode and references."
                )
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, vae_name, **_) -> str:
        return fingerprint(model_path_or_none("vae", vae_name))

    @classmethod
    @user_errors
    def execute(cls, vae_name, dtype) -> io.NodeOutput:
        from ..flux2_core import load_vae

        path = resolve_model_path("vae", vae_name)
        with _loading_with_progress(path) as files:
            vae = load_vae(path, dtype=DTYPES[dtype], device=memory.offload_device())
        return io.NodeOutput(ModuleHolder(vae, "FLUX.2 VAE", source=path, files=files))
