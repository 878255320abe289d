"""Fixtures for the safety tests: natural-looking test pictures, a C2PA test certificate chain made
with ``cryptography``, tiny NSFW classifier folders and tiny yes/no Mistral judges (all built once)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flux2_core.tiny.certificates import write_test_certificate_chain


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny matmuls gain nothing from threads; on the shared 2-core box they only add contention."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _picture(height: int, width: int, seed: int = 0) -> np.ndarray:
    """(H, W, 3) uint8: smooth structure at several scales plus fine grain, like a rendered image."""
    rng = np.random.default_rng(seed)
    out = np.full((height, width, 3), 128.0)
    for step, amp in ((64, 80.0), (16, 40.0), (4, 20.0), (1, 6.0)):
        small = rng.normal(size=(max(1, height // step), max(1, width // step), 3))
        grey = Image.fromarray((small * 40 + 128).clip(0, 255).astype(np.uint8))
        up = np.asarray(grey.resize((width, height), Image.BICUBIC), dtype=np.float64)
        out += (up - 128) / 40 * amp
    return out.clip(0, 255).astype(np.uint8)


@pytest.fixture(scope="session")
def picture():
    """picture(height, width, seed=0) -> (H, W, 3) uint8 RGB test picture."""
    return _picture


@pytest.fixture(scope="session")
def chain(tmp_path_factory) -> dict[str, Path]:
    """An EC P-256 test chain made with ``cryptography`` (PEM files: chain, key, root)."""
    return write_test_certificate_chain(tmp_path_factory.mktemp("c2pa-chain"))


@pytest.fixture(scope="session")
def make_chain(tmp_path_factory):
    """make_chain(algorithm="ec" | "ed25519") -> a fresh chain's PEM paths."""
    return lambda algorithm="ec": write_test_certificate_chain(
        tmp_path_factory.mktemp(f"chain-{algorithm}"), algorithm
    )


@pytest.fixture(scope="session")
def classifier_dir(tmp_path_factory):
    """classifier_dir(verdict) -> tiny ViT classifier folder ("nsfw", "normal" or None = random head)."""
    from flux2_core.tiny.safety import write_tiny_nsfw_classifier

    root = tmp_path_factory.mktemp("classifiers")
    made: dict = {}

    def make(verdict: str | None) -> Path:
        if verdict not in made:
            made[verdict] = write_tiny_nsfw_classifier(root / str(verdict), verdict=verdict, seed=3)
        return made[verdict]

    return make


@pytest.fixture(scope="session")
def judge_encoder(tmp_path_factory):
    """judge_encoder(answer) -> float32 Flux2TextEncoder of a tiny Mistral answering "yes" or "no"."""
    from flux2_core.text_encoders import load_text_encoder
    from flux2_core.tiny.safety import write_tiny_integrity_judge

    root = tmp_path_factory.mktemp("judges")
    loaded: dict = {}

    def make(answer: str):
        if answer not in loaded:
            te = write_tiny_integrity_judge(root / answer, answer=answer)
            loaded[answer] = load_text_encoder(te, dtype=torch.float32, cache=None)
        return loaded[answer]

    return make
