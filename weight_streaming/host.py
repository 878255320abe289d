"""Host-side storage of streamed blocks: one contiguous (pinned where possible) buffer per block."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

logger = logging.getLogger(__name__)

# Each parameter starts on a 256-byte boundary inside its block's buffer: what cudaMalloc guarantees,
# so views into a ring slot are as aligned for the kernels as ordinary device tensors.
ALIGN = 256


class WeightSource(Protocol):
    """Where weights can be read from straight into a preallocated tensor (e.g. a safetensors file)."""

    def read_into(self, name: str, out: torch.Tensor) -> None:
        """Fill `out` (stored dtype and shape) with the tensor stored under `name`."""


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


@dataclass
class ParamSlot:
    """One parameter's place inside its block's byte buffer."""

    name: str  # full name in the model, e.g. "double_blocks.3.img_attn.qkv.weight"
    param: nn.Parameter
    offset: int
    nbytes: int
    shape: torch.Size
    dtype: torch.dtype


@dataclass
class BlockLayout:
    """The parameters of one block laid out back to back (aligned) in a single byte range."""

    prefix: str
    module: nn.Module
    params: list[ParamSlot] = field(default_factory=list)
    nbytes: int = 0

    @classmethod
    def of(cls, module: nn.Module, prefix: str) -> BlockLayout:
        layout = cls(prefix, module)
        seen: set[int] = set()
        offset = 0
        # remove_duplicate keeps tied parameters once: they share one place in the buffer.
        for local, p in module.named_parameters(remove_duplicate=True):
            if id(p) in seen:
                continue
            seen.add(id(p))
            nbytes = p.numel() * p.element_size()
            layout.params.append(ParamSlot(f"{prefix}.{local}", p, offset, nbytes, p.shape, p.dtype))
            offset = _align(offset + nbytes)
        layout.nbytes = offset
        return layout

    def views(self, buf: torch.Tensor) -> list[torch.Tensor]:
        """Typed views of each parameter inside a uint8 buffer laid out like this block."""
        return [buf[s.offset : s.offset + s.nbytes].view(s.dtype).view(s.shape) for s in self.params]


def _register(t: torch.Tensor) -> None:
    """Page-lock an existing host allocation (cudaHostRegister) so copies from it are DMA transfers.

    Registering our own allocation, rather than allocating through torch's pinned allocator, keeps the
    pinned bytes equal to the bytes asked for (torch's caching host allocator rounds up to a power of
    two, up to 2x).
    """
    err = torch.cuda.cudart().cudaHostRegister(t.data_ptr(), t.numel(), 0)
    if int(err) != 0:
        raise RuntimeError(f"cudaHostRegister failed with CUDA error {int(err)}")


def _unregister(t: torch.Tensor) -> None:
    torch.cuda.cudart().cudaHostUnregister(t.data_ptr())


class HostBuffer:
    """A block's host bytes; page-locked if `pinned`. Unpins itself before the memory is freed."""

    def __init__(self, data: torch.Tensor, pinned: bool) -> None:
        self.data = data
        self.pinned = pinned

    def unpin(self) -> None:
        """Release the page lock; the bytes stay where they are as ordinary memory."""
        if self.pinned:
            self.pinned = False
            _unregister(self.data)

    def __del__(self) -> None:
        try:
            self.unpin()
        except Exception:  # noqa: S110 - interpreter shutdown: CUDA may already be gone
            pass


class HostAllocator:
    """Hands out block buffers, pinned while the cap allows and pinning works, else pageable.

    Thread-safe: attach fills blocks from several threads (page-locking runs in the driver without the
    GIL, so registering blocks in parallel shortens attach several times).
    """

    def __init__(self, pin: bool, cap: int | None) -> None:
        self.pin = pin
        self.cap = cap
        self.pinned_bytes = 0
        self.pageable_bytes = 0
        self._failed = False
        self._warned_cap = False
        self._lock = threading.Lock()

    def _reserve_pin(self, nbytes: int) -> bool:
        with self._lock:
            if not self.pin or self._failed:
                return False
            if self.cap is not None and self.pinned_bytes + nbytes > self.cap:
                if not self._warned_cap:
                    self._warned_cap = True
                    logger.warning(
                        "pinned-memory cap of %.2f GiB reached: further streamed blocks stay in pageable "
                        "RAM and copy several times slower. Raise the cap (pinned_cap) if RAM allows.",
                        self.cap / 2**30,
                    )
                return False
            self.pinned_bytes += nbytes
            return True

    def allocate(self, nbytes: int) -> HostBuffer:
        data = torch.empty(nbytes, dtype=torch.uint8)
        if self._reserve_pin(nbytes):
            try:
                # Registering before the buffer is written lets the driver fault the pages in itself,
                # which is much faster than first-touch page faults from the copy.
                _register(data)
            except RuntimeError as exc:
                with self._lock:
                    self.pinned_bytes -= nbytes
                    first, self._failed = not self._failed, True
                if first:  # after one failure stop trying: the OS refused page-locked memory
                    logger.warning(
                        "could not pin host memory (%s): streamed blocks fall back to pageable RAM and "
                        "copy several times slower. Free RAM or lower pinned_cap.",
                        exc,
                    )
            else:
                return HostBuffer(data, True)
        with self._lock:
            self.pageable_bytes += nbytes
        return HostBuffer(data, False)

    def release(self, buf: HostBuffer) -> None:
        if buf.pinned:
            self.pinned_bytes -= buf.data.numel()
            buf.unpin()
        else:
            self.pageable_bytes -= buf.data.numel()


def set_param_data(p: nn.Parameter, data: torch.Tensor) -> None:
    """Point a parameter at new data; a meta parameter is swapped in place (.data cannot leave meta)."""
    if p.device.type == "meta" and data.device.type != "meta":
        torch.utils.swap_tensors(p, nn.Parameter(data, requires_grad=p.requires_grad))
    else:
        p.data = data


def fill_block(layout: BlockLayout, buf: HostBuffer, source: WeightSource | None) -> list[torch.Tensor]:
    """Copy a block's weights into its host buffer and point its parameters at the views.

    With no source, each parameter's current (CPU) data is copied in and then dropped, so a block's
    weights are held twice only while that block is being filled. With a source, the bytes are read
    straight into the buffer (the parameters may be on the meta device).

    Returns:
        The views, in `layout.params` order (the parameters now point at them).
    """
    views = layout.views(buf.data)
    for slot, view in zip(layout.params, views):
        p = slot.param
        if source is not None:
            source.read_into(slot.name, view)
        elif p.device.type == "meta":
            raise ValueError(
                f"parameter {slot.name} is on the meta device and no weight source was given: "
                "pass source= (an object with read_into(name, out)) or load the weights first."
            )
        else:
            view.copy_(p.data)
        set_param_data(p, view)
    return views
