"""The VLM integrity check: does a prompt or an image involve copyrighted characters, trademarks or
public figures?

As in BFL's reference, the text encoder's own language model is asked a fixed question and its
first answer token is restricted to "yes" / "no": the decision compares those logits only (the
rest of the vocabulary can never win). Here both spellings count ("yes"/"Yes", "no"/"No"), and the
result is the probability of "yes" within that pair, so a threshold of 0.5 is the greedy answer.
Images are scaled to about 512 x 512 pixels first (enough to recognise a face or a logo).
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch

from ..errors import CheckpointError, InputError
from .chat import ChatModel

logger = logging.getLogger(__name__)

DEFAULT_VLM_THRESHOLD = 0.5
YES_WORDS = ("yes", "Yes")
NO_WORDS = ("no", "No")
IMAGE_PIXELS = 512 * 512
NO_VISION = (
    "the VLM check of images needs a text encoder that can look at images, and the connected one cannot "
    "(Qwen3 is text-only; Mistral needs its vision tower, in the Hugging Face text_encoder/ folder). Set "
    "vlm_check to 'prompt' or connect Mistral Small 3.x with its vision tower."
)

SYSTEM_PROMPT = (
    "You review text prompts and images for an image generator. Your job is to spot copyrighted "
    "characters, trademarked logos or brands, and real public figures."
)
TEXT_QUESTION = """Decide whether the image request below raises a copyright or likeness concern.

Answer "yes" if the request names a character from copyrighted media (films, series, comics, games, books and the like), mentions a trademarked brand or logo, or names or unmistakably describes a specific real, living public figure (actors, musicians, politicians, athletes, influencers and the like).
Answer "no" in every other case, including when you cannot tell which specific work or person is meant. A general description of a kind of person, or of a style, is not enough for "yes". Judge only the words of the request, not what an image of it might show.

Request:
-----
{prompt}
-----

Does this request involve a copyrighted character, a trademark or a public figure? Answer with one word: yes or no."""
IMAGE_QUESTION = """Decide whether the image raises a copyright or likeness concern.

Answer "yes" if it shows a recognisable character from copyrighted media (films, series, comics, games and the like), a trademarked logo or brand, or a recognisable real public figure (celebrities, politicians, athletes, influencers, historical figures and the like).
Answer "no" in every other case, including when you cannot name the specific work or person. General traits of a person are not enough for "yes". Judge only what is visible.

Does this image show a copyrighted character, a trademark or a public figure? Answer with one word: yes or no."""


def answer_token_ids(chat: ChatModel) -> tuple[list[int], list[int]]:
    """The single-token ids of the "yes" and "no" spellings in the model's vocabulary.

    Raises:
        CheckpointError: the tokenizer splits "yes" or "no" into several tokens.
    """
    ids = {}
    for word in (*YES_WORDS, *NO_WORDS):
        toks = chat.token_ids(word)
        if len(toks) == 1:
            ids[word] = toks[0]
    if YES_WORDS[0] not in ids or NO_WORDS[0] not in ids:
        raise CheckpointError(
            None,
            "the text encoder's tokenizer has no single token for 'yes' or 'no', so it cannot answer "
            "the integrity check.",
            "Use the tokenizer that belongs to the encoder (Mistral Small 3.x or Qwen3).",
        )
    yes = sorted({ids[w] for w in YES_WORDS if w in ids})
    no = sorted({ids[w] for w in NO_WORDS if w in ids})
    return yes, no


def _scaled(image) -> np.ndarray:
    """A PIL image scaled (either way) to about ``IMAGE_PIXELS`` pixels, keeping its aspect ratio.

    Returns:
        (h, w, 3) uint8 RGB array.
    """
    from PIL import Image

    w, h = image.size
    f = math.sqrt(IMAGE_PIXELS / (w * h))
    return np.array(image.convert("RGB").resize((max(1, round(w * f)), max(1, round(h * f))), Image.BICUBIC))


class IntegrityJudge:
    """Asks a ``ChatModel`` the integrity question about prompts and images.

    Args:
        chat: the language model (e.g. ``EncoderChat(text_encoder)``).
    """

    def __init__(self, chat: ChatModel):
        self.chat = chat
        self.yes_ids, self.no_ids = answer_token_ids(chat)

    @property
    def sees_images(self) -> bool:
        return self.chat.sees_images

    def yes_probability(self, user: str, images: list | None = None) -> float:
        """P("yes") of the first answer token, with the vocabulary restricted to yes/no spellings."""
        logits = self.chat.next_token_logits(SYSTEM_PROMPT, user, images)  # (vocab,)
        yes = torch.logsumexp(logits[self.yes_ids], dim=0)
        no = torch.logsumexp(logits[self.no_ids], dim=0)
        return float(torch.sigmoid(yes - no))

    def prompt_score(self, prompt: str) -> float:
        """P("yes") that ``prompt`` names a copyrighted character, a trademark or a public figure."""
        if not isinstance(prompt, str):
            raise InputError(f"the prompt to check is a {type(prompt).__name__}, not text.")
        return self.yes_probability(TEXT_QUESTION.format(prompt=prompt.replace("[IMG]", "")))

    def image_score(self, image) -> float:
        """P("yes") that a PIL ``image`` shows a copyrighted character, a trademark or a public figure.

        Raises:
            InputError: the model cannot see images (Qwen3, or a Mistral file without vision tower).
        """
        if not self.sees_images:
            raise InputError(NO_VISION)
        return self.yes_probability(IMAGE_QUESTION, [_scaled(image)])
