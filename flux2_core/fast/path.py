"""Per-model fast-path state: which block stages run on a device, and the CUDA graphs."""

from __future__ import annotations

import logging
import os

import torch

from ..config import Flux2Config
from ..model.blocks import BlockStages
from .compiled import STATS, compiled_stages
from .graphs import GraphRunner, ineligible_reason
from .settings import ENV_FAST, ENV_GRAPHS, graph_token_limit, log_once, requested_graphs, resolve_mode

logger = logging.getLogger(__name__)


def width_key(config: Flux2Config) -> tuple:
    """What fixes a block's shapes apart from the token count."""
    return (config.hidden_size, config.num_heads, config.mlp_hidden)


class FastPath:
    """Owned by a ``Flux2Transformer``; decides per forward what its blocks run."""

    def __init__(self) -> None:
        self.graphs = GraphRunner()
        self._modes: dict[tuple, str] = {}
        self.last_mode = "eager"

    def mode(self, setting: str, device: torch.device) -> str:
        """The resolved mode ("eager", "compile" or "kitchen"), cached per setting and device type."""
        key = (setting, os.environ.get(ENV_FAST), device.type)
        if key not in self._modes:
            self._modes[key] = resolve_mode(setting, device)
        return self._modes[key]

    def stages(self, setting: str, config: Flux2Config, device: torch.device) -> BlockStages | None:
        """Stage functions for the blocks (None: the eager ones)."""
        mode = self.last_mode = self.mode(setting, device)
        if mode == "compile":
            return compiled_stages(width_key(config))
        if mode == "kitchen":
            from .kitchen import KITCHEN_STAGES

            return KITCHEN_STAGES
        return None

    def use_graphs(self, setting: str, fast_setting: str, model, device: torch.device, tokens: int) -> bool:
        """Whether this forward goes through the CUDA graph runner."""
        if device.type != "cuda":
            return False
        want = requested_graphs(setting)
        if want == "off" or self.graphs.failed is not None:
            return False
        if want == "auto" and (tokens > graph_token_limit() or self.mode(fast_setting, device) == "eager"):
            return False
        why = ineligible_reason(model, device)
        if why is not None:
            log_once(f"graphs-no:{why}", logging.INFO, "FLUX.2 CUDA graphs not used: %s", why)
            return False
        log_once(
            "graphs-yes",
            logging.INFO,
            "FLUX.2 CUDA graphs on for %d tokens (set %s=0 to turn off)",
            tokens,
            ENV_GRAPHS,
        )
        return True

    def release(self) -> None:
        """Drop captured graphs (their activation memory); compiled kernels stay cached."""
        self.graphs.release()

    def status(self) -> dict:
        """Figures for logs and benchmarks: mode, compile cost, graph captures and replays."""
        return {
            "mode": self.last_mode,
            **STATS.as_dict(),
            "graph_captures": self.graphs.captures,
            "graph_replays": self.graphs.replays,
            "graph_failed": self.graphs.failed,
        }
