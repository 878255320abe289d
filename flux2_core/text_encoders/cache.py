"""A bounded LRU cache of prompt embeddings, shared by every loaded text encoder.

Keys combine the content identity of the encoder's files (device, inode, size, modification and
change time, and a digest of each safetensors header), the digest of the tokenizer's bytes, the
prompt and every setting that changes the output (layers, length, dtype). A file replaced or
rewritten under the same name, even with the same size and a restored modification time, gets new
entries, while re-running a graph with the same prompt costs nothing.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Hashable

import torch

logger = logging.getLogger(__name__)


def file_identity(paths: list[str | os.PathLike]) -> tuple:
    """Content identity of the files behind an encoder, one entry per file in path order.

    Each entry: (path, device, inode, size, mtime_ns, ctime_ns, SHA-256 of the 8-byte length prefix
    and the header). The change time is set by the kernel on every write and cannot be restored.
    """
    out = []
    for p in sorted(os.fspath(p) for p in paths):
        with open(p, "rb") as f:
            st = os.fstat(f.fileno())
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else 0
            digest = hashlib.sha256(head + f.read(min(n, st.st_size))).hexdigest()
        out.append((p, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, digest))
    return tuple(out)


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


def clear_caches() -> int:
    """Empty the shared embedding cache and the converted-tokenizer cache; returns entries dropped.

    For a host application's "free memory" action: nothing cached outlives it.
    """
    from .tokenizer import clear_tokenizer_cache

    n = len(EMBEDDING_CACHE)
    EMBEDDING_CACHE.clear()
    clear_tokenizer_cache()
    if n:
        logger.info("cleared %d cached prompt embeddings", n)
    return n
