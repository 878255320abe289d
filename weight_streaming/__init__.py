"""Generic block paging between pinned host RAM and the GPU. Never imports ComfyUI or flux2_core."""

from .blocks import find_blocks
from .config import PRESETS, StreamingConfig
from .errors import StreamingError
from .host import WeightSource
from .planner import Plan, Timing, plan_residency
from .profile import measure_block_seconds, measure_link_bandwidth
from .streamer import WeightStreamer
from .telemetry import Telemetry

__all__ = [
    "PRESETS",
    "Plan",
    "StreamingConfig",
    "StreamingError",
    "Telemetry",
    "Timing",
    "WeightSource",
    "WeightStreamer",
    "find_blocks",
    "measure_block_seconds",
    "measure_link_bandwidth",
    "plan_residency",
]
