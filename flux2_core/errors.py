"""User-facing errors of flux2_core.

Every message says what went wrong, which file or input it concerns, and how to fix it, so the
ComfyUI nodes can show it as is instead of a stack trace.
"""

from __future__ import annotations

import os


class Flux2Error(Exception):
    """Base class of every error meant to be shown to a user."""


class CheckpointError(Flux2Error, ValueError):
    """A model file or folder that cannot be used: wrong model, corrupt, missing or mismatched keys."""

    def __init__(self, path: str | os.PathLike | None, problem: str, fix: str | None = None):
        self.path = None if path is None else os.fspath(path)
        self.problem = problem
        self.fix = fix
        where = f"{self.path}: " if self.path else ""
        message = f"{where}{problem}"
        if fix:
            message += f" Fix: {fix}"
        super().__init__(message)


class InputError(Flux2Error, ValueError):
    """An invalid setting or input: size, reference count, prompt type and the like."""


class GenerationCancelled(Flux2Error):
    """Raised when a progress callback asks to stop a generation."""
