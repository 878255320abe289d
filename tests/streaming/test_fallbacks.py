"""Out-of-memory retry while attaching and the pinned-memory fallbacks (simulated on the CPU)."""

import logging

import pytest
import torch

import weight_streaming.streamer as streamer_mod
from weight_streaming import StreamingConfig, StreamingError, WeightStreamer


class FakeDevice:
    """Counts bytes put on the 'device' and raises OutOfMemoryError past a limit."""

    def __init__(self, limit):
        self.limit, self.used, self.ooms = limit, 0, 0

    def to_device(self, t, device):
        return self._take(t.numel() * t.element_size(), lambda: t.to(device))

    def empty(self, nbytes, device):
        return self._take(nbytes, lambda: torch.empty(nbytes, dtype=torch.uint8, device=device))

    def _take(self, nbytes, make):
        if self.used + nbytes > self.limit:
            self.ooms += 1
            self.used = 0  # the failed attempt is rolled back by the streamer
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        self.used += nbytes
        return make()


def test_oom_while_attaching_lowers_the_resident_set_and_retries(tiny_pair, inputs, monkeypatch, caplog):
    model, ref = tiny_pair()
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    dev = FakeDevice(limit=int(total * 0.5))
    monkeypatch.setattr(streamer_mod, "_to_device", dev.to_device)
    monkeypatch.setattr(streamer_mod, "_empty_device", dev.empty)
    # The budget claims everything fits; the "device" holds only half of it.
    with caplog.at_level(logging.WARNING, logger="weight_streaming.streamer"):
        ws = WeightStreamer(model, StreamingConfig(vram_budget=total * 2), "cpu")
        plan = ws.attach()
    assert dev.ooms >= 1 and ws.telemetry().oom_retries == dev.ooms
    assert "retrying with a budget" in caplog.text
    assert plan.streamed_indices and plan.device_bytes <= dev.limit
    with torch.no_grad():
        assert torch.equal(model(*inputs()), ref(*inputs()))
    ws.detach()
    with torch.no_grad():
        assert torch.equal(model(*inputs()), ref(*inputs()))


def test_oom_that_never_clears_gives_a_clear_error_and_restores_the_model(tiny_pair, inputs, monkeypatch):
    model, ref = tiny_pair()
    dev = FakeDevice(limit=0)
    monkeypatch.setattr(streamer_mod, "_to_device", dev.to_device)
    monkeypatch.setattr(streamer_mod, "_empty_device", dev.empty)
    with pytest.raises(StreamingError, match="out of device memory while attaching"):
        WeightStreamer(model, StreamingConfig(vram_budget=10**9, max_oom_retries=2), "cpu").attach()
    assert dev.ooms == 3
    assert not any("forward" in b.__dict__ for b in model.single_blocks)
    with torch.no_grad():
        assert torch.equal(model(*inputs()), ref(*inputs()))


def test_pinning_failure_streams_from_the_weights_in_place_with_one_warning(
    tiny_pair, inputs, fake_pins, fresh_ledger, caplog
):
    model, ref = tiny_pair()
    fake_pins.fail = True
    before = {n: p.data_ptr() for n, p in model.named_parameters()}
    with caplog.at_level(logging.WARNING, logger="weight_streaming"), torch.no_grad():
        with WeightStreamer(model, StreamingConfig(vram_budget=0, pin_memory=True), "cpu") as ws:
            t = ws.telemetry()
            assert t.pinned_bytes == 0 and t.pageable_bytes == t.streamed_bytes > 0
            assert fresh_ledger.used == 0  # every reservation given back
            # No second copy: the streamed parameters still live where they were loaded.
            assert {n: p.data_ptr() for n, p in model.named_parameters()} == before
            assert torch.equal(model(*inputs()), ref(*inputs()))
            assert torch.equal(model(*inputs()), ref(*inputs()))
    assert fake_pins.calls == 1  # after one refusal it stops asking the OS
    assert caplog.text.count("could not pin host memory") == 1
    assert caplog.text.count("the OS refused to page-lock") == 1


def test_pinned_cap_pins_up_to_the_cap_and_the_rest_stays_pageable(tiny_pair, inputs, fake_pins, caplog):
    model, ref = tiny_pair()
    pins = fake_pins
    with torch.no_grad():
        with WeightStreamer(model, StreamingConfig(vram_budget=0, pin_memory=True), "cpu") as ws:
            full = ws.telemetry()
            # Pinned bytes are the streamed bytes (plus alignment padding), well under 1.1x.
            assert full.streamed_bytes <= full.pinned_bytes <= 1.1 * full.streamed_bytes
            assert full.pageable_bytes == 0 and len(pins.registered) == full.streamed_blocks
        assert not pins.registered  # detach unpins everything
        cap = full.pinned_bytes // 2
        with caplog.at_level(logging.WARNING, logger="weight_streaming"):
            with WeightStreamer(
                model, StreamingConfig(vram_budget=0, pin_memory=True, pinned_cap=cap), "cpu"
            ) as ws:
                t = ws.telemetry()
                assert 0 < t.pinned_bytes <= cap
                assert t.pinned_bytes + t.pageable_bytes == full.pinned_bytes
                assert torch.equal(model(*inputs()), ref(*inputs()))
        # One line, saying why and how much.
        lines = [r for r in caplog.records if "pinned-memory limit reached" in r.getMessage()]
        assert len(lines) == 1 and "GiB copy from pageable memory" in lines[0].getMessage()


def test_oom_in_a_forward_pass_lowers_the_resident_set_and_retries(tiny_pair, inputs):
    # Simulate activations that only fit once at most 4 blocks stay resident.
    model, ref = tiny_pair()
    ws = WeightStreamer(model, StreamingConfig(vram_budget=10**9), "cpu")
    ws.attach()
    assert not ws.plan.streamed_indices
    calls = []

    def step():
        calls.append(len(ws.plan.resident_indices))
        if len(ws.plan.resident_indices) > 4:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        with torch.no_grad():
            return model(*inputs())

    out = ws.call(step)
    assert torch.equal(out, ref(*inputs()).detach())
    assert len(calls) >= 2 and calls[-1] <= 4 and ws.telemetry().oom_retries == len(calls) - 1
    ws.detach()
    ws2 = WeightStreamer(model, StreamingConfig(vram_budget=10**9, max_oom_retries=1), "cpu")
    ws2.attach()
    with pytest.raises(torch.OutOfMemoryError):
        ws2.call(lambda: (_ for _ in ()).throw(torch.OutOfMemoryError("always")))
    ws2.detach()


def test_a_source_that_fails_leaves_the_model_detached_and_usable(tiny_pair, inputs, fake_pins, fresh_ledger):
    model, ref = tiny_pair()

    class Broken:
        def read_into(self, name, out):
            raise OSError(f"cannot read {name}")

    ws = WeightStreamer(model, StreamingConfig(vram_budget=0, pin_memory=True), "cpu", source=Broken())
    with pytest.raises(OSError, match="cannot read"):
        ws.attach()
    assert not ws.attached and not model._forward_pre_hooks
    assert not any("forward" in b.__dict__ for b in model.single_blocks)
    import gc

    gc.collect()
    assert fresh_ledger.used == 0 and not fake_pins.registered  # nothing stays page-locked
    with torch.no_grad():
        assert torch.equal(model(*inputs()), ref(*inputs()))
