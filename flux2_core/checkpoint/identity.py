"""Which file a loaded model came from, and whether that file is still the same one.

A model loaded in its stored dtype is a view of the memory-mapped file: if the file is truncated
while the model is loaded (re-downloading over the same name with ``cp``, ``curl -o`` or
``wget -O`` does that), touching the weights kills the process with SIGBUS; if other bytes are
written over it, the weights change silently. So every file is identified when it is opened by
what ``stat`` reports without reading it (device, inode, size, modification and change times;
the change time cannot be set back by a user) and checked again before a loaded model is used.

``track_files()`` records every model file (safetensors or GGUF) opened inside it, so a caller learns
which files a loader read (every shard of a folder included) without the loader having to report
them; its ``on_read`` callback hears of every tensor read, for a loading progress bar.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from ..errors import CheckpointError

# Suffixes of the files a model folder's contents are judged by (weights, indexes, configs, tokenizers).
_FOLDER_SUFFIXES = (".safetensors", ".json", ".txt", ".model")
_FOLDER_DEPTH = 3  # pipeline root / component / tokenizer subfolder


@dataclass(frozen=True)
class FileIdentity:
    """What ``stat`` says about one file: the same values mean the same, unchanged file.

    Attributes:
        dev: device of the file system.
        ino: inode number (a file replaced with ``os.replace`` or re-created has a new one).
        size: bytes.
        mtime_ns: last modification (can be set back with ``touch``/``os.utime``).
        ctime_ns: last change of data or metadata (set by the kernel, cannot be set back).
    """

    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def from_stat(cls, st: os.stat_result) -> FileIdentity:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    @classmethod
    def of(cls, path: str | os.PathLike) -> FileIdentity | None:
        """The identity of ``path`` now (following links), or None when it is gone."""
        try:
            return cls.from_stat(os.stat(path))
        except OSError:
            return None

    def change_to(self, now: FileIdentity | None) -> str | None:
        """How the file changed from this identity to ``now`` (None: it did not)."""
        if now == self:
            return None
        if now is None:
            return "was deleted or moved away"
        if (now.dev, now.ino) != (self.dev, self.ino):
            return "was replaced by another file"
        if now.size < self.size:
            return f"was truncated from {self.size} to {now.size} bytes"
        if now.size != self.size:
            return f"changed size from {self.size} to {now.size} bytes"
        return "was rewritten in place"


class _Identified(Protocol):
    path: str
    identity: FileIdentity


@dataclass
class FileSet:
    """Files one load read, each with its identity when it was opened.

    Attributes:
        files: the opened files (``SafetensorsFile`` and ``GGUFFile`` objects), in opening order.
    """

    files: list[_Identified] = field(default_factory=list)

    @property
    def paths(self) -> list[str]:
        return [f.path for f in self.files]

    def changes(self) -> list[tuple[str, str]]:
        """(path, how it changed) for every file that is no longer the one that was opened."""
        out = []
        for f in self.files:
            change = f.identity.change_to(FileIdentity.of(f.path))
            if change is not None:
                out.append((f.path, change))
        return out

    def check_unchanged(self, fix: str | None = None) -> None:
        """Raise a ``CheckpointError`` naming the first file that changed since it was opened.

        Args:
            fix: what the user should do; by default, load the model again.
        """
        changed = self.changes()
        if changed:
            path, change = changed[0]
            more = f" ({len(changed) - 1} more of its files changed too)" if len(changed) > 1 else ""
            raise CheckpointError(
                path,
                f"{change} after the model was loaded from it{more}; the loaded weights cannot be used "
                "any more.",
                fix or "Load the model again.",
            )


_TRACKING: ContextVar[list | None] = ContextVar("flux2_checkpoint_tracking", default=None)
_MEMORY_MAP: ContextVar[bool] = ContextVar("flux2_checkpoint_memory_map", default=True)
_ON_READ: ContextVar[Callable[[int], object] | None] = ContextVar("flux2_checkpoint_on_read", default=None)


@contextmanager
def track_files(mmap: bool = True, on_read: Callable[[int], object] | None = None) -> Iterator[FileSet]:
    """Record every model file opened inside the block; choose whether they are memory-mapped.

    Args:
        mmap: False reads every tensor into memory the process owns instead of viewing a mapped
            file (slower to load and not shared with the page cache, but a file changed on disk can
            never crash the process). Files keep the choice made when they were opened.
        on_read: called with the stored bytes of each tensor read inside the block (on the reading
            thread), e.g. to move a progress bar; an exception it raises (a user's cancel) stops the
            load there.

    Yields:
        The ``FileSet`` that fills as files are opened.
    """
    opened: list = []
    token = _TRACKING.set(opened)
    mmap_token = _MEMORY_MAP.set(bool(mmap))
    read_token = _ON_READ.set(on_read)
    try:
        yield FileSet(opened)
    finally:
        _ON_READ.reset(read_token)
        _MEMORY_MAP.reset(mmap_token)
        _TRACKING.reset(token)


def record_read(nbytes: int) -> None:
    """Called by each file reader per tensor read: tells the innermost ``track_files`` block."""
    callback = _ON_READ.get()
    if callback is not None:
        callback(nbytes)


def memory_map_default() -> bool:
    """Whether files opened now are memory-mapped (see ``track_files``)."""
    return _MEMORY_MAP.get()


def record_opened(file: _Identified) -> None:
    """Called by each file reader as it opens: adds it to the innermost ``track_files`` block."""
    opened = _TRACKING.get()
    if opened is not None:
        opened.append(file)


def path_identity(path: str | os.PathLike) -> tuple:
    """A hashable identity of a model file or folder, from ``stat`` alone (cheap, reads nothing).

    For a folder: every weight, index, config and tokenizer file up to three levels below it
    (a diffusers pipeline root, its component folders and their tokenizer folders).

    Returns:
        A tuple that differs whenever a file behind ``path`` is replaced, truncated, rewritten,
        added or removed.
    """
    root = Path(path)
    if not root.is_dir():
        return ((str(root), FileIdentity.of(root)),)
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        depth = len(Path(dirpath).relative_to(root).parts)
        if depth >= _FOLDER_DEPTH:
            dirnames[:] = []
        dirnames.sort()
        for name in sorted(filenames):
            if name.endswith(_FOLDER_SUFFIXES):
                p = os.path.join(dirpath, name)
                found.append((p, FileIdentity.of(p)))
    return tuple(found)
