"""CUDA graphs for the whole transformer forward at small shapes (fewer launches, no Python per step).

A graph replays fixed kernels on fixed memory, so it is only used when nothing can change behind its
back: the model is resident on one CUDA device (no streamed block, whose weights move between ring
slots), no module has hooks or a patched forward (e.g. a weight streamer or a LoRA), every module is
of a known class, autograd is off, and no KV cache or references are passed. A graph is keyed by the
input shapes and dtypes and by the address of every parameter and buffer: weights that move (offload,
reload) make a new graph. Weights changed in place are read by the replay, as by an eager run.

Per key: the first call runs normally (it compiles, if the fast path compiles), the second warms up
on a side stream, captures and replays, later calls copy the inputs into the captured buffers and
replay. At most ``MAX_GRAPHS`` graphs are kept per model (the oldest is dropped); each holds its
activation memory for as long as it lives.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import nn

from .settings import log_once

logger = logging.getLogger(__name__)

MAX_GRAPHS = 2
_PKG = __name__.rsplit(".fast.", 1)[0]  # "flux2_core", or its name inside a ComfyUI custom node
_KNOWN_PREFIXES = ("torch.nn.", f"{_PKG}.model.", f"{_PKG}.quant.")


def _global_hooks() -> bool:
    from torch.nn.modules import module as m

    return bool(getattr(m, "_global_forward_hooks", None) or getattr(m, "_global_forward_pre_hooks", None))


def structural_reason(model: nn.Module) -> str | None:
    """What in the model's make-up rules out capturing (hooks, patched forwards, unknown modules)."""
    if _global_hooks():
        return "global module hooks are registered"
    for name, mod in model.named_modules():
        if mod is not model and (mod._forward_hooks or mod._forward_pre_hooks):
            return f"{name} has hooks"
        if "forward" in mod.__dict__:
            return f"{name or 'the model'} has a patched forward (e.g. weight streaming)"
        cls = type(mod)
        if mod is not model and not f"{cls.__module__}.".startswith(_KNOWN_PREFIXES):
            return f"{name} is a {cls.__module__}.{cls.__name__}"
    return None


def ineligible_reason(model: nn.Module, device: torch.device) -> str | None:
    """Why the model's forward cannot be captured now (None: it can)."""
    if device.type != "cuda":
        return "not on CUDA"
    if torch.is_grad_enabled():
        return "autograd is on"
    if torch.cuda.is_current_stream_capturing():
        return "already capturing"
    why = structural_reason(model)
    if why is not None:
        return why
    for t in (*model.parameters(), *model.buffers()):
        if t.device != device:
            return "weights are not all on the device"
    return None


def _weights_signature(model: nn.Module) -> tuple:
    return tuple(t.data_ptr() for t in (*model.parameters(), *model.buffers()))


def _input_key(inputs: dict[str, torch.Tensor | None]) -> tuple:
    return tuple(
        (k, None if v is None else (tuple(v.shape), v.stride(), v.dtype, v.device))
        for k, v in sorted(inputs.items())
    )


class _Captured:
    def __init__(self, graph: torch.cuda.CUDAGraph, inputs: dict, output: torch.Tensor) -> None:
        self.graph, self.inputs, self.output = graph, inputs, output


class GraphRunner:
    """Captures and replays one model's forward per input signature."""

    def __init__(self) -> None:
        self._graphs: OrderedDict[tuple, _Captured] = OrderedDict()
        self._seen: set[tuple] = set()
        self.captures = 0
        self.replays = 0
        self.failed: str | None = None

    def release(self) -> None:
        """Drop every graph (and the activation memory it holds)."""
        self._graphs.clear()
        self._seen.clear()

    def __call__(self, fn: Callable[..., torch.Tensor], model: nn.Module, inputs: dict) -> torch.Tensor:
        """``fn(**inputs)``, captured and replayed where possible.

        Args:
            fn: the forward to capture (keyword arguments only; tensors or None).
            model: whose weights ``fn`` reads (their addresses are part of the key).
            inputs: the keyword arguments.
        """
        key = (_input_key(inputs), _weights_signature(model))
        g = self._graphs.get(key)
        if g is not None:
            for k, v in inputs.items():
                if v is not None:
                    g.inputs[k].copy_(v)
            g.graph.replay()
            self.replays += 1
            return g.output.clone()
        # Graphs of other weights (the model moved or was reloaded) can never replay again: free them.
        for old in [k for k in self._graphs if k[1] != key[1]]:
            del self._graphs[old]
        if key not in self._seen or self.failed is not None:
            # First call with this signature: an ordinary run (compiles, initialises libraries).
            self._seen.add(key)
            return fn(**inputs)
        try:
            g = self._capture(fn, inputs)
        except torch.OutOfMemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - e.g. an op that cannot be captured: stay uncaptured
            self.failed = f"{type(exc).__name__}: {str(exc)[:300]}"
            log_once(
                "graph-failed",
                logging.WARNING,
                "FLUX.2 CUDA graph capture failed (%s); not capturing",
                self.failed,
            )
            return fn(**inputs)
        self._graphs[key] = g
        while len(self._graphs) > MAX_GRAPHS:
            self._graphs.popitem(last=False)
        self.captures += 1
        g.graph.replay()
        self.replays += 1
        return g.output.clone()

    def _capture(self, fn: Callable[..., torch.Tensor], inputs: dict) -> _Captured:
        static = {k: (None if v is None else v.clone()) for k, v in inputs.items()}
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn(**static)  # warm-up on a side stream, as torch.cuda.graph asks
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fn(**static)
        logger.info(
            "FLUX.2 CUDA graph captured for %s",
            {k: tuple(v.shape) for k, v in inputs.items() if v is not None},
        )
        return _Captured(graph, static, out)
