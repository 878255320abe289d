"""Host RAM facts and the process-wide page-locked (pinned) memory limit shared by every streamer.

Page-locked memory cannot be swapped or reclaimed by the OS, so a process that locks too much of it
gets killed (Linux) or has its pins refused (Windows). Every streamer in the process draws from one
`PinnedLedger` whose default limit follows ComfyUI's pinned-memory budget: about 40% of RAM on
Windows (the OS refuses to lock much more than half), elsewhere the lesser of 90% of RAM and RAM
minus 4 GiB. Blocks past the limit are not copied into more RAM: they stream from the memory they
already live in (pageable or the page cache of a memory-mapped file) or are read from their file.

Detached streamers may keep their pinned host buffers for a quick re-attach; they register as idle
with the ledger, which takes those bytes back (oldest first) when another streamer needs them.
"""

from __future__ import annotations

import logging
import mmap
import os
import sys
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import torch

logger = logging.getLogger(__name__)

GiB = 1 << 30
# Linux transparent huge pages are 2 MiB: host buffers aligned to that fault in and pin 512x fewer pages.
HUGE_PAGE = 2 << 20


# ---------------------------------------------------------------------------------------------- RAM
def _physical_ram() -> int:
    if sys.platform == "win32":
        import ctypes

        class MemoryStatusEx(ctypes.Structure):
            _fields_ = [
                ("dwLength", ctypes.c_ulong),
                ("dwMemoryLoad", ctypes.c_ulong),
                ("ullTotalPhys", ctypes.c_ulonglong),
                ("ullAvailPhys", ctypes.c_ulonglong),
                ("ullTotalPageFile", ctypes.c_ulonglong),
                ("ullAvailPageFile", ctypes.c_ulonglong),
                ("ullTotalVirtual", ctypes.c_ulonglong),
                ("ullAvailVirtual", ctypes.c_ulonglong),
                ("ullAvailExtendedVirtual", ctypes.c_ulonglong),
            ]

        status = MemoryStatusEx()
        status.dwLength = ctypes.sizeof(MemoryStatusEx)
        ctypes.windll.kernel32.GlobalMemoryStatusEx(ctypes.byref(status))
        return int(status.ullTotalPhys)
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _read_limit(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if not text or text == "max":
        return None
    value = int(text)
    return value if value < 1 << 60 else None  # cgroup v1 writes a huge number for "no limit"


def cgroup_memory_limit(root: Path = Path("/sys/fs/cgroup"), self_cgroup: Path = Path("/proc/self/cgroup")):
    """The memory limit of the cgroup this process runs in (containers, systemd slices), or None.

    cgroup v2: the smallest ``memory.max`` on the path from the process's group up to the root;
    cgroup v1: ``memory/memory.limit_in_bytes``.
    """
    limits: list[int] = []
    try:
        lines = self_cgroup.read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) == 3 and parts[0] == "0" and parts[1] == "":  # the v2 unified hierarchy
            group = root / parts[2].lstrip("/")
            while True:
                value = _read_limit(group / "memory.max")
                if value is not None:
                    limits.append(value)
                if group == root or root not in group.parents:
                    break
                group = group.parent
    v1 = _read_limit(root / "memory" / "memory.limit_in_bytes")
    if v1 is not None:
        limits.append(v1)
    return min(limits) if limits else None


def host_ram_bytes() -> int:
    """RAM this process may use: physical RAM, lowered to its cgroup's memory limit if it has one."""
    ram = _physical_ram()
    if sys.platform.startswith("linux"):
        limit = cgroup_memory_limit()
        if limit is not None:
            ram = min(ram, limit)
    return ram


def default_pinned_limit(ram: int | None = None, platform: str | None = None) -> int:
    """ComfyUI-like default for the page-locked bytes of the whole process.

    Args:
        ram: host RAM in bytes; None reads it (`host_ram_bytes`).
        platform: ``sys.platform`` value; None is this machine's.

    Returns:
        40% of RAM on Windows; elsewhere the lesser of 90% of RAM and RAM - 4 GiB (never below 0).
    """
    ram = host_ram_bytes() if ram is None else ram
    platform = sys.platform if platform is None else platform
    if platform == "win32":
        return int(ram * 0.40)
    return max(0, min(int(ram * 0.90), ram - 4 * GiB))


# ---------------------------------------------------------------------------------- page locking
def register(t: torch.Tensor) -> None:
    """Page-lock an existing host allocation (cudaHostRegister) so copies from it are DMA transfers.

    Registering our own allocation, rather than allocating through torch's pinned allocator, keeps the
    pinned bytes equal to the bytes asked for (torch's caching host allocator rounds up to a power of
    two, up to 2x). Registering before the buffer is written lets the driver fault the pages in
    itself, much faster than first-touch faults from the copy.
    """
    err = torch.cuda.cudart().cudaHostRegister(t.data_ptr(), t.numel() * t.element_size(), 0)
    if int(err) != 0:
        raise RuntimeError(f"cudaHostRegister failed with CUDA error {int(err)}")


def unregister(t: torch.Tensor) -> None:
    torch.cuda.cudart().cudaHostUnregister(t.data_ptr())


def alloc_host(nbytes: int) -> torch.Tensor:
    """A (nbytes,) uint8 CPU tensor for one block, backed by transparent huge pages where possible.

    On Linux a buffer of at least 2 MiB is an anonymous mapping aligned to 2 MiB and advised
    MADV_HUGEPAGE, so faulting it in and page-locking it touch 512x fewer pages (a no-op where huge
    pages are off). The mapping lives as long as the tensor (and its views).
    """
    if nbytes < HUGE_PAGE or not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.empty(nbytes, dtype=torch.uint8)
    region = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    whole = torch.frombuffer(region, dtype=torch.uint8)
    start = (-whole.data_ptr()) % HUGE_PAGE
    try:
        region.madvise(mmap.MADV_HUGEPAGE, start, nbytes - nbytes % HUGE_PAGE)
    except OSError:  # kernels without THP: ordinary pages
        pass
    return whole[start : start + nbytes]


# --------------------------------------------------------------------------- mapped-file pages
# Linux 5.4+ madvise advice: reclaim these pages now. Clean pages of a file mapping are dropped from
# the process (read from the file again if touched); nothing is ever lost (Python's mmap lacks it).
MADV_PAGEOUT = 21
_PAGE = mmap.PAGESIZE
_MIN_PAGE_OUT = 1 << 20  # smaller tensors are not worth a system call


def mapped_file_ranges() -> list[tuple[int, int]]:
    """(start, end) addresses of this process's mappings of regular files, sorted; [] off Linux.

    Read once per attach: a weight still viewing one of them after its bytes were copied into a
    page-locked buffer gives its pages back (`page_out_file_views`).
    """
    if not sys.platform.startswith("linux"):
        return []
    ranges = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split(maxsplit=5)
                if len(parts) < 6 or parts[4] == "0":
                    continue
                path = parts[5].strip()
                if not path.startswith("/") or path.startswith("/dev/") or path.endswith("(deleted)"):
                    continue
                lo, hi = parts[0].split("-")
                ranges.append((int(lo, 16), int(hi, 16)))
    except OSError:
        return []
    ranges.sort()
    return ranges


def _libc_madvise():
    import ctypes

    fn = ctypes.CDLL(None, use_errno=True).madvise
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return fn


_MADVISE: list = []


def page_out_file_views(tensors: list[torch.Tensor], ranges: list[tuple[int, int]]) -> int:
    """Give back the pages of ``tensors`` that lie in a mapped file (after their bytes were copied
    elsewhere), so the process does not count the weights twice (page-locked copy + file pages).

    Adjacent tensors (a block's, stored back to back) are merged and advised together: the kernel
    keeps file pages in large folios (up to 2 MiB) that it only reclaims when a whole folio is
    advised, so only the folios at the ends of a range may stay. Only whole pages inside one of
    ``ranges`` (`mapped_file_ranges`) are advised, never page-locked or anonymous memory. A hint:
    other views of the same pages read them from the file again.

    Returns:
        Bytes advised.
    """
    if not ranges:
        return 0
    spans = sorted(
        (t.data_ptr(), t.data_ptr() + t.numel() * t.element_size())
        for t in tensors
        if t.device.type == "cpu" and t.numel()
    )
    merged: list[list[int]] = []
    for lo, hi in spans:
        if merged and lo <= merged[-1][1] + _PAGE:  # back to back (alignment padding between them)
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    advised = 0
    for start, end in merged:
        # Clipped to the file mapping it lies in; whole pages only.
        inside = [(max(start, a), min(end, b)) for a, b in ranges if a < end and start < b]
        for a, b in inside:
            lo, hi = (a + _PAGE - 1) // _PAGE * _PAGE, b // _PAGE * _PAGE
            if hi - lo < _MIN_PAGE_OUT:
                continue
            if not _MADVISE:
                _MADVISE.append(_libc_madvise())
            if _MADVISE[0](lo, hi - lo, MADV_PAGEOUT) == 0:
                advised += hi - lo
    return advised


# ------------------------------------------------------------------------------------ the ledger
class Reclaimable(Protocol):
    """A detached streamer holding pinned buffers it can give back."""

    def reclaim_pinned(self) -> int:
        """Unpin idle host buffers; returns the bytes released."""


class PinnedLedger:
    """Page-locked bytes of the whole process against one limit (thread-safe).

    `try_reserve` never lets `used + external() + n` pass the limit; when it would, idle streamers
    (detached ones keeping pinned buffers) are asked to give theirs back, oldest first.
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._limit: int | None = None  # None: default_pinned_limit() on first use
        self._external: Callable[[], int] | None = None
        self.used = 0
        self._idle: OrderedDict[int, weakref.ref] = OrderedDict()

    def limit(self) -> int:
        with self._lock:
            if self._limit is None:
                self._limit = default_pinned_limit()
                logger.info("pinned-memory limit for weight streaming: %.1f GiB", self._limit / GiB)
            return self._limit

    def set_limit(self, nbytes: int | None) -> None:
        if nbytes is not None and nbytes < 0:
            raise ValueError(f"pinned-memory limit {nbytes} is not valid: give bytes >= 0 or None.")
        with self._lock:
            self._limit = nbytes

    def set_external(self, fn: Callable[[], int] | None) -> None:
        with self._lock:
            self._external = fn

    def external(self) -> int:
        fn = self._external
        if fn is None:
            return 0
        try:
            return max(0, int(fn()))
        except Exception:  # a broken callback must never stop streaming
            logger.debug("external pinned-memory callback failed", exc_info=True)
            return 0

    def headroom(self) -> int:
        """Bytes that may still be page-locked now (idle buffers not counted as free)."""
        with self._lock:
            return max(0, self.limit() - self.used - self.external())

    def try_reserve(self, nbytes: int, exclude: object = None, keep_free: int = 0) -> bool:
        """Reserve `nbytes` of page-locked memory; False if the limit does not allow it.

        Args:
            nbytes: bytes to reserve.
            exclude: a streamer whose idle buffers must not be taken back (the one asking).
            keep_free: bytes that must stay available after this reservation (e.g. for the
                streamed blocks of the same attach, which need page-locked memory more).
        """
        while True:
            with self._lock:
                if self.used + self.external() + nbytes + keep_free <= self.limit():
                    self.used += nbytes
                    return True
                victims = [r() for r in self._idle.values()]
                victims = [v for v in victims if v is not None and v is not exclude]
            if not victims:
                return False
            victim = victims[0]
            freed = victim.reclaim_pinned()
            self.forget_idle(victim)
            if freed:
                logger.info(
                    "took back %.2f GiB of kept pinned memory from a detached model for another one",
                    freed / GiB,
                )

    def release(self, nbytes: int) -> None:
        with self._lock:
            self.used = max(0, self.used - nbytes)

    def add_idle(self, holder: Reclaimable) -> None:
        with self._lock:
            self._idle.pop(id(holder), None)
            self._idle[id(holder)] = weakref.ref(holder)

    def forget_idle(self, holder: object) -> None:
        with self._lock:
            self._idle.pop(id(holder), None)

    def release_idle(self) -> int:
        """Ask every idle holder to give its kept buffers back now; returns the bytes released."""
        with self._lock:
            holders = [r() for r in self._idle.values()]
        freed = 0
        for h in holders:
            if h is not None:
                freed += h.reclaim_pinned()
                self.forget_idle(h)
        return freed


LEDGER = PinnedLedger()


def set_pinned_limit(nbytes: int | None) -> None:
    """Set the process-wide limit on page-locked bytes (0 turns pinning off; None is the default).

    (ComfyUI's ``--disable-pinned-memory`` is ``StreamingConfig(pin_memory=False)`` per model instead:
    a limit of 0 would also stop blocks read from a weight source from getting ordinary host copies.)
    """
    LEDGER.set_limit(nbytes)


def set_external_pinned(fn: Callable[[], int] | None) -> None:
    """Count bytes page-locked outside weight_streaming (e.g. by the host application) in the limit."""
    LEDGER.set_external(fn)


def release_kept_pinned() -> int:
    """Unpin the buffers every detached streamer of the process kept for a quick re-attach.

    For the host application's "free memory" actions; returns the bytes released.
    """
    return LEDGER.release_idle()


def pinned_limit() -> int:
    """The process-wide limit on page-locked bytes now in force."""
    return LEDGER.limit()


def pinned_in_use() -> int:
    """Bytes page-locked by all streamers of this process (kept buffers of detached ones included)."""
    return LEDGER.used
