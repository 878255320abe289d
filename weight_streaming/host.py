"""Host-side storage of streamed blocks, in three kinds (what `Telemetry` reports them as):

- pinned: one contiguous page-locked buffer per block (`HostBuffer`), copied to the device in one DMA
  transfer. Filled at attach from the parameters or from a weight source.
- pageable: the parameters' own CPU memory, left where it is (`InPlaceHost`): ordinary memory or the
  page cache of a memory-mapped file, copied tensor by tensor. No second copy is made, so a model
  larger than the RAM that may be locked still runs (the OS pages the mapped file in and out).
- sourced: no host copy at all (`SourcedHost`): the bytes are read from the weight source (the file)
  into a staging buffer each time the block is needed (see `staging.py`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from . import hostmem

logger = logging.getLogger(__name__)

# Each parameter starts on a 256-byte boundary inside its block's buffer: what cudaMalloc guarantees,
# so views into a ring slot are as aligned for the kernels as ordinary device tensors.
ALIGN = 256


class WeightSource(Protocol):
    """Where weights can be read from straight into a preallocated tensor (e.g. a safetensors file).

    A source whose ``read_into`` may run in several threads at once (each call opens its own file
    handle, say) sets a class attribute ``thread_safe = True``: attach then reads blocks in parallel.
    """

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
        # remove_duplicate keeps tied parameters once: they share one place in the buffer.
        named = [(f"{prefix}.{local}", p) for local, p in module.named_parameters(remove_duplicate=True)]
        return cls.of_params(module, prefix, named)

    @classmethod
    def of_params(cls, module: nn.Module, prefix: str, named: list[tuple[str, nn.Parameter]]) -> BlockLayout:
        """A layout of the given (full name, parameter) pairs, e.g. a model's non-block parameters."""
        layout = cls(prefix, module)
        seen: set[int] = set()
        offset = 0
        for name, p in named:
            if id(p) in seen:
                continue
            seen.add(id(p))
            nbytes = p.numel() * p.element_size()
            layout.params.append(ParamSlot(name, p, offset, nbytes, p.shape, p.dtype))
            offset = _align(offset + nbytes)
        layout.nbytes = offset
        return layout

    def views(self, buf: torch.Tensor) -> list[torch.Tensor]:
        """Typed views of each parameter inside a uint8 buffer laid out like this block."""
        return [buf[s.offset : s.offset + s.nbytes].view(s.dtype).view(s.shape) for s in self.params]

    @property
    def param_bytes(self) -> int:
        """Bytes of the parameters themselves (without the alignment padding)."""
        return sum(s.nbytes for s in self.params)

    def on_cpu(self) -> bool:
        """True if every parameter has real data in host memory (not meta, not on a device)."""
        return all(s.param.device.type == "cpu" for s in self.params)

    def points_into(self, buf: torch.Tensor) -> bool:
        """True if each parameter is exactly its view of `buf` (a kept buffer still matches the block)."""
        if buf.numel() != self.nbytes:
            return False
        base = buf.data_ptr()
        return all(
            s.param.device.type == "cpu"
            and s.param.dtype == s.dtype
            and s.param.shape == s.shape
            and s.param.data_ptr() == base + s.offset
            for s in self.params
        )


class BlockHost:
    """Where one streamed block's bytes live between its uses; copies them into a ring slot.

    Attributes:
        kind: "pinned", "pageable" or "sourced" (see the module docstring).
        nbytes: bytes copied to the device per use.
        views: what the block's parameters point at outside its forward (same order as the layout).
    """

    kind = ""
    nbytes = 0
    views: list[torch.Tensor]
    originals: list[torch.Tensor] | None = None

    @property
    def pinned(self) -> bool:
        return False

    def copy_to(self, buf: torch.Tensor, slot_views: list[torch.Tensor]) -> int:
        """Issue the host-to-device copy into a ring slot (on the current stream); returns bytes."""
        raise NotImplementedError

    def release(self) -> None:
        """Give back page locks or staging held for this block (the bytes the parameters need stay)."""


class HostBuffer(BlockHost):
    """A block's bytes in one contiguous host buffer; page-locked if `pinned` (counted in the ledger).

    Unpins itself before the memory is freed.
    """

    def __init__(
        self,
        data: torch.Tensor,
        pinned: bool,
        views: list[torch.Tensor] | None = None,
        originals: list[torch.Tensor] | None = None,
    ) -> None:
        self.data = data
        self._pinned = pinned
        self.views = views if views is not None else []
        self.nbytes = data.numel()
        # The (meta) tensors the parameters had before the buffer was read from a weight source: a
        # full detach points them back there, so the host copy is freed.
        self.originals = originals
        self.layout: BlockLayout | None = None  # set while kept across a detach

    @property
    def kind(self) -> str:  # type: ignore[override]
        return "pinned" if self._pinned else "pageable"

    @property
    def pinned(self) -> bool:
        return self._pinned

    def copy_to(self, buf: torch.Tensor, slot_views: list[torch.Tensor]) -> int:
        buf[: self.nbytes].copy_(self.data, non_blocking=True)
        return self.nbytes

    def pin(self) -> bool:
        """Page-lock the buffer in place again (after `unpin`), within the ledger's limit."""
        if self._pinned:
            return True
        if not hostmem.LEDGER.try_reserve(self.nbytes):
            return False
        try:
            hostmem.register(self.data)
        except RuntimeError:
            hostmem.LEDGER.release(self.nbytes)
            return False
        self._pinned = True
        return True

    def unpin(self) -> None:
        """Release the page lock; the bytes stay where they are as ordinary memory."""
        if self._pinned:
            self._pinned = False
            hostmem.LEDGER.release(self.nbytes)
            hostmem.unregister(self.data)

    def release(self) -> None:
        self.unpin()

    def __del__(self) -> None:
        try:
            self.unpin()
        except Exception:  # noqa: S110 - interpreter shutdown: CUDA may already be gone
            pass


class InPlaceHost(BlockHost):
    """A block streamed from its parameters' own CPU memory (pageable RAM or a mapped file's pages)."""

    kind = "pageable"

    def __init__(self, layout: BlockLayout) -> None:
        self.views = [s.param.data for s in layout.params]
        self.nbytes = layout.nbytes  # as the plan counts it (aligned); the copies move param_bytes
        self._copied = layout.param_bytes

    def copy_to(self, buf: torch.Tensor, slot_views: list[torch.Tensor]) -> int:
        for dst, src in zip(slot_views, self.views):
            dst.copy_(src, non_blocking=True)
        return self._copied


def set_param_data(p: nn.Parameter, data: torch.Tensor) -> None:
    """Point a parameter at new data; swapped in place where ``.data =`` cannot do it.

    ``.data`` cannot leave or enter the meta device. And a parameter made under inference mode (ComfyUI
    runs nodes, and so loaders, under it) has no version counter: after ``.data = normal_tensor`` it
    no longer reads as an inference tensor but still has none, and the next matmul on it fails with
    "Inference tensors do not track version counter". Swapping in a fresh Parameter gives it one.
    """
    swap = (p.device.type == "meta") != (data.device.type == "meta") or (
        p.is_inference() and not data.is_inference()
    )
    if swap:
        torch.utils.swap_tensors(p, nn.Parameter(data, requires_grad=p.requires_grad))
    else:
        p.data = data


def fill_block(layout: BlockLayout, buf: torch.Tensor, source: WeightSource | None) -> list[torch.Tensor]:
    """Copy a block's weights into its host buffer and point its parameters at the views.

    With no source, each parameter's current (CPU) data is copied in and then dropped, so a block's
    weights are held twice only while that block is being filled. With a source, the bytes are read
    straight into the buffer (the parameters may be on the meta device).

    Returns:
        The views, in `layout.params` order (the parameters now point at them).
    """
    views = layout.views(buf)
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
    for slot, view in zip(layout.params, views):
        set_param_data(slot.param, view)
    return views
