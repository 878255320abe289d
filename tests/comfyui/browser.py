"""Headless Chromium driven over the DevTools protocol (CDP), for opening pages as a person would.

Only what the venv already has: aiohttp's websocket client speaks CDP; no playwright or selenium
(their browser downloads do not work offline). Chromium is Debian's package, installed by
.ci/browser.sh; when it is missing and cannot be installed, ``ensure_chromium`` raises with the reason.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import aiohttp

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = Path(os.environ.get("FLUX2LOCAL_CHROMIUM", "/usr/bin/chromium"))
# The network here is closed: without the background-networking flags Chromium hangs on start-up
# fetches; --no-sandbox because the tests run as root.
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-dev-shm-usage",
    "--remote-debugging-address=127.0.0.1",
    "--remote-debugging-port=0",
)


class BrowserError(RuntimeError):
    """Chromium is missing, would not start, or a page command failed."""


def ensure_chromium() -> Path:
    """Returns the Chromium executable, installing it with .ci/browser.sh if it is missing."""
    if CHROMIUM.is_file() and os.access(CHROMIUM, os.X_OK):
        return CHROMIUM
    script = REPO / ".ci" / "browser.sh"
    proc = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=900)
    if proc.returncode != 0 or not CHROMIUM.is_file():
        raise BrowserError(
            f"Chromium is needed at {CHROMIUM} and {script} could not install it "
            f"(exit {proc.returncode}):\n{proc.stderr[-3000:]}\n"
            "Install it with `apt-get install -y chromium`, or set FLUX2LOCAL_CHROMIUM to a Chromium."
        )
    return CHROMIUM


class Page:
    """One headless Chromium with one tab, driven synchronously (a private asyncio loop inside).

    Use as a context manager; the browser is stopped by its PID and its profile removed on exit.
    """

    def __init__(self, width: int = 1600, height: int = 1000, start_timeout: float = 60.0):
        self.width, self.height, self.start_timeout = width, height, start_timeout
        self.profile = Path(tempfile.mkdtemp(prefix="flux2local-chromium-"))
        self.proc: subprocess.Popen | None = None
        self.loop = asyncio.new_event_loop()
        self.session: aiohttp.ClientSession | None = None
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.ids = itertools.count(1)
        self.pending: dict[int, asyncio.Future] = {}
        self.console: list[str] = []  # console errors and uncaught exceptions, for failure messages
        self.reader: asyncio.Task | None = None

    # --- life cycle -------------------------------------------------------------------------------
    def __enter__(self) -> Page:
        try:
            exe = ensure_chromium()
        except BrowserError:
            self.loop.close()
            shutil.rmtree(self.profile, ignore_errors=True)
            raise
        cmd = [
            str(exe),
            *FLAGS,
            f"--user-data-dir={self.profile}",
            f"--window-size={self.width},{self.height}",
        ]
        self.log = open(self.profile / "chromium.log", "w")  # noqa: SIM115 - lives as long as the process
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self.loop.run_until_complete(self._connect())
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        async def shut():
            if self.reader is not None:
                self.reader.cancel()
            if self.ws is not None:
                await self.ws.close()
            if self.session is not None:
                await self.session.close()

        try:
            self.loop.run_until_complete(shut())
        finally:
            self.loop.close()
            if self.proc is not None and self.proc.poll() is None:
                # Chromium's own helper processes are in its session: end the group it leads, by PID.
                os.killpg(self.proc.pid, signal.SIGTERM)
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                    self.proc.wait(timeout=10)
            self.log.close()
            shutil.rmtree(self.profile, ignore_errors=True)

    def log_tail(self, n: int = 30) -> str:
        path = self.profile / "chromium.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.exists() else ""

    async def _connect(self) -> None:
        # With --remote-debugging-port=0 Chromium picks a free port and writes it to this file.
        port_file = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + self.start_timeout
        while not (port_file.exists() and port_file.read_text().strip()):
            if self.proc.poll() is not None:
                raise BrowserError(f"Chromium exited with {self.proc.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise BrowserError(
                    f"Chromium did not start in {self.start_timeout:.0f} s:\n{self.log_tail()}"
                )
            await asyncio.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        self.session = aiohttp.ClientSession()
        async with self.session.get(f"http://127.0.0.1:{port}/json/list") as resp:
            targets = await resp.json(content_type=None)
        pages = [t for t in targets if t.get("type") == "page"]
        if not pages:
            async with self.session.put(f"http://127.0.0.1:{port}/json/new?about:blank") as resp:
                pages = [await resp.json(content_type=None)]
        self.ws = await self.session.ws_connect(pages[0]["webSocketDebuggerUrl"], max_msg_size=0)
        self.reader = self.loop.create_task(self._read())
        await self._send("Runtime.enable")
        await self._send("Page.enable")
        await self._send(
            "Emulation.setDeviceMetricsOverride",
            width=self.width,
            height=self.height,
            deviceScaleFactor=1,
            mobile=False,
        )

    async def _read(self) -> None:
        async for msg in self.ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            data = json.loads(msg.data)
            if "id" in data:
                fut = self.pending.pop(data["id"], None)
                if fut is not None and not fut.done():
                    fut.set_result(data)
            elif data.get("method") == "Runtime.exceptionThrown":
                details = data["params"]["exceptionDetails"]
                self.console.append(
                    "exception: " + details.get("exception", {}).get("description", str(details))
                )
            elif data.get("method") == "Runtime.consoleAPICalled" and data["params"]["type"] == "error":
                args = data["params"]["args"]
                self.console.append(
                    "console.error: " + " ".join(str(a.get("value", a.get("description"))) for a in args)
                )
        for fut in self.pending.values():
            if not fut.done():
                fut.set_exception(BrowserError(f"the DevTools connection closed:\n{self.log_tail()}"))

    async def _send(self, method: str, timeout: float = 60.0, **params) -> dict:
        msg_id = next(self.ids)
        fut = self.loop.create_future()
        self.pending[msg_id] = fut
        await self.ws.send_str(json.dumps({"id": msg_id, "method": method, "params": params}))
        reply = await asyncio.wait_for(fut, timeout)
        if "error" in reply:
            raise BrowserError(f"{method} failed: {reply['error']}")
        return reply["result"]

    # --- what the tests use -----------------------------------------------------------------------
    def navigate(self, url: str) -> None:
        self.loop.run_until_complete(self._send("Page.navigate", url=url))

    def evaluate(self, expression: str, timeout: float = 60.0):
        """Evaluates JavaScript in the page (awaiting a returned promise) and returns its JSON value."""
        result = self.loop.run_until_complete(
            self._send(
                "Runtime.evaluate",
                timeout=timeout,
                expression=expression,
                awaitPromise=True,
                returnByValue=True,
            )
        )
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise BrowserError(f"JavaScript failed: {text}")
        return result["result"].get("value")

    def call(self, function: str, *args, timeout: float = 60.0):
        """Calls a JavaScript function (source text) with JSON arguments; returns its JSON value."""
        return self.evaluate(f"({function})(...{json.dumps(list(args))})", timeout=timeout)

    def wait_for(self, expression: str, timeout: float = 60.0, what: str = "the page") -> None:
        """Polls a JavaScript expression until it is truthy."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.evaluate(expression, timeout=10):
                    return
            except BrowserError:
                pass  # the page may still be navigating: its context is replaced
            if time.monotonic() > deadline:
                raise BrowserError(
                    f"{what} was not ready within {timeout:.0f} s ({expression}); page errors: "
                    f"{self.console[-10:]}"
                )
            time.sleep(0.2)

    def screenshot(self, path: Path) -> Path:
        result = self.loop.run_until_complete(self._send("Page.captureScreenshot", format="png"))
        path.write_bytes(base64.b64decode(result["data"]))
        return path
