"""Safetensors-only checkpoint access: validated headers, zero-copy views, sharded diffusers folders."""

from .identity import FileIdentity, FileSet, path_identity, track_files
from .reader import CheckpointReader, open_checkpoint
from .safetensors_file import SAFETENSORS_DTYPES, SafetensorsFile, TensorInfo

__all__ = [
    "SAFETENSORS_DTYPES",
    "CheckpointReader",
    "FileIdentity",
    "FileSet",
    "SafetensorsFile",
    "TensorInfo",
    "open_checkpoint",
    "path_identity",
    "track_files",
]
