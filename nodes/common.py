"""Small helpers shared by the nodes: model-file lists, dtype names and error reporting."""

from __future__ import annotations

import functools
import hashlib
import inspect
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import folder_paths
import torch
from comfy_api.latest import io

from ..flux2_core.checkpoint import FileSet, path_identity, track_files
from ..flux2_core.errors import CheckpointError, Flux2Error, InputError
from ..flux2_core.sampling import check_latents
from ..weight_streaming.errors import StreamingError

# User-facing errors of the two libraries (weight_streaming never imports flux2_core).
USER_ERRORS = (Flux2Error, StreamingError)

log = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _takes(name: str) -> bool:
    return name in inspect.signature(io.Int.Input.__init__).parameters


# Expert settings are V3 "advanced" inputs: the editor hides them until "Show Advanced" (the pack's
# web extension wires that up where the frontend does not yet). ComfyUI 0.3.64's V3 inputs have no
# such argument; there they are ordinary widgets.
ADVANCED = {"advanced": True} if _takes("advanced") else {}


def auto_zero(kind: str) -> dict:
    """Input options for a number widget whose 0 means "auto"; the editor then shows "auto".

    Args:
        kind: what auto picks, for the editor's label once the model is known: "steps" (the variant's
            default steps), "guidance" (its default scale) or "memory" (chosen when the model loads).
    """
    return {"extra_dict": {"flux2local_auto": kind}} if _takes("extra_dict") else {}


class Flux2LocalError(Exception):
    """What ComfyUI's error panel shows for our user-facing errors: the message, no inner chain."""


# The panel prints the exception's module-qualified type; the pack's module path depends on the
# folder name ComfyUI loaded it from, so give the type a stable, readable name.
Flux2LocalError.__module__ = "Flux2Local"


def user_errors(fn):
    """Turns the libraries' user-facing errors into a clean message for ComfyUI's error panel."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as e:
            log.error("Flux2Local: %s", e)
            raise Flux2LocalError(str(e)) from None

    return wrapper


def model_choices(folder: str) -> list[str]:
    """Files ComfyUI lists in a model folder, ``.gguf`` files, and diffusers/HF folders.

    ComfyUI's own lists leave ``.gguf`` out (it has no GGUF loader), so they are added here. A folder
    entry is any directory (up to two levels below the model folder) that holds ``*.safetensors``
    files, e.g. ``FLUX.2-dev/transformer``.
    """
    names = list(folder_paths.get_filename_list(folder))
    for root in folder_paths.get_folder_paths(folder):
        if not os.path.isdir(root):
            continue
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            rel = os.path.relpath(dirpath, root)
            depth = 0 if rel == "." else rel.count(os.sep) + 1
            if depth >= 2:
                dirnames[:] = []
            if depth >= 1 and any(f.endswith(".safetensors") for f in filenames):
                names.append(rel.replace(os.sep, "/") + "/")
            names += [
                (f if rel == "." else os.path.join(rel, f)).replace(os.sep, "/")
                for f in filenames
                if f.lower().endswith(".gguf")
            ]
    return sorted(set(names))


def resolve_model_path(folder: str, name: str) -> str:
    """The full path of a file or folder entry from ``model_choices``; CheckpointError if missing."""
    if name.endswith("/"):
        for root in folder_paths.get_folder_paths(folder):
            candidate = os.path.join(root, name.rstrip("/"))
            if os.path.isdir(candidate):
                return candidate
        path = None
    else:
        path = folder_paths.get_full_path(folder, name)
    if path is None:
        raise CheckpointError(
            name,
            f"not found in ComfyUI's models/{folder} folder.",
            f"put the file in models/{folder}/ (see the workflow's note for where to get it) and refresh the node list.",
        )
    return path


def tokenizer_choices(folder: str = "text_encoders") -> list[str]:
    """ "auto" plus folders under ``models/<folder>`` that hold a Hugging Face tokenizer."""
    names = ["auto"]
    for root in folder_paths.get_folder_paths(folder):
        if not os.path.isdir(root):
            continue
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            rel = os.path.relpath(dirpath, root)
            if rel != "." and rel.count(os.sep) >= 2:
                dirnames[:] = []
            if rel != "." and ("tokenizer.json" in filenames or "tokenizer_config.json" in filenames):
                names.append(rel.replace(os.sep, "/") + "/")
    return names


def memory_mapping_disabled() -> bool:
    """ComfyUI's ``--disable-mmap``: read weights into memory we own instead of mapping the files."""
    from comfy.cli_args import args

    return bool(getattr(args, "disable_mmap", False))


@contextmanager
def loading(on_read: Callable[[int], object] | None = None) -> Iterator[FileSet]:
    """Wraps a model load: records the files it opens (for change checks) and honours --disable-mmap.

    Args:
        on_read: called with the bytes of every tensor the load reads (a progress bar).
    """
    with track_files(mmap=not memory_mapping_disabled(), on_read=on_read) as files:
        yield files


def fingerprint(*paths: str | os.PathLike | None) -> str:
    """A loader's change-detection value (ComfyUI's ``fingerprint_inputs``): stat of every file behind
    ``paths``, so a file replaced, truncated or rewritten in place makes ComfyUI run the loader again.
    """
    ident = tuple(path_identity(p) if p is not None else None for p in paths)
    return hashlib.sha256(repr(ident).encode()).hexdigest()


def model_path_or_none(folder: str, name: str) -> str | None:
    """``resolve_model_path`` without raising (for fingerprints: the loader itself reports it)."""
    try:
        return resolve_model_path(folder, name)
    except CheckpointError:
        return None


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def expect(where: str, name: str, value: object, kind: type | tuple[type, ...], source: str) -> None:
    """Refuse a socket input that holds something else than a connection from ``source``.

    ComfyUI passes a literal typed into an API prompt (``"model": 5``) to the node as it is.
    """
    if not isinstance(value, kind):
        raise InputError(
            f"{where}: the '{name}' input must be connected to {source}; it holds {_shown(value)} instead."
        )


def latent_samples(where: str, name: str, latent: object) -> torch.Tensor:
    """The ``samples`` tensor of a FLUX.2 LATENT input, validated (B, 128, H/16, W/16)."""
    if not isinstance(latent, dict) or not isinstance(latent.get("samples"), torch.Tensor):
        raise InputError(
            f"{where}: the '{name}' input must be connected to a LATENT output (e.g. FLUX.2 VAE Encode); it "
            f"holds {_shown(latent)} instead."
        )
    check_latents(latent["samples"], where)
    return latent["samples"]


def image_batch(where: str, name: str, image: object) -> torch.Tensor:
    """A ComfyUI IMAGE input (B, H, W, C), validated."""
    expect(where, name, image, torch.Tensor, "an IMAGE output (e.g. Load Image)")
    if image.ndim != 4:
        raise InputError(
            f"{where}: the '{name}' IMAGE has shape {tuple(image.shape)}; expected (B, H, W, C)."
        )
    return image
