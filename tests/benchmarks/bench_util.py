"""Helpers shared by the transformer benchmark and its ComfyUI worker: the cases, random weights with
the same statistics for every implementation, inputs, timing on CUDA or (``--smoke``) the CPU."""

from __future__ import annotations

import gc
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from flux2_core import Flux2Config  # noqa: E402

DTYPE = torch.bfloat16
# A static FP8 input scale for every block linear (ours and ComfyUI's), as FP8 checkpoints ship one:
# the value does not change the speed.
INPUT_SCALE = 0.05


@dataclass(frozen=True)
class Case:
    """One row of the benchmark: a model, a precision and a resolution."""

    name: str
    variant: str
    fp8: bool
    image_tokens: int
    text_tokens: int = 512

    def config(self, smoke: bool) -> Flux2Config:
        cfg = Flux2Config.from_name(self.variant)
        if smoke:  # two heads, a few blocks: checks every code path in seconds on a CPU
            cfg = cfg.replace(
                variant="custom", hidden_size=256, num_heads=2, depth=1, depth_single=2, context_dim=64
            )
        return cfg

    def tokens(self, smoke: bool) -> tuple[int, int]:
        return (64, 16) if smoke else (self.image_tokens, self.text_tokens)


CASES = {
    c.name: c
    for c in (
        Case("dev", "dev", False, 4096),
        Case("klein-9b", "klein-9b", False, 4096),
        Case("dev-fp8", "dev", True, 4096),
        Case("klein-9b-fp8", "klein-9b", True, 4096),
        Case("klein-4b-512", "klein-4b", False, 1024),
    )
}
# Speed goals of our fast path (seconds per forward on an H200).
GOALS = {"dev": 0.42, "klein-9b": 0.12, "klein-4b-512": 0.022, "dev-fp8": 0.28, "klein-9b-fp8": 0.09}


def device(smoke: bool) -> torch.device:
    return torch.device("cpu" if smoke else "cuda")


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def free(dev: torch.device) -> None:
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def allocated_gib(dev: torch.device) -> float | None:
    return torch.cuda.memory_allocated(dev) / 2**30 if dev.type == "cuda" else None


def random_init_(model: torch.nn.Module, dev: torch.device, seed: int = 0) -> None:
    """Same weight statistics for every implementation: N(0, 1/fan_in) matrices, ones for norm scales."""
    g = torch.Generator(device=dev).manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, p.shape[1] ** -0.5, generator=g)
            else:
                p.fill_(1.0)


def inputs(cfg: Flux2Config, n_img: int, n_txt: int, dev: torch.device) -> dict:
    g = torch.Generator(device=dev).manual_seed(1)
    side = int(n_img**0.5)
    img_ids = torch.zeros(1, n_img, 4, device=dev)
    img_ids[0, :, 1] = torch.arange(n_img, device=dev) // side
    img_ids[0, :, 2] = torch.arange(n_img, device=dev) % side
    txt_ids = torch.zeros(1, n_txt, 4, device=dev)
    txt_ids[0, :, 3] = torch.arange(n_txt, device=dev)
    return dict(
        img=torch.randn(1, n_img, 128, device=dev, generator=g, dtype=DTYPE),
        img_ids=img_ids,
        txt=torch.randn(1, n_txt, cfg.context_dim, device=dev, generator=g, dtype=DTYPE),
        txt_ids=txt_ids,
        timesteps=torch.tensor([0.5], device=dev),
        guidance=torch.tensor([4.0], device=dev) if cfg.guidance_embed else None,
    )


def time_it(fn, dev: torch.device, warmup: int, iters: int, weights_gib: float | None) -> dict:
    """First call (compile / warm-up included), median of ``iters`` timed calls after ``warmup``, and
    the activation peak (peak allocated minus the weights) of the timed calls."""
    with torch.inference_mode():
        sync(dev)
        t0 = time.perf_counter()
        fn()
        sync(dev)
        first = time.perf_counter() - t0
        for _ in range(max(0, warmup - 1)):
            fn()
        sync(dev)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            sync(dev)
            times.append(time.perf_counter() - t0)
    steady = statistics.median(times)
    out = {
        "seconds": round(steady, 5),
        "first_s": round(first, 3),
        "warmup_s": round(max(0.0, first - steady), 3),
    }
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated(dev) / 2**30
        out["peak_gib"] = round(peak, 3)
        if weights_gib is not None:
            out["weights_gib"] = round(weights_gib, 3)
            out["activation_gib"] = round(peak - weights_gib, 3)
    return out


def bfl_random_state_dict(cfg: Flux2Config, dev: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random bf16 weights under BFL keys (ComfyUI's FLUX.2 module names are the same), made on ``dev``."""
    from flux2_core.config import bfl_shapes

    g = torch.Generator(device=dev).manual_seed(seed)
    sd = {}
    for k, shape in bfl_shapes(cfg).items():
        if len(shape) >= 2:
            sd[k] = torch.randn(shape, device=dev, generator=g, dtype=DTYPE) * shape[1] ** -0.5
        else:
            sd[k] = torch.ones(shape, device=dev, dtype=DTYPE)
    return sd
