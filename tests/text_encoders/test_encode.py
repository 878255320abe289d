"""Prompt embeddings against transformers' own full-model forward on the same random weights."""

from __future__ import annotations

import logging

import pytest
import torch
from torch.testing import assert_close

from flux2_core.text_encoders import load_text_encoder

PROMPTS = ["a red fox in the snow, photo", ""]


@pytest.mark.parametrize("kind", ["mistral3", "qwen3-4b"])
def test_stacked_states_equal_transformers_full_model(kind, encoder, reference, ref_stack):
    """Our truncated run (30 / 27 layers) equals hidden_states[...] of the full 40 / 36-layer model."""
    enc = encoder(kind, "hf")
    assert len(enc.model.layers) == enc.spec.layers_needed  # truncated before running
    assert not any(n.startswith(("lm_head", "vision")) for n, _ in enc.named_parameters())  # encoding only
    ids, mask = enc.tokenize(PROMPTS)
    expected = ref_stack(reference(kind), ids, mask, enc.spec.hidden_layers)
    assert reference(kind).config.get_text_config().num_hidden_layers == (40 if kind == "mistral3" else 36)
    out = enc.encode(PROMPTS)
    assert out.shape == (2, 512, enc.context_dim) == (2, 512, 3 * 64)
    assert_close(out, expected)


def test_independent_transformers_load_of_the_hf_folder(tiny_file, encoder, ref_stack):
    """transformers' own from_pretrained of the written folder gives the same states as our loader."""
    from transformers import Mistral3ForConditionalGeneration

    path = tiny_file("mistral3", "hf")
    ref = Mistral3ForConditionalGeneration.from_pretrained(
        path / "text_encoder", dtype=torch.float32, local_files_only=True
    ).eval()
    enc = encoder("mistral3", "hf")
    ids, mask = enc.tokenize(["a lighthouse"])
    assert_close(enc.encode(["a lighthouse"]), ref_stack(ref, ids, mask, (10, 20, 30)))


def test_encoding_after_a_generator_was_built_runs_only_the_encoder_layers(tiny_file, reference, ref_stack):
    """A generator shares the encoder's layers and adds more; encoding still stops at layer 27 and agrees."""
    enc = load_text_encoder(tiny_file("qwen3-4b", "hf"), dtype=torch.float32, cache=None)
    gen = enc.generator()
    assert len(gen.layers) == 36 and len(enc.model.layers) == 27
    calls = []
    hooks = [
        layer.register_forward_hook(lambda m, a, o, i=i: calls.append(i))
        for i, layer in enumerate(gen.layers)
    ]
    ids, mask = enc.tokenize(PROMPTS)
    out = enc.encode(PROMPTS)
    for h in hooks:
        h.remove()
    assert calls == list(range(27))  # layers 28..36 and the head never run
    assert_close(out, ref_stack(reference("qwen3-4b"), ids, mask, (9, 18, 27)))


def test_mistral_left_padding(encoder):
    enc = encoder("mistral3", "comfyui")
    ids, mask = enc.tokenize(["a cat"])
    n = int(mask.sum())
    assert ids.shape == (1, 512)
    assert (ids[0, : 512 - n] == 11).all() and (mask[0, : 512 - n] == 0).all()
    assert ids[0, 512 - n : 512 - n + 2].tolist() == [1, 17] and ids[0, -1] == 4


def test_qwen_right_padding(encoder):
    enc = encoder("qwen3-4b", "comfyui")
    ids, mask = enc.tokenize(["a cat"])
    n = int(mask.sum())
    assert ids[0, :3].tolist() == [151644, 872, 198]
    assert (ids[0, n:] == 151643).all() and (mask[0, n:] == 0).all() and (mask[0, :n] == 1).all()


def test_batch_rows_equal_single_prompts(encoder):
    enc = encoder("mistral3", "comfyui")
    both = enc.encode(["a cat", "a much longer prompt about a dog running on a beach at sunset"])
    assert_close(both[0], enc.encode("a cat")[0])
    assert_close(both[1], enc.encode(["a much longer prompt about a dog running on a beach at sunset"])[0])


@pytest.mark.parametrize("kind", ["mistral3", "qwen3-4b"])
def test_long_prompt_truncated_with_warning(kind, encoder, reference, ref_stack, caplog):
    enc = encoder(kind, "hf")
    prompt = " ".join(f"word{i}" for i in range(600))
    full = enc.tokenizer.prompt_ids(prompt)
    assert len(full) > 512
    with caplog.at_level(logging.WARNING, logger="flux2_core.text_encoders.encoder"):
        ids, mask = enc.tokenize([prompt])
        out = enc.encode([prompt])
    assert any("only the first 512" in r.getMessage() for r in caplog.records)
    assert ids[0].tolist() == full[:512] and bool(mask.all())
    assert out.shape == (1, 512, enc.context_dim)
    if kind == "mistral3":  # one reference run suffices: no padding is left in either case
        assert_close(out, ref_stack(reference(kind), ids, mask, enc.spec.hidden_layers))


def test_empty_prompt_is_the_bare_template(encoder):
    enc = encoder("qwen3-4b", "hf")
    ids, mask = enc.tokenize([""])
    assert ids[0, : int(mask.sum())].tolist() == [
        151644,
        872,
        198,
        151645,
        198,
        151644,
        77091,
        198,
        151667,
        271,
        151668,
        271,
    ]
    out = enc.encode("")
    assert out.shape == (1, 512, 192) and torch.isfinite(out).all()


def test_bad_prompts(encoder):
    from flux2_core.errors import InputError

    enc = encoder("qwen3-4b", "hf")
    with pytest.raises(InputError):
        enc.encode([])
    with pytest.raises(InputError, match="not text"):
        enc.encode([None])


def test_streamable_blocks_name_the_decoder_layers(encoder):
    enc = encoder("mistral3", "comfyui")
    (path,) = enc.streamable_blocks
    blocks = enc.get_submodule(path)
    assert isinstance(blocks, torch.nn.ModuleList) and len(blocks) == 30


def test_bf16_encode_close_to_fp32(tiny_file, encoder):
    from flux2_core.text_encoders import load_text_encoder

    enc16 = load_text_encoder(tiny_file("qwen3-4b", "hf"), dtype=torch.bfloat16, cache=None)
    out16 = enc16.encode("a cat")
    assert out16.dtype == torch.bfloat16
    ref = encoder("qwen3-4b", "hf").encode("a cat")
    assert_close(out16.float(), ref, atol=0.15, rtol=0.1)


class _LengthSpy:
    """Wraps a tokenizers.Tokenizer and records the length of every text it is asked to encode."""

    def __init__(self, inner):
        self.inner, self.lengths = inner, []

    def encode(self, text, *args, **kwargs):
        self.lengths.append(len(text))
        return self.inner.encode(text, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.mark.parametrize("kind", ["mistral3", "qwen3-4b"])
@pytest.mark.parametrize(
    "make",
    [
        lambda n: " ".join(f"word{i % 997}, the fox" for i in range(n // 16))[:n],
        lambda n: "a" * n,  # one endless word: a single pre-token
        lambda n: ("🦊 東京 " * n)[:n],
    ],
    ids=["words", "one-word", "wide-characters"],
)
def test_huge_prompt_is_cut_before_tokenizing_and_gives_the_same_tokens(kind, make, encoder, monkeypatch):
    enc = encoder(kind, "hf")
    spec = enc.spec
    moderate = make(40_000)  # tokenized whole, for the expected ids
    expected = enc.tokenizer.prompt_ids(moderate)[: spec.max_length]
    assert len(expected) == spec.max_length
    spy = _LengthSpy(enc.tokenizer.tokenizer)
    monkeypatch.setattr(enc.tokenizer, "tokenizer", spy)
    ids, mask = enc.tokenize([moderate])
    assert ids[0].tolist() == expected and bool(mask.all())
    huge = make(10_000_000)
    assert huge[:40_000] == moderate
    spy.lengths.clear()
    ids, _ = enc.tokenize([huge])
    assert ids[0].tolist() == expected
    assert max(spy.lengths) < 200_000, spy.lengths  # never the 10 million characters


@pytest.mark.parametrize("kind", ["mistral3", "qwen3-4b"])
def test_no_deprecated_transformers_api(kind, tiny_file, ref_stack, reference):
    """transformers announces removals with FutureWarning/DeprecationWarning (e.g. create_causal_mask's
    past_key_values, removed in 5.40): as errors here, CI fails before a release breaks the encoder."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        enc = load_text_encoder(tiny_file(kind, "hf"), dtype=torch.float32, cache=None)
        ids, mask = enc.tokenize(["a cat", "a much longer prompt about a dog on a beach"])  # padded rows
        out = enc.hidden_states(ids, mask)
        gen = enc.generator()  # and writing text: the KV-cached decoder loop
        written = gen.generate_ids(gen.chat_inputs("system", "a cat")[1], max_new_tokens=3, temperature=0)
    assert_close(out, ref_stack(reference(kind), ids, mask, enc.spec.hidden_layers))
    assert len(written) == 3
