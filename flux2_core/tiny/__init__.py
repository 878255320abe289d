"""Tiny random FLUX.2 models written in the real checkpoint layouts (tests, demo without weights).

``write_tiny_model_set(models_dir)`` fills ComfyUI's model folders with a complete tiny set under the
official file names, so the shared workflows run unchanged on it. The pictures are noise from
untrained weights; what is exercised is every loader, layout and node.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

# (file name under diffusion_models/, variant, layout). The KV and 9B files share the tiny shapes of
# the 4B ones; only the file name tells the loader which variant they are (as with real files).
TRANSFORMER_FILES = (
    ("flux2-dev.safetensors", "dev", "bfl"),
    ("flux2_dev_fp8mixed.safetensors", "dev", "comfy-fp8"),
    ("flux-2-klein-4b.safetensors", "klein-4b", "comfyui"),
    ("flux-2-klein-base-4b.safetensors", "klein-base-4b", "bfl"),
    ("flux-2-klein-9b.safetensors", "klein-9b", "bfl"),
    ("flux-2-klein-base-9b.safetensors", "klein-base-9b", "bfl"),
    ("flux-2-klein-9b-kv.safetensors", "klein-9b-kv", "bfl"),
)
# (file name under text_encoders/, kind). [dev] pairs with Mistral, [klein] with Qwen3.
TEXT_ENCODER_FILES = (
    ("mistral_3_small_flux2_bf16.safetensors", "mistral3"),
    ("qwen_3_4b.safetensors", "qwen3-4b"),
    ("qwen_3_8b.safetensors", "qwen3-8b"),
)
VAE_FILE = "flux2-vae.safetensors"
# The [dev] GGUF (city96's naming), the Turbo LoRA for [dev] and the NSFW classifier folder that the
# GGUF, LoRA and safety workflows name.
GGUF_FILE = ("flux2-dev-Q4_K_M.gguf", "dev", "Q4_K_M")
LORA_FILE = ("Flux2TurboComfyv2.safetensors", "dev")
CLASSIFIER_FOLDER = "nsfw_image_detection"
MARKER = "flux2local-tiny-set.json"


def write_tiny_model_set(
    models_dir: str | os.PathLike, seed: int = 0, overwrite: bool = False
) -> dict[str, Path]:
    """Writes a full tiny random FLUX.2 set into ComfyUI's model folders.

    Files: every transformer variant in ``diffusion_models/`` (BFL, ComfyUI and ComfyUI-FP8 layouts,
    and a [dev] GGUF), Mistral-3 and Qwen3 text encoders in ``text_encoders/``, the VAE in ``vae/``,
    a [dev] LoRA in ``loras/`` and an NSFW classifier folder in ``safety/``, under the official file
    names. Each transformer's text width equals its tiny text encoder's output width
    (3 stacked hidden states), so the pairs the workflows use fit together.

    Args:
        models_dir: ComfyUI's ``models`` folder (subfolders are created).
        seed: weight seed; the same seed writes the same weights.
        overwrite: rewrite files that already exist.

    Returns:
        File name -> path of everything written or already present.
    """
    from .text_encoder import write_tiny_text_encoder
    from .vae import write_tiny_vae

    root = Path(models_dir)
    written: dict[str, Path] = {}
    context_dims: dict[str, int] = {}
    for i, (name, kind) in enumerate(TEXT_ENCODER_FILES):
        path = root / "text_encoders" / name
        if overwrite or not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            written[name] = Path(write_tiny_text_encoder(path, kind=kind, seed=seed + i))
        else:
            written[name] = path
        context_dims[kind] = _context_dim(written[name])
    # [dev] reads Mistral's width, 4B models Qwen3-4B's, 9B models Qwen3-8B's (all 3 x hidden).
    family = {"dev": "mistral3", "klein-4b": "qwen3-4b", "klein-base-4b": "qwen3-4b"}
    for i, (name, variant, layout) in enumerate(TRANSFORMER_FILES):
        path = root / "diffusion_models" / name
        if overwrite or not path.exists():
            ctx = context_dims[family.get(variant, "qwen3-8b")]
            written[name] = _write_transformer(path, variant, layout, seed + 100 + i, ctx)
        else:
            written[name] = path
    vae_path = root / "vae" / VAE_FILE
    if overwrite or not vae_path.exists():
        written[VAE_FILE] = Path(write_tiny_vae(vae_path, layout="comfyui", seed=seed + 200))
    else:
        written[VAE_FILE] = vae_path
    written.update(_write_extras(root, seed, overwrite, context_dims))
    (root / MARKER).write_text(json.dumps({"seed": seed, "files": sorted(written)}, indent=1))
    log.info("tiny FLUX.2 set in %s (%d files)", root, len(written))
    return written


def _write_extras(root: Path, seed: int, overwrite: bool, context_dims: dict[str, int]) -> dict[str, Path]:
    """The [dev] GGUF, its LoRA and the NSFW classifier (safetensors, GGUF and safety workflows)."""
    from .gguf import write_tiny_gguf_transformer
    from .lora import write_tiny_lora
    from .safety import write_tiny_nsfw_classifier
    from .transformer import tiny_config

    out = {}
    name, variant, mix = GGUF_FILE
    path = root / "diffusion_models" / name
    if overwrite or not path.exists():
        write_tiny_gguf_transformer(
            path, variant, mix=mix, seed=seed + 300, context_dim=context_dims["mistral3"]
        )
    out[name] = path
    name, variant = LORA_FILE
    path = root / "loras" / name
    if overwrite or not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_tiny_lora(path, tiny_config(variant, context_dim=context_dims["mistral3"]), seed=seed + 400)
    out[name] = path
    path = root / "safety" / CLASSIFIER_FOLDER
    if overwrite or not (path / "config.json").exists():
        write_tiny_nsfw_classifier(path, verdict="normal", seed=seed + 500)
    out[CLASSIFIER_FOLDER] = path
    return out


def is_tiny_model_set(models_dir: str | os.PathLike) -> bool:
    """True if ``models_dir`` holds a complete set written by ``write_tiny_model_set``."""
    marker = Path(models_dir) / MARKER
    if not marker.is_file():
        return False
    expected = {n for n, *_ in TRANSFORMER_FILES} | {n for n, _ in TEXT_ENCODER_FILES}
    expected |= {VAE_FILE, GGUF_FILE[0], LORA_FILE[0], CLASSIFIER_FOLDER}
    return expected <= set(json.loads(marker.read_text()).get("files", []))


def _context_dim(text_encoder_file: Path) -> int:
    """Output width of a tiny text encoder file: 3 stacked hidden states of its embedding width."""
    from safetensors import safe_open

    with safe_open(str(text_encoder_file), "pt") as f:
        for key in f.keys():
            if key.endswith("embed_tokens.weight"):
                return 3 * f.get_slice(key).get_shape()[1]
    raise ValueError(
        f"{text_encoder_file}: no embed_tokens.weight; not a tiny text encoder this function wrote."
    )


def _write_transformer(path: Path, variant: str, layout: str, seed: int, context_dim: int) -> Path:
    from .transformer import write_tiny_transformer

    return Path(
        write_tiny_transformer(path, variant=variant, layout=layout, seed=seed, context_dim=context_dim)
    )
