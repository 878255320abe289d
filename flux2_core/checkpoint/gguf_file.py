"""Read-only, memory-mapped access to one ``.gguf`` file (the llama.cpp / ComfyUI-GGUF container).

GGUF: a header of typed key/value fields (``general.architecture``, ``tokenizer.ggml.*``, ...),
then tensor infos (name, dims in ggml order = innermost first, GGML type, offset), then aligned
tensor data. The ``gguf`` package's ``GGUFReader`` parses it and maps the file; tensors handed
out here are views of that one mapping (copy-on-write: writing into one never reaches the file),
so the weights are never held twice in RAM.

Shapes are given in PyTorch order (ggml dims reversed). Quantized tensors come back as their
stored bytes, (rows, bytes per row) uint8; F32/F16/BF16 tensors as ordinary typed tensors.
The interface mirrors ``SafetensorsFile`` (``keys``, ``shape``, ``dtype``, ``nbytes``, ``get``,
``read_into``, ``identity``, ``check_unchanged``) plus ``storage(key)`` (the GGML type name) and
``dequantize(key, dtype)``.

Like a safetensors file, a GGUF remembers its ``FileIdentity`` from when it was opened and refuses
reads once the file changed (a truncated mapping would crash the process with SIGBUS), and is
recorded by ``track_files``. Opened with ``mmap=False`` (ComfyUI's ``--disable-mmap``) the header
is parsed from a mapping that is dropped right after: metadata is copied out, tensors are read
with plain file reads into memory the caller owns, and nothing of the file stays mapped.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from dataclasses import dataclass

import torch

from ..errors import CheckpointError
from ..quant.ggml import GGML_BY_ID, GGMLType, dequantize_ggml
from .identity import FileIdentity, memory_map_default, record_opened, record_read
from .safetensors_file import read_range
from .tensor_index import TensorIndex

logger = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
_PLAIN_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_SPLIT = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$", re.IGNORECASE)
_FIX_DOWNLOAD = "Download the file again; it is truncated or damaged (an interrupted download?)."


def _reader_class():
    """``gguf.GGUFReader`` holding its mapping as a plain ndarray view of the same pages.

    The reader slices its mapping once per metadata value; slices of an ``np.memmap`` are memmap
    objects whose bookkeeping makes parsing a 150k-token vocabulary about 3x slower. A plain view
    of the mapping has no such cost and still maps (never copies) the file.
    """
    import numpy as np
    from gguf import GGUFReader

    class _Reader(GGUFReader):
        @property
        def data(self):
            return self._mapped

        @data.setter
        def data(self, value):
            self._mapped = value.view(np.ndarray) if isinstance(value, np.memmap) else value

    return _Reader


def is_gguf(path: str | os.PathLike) -> bool:
    """True for a file that starts with the GGUF magic (whatever its name)."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


@dataclass(frozen=True)
class GGUFTensorInfo:
    """One tensor of the file.

    Attributes:
        type_name: the GGML type name ("Q4_K"), also for types this loader cannot decode.
        ggml: its decoder table row, or None for an unsupported type.
        shape: logical shape in PyTorch order (out, in).
        nbytes: stored bytes.
        index: position in the reader's tensor list.
        offset: byte offset of the tensor's data in the file.
    """

    type_name: str
    ggml: GGMLType | None
    shape: tuple[int, ...]
    nbytes: int
    index: int
    offset: int


class GGUFFile(TensorIndex[GGUFTensorInfo]):
    """One GGUF file, parsed and memory-mapped once.

    Args:
        path: the ``.gguf`` file.
        mmap: view tensors in the memory-mapped file (True) or read each into memory the process
            owns, keeping no mapping (False); None takes the choice of the enclosing ``track_files``
            block (default True).

    Attributes:
        identity: the file's ``FileIdentity`` when it was opened; every read checks it is unchanged.

    Raises:
        CheckpointError: missing, empty, truncated or not a GGUF file, or one part of a split file.
    """

    def __init__(self, path: str | os.PathLike, mmap: bool | None = None):
        self.path = os.fspath(path)
        self.mmap = memory_map_default() if mmap is None else bool(mmap)
        self.metadata: dict[str, str] = {}  # safetensors-style header metadata: none in GGUF
        self._reader = self._open()
        self._infos: dict[str, GGUFTensorInfo] = {}
        for i, t in enumerate(self._reader.tensors):
            ggml = GGML_BY_ID.get(int(t.tensor_type))
            name = getattr(t.tensor_type, "name", str(int(t.tensor_type)))
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))
            self._infos[t.name] = GGUFTensorInfo(name, ggml, shape, int(t.n_bytes), i, int(t.data_offset))
        # Without a mapping: the metadata as Python values, and the reader (with the mapping) dropped.
        self._fields: dict[str, object] | None = None
        if not self.mmap:
            self._fields = {k: f.contents() for k, f in self._reader.fields.items()}
            self._reader = None
        record_opened(self)

    @property
    def files(self) -> list[GGUFFile]:
        """The files behind this reader (one), like ``CheckpointReader.files``."""
        return [self]

    def _open(self):
        try:
            with open(self.path, "rb") as f:
                # The identity of the file actually opened (fstat), so a later replacement shows.
                self.identity = FileIdentity.from_stat(os.fstat(f.fileno()))
        except OSError as e:
            raise CheckpointError(
                self.path, f"cannot be read ({e.strerror or e}).", "Check the path."
            ) from None
        size = self.identity.size
        if size == 0:
            raise CheckpointError(self.path, "is empty (0 bytes).", _FIX_DOWNLOAD)
        if not is_gguf(self.path):
            raise CheckpointError(
                self.path, "does not start with the GGUF magic bytes: it is not a GGUF file.", _FIX_DOWNLOAD
            )
        split = _SPLIT.search(os.path.basename(self.path))
        if split and split.group(2) != "00001":
            raise CheckpointError(
                self.path,
                f"is part {int(split.group(1))} of a GGUF split into {int(split.group(2))} files.",
                "Merge the parts into one file first (llama.cpp: llama-gguf-split --merge).",
            )
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                # 'c' maps the file copy-on-write: pages load lazily and writes stay private.
                reader = _reader_class()(self.path, "c")
        except (ValueError, IndexError, OSError, KeyError) as e:
            raise CheckpointError(
                self.path,
                f"cannot be parsed as GGUF ({type(e).__name__}: {e}); the file is truncated or damaged.",
                _FIX_DOWNLOAD,
            ) from None
        # Mapped by name: make sure the name still led to the file that was identified.
        self.check_unchanged()
        end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
        if end > size:
            raise CheckpointError(
                self.path,
                f"its tensors end at byte {end} but the file has {size}: it is truncated.",
                _FIX_DOWNLOAD,
            )
        return reader

    def changed(self) -> str | None:
        """How the file on disk changed since it was opened, or None while it is the same file."""
        return self.identity.change_to(FileIdentity.of(self.path))

    def check_unchanged(self) -> None:
        """Raise a ``CheckpointError`` if the file was replaced, truncated or rewritten since opened.

        The parsed header (and any view of the mapping) describes the file as it was: reading a
        changed file would give other weights, or crash the process with SIGBUS past a truncated end.
        """
        change = self.changed()
        if change is not None:
            raise CheckpointError(
                self.path,
                f"{change} after it was opened; its tensors cannot be read any more.",
                "Load the model again.",
            )

    # ------------------------------------------------------------------------------- metadata
    def field(self, name: str, default=None):
        """A metadata value: str, int, float, bool or a list of them; ``default`` when absent."""
        if self._fields is not None:
            return self._fields.get(name, default)
        f = self._reader.get_field(name)
        if f is None:
            return default
        return f.contents()

    def field_names(self) -> list[str]:
        names = self._fields if self._fields is not None else self._reader.fields
        return [k for k in names if not k.startswith("GGUF.")]

    @property
    def architecture(self) -> str | None:
        """``general.architecture`` ("flux", "flux2", "qwen3", "llama", ...), if present."""
        arch = self.field("general.architecture")
        return arch if isinstance(arch, str) else None

    # --------------------------------------------------------------------------------- tensors
    def shape(self, key: str) -> tuple[int, ...]:
        """Logical shape (PyTorch order)."""
        return self.info(key).shape

    def storage(self, key: str) -> str:
        """The GGML type name of ``key`` ("F32", "Q4_K", ...)."""
        return self.info(key).type_name

    def is_quantized(self, key: str) -> bool:
        return self.info(key).type_name not in _PLAIN_DTYPES

    def ggml(self, key: str) -> GGMLType:
        """The decoder of ``key``'s type; CheckpointError naming type, tensor and file if unsupported."""
        info = self.info(key)
        if info.ggml is None:
            from ..quant.ggml import GGML_TYPES

            raise CheckpointError(
                self.path,
                f"tensor '{key}' is stored as {info.type_name}, a GGML type this loader cannot decode "
                f"(supported: {', '.join(GGML_TYPES)}).",
                "Use a GGUF quantized with one of the supported types (e.g. Q8_0, Q6_K, Q5_K_M, Q4_K_M).",
            )
        return info.ggml

    def dtype(self, key: str) -> torch.dtype:
        """dtype of ``get(key)``: float32/float16/bfloat16, or uint8 for quantized bytes."""
        return _PLAIN_DTYPES.get(self.ggml(key).name, torch.uint8)

    def nbytes(self, key: str) -> int:
        return self.info(key).nbytes

    def stored_shape(self, key: str) -> tuple[int, ...]:
        """Shape of ``get(key)``: the logical shape, or (..., bytes per row) for quantized types."""
        info, q = self.info(key), self.ggml(key)
        if not q.quantized:
            return info.shape
        return (*info.shape[:-1], q.row_bytes(info.shape[-1]))

    def get(self, key: str) -> torch.Tensor:
        """``key`` as a CPU tensor: typed, or stored bytes. A view of the mapped file (no copy), or
        with ``mmap=False`` a copy read into memory the caller owns.

        Raises:
            CheckpointError: the file changed on disk since it was opened.
        """
        info, q = self.info(key), self.ggml(key)
        if self._reader is None:
            return self.read_into(key, torch.empty(self.stored_shape(key), dtype=self.dtype(key)))
        self.check_unchanged()
        data = self._reader.tensors[info.index].data
        t = torch.from_numpy(data)
        if q.name == "BF16":  # the reader hands BF16 out as raw bytes (..., 2 * cols)
            t = t.view(torch.uint8).view(torch.bfloat16)
        record_read(info.nbytes)
        return t.reshape(self.stored_shape(key))

    def read_into(self, key: str, out: torch.Tensor) -> torch.Tensor:
        """Read ``key``'s stored bytes into ``out`` (stored dtype and shape, any device).

        A contiguous CPU ``out`` (e.g. a pinned buffer) is filled with plain file reads, without an
        intermediate copy; others are copied from ``get``.

        Raises:
            CheckpointError: the file changed on disk since it was opened.
        """
        info = self.info(key)
        dtype, shape = self.dtype(key), self.stored_shape(key)
        if out.dtype != dtype or tuple(out.shape) != tuple(shape):
            raise ValueError(
                f"read_into('{key}'): out is {out.dtype} {tuple(out.shape)}, "
                f"the file stores {dtype} {tuple(shape)}"
            )
        if out.device.type != "cpu" or not out.is_contiguous():
            return out.copy_(self.get(key))
        self.check_unchanged()
        if read_range(self.path, info.offset, out) < info.nbytes:
            raise CheckpointError(
                self.path, f"reading tensor '{key}' hit the end of the file early.", _FIX_DOWNLOAD
            )
        record_read(info.nbytes)
        return out

    def dequantize(self, key: str, dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
        """``key`` as a ``dtype`` tensor of its logical shape (float32 math, rounded once)."""
        t = self.get(key).to(device)
        q = self.ggml(key)
        if not q.quantized:
            return t.to(dtype)
        return dequantize_ggml(t, q, self.shape(key), dtype)

    def __repr__(self) -> str:
        return f"GGUFFile({self.path!r}, {len(self)} tensors, arch={self.architecture!r})"
