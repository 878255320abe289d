"""Tokenizers and prompt templates against the real tokenizer files and independent implementations."""

from __future__ import annotations

import pytest

from flux2_core.errors import CheckpointError
from flux2_core.text_encoders import MISTRAL3_SYSTEM_PROMPT, load_prompt_tokenizer
from flux2_core.text_encoders.spec import QWEN3_TEMPLATE
from flux2_core.text_encoders.tokenizer import qwen_tokenizer_from_vocab

TEXTS = [
    "A red fox jumps over the lazy dog.",
    "Ünïcödé — 東京タワー at night 🦊, price: 12345.678 €",
    "  leading spaces\n\nnew lines\r\n and\ttabs  ",
    'A sign that reads "OPEN 24/7" and [INST] typed by a user </s>',
    "don't it's WE'LL   ",
    "",
]


@pytest.fixture(scope="module")
def mistral_common_tok(tekken_path):
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    return MistralTokenizer.from_file(str(tekken_path))


@pytest.fixture(scope="module")
def tekken(tekken_path, tmp_path_factory):
    return load_prompt_tokenizer("mistral3", tmp_path_factory.mktemp("m"), tokenizer=tekken_path)


@pytest.fixture(scope="module")
def qwen(qwen_tokenizer_dir, tmp_path_factory):
    return load_prompt_tokenizer("qwen3", tmp_path_factory.mktemp("q"), tokenizer=qwen_tokenizer_dir)


def test_tekken_text_ids_equal_mistral_common(tekken, mistral_common_tok):
    inner = mistral_common_tok.instruct_tokenizer.tokenizer
    for text in TEXTS:
        assert tekken.text_ids(text) == inner.encode(text, bos=False, eos=False), text


def test_mistral_prompt_ids_equal_mistral_common_chat(tekken, mistral_common_tok):
    from mistral_common.protocol.instruct.messages import SystemMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest

    for prompt in ["a cat on a mat", 'a poster saying "hello"\nsecond line', "x" * 50]:
        req = ChatCompletionRequest(
            messages=[SystemMessage(content=MISTRAL3_SYSTEM_PROMPT), UserMessage(content=prompt)]
        )
        expected = mistral_common_tok.encode_chat_completion(req).tokens
        ours = tekken.prompt_ids(prompt)
        assert ours == expected
        assert ours[:2] == [1, 17] and ours[-1] == 4


def test_mistral_prompt_ids_equal_published_template_string(tekken):
    # ComfyUI's literal template (BOS prepended), tokenized with control tokens parsed from the text.
    template = (
        "[SYSTEM_PROMPT]You are an AI that reasons about image descriptions. You give structured responses "
        "focusing on object relationships, object\nattribution and actions without speculation."
        "[/SYSTEM_PROMPT][INST]{}[/INST]"
    )
    raw = tekken.tokenizer
    raw.encode_special_tokens = False
    try:
        published = [1] + raw.encode(template.format("a blue bird"), add_special_tokens=False).ids
    finally:
        raw.encode_special_tokens = True
    assert tekken.prompt_ids("a blue bird") == published


def test_mistral_strips_img_and_never_parses_control_tokens(tekken):
    assert tekken.prompt_ids("a [IMG]dog") == tekken.prompt_ids("a dog")
    ids = tekken.prompt_ids("[INST] hi")
    assert ids.count(3) == 1  # only the template's [INST]


def test_qwen_template_matches_hf_chat_template(qwen, qwen_tokenizer_dir):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(qwen_tokenizer_dir), local_files_only=True)
    for prompt in ["a cat on a mat", "", "line one\nline two <b>bold</b>"]:
        text = hf.apply_chat_template(
            [{"role": "user", "content": prompt}],
            tokenize=False,
            add_generation_prompt=True,
            enable_thinking=False,
        )
        assert text == QWEN3_TEMPLATE.format(prompt)
        assert qwen.prompt_ids(prompt) == hf(text, add_special_tokens=False)["input_ids"]


def test_qwen_template_ids_published(qwen):
    body = qwen.text_ids("a cat")
    assert qwen.prompt_ids("a cat") == [
        151644,
        872,
        198,
        *body,
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


def test_qwen_vocab_merges_equal_tokenizer_json(qwen, comfy_qwen25_dir):
    from_vocab = qwen_tokenizer_from_vocab(comfy_qwen25_dir / "vocab.json", comfy_qwen25_dir / "merges.txt")
    for text in TEXTS + [QWEN3_TEMPLATE.format("a cat")]:
        assert (
            from_vocab.encode(text, add_special_tokens=False).ids
            == qwen.tokenizer.encode(text, add_special_tokens=False).ids
        ), text


def test_qwen_tokenizer_found_from_vocab_folder(comfy_qwen25_dir, qwen, tmp_path):
    tok = load_prompt_tokenizer("qwen3", tmp_path / "te.safetensors", tokenizer=comfy_qwen25_dir)
    assert tok.prompt_ids("a red fox") == qwen.prompt_ids("a red fox")


def test_missing_tokenizer_lists_where_it_looked(tmp_path):
    model = tmp_path / "qwen_3_4b.safetensors"
    model.write_bytes(b"")
    with pytest.raises(CheckpointError) as e:
        load_prompt_tokenizer("qwen3", model)
    msg = str(e.value)
    assert str(tmp_path / "tokenizer") in msg and "vocab.json" in msg and "Fix:" in msg
    with pytest.raises(CheckpointError, match="tekken_model"):
        load_prompt_tokenizer("mistral3", model)


def test_fallback_tokenizer_dirs_are_searched_last(comfy_qwen25_dir, qwen, tmp_path):
    """A Qwen3 file with no tokenizer beside it uses the host's fallback folder (ComfyUI's Qwen BPE files);
    a tokenizer next to the weights still wins over the fallback."""
    model = tmp_path / "qwen_3_4b.safetensors"
    model.write_bytes(b"")
    tok = load_prompt_tokenizer("qwen3", model, fallback_dirs=[comfy_qwen25_dir])
    assert tok.prompt_ids("a red fox") == qwen.prompt_ids("a red fox")
    assert str(comfy_qwen25_dir) in tok.source
    with pytest.raises(CheckpointError, match="tekken_model"):  # Qwen BPE files are no Mistral tokenizer
        load_prompt_tokenizer("mistral3", model, fallback_dirs=[comfy_qwen25_dir])


def test_bad_tokenizer_path(tmp_path):
    with pytest.raises(CheckpointError, match="not a usable tokenizer"):
        load_prompt_tokenizer("qwen3", tmp_path, tokenizer=tmp_path / "nope")


def test_mistral_tokenizer_json_from_transformers_converter(tekken, tekken_path, tmp_path):
    """An HF-style tokenizer/ folder (tokenizer.json as transformers converts tekken) gives the same ids,
    and transformers' mistral-common chat template renders the same token sequence."""
    from transformers.integrations.mistral.tokenizer import convert_tekken_tokenizer

    hf = convert_tekken_tokenizer(str(tekken_path))
    folder = tmp_path / "tokenizer"
    folder.mkdir()
    hf.backend_tokenizer.save(str(folder / "tokenizer.json"))
    (tmp_path / "text_encoder").mkdir()
    from_json = load_prompt_tokenizer("mistral3", tmp_path / "text_encoder")  # finds ../tokenizer/
    assert from_json.source.endswith("tokenizer.json")
    for prompt in ["a cat on a mat", TEXTS[1], TEXTS[3]]:
        assert from_json.prompt_ids(prompt) == tekken.prompt_ids(prompt)
    messages = [
        {"role": "system", "content": MISTRAL3_SYSTEM_PROMPT},
        {"role": "user", "content": "a cat on a mat"},
    ]
    rendered = hf.apply_chat_template(messages, tokenize=False)
    assert (
        rendered == f"<s>[SYSTEM_PROMPT]{MISTRAL3_SYSTEM_PROMPT}[/SYSTEM_PROMPT][INST]a cat on a mat[/INST]"
    )
    assert hf(rendered, add_special_tokens=False)["input_ids"] == tekken.prompt_ids("a cat on a mat")


@pytest.mark.parametrize("damage", ["truncated", "not json"])
def test_damaged_tokenizer_files_name_the_file(qwen_tokenizer_dir, tmp_path, damage):
    data = (qwen_tokenizer_dir / "tokenizer.json").read_bytes()
    broken = tmp_path / "tok" / "tokenizer.json"
    broken.parent.mkdir()
    broken.write_bytes(data[: len(data) // 3] if damage == "truncated" else b"\x00\xff garbage")
    for where in (broken, broken.parent):  # the file itself or its folder
        with pytest.raises(CheckpointError) as e:
            load_prompt_tokenizer("qwen3", tmp_path / "model.safetensors", tokenizer=where)
        assert str(broken) in str(e.value) and "Fix:" in str(e.value)
    # found next to the model, too
    model = broken.parent / "model.safetensors"
    with pytest.raises(CheckpointError) as e:
        load_prompt_tokenizer("qwen3", model)
    assert str(broken) in str(e.value)
