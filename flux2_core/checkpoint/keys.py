"""Key-name helpers shared by every loader: prefix stripping and counting numbered blocks."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

# Prefixes ComfyUI and merged checkpoints put in front of a diffusion transformer's keys.
TRANSFORMER_PREFIXES = ("model.diffusion_model.", "diffusion_model.")


def strip_prefix(
    keys: Iterable[str], prefixes: Sequence[str] = TRANSFORMER_PREFIXES
) -> tuple[str, list[str]]:
    """The first of ``prefixes`` that some key starts with, and the keys carrying it, without it.

    Returns:
        (prefix, stripped keys); ("", all keys) when no key has any of the prefixes.
    """
    keys = list(keys)
    for p in prefixes:
        if any(k.startswith(p) for k in keys):
            return p, [k[len(p) :] for k in keys if k.startswith(p)]
    return "", keys


def block_indices(keys: Iterable[str], prefix: str) -> set[int]:
    """The numbers N of keys that start with ``<prefix>N.`` (e.g. prefix "double_blocks.")."""
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    return {int(m.group(1)) for k in keys if (m := pat.match(k))}


def count_blocks(keys: Iterable[str], prefix: str, require_contiguous: bool = False) -> int:
    """How many numbered blocks ``<prefix>0.`` ... exist: highest index + 1 (0 when none).

    Args:
        keys: key names.
        prefix: the text before the index, e.g. "single_blocks." or "model.layers.".
        require_contiguous: raise ValueError naming the missing indices when there are gaps.
    """
    found = block_indices(keys, prefix)
    if not found:
        return 0
    n = max(found) + 1
    if require_contiguous and len(found) != n:
        missing = sorted(set(range(n)) - found)[:5]
        raise ValueError(f"{prefix.rstrip('.')} {missing} are missing")
    return n
