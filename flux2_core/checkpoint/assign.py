"""Strict matching of a checkpoint's tensors to a model, with one error format for every loader.

A loader maps the file's keys to the model's names, then calls ``check_tensors`` with the shapes
the model expects and the (logical, dequantized) shapes the file provides. Any difference is one
``CheckpointError`` listing, sorted, the missing keys, the unexpected keys and the tensors of the
wrong shape, so a user can see at once whether the file is incomplete, extra, or another model.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from ..errors import CheckpointError

LIST_LIMIT = 8  # names shown per list; the count says how many there are


def _fmt(names: list[str]) -> str:
    more = f" (+{len(names) - LIST_LIMIT} more)" if len(names) > LIST_LIMIT else ""
    return ", ".join(names[:LIST_LIMIT]) + more


def mismatch_report(
    expected: Mapping[str, tuple[int, ...]],
    provided: Mapping[str, tuple[int, ...]],
    unexpected: Iterable[str] = (),
) -> str | None:
    """The sorted missing / unexpected / wrong-shape lists as one sentence, or None when all match.

    Args:
        expected: model name -> shape it needs.
        provided: model name -> shape the file has (dequantized shapes for quantized tensors).
        unexpected: further file keys that map to nothing.
    """
    missing = sorted(set(expected) - set(provided))
    extra = sorted((set(provided) - set(expected)) | set(unexpected))
    bad = sorted(
        f"{k} {tuple(provided[k])} (expected {tuple(expected[k])})"
        for k in set(provided) & set(expected)
        if tuple(provided[k]) != tuple(expected[k])
    )
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s): {_fmt(missing)}")
    if extra:
        parts.append(f"{len(extra)} unexpected key(s): {_fmt(extra)}")
    if bad:
        parts.append(f"{len(bad)} tensor(s) with the wrong shape: {_fmt(bad)}")
    return "; ".join(parts) if parts else None


def check_tensors(
    path,
    what: str,
    expected: Mapping[str, tuple[int, ...]],
    provided: Mapping[str, tuple[int, ...]],
    unexpected: Iterable[str] = (),
    fix: str = "The file is incomplete, damaged or not this model; download it again or pick the right one.",
) -> None:
    """Raise one CheckpointError when the file's tensors do not match the model exactly.

    Args:
        path: the file or folder (for the message).
        what: the model, e.g. "a FLUX.2 klein-4b transformer".
        expected, provided, unexpected: see ``mismatch_report``.
        fix: how to fix it.
    """
    report = mismatch_report(expected, provided, unexpected)
    if report is not None:
        raise CheckpointError(path, f"does not match {what}: {report}.", fix)


def assign_state(module: nn.Module, state: dict[str, torch.Tensor], path, what: str) -> None:
    """``load_state_dict(strict=True, assign=True)``; a mismatch left over is reported like above."""
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    check_tensors(path, what, expected, {k: tuple(v.shape) for k, v in state.items()})
    module.load_state_dict(state, strict=True, assign=True)
