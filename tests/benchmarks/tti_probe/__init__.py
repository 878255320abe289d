"""Benchmark-only ComfyUI pack for tests/benchmarks/time_to_image.py (linked into custom_nodes there).

Inside the server process it samples, every 20 ms, device memory in use (cudaMemGetInfo: whatever the
allocator, ComfyUI's dynamic VRAM included), page-locked bytes (Flux2Local's ledger and ComfyUI's own
counter), the process's resident set and the machine's used RAM, and serves the series over HTTP:

    GET  /flux2bench/series?since=<t>   samples (monotonic seconds, the same clock as the benchmark's)
    GET  /flux2bench/attaches           every WeightStreamer attach: when, how long, bytes by kind
    GET  /flux2bench/link               pinned host-to-device bandwidth and a bf16 matmul rate
    POST /flux2bench/config             {"pinned_limit": bytes, "comfy_pinned_limit": bytes}: the pin
                                        caps of Flux2Local (process-wide) and of ComfyUI

It also sets ComfyUI's progress throttle to 0 so every sampling step reaches the websocket (both
systems alike). It adds no nodes.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time

import comfy.model_management as mm
import comfy.utils
import torch
from aiohttp import web
from server import PromptServer

log = logging.getLogger("flux2bench")
NODE_CLASS_MAPPINGS: dict = {}
comfy.utils.PROGRESS_THROTTLE_MIN_INTERVAL = 0.0
comfy.utils.PROGRESS_THROTTLE_MIN_PERCENT = 0.0

_SAMPLES: list[tuple] = []  # (t, vram_used, pinned_ours, pinned_comfy, rss, sys_used)
_ATTACHES: list[dict] = []
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _our_module(suffix: str):
    for name, mod in list(sys.modules.items()):
        if name.endswith(suffix) and not name.startswith(__name__) and mod is not None:
            return mod
    return None


def _sys_used() -> int:
    info = {}
    with open("/proc/meminfo") as f:
        for line in f:
            k, v = line.split(":", 1)
            info[k] = int(v.split()[0]) * 1024
    return info["MemTotal"] - info["MemAvailable"]


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def _sample_forever() -> None:
    cuda = torch.cuda.is_available()
    while True:
        try:
            used = 0
            if cuda:
                free, total = torch.cuda.mem_get_info()
                used = total - free
            hostmem = _our_module("weight_streaming.hostmem")
            ours = hostmem.LEDGER.used if hostmem is not None else 0
            _SAMPLES.append((time.monotonic(), used, ours, int(mm.TOTAL_PINNED_MEMORY), _rss(), _sys_used()))
        except Exception:  # never take the server down
            log.debug("sample failed", exc_info=True)
        time.sleep(0.02)


def _wrap_attach() -> bool:
    streamer = _our_module("weight_streaming.streamer")
    if streamer is None or getattr(streamer.WeightStreamer.attach, "_flux2bench", False):
        return streamer is not None
    original = streamer.WeightStreamer.attach

    def attach(self, *args, **kwargs):
        t0 = time.monotonic()
        plan = original(self, *args, **kwargs)
        t = self.telemetry()
        _ATTACHES.append(
            dict(
                start=t0,
                end=time.monotonic(),
                model=type(self.model).__name__,
                resident_bytes=t.fixed_bytes + t.resident_bytes,
                streamed_bytes=t.streamed_bytes,
                pinned_bytes=t.pinned_bytes,
                reused_pinned_bytes=t.reused_pinned_bytes,
                # Models placed whole go through the streamer too: their page-locked host copies.
                resident_pinned_bytes=t.resident_pinned_bytes,
                resident_reused_pinned_bytes=t.resident_reused_pinned_bytes,
                pageable_bytes=t.pageable_bytes,
                sourced_bytes=t.sourced_bytes,
                pin_seconds=t.pin_seconds,
                pin_rate=t.pin_rate,
            )
        )
        return plan

    attach._flux2bench = True
    streamer.WeightStreamer.attach = attach
    return True


routes = PromptServer.instance.routes


@routes.get("/flux2bench/series")
async def series(request):
    _wrap_attach()
    since = float(request.query.get("since", "0"))
    keys = ("t", "vram_used", "pinned_ours", "pinned_comfy", "rss", "sys_used")
    rows = [s for s in list(_SAMPLES) if s[0] >= since]
    return web.json_response({k: [r[i] for r in rows] for i, k in enumerate(keys)})


@routes.get("/flux2bench/attaches")
async def attaches(request):
    _wrap_attach()
    return web.json_response(list(_ATTACHES))


@routes.get("/flux2bench/link")
async def link(request):
    out = {"h2d_bytes_per_s": 0.0, "bf16_matmul_flops": 0.0}
    if torch.cuda.is_available():
        n = 1 << 30
        src = torch.empty(n, dtype=torch.uint8, pin_memory=True)
        dst = torch.empty(n, dtype=torch.uint8, device="cuda")
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(3):
            dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        out["h2d_bytes_per_s"] = 3 * n / (time.perf_counter() - t0)
        del src, dst
        if hasattr(torch._C, "_host_emptyCache"):  # give the pinned 1 GiB back (torch caches it)
            torch._C._host_emptyCache()
        a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
        a @ a
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(10):
            a @ a
        torch.cuda.synchronize()
        out["bf16_matmul_flops"] = 10 * 2 * 8192**3 / (time.perf_counter() - t0)
        del a
        torch.cuda.empty_cache()
    return web.json_response(out)


@routes.post("/flux2bench/config")
async def config(request):
    body = await request.json()
    hostmem = _our_module("weight_streaming.hostmem")
    if "pinned_limit" in body and hostmem is not None:
        hostmem.set_pinned_limit(int(body["pinned_limit"]))
    if "comfy_pinned_limit" in body and mm.MAX_PINNED_MEMORY > 0:  # <= 0: pinning off in ComfyUI
        mm.MAX_PINNED_MEMORY = int(body["comfy_pinned_limit"])
    return web.json_response({"ok": True, "attach_wrapped": _wrap_attach()})


threading.Thread(target=_sample_forever, name="flux2bench-sampler", daemon=True).start()
