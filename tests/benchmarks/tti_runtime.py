"""Machinery for `time_to_image.py`: a ComfyUI server on the GPU, its websocket events, emulated card
and RAM sizes, and the page cache.

- `BenchServer`: workflows/comfy_server.py's harness (which starts CPU-only servers for the tests)
  with the GPU left visible, an optional launcher prefix (a memory cgroup) and the probe pack.
- `Events`: every websocket message of our client id, stamped on arrival (time.monotonic, the clock
  the probe's samples use too: CLOCK_MONOTONIC is system-wide on Linux).
- `VramBallast`: a card of B GiB on a bigger GPU: this process holds the free memory beyond B, so the
  server (ours or ComfyUI, whatever its allocator) genuinely finds only B GiB free.
- `RamLimit`: a machine with less RAM: a memory cgroup (cgroup v2, when writable) around the server,
  else a ballast process holding (and, where allowed, locking) the RAM beyond the limit.
- `drop_page_cache`, `disk_read_rate`: for the cold runs and their bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from unittest import mock

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path[:0] = [str(ROOT / "workflows")]

import comfy_server  # noqa: E402
from comfy_server import ComfyServer  # noqa: E402

GiB = 1 << 30


def say(msg: str) -> None:
    print(f"[time_to_image] {msg}", flush=True)


# ------------------------------------------------------------------------------------ the server
class BenchServer(ComfyServer):
    """A ComfyUI server for the benchmark (see the module docstring)."""

    def __init__(self, base: Path, *, gpu: bool, prefix: list[str] | None = None, extra_args=None) -> None:
        super().__init__(base, extra_args=list(extra_args or []))
        self.gpu, self.prefix = gpu, list(prefix or [])

    def start(self, timeout: float = 600.0) -> BenchServer:
        real = subprocess.Popen
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")

        def popen(cmd, **kw):
            # The harness always adds --cpu and hides the GPUs (tests run on CPU): undo that here.
            if self.gpu:
                cmd = [c for c in cmd if c != "--cpu"]
                env = dict(kw.pop("env"))
                env.pop("CUDA_VISIBLE_DEVICES", None)
                if visible is not None:
                    env["CUDA_VISIBLE_DEVICES"] = visible
                kw["env"] = env
            return real([*self.prefix, *cmd], **kw)

        with mock.patch.object(comfy_server.subprocess, "Popen", popen):
            super().start(timeout)
        return self

    def probe(self, path: str, data: dict | None = None):
        if data is None:
            return self.get_json(f"/flux2bench/{path}", timeout=120)
        status, body = self.post_json(f"/flux2bench/{path}", data, timeout=120)
        if status != 200:
            raise RuntimeError(f"probe {path} answered {status}: {body}")
        return body


def comfyui_gguf_path() -> Path | None:
    """city96's ComfyUI-GGUF tree (COMFYUI_GGUF_PATH, default ~/ComfyUI-GGUF), or None."""
    path = Path(os.environ.get("COMFYUI_GGUF_PATH") or Path.home() / "ComfyUI-GGUF")
    return path if (path / "nodes.py").is_file() else None


def link_packs(base: Path, smoke: bool, gguf: bool = False) -> None:
    """The probe pack (the probe finds our modules whenever it is asked, so load order does not
    matter), ComfyUI-GGUF for a GGUF set (ComfyUI's side loads it with UnetLoaderGGUF), and, in smoke
    runs, the test bridge that hands our conditioning to ComfyUI's sampler (its CLIPLoader cannot load
    tiny encoders)."""
    nodes = base / "custom_nodes"
    (nodes / "zz_flux2bench_probe").symlink_to(HERE / "tti_probe", target_is_directory=True)
    if gguf:
        tree = comfyui_gguf_path()
        if tree is None:
            raise RuntimeError(
                "a GGUF set needs ComfyUI-GGUF for ComfyUI's side: set COMFYUI_GGUF_PATH "
                "(prepare_time_to_image.sh carries it to the device)"
            )
        (nodes / "ComfyUI-GGUF").symlink_to(tree, target_is_directory=True)
    if smoke:
        (nodes / "flux2local_test_bridge").symlink_to(ROOT / "tests" / "comfyui" / "bridge_pack", True)


def frontend_args() -> list[str]:
    """ComfyUI exits without its frontend package; the benchmark needs no editor, so serve an empty
    folder where the package is not installed (the GPU machine gets no 40 MB of frontend)."""
    import importlib.util

    if importlib.util.find_spec("comfyui_frontend_package") is not None:
        return []
    stub = ROOT / ".device_out" / "frontend-stub"
    stub.mkdir(parents=True, exist_ok=True)
    (stub / "index.html").write_text("<html><body>time_to_image benchmark</body></html>")
    return ["--front-end-root", str(stub)]


# ----------------------------------------------------------------------------------- websocket
class Events:
    """The server's websocket messages for one client id, with arrival times (a background thread)."""

    def __init__(self, server: ComfyServer) -> None:
        self.items: list[tuple[float, dict]] = []
        self._cond = threading.Condition()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        url = server.url.replace("http://", "ws://") + f"/ws?clientId={server.client_id}"
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main(url)), daemon=True)
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("could not open the ComfyUI websocket")

    async def _main(self, url: str) -> None:
        import aiohttp

        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        async with aiohttp.ClientSession() as session, session.ws_connect(url, max_msg_size=0) as ws:
            self._ready.set()
            reader = asyncio.ensure_future(self._read(ws))
            await self._stop.wait()
            reader.cancel()

    async def _read(self, ws) -> None:
        import aiohttp

        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.TEXT:  # binary messages are previews
                with self._cond:
                    self.items.append((time.monotonic(), json.loads(msg.data)))
                    self._cond.notify_all()

    def wait_done(self, prompt_id: str, timeout: float, alive) -> tuple[float, str]:
        """Blocks until the prompt ends; returns (time, "execution_success" | error kind)."""
        ends = ("execution_success", "execution_error", "execution_interrupted")
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for t, m in self.items:
                    if m.get("type") in ends and m.get("data", {}).get("prompt_id") == prompt_id:
                        return t, m["type"]
                if time.monotonic() > deadline:
                    raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout:.0f} s")
                if not alive():
                    raise RuntimeError("ComfyUI died while running the prompt")
                self._cond.wait(1.0)

    def of(self, prompt_id: str) -> list[tuple[float, dict]]:
        with self._cond:
            return [(t, m) for t, m in self.items if m.get("data", {}).get("prompt_id") == prompt_id]

    def close(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


# --------------------------------------------------------------------------------- card and RAM
class VramBallast:
    """Holds the device memory beyond `budget` bytes in this process (see the module docstring)."""

    def __init__(self, budget: int | None) -> None:
        self.tensor = None
        self.bytes = 0
        self.base_used = 0
        try:
            import torch
        except ImportError:
            return
        if budget is None or not torch.cuda.is_available():
            return
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info()
        self.bytes = max(0, free - budget)
        if self.bytes:
            self.tensor = torch.empty(self.bytes, dtype=torch.uint8, device="cuda")
        free, total = torch.cuda.mem_get_info()
        self.base_used = total - free  # what is in use before the server starts (ballast included)
        say(
            f"emulating a {budget / GiB:.0f} GiB card: holding {self.bytes / GiB:.1f} GiB, {free / GiB:.1f} GiB free"
        )

    def release(self) -> None:
        if self.tensor is not None:
            import torch

            self.tensor = None
            torch.cuda.empty_cache()


_BALLAST = r"""
import ctypes, mmap, sys, time
n = int(sys.argv[1])
m = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | getattr(mmap, "MAP_POPULATE", 0))
for i in range(0, n, 1 << 21):
    m[i] = 1
locked = ctypes.CDLL(None).mlockall(1) == 0  # MCL_CURRENT: keep it out of swap where allowed
print("ready", "locked" if locked else "unlocked", flush=True)
sys.stdin.read()
"""


class RamLimit:
    """Gives the server `limit` bytes of RAM (see the module docstring). `prefix` wraps its command."""

    def __init__(self, limit: int | None, allow_ballast: bool = True) -> None:
        self.limit, self.prefix, self.method, self.ballast_bytes = limit, [], "none", 0
        self._cg: Path | None = None
        self._proc: subprocess.Popen | None = None
        if limit is None:
            return
        cg = self._cgroup(limit)
        if cg is not None:
            self._cg, self.method = cg, f"cgroup {cg}"
            self.prefix = ["sh", "-c", f'echo $$ > {cg}/cgroup.procs && exec "$@"', "sh"]
        elif allow_ballast:
            self._ballast(limit)
        else:
            self.method = "pin caps only (no cgroup, and no RAM ballast on a shared machine)"

    @staticmethod
    def _cgroup(limit: int) -> Path | None:
        root = Path("/sys/fs/cgroup")
        if not (root / "cgroup.controllers").is_file() or not os.access(root, os.W_OK):
            return None
        cg = root / f"flux2bench-{os.getpid()}"
        try:
            with contextlib.suppress(OSError):
                (root / "cgroup.subtree_control").write_text("+memory")
            cg.mkdir(exist_ok=True)
            (cg / "memory.max").write_text(str(limit))
            if (cg / "memory.swap.max").exists():
                (cg / "memory.swap.max").write_text("0")
            return cg
        except OSError as exc:
            say(f"no memory cgroup ({exc}); using a RAM ballast instead")
            with contextlib.suppress(OSError):
                cg.rmdir()
            return None

    def _ballast(self, limit: int) -> None:
        avail = _meminfo()["MemAvailable"]
        self.ballast_bytes = max(0, avail - limit)
        if not self.ballast_bytes:
            self.method = "none needed"
            return
        self._proc = subprocess.Popen(
            [sys.executable, "-c", _BALLAST, str(self.ballast_bytes)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        line = self._proc.stdout.readline().split()
        self.method = f"ballast {self.ballast_bytes / GiB:.1f} GiB ({line[1] if len(line) > 1 else 'failed'})"

    def release(self) -> None:
        if self._proc is not None:
            self._proc.stdin.close()
            self._proc.wait(30)
            self._proc = None
        if self._cg is not None:
            with contextlib.suppress(OSError):
                self._cg.rmdir()


def _meminfo() -> dict[str, int]:
    out = {}
    with open("/proc/meminfo") as f:
        for line in f:
            k, v = line.split(":", 1)
            out[k] = int(v.split()[0]) * 1024
    return out


def system_ram_used() -> int:
    m = _meminfo()
    return m["MemTotal"] - m["MemAvailable"]


# ---------------------------------------------------------------------------------- page cache
def drop_page_cache(files: list[Path], everything: bool = True) -> str:
    """Evicts the files from the page cache: POSIX_FADV_DONTNEED on each (no root needed for clean
    pages), and, if `everything`, the kernel's whole page cache where this process may drop it (the
    lent GPU machine is ours alone; a shared CPU machine is not)."""
    for p in files:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    if not everything:
        return "fadvise"
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("1")
        return "fadvise + drop_caches"
    except OSError:
        return "fadvise"


def disk_read_rate(path: Path, nbytes: int = 4 * GiB) -> float:
    """Sequential read rate of `path` from disk (cache dropped before and after), bytes per second."""
    drop_page_cache([path], everything=False)
    buf = bytearray(16 << 20)
    view = memoryview(buf)
    done = 0
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while done < nbytes:
            got = f.readinto(view)
            if not got:
                break
            done += got
    rate = done / (time.perf_counter() - t0)
    drop_page_cache([path], everything=False)
    return rate
