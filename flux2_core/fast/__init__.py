"""The transformer's fast path: fused block stages (torch.compile or comfy-kitchen kernels), CUDA
graphs at small shapes, optional quantized attention. The eager blocks stay the reference and the
fallback; see ``settings`` for how each part is switched on and off."""

from .attention import BACKENDS as ATTENTION_BACKENDS
from .attention import attention_error, attention_for
from .compiled import STATS as COMPILE_STATS
from .compiled import compiled_stages, reset_compiled
from .path import FastPath, width_key
from .settings import MODES, compile_available, kitchen_available, requested_mode, resolve_mode

__all__ = [
    "ATTENTION_BACKENDS",
    "COMPILE_STATS",
    "MODES",
    "FastPath",
    "attention_error",
    "attention_for",
    "compile_available",
    "compiled_stages",
    "kitchen_available",
    "requested_mode",
    "reset_compiled",
    "resolve_mode",
    "width_key",
]
