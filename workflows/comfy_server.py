"""A real ComfyUI server for tests and the main job: start, talk to it over HTTP, stop it by PID.

Used by workflows/run_workflow.py (the main job) and tests/comfyui (one server per test session).
Only the standard library: the server runs in its own process from the pinned tree at
``$COMFYUI_PATH``; we never import ComfyUI here.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parents[1]
MODEL_FOLDERS = ("diffusion_models", "unet", "text_encoders", "vae", "checkpoints", "loras")
NODE_IDS = (
    "Flux2LocalModelLoader",
    "Flux2LocalLoRALoader",
    "Flux2LocalTextEncoderLoader",
    "Flux2LocalEncodePrompt",
    "Flux2LocalMultiReference",
    "Flux2LocalSampler",
    "Flux2LocalVAELoader",
    "Flux2LocalVAEDecode",
    "Flux2LocalVAEEncode",
    "Flux2LocalContentFilter",
    "Flux2LocalSaveImage",
    "Flux2LocalCheckProvenance",
    "Flux2LocalToNativeModel",
)


class ComfyUIMissing(RuntimeError):
    """No ComfyUI tree where COMFYUI_PATH points."""


def comfyui_path() -> Path:
    """Returns the ComfyUI tree to run, or raises ComfyUIMissing saying how to get one."""
    path = Path(os.environ.get("COMFYUI_PATH") or Path.home() / "ComfyUI")
    if not (path / "main.py").is_file() or not (path / "comfy").is_dir():
        raise ComfyUIMissing(
            f"no ComfyUI tree at COMFYUI_PATH={path}. These tests run a real ComfyUI server (pinned "
            "upstream commit fe2511468d6b, v0.12.1+1): extract it there as DEVELOPERS.md ('Set-up') "
            "says, or point COMFYUI_PATH at a ComfyUI checkout."
        )
    return path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_base_directory(base: Path, pack_folder_name: str = "flux2local-under-test") -> Path:
    """Creates ComfyUI's per-instance folders under ``base`` and links this pack into custom_nodes.

    The pack is linked under an arbitrary folder name so that only relative imports can work.
    Returns the models folder.
    """
    for sub in ("custom_nodes", "input", "output", "temp", "user"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    for sub in MODEL_FOLDERS:
        (base / "models" / sub).mkdir(parents=True, exist_ok=True)
    link = base / "custom_nodes" / pack_folder_name
    if not link.exists():
        link.symlink_to(PACK_ROOT, target_is_directory=True)
    return base / "models"


@dataclass
class ComfyServer:
    """One headless ComfyUI process on 127.0.0.1 with its own --base-directory."""

    base: Path
    tree: Path | None = None  # the ComfyUI tree to run; default $COMFYUI_PATH
    port: int = 0
    extra_args: list[str] = field(default_factory=list)
    proc: subprocess.Popen | None = None
    log_path: Path | None = None
    client_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 120.0) -> ComfyServer:
        tree = self.tree or comfyui_path()
        self.port = self.port or free_port()
        self.log_path = self.base / "comfyui.log"
        cmd = [
            sys.executable,
            "main.py",
            "--cpu",
            "--listen",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--base-directory",
            str(self.base),
            "--database-url",
            f"sqlite:///{self.base / 'user' / 'comfyui.db'}",
            "--disable-api-nodes",
            "--disable-auto-launch",
            "--preview-method",
            "latent2rgb",
            *self.extra_args,
        ]
        env = dict(os.environ, PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="")
        log = open(self.log_path, "w")  # noqa: SIM115 - kept open for the process's lifetime
        self.proc = subprocess.Popen(cmd, cwd=tree, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"ComfyUI exited with {self.proc.returncode} while starting:\n{self.log_tail()}"
                )
            try:
                self.get_json("/system_stats", timeout=2)
                return self
            except (OSError, urllib.error.URLError):
                time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"ComfyUI did not answer within {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        """Stops the server by its PID (SIGTERM, then SIGKILL after 10 s)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        os.kill(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, n: int = 60) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    # --- HTTP -------------------------------------------------------------------------------------
    def _request(self, path: str, data: dict | None = None, timeout: float = 30) -> bytes:
        body = None if data is None else json.dumps(data).encode()
        req = urllib.request.Request(self.url + path, data=body, method="GET" if body is None else "POST")
        if body is not None:
            req.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.read()

    def get_json(self, path: str, timeout: float = 30):
        return json.loads(self._request(path, timeout=timeout))

    def post_json(self, path: str, data: dict, timeout: float = 30) -> tuple[int, dict]:
        """POSTs JSON; returns (HTTP status, decoded body), 4xx answers included."""
        try:
            raw = self._request(path, data, timeout)
            return 200, (json.loads(raw) if raw.strip() else {})
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                return e.code, json.loads(raw)
            except json.JSONDecodeError:
                return e.code, {"raw": raw.decode(errors="replace")}

    def queue_prompt(self, prompt: dict) -> tuple[int, dict]:
        return self.post_json("/prompt", {"prompt": prompt, "client_id": self.client_id})

    def wait_history(self, prompt_id: str, timeout: float = 180.0) -> dict:
        """Polls /history until the prompt has finished (success, error or interruption)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            hist = self.get_json(f"/history/{prompt_id}")
            entry = hist.get(prompt_id)
            # ComfyUI writes the history entry only once the prompt has finished, whatever the outcome.
            if entry and "status" in entry:
                return entry
            if not self.alive():
                raise RuntimeError(f"ComfyUI died while running {prompt_id}:\n{self.log_tail()}")
            time.sleep(0.1)
        raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout:.0f} s:\n{self.log_tail()}")

    def run(self, prompt: dict, timeout: float = 180.0) -> dict:
        """Queues a prompt and waits for its history entry; fails if the server rejects it."""
        status, body = self.queue_prompt(prompt)
        if status != 200:
            raise AssertionError(f"/prompt answered {status}: {json.dumps(body, indent=1)[:4000]}")
        return self.wait_history(body["prompt_id"], timeout)

    def view(self, image: dict) -> bytes:
        query = urllib.parse.urlencode(
            {
                "filename": image["filename"],
                "subfolder": image.get("subfolder", ""),
                "type": image.get("type", "output"),
            }
        )
        return self._request(f"/view?{query}")

    def interrupt(self) -> None:
        self.post_json("/interrupt", {})

    def free(self) -> None:
        """What the UI's "Free model and node cache" button sends."""
        self.post_json("/free", {"unload_models": True, "free_memory": True})


def history_error(entry: dict) -> dict | None:
    """Returns the execution_error message data of a history entry, if any."""
    for kind, data in (entry.get("status") or {}).get("messages", []):
        if kind == "execution_error":
            return data
    return None


def history_images(entry: dict) -> list[dict]:
    return [img for out in entry.get("outputs", {}).values() for img in out.get("images", [])]
