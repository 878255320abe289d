"""Which fast path the transformer blocks take, and why (logged once per decision).

Modes (``Flux2Transformer.fast_path``, or the ``FLUX2LOCAL_FAST`` environment variable when that
setting is "auto"):

- "auto": "compile" on CUDA when torch.compile can generate Triton kernels there; else "kitchen" on
  CUDA when comfy-kitchen's compiled CUDA kernels are installed and enabled; else "eager".
- "compile": each block's two stages (before and after attention) through torch.compile (inductor),
  which fuses the elementwise chains (layer norm + modulation, QK RMSNorm + RoPE, gates + residuals,
  SwiGLU, FP8 activation quantization) into the kernels that produce them. Also on the CPU, where
  inductor emits C++ (used by the tests).
- "kitchen": eager stages with comfy-kitchen's fused ``adaln`` and ``rms_rope`` kernels (the path for
  installs without Triton, e.g. most Windows ComfyUI installs).
- "eager": the reference code, unchanged.

CUDA graphs (``Flux2Transformer.cuda_graphs`` / ``FLUX2LOCAL_CUDA_GRAPHS``): "auto" captures the whole
forward for small token counts when the model is resident and unhooked (see ``graphs``); "on"
captures at any size; "off" never.
"""

from __future__ import annotations

import importlib.util
import logging
import os

import torch

logger = logging.getLogger(__name__)

ENV_FAST = "FLUX2LOCAL_FAST"
ENV_GRAPHS = "FLUX2LOCAL_CUDA_GRAPHS"
ENV_GRAPH_TOKENS = "FLUX2LOCAL_CUDA_GRAPH_TOKENS"
ENV_ATTENTION = "FLUX2LOCAL_ATTENTION"
ENV_COMPILE_MODE = "FLUX2LOCAL_COMPILE_MODE"

MODES = ("auto", "eager", "compile", "kitchen")
# Spellings accepted for the fast-path setting and environment variable.
_ALIASES = {
    "auto": "auto",
    "": "auto",
    "eager": "eager",
    "off": "eager",
    "0": "eager",
    "false": "eager",
    "no": "eager",
    "compile": "compile",
    "on": "compile",
    "1": "compile",
    "true": "compile",
    "yes": "compile",
    "kitchen": "kitchen",
}
_GRAPH_ALIASES = {"auto": "auto", "": "auto", "on": "on", "1": "on", "off": "off", "0": "off"}
# Token count (image + text + references) up to which "auto" captures CUDA graphs: launch overhead
# matters at small shapes ([klein] 4B at 512^2 is 1024 + 512 tokens); at 1024^2 the kernels are long
# enough that replaying saves little, and the graph would pin that much more activation memory.
DEFAULT_GRAPH_TOKENS = 2048

_logged: set[str] = set()


def log_once(key: str, level: int, msg: str, *args) -> None:
    """Log a decision the first time it is made (per process)."""
    if key in _logged:
        return
    _logged.add(key)
    logger.log(level, msg, *args)


def _normalise(value: str, aliases: dict[str, str], what: str) -> str:
    v = str(value).strip().lower()
    if v not in aliases:
        raise ValueError(
            f"{what}={value!r} is not valid: choose one of {', '.join(sorted(set(aliases.values())))}"
        )
    return aliases[v]


def requested_mode(setting: str = "auto") -> str:
    """The mode asked for: the core setting, or the environment variable when the setting is "auto"."""
    mode = _normalise(setting, _ALIASES, "fast_path")
    if mode == "auto":
        mode = _normalise(os.environ.get(ENV_FAST, "auto"), _ALIASES, ENV_FAST)
    return mode


def requested_graphs(setting: str = "auto") -> str:
    """ "auto", "on" or "off" for CUDA graphs (the environment variable applies when the setting is auto)."""
    mode = _normalise(setting, _GRAPH_ALIASES, "cuda_graphs")
    if mode == "auto":
        mode = _normalise(os.environ.get(ENV_GRAPHS, "auto"), _GRAPH_ALIASES, ENV_GRAPHS)
    return mode


def graph_token_limit() -> int:
    raw = os.environ.get(ENV_GRAPH_TOKENS)
    return int(raw) if raw else DEFAULT_GRAPH_TOKENS


def compile_mode() -> str | None:
    """torch.compile mode for the stages (None = inductor's default; e.g. "max-autotune-no-cudagraphs")."""
    return os.environ.get(ENV_COMPILE_MODE) or None


def compile_available(device: torch.device) -> tuple[bool, str]:
    """Whether torch.compile can build kernels for ``device``, with the reason when not."""
    try:
        import torch._dynamo as dynamo

        if not dynamo.is_dynamo_supported():
            return False, "torch.compile does not support this Python version"
        if torch.torch_version.TorchVersion(torch.__version__) < "2.5":
            # Older torch specialises compiled code on each module object (no inlining of built-in
            # modules): every block would compile its own copy, past the recompile limit.
            return False, f"torch {torch.__version__} is too old for per-block compilation (needs 2.5+)"
    except Exception as exc:  # noqa: BLE001 - a broken torch install: say so and run eager
        return False, f"torch.compile is unavailable ({type(exc).__name__}: {exc})"
    if device.type == "cuda":
        if importlib.util.find_spec("triton") is None:
            return False, "Triton is not installed"
        try:
            from torch.utils._triton import has_triton

            if not has_triton():
                return False, "Triton cannot compile for this GPU"
        except Exception as exc:  # noqa: BLE001
            return False, f"Triton check failed ({type(exc).__name__}: {exc})"
        return True, "Triton"
    if device.type == "cpu":
        return True, "inductor C++ backend"
    return False, f"no torch.compile backend chosen for {device.type} devices"


def kitchen_available(device: torch.device) -> tuple[bool, str]:
    """Whether comfy-kitchen's compiled CUDA kernels for adaln and rms_rope can run on ``device``.

    ComfyUI disables comfy-kitchen's CUDA backend for torch builds older than CUDA 13; a disabled or
    missing backend would route the calls to comfy-kitchen's own eager code, which is slower than ours.
    """
    if importlib.util.find_spec("comfy_kitchen") is None:
        return False, "comfy-kitchen is not installed"
    try:
        import comfy_kitchen as ck
    except Exception as exc:  # noqa: BLE001 - a broken optional package must not stop the pack
        return False, f"comfy-kitchen failed to import ({type(exc).__name__}: {exc})"
    if not (hasattr(ck, "adaln") and hasattr(ck, "rms_rope")):
        return False, "this comfy-kitchen version has no adaln / rms_rope kernels"
    if device.type != "cuda":
        return False, "comfy-kitchen's fused kernels are CUDA kernels"
    try:
        cuda = ck.list_backends().get("cuda", {})
    except Exception as exc:  # noqa: BLE001
        return False, f"comfy-kitchen backend query failed ({type(exc).__name__}: {exc})"
    caps = cuda.get("capabilities") or ()
    if not cuda.get("available") or cuda.get("disabled"):
        return False, f"comfy-kitchen's CUDA backend is off ({cuda.get('unavailable_reason') or 'disabled'})"
    if "adaln" not in caps or "rms_rope" not in caps:
        return False, "comfy-kitchen's CUDA backend lacks adaln / rms_rope"
    return True, "comfy-kitchen CUDA kernels"


def resolve_mode(setting: str, device: torch.device) -> str:
    """The mode the blocks run in on ``device`` (what was asked, downgraded to what is available)."""
    asked = requested_mode(setting)
    key = f"{asked}:{device.type}"
    if asked == "eager":
        log_once(key, logging.INFO, "FLUX.2 fast path off: eager blocks (asked for)")
        return "eager"
    can_compile, why_not_compile = compile_available(device)
    if asked == "compile" or (asked == "auto" and device.type == "cuda" and can_compile):
        if can_compile:
            log_once(
                key,
                logging.INFO,
                "FLUX.2 fast path on %s: torch.compile per block stage (%s); first steps at a new size "
                "include compile time; set %s=0 to turn it off",
                device.type,
                why_not_compile,
                ENV_FAST,
            )
            return "compile"
        log_once(key, logging.WARNING, "FLUX.2 fast path: cannot compile (%s); eager blocks", why_not_compile)
        return "eager"
    can_kitchen, why_not_kitchen = kitchen_available(device)
    if asked == "kitchen":
        if can_kitchen or importlib.util.find_spec("comfy_kitchen") is not None:
            # Forced (e.g. tests on the CPU): comfy-kitchen then uses whatever backend it has.
            log_once(key, logging.INFO, "FLUX.2 fast path: comfy-kitchen fused kernels (%s)", why_not_kitchen)
            return "kitchen"
        log_once(key, logging.WARNING, "FLUX.2 fast path: %s; eager blocks", why_not_kitchen)
        return "eager"
    if device.type == "cuda" and can_kitchen:
        log_once(
            key,
            logging.INFO,
            "FLUX.2 fast path on cuda: comfy-kitchen fused kernels (torch.compile unavailable: %s)",
            why_not_compile,
        )
        return "kitchen"
    if device.type == "cuda":
        log_once(
            key,
            logging.WARNING,
            "FLUX.2 fast path off on cuda: %s and %s; eager blocks (slower: install Triton for the fused "
            "kernels)",
            why_not_compile,
            why_not_kitchen,
        )
    return "eager"
