"""Weights placed on the device whole (`StreamingConfig.pin_resident`): page-locked host copies filled
once, kept across detaches, placed with one copy per block, and a detach that copies nothing back.

The CPU plays the device: `_to_device` is replaced by a recorder that makes a real copy (as a GPU
would), so "device" tensors are distinct memory and the tests can see where each placement copied
from and where the parameters point after a detach. Page-locking is simulated (`fake_pins`).
"""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

import weight_streaming.hostmem as hostmem
import weight_streaming.streamer as streamer_mod
from weight_streaming import StreamingConfig, WeightStreamer
from weight_streaming.config import UNLIMITED


class DeviceCopies:
    """Stands in for host-to-device copies: each call copies (new memory) and records its source."""

    def __init__(self) -> None:
        self.sources: list[tuple[int, int]] = []  # (data_ptr, bytes) of each copied host tensor
        self.copies: list[torch.Tensor] = []

    def __call__(self, t: torch.Tensor, device: torch.device) -> torch.Tensor:
        self.sources.append((t.data_ptr(), t.numel() * t.element_size()))
        out = t.clone()
        self.copies.append(out)
        return out

    def holds(self, p: torch.Tensor) -> bool:
        """True if ``p`` lies inside one of the device copies."""
        ptr = p.data_ptr()
        return any(c.data_ptr() <= ptr < c.data_ptr() + c.numel() * c.element_size() for c in self.copies)

    def reset(self) -> None:
        self.sources.clear()
        self.copies.clear()


@pytest.fixture
def device_copies(monkeypatch):
    rec = DeviceCopies()
    monkeypatch.setattr(streamer_mod, "_to_device", rec)
    return rec


@pytest.fixture
def host_allocs(monkeypatch):
    """Counts the host buffers the streamer allocates (every page-locked copy comes from here)."""
    calls = []
    real = hostmem.alloc_host

    def alloc(nbytes):
        calls.append(nbytes)
        return real(nbytes)

    monkeypatch.setattr(hostmem, "alloc_host", alloc)
    return calls


def _in_pins(pins, ptr: int) -> bool:
    return any(start <= ptr < start + n for start, n in pins.registered.items())


def _ptrs(model: nn.Module) -> list[int]:
    return [p.data_ptr() for p in model.parameters()]


def test_weights_placed_whole_are_copied_from_kept_pins_and_a_detach_copies_nothing_back(
    tiny_pair, inputs, fake_pins, fresh_ledger, device_copies, host_allocs
):
    model, ref = tiny_pair()
    x = inputs(seed=1)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    cfg = StreamingConfig(vram_budget=UNLIMITED, pin_memory=True, pin_resident=True)
    ws = WeightStreamer(model, cfg, "cpu")
    with torch.no_grad():
        ws.attach()
        t = ws.telemetry()
        assert t.streamed_blocks == 0 and t.resident_blocks == 10
        assert t.resident_pinned_bytes == fake_pins.bytes == fresh_ledger.used >= params
        assert t.resident_reused_pinned_bytes == 0 and t.pinned_bytes == 0
        # One copy per block plus one for the non-block weights (and one per buffer), each from pins.
        weight_copies = [s for s in device_copies.sources if _in_pins(fake_pins, s[0])]
        assert len(weight_copies) == 10 + 1 and sum(n for _, n in weight_copies) == t.resident_pinned_bytes
        assert all(device_copies.holds(p) for p in model.parameters())
        assert torch.equal(model(*x), ref(*x))
        ws.detach(keep_pinned=True)
        # The weights point at their page-locked host copies again: nothing was copied back.
        host = _ptrs(model)
        assert all(_in_pins(fake_pins, p) for p in host)
        assert not any(device_copies.holds(p) for p in model.parameters())
        assert ws.kept_pinned_bytes == t.resident_pinned_bytes == fresh_ledger.used
        allocs, registers = len(host_allocs), fake_pins.calls
        for seed in range(3):  # warm runs: placed from the kept copies, no host memory added
            device_copies.reset()
            ws.attach()
            again = ws.telemetry()
            assert (
                again.resident_reused_pinned_bytes == again.resident_pinned_bytes == t.resident_pinned_bytes
            )
            sources = [s for s in device_copies.sources if _in_pins(fake_pins, s[0])]
            assert sources == weight_copies  # the same buffers, block by block
            assert torch.equal(model(*inputs(seed=seed)), ref(*inputs(seed=seed)))
            ws.detach(keep_pinned=True)
            assert _ptrs(model) == host
        assert len(host_allocs) == allocs and fake_pins.calls == registers
        ws.detach()  # not attached: gives the kept pins back; the bytes stay as ordinary memory
        assert fresh_ledger.used == 0 and not fake_pins.registered and ws.kept_pinned_bytes == 0
        assert _ptrs(model) == host and torch.equal(model(*x), ref(*x))


def test_without_pinning_whole_placement_still_copies_nothing_back(
    tiny_pair, inputs, fake_pins, fresh_ledger, device_copies
):
    model, ref = tiny_pair()
    before = _ptrs(model)
    cfg = StreamingConfig(vram_budget=UNLIMITED, pin_memory=False, pin_resident=True)
    ws = WeightStreamer(model, cfg, "cpu")
    with torch.no_grad():
        ws.attach()
        assert ws.telemetry().resident_pinned_bytes == 0 and fake_pins.calls == 0
        assert all(device_copies.holds(p) for p in model.parameters())
        assert torch.equal(model(*inputs()), ref(*inputs()))
        ws.detach(keep_pinned=True)
    assert _ptrs(model) == before  # the original tensors again, no new host memory


def test_streamed_blocks_get_the_pinned_limit_first_and_the_rest_is_placed_from_where_it_is(
    tiny_pair, inputs, fake_pins, fresh_ledger, device_copies
):
    model, ref = tiny_pair()
    before = dict(zip([n for n, _ in model.named_parameters()], _ptrs(model)))
    x = inputs(seed=4)
    sizes = [sum(p.numel() * p.element_size() for p in b.parameters()) for b in model.double_blocks]
    probe = WeightStreamer(model, StreamingConfig(vram_budget=_half(model), pin_memory=True), "cpu")
    probe.attach()
    streamed = probe.telemetry().streamed_bytes
    probe.detach()
    assert streamed > 0 and fresh_ledger.used == 0
    limit = streamed + max(sizes) + 4096  # the streamed blocks and about one block more
    hostmem.set_pinned_limit(limit)
    cfg = StreamingConfig(vram_budget=_half(model), pin_memory=True, pin_resident=True)
    ws = WeightStreamer(model, cfg, "cpu")
    with torch.no_grad():
        ws.attach()
        t = ws.telemetry()
        assert t.pinned_bytes == t.streamed_bytes == streamed  # every streamed block page-locked
        assert 0 < t.resident_pinned_bytes <= limit - streamed
        assert fresh_ledger.used == fake_pins.bytes <= limit
        assert torch.equal(model(*x), ref(*x))
        ws.detach(keep_pinned=True)
    for name, p in model.named_parameters():
        # Each weight is in its page-locked copy or still in the memory it was loaded into.
        assert _in_pins(fake_pins, p.data_ptr()) or p.data_ptr() == before[name]
        assert not device_copies.holds(p)


def _half(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters()) // 2


def test_a_module_without_block_lists_is_placed_whole(fake_pins, fresh_ledger, device_copies):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))
    x = torch.randn(3, 8)
    expected = model(x)
    ws = WeightStreamer(
        model, StreamingConfig(vram_budget=UNLIMITED, pin_memory=True, pin_resident=True), "cpu", blocks=()
    )
    with torch.no_grad():
        ws.attach()
        assert len(device_copies.sources) == 1 and _in_pins(fake_pins, device_copies.sources[0][0])
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
        ws.detach(keep_pinned=True)
    assert all(_in_pins(fake_pins, p.data_ptr()) for p in model.parameters())
    assert ws.kept_pinned_bytes == fake_pins.bytes > 0


def test_an_out_of_memory_retry_streams_blocks_from_the_copies_already_pinned(
    tiny_pair, inputs, fake_pins, fresh_ledger, monkeypatch
):
    model, ref = tiny_pair()
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    placed = {"bytes": 0}
    rec = DeviceCopies()

    def to_device(t, device):  # a "card" that holds 70% of the weights
        n = t.numel() * t.element_size()
        if placed["bytes"] + n > total * 0.7:
            placed["bytes"] = 0  # the attach gives everything back before retrying
            raise torch.OutOfMemoryError("simulated")
        placed["bytes"] += n
        return rec(t, device)

    monkeypatch.setattr(streamer_mod, "_to_device", to_device)
    cfg = StreamingConfig(vram_budget=UNLIMITED, pin_memory=True, pin_resident=True, oom_shrink=0.5)
    ws = WeightStreamer(model, cfg, "cpu")
    with torch.no_grad():
        ws.attach()
        t = ws.telemetry()
        assert t.oom_retries >= 1 and t.streamed_blocks > 0
        # The blocks that became streamed use the copies pinned for placing them: none pinned twice.
        assert t.reused_pinned_bytes == t.pinned_bytes == t.streamed_bytes
        assert fake_pins.calls == len(fake_pins.registered) == 11
        assert torch.equal(model(*inputs()), ref(*inputs()))
        ws.detach()
    assert fresh_ledger.used == 0 and not fake_pins.registered


def _rss_file() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("RssFile:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no RssFile line")


class MappedBlocks(nn.Module):
    streamable_blocks = ("blocks",)

    def __init__(self, n: int, d: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(d, d, bias=False) for _ in range(n))

    def forward(self, x):
        for b in self.blocks:
            x = torch.tanh(b(x))
        return x


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mapped-file pages are read on Linux")
def test_weights_viewing_a_mapped_file_give_its_pages_back_once_pinned(tmp_path, fake_pins, fresh_ledger):
    # 4 blocks of one 16 MiB weight, each a view of a memory-mapped file (as our loaders give).
    n, d = 4, 2048
    torch.manual_seed(0)
    model = MappedBlocks(n, d).eval()
    path = tmp_path / "weights.bin"
    path.write_bytes(b"".join(b.weight.detach().numpy().tobytes() for b in model.blocks))
    storage = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=path.stat().st_size)
    step = d * d * 4
    for i, b in enumerate(model.blocks):
        raw = torch.empty(0, dtype=torch.uint8).set_(storage, i * step, (step,), (1,))
        b.weight.data = raw.view(torch.float32).view(d, d)
    x = torch.randn(2, d)
    with torch.no_grad():
        expected = model(x)  # touches every page of the file
        before = _rss_file()
        ws = WeightStreamer(
            model, StreamingConfig(vram_budget=UNLIMITED, pin_memory=True, pin_resident=True), "cpu"
        )
        ws.attach()
        dropped = before - _rss_file()
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
        ws.detach(keep_pinned=True)
    assert fake_pins.bytes >= n * step
    # The file's pages left the process (up to a large folio at each end of a block may stay).
    assert dropped >= n * (step - (4 << 20))
