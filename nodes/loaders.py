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
    DTYPES,
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


def _describe_model(model, path: str) -> str:
    from ..flux2_core.quant import format_quant_summary

    cfg = model.config
    size = module_bytes(model) / GIB
    fmt = getattr(model, "checkpoint_format", "?")
    mix = format_quant_summary(getattr(model, "quant_summary", None) or {})
    return (
        f"FLUX.2 {cfg.variant}: {cfg.depth} double + {cfg.depth_single} single blocks, hidden "
        f"{cfg.hidden_size}, text width {cfg.context_dim}; format {fmt}"
        + (f" ({mix})" if mix else "")
        + f"; {size:.2f} GiB in memory; file {path}"
    )


class Flux2LocalModelLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Flux2LocalModelLoader",
            display_name="FLUX.2 Model Loader",
            category=CATEGORY,
            description="Loads a FLUX.2 transformer ([dev], [klein] 4B/9B, base, 9B-KV) with weight streaming for small cards.",
            inputs=[
                io.Combo.Input(
                    "model_name",
                    options=model_choices("diffusion_models"),
                    tooltip="Transformer file (.safetensors, .gguf) or diffusers folder in models/diffusion_models "
                    "or models/unet. The variant is read from the weights; the file name only tells "
                    "distilled/base/KV apart. GGUF (Q8_0 ... Q2_K) and NVFP4 weights stay in their stored bytes.",
                ),
                io.Combo.Input(
                    "dtype",
                    options=list(DTYPES),
                    default="bf16",
                    tooltip="Compute dtype. bf16 is what FLUX.2 was trained in; fp32 only for debugging on CPU.",
                ),
                io.Boolean.Input(
                    "keep_fp8",
                    default=True,
                    tooltip="For FP8 checkpoints: keep the block weights in FP8 (half the memory and half the bytes "
                    "streamed). Cards with FP8 tensor cores (RTX 40xx and newer) run FP8 matmuls where the file has "
                    "activation scales (BFL fp8 files); otherwise "
                    "dequantise per layer. Off converts the weights to the compute dtype on load. GGUF and "
                    "NVFP4 files always keep their stored bytes.",
                ),
                io.Float.Input(
                    "vram_budget_gb",
                    default=0.0,
                    min=0.0,
                    max=1024.0,
                    step=0.5,
                    tooltip="GPU memory for resident transformer weights, in GB. 0 = auto: what is free after "
                    "ComfyUI unloads other models, minus its inference reserve (--reserve-vram). Blocks that "
                    "do not fit are streamed from pinned RAM.",
                ),
                io.Float.Input(
                    "pinned_ram_gb",
                    default=0.0,
                    min=0.0,
                    max=4096.0,
                    step=1.0,
                    tooltip="Cap on pinned (page-locked) system RAM used for streamed blocks, in GB. 0 = auto.",
                ),
            ],
            outputs=[
                Flux2Model.Output(
                    display_name="model", tooltip="The loaded FLUX.2 transformer, for FLUX.2 Sampler."
                ),
                io.String.Output(
                    display_name="info",
                    tooltip="What was detected: variant, checkpoint format with its storage mix "
                    "(e.g. Q4_K 61%, Q6_K 30%, F32 9%), size in memory.",
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
        info = _describe_model(model, path)
        log.info("Flux2Local: %s", info)
        return io.NodeOutput(holder, info)


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
                    "or Hugging Face text_encoder/ folder in models/text_encoders.",
                ),
                io.Combo.Input(
                    "tokenizer",
                    options=tokenizer_choices(),
                    default="auto",
                    tooltip="Tokenizer folder in models/text_encoders; auto = the one next to the weights, "
                    "else the bundled tokenizer for the detected encoder.",
                ),
                io.Combo.Input(
                    "dtype",
                    options=list(DTYPES),
                    default="bf16",
                    tooltip="Compute dtype of the text encoder.",
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
                    "dtype", options=list(DTYPES), default="bf16", tooltip="Compute dtype of the VAE."
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
