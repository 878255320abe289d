"""A timing model of the streaming pipeline, used to choose between residency plans.

One copy engine, one compute stream, R ring slots: the copy of the k-th streamed block may start once
the copy before it is done and the block that last used its slot (the (k-R)-th) has finished computing;
a streamed block computes once its copy is done and the block before it has finished. The host issues
work far ahead of the GPU, so host time is not modelled. Steps repeat, and copies wrap from the end of
one step into the next, as the streamer does.
"""

from __future__ import annotations

from collections.abc import Sequence


def simulate_step(
    resident: Sequence[bool],
    block_bytes: Sequence[int],
    block_seconds: Sequence[float],
    bytes_per_second: float,
    ring_slots: int,
    steps: int = 3,
) -> float:
    """Seconds of one steady-state step under the model above (the last of `steps` simulated steps).

    Args:
        resident: per block, True if it stays on the device.
        block_bytes: bytes each block copies when streamed.
        block_seconds: compute seconds of each block.
        bytes_per_second: host-to-device copy bandwidth.
        ring_slots: number of staging buffers.
        steps: steps simulated (the first ones fill the pipeline).
    """
    t = 0.0  # compute stream clock
    copy_free = 0.0  # copy engine clock
    done: list[float] = []  # compute end of each streamed load, in load order
    step_time = 0.0
    for _ in range(steps):
        start = t
        for res, nbytes, secs in zip(resident, block_bytes, block_seconds):
            if res:
                t += secs
                continue
            k = len(done)
            slot_free = done[k - ring_slots] if k >= ring_slots else 0.0
            copy_end = max(copy_free, slot_free) + nbytes / bytes_per_second
            copy_free = copy_end
            t = max(t, copy_end) + secs
            done.append(t)
        step_time = t - start
    return step_time
