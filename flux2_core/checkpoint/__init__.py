"""Checkpoint access: safetensors (validated headers, zero-copy views, sharded diffusers folders),
GGUF (memory-mapped), identifying what a file is, and strict assignment with one error format."""

from .assign import check_tensors, mismatch_report
from .containers import container_kind, open_model
from .gguf_file import GGUFFile, is_gguf
from .identify import ModelKind, identify, wrong_model
from .reader import CheckpointReader, open_checkpoint
from .safetensors_file import SAFETENSORS_DTYPES, SafetensorsFile, TensorInfo

__all__ = [
    "SAFETENSORS_DTYPES",
    "CheckpointReader",
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
    "wrong_model",
]
