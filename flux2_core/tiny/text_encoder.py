"""Tiny random FLUX.2 text encoders written in the real published layouts.

The tiny models keep the real layer counts (Mistral 40, Qwen3 36) and vocabularies, so the real
layer indices (10/20/30, 9/18/27) and the real tokenizers apply; only the widths are tiny (hidden 64).
Weights are rounded to bf16 in the model itself, so a float32 reference built by
``tiny_reference_model`` with the same seed equals what the files hold.

Layouts: ``"comfyui"`` (single file, ``model.*`` keys; Mistral adds the ``tekken_model`` uint8
tensor), ``"comfyui-pruned"`` (Mistral, 30 layers), ``"comfyui-fp8"`` (float8 decoder Linears with
``.weight_scale`` + ``.comfy_quant``), ``"comfyui-fp8-legacy"`` (``scaled_fp8`` + ``.scale_weight``),
``"comfyui-bundled"`` (``text_encoders.<name>.transformer.`` prefix), ``"hf"`` (a pipeline folder with
a sharded ``text_encoder/`` + ``config.json`` and ``tokenizer/``) and ``"hf-legacy"`` (Mistral keys of
transformers 4.x: ``language_model.model.*``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

log = logging.getLogger(__name__)

KINDS = ("mistral3", "qwen3-4b", "qwen3-8b")
LAYOUTS = (
    "comfyui",
    "comfyui-pruned",
    "comfyui-fp8",
    "comfyui-fp8-legacy",
    "comfyui-bundled",
    "hf",
    "hf-legacy",
)
_BUNDLED_NAME = {"mistral3": "mistral3_24b", "qwen3-4b": "qwen3_4b", "qwen3-8b": "qwen3_8b"}
_FP8_MAX = 448.0  # largest float8_e4m3fn value


def _normalise_kind(kind: str, path: str | os.PathLike | None = None) -> str:
    if kind == "qwen3":  # the 8B file names carry "8b"
        return "qwen3-8b" if path is not None and "8b" in Path(path).name.lower() else "qwen3-4b"
    if kind not in KINDS:
        raise ValueError(f"unknown tiny text encoder kind {kind!r}; expected one of {KINDS} or 'qwen3'")
    return kind


def tiny_reference_model(kind: str, seed: int = 0) -> torch.nn.Module:
    """The float32 transformers model whose weights the tiny files hold (bf16-representable values).

    Returns:
        ``Mistral3ForConditionalGeneration`` (tiny Pixtral vision tower included) or ``Qwen3ForCausalLM``.
    """
    from transformers import (
        Mistral3Config,
        Mistral3ForConditionalGeneration,
        MistralConfig,
        PixtralVisionConfig,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    kind = _normalise_kind(kind)
    torch.manual_seed(seed)
    common = dict(
        hidden_size=64, num_attention_heads=2, num_key_value_heads=1, head_dim=32, hidden_act="silu"
    )
    if kind == "mistral3":
        text = MistralConfig(
            vocab_size=131072,
            intermediate_size=128,
            num_hidden_layers=40,
            rope_theta=1e9,
            rms_norm_eps=1e-5,
            max_position_embeddings=4096,
            sliding_window=None,
            tie_word_embeddings=False,
            **common,
        )
        vision = PixtralVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            head_dim=16,
            patch_size=14,
            image_size=224,
        )
        config = Mistral3Config(
            text_config=text,
            vision_config=vision,
            spatial_merge_size=2,
            image_token_index=10,
            tie_word_embeddings=False,
        )
        model = Mistral3ForConditionalGeneration(config)
    else:
        # 4B ties its output head to the embeddings (as Qwen3-4B does); 8B has its own head. Both keep
        # hidden 64 so every tiny klein transformer fits either (context 192).
        model = Qwen3ForCausalLM(
            Qwen3Config(
                vocab_size=151936,
                intermediate_size=128 if kind == "qwen3-4b" else 160,
                num_hidden_layers=36,
                rope_theta=1e6,
                rms_norm_eps=1e-6,
                max_position_embeddings=4096,
                tie_word_embeddings=kind == "qwen3-4b",
                **common,
            )
        )
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or ".norm" in name or "ln_pre" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.06 * torch.randn(p.shape, generator=gen))
            p.copy_(p.to(torch.bfloat16).float())  # what a bf16 file stores
    model.config._attn_implementation = "sdpa"
    return model.eval().requires_grad_(False)


def quantize_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor float8_e4m3fn quantisation: (w8, scale) with w ~= w8.float() * scale."""
    scale = (w.float().abs().max() / _FP8_MAX).clamp(min=1e-12)
    return (w.float() / scale).to(torch.float8_e4m3fn), scale.reshape(()).to(torch.float32)


def is_decoder_linear(key: str) -> bool:
    """True for a decoder layer's projection weight (what the FP8 layouts store in float8)."""
    return ".layers." in key and key.endswith("_proj.weight")


def decoder_state(model: torch.nn.Module, kind: str) -> dict[str, torch.Tensor]:
    """``model.*`` decoder keys (+ ``lm_head.weight`` when untied) of a transformers model, named as
    ComfyUI's and the published text-only files name them.

    Args:
        model: a transformers ``Mistral3ForConditionalGeneration`` / ``Qwen3ForCausalLM`` (any device,
            meta included: only names and shapes are needed for a header).
        kind: "mistral3" or a Qwen3 kind.
    """
    sd = model.state_dict()
    if kind == "mistral3":
        out = {
            "model." + k[len("model.language_model.") :]: v
            for k, v in sd.items()
            if k.startswith("model.language_model.")
        }
        out["lm_head.weight"] = sd["lm_head.weight"]
        return out
    out = {k: v for k, v in sd.items() if k.startswith("model.")}
    if not model.config.tie_word_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    return out


def _default_tokenizer(kind: str) -> Path | None:
    assets = os.environ.get("FLUX2LOCAL_ASSETS")
    if not assets:
        return None
    p = Path(assets) / ("mistral3-tekken/tekken.json" if kind == "mistral3" else "qwen3-tokenizer")
    return p if p.exists() else None


def write_tiny_text_encoder(
    path: str | os.PathLike,
    kind: str = "qwen3-4b",
    layout: str = "comfyui",
    seed: int = 0,
    tokenizer: str | os.PathLike | None = None,
) -> Path:
    """Write a tiny random FLUX.2 text encoder in a published layout.

    Args:
        path: the ``.safetensors`` file (ComfyUI layouts) or the pipeline folder (``hf*`` layouts).
        kind: ``"mistral3"``, ``"qwen3-4b"``, ``"qwen3-8b"`` (or ``"qwen3"``: 8B if the file name has "8b").
        layout: one of ``LAYOUTS`` (see the module docstring).
        seed: weight seed (same seed, same weights, in every layout).
        tokenizer: tekken.json (Mistral) or a Qwen3 tokenizer folder/file; default: the test assets in
            ``$FLUX2LOCAL_ASSETS``. Required for ComfyUI Mistral files (they embed tekken).

    Returns:
        ``path``.
    """
    kind = _normalise_kind(kind, path)
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    if kind != "mistral3" and layout in ("comfyui-pruned", "hf-legacy"):
        raise ValueError(f"layout {layout!r} exists only for the Mistral encoder")
    tok = Path(tokenizer) if tokenizer is not None else _default_tokenizer(kind)
    model = tiny_reference_model(kind, seed)
    path = Path(path)
    if layout.startswith("hf"):
        _write_hf(path, model, kind, layout, tok)
        return path

    sd = {k: v.to(torch.bfloat16) for k, v in decoder_state(model, kind).items()}
    if kind == "mistral3":
        sd.pop("lm_head.weight")  # ComfyUI's [dev] encoder files are text-only embedders (no head)
    if layout == "comfyui-pruned":
        # 30 layers and no final norm: FLUX.2 reads the raw output of layer 30 (ComfyUI: final_norm=False).
        sd = {
            k: v
            for k, v in sd.items()
            if k != "model.norm.weight" and not any(k.startswith(f"model.layers.{i}.") for i in range(30, 40))
        }
    if layout in ("comfyui-fp8", "comfyui-fp8-legacy"):
        for key in [k for k in sd if is_decoder_linear(k)]:
            w8, scale = quantize_fp8(sd[key])
            sd[key] = w8
            base = key[: -len(".weight")]
            if layout == "comfyui-fp8":
                sd[base + ".weight_scale"] = scale
                sd[base + ".comfy_quant"] = torch.tensor(
                    list(b'{"format": "float8_e4m3fn"}'), dtype=torch.uint8
                )
            else:
                sd[base + ".scale_weight"] = scale
        if layout == "comfyui-fp8-legacy":
            sd["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    if kind == "mistral3":
        if tok is None or not tok.is_file():
            raise FileNotFoundError(
                "a tekken.json is needed to write a ComfyUI Mistral file (it embeds the "
                "tokenizer); run .ci/env.sh (FLUX2LOCAL_ASSETS) or pass tokenizer="
            )
        sd["tekken_model"] = torch.frombuffer(bytearray(tok.read_bytes()), dtype=torch.uint8)
    if layout == "comfyui-bundled":
        pre = f"text_encoders.{_BUNDLED_NAME[kind]}."
        sd = {(pre + k if k == "tekken_model" else pre + "transformer." + k): v for k, v in sd.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    log.info("tiny %s text encoder (%s) written to %s", kind, layout, path)
    return path


def _write_hf(root: Path, model: torch.nn.Module, kind: str, layout: str, tok: Path | None) -> None:
    te = root / "text_encoder"
    te.mkdir(parents=True, exist_ok=True)
    sd = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        sd.pop("lm_head.weight", None)
    if layout == "hf-legacy":
        renames = (
            ("model.language_model.", "language_model.model."),
            ("lm_head.", "language_model.lm_head."),
            ("model.vision_tower.", "vision_tower."),
            ("model.multi_modal_projector.", "multi_modal_projector."),
        )
        sd = {next((n + k[len(o) :] for o, n in renames if k.startswith(o)), k): v for k, v in sd.items()}
    keys = sorted(sd)
    half = len(keys) // 2
    weight_map = {}
    for i, part in enumerate((keys[:half], keys[half:])):
        name = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({k: sd[k].contiguous() for k in part}, str(te / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    total = sum(v.numel() * v.element_size() for v in sd.values())
    (te / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1)
    )
    model.config.to_json_file(str(te / "config.json"))
    if tok is not None:
        dst = root / "tokenizer"
        dst.mkdir(exist_ok=True)
        if tok.is_dir():
            for f in tok.iterdir():
                if f.is_file():
                    shutil.copy(f, dst / f.name)
        else:
            shutil.copy(tok, dst / ("tekken.json" if kind == "mistral3" else tok.name))
