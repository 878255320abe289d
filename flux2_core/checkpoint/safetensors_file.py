"""Validated, zero-copy access to one ``.safetensors`` file.

The format: 8 bytes little-endian header length N, N bytes of JSON
(``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}``),
then the raw tensor bytes; offsets are relative to the end of the header.

Every problem with the file (empty, truncated, corrupt JSON, offsets past the end, an unknown
dtype) is raised as a ``CheckpointError`` naming the file, before any tensor is touched.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import struct
from dataclasses import dataclass

import torch

from ..errors import CheckpointError
from .identity import FileIdentity, memory_map_default, record_opened, record_read
from .tensor_index import TensorIndex

logger = logging.getLogger(__name__)

# Header sizes beyond this are corrupt files, not real checkpoints (a 64 GB model has ~10 MB of header).
_MAX_HEADER_BYTES = 512 * 1024 * 1024

_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
# Newer torch builds know these; older ones simply do not list them.
for _name, _attr in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"), ("F8_E8M0", "float8_e8m0fnu")):
    if hasattr(torch, _attr):
        _DTYPES[_name] = getattr(torch, _attr)

SAFETENSORS_DTYPES: dict[str, torch.dtype] = dict(_DTYPES)
"""safetensors dtype names -> torch dtypes understood by this reader."""


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in the file."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def _int_list(value: object) -> bool:
    """True for a JSON list of integers (``bool`` is an ``int`` subclass in Python: refused too)."""
    return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


class SafetensorsFile(TensorIndex[TensorInfo]):
    """One safetensors file with a validated header.

    Args:
        path: the ``.safetensors`` file.
        mmap: view tensors in the memory-mapped file (True) or read each into memory the process
            owns (False); None takes the choice of the enclosing ``track_files`` block (default True).

    Attributes:
        identity: the file's ``FileIdentity`` when it was opened; every read checks it is unchanged.
        header_digest: SHA-256 (hex) of the length prefix and header bytes.

    Raises:
        CheckpointError: the file is missing, empty, truncated, corrupt or uses an unknown dtype.
    """

    def __init__(self, path: str | os.PathLike, mmap: bool | None = None):
        self.path = os.fspath(path)
        self.mmap = memory_map_default() if mmap is None else bool(mmap)
        self._storage: torch.UntypedStorage | None = None
        self._map_failed = False
        self._infos, self.metadata, self._data_start = self._parse_header()
        record_opened(self)

    # ----------------------------------------------------------------------------------- header
    def _fail(self, problem: str, fix: str | None = None) -> CheckpointError:
        return CheckpointError(
            self.path, problem, fix or "Download the file again; it is damaged or not a safetensors file."
        )

    def _parse_header(self) -> tuple[dict[str, TensorInfo], dict[str, str], int]:
        try:
            with open(self.path, "rb") as f:
                # The identity of the file actually opened (fstat), so a later replacement shows.
                self.identity = FileIdentity.from_stat(os.fstat(f.fileno()))
                size = self.identity.size
                head = f.read(8)
                if size == 0:
                    raise self._fail("the file is empty (0 bytes).")
                if len(head) < 8:
                    raise self._fail(
                        f"the file is only {size} bytes long, too short for a safetensors header."
                    )
                (n,) = struct.unpack("<Q", head)
                if n > _MAX_HEADER_BYTES or 8 + n > size:
                    raise self._fail(
                        f"the header claims {n} bytes but the file has {size} bytes: it is truncated or corrupt."
                    )
                raw = f.read(n)
        except CheckpointError:
            raise
        except OSError as e:
            raise CheckpointError(
                self.path,
                f"cannot read the file ({e.strerror or e}).",
                "Check that the path exists and is readable.",
            ) from None
        self.header_digest = hashlib.sha256(head + raw).hexdigest()
        if len(raw) < n:
            raise self._fail(f"the file ended while its {n}-byte header was read: it is truncated.")
        if raw[:1] != b"{":
            raise self._fail("the header is not JSON (not a safetensors file?).")
        try:
            header = json.loads(raw.decode("utf-8").rstrip(" "))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise self._fail(f"the header JSON is corrupt ({e}).") from None
        if not isinstance(header, dict):
            raise self._fail("the header JSON is not an object.")
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise self._fail("the header '__metadata__' entry is not an object of strings.")
        data_start = 8 + n
        data_size = size - data_start
        infos: dict[str, TensorInfo] = {}
        for name, entry in header.items():
            infos[name] = self._check_entry(name, entry, data_start, data_size)
        self._check_layout(infos, data_start, data_size)
        return infos, dict(metadata), data_start

    def _check_layout(self, infos: dict[str, TensorInfo], data_start: int, data_size: int) -> None:
        """The tensors tile the data section exactly, as the safetensors library requires.

        Sorted by offset, each tensor starts where the previous one ended (no overlaps, no gaps),
        the first at 0, and the last ends at the end of the file. Overlapping tensors would alias
        each other's bytes; trailing bytes mean the file is not what its header describes.
        """
        at = data_start
        for name, info in sorted(infos.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
            if info.begin != at:
                what = "overlaps the previous tensor" if info.begin < at else "leaves a gap before it"
                raise self._fail(
                    f"tensor '{name}' starts at data byte {info.begin - data_start}, which {what} "
                    f"(expected {at - data_start})."
                )
            at = info.end
        if at != data_start + data_size:
            raise self._fail(
                f"the file has {data_start + data_size - at} bytes after its last tensor, which the "
                "header does not describe."
            )

    def _check_entry(self, name: str, entry: object, data_start: int, data_size: int) -> TensorInfo:
        try:
            dtype_name = entry["dtype"]  # type: ignore[index]
            shape = entry["shape"]  # type: ignore[index]
            offsets = entry["data_offsets"]  # type: ignore[index]
        except (TypeError, KeyError):
            raise self._fail(f"the header entry for tensor '{name}' is malformed.") from None
        # JSON integers only: int(256.9) would silently read a different shape than the file states.
        if (
            not isinstance(dtype_name, str)
            or not _int_list(shape)
            or not _int_list(offsets)
            or len(offsets) != 2
        ):
            raise self._fail(
                f"the header entry for tensor '{name}' is malformed (dtype {dtype_name!r}, shape {shape!r}, "
                f"data_offsets {offsets!r}; shapes and offsets must be lists of whole numbers)."
            )
        shape = tuple(shape)
        begin, end = offsets
        dtype = _DTYPES.get(dtype_name)
        if dtype is None:
            raise CheckpointError(
                self.path,
                f"tensor '{name}' has dtype '{dtype_name}', which this loader does not support "
                f"(known: {', '.join(sorted(_DTYPES))}).",
                "Convert the file to bf16, fp16, fp32 or fp8 safetensors.",
            )
        if any(s < 0 for s in shape) or begin < 0 or end < begin:
            raise self._fail(f"tensor '{name}' has a negative shape or inverted data offsets.")
        expected = math.prod(shape) * _itemsize(dtype)
        if end - begin != expected:
            raise self._fail(
                f"tensor '{name}' ({dtype_name} {list(shape)}) should take {expected} bytes "
                f"but its offsets span {end - begin}."
            )
        if end > data_size:
            raise self._fail(
                f"tensor '{name}' ends at byte {data_start + end} but the file has only "
                f"{data_start + data_size} bytes: the file is truncated (an interrupted download?)."
            )
        return TensorInfo(dtype, shape, data_start + begin, data_start + end)

    # ----------------------------------------------------------------------------------- access
    def shape(self, key: str) -> tuple[int, ...]:
        return self.info(key).shape

    def dtype(self, key: str) -> torch.dtype:
        return self.info(key).dtype

    def nbytes(self, key: str) -> int:
        return self.info(key).nbytes

    def changed(self) -> str | None:
        """How the file on disk changed since it was opened, or None while it is the same file."""
        return self.identity.change_to(FileIdentity.of(self.path))

    def check_unchanged(self) -> None:
        """Raise a ``CheckpointError`` if the file was replaced, truncated or rewritten since opened.

        Its header (and any view of its mapping) describes the file as it was: reading a changed
        file would give other weights, or crash the process with SIGBUS past a truncated end.
        """
        change = self.changed()
        if change is not None:
            raise CheckpointError(
                self.path,
                f"{change} after it was opened; its tensors cannot be read any more.",
                "Load the model again.",
            )

    def _mapped(self) -> torch.UntypedStorage | None:
        if self._storage is None and not self._map_failed and self.mmap:
            try:
                # shared=False maps the file privately (copy on write): pages are read lazily and a
                # caller writing into a returned tensor never changes the file.
                self._storage = torch.UntypedStorage.from_file(
                    self.path, shared=False, nbytes=self.identity.size
                )
            except (RuntimeError, OSError) as e:  # e.g. a platform without private file mappings
                logger.warning("cannot memory-map %s (%s); reading tensors with copies", self.path, e)
                self._map_failed = True
            else:
                # Mapped by name: make sure the name still led to the file whose header was parsed.
                self.check_unchanged()
        return self._storage

    def get(self, key: str) -> torch.Tensor:
        """The tensor ``key`` as a CPU tensor viewing the memory-mapped file (no copy).

        Reads a copy into memory the caller owns instead when the file was opened with
        ``mmap=False``, when the tensor's byte offset is not aligned to its element size, or when
        the file cannot be memory-mapped.

        Raises:
            CheckpointError: the file changed on disk since it was opened.
        """
        info = self.info(key)
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        self.check_unchanged()
        storage = self._mapped()
        if storage is None:
            return self.read_into(key, torch.empty(info.shape, dtype=info.dtype))
        raw = torch.empty(0, dtype=torch.uint8).set_(storage, info.begin, (info.nbytes,), (1,))
        if info.begin % _itemsize(info.dtype):
            raw = raw.clone()
        record_read(info.nbytes)
        return raw.view(info.dtype).view(info.shape)

    def read_into(self, key: str, out: torch.Tensor) -> torch.Tensor:
        """Read the bytes of ``key`` from the file straight into ``out``.

        ``out`` must have the stored dtype and shape; on the CPU it must be contiguous (e.g. a
        pinned buffer) and is filled without an intermediate copy. A CUDA ``out`` is filled from the
        mapped file with ``copy_``.

        Returns:
            ``out``.
        """
        info = self.info(key)
        if out.dtype != info.dtype or tuple(out.shape) != info.shape:
            raise ValueError(
                f"read_into('{key}'): out is {out.dtype} {tuple(out.shape)}, "
                f"the file stores {info.dtype} {info.shape}"
            )
        if out.device.type != "cpu" or not out.is_contiguous():
            return out.copy_(self.get(key))
        if info.nbytes == 0:
            return out
        self.check_unchanged()
        if read_range(self.path, info.begin, out) < info.nbytes:
            raise self._fail(f"reading tensor '{key}' hit the end of the file early.")
        record_read(info.nbytes)
        return out

    def __repr__(self) -> str:
        return f"SafetensorsFile({self.path!r}, {len(self)} tensors)"


def read_range(path: str, begin: int, out: torch.Tensor) -> int:
    """Fill the contiguous CPU tensor ``out`` with the file's bytes from offset ``begin`` on.

    Plain reads (no mapping, no intermediate buffer: the bytes land in ``out`` itself, e.g. a
    pinned buffer). Returns the bytes read: fewer than ``out`` holds when the file ends early.
    """
    buf = memoryview(out.reshape(-1).view(torch.uint8).numpy())
    done = 0
    with open(path, "rb", buffering=0) as f:
        f.seek(begin)
        while done < len(buf):
            got = f.readinto(buf[done:])
            if not got:
                break
            done += got
    return done
