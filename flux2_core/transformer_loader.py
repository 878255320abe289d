"""``load_transformer``: any published FLUX.2 transformer layout -> ``Flux2Transformer``.

The model is built on the meta device and assign-loaded strictly. Tensors are converted one at a
time from memory-mapped file views, so RAM never holds two copies of the weights: a tensor already
in the requested dtype is used in place (a view of the mapped file), others are converted alone.

Quantized Linear weights (GGUF types, NVFP4, and FP8 with ``keep_fp8``) stay in their stored bytes
inside ``QuantLinear`` layers and are dequantized per layer as the layer runs; small tensors (norm
scales, stored F32 by the converters) and ``img_in`` (whose dtype is the model's compute dtype) are
converted to ``dtype`` at load.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from torch import nn

from .checkpoint.assign import assign_state, check_tensors
from .checkpoint.containers import open_model
from .checkpoint.layouts import swap_halves
from .checkpoint.transformer_plan import TensorSource, TransformerPlan, plan_transformer
from .config import Flux2Config, config_from_bfl_shapes, is_block_linear
from .errors import CheckpointError
from .model.transformer import Flux2Transformer
from .quant.formats import QuantFormat, fp8_format, gguf_format, nvfp4_format
from .quant.fp8 import dequantize_fp8
from .quant.linear import QuantLinear
from .quant.nvfp4 import dequantize_nvfp4
from .quant.summary import quant_summary
from .quant.swap import swap_linears

logger = logging.getLogger(__name__)

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Kept in the compute dtype whatever the file stores: the model reads its compute dtype from it.
_DENSE_ALWAYS = frozenset({"img_in.weight"})


def _hints(path: Path, reader) -> tuple[str, bool | None]:
    """Name hint (file or folder name) and ``is_distilled`` from a diffusers ``model_index.json``."""
    if path.is_file():
        return path.name, None
    for folder in (path, Path(reader.files[0].path).parent.parent):
        index = folder / "model_index.json"
        if index.is_file():
            try:
                value = json.loads(index.read_text()).get("is_distilled")
            except (OSError, ValueError):
                value = None
            return folder.name, (bool(value) if value is not None else None)
    return path.name, None


# ------------------------------------------------------------------ dense tensors, by source kind
def _get(reader, key: str, device: torch.device) -> torch.Tensor:
    t = reader.get(key)
    return t.to(device) if device.type != "cpu" else t


def _dense_fp8(reader, src: TensorSource, dtype, device):
    scale = None if src.scale is None else _get(reader, src.scale, device)
    return dequantize_fp8(_get(reader, src.keys[0], device), scale, dtype)


def _dense_nvfp4(reader, src: TensorSource, dtype, device):
    return dequantize_nvfp4(
        _get(reader, src.keys[0], device),
        _get(reader, src.scale, device),
        _get(reader, src.scale2, device),
        dtype,
    )


# kind -> (reader, source, dtype, device) -> the tensor in ``dtype`` on ``device``.
DENSE = {
    "plain": lambda r, s, dt, dev: _get(r, s.keys[0], dev).to(dt),
    "cat": lambda r, s, dt, dev: torch.cat([_get(r, k, dev).to(dt) for k in s.keys], dim=0),
    "swap": lambda r, s, dt, dev: swap_halves(_get(r, s.keys[0], dev).to(dt)),
    "fp8": _dense_fp8,
    "nvfp4": _dense_nvfp4,
    "gguf": lambda r, s, dt, dev: r.dequantize(s.keys[0], dt, dev),
}


# ------------------------------------------------------------- kept-quantized layers, by kind
def _fp8_format(reader, src: TensorSource) -> QuantFormat:
    per_row = src.scale is not None and reader.nbytes(src.scale) > 4
    return fp8_format(reader.dtype(src.keys[0]), per_row=per_row, input_scale=src.input_scale is not None)


def _fp8_state(reader, src: TensorSource, layer: QuantLinear, device) -> dict[str, torch.Tensor]:
    scale = _get(reader, src.scale, device).float() if src.scale else torch.ones((), device=device)
    out = {
        "weight": _get(reader, src.keys[0], device),
        "weight_scale": scale.reshape(layer.weight_scale.shape),
    }
    if src.input_scale is not None:
        out["input_scale"] = _get(reader, src.input_scale, device).float().reshape(())
    return out


def _nvfp4_state(reader, src: TensorSource, layer: QuantLinear, device) -> dict[str, torch.Tensor]:
    out = {
        "weight": _get(reader, src.keys[0], device),
        "weight_scale": _get(reader, src.scale, device),
        "weight_scale_2": _get(reader, src.scale2, device).float().reshape(()),
    }
    if src.input_scale is not None:
        out["input_scale"] = _get(reader, src.input_scale, device).float().reshape(())
    return out


def _gguf_state(reader, src: TensorSource, layer: QuantLinear, device) -> dict[str, torch.Tensor]:
    return {"weight": _get(reader, src.keys[0], device)}


# kind -> (format of a kept layer, its stored tensors). Which kinds stay quantized is decided by
# ``_kept_layers`` from the loader's options.
QUANT_LAYERS = {
    "fp8": (_fp8_format, _fp8_state),
    "nvfp4": (lambda r, s: nvfp4_format(input_scale=s.input_scale is not None), _nvfp4_state),
    "gguf": (lambda r, s: gguf_format(r.ggml(s.keys[0])), _gguf_state),
}


def _kept_layers(
    model: nn.Module, plan: TransformerPlan, reader, keep_fp8: bool, keep_quantized: bool
) -> dict[str, TensorSource]:
    """Layer name -> source, for every Linear whose weight stays in its stored (quantized) bytes."""
    kept = {}
    for key, src in plan.sources.items():
        if not key.endswith(".weight") or key in _DENSE_ALWAYS:
            continue
        if src.kind == "fp8":
            keep = keep_fp8 and is_block_linear(key)  # fp8 files quantize the block linears only
        elif src.kind == "nvfp4":
            keep = keep_quantized
        elif src.kind == "gguf":
            keep = keep_quantized and reader.is_quantized(src.keys[0])
        else:
            keep = False
        layer = key[: -len(".weight")]
        if keep and isinstance(model.get_submodule(layer), nn.Linear):
            kept[layer] = src
    return kept


def load_transformer(
    path: str | os.PathLike,
    dtype: torch.dtype | str = torch.bfloat16,
    device: str | torch.device = "cpu",
    keep_fp8: bool = False,
    config: Flux2Config | None = None,
    keep_quantized: bool = True,
) -> Flux2Transformer:
    """Load a FLUX.2 transformer from any published layout.

    Args:
        path: a ``.safetensors`` file (BFL, ComfyUI-prefixed, fp8, NVFP4), a ``.gguf`` file (any mix
            of F32/F16/BF16/Q8_0/Q6_K/Q5_K/Q5_0/Q5_1/Q4_K/Q4_0/Q4_1/Q3_K/Q2_K/IQ4_NL/IQ4_XS) or a
            diffusers folder (pipeline root or its ``transformer/``).
        dtype: compute/parameter dtype: bf16, fp16 or fp32 (torch dtype or "bf16"/"fp16"/"fp32").
        device: where the parameters go.
        keep_fp8: keep fp8-stored block Linears as fp8 (``FP8Linear``) instead of dequantizing.
        config: override the detected distilled/KV flags (architecture must still match the file).
        keep_quantized: keep GGUF- and NVFP4-quantized Linears in their stored bytes (``GGUFLinear``,
            ``NVFP4Linear``); False dequantizes everything to ``dtype`` at load (a reference).

    Returns:
        The model in eval mode with ``.config``, ``.checkpoint_format`` ("bfl", "comfyui",
        "diffusers", "bfl-fp8", "comfy-fp8", "nvfp4", "gguf") and ``.quant_summary`` (storage type
        -> fraction of the parameters, as the file stores them).

    Raises:
        CheckpointError: not a FLUX.2 transformer, damaged file, unsupported quantization,
            missing/unexpected keys, wrong shapes.
    """
    dtype = _DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"dtype must be bf16, fp16 or fp32, got {dtype}")
    device = torch.device(device)
    path = Path(path)
    reader = open_model(path, subfolder="transformer")
    plan = plan_transformer(reader)
    name_hint, is_distilled = _hints(path, reader)
    try:
        detected = config_from_bfl_shapes(plan.shapes, name_hint, is_distilled)
    except KeyError as e:
        raise CheckpointError(
            reader.path,
            f"lacks the key {e} needed to recognise the model size.",
            "The file is incomplete; download it again.",
        ) from None
    except ValueError as e:
        raise CheckpointError(reader.path, f"has shapes no FLUX.2 model has ({e}).") from None
    if config is not None:
        arch = ("hidden_size", "depth", "depth_single", "context_dim", "guidance_embed")
        if any(getattr(config, a) != getattr(detected, a) for a in arch):
            raise CheckpointError(
                reader.path, f"holds a {detected.variant} model, not the requested {config.variant}."
            )
        detected = config
    with torch.device("meta"):
        model = Flux2Transformer(detected, dtype=dtype)
    check_tensors(
        reader.path,
        f"a FLUX.2 {detected.variant} transformer",
        {k: tuple(v.shape) for k, v in model.state_dict().items()},
        plan.shapes,
        plan.unexpected,
        "The file is incomplete or not a FLUX.2 transformer.",
    )
    kept = _kept_layers(model, plan, reader, keep_fp8, keep_quantized)
    swap_linears(model, {layer: QUANT_LAYERS[src.kind][0](reader, src) for layer, src in kept.items()})

    state: dict[str, torch.Tensor] = {}
    for layer, src in kept.items():
        module = model.get_submodule(layer)
        for name, t in QUANT_LAYERS[src.kind][1](reader, src, module, device).items():
            state[f"{layer}.{name}"] = t
    for key, src in plan.sources.items():
        if key.rpartition(".")[0] not in kept:
            state[key] = DENSE[src.kind](reader, src, dtype, device)
    assign_state(model, state, reader.path, f"a FLUX.2 {detected.variant} transformer")
    model.checkpoint_format = plan.checkpoint_format
    model.quant_summary = quant_summary((s.storage, _numel(s.shape)) for s in plan.sources.values())
    logger.info(
        "loaded FLUX.2 %s transformer (%s, %s, %d quantized layers kept) from %s",
        detected.variant,
        plan.checkpoint_format,
        dtype,
        len(kept),
        reader.path,
    )
    return model.eval().requires_grad_(False)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
