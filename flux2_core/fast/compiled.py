"""Regional torch.compile: the blocks' eager stage functions compiled once per model width.

Only the stages are compiled, never a block's ``forward`` or the model: the weight streamer's hooks
and forward wrappers stay plain Python, the attention call between the stages stays swappable, and
all blocks of a kind share one compiled graph (their weights are graph inputs, so a streamed block
whose parameters point into a ring slot runs the same kernels).

Each model width gets its own copy of the stage functions' code: torch.compile caches per code
object, and a shared cache would see the hidden size change between models and recompile the
stages with a symbolic hidden size. Within a width, sequence lengths are left to torch.compile's
automatic dynamic shapes (the first size is compiled static, a second one compiles a kernel for any
length).
"""

from __future__ import annotations

import logging
import threading
import time
import types
from collections.abc import Callable

import torch

from ..model.blocks import EAGER_STAGES, BlockStages
from .settings import compile_mode, log_once

logger = logging.getLogger(__name__)

_cache: dict[tuple, BlockStages] = {}
_lock = threading.Lock()


def _unique_graphs() -> int:
    """Graphs dynamo has compiled in this process (-1 if the counter is not available)."""
    try:
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])
    except Exception:  # noqa: BLE001 - an internal counter; only the compile-time report needs it
        return -1


def _fresh_copy(fn: Callable, tag: str) -> Callable:
    """The same function with its own code object (so with its own torch.compile cache)."""
    code = fn.__code__.replace(co_name=f"{fn.__name__}_{tag}")
    new = types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)
    new.__kwdefaults__ = fn.__kwdefaults__
    new.__qualname__ = f"{fn.__qualname__}_{tag}"
    return new


class CompileStats:
    """Compile (first-call) cost of the compiled stages, summed over the process."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.graphs = 0
        self.failures: list[str] = []

    def as_dict(self) -> dict:
        return {
            "compile_seconds": round(self.seconds, 3),
            "graphs": self.graphs,
            "failures": list(self.failures),
        }


STATS = CompileStats()


class CompiledStage:
    """One compiled stage; on a compiler error it logs once and runs the eager stage from then on.

    Out-of-memory errors propagate (the streamer retries with a lower budget), as does anything the
    eager stage itself would raise.
    """

    def __init__(self, eager: Callable, compiled: Callable, name: str) -> None:
        self.eager, self.compiled, self.name = eager, compiled, name
        self.failed: str | None = None

    def __call__(self, *args):
        if self.failed is not None:
            return self.eager(*args)
        before = _unique_graphs()
        t0 = time.perf_counter()
        try:
            out = self.compiled(*args)
        except torch.OutOfMemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - any compiler failure: fall back, keep serving
            self.failed = f"{type(exc).__name__}: {str(exc)[:300]}"
            STATS.failures.append(f"{self.name}: {self.failed}")
            log_once(
                f"compile-failed:{self.name}",
                logging.WARNING,
                "FLUX.2 fast path: compiling %s failed (%s); this stage runs eager from now on",
                self.name,
                self.failed,
            )
            return self.eager(*args)
        after = _unique_graphs()
        if after > before >= 0:
            dt = time.perf_counter() - t0
            STATS.seconds += dt
            STATS.graphs += after - before
            logger.info("FLUX.2 fast path: compiled %s in %.1f s", self.name, dt)
        return out


def compiled_stages(width_key: tuple) -> BlockStages:
    """Compiled versions of the four block stages for one model width (cached per process).

    Args:
        width_key: what fixes the stage shapes apart from the sequence length, e.g. (hidden size,
            heads, MLP width).
    """
    with _lock:
        if width_key in _cache:
            return _cache[width_key]
        tag = "_".join(str(k) for k in width_key)
        mode = compile_mode()
        stages = {}
        for name in ("double_pre", "double_post", "single_pre", "single_post"):
            eager = getattr(EAGER_STAGES, name)
            compiled = torch.compile(_fresh_copy(eager, tag), mode=mode, dynamic=None)
            stages[name] = CompiledStage(eager, compiled, f"{name}[{tag}]")
        _cache[width_key] = out = BlockStages(**stages)
        return out


def reset_compiled() -> None:
    """Forget the compiled stages (tests; torch.compile's own caches stay)."""
    with _lock:
        _cache.clear()
