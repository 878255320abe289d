"""Safetensors-only checkpoint access: validated headers, zero-copy views, sharded diffusers folders."""

from .reader import CheckpointReader, open_checkpoint
from .safetensors_file import SAFETENSORS_DTYPES, SafetensorsFile, TensorInfo

__all__ = ["SAFETENSORS_DTYPES", "CheckpointReader", "SafetensorsFile", "TensorInfo", "open_checkpoint"]
