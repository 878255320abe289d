"""A bounded LRU cache of prompt embeddings, shared by every loaded text encoder.

Keys combine the encoder file identity (path, total size, newest mtime), the tokenizer, the prompt
and every setting that changes the output (layers, length, dtype), so editing or replacing a file
invalidates its entries while re-running a graph with the same prompt costs nothing.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Hashable

import torch

logger = logging.getLogger(__name__)


def file_identity(paths: list[str | os.PathLike]) -> tuple:
    """(paths, total size, newest mtime_ns) of the files behind an encoder."""
    sizes, mtimes = 0, 0
    for p in paths:
        st = os.stat(p)
        sizes += st.st_size
        mtimes = max(mtimes, st.st_mtime_ns)
    return (tuple(sorted(os.fspath(p) for p in paths)), sizes, mtimes)


class EmbeddingCache:
    """LRU of (L, D) CPU tensors, bounded by entry count and total bytes.

    Args:
        max_entries: most prompts kept.
        max_bytes: most tensor bytes kept (one [dev] prompt in bf16 is 512 x 15360 x 2 = 15.7 MB).
    """

    def __init__(self, max_entries: int = 64, max_bytes: int = 1 << 30):
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._items: OrderedDict[Hashable, torch.Tensor] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable) -> torch.Tensor | None:
        with self._lock:
            value = self._items.get(key)
            if value is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key: Hashable, value: torch.Tensor) -> None:
        value = value.detach().to("cpu", copy=True)
        size = value.numel() * value.element_size()
        if size > self.max_bytes or self.max_entries <= 0:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old.numel() * old.element_size()
            self._items[key] = value
            self._bytes += size
            while len(self._items) > self.max_entries or self._bytes > self.max_bytes:
                _, dropped = self._items.popitem(last=False)
                self._bytes -= dropped.numel() * dropped.element_size()

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0

    def __len__(self) -> int:
        return len(self._items)


EMBEDDING_CACHE = EmbeddingCache()
