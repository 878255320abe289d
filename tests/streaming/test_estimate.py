"""Block times estimated from FLOPs and a matmul probe, and the planner using them (CPU path)."""

import pytest
import torch

from weight_streaming import StreamingConfig, StreamingError, Timing, WeightStreamer, plan_residency
from weight_streaming import estimate as est
from weight_streaming.host import BlockLayout

FLOPS = (4e6, 9e6, 1e6, 6e6, 2e6, 12e6, 1e6, 5e6, 8e6, 2e6)
SIZES = [24, 40, 8, 32, 16, 56, 8, 24, 48, 16]


def _layout_info(model):
    sizes = [BlockLayout.of(b, "b").nbytes for lst in (model.double_blocks, model.single_blocks) for b in lst]
    fixed = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "blocks" not in n)
    fixed += sum(b.numel() * b.element_size() for b in model.buffers())
    return sizes, fixed


def test_estimate_divides_flops_by_the_effective_rate():
    secs = est.estimate_block_seconds([2e12, 0.0, 5e11], 1e15, efficiency=0.5)
    assert secs == pytest.approx((4e-3, 0.0, 1e-3))
    with pytest.raises(ValueError, match="efficiency"):
        est.estimate_block_seconds([1.0], 1e12, efficiency=0.0)
    with pytest.raises(ValueError, match="flops_per_second"):
        est.estimate_block_seconds([1.0], 0.0)
    with pytest.raises(ValueError, match=">= 0"):
        est.estimate_block_seconds([-1.0], 1e12)


def test_matmul_probe_measures_once_per_device_and_dtype(monkeypatch):
    est.clear_probe_cache()
    calls = []
    real = torch.matmul
    monkeypatch.setattr(torch, "matmul", lambda *a, **k: calls.append(1) or real(*a, **k))
    rate = est.measure_matmul_flops("cpu", torch.float32, n=64, iters=3)
    assert rate > 1e6 and len(calls) == 4  # warm-up + 3 timed
    assert est.measure_matmul_flops("cpu", torch.float32, n=64) == rate and len(calls) == 4  # cached
    est.measure_matmul_flops("cpu", torch.float64, n=64, iters=1)
    assert len(calls) == 6  # another dtype is probed on its own
    est.clear_probe_cache()


def test_config_rejects_bad_flop_settings():
    with pytest.raises(StreamingError, match="flops_efficiency"):
        StreamingConfig(flops_efficiency=1.5)
    with pytest.raises(StreamingError, match="block_flops"):
        StreamingConfig(block_flops=(1.0, -2.0))


def test_streamer_plans_with_estimated_times_when_no_measured_times(tiny_pair, inputs, monkeypatch):
    model, ref = tiny_pair(sizes=SIZES)
    sizes, fixed = _layout_info(model)
    budget = fixed + 2 * max(sizes) + sum(sorted(sizes)[:3])
    probed = []

    def probe(device, dtype=torch.bfloat16, n=None, iters=5):
        probed.append((str(device), dtype))
        return 2e9

    monkeypatch.setattr("weight_streaming.streamer.measure_matmul_flops", probe)
    cfg = StreamingConfig(vram_budget=budget, block_flops=FLOPS, flops_efficiency=0.5, link_bandwidth=1e6)
    x = inputs(seed=3)
    with torch.no_grad(), WeightStreamer(model, cfg, "cpu") as ws:
        assert probed == [("cpu", torch.float32)]  # the blocks' compute dtype, probed on their device
        want_secs = tuple(f / 1e9 for f in FLOPS)
        assert ws.timing.block_seconds == pytest.approx(want_secs)
        expect = plan_residency(sizes, budget, fixed_bytes=fixed, ring_slots=2, timing=Timing(want_secs, 1e6))
        assert ws.plan.resident == expect.resident and ws.plan.ring_slots == expect.ring_slots
        assert ws.plan.streamed_indices
        for _ in range(2):
            assert torch.equal(model(*x), ref(*x))


def test_measured_times_win_over_flops_and_a_given_rate_skips_the_probe(tiny_pair, monkeypatch):
    model, _ = tiny_pair(sizes=SIZES)
    sizes, fixed = _layout_info(model)
    budget = fixed + 2 * max(sizes) + sum(sorted(sizes)[:3])

    def no_probe(*a, **k):
        raise AssertionError("probe must not run")

    monkeypatch.setattr("weight_streaming.streamer.measure_matmul_flops", no_probe)
    measured = tuple(0.01 * (i + 1) for i in range(10))
    cfg = StreamingConfig(vram_budget=budget, block_seconds=measured, block_flops=FLOPS, link_bandwidth=1e6)
    with WeightStreamer(model, cfg, "cpu") as ws:
        assert ws.timing.block_seconds == measured
    cfg = StreamingConfig(
        vram_budget=budget, block_flops=FLOPS, matmul_flops=1e9, flops_efficiency=1.0, link_bandwidth=1e6
    )
    with WeightStreamer(model, cfg, "cpu") as ws:
        assert ws.timing.block_seconds == pytest.approx(tuple(f / 1e9 for f in FLOPS))


def test_flux_like_flops_give_the_spread_timed_plan():
    """FLUX.2 [dev] proportions: double blocks hold twice the bytes of a single block for the same FLOPs.
    With times estimated from FLOPs the planner picks the same plan as with times proportional to the
    true compute, and a faster modelled step than the byte-only plan."""
    from weight_streaming.schedule import simulate_step

    sizes = [2] * 8 + [1] * 48
    flops = [5.04e12] * 56
    secs = est.estimate_block_seconds(flops, 790e12)  # about 0.55 s resident, like the H100 runs
    timed = plan_residency(sizes, budget=22, fixed_bytes=1, timing=Timing(secs, 54.0 * 0.55 / sum(secs)))
    plain = plan_residency(sizes, budget=22, fixed_bytes=1)
    bw = 54.0 * 0.55 / sum(secs)
    assert simulate_step(timed.resident, sizes, secs, bw, timed.ring_slots) < simulate_step(
        plain.resident, sizes, secs, bw, plain.ring_slots
    )
