"""The VLM integrity check: yes/no restricted to two answers, on tiny Mistral judges set to "yes" or
"no", parity of the logits with transformers, images entering the question, and unusable encoders."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from flux2_core.errors import CheckpointError, InputError
from flux2_core.safety import VLM_CHECK, ContentFilter, ContentFlagged, EncoderChat, IntegrityJudge
from flux2_core.safety.integrity import IMAGE_QUESTION, SYSTEM_PROMPT, TEXT_QUESTION
from flux2_core.tiny.safety import DECOY_TOKEN


@pytest.fixture(scope="module")
def random_mistral(tmp_path_factory):
    """The tiny Mistral pipeline folder with random weights (no judge edits), fully loaded."""
    from flux2_core.text_encoders import load_text_encoder
    from flux2_core.tiny.text_encoder import write_tiny_text_encoder

    root = write_tiny_text_encoder(
        tmp_path_factory.mktemp("mistral") / "m", kind="mistral3", layout="hf", seed=4
    )
    return load_text_encoder(root / "text_encoder", dtype=torch.float32, cache=None)


def _image(seed: int, h: int = 300, w: int = 200) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("answer", ["yes", "no"])
def test_judge_answers_through_the_yes_no_restriction(judge_encoder, answer):
    chat = EncoderChat(judge_encoder(answer))
    judge = IntegrityJudge(chat)
    logits = chat.next_token_logits(SYSTEM_PROMPT, TEXT_QUESTION.format(prompt="a cat on a sofa"))
    assert int(logits.argmax()) == DECOY_TOKEN  # unrestricted greedy decoding would answer neither
    p_yes = judge.prompt_score("a cat on a sofa")
    assert (p_yes > 0.99) if answer == "yes" else (p_yes < 0.01)
    assert judge.image_score(_image(0)) == pytest.approx(p_yes, abs=1e-6)  # same last token, same state


def test_flagged_prompt_and_image_stop_with_check_and_input_named(judge_encoder):
    checks = ContentFilter(judge=IntegrityJudge(EncoderChat(judge_encoder("yes"))))
    with pytest.raises(ContentFlagged) as e:
        checks.check_prompt("Mickey Mouse waving", "prompt")
    f = e.value.finding
    assert f.check == VLM_CHECK and f.input_name == "prompt" and f.item == "the prompt" and f.threshold == 0.5
    assert "the prompt (input 'prompt') was flagged by the VLM integrity check" in str(e.value)
    with pytest.raises(ContentFlagged) as e:
        checks.check_images([_image(1), _image(2)], "reference_images", "reference image")
    assert (
        e.value.finding.item == "reference image 1 of 2" and e.value.finding.input_name == "reference_images"
    )
    # threshold above the score: passes
    lenient = ContentFilter(judge=IntegrityJudge(EncoderChat(judge_encoder("yes"))), vlm_threshold=1.0)
    lenient.check_prompt("Mickey Mouse waving")


def test_no_judge_passes_prompt_and_images(judge_encoder):
    checks = ContentFilter(judge=IntegrityJudge(EncoderChat(judge_encoder("no"))))
    assert checks.check_prompt("a red bicycle") < 0.01
    checks.check_images([_image(3)], "images", "output image")
    assert checks.check_prompt("   ") is None  # empty prompts are not asked about


def test_logits_match_transformers_for_text_and_image(random_mistral):
    """Our chat (the generator's embedding, full decoder, head) against transformers' own model forward."""
    from flux2_core.text_encoders.vlm_images import prepare_vlm_image
    from flux2_core.tiny.text_encoder import tiny_reference_model

    ref = tiny_reference_model("mistral3", seed=4)
    chat = EncoderChat(random_mistral)
    user = TEXT_QUESTION.format(prompt="a lighthouse at dusk")
    ids, _ = chat.generator.chat_inputs(SYSTEM_PROMPT, user)
    with torch.no_grad():
        expected = ref(input_ids=torch.tensor([ids])).logits[0, -1]
    torch.testing.assert_close(chat.next_token_logits(SYSTEM_PROMPT, user), expected, atol=2e-4, rtol=1e-4)
    picture = np.array(_image(5))  # (H, W, 3) uint8
    ids, _ = chat.generator.chat_inputs(SYSTEM_PROMPT, IMAGE_QUESTION, [picture])
    pixels = prepare_vlm_image([picture], unit=28)
    with torch.no_grad():
        expected = ref(
            input_ids=torch.tensor([ids]),
            pixel_values=pixels[None],
            image_sizes=torch.tensor([list(pixels.shape[1:])]),
        ).logits[0, -1]
    got = chat.next_token_logits(SYSTEM_PROMPT, IMAGE_QUESTION, [picture])
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-4)


def test_prompt_and_image_enter_the_question(random_mistral):
    judge = IntegrityJudge(EncoderChat(random_mistral))
    a, b = judge.prompt_score("a lighthouse at dusk"), judge.prompt_score("three apples on a table")
    assert 0 < a < 1 and 0 < b < 1 and a != b
    assert judge.image_score(_image(6)) != judge.image_score(_image(7))


def test_qwen_checks_prompts_only(tmp_path):
    from flux2_core.text_encoders import load_text_encoder
    from flux2_core.tiny.text_encoder import write_tiny_text_encoder

    # The Hugging Face folder of Qwen3-4B: its config says the output head is the embedding (tied).
    root = write_tiny_text_encoder(tmp_path / "qwen3", kind="qwen3-4b", layout="hf")
    judge = IntegrityJudge(
        EncoderChat(load_text_encoder(root / "text_encoder", dtype=torch.float32, cache=None))
    )
    assert not judge.sees_images
    assert 0 < judge.prompt_score("a lighthouse at dusk") < 1  # the tied head of Qwen3-4B answers
    with pytest.raises(InputError, match="Qwen3 is text-only"):
        ContentFilter(judge=judge, judge_images=True)
    with pytest.raises(InputError, match="Qwen3 is text-only"):
        judge.image_score(_image(0))
    text_only = ContentFilter(judge=judge, judge_images=False, vlm_threshold=1.0)
    assert text_only.check_prompt("a lighthouse at dusk") == pytest.approx(
        judge.prompt_score("a lighthouse at dusk")
    )


def test_comfyui_mistral_file_without_head_is_a_clear_error(tmp_path):
    from flux2_core.text_encoders import load_text_encoder
    from flux2_core.tiny.text_encoder import write_tiny_text_encoder

    path = write_tiny_text_encoder(tmp_path / "mistral_3_small_flux2_bf16.safetensors", kind="mistral3")
    encoder = load_text_encoder(path, dtype=torch.float32, cache=None)
    with pytest.raises(
        CheckpointError, match=r"no output head.*VLM check needs the encoder's language-model head"
    ):
        EncoderChat(encoder)
