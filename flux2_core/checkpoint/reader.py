"""One mapping-like reader over a single safetensors file or a (sharded) diffusers folder.

Only safetensors is ever read: pickle-based formats (``.bin``, ``.pt``, ``.pth``, ``.ckpt``) can run
arbitrary code when loaded, so they are refused with a ``CheckpointError``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import torch

from ..errors import CheckpointError
from .safetensors_file import SafetensorsFile

logger = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_PICKLE_FIX = "Use the .safetensors version of this model (pickle files can run code and are never loaded)."


def _refuse_pickle(path: Path) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise CheckpointError(
            path, f"'{path.suffix}' is a pickle-based PyTorch format, which is not supported.", _PICKLE_FIX
        )
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return  # SafetensorsFile reports unreadable files with its own message
    if head[8:9] == b"{":
        return  # a safetensors JSON header starts right after the 8-byte length
    # torch.save writes a zip archive or a raw pickle (protocol byte 0x80, protocol 2..5).
    if head[:4] == b"PK\x03\x04" or (
        head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")
    ):
        raise CheckpointError(path, "is a pickled PyTorch checkpoint renamed to safetensors.", _PICKLE_FIX)


class CheckpointReader:
    """Tensors of one or more safetensors files behind one name -> tensor mapping.

    Has the methods of ``SafetensorsFile`` (``keys``, ``shape``, ``dtype``, ``nbytes``, ``get``,
    ``read_into``) plus ``path_of(key)``. ``metadata`` merges the files' header metadata.
    """

    def __init__(self, path: str | os.PathLike, files: list[SafetensorsFile], key_to_file: dict[str, int]):
        self.path = os.fspath(path)
        self.files = files
        self._key_to_file = key_to_file
        self.metadata: dict[str, str] = {}
        for f in files:
            self.metadata.update(f.metadata)

    def keys(self) -> list[str]:
        return list(self._key_to_file)

    def __contains__(self, key: object) -> bool:
        return key in self._key_to_file

    def __iter__(self) -> Iterator[str]:
        return iter(self._key_to_file)

    def __len__(self) -> int:
        return len(self._key_to_file)

    def file_of(self, key: str) -> SafetensorsFile:
        try:
            return self.files[self._key_to_file[key]]
        except KeyError:
            raise CheckpointError(self.path, f"has no tensor named '{key}'.") from None

    def path_of(self, key: str) -> str:
        """The file that holds ``key``."""
        return self.file_of(key).path

    def shape(self, key: str) -> tuple[int, ...]:
        return self.file_of(key).shape(key)

    def dtype(self, key: str) -> torch.dtype:
        return self.file_of(key).dtype(key)

    def nbytes(self, key: str) -> int:
        return self.file_of(key).nbytes(key)

    def get(self, key: str) -> torch.Tensor:
        return self.file_of(key).get(key)

    def read_into(self, key: str, out: torch.Tensor) -> torch.Tensor:
        return self.file_of(key).read_into(key, out)

    def __repr__(self) -> str:
        return f"CheckpointReader({self.path!r}, {len(self.files)} files, {len(self)} tensors)"


def _from_files(root: Path, paths: list[Path]) -> CheckpointReader:
    files: list[SafetensorsFile] = []
    key_to_file: dict[str, int] = {}
    for p in paths:
        _refuse_pickle(p)
        sf = SafetensorsFile(p)
        for k in sf.keys():
            if k in key_to_file:
                raise CheckpointError(
                    root,
                    f"tensor '{k}' appears in both {files[key_to_file[k]].path} and {p}.",
                    "Remove the duplicate shard.",
                )
            key_to_file[k] = len(files)
        files.append(sf)
    return CheckpointReader(root, files, key_to_file)


def _check_shard_name(folder: Path, index_path: Path, name: object) -> None:
    """A shard named by an index must be a file inside ``folder``: no absolute path, no ``..``.

    The name is checked, not where it resolves to: Hugging Face cache snapshots keep their shards
    as symbolic links into a ``blobs`` folder elsewhere, which is the user's own doing and fine.
    """
    parts = Path(name).parts if isinstance(name, str) and name else ()
    if not parts or Path(name).is_absolute() or os.path.isabs(name) or ".." in parts:
        raise CheckpointError(
            index_path,
            f"names the shard {name!r}, which is not a file inside {folder}.",
            "Download the index JSON again; shard names must be file names inside the model folder.",
        )


def _from_index(folder: Path, index_path: Path) -> CheckpointReader:
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError
    except (OSError, ValueError, KeyError, TypeError):
        raise CheckpointError(
            index_path,
            "is not a valid sharded-checkpoint index (no 'weight_map').",
            "Download the index JSON again.",
        ) from None
    shard_names = sorted(set(weight_map.values()))
    for s in shard_names:
        _check_shard_name(folder, index_path, s)
    missing = [s for s in shard_names if not (folder / s).is_file()]
    if missing:
        raise CheckpointError(
            folder,
            f"shard file(s) listed in {index_path.name} are missing: {missing}.",
            "Download every shard of the model into this folder.",
        )
    reader = _from_files(folder, [folder / s for s in shard_names])
    absent = sorted(
        k
        for k, s in weight_map.items()
        if reader._key_to_file.get(k) is None or Path(reader.path_of(k)).name != s
    )
    if absent:
        raise CheckpointError(
            folder,
            f"{len(absent)} tensor(s) named in {index_path.name} are not in their shards, e.g. {absent[:5]}.",
            "Download the shards again; some are incomplete.",
        )
    return reader


def open_checkpoint(path: str | os.PathLike, subfolder: str | None = None) -> CheckpointReader:
    """Open a safetensors file or a diffusers model folder for reading.

    Args:
        path: a ``.safetensors`` file, a folder holding safetensors shards (with or without a
            ``*.safetensors.index.json``), or a diffusers pipeline folder.
        subfolder: component folder inside a pipeline folder (``"transformer"``, ``"vae"``,
            ``"text_encoder"``). Ignored when ``path`` itself already holds safetensors files.

    Returns:
        A ``CheckpointReader``.

    Raises:
        CheckpointError: missing path, pickle formats, no safetensors found, or a damaged file.
    """
    p = Path(path)
    if not p.exists():
        raise CheckpointError(p, "does not exist.", "Check the path (and that the download finished).")
    if p.is_file():
        return _from_files(p, [p])
    folder = p
    own = sorted(p.glob("*.safetensors"))
    if not own and subfolder is not None and (p / subfolder).is_dir():
        folder = p / subfolder
        own = sorted(folder.glob("*.safetensors"))
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if len(indexes) > 1:
        raise CheckpointError(
            folder,
            f"has several index files ({[i.name for i in indexes]}).",
            "Keep only the index of the model you want to load.",
        )
    if indexes:
        return _from_index(folder, indexes[0])
    if own:
        return _from_files(folder, own)
    pickles = [q.name for q in folder.iterdir() if q.suffix.lower() in PICKLE_SUFFIXES]
    if pickles:
        raise CheckpointError(folder, f"holds only pickle-based weights ({pickles[:3]}).", _PICKLE_FIX)
    where = f" (looked in '{subfolder}/' too)" if subfolder else ""
    raise CheckpointError(
        folder,
        f"contains no .safetensors files{where}.",
        "Point to the model's .safetensors file or to its diffusers folder.",
    )
