"""plan_residency decisions for given budgets and block sizes."""

import logging

import pytest

from weight_streaming import StreamingConfig, StreamingError, plan_residency


def test_everything_fits_means_nothing_streamed_and_no_ring():
    plan = plan_residency([10] * 6, budget=70, fixed_bytes=10)
    assert plan.resident == (True,) * 6
    assert plan.ring_bytes == 0 and plan.streamed_bytes == 0
    assert plan.device_bytes == 70


def test_one_byte_short_streams_and_pays_for_the_ring():
    # 6 x 10 + 10 fixed = 70 does not fit in 69: the ring (2 x 10) must come out of the budget, so
    # at most (69 - 10 - 20) // 10 = 3 blocks stay.
    plan = plan_residency([10] * 6, budget=69, fixed_bytes=10)
    assert len(plan.resident_indices) == 3
    assert plan.ring_slots == 2 and plan.ring_slot_bytes == 10
    assert plan.fits and plan.device_bytes == 60


def test_half_resident_alternates_so_no_two_streamed_blocks_touch():
    plan = plan_residency([10] * 12, budget=6 * 10 + 2 * 10)
    assert len(plan.resident_indices) == 6
    assert plan.longest_streamed_run == 1


def test_a_third_resident_is_spread_evenly():
    plan = plan_residency([10] * 12, budget=4 * 10 + 2 * 10)
    assert len(plan.resident_indices) == 4
    assert plan.longest_streamed_run == 2  # 8 streamed between 4 resident: runs of 2 at most
    gaps = [b - a for a, b in zip(plan.resident_indices, plan.resident_indices[1:])]
    assert max(gaps) - min(gaps) <= 1


def test_mixed_sizes_prefer_the_smaller_ring_when_it_keeps_more():
    # FLUX-like: 8 "double" blocks of 2 units, 48 "single" blocks of 1 unit (total 64).
    sizes = [2] * 8 + [1] * 48
    plan = plan_residency(sizes, budget=40)
    # A ring of 2 x 1 unit (doubles resident) keeps 38 units; a ring of 2 x 2 units keeps at most 36.
    assert plan.ring_slot_bytes == 1
    assert all(plan.resident[:8])
    assert plan.resident_bytes == 38 and plan.fits


def test_budget_is_respected_and_residency_grows_with_it():
    sizes = [7, 3, 9, 1, 4, 4, 12, 5, 2, 8]
    last = -1
    for budget in range(12 * 2 + 5, sum(sizes) + 30):
        plan = plan_residency(sizes, budget, fixed_bytes=5)
        assert plan.fits, budget
        assert plan.resident_bytes >= last - max(sizes)  # never collapses
        if plan.streamed_indices:
            assert plan.ring_slot_bytes == max(sizes[i] for i in plan.streamed_indices)
        last = plan.resident_bytes
    assert plan_residency(sizes, sum(sizes) + 5, fixed_bytes=5).streamed_bytes == 0


def test_prefetch_depth_two_uses_three_slots():
    plan = plan_residency([10] * 8, budget=60, ring_slots=StreamingConfig(prefetch_depth=2).slots)
    assert plan.ring_slots == 3 and plan.fits
    assert len(plan.resident_indices) == 3


def test_impossible_budget_streams_everything_and_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="weight_streaming.planner"):
        plan = plan_residency([10] * 4, budget=15, fixed_bytes=10)
    assert plan.resident == (False,) * 4 and not plan.fits
    assert "below what streaming every block needs" in caplog.text


def test_config_validation_and_presets():
    assert StreamingConfig.from_name("min_vram").vram_budget == 0
    assert StreamingConfig.from_name("deep_prefetch").slots == 3
    assert StreamingConfig.from_name("auto", pinned_cap=5).pinned_cap == 5
    with pytest.raises(StreamingError, match="unknown streaming preset"):
        StreamingConfig.from_name("fast")
    with pytest.raises(StreamingError, match="prefetch_depth"):
        StreamingConfig(prefetch_depth=0)
    with pytest.raises(StreamingError, match="vram_budget"):
        StreamingConfig(vram_budget=-1)
    with pytest.raises(StreamingError, match="ring_slots"):
        StreamingConfig(prefetch_depth=2, ring_slots=2)


def test_timing_model_prefers_a_spread_plan_over_clustered_resident_blocks():
    # FLUX-like sizes where the byte-optimal ring (small slots) forces all large blocks resident at the
    # start: the copy engine then idles while they compute. With timing the planner trades a little
    # residency for a bigger ring that lets resident blocks be spread, and the modelled step is faster.
    from weight_streaming import Timing
    from weight_streaming.schedule import simulate_step

    sizes = [2] * 8 + [1] * 48
    secs = tuple(0.564 * s / 64 for s in sizes)  # compute-bound when resident (0.564 s), link 54 units/s
    timing = Timing(secs, 54.0)
    plain = plan_residency(sizes, budget=22, fixed_bytes=1)
    timed = plan_residency(sizes, budget=22, fixed_bytes=1, timing=timing)
    assert plain.fits and timed.fits
    assert all(plain.resident[:8]) and plain.longest_streamed_run > 8
    t_plain = simulate_step(plain.resident, sizes, secs, 54.0, plain.ring_slots)
    t_timed = simulate_step(timed.resident, sizes, secs, 54.0, timed.ring_slots)
    assert t_timed < 0.97 * t_plain
    assert timed.longest_streamed_run < plain.longest_streamed_run


def test_simulated_step_matches_the_bounds_in_the_simple_cases():
    from weight_streaming.schedule import simulate_step

    sizes, secs = [10] * 6, [1.0] * 6
    assert simulate_step([True] * 6, sizes, secs, 10.0, 2) == 6.0  # resident: compute only
    # Everything streamed, copy 2 s vs compute 1 s per block: transfer-bound, 12 s a step once warm.
    assert abs(simulate_step([False] * 6, sizes, secs, 5.0, 2) - 12.0) < 1e-9
    # Copy 0.5 s per block: fully hidden, compute-bound.
    assert abs(simulate_step([False] * 6, sizes, secs, 20.0, 2) - 6.0) < 1e-9
