"""Prompt upsampling (tiny random models write gibberish: determinism, bounds, images) and the cache."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from flux2_core.errors import InputError
from flux2_core.text_encoders import EmbeddingCache, load_text_encoder
from flux2_core.text_encoders.upsample import (
    SYSTEM_PROMPT_I2I,
    SYSTEM_PROMPT_T2I,
    build_upsample_inputs,
    generate_ids,
)


@pytest.fixture(scope="module")
def mistral_vlm(full_encoder):
    return full_encoder("mistral3")


@pytest.fixture(scope="module")
def qwen_lm(full_encoder):
    return full_encoder("qwen3-4b")


def _image(seed: int, h: int = 90, w: int = 120) -> torch.Tensor:
    return torch.rand(1, h, w, 3, generator=torch.Generator().manual_seed(seed))  # ComfyUI IMAGE layout


@pytest.mark.parametrize("which", ["mistral_vlm", "qwen_lm"])
def test_upsample_deterministic_per_seed_and_bounded(which, request):
    enc = request.getfixturevalue(which)
    a = enc.upsample("a red bicycle", seed=7, max_new_tokens=5)
    assert isinstance(a, str) and a
    _, embeds = build_upsample_inputs(enc, "a red bicycle")
    ids7 = generate_ids(enc, embeds, seed=7, max_new_tokens=5)
    assert 0 < len(ids7) <= 5
    assert enc.tokenizer.decode(ids7).strip() == a  # same seed, same text
    ids8 = generate_ids(enc, embeds, seed=8, max_new_tokens=5)
    assert ids7 != ids8  # a different seed samples differently (temperature 0.15 on random logits)
    assert generate_ids(enc, embeds, seed=7, max_new_tokens=2) == ids7[:2]  # bounded, same prefix


def test_upsample_uses_full_model_and_head(mistral_vlm):
    assert len(mistral_vlm.model.layers) == 40 and mistral_vlm.lm_head is not None
    assert mistral_vlm.vision_tower is not None and mistral_vlm.multi_modal_projector is not None


def test_mistral_images_enter_the_input(mistral_vlm):
    enc = mistral_vlm
    ids_text, emb_text = build_upsample_inputs(enc, "make the sky green")
    ids_img, emb_img = build_upsample_inputs(enc, "make the sky green", images=[_image(0)])
    assert 10 not in ids_text and ids_img.count(10) > 0 and ids_img.count(13) == 1  # [IMG] ... [IMG_END]
    assert enc.tokenizer.text_ids(SYSTEM_PROMPT_I2I)[:5] == ids_img[2:7]
    assert enc.tokenizer.text_ids(SYSTEM_PROMPT_T2I)[:5] == ids_text[2:7]
    _, emb_other = build_upsample_inputs(enc, "make the sky green", images=[_image(1)])
    slots = torch.tensor(ids_img) == 10
    plain = enc.model.embed_tokens(torch.tensor(ids_img))
    assert not torch.allclose(emb_img[0, slots], plain[slots])  # vision features replaced [IMG] embeddings
    assert not torch.allclose(emb_img[0, slots], emb_other[0, slots])  # and depend on the picture
    assert_close(emb_img[0, ~slots], plain[~slots])
    # several references are joined side by side into one picture
    ids_two, _ = build_upsample_inputs(
        enc, "make the sky green", images=[_image(0), np.uint8(_image(1)[0] * 255)]
    )
    assert ids_two.count(10) > ids_img.count(10)
    ids_batch, _ = build_upsample_inputs(
        enc, "make the sky green", images=[torch.cat([_image(0), _image(1)])]
    )
    assert ids_batch.count(10) == build_upsample_inputs(enc, "make the sky green", [_image(0), _image(1)])[
        0
    ].count(10)
    out = enc.upsample("make the sky green", images=[_image(0)], seed=1, max_new_tokens=3)
    assert out == enc.tokenizer.decode(generate_ids(enc, emb_img, seed=1, max_new_tokens=3)).strip()


def test_qwen_upsampling_is_text_only(qwen_lm, caplog):
    ids_img, emb = build_upsample_inputs(qwen_lm, "add a hat", images=[_image(0)])
    assert any("text only" in r.getMessage() for r in caplog.records)
    assert 151655 not in ids_img  # no image placeholder
    assert qwen_lm.tokenizer.text_ids(SYSTEM_PROMPT_I2I)[:5] == ids_img[3:8]  # edit system prompt
    assert emb.shape == (1, len(ids_img), 64)


def test_upsample_bad_settings(qwen_lm):
    with pytest.raises(InputError):
        qwen_lm.upsample("x", max_new_tokens=0)
    with pytest.raises(InputError):
        qwen_lm.upsample(None)
    with pytest.raises(InputError):
        qwen_lm.upsample("x", images=["not an image"], max_new_tokens=1)


# ----------------------------------------------------------------------------------------- cache
def _count_layer_calls(enc):
    calls = []
    hooks = [layer.register_forward_hook(lambda *a: calls.append(1)) for layer in enc.model.layers]
    return calls, hooks


def test_cache_hit_costs_nothing_and_is_keyed_by_file(tiny_file, tmp_path, qwen_tokenizer_dir):
    import shutil

    cache = EmbeddingCache(max_entries=8)
    src = tiny_file("qwen3-4b", "comfyui")
    path = tmp_path / "qwen_3_4b.safetensors"
    shutil.copy(src, path)
    enc = load_text_encoder(path, tokenizer=qwen_tokenizer_dir, dtype=torch.float32, cache=cache)
    calls, hooks = _count_layer_calls(enc)
    first = enc.encode(["a cat", "a dog"])
    assert len(calls) == 27 and cache.misses == 2 and len(cache) == 2
    again = enc.encode(["a dog", "a cat"])
    assert len(calls) == 27 and cache.hits == 2  # nothing recomputed
    assert_close(again, first.flip(0))
    mixed = enc.encode(["a cat", "a bird"])  # one hit, one miss: only the miss runs
    assert len(calls) == 54
    assert_close(mixed[0], first[0])
    for h in hooks:
        h.remove()
    # A second encoder on the same unchanged file shares the entries.
    enc2 = load_text_encoder(path, tokenizer=qwen_tokenizer_dir, dtype=torch.float32, cache=cache)
    assert enc2.identity == enc.identity
    calls2, _ = _count_layer_calls(enc2)
    enc2.encode("a cat")
    assert not calls2
    # Touching the file (new mtime) changes its identity: no stale embeddings.
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    enc3 = load_text_encoder(path, tokenizer=qwen_tokenizer_dir, dtype=torch.float32, cache=cache)
    assert enc3.identity != enc.identity
    calls3, _ = _count_layer_calls(enc3)
    enc3.encode("a cat")
    assert len(calls3) == 27
    # Settings are part of the key: bypassing the cache recomputes.
    enc3.encode("a cat", use_cache=False)
    assert len(calls3) == 54


def test_cache_is_bounded_lru():
    cache = EmbeddingCache(max_entries=3, max_bytes=1 << 20)
    for i in range(5):
        cache.put(("k", i), torch.full((4, 4), float(i)))
        if i == 2:
            assert cache.get(("k", 0)) is not None  # refresh 0: 1 becomes the oldest
    assert len(cache) == 3
    assert cache.get(("k", 1)) is None and cache.get(("k", 0)) is not None and cache.get(("k", 4)) is not None
    small = EmbeddingCache(max_entries=10, max_bytes=2 * 4 * 4 * 4)
    for i in range(4):
        small.put(i, torch.zeros(4, 4))
    assert len(small) == 2  # byte bound
    small.put("huge", torch.zeros(100, 100))
    assert small.get("huge") is None
