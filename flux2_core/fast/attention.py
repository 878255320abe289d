"""Optional quantized attention backends (off by default), and their error against SDPA.

``Flux2Transformer.attention`` (or ``FLUX2LOCAL_ATTENTION`` when that is "sdpa"):
- "sdpa": ``torch.nn.functional.scaled_dot_product_attention`` (flash / cuDNN kernels), the default.
- "kitchen-int8": comfy-kitchen's INT8 attention (``int8_attention``: INT8 Q/K with a Hadamard
  rotation, INT8 P, FP32 softmax), CUDA only.
- "sage": SageAttention's ``sageattn`` (INT8 Q/K, FP8 or FP16 P·V depending on the GPU), CUDA only.

Quantized attention changes the output (see ``attention_error``), so it is never chosen
automatically. A backend that is not installed or not usable on the device falls back to SDPA,
logged once. The KV-variant reference paths always use SDPA.
"""

from __future__ import annotations

import importlib.util
import logging
import os

import torch

from ..model.layers import Attention, sdpa
from .settings import ENV_ATTENTION, log_once

BACKENDS = ("sdpa", "kitchen-int8", "sage")


def kitchen_int8(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """comfy-kitchen INT8 attention. q, k, v (B, L, heads, D) -> (B, L, heads, D)."""
    import comfy_kitchen as ck

    # The kernel takes (B, heads, L, D) with a contiguous last dim: the transposes are views.
    return ck.int8_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def sage(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """SageAttention in its (B, L, heads, D) layout ("NHD"), no mask."""
    from sageattention import sageattn

    return sageattn(q, k, v, tensor_layout="NHD", is_causal=False)


def _available(name: str, device: torch.device) -> tuple[bool, str]:
    if device.type != "cuda":
        return False, "quantized attention kernels are CUDA kernels"
    if name == "kitchen-int8":
        if importlib.util.find_spec("comfy_kitchen") is None:
            return False, "comfy-kitchen is not installed"
        try:
            import comfy_kitchen as ck

            ok = bool(getattr(ck, "int8_attention_is_available", lambda d: False)(device))
        except Exception as exc:  # noqa: BLE001 - optional package
            return False, f"comfy-kitchen failed ({type(exc).__name__}: {exc})"
        return ok, "available" if ok else "comfy-kitchen's INT8 attention is not available on this GPU"
    if name == "sage":
        if importlib.util.find_spec("sageattention") is None:
            return False, "SageAttention is not installed"
        return True, "available"
    return True, "available"


_FUNCTIONS: dict[str, Attention] = {"sdpa": sdpa, "kitchen-int8": kitchen_int8, "sage": sage}


def requested_attention(setting: str = "sdpa") -> str:
    name = str(setting).strip().lower() or "sdpa"
    if name == "sdpa":
        name = os.environ.get(ENV_ATTENTION, "sdpa").strip().lower() or "sdpa"
    if name not in BACKENDS:
        raise ValueError(f"attention={name!r} is not valid: choose one of {', '.join(BACKENDS)}")
    return name


def attention_for(setting: str, device: torch.device) -> Attention:
    """The attention function for the plain (non-KV) path."""
    name = requested_attention(setting)
    if name == "sdpa":
        return sdpa
    ok, why = _available(name, device)
    if not ok:
        log_once(
            f"attn:{name}:{device.type}",
            logging.WARNING,
            "attention %s unavailable (%s); using SDPA",
            name,
            why,
        )
        return sdpa
    log_once(
        f"attn:{name}:{device.type}", logging.INFO, "attention backend: %s (quantized; not bit-exact)", name
    )
    return _FUNCTIONS[name]


def attention_error(fn: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> dict[str, float]:
    """Relative errors of ``fn`` and of SDPA in the inputs' dtype, each against SDPA in fp32.

    Args:
        fn: an attention function over (B, L, heads, D).
        q, k, v: (B, L, heads, D) inputs.

    Returns:
        {"backend": ||fn - ref|| / ||ref||, "sdpa": the same for SDPA in the input dtype}.
    """
    ref = sdpa(q.float(), k.float(), v.float())
    norm = ref.norm().item()
    out = fn(q, k, v).float()
    low = sdpa(q, k, v).float()
    return {"backend": (out - ref).norm().item() / norm, "sdpa": (low - ref).norm().item() / norm}
