"""``load_transformer``: any published FLUX.2 transformer layout -> ``Flux2Transformer``.

The model is built on the meta device and assign-loaded strictly. Tensors are converted one at a
time from memory-mapped file views, so RAM never holds two copies of the weights: a tensor already
in the requested dtype is used in place (a view of the mapped file), others are converted alone.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from .checkpoint import CheckpointReader, open_checkpoint
from .checkpoint.layouts import swap_halves
from .checkpoint.transformer_plan import TensorSource, TransformerPlan, fp8_block_layers, plan_transformer
from .config import Flux2Config, config_from_bfl_shapes
from .errors import CheckpointError
from .model.transformer import Flux2Transformer
from .quant.fp8 import dequantize_fp8
from .quant.linear import FP8Linear
from .quant.nvfp4 import dequantize_nvfp4

logger = logging.getLogger(__name__)

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_LIST = 8  # names shown in missing/unexpected key errors


def _hints(path: Path, reader: CheckpointReader) -> tuple[str, bool | None]:
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


def _materialize(reader: CheckpointReader, src: TensorSource, dtype: torch.dtype, device: torch.device):
    def get(key: str) -> torch.Tensor:
        t = reader.get(key)
        return t.to(device) if device.type != "cpu" else t

    if src.kind == "plain":
        return get(src.keys[0]).to(dtype)
    if src.kind == "cat":
        return torch.cat([get(k).to(dtype) for k in src.keys], dim=0)
    if src.kind == "swap":
        return swap_halves(get(src.keys[0]).to(dtype))
    if src.kind == "fp8":
        scale = None if src.scale is None else get(src.scale)
        return dequantize_fp8(get(src.keys[0]), scale, dtype)
    if src.kind == "nvfp4":
        return dequantize_nvfp4(get(src.keys[0]), get(src.scale), get(src.scale2), dtype)
    raise AssertionError(src.kind)


def _keep_fp8(model: Flux2Transformer, plan: TransformerPlan) -> set[str]:
    """Swap the fp8-stored block Linears for ``FP8Linear`` (on meta). Returns the layer names."""
    layers = fp8_block_layers(plan)
    for name, has_input_scale in layers.items():
        parent, _, attr = name.rpartition(".")
        old = model.get_submodule(name)
        wdtype = torch.float8_e4m3fn
        new = FP8Linear(
            old.in_features, old.out_features, has_input_scale, weight_dtype=wdtype, device="meta"
        )
        setattr(model.get_submodule(parent), attr, new)
    return set(layers)


def _fmt(names: list[str]) -> str:
    more = f" (+{len(names) - _LIST} more)" if len(names) > _LIST else ""
    return ", ".join(names[:_LIST]) + more


def load_transformer(
    path: str | os.PathLike,
    dtype: torch.dtype | str = torch.bfloat16,
    device: str | torch.device = "cpu",
    keep_fp8: bool = False,
    config: Flux2Config | None = None,
) -> Flux2Transformer:
    """Load a FLUX.2 transformer from any published layout.

    Args:
        path: a ``.safetensors`` file (BFL, ComfyUI-prefixed, fp8, NVFP4) or a diffusers folder
            (pipeline root or its ``transformer/``).
        dtype: compute/parameter dtype: bf16, fp16 or fp32 (torch dtype or "bf16"/"fp16"/"fp32").
        device: where the parameters go.
        keep_fp8: keep fp8-stored block Linears as fp8 (``FP8Linear``) instead of dequantizing.
        config: override the detected distilled/KV flags (architecture must still match the file).

    Returns:
        The model in eval mode with ``.config`` and ``.checkpoint_format``.

    Raises:
        CheckpointError: not a FLUX.2 transformer, damaged file, missing/unexpected keys, wrong shapes.
    """
    dtype = _DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"dtype must be bf16, fp16 or fp32, got {dtype}")
    device = torch.device(device)
    path = Path(path)
    reader = open_checkpoint(path, subfolder="transformer")
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
    fp8_layers = _keep_fp8(model, plan) if keep_fp8 else set()
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    provided = set(plan.sources)
    for layer in fp8_layers:
        provided.add(f"{layer}.weight_scale")
        if plan.sources[f"{layer}.weight"].input_scale is not None:
            provided.add(f"{layer}.input_scale")
    missing = sorted(set(expected) - provided)
    unexpected = sorted((provided - set(expected)) | set(plan.unexpected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s): {_fmt(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {_fmt(unexpected)}")
        raise CheckpointError(
            reader.path,
            f"does not match a FLUX.2 {detected.variant} transformer: " + "; ".join(parts) + ".",
            "The file is incomplete or not a FLUX.2 transformer.",
        )
    bad = [
        f"{k} {plan.sources[k].shape} (expected {expected[k]})"
        for k in plan.sources
        if k in expected and plan.sources[k].shape != expected[k] and k.rpartition(".")[0] not in fp8_layers
    ]
    if bad:
        raise CheckpointError(
            reader.path,
            f"has tensors of the wrong shape: {_fmt(bad)}.",
            "The file is damaged or mixes two models.",
        )

    state: dict[str, torch.Tensor] = {}
    for key in expected:
        layer = key.rpartition(".")[0]
        if layer in fp8_layers:
            src = plan.sources[f"{layer}.weight"]
            if key.endswith(".weight"):
                state[key] = reader.get(src.keys[0]).to(device)
            elif key.endswith(".weight_scale"):
                scale = reader.get(src.scale) if src.scale else torch.ones(())
                state[key] = scale.float().reshape(()).to(device)
            else:
                state[key] = reader.get(src.input_scale).float().reshape(()).to(device)
            continue
        state[key] = _materialize(reader, plan.sources[key], dtype, device)
    model.load_state_dict(state, strict=True, assign=True)
    model.checkpoint_format = plan.checkpoint_format
    logger.info(
        "loaded FLUX.2 %s transformer (%s, %s) from %s",
        detected.variant,
        plan.checkpoint_format,
        dtype,
        reader.path,
    )
    return model.eval().requires_grad_(False)
