"""Checkpoint access: safetensors (validated headers, zero-copy views, sharded diffusers folders),
GGUF (memory-mapped), identifying what a file is, and strict assignment with one error format."""

from .assign import check_tensors, mismatch_report
from .containers import container_kind, open_model
from .gguf_file import GGUFFile, is_gguf
from .identify import ModelKind, identify, wrong_model
from .identity import FileIdentity, FileSet, path_identity, track_files
from .reader import CheckpointReader, open_checkpoint
from .safetensors_file import SAFETENSORS_DTYPES, SafetensorsFile, TensorInfo

__all__ = [
    "SAFETENSORS_DTYPES",
    "CheckpointReader",
    "FileIdentity",
    "FileSet",
    "GGUFFile",
    "ModelKind",
    "SafetensorsFile",
    "TensorInfo",
    "check_tensors",
    "container_kind",
    "identify",
    "is_gguf",
    "mismatch_report",
    "open_checkpoint",
    "open_model",
    "path_identity",
    "track_files",
    "wrong_model",
]
