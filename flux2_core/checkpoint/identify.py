"""What a checkpoint holds, from its key names (and a few shapes), whatever the container.

One table of signatures serves every loader: the transformer, text-encoder and VAE loaders ask
``identify`` what a file is and, when it is not what they load, raise ``wrong_model`` naming what
it is and where it belongs. Works on safetensors files, diffusers folders and GGUF files alike
(GGUF text encoders use llama.cpp's ``token_embd`` / ``blk.N`` names; their
``general.architecture`` is used as a hint).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from ..errors import CheckpointError
from .keys import TRANSFORMER_PREFIXES

FLUX2_TRANSFORMER = "flux2-transformer"
FLUX2_VAE = "flux2-vae"
FLUX2_TEXT_ENCODER = "flux2-text-encoder"

_TEXT_PREFIXES = (
    "model.layers.",
    "model.language_model.",
    "language_model.",
    "model.embed_tokens.",
    "text_encoders.",
    "blk.",
    "token_embd.",
)
_OLD_TEXT_PREFIXES = ("text_model.", "encoder.block.", "shared.", "transformer.resblocks.", "enc.blk.")
# Where the pack's own loaders take each FLUX.2 part from. Each loader lists only its own ComfyUI model
# folder, so "load it with X" must also say to move the file there.
_OUR_LOADERS = {
    FLUX2_TRANSFORMER: "the FLUX.2 Model Loader, after moving the file to ComfyUI/models/diffusion_models/ "
    "(the only folder it lists, with models/unet)",
    FLUX2_TEXT_ENCODER: "the FLUX.2 Text Encoder Loader, after moving the file to ComfyUI/models/text_encoders/ "
    "(the only folder it lists)",
    FLUX2_VAE: "the FLUX.2 VAE Loader, after moving the file to ComfyUI/models/vae/ (the only folder it lists)",
}
# general.architecture values of llama.cpp text models (a GGUF hint when the keys say little).
TEXT_ARCHS = {"llama", "mistral3", "qwen3", "qwen2", "qwen2vl", "qwen3vl", "gemma3", "t5", "t5encoder"}


@dataclass(frozen=True)
class ModelKind:
    """What a file is.

    Attributes:
        key: stable identifier (``FLUX2_TRANSFORMER``, "flux1", "sd", "text-encoder-old", ...).
        what: how messages name it ("a FLUX.1 diffusion transformer").
        where: which loader takes it (the "Fix:" of a wrong-file error).
    """

    key: str
    what: str
    where: str


def _has(ks: set[str], *names: str) -> bool:
    return any(n in ks for n in names)


def _starts(ks: set[str], *prefixes: str) -> bool:
    return any(k.startswith(prefixes) for k in ks)


def _ends(ks: set[str], *suffixes: str) -> bool:
    return any(k.endswith(suffixes) for k in ks)


def _vae_kind(z: int | None) -> ModelKind:
    what = {
        16: "a FLUX.1 / SD3-style VAE (16 latent channels)",
        4: "an SD 1.x / SDXL VAE (4 latent channels)",
    }.get(z, "a VAE" if z is None else f"a VAE with {z} latent channels")
    return ModelKind(
        "vae", what, "ComfyUI's own VAE loader; FLUX.2 needs its own VAE (flux2-vae.safetensors)"
    )


# (test on the key set with transformer prefixes stripped, kind). First match wins, so the more
# specific signatures come first.
_SIGNATURES: tuple[tuple[Callable[[set[str]], bool], ModelKind], ...] = (
    (
        lambda ks: (
            _has(ks, "double_stream_modulation_img.lin.weight")
            or (_has(ks, "img_in.weight") and _has(ks, "single_stream_modulation.lin.weight"))
            or (_has(ks, "x_embedder.weight") and _has(ks, "double_stream_modulation_img.linear.weight"))
        ),
        ModelKind(FLUX2_TRANSFORMER, "a FLUX.2 diffusion transformer", _OUR_LOADERS[FLUX2_TRANSFORMER]),
    ),
    (
        lambda ks: _has(ks, "double_blocks.0.img_mod.lin.weight", "vector_in.in_layer.weight"),
        ModelKind(
            "flux1",
            "a FLUX.1 diffusion transformer",
            "ComfyUI's own 'Load Diffusion Model' (or Unet Loader GGUF)",
        ),
    ),
    (
        lambda ks: (
            _has(ks, "time_text_embed.timestep_embedder.linear_1.weight")
            or (_starts(ks, "transformer_blocks.") and _ends(ks, "norm1.linear.weight"))
        ),
        ModelKind("flux1", "a FLUX.1 (diffusers) diffusion transformer", "ComfyUI's own loaders"),
    ),
    (
        lambda ks: _starts(ks, "joint_blocks.") or _has(ks, "x_embedder.proj.weight"),
        ModelKind("sd3", "an SD3 / SD3.5 diffusion transformer", "ComfyUI's own loaders"),
    ),
    (
        lambda ks: (
            _has(ks, "patch_embedding.weight") and _starts(ks, "blocks.0.self_attn.", "blocks.0.cross_attn.")
        ),
        ModelKind("wan", "a Wan video diffusion transformer", "ComfyUI's own loaders"),
    ),
    (
        lambda ks: any("input_blocks.0.0.weight" in k for k in ks) or _starts(ks, "conditioner.embedders."),
        ModelKind("sd", "a Stable Diffusion / SDXL checkpoint", "ComfyUI's 'Load Checkpoint' node"),
    ),
    (
        lambda ks: _has(ks, "bn.running_mean") and _starts(ks, "decoder.", "encoder."),
        ModelKind(FLUX2_VAE, "a VAE (the FLUX.2 VAE)", _OUR_LOADERS[FLUX2_VAE]),
    ),
    (
        lambda ks: _starts(
            ks, "encoder.conv_in.", "decoder.conv_in.", "first_stage_model.", "encoder.down_blocks."
        ),
        _vae_kind(None),  # refined with the latent width below
    ),
    (
        lambda ks: _starts(ks, *_OLD_TEXT_PREFIXES),
        ModelKind(
            "text-encoder-old",
            "a CLIP or T5 text encoder (FLUX.1 and older); FLUX.2 needs Mistral Small 3.x or Qwen3",
            "ComfyUI's CLIP loaders",
        ),
    ),
    (
        lambda ks: _starts(ks, *_TEXT_PREFIXES),
        ModelKind(FLUX2_TEXT_ENCODER, "a text encoder (language model)", _OUR_LOADERS[FLUX2_TEXT_ENCODER]),
    ),
    (
        lambda ks: _starts(
            ks,
            "double_blocks.",
            "single_blocks.",
            "transformer_blocks.",
            "single_transformer_blocks.",
            "blocks.",
        ),
        ModelKind("transformer", "a diffusion transformer of another model family", "ComfyUI's own loaders"),
    ),
)


def identify(
    keys: Iterable[str],
    shape: Callable[[str], tuple[int, ...]] | None = None,
    architecture: str | None = None,
) -> ModelKind | None:
    """What the checkpoint with these keys is, or None when nothing matches.

    Args:
        keys: every key of the checkpoint (any ComfyUI transformer prefix is handled here).
        shape: key -> shape, used to tell VAEs apart by their latent width.
        architecture: a GGUF's ``general.architecture``, if any.
    """
    raw = set(keys)
    stripped = set(raw)
    for p in TRANSFORMER_PREFIXES:
        stripped |= {k[len(p) :] for k in raw if k.startswith(p)}
    for test, kind in _SIGNATURES:
        if test(stripped):
            if kind.key == "vae" and shape is not None:
                z_key = next((k for k in raw if k.endswith("decoder.conv_in.weight")), None)
                return _vae_kind(shape(z_key)[1] if z_key else None)
            return kind
    if architecture in TEXT_ARCHS:
        return ModelKind(FLUX2_TEXT_ENCODER, f"a {architecture} text model", _OUR_LOADERS[FLUX2_TEXT_ENCODER])
    return None


def wrong_model(path, kind: ModelKind | None, wanted: str, fix: str, hint: str = "") -> CheckpointError:
    """The one error for "this file is not what this loader loads".

    Args:
        path: the file or folder.
        kind: what ``identify`` found (None: unknown).
        wanted: what the loader needs, e.g. "a FLUX.2 transformer".
        fix: how to pick the right file.
        hint: for unknown files, what was looked for (e.g. the first keys).
    """
    if kind is None:
        return CheckpointError(path, f"is not {wanted}{f' ({hint})' if hint else ''}.", fix)
    return CheckpointError(path, f"is {kind.what}, not {wanted}.", f"Load it with {kind.where}. {fix}")
