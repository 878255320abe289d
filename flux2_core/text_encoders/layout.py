"""Recognise a text-encoder checkpoint and infer its architecture from key names and shapes.

Published layouts (our module names on the right; see ``Flux2TextEncoder``):

============================  =================================================  ======================
layout                        source keys                                        ours
============================  =================================================  ======================
hf-mistral3 (transformers 5)  ``model.language_model.*``, ``model.vision_tower.*``  ``model.*``, ``vision_tower.*``
                              ``model.multi_modal_projector.*``, ``lm_head.*``     ``multi_modal_projector.*``
hf-mistral3-legacy (4.x)      ``language_model.model.*``, ``language_model.lm_head.*``, ``vision_tower.*`` ...
decoder (HF Qwen3, ComfyUI)   ``model.*``, ``lm_head.*`` (ComfyUI Mistral adds a ``tekken_model`` uint8 tensor)
comfyui-bundled               ``text_encoders.{mistral3_24b,qwen3_4b,qwen3_8b}.transformer.`` + decoder keys
============================  =================================================  ======================

ComfyUI's fp8 files store decoder Linear weights as float8 with a scalar ``<layer>.weight_scale``
(and a ``<layer>.comfy_quant`` JSON tensor), or the legacy ``scaled_fp8`` form with
``<layer>.scale_weight``. A Mistral file without layer 39 is the 30-layer "pruned" [dev] encoder.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field

import torch

from ..checkpoint.identify import FLUX2_TEXT_ENCODER, identify, wrong_model
from ..checkpoint.keys import count_blocks
from ..errors import CheckpointError
from .spec import DECODER_PRESETS, MISTRAL3, QWEN3, DecoderShape

logger = logging.getLogger(__name__)

_BUNDLED_NAMES = {"mistral3_24b": MISTRAL3, "qwen3_4b": QWEN3, "qwen3_8b": QWEN3}

# (prefix of the decoder in the file, rules mapping file prefixes to ours, layout name)
_CANDIDATES: list[tuple[str, tuple[tuple[str, str], ...], str]] = [
    (
        "model.language_model.",
        (
            ("model.language_model.", "model."),
            ("model.vision_tower.", "vision_tower."),
            ("model.multi_modal_projector.", "multi_modal_projector."),
            ("lm_head.", "lm_head."),
        ),
        "hf-mistral3",
    ),
    (
        "language_model.model.",
        (
            ("language_model.model.", "model."),
            ("language_model.lm_head.", "lm_head."),
            ("vision_tower.", "vision_tower."),
            ("multi_modal_projector.", "multi_modal_projector."),
        ),
        "hf-mistral3-legacy",
    ),
    ("model.", (("model.", "model."), ("lm_head.", "lm_head.")), "decoder"),
] + [
    (
        f"text_encoders.{n}.transformer.model.",
        (
            (f"text_encoders.{n}.transformer.model.", "model."),
            (f"text_encoders.{n}.transformer.lm_head.", "lm_head."),
        ),
        "comfyui-bundled",
    )
    for n in _BUNDLED_NAMES
]

_FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
_TE_FIX = (
    "Choose a FLUX.2 text encoder: mistral_3_small_flux2_*.safetensors (or a FLUX.2-dev text_encoder/ "
    "folder) for [dev], qwen_3_4b.safetensors / qwen_3_8b*.safetensors (or a FLUX.2-klein "
    "text_encoder/ folder) for [klein]."
)


@dataclass
class TextEncoderLayout:
    """A recognised text-encoder checkpoint.

    Attributes:
        kind: ``"mistral3"`` or ``"qwen3"``.
        name: layout name (see the module docstring).
        rules: (file prefix, our prefix) pairs; keys matching no rule are ignored.
        shape: decoder architecture.
        quant: ``None``, ``"fp8"`` (``.weight_scale``) or ``"fp8-legacy"`` (``.scale_weight``).
        has_lm_head, has_vision: whether the file carries an output head / a Pixtral vision tower.
        tekken_key: key of ComfyUI's embedded tekken tokenizer bytes, if any.
        hf_config: the folder's ``config.json`` (text part), if any.
    """

    kind: str
    name: str
    rules: tuple[tuple[str, str], ...]
    shape: DecoderShape
    quant: str | None = None
    has_lm_head: bool = False
    has_vision: bool = False
    tekken_key: str | None = None
    hf_config: dict = field(default_factory=dict)
    vlm_config: dict | None = None

    def our_name(self, key: str) -> str | None:
        for src, dst in self.rules:
            if key.startswith(src):
                return dst + key[len(src) :]
        return None


def _diagnose_wrong_file(path: str, keys: list[str], shape=None) -> CheckpointError:
    """What the file is instead (the shared ``identify`` table), as a wrong-file error."""
    kind = identify(keys, shape)
    if kind is not None and kind.key == FLUX2_TEXT_ENCODER:
        kind = None  # a language model, but not one this loader recognised
    return wrong_model(
        path,
        kind,
        "a Mistral Small 3.x or Qwen3 text encoder",
        _TE_FIX,
        "no 'layers.0.self_attn.k_proj.weight' found",
    )


def _layer_count(keys: list[str], prefix: str) -> int:
    return count_blocks(keys, prefix + "layers.", require_contiguous=True)


def _read_hf_config(path: str) -> dict:
    """config.json of a transformers folder (or of its text_encoder/ subfolder), or {}."""
    if not os.path.isdir(path):
        return {}
    for cand in (os.path.join(path, "config.json"), os.path.join(path, "text_encoder", "config.json")):
        if os.path.isfile(cand):
            try:
                with open(cand, encoding="utf-8") as f:
                    return json.load(f)
            except (OSError, ValueError) as e:
                raise CheckpointError(
                    cand, f"cannot be read as JSON ({e}).", "Download config.json again."
                ) from None
    return {}


def _infer_head_dim(kind: str, reader, dec: str, hidden: int, text_cfg: dict) -> int:
    if text_cfg.get("head_dim"):
        return int(text_cfg["head_dim"])
    if kind == QWEN3:
        return reader.shape(f"{dec}layers.0.self_attn.q_norm.weight")[0]
    if hidden == DECODER_PRESETS["mistral-small-3.2-24b"].hidden_size:
        return DECODER_PRESETS["mistral-small-3.2-24b"].head_dim
    # Not derivable from q/k shapes alone (heads x head_dim): take the largest usual head size.
    q_out = reader.shape(f"{dec}layers.0.self_attn.q_proj.weight")[0]
    kv_out = reader.shape(f"{dec}layers.0.self_attn.k_proj.weight")[0]
    for hd in (128, 64, 32, 16, 8):
        if q_out % hd == 0 and kv_out % hd == 0:
            return hd
    return kv_out


def detect_layout(reader, path: str | os.PathLike) -> TextEncoderLayout:
    """Recognise the checkpoint behind ``reader`` and infer the decoder architecture.

    Args:
        reader: a ``CheckpointReader`` (``keys()``, ``shape()``, ``dtype()``, ``get()``).
        path: the file or folder, for messages and to find a ``config.json``.

    Returns:
        The ``TextEncoderLayout``.

    Raises:
        CheckpointError: not a Mistral Small 3.x / Qwen3 text encoder, or an unsupported variant.
    """
    path = os.fspath(path)
    keys = sorted(reader.keys())
    keyset = set(keys)
    found = next((c for c in _CANDIDATES if f"{c[0]}layers.0.self_attn.k_proj.weight" in keyset), None)
    if found is None:
        raise _diagnose_wrong_file(path, keys, reader.shape)
    dec, rules, name = found

    hf_cfg = _read_hf_config(path)
    text_cfg = hf_cfg.get("text_config", hf_cfg) if hf_cfg else {}
    kind = QWEN3 if f"{dec}layers.0.self_attn.q_norm.weight" in keyset else MISTRAL3
    if name == "comfyui-bundled":
        kind = _BUNDLED_NAMES[dec.split(".")[1]]
    if text_cfg.get("model_type") not in (None, "mistral", "qwen3", "mistral3"):
        raise CheckpointError(
            path, f"is a '{text_cfg['model_type']}' model, not Mistral Small 3.x or Qwen3.", _TE_FIX
        )

    try:
        n_layers = _layer_count(keys, dec)
    except ValueError as e:
        raise CheckpointError(path, f"is incomplete: {e}.", "Download the file again.") from None
    vocab, hidden = reader.shape(f"{dec}embed_tokens.weight")
    family_vocab = {
        MISTRAL3: DECODER_PRESETS["mistral-small-3.2-24b"].vocab_size,
        QWEN3: DECODER_PRESETS["qwen3-4b"].vocab_size,
    }[kind]
    if vocab != family_vocab:  # e.g. Llama 3 (128256) or Gemma 3 (262144) have the same key names
        raise CheckpointError(
            path,
            f"is a language model with a {vocab}-token vocabulary, not "
            f"{'Mistral Small 3.x' if kind == MISTRAL3 else 'Qwen3'} ({family_vocab}).",
            _TE_FIX,
        )
    head_dim = _infer_head_dim(kind, reader, dec, hidden, text_cfg)
    q_out = reader.shape(f"{dec}layers.0.self_attn.q_proj.weight")[0]
    kv_out = reader.shape(f"{dec}layers.0.self_attn.k_proj.weight")[0]
    preset = DECODER_PRESETS[
        "mistral-small-3.2-24b" if kind == MISTRAL3 else ("qwen3-8b" if hidden == 4096 else "qwen3-4b")
    ]
    lm_key = next((src for src, dst in rules if dst == "lm_head."), "lm_head.") + "weight"
    has_lm_head = lm_key in keyset
    tie = text_cfg.get("tie_word_embeddings", hf_cfg.get("tie_word_embeddings"))
    if tie is None:  # single files carry no config: only Qwen3-4B (width 2560) ties its head
        tie = kind == QWEN3 and hidden == 2560 and not has_lm_head
    shape = DecoderShape(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=reader.shape(f"{dec}layers.0.mlp.gate_proj.weight")[0],
        num_hidden_layers=n_layers,
        num_attention_heads=q_out // head_dim,
        num_key_value_heads=kv_out // head_dim,
        head_dim=head_dim,
        rope_theta=float(
            text_cfg.get("rope_theta")
            or (text_cfg.get("rope_parameters") or {}).get("rope_theta")
            or preset.rope_theta
        ),
        rms_norm_eps=float(text_cfg.get("rms_norm_eps", preset.rms_norm_eps)),
        max_position_embeddings=int(text_cfg.get("max_position_embeddings", preset.max_position_embeddings)),
        tie_word_embeddings=bool(tie),
    )

    quant = None
    w0 = f"{dec}layers.0.self_attn.q_proj.weight"
    if reader.dtype(w0) in _FP8_DTYPES:
        quant = "fp8" if f"{dec}layers.0.self_attn.q_proj.weight_scale" in keyset else "fp8-legacy"
        qconf = f"{dec}layers.0.self_attn.q_proj.comfy_quant"
        if qconf in keyset:
            fmt = json.loads(bytes(reader.get(qconf).tolist()).decode("utf-8")).get("format")
            if fmt not in ("float8_e4m3fn", "float8_e5m2"):
                raise CheckpointError(
                    path,
                    f"uses the '{fmt}' quantisation, which this loader cannot read.",
                    "Use the bf16 or fp8 version of the text encoder.",
                )
    elif reader.dtype(w0) == torch.uint8 or f"{dec}layers.0.self_attn.q_proj.weight_scale_2" in keyset:
        raise CheckpointError(
            path,
            "stores 4-bit (NVFP4 / fp4_mixed) weights, which this loader cannot read.",
            "Use the bf16 or fp8 version of the text encoder.",
        )

    vis_prefix = next((src for src, dst in rules if dst == "vision_tower."), None)
    has_vision = vis_prefix is not None and f"{vis_prefix}patch_conv.weight" in keyset
    if has_vision and not hf_cfg.get("vision_config"):
        logger.warning(
            "%s: vision tower found but no config.json with a vision_config; images are ignored.", path
        )
        has_vision = False
    tekken_key = next((k for k in keys if k == "tekken_model" or k.endswith(".tekken_model")), None)
    layout = TextEncoderLayout(
        kind=kind,
        name=name,
        rules=rules,
        shape=shape,
        quant=quant,
        has_lm_head=has_lm_head,
        has_vision=has_vision,
        tekken_key=tekken_key,
        hf_config=text_cfg,
        vlm_config=hf_cfg if has_vision else None,
    )
    logger.info(
        "text encoder %s: %s, layout %s, %d layers, width %d%s",
        path,
        kind,
        name,
        n_layers,
        hidden,
        f", {quant}" if quant else "",
    )
    return layout
