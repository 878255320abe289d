"""Generic block paging between pinned host RAM and the GPU. Never imports ComfyUI or flux2_core.

    streamer = WeightStreamer(model, StreamingConfig(vram_budget=16 << 30), "cuda")
    streamer.attach()                  # plan, place resident weights, pin the streamed blocks
    with torch.inference_mode():
        out = streamer.call(model, **inputs)   # a forward pass; lowers residency on a CUDA OOM
    streamer.telemetry()               # bytes, pinned bytes, copy bandwidth, stall per step
    streamer.detach(keep_pinned=True)  # device memory given back; pinned host buffers kept
    streamer.attach()                  # quick: reuses the kept buffers (no re-pin)
    streamer.detach()                  # model back on the CPU, device and pinned memory released

The model declares its block lists (`streamable_blocks = ("double_blocks", "single_blocks")`) or they
are passed as `blocks=`. `StreamingConfig.block_seconds` (e.g. from `measure_block_seconds` on a resident
run) lets the planner compare plans by modelled step time; without it, `StreamingConfig.block_flops`
(FLOPs per block, counted by the model's owner) are turned into times by a short matmul probe in the
dtype each block computes in (`block_matmul_dtype`: float8 blocks at the FP8 rate where the GPU has it).

Host memory: all streamers of the process share one page-locked limit (`set_pinned_limit`; by default
like ComfyUI's). Past it, blocks stream from the memory they already live in, or from their weight
source, with one log line saying so. `WeightStreamer(progress=...)` reports attach progress.
"""

from .blocks import find_blocks
from .config import PRESETS, StreamingConfig
from .errors import StreamingError
from .estimate import (
    block_matmul_dtype,
    estimate_block_seconds,
    estimate_blocks_seconds,
    measure_matmul_flops,
)
from .host import WeightSource
from .hostmem import (
    default_pinned_limit,
    host_ram_bytes,
    pinned_in_use,
    pinned_limit,
    release_kept_pinned,
    set_external_pinned,
    set_pinned_limit,
)
from .pinning import AttachProgress
from .planner import Plan, Timing, plan_residency
from .profile import measure_block_seconds, measure_link_bandwidth
from .streamer import WeightStreamer
from .telemetry import Telemetry

__all__ = [
    "PRESETS",
    "AttachProgress",
    "Plan",
    "StreamingConfig",
    "StreamingError",
    "Telemetry",
    "Timing",
    "WeightSource",
    "WeightStreamer",
    "block_matmul_dtype",
    "default_pinned_limit",
    "estimate_block_seconds",
    "estimate_blocks_seconds",
    "find_blocks",
    "host_ram_bytes",
    "measure_block_seconds",
    "measure_link_bandwidth",
    "measure_matmul_flops",
    "pinned_in_use",
    "pinned_limit",
    "plan_residency",
    "release_kept_pinned",
    "set_external_pinned",
    "set_pinned_limit",
]
