"""The name -> header-entry mapping that both checkpoint file readers (safetensors, GGUF) expose."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Generic, TypeVar

from ..errors import CheckpointError

Info = TypeVar("Info")


class TensorIndex(Generic[Info]):
    """Mixin: ``keys`` / ``in`` / iteration / ``len`` / ``info`` over ``self._infos`` (file order).

    The reader sets ``self.path`` and ``self._infos`` (tensor name -> its header entry).
    """

    path: Path
    _infos: dict[str, Info]

    def keys(self) -> list[str]:
        """Tensor names, in file order."""
        return list(self._infos)

    def __contains__(self, key: object) -> bool:
        return key in self._infos

    def __iter__(self) -> Iterator[str]:
        return iter(self._infos)

    def __len__(self) -> int:
        return len(self._infos)

    def info(self, key: str) -> Info:
        """The header entry of ``key``; a clear error naming the file when there is none."""
        try:
            return self._infos[key]
        except KeyError:
            raise CheckpointError(self.path, f"has no tensor named '{key}'.") from None
