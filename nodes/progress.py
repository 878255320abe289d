"""Progress on the node that is working, for the long waits before sampling starts.

Loading a model, pinning its streamed blocks and running the text encoder can take tens of seconds on
a small card; without feedback they look like a hang. Each reports the way ComfyUI's samplers do: its
progress bar on the executing node (``comfy.utils.ProgressBar``, which also carries the user's Cancel),
plus a text line on the node ("FLUX.2 dev: pinning 41.0 of 53.0 GiB") through the server's
``send_progress_text`` where this ComfyUI has it. Every update first checks ComfyUI's interrupt flag,
so Cancel stops a load, an attach or an encode where it is.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import comfy.model_management as mm
import comfy.utils
from torch import nn

log = logging.getLogger(__name__)

MIB = 1024**2
GIB = 1024**3
# Text lines are sent at most this often (plus the first and the last): the websocket is shared.
TEXT_INTERVAL_S = 0.25


def executing_node_id() -> str | None:
    """The id of the node ComfyUI is executing on this thread, or None (older ComfyUI, outside a run)."""
    try:
        from comfy_execution.utils import get_executing_context
    except ImportError:
        return None
    ctx = get_executing_context()
    return None if ctx is None else ctx.node_id


def send_text(text: str, node_id: str | None) -> None:
    """Shows ``text`` on the node (ComfyUI's progress text); a no-op where the server lacks it."""
    if node_id is None:
        return
    try:
        from server import PromptServer
    except ImportError:
        return
    server = getattr(PromptServer, "instance", None)
    send = getattr(server, "send_progress_text", None)
    if send is None:
        return
    try:
        send(text, node_id, getattr(server, "client_id", None))
    except Exception:  # feedback must never fail a run
        log.debug("Flux2Local: could not send progress text", exc_info=True)


def format_bytes(done: int, total: int) -> str:
    """ "41.0 of 53.0 GiB" (MiB below 1 GiB, so small models show movement too)."""
    unit, name = (GIB, "GiB") if total >= GIB else (MIB, "MiB")
    return f"{done / unit:.1f} of {total / unit:.1f} {name}"


class NodeProgress:
    """The executing node's progress bar and text line.

    Args:
        total: the bar's maximum (any unit: steps, layers, MiB).
        node_id: the node to report on; default the one executing now.
    """

    def __init__(self, total: int, node_id: str | None = None):
        self.node_id = node_id if node_id is not None else executing_node_id()
        try:
            self.bar = comfy.utils.ProgressBar(max(1, int(total)), node_id=self.node_id)
        except TypeError:  # ComfyUI versions whose ProgressBar takes no node id
            self.bar = comfy.utils.ProgressBar(max(1, int(total)))
        self._last_text = 0.0

    def update(self, value: int, total: int | None = None, text: str | None = None) -> None:
        """Moves the bar to ``value`` (of ``total``) and shows ``text``; raises on a user's cancel."""
        mm.throw_exception_if_processing_interrupted()
        total = self.bar.total if total is None else max(1, int(total))
        self.bar.update_absolute(min(int(value), total), total)
        now = time.monotonic()
        if text and (value >= total or self._last_text == 0.0 or now - self._last_text >= TEXT_INTERVAL_S):
            self._last_text = now
            send_text(text, self.node_id)


def attach_progress(label: str) -> Callable[[object], None]:
    """A ``WeightStreamer.attach(progress=...)`` callback showing bytes placed and pinned on the node.

    Args:
        label: what is being attached, e.g. "FLUX.2 dev" (starts the text line).
    """
    progress: NodeProgress | None = None

    def report(p) -> None:  # p: weight_streaming.AttachProgress (stage, done, total bytes)
        nonlocal progress
        if progress is None:
            progress = NodeProgress(max(1, p.total // MIB))
        if p.stage == "done":
            text = f"{label}: ready ({format_bytes(p.done, p.total)} placed and pinned)"
            if p.total == 0:
                text = f"{label}: ready (pinned buffers kept from before)"
            progress.update(max(1, p.total // MIB), max(1, p.total // MIB), text)
            return
        progress.update(
            p.done // MIB, max(1, p.total // MIB), f"{label}: {p.stage} {format_bytes(p.done, p.total)}"
        )

    return report


class ByteProgress:
    """A ``track_files(on_read=...)`` callback: bytes of ``label``'s files read so far, on the node.

    Args:
        label: the file's name.
        total: bytes expected (the files' sizes); the bar is in MiB.
    """

    def __init__(self, label: str, total: int):
        self.label, self.total, self.done = label, max(1, int(total)), 0
        self.progress = NodeProgress(max(1, self.total // MIB))

    def __call__(self, nbytes: int) -> None:
        self.done = min(self.total, self.done + int(nbytes))
        self.progress.update(
            self.done // MIB, None, f"loading {self.label}: {format_bytes(self.done, self.total)}"
        )

    def finish(self) -> None:
        self.done = self.total
        self.progress.update(
            self.total // MIB, None, f"loaded {self.label} ({format_bytes(self.total, self.total)})"
        )


class BlockProgress(NodeProgress):
    """A node's bar moved by one before every block of a model runs; ``count`` is the calls so far."""

    def __init__(self, total: int, text: Callable[[int], str]):
        super().__init__(total)
        self.count, self.text = 0, text

    def before_block(self, _module, _args) -> None:
        self.count += 1
        self.update(self.count, None, self.text(self.count))


@contextmanager
def block_progress(module: nn.Module, total: int, text: Callable[[int], str]) -> Iterator[BlockProgress]:
    """Moves the node's bar by one before every block of ``module`` runs (its ``streamable_blocks``).

    Args:
        module: a model naming its block lists in ``streamable_blocks`` (e.g. the text encoder's layers).
        total: block calls expected in the whole wait (the bar's maximum).
        text: the text line for the n-th block call (1-based).

    Yields:
        The progress (``count`` may be set; ``update(total)`` finishes the bar when fewer blocks ran,
        e.g. for cached prompts).
    """
    progress = BlockProgress(total, text)
    handles = [
        block.register_forward_pre_hook(progress.before_block)
        for path in getattr(module, "streamable_blocks", ())
        for block in module.get_submodule(path)
    ]
    try:
        yield progress
    finally:
        for h in handles:
            h.remove()
