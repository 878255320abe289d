"""Cooperation with ComfyUI's memory manager.

Our models are plain ``nn.Module``s (optionally paged by ``weight_streaming``), not ComfyUI
ModelPatchers, so ComfyUI does not know about their VRAM by itself. This module closes the gap:

- before taking VRAM we call ``comfy.model_management.free_memory`` so that ComfyUI unloads its
  own models first, asking for what we need plus ``minimum_inference_memory()`` (which includes
  ``--reserve-vram``);
- ``free_memory`` is wrapped once so that when ComfyUI needs memory our idle GPU weights are given
  back too. ``unload_all_models`` (the "Free model and node cache" button, ``POST /free``, OOM
  recovery) is ``free_memory(1e30, device)``, so it reaches our models through the same hook, which
  then also empties the caches registered with ``on_unload_all`` (prompt embeddings, tokenizers);
- outputs go to ``intermediate_device()``;
- under DynamicVRAM (per-node CUDA memory pools, ``--fast dynamic_vram``; off by default in the
  pinned ComfyUI) weights never stay on the GPU between nodes: each node places them again from
  their kept page-locked host copies (nothing is copied back when they leave);
- page-locked host memory: ComfyUI's own pinned bytes count against weight_streaming's process-wide
  limit, ``--disable-pinned-memory`` turns pinning off for our streamed models too, and "unload
  all" also gives back the pinned buffers detached models kept for a quick re-attach.
"""

from __future__ import annotations

import functools
import logging
import sys
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import comfy.model_management as mm
import torch

log = logging.getLogger(__name__)

_HOLDERS: weakref.WeakSet[GpuHolder] = weakref.WeakSet()
_ON_UNLOAD_ALL: list[Callable[[], object]] = []
# comfy.model_management.unload_all_models() asks free_memory for 1e30 bytes: "everything".
_UNLOAD_ALL_BYTES = 1e30


def on_unload_all(callback: Callable[[], object]) -> None:
    """Registers ``callback`` to run whenever ComfyUI unloads all models (registered once).

    Callbacks run after our idle holders were offloaded, so they see what that offloading kept.
    """
    if callback not in _ON_UNLOAD_ALL:
        _ON_UNLOAD_ALL.append(callback)


@dataclass
class CpuStandIn:
    """Tests only (the suite has no GPU): the CPU plays a compute device of ``vram`` bytes.

    Holders then place, stream, offload and re-attach on the CPU through the same code as on a GPU:
    the free "VRAM" is ``vram`` minus what placed holders hold, ComfyUI's free-memory requests reach
    them through the same hook, and streamed blocks are page-locked (``pin``: the test simulates
    page-locking, which needs CUDA).

    Attributes:
        vram: bytes of the pretend device.
        pin: pin streamed blocks (pin_memory=True) unless ``--disable-pinned-memory`` is set.
    """

    vram: int
    pin: bool = True


# Set by the tests' bridge pack inside a test server; None everywhere else.
CPU_STAND_IN: CpuStandIn | None = None


def is_compute_device(device: torch.device) -> bool:
    """True for a device weights are placed on for a run (a GPU; the CPU only as the tests' stand-in)."""
    return torch.device(device).type != "cpu" or CPU_STAND_IN is not None


class GpuHolder:
    """Base for our objects whose weights may sit on the GPU between runs.

    Subclasses implement ``_to_device`` and ``_offload`` and report ``gpu_bytes``.
    """

    def __init__(self) -> None:
        self.device: torch.device = torch.device("cpu")
        self.in_use = False
        self.on_stand_in = False  # placed on the CPU playing a GPU (CpuStandIn, tests only)
        _HOLDERS.add(self)

    @property
    def on_gpu(self) -> bool:
        return self.device.type != "cpu" or self.on_stand_in

    def gpu_bytes(self) -> int:
        return 0

    def offload(self) -> None:
        """Gives the VRAM back (weights return to the offload device)."""
        if self.on_gpu:
            log.info("Flux2Local: offloading %s from %s", type(self).__name__, self.device)
            self._offload()
            self.device = torch.device("cpu")
            self.on_stand_in = False

    def _offload(self) -> None:
        raise NotImplementedError

    @contextmanager
    def using(self, device: torch.device) -> Iterator[None]:
        """Marks the holder busy (never evicted by our hook) and cleans up VRAM if the run fails.

        On an error or a cancel the weights go back to the offload device: a half-finished run
        must not leave VRAM that nothing will free.
        """
        self.in_use = True
        try:
            yield
        except BaseException:
            self.offload()
            mm.soft_empty_cache()
            raise
        finally:
            self.in_use = False
        if per_node_memory_pools():
            self.offload()


def per_node_memory_pools() -> bool:
    """True under ComfyUI's DynamicVRAM (``--fast dynamic_vram``, comfy-aimdo allocator).

    There each node's CUDA allocations live in that node's own memory pool, so weights we placed on
    the GPU must not outlive the node that placed them: holders offload at the end of every use.
    """
    pools = sys.modules.get("comfy.memory_management")
    return getattr(pools, "aimdo_allocator", None) is not None


def compute_device() -> torch.device:
    return mm.get_torch_device()


def output_device() -> torch.device:
    return mm.intermediate_device()


def offload_device() -> torch.device:
    return mm.unet_offload_device()


def inference_reserve(device: torch.device) -> float:
    """What ComfyUI keeps free beside weights (``minimum_inference_memory()``, ``--reserve-vram``
    included); nothing on the tests' stand-in."""
    if torch.device(device).type == "cpu":
        return 0
    return mm.minimum_inference_memory()


def free_vram(device: torch.device) -> int:
    """Free memory on ``device`` now (on the tests' stand-in: its size minus what holders placed)."""
    if torch.device(device).type == "cpu":
        if CPU_STAND_IN is None:
            return 0
        used = sum(h.gpu_bytes() for h in list(_HOLDERS) if h.on_stand_in)
        return max(0, CPU_STAND_IN.vram - used)
    return int(mm.get_free_memory(device))


def make_room(nbytes: int, device: torch.device) -> None:
    """Asks ComfyUI (and our own idle holders) to free ``nbytes`` plus the inference reserve."""
    if not is_compute_device(device):
        return
    mm.free_memory(nbytes + inference_reserve(device), device)


def vram_budget(device: torch.device) -> int:
    """Bytes of weights we may keep on ``device`` now: free VRAM minus ComfyUI's inference reserve.

    ``minimum_inference_memory()`` already includes ``--reserve-vram``.
    """
    if not is_compute_device(device):
        return 0
    return max(0, free_vram(device) - int(inference_reserve(device)))


def pin_memory_setting(device: torch.device) -> bool | None:
    """``StreamingConfig.pin_memory`` for a model streamed to ``device``: False under ComfyUI's
    ``--disable-pinned-memory``; True on the tests' stand-in; else None (pin on CUDA)."""
    from comfy.cli_args import args

    if getattr(args, "disable_pinned_memory", False):
        return False
    if torch.device(device).type == "cpu" and CPU_STAND_IN is not None:
        return CPU_STAND_IN.pin
    return None


def comfy_pinned_bytes() -> int:
    """Bytes ComfyUI itself has page-locked (its model offloading); 0 on versions without the counter."""
    return int(getattr(mm, "TOTAL_PINNED_MEMORY", 0) or 0)


def release_kept_pinned() -> int:
    """Gives back the pinned buffers detached streamed models kept for a quick re-attach."""
    from ..weight_streaming import release_kept_pinned as release

    freed = release()
    if freed:
        log.info("Flux2Local: released %.2f GiB of kept pinned memory", freed / 1024**3)
    return freed


def configure_host_memory() -> None:
    """At start-up: ComfyUI's own pinned bytes count against the process-wide pinned limit of our
    weight streaming (both lock the same RAM), and "unload all" releases kept pinned buffers."""
    from ..weight_streaming import set_external_pinned

    set_external_pinned(comfy_pinned_bytes)
    on_unload_all(release_kept_pinned)


def same_device(a: torch.device, b: torch.device) -> bool:
    """``cuda`` and ``cuda:0`` are the same card when 0 is current (``torch.device`` equality says no)."""
    a, b = torch.device(a), torch.device(b)
    if a.type != b.type:
        return False
    if a.index == b.index or a.type == "cpu":
        return True
    current = torch.cuda.current_device() if a.type == "cuda" and torch.cuda.is_available() else 0
    return (current if a.index is None else a.index) == (current if b.index is None else b.index)


def release_idle(device: torch.device | None = None) -> int:
    """Offloads every idle holder (on ``device`` if given); returns how many were offloaded."""
    n = 0
    for holder in list(_HOLDERS):
        if holder.on_gpu and not holder.in_use and (device is None or same_device(holder.device, device)):
            holder.offload()
            n += 1
    return n


def install_hooks() -> None:
    """Wraps ``comfy.model_management.free_memory`` once so ComfyUI's unloads reach our models."""
    original = mm.free_memory
    if getattr(original, "_flux2local_hook", False):
        return

    @functools.wraps(original)
    def free_memory(memory_required, device, *args, **kwargs):
        result = original(memory_required, device, *args, **kwargs)
        unload_all = memory_required >= _UNLOAD_ALL_BYTES
        try:
            if hasattr(device, "type") and is_compute_device(device):
                if unload_all or free_vram(device) < memory_required:
                    # "Unload all" means every device's idle weights, as ComfyUI's own models.
                    if release_idle(None if unload_all else device):
                        mm.soft_empty_cache()
        except Exception:  # never break ComfyUI's own memory management because of ours
            log.exception("Flux2Local: could not release idle FLUX.2 weights")
        if unload_all:
            for callback in _ON_UNLOAD_ALL:
                try:
                    callback()
                except Exception:  # never break ComfyUI's own memory management because of ours
                    log.exception("Flux2Local: could not clear a cache")
        return result

    free_memory._flux2local_hook = True
    mm.free_memory = free_memory
