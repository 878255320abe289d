"""Fixtures for the text-encoder tests: real tokenizer assets, tiny files in every layout, references.

Everything heavy is session-scoped and built once: tiny files (about 1 s each), the float32
transformers reference models they were made from, and loaded encoders.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from flux2_core.text_encoders import load_text_encoder
from flux2_core.tiny.text_encoder import tiny_reference_model, write_tiny_text_encoder


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny matmuls gain nothing from threads; on the shared 2-core box two threads triple the time."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def assets() -> Path:
    root = os.environ.get("FLUX2LOCAL_ASSETS")
    if (
        not root
        or not (Path(root) / "mistral3-tekken" / "tekken.json").is_file()
        or not (Path(root) / "qwen3-tokenizer" / "tokenizer.json").is_file()
    ):
        pytest.fail(
            "tokenizer assets missing: run the tests through tests/run.sh (or `source .ci/env.sh`), "
            "which runs .ci/assets.sh and sets FLUX2LOCAL_ASSETS."
        )
    return Path(root)


@pytest.fixture(scope="session")
def tekken_path(assets) -> Path:
    return assets / "mistral3-tekken" / "tekken.json"


@pytest.fixture(scope="session")
def qwen_tokenizer_dir(assets) -> Path:
    return assets / "qwen3-tokenizer"


@pytest.fixture(scope="session")
def comfy_qwen25_dir() -> Path:
    d = (
        Path(os.environ.get("COMFYUI_PATH", Path.home() / "ComfyUI"))
        / "comfy"
        / "text_encoders"
        / "qwen25_tokenizer"
    )
    if not (d / "vocab.json").is_file():
        pytest.fail(f"ComfyUI's qwen25_tokenizer not found at {d}; set COMFYUI_PATH (see DEVELOPERS.md).")
    return d


@pytest.fixture(scope="session")
def tiny_file(tmp_path_factory, assets):
    """make(kind, layout, seed=0) -> path of a tiny text encoder, written once per session."""
    root = tmp_path_factory.mktemp("tiny_te")
    made: dict[tuple, Path] = {}

    def make(kind: str, layout: str, seed: int = 0) -> Path:
        key = (kind, layout, seed)
        if key not in made:
            name = f"{kind}-{layout}-{seed}" + ("" if layout.startswith("hf") else ".safetensors")
            made[key] = write_tiny_text_encoder(root / name, kind=kind, layout=layout, seed=seed)
        return made[key]

    return make


@pytest.fixture(scope="session")
def reference():
    """ref(kind, seed=0) -> float32 transformers model holding the tiny files' weights."""
    models: dict[tuple, torch.nn.Module] = {}

    def ref(kind: str, seed: int = 0) -> torch.nn.Module:
        if (kind, seed) not in models:
            models[(kind, seed)] = tiny_reference_model(kind, seed)
        return models[(kind, seed)]

    return ref


@pytest.fixture(scope="session")
def encoder(tiny_file, qwen_tokenizer_dir):
    """enc(kind, layout, seed=0) -> float32 Flux2TextEncoder loaded from a tiny file (cached)."""
    loaded: dict[tuple, object] = {}

    def enc(kind: str, layout: str, seed: int = 0):
        key = (kind, layout, seed)
        if key not in loaded:
            path = tiny_file(kind, layout, seed)
            # ComfyUI's Qwen3 files carry no tokenizer (ComfyUI ships one): pass it like the nodes do.
            tok = qwen_tokenizer_dir if kind.startswith("qwen3") and layout.startswith("comfyui") else None
            loaded[key] = load_text_encoder(path, tokenizer=tok, dtype=torch.float32, cache=None)
        return loaded[key]

    return enc


@pytest.fixture(scope="session")
def generator(tiny_file):
    """gen(kind) -> float32 TextGenerator of the tiny HF folder (every layer, the head, vision)."""
    loaded: dict[str, object] = {}

    def gen(kind: str):
        if kind not in loaded:
            enc = load_text_encoder(tiny_file(kind, "hf"), dtype=torch.float32, cache=None)
            loaded[kind] = enc.generator()
        return loaded[kind]

    return gen


@pytest.fixture(scope="session")
def ref_states(reference, encoder):
    """states(kind, prompts, make_model=None, tag="") -> reference stacked states, computed once per key.

    Tokenized with the kind's HF-folder encoder (the tokenizer tests show every layout tokenizes alike).
    """
    memo: dict[tuple, torch.Tensor] = {}

    def states(kind: str, prompts: tuple[str, ...], make_model=None, tag: str = ""):
        key = (kind, prompts, tag)
        if key not in memo:
            enc = encoder(kind, "hf")
            ids, mask = enc.tokenize(list(prompts))
            model = make_model() if make_model is not None else reference(kind)
            memo[key] = _reference_stack(model, ids, mask, enc.spec.hidden_layers)
        return memo[key]

    return states


@pytest.fixture(scope="session")
def ref_stack():
    """The reference computation as a function (tests import nothing from conftest)."""
    return _reference_stack


def _reference_stack(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, layers: tuple[int, ...]
) -> torch.Tensor:
    """transformers' full forward with output_hidden_states, the chosen states concatenated per token.

    Runs the whole base model (all 40 / 36 layers, final norm) but not the vocabulary head, whose
    (B, 512, 131072) logits would only cost time here.
    """
    with torch.no_grad():
        out = model.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
    assert len(out.hidden_states) == model.config.get_text_config().num_hidden_layers + 1
    return torch.cat([out.hidden_states[i] for i in layers], dim=-1)
