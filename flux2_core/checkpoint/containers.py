"""Opening any supported container behind one reader interface: GGUF files, safetensors files and
diffusers / Hugging Face folders (``keys``, ``shape``, ``dtype``, ``get``, ``read_into``, ``files``).

The container is chosen through a table of (test, opener), never by file name alone: a GGUF is
recognised by its magic bytes too, so a renamed file still opens with the right reader.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from .gguf_file import GGUFFile, is_gguf
from .reader import open_checkpoint

CONTAINERS: tuple[tuple[str, Callable[[Path], bool], Callable[[Path, str | None], object]], ...] = (
    (
        "gguf",
        lambda p: p.is_file() and (p.suffix.lower() == ".gguf" or is_gguf(p)),
        lambda p, _s: GGUFFile(p),
    ),
    ("safetensors", lambda p: True, lambda p, s: open_checkpoint(p, subfolder=s)),
)


def container_kind(path: str | os.PathLike) -> str:
    """ "gguf" or "safetensors" (files and folders)."""
    p = Path(path)
    return next(name for name, test, _ in CONTAINERS if test(p))


def open_model(path: str | os.PathLike, subfolder: str | None = None):
    """A reader over ``path``: ``GGUFFile`` for GGUF, else ``CheckpointReader`` (safetensors only).

    Args:
        path: a ``.gguf`` or ``.safetensors`` file, or a diffusers / Hugging Face folder.
        subfolder: component folder of a pipeline folder ("transformer", "text_encoder", "vae").

    Raises:
        CheckpointError: missing path, pickle formats, damaged or truncated files.
    """
    p = Path(path)
    for _name, test, opener in CONTAINERS:
        if test(p):
            return opener(p, subfolder)
    raise AssertionError("the last container accepts everything")


def is_gguf_reader(reader) -> bool:
    return isinstance(reader, GGUFFile)
