"""Shared pytest set-up: GPU-marked tests skip (reported) where no CUDA device exists."""

from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (marked gpu); run on the lent GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
