"""Shared pytest set-up: GPU-marked tests skip (reported) where no CUDA device exists."""

from __future__ import annotations

import os

import pytest
import torch

# Parity and streaming tests run the eager blocks (the reference); the fast-path tests set
# `Flux2Transformer.fast_path` explicitly, which wins over this.
os.environ.setdefault("FLUX2LOCAL_FAST", "0")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (marked gpu); run on the lent GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
