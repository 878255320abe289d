"""Text generation (parity with transformers), prompt upsampling (determinism, bounds, images), cache."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from flux2_core.errors import InputError
from flux2_core.text_encoders import EmbeddingCache, load_text_encoder
from flux2_core.text_encoders.upsample import SYSTEM_PROMPT_I2I, SYSTEM_PROMPT_T2I


@pytest.fixture(scope="module")
def mistral_vlm(generator):
    return generator("mistral3")


@pytest.fixture(scope="module")
def qwen_lm(generator):
    return generator("qwen3-4b")


def _image(seed: int, h: int = 90, w: int = 120) -> torch.Tensor:
    return torch.rand(1, h, w, 3, generator=torch.Generator().manual_seed(seed))  # ComfyUI IMAGE layout


def _reference_logits(model, ids, pixel_values=None, image_sizes=None):
    with torch.no_grad():
        kwargs = {} if pixel_values is None else {"pixel_values": pixel_values, "image_sizes": image_sizes}
        return model(input_ids=torch.tensor([ids]), **kwargs).logits[0].float()


@pytest.mark.parametrize("kind", ["mistral3", "qwen3-4b"])
def test_next_token_logits_equal_transformers(kind, generator, reference):
    gen, ref = generator(kind), reference(kind)
    ids, _ = gen.chat_inputs("Answer yes or no.", "Is a cat an animal?")
    assert_close(
        gen.next_token_logits("Answer yes or no.", "Is a cat an animal?"), _reference_logits(ref, ids)[-1]
    )


@pytest.mark.parametrize("kind", ["mistral3", "qwen3-4b"])
def test_greedy_generation_equals_transformers_generate(kind, generator, reference):
    """The KV-cached loop writes what transformers' own generate writes (greedy, no end-of-turn check)."""
    gen, ref = generator(kind), reference(kind)
    ids, embeds = gen.chat_inputs(SYSTEM_PROMPT_T2I, "a red bicycle")
    ours = gen.generate_ids(embeds, max_new_tokens=6, temperature=0)
    assert ours  # random weights: no end-of-turn among the first tokens
    with torch.no_grad():
        out = ref.generate(
            input_ids=torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=len(ours) + 1,
            do_sample=False,
            eos_token_id=sorted(gen.tokenizer.eos_ids),
            pad_token_id=0,
        )
    assert out[0, len(ids) : len(ids) + len(ours)].tolist() == ours


def test_vision_features_enter_like_transformers_mistral3(mistral_vlm, reference):
    from flux2_core.text_encoders.vlm_images import prepare_vlm_image, to_chw

    gen = mistral_vlm
    ids, embeds = gen.chat_inputs(SYSTEM_PROMPT_I2I, "make the sky green", images=[_image(0)])
    unit = gen.vlm_config.vision_config.patch_size * gen.vlm_config.spatial_merge_size
    pixels = prepare_vlm_image([to_chw(_image(0))], unit)
    expected = _reference_logits(
        reference("mistral3"), ids, pixels[None], torch.tensor([list(pixels.shape[1:])])
    )
    logits = gen.next_token_logits(SYSTEM_PROMPT_I2I, "make the sky green", images=[_image(0)])
    assert_close(logits, expected[-1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("which", ["mistral_vlm", "qwen_lm"])
def test_upsample_deterministic_per_seed_and_bounded(which, request):
    gen = request.getfixturevalue(which)
    a = gen.upsample("a red bicycle", seed=7, max_new_tokens=5)
    assert isinstance(a, str) and a
    _, embeds = gen.chat_inputs(SYSTEM_PROMPT_T2I, "a red bicycle")
    ids7 = gen.generate_ids(embeds, seed=7, max_new_tokens=5)
    assert 0 < len(ids7) <= 5
    assert gen.tokenizer.decode(ids7).strip() == a  # same seed, same text
    ids8 = gen.generate_ids(embeds, seed=8, max_new_tokens=5)
    assert ids7 != ids8  # a different seed samples differently (temperature 0.15 on random logits)
    assert gen.generate_ids(embeds, seed=7, max_new_tokens=2) == ids7[:2]  # bounded, same prefix


def test_generator_shares_the_encoder_layers_and_leaves_it_unchanged(tiny_file):
    enc = load_text_encoder(tiny_file("mistral3", "hf"), dtype=torch.float32, cache=None)
    before = {n: p for n, p in enc.named_parameters()}
    gen = enc.generator()
    assert {n: p for n, p in enc.named_parameters()} == before and len(enc.model.layers) == 30
    assert len(gen.layers) == 40 and all(gen.layers[i] is enc.model.layers[i] for i in range(30))
    assert gen.lm_head is not None and gen.vision_tower is not None and gen.multi_modal_projector is not None
    shared = {id(p) for p in enc.parameters()}
    own = [p for p in gen.parameters() if id(p) not in shared]
    assert own and sum(p.numel() for p in gen.parameters()) == sum(p.numel() for p in enc.parameters()) + sum(
        p.numel() for p in own
    )
    other = enc.generator()  # built anew: its own later layers, the same shared ones
    assert other.layers[35] is not gen.layers[35] and other.layers[3] is gen.layers[3]


def test_mistral_images_enter_the_input(mistral_vlm):
    gen = mistral_vlm
    ids_text, emb_text = gen.chat_inputs(SYSTEM_PROMPT_T2I, "make the sky green")
    ids_img, emb_img = gen.chat_inputs(SYSTEM_PROMPT_I2I, "make the sky green", images=[_image(0)])
    assert 10 not in ids_text and ids_img.count(10) > 0 and ids_img.count(13) == 1  # [IMG] ... [IMG_END]
    assert gen.tokenizer.text_ids(SYSTEM_PROMPT_I2I)[:5] == ids_img[2:7]
    assert gen.tokenizer.text_ids(SYSTEM_PROMPT_T2I)[:5] == ids_text[2:7]
    _, emb_other = gen.chat_inputs(SYSTEM_PROMPT_I2I, "make the sky green", images=[_image(1)])
    slots = torch.tensor(ids_img) == 10
    plain = gen.embed_tokens(torch.tensor(ids_img))
    assert not torch.allclose(emb_img[0, slots], plain[slots])  # vision features replaced [IMG] embeddings
    assert not torch.allclose(emb_img[0, slots], emb_other[0, slots])  # and depend on the picture
    assert_close(emb_img[0, ~slots], plain[~slots])
    # several references are joined side by side into one picture
    ids_two, _ = gen.chat_inputs(
        SYSTEM_PROMPT_I2I, "make the sky green", images=[_image(0), np.uint8(_image(1)[0] * 255)]
    )
    assert ids_two.count(10) > ids_img.count(10)
    ids_batch, _ = gen.chat_inputs(
        SYSTEM_PROMPT_I2I, "make the sky green", images=[torch.cat([_image(0), _image(1)])]
    )
    pair, _ = gen.chat_inputs(SYSTEM_PROMPT_I2I, "make the sky green", [_image(0), _image(1)])
    assert ids_batch.count(10) == pair.count(10)
    out = gen.upsample("make the sky green", images=[_image(0)], seed=1, max_new_tokens=3)
    assert out == gen.tokenizer.decode(gen.generate_ids(emb_img, seed=1, max_new_tokens=3)).strip()


def test_qwen_upsampling_is_text_only(qwen_lm, caplog):
    ids_img, emb = qwen_lm.chat_inputs(SYSTEM_PROMPT_I2I, "add a hat", images=[_image(0)])
    assert any("text only" in r.getMessage() for r in caplog.records)
    assert 151655 not in ids_img  # no image placeholder
    assert qwen_lm.tokenizer.text_ids(SYSTEM_PROMPT_I2I)[:5] == ids_img[3:8]  # edit system prompt
    assert emb.shape == (1, len(ids_img), 64)
    # the upsampler picks the edit system prompt because images were given, even if unseen
    _, emb_up = qwen_lm.chat_inputs(SYSTEM_PROMPT_I2I, "add a hat")
    assert_close(emb_up, emb)


def test_upsample_bad_settings(qwen_lm):
    with pytest.raises(InputError):
        qwen_lm.upsample("x", max_new_tokens=0)
    with pytest.raises(InputError):
        qwen_lm.upsample(None)
    with pytest.raises(InputError):
        qwen_lm.upsample("x", images=["not an image"], max_new_tokens=1)
    with pytest.raises(InputError, match="surrogate"):
        qwen_lm.next_token_logits("system", "bad \ud800")


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
