"""The content filter: the NSFW classifier and the VLM integrity check over prompts and images.

A flagged item raises ``ContentFlagged``, whose message says which check flagged which input (and
which image of a batch), with the score and the threshold, so a run stops with a clear reason.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import Flux2Error, InputError
from .integrity import DEFAULT_VLM_THRESHOLD, NO_VISION, IntegrityJudge
from .nsfw import DEFAULT_NSFW_THRESHOLD, NsfwClassifier

logger = logging.getLogger(__name__)

NSFW_CHECK = "NSFW classifier"
VLM_CHECK = "VLM integrity check (copyrighted characters, trademarks, public figures)"
_ADVICE = {
    NSFW_CHECK: "Change the prompt, seed or image; if this is a false positive, raise nsfw_threshold.",
    VLM_CHECK: "Describe the subject without naming the character, brand or person; if this is a false "
    "positive, raise vlm_threshold.",
}


@dataclass(frozen=True)
class Finding:
    """One flagged item.

    Attributes:
        check: ``NSFW_CHECK`` or ``VLM_CHECK``.
        input_name: the node input it came from ("prompt", "reference_images", "images").
        item: what it is, e.g. "output image 2 of 4" or "the prompt".
        score: the check's score in [0, 1].
        threshold: the threshold it exceeded.
    """

    check: str
    input_name: str
    item: str
    score: float
    threshold: float

    def message(self) -> str:
        kind = "nsfw score" if self.check == NSFW_CHECK else 'P("yes")'
        return (
            f"Content filter stopped the run: {self.item} (input '{self.input_name}') was flagged by the "
            f"{self.check}: {kind} {self.score:.3f} > threshold {self.threshold:.3f}. {_ADVICE[self.check]}"
        )


class ContentFlagged(Flux2Error):
    """A prompt or image was flagged by the content filter; ``.finding`` says which and why."""

    def __init__(self, finding: Finding):
        self.finding = finding
        super().__init__(finding.message())


def _check_threshold(name: str, value: float) -> float:
    if not 0.0 <= float(value) <= 1.0:
        raise InputError(f"{name} must be between 0 and 1, got {value}.")
    return float(value)


class ContentFilter:
    """Runs the enabled checks and raises ``ContentFlagged`` on the first flagged item.

    Args:
        classifier: the NSFW image classifier, or None to skip it.
        judge: the VLM integrity judge, or None to skip the VLM check.
        nsfw_threshold: an image whose "nsfw" score is above this is flagged (BFL: 0.85).
        vlm_threshold: an item whose P("yes") is above this is flagged (0.5 = the greedy answer).
        judge_images: also ask the VLM about images (not only the prompt).
    """

    def __init__(
        self,
        classifier: NsfwClassifier | None = None,
        judge: IntegrityJudge | None = None,
        nsfw_threshold: float = DEFAULT_NSFW_THRESHOLD,
        vlm_threshold: float = DEFAULT_VLM_THRESHOLD,
        judge_images: bool = True,
    ):
        self.classifier = classifier
        self.judge = judge
        self.nsfw_threshold = _check_threshold("nsfw_threshold", nsfw_threshold)
        self.vlm_threshold = _check_threshold("vlm_threshold", vlm_threshold)
        self.judge_images = judge_images
        if judge is not None and judge_images and not judge.sees_images:
            raise InputError(NO_VISION)

    def check_prompt(self, prompt: str, input_name: str = "prompt") -> float | None:
        """VLM check of a prompt (skipped when empty or without judge); returns P("yes") or None."""
        if self.judge is None or not prompt.strip():
            return None
        score = self.judge.prompt_score(prompt)
        logger.info("content filter: prompt P(yes) %.3f (threshold %.3f)", score, self.vlm_threshold)
        if score > self.vlm_threshold:
            raise ContentFlagged(Finding(VLM_CHECK, input_name, "the prompt", score, self.vlm_threshold))
        return score

    def check_images(self, images: Sequence, input_name: str, label: str = "image") -> None:
        """NSFW classifier on every image, then the VLM check on every image (if enabled).

        Args:
            images: PIL images.
            input_name: the node input they came from.
            label: what to call one of them in a message ("output image", "reference image").
        """
        n = len(images)

        def item(i: int) -> str:
            return f"{label} {i + 1} of {n}" if n > 1 else label

        if self.classifier is not None:
            for i, score in enumerate(self.classifier.scores(images)):
                logger.info(
                    "content filter: %s nsfw %.3f (threshold %.3f)", item(i), score, self.nsfw_threshold
                )
                if score > self.nsfw_threshold:
                    raise ContentFlagged(Finding(NSFW_CHECK, input_name, item(i), score, self.nsfw_threshold))
        if self.judge is not None and self.judge_images:
            for i, image in enumerate(images):
                score = self.judge.image_score(image)
                logger.info(
                    "content filter: %s P(yes) %.3f (threshold %.3f)", item(i), score, self.vlm_threshold
                )
                if score > self.vlm_threshold:
                    raise ContentFlagged(Finding(VLM_CHECK, input_name, item(i), score, self.vlm_threshold))
