"""NSFW image classifier: a Hugging Face image-classification folder run through transformers' pipeline.

BFL's reference uses a ViT image classifier with an "nsfw" label (Falconsai/nsfw_image_detection)
and flags an image whose "nsfw" score is above 0.85. Here the user puts such a folder
(``config.json``, ``model.safetensors``, ``preprocessor_config.json``) on disk; it is loaded from
local files only (never from a hub) and only from safetensors (never unpickled).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

from ..errors import CheckpointError
from .deps import require

logger = logging.getLogger(__name__)

NSFW_LABEL = "nsfw"
DEFAULT_NSFW_THRESHOLD = 0.85  # BFL's reference value
_FOLDER_FIX = (
    "put a Hugging Face image-classification model with an 'nsfw' label (for example "
    "Falconsai/nsfw_image_detection: config.json, model.safetensors, preprocessor_config.json) in "
    "its own folder under ComfyUI/models/safety/ and refresh the node list."
)


def is_classifier_folder(path: str | os.PathLike) -> bool:
    """True if ``path`` looks like an image-classification folder (config.json + safetensors weights)."""
    p = Path(path)
    return (p / "config.json").is_file() and any(p.glob("*.safetensors"))


class NsfwClassifier:
    """An image-classification pipeline and the index of its "nsfw" label.

    Args:
        folder: the model folder.
        device: where the classifier runs ("cpu" by default: a ViT-base costs little next to FLUX.2).
    """

    def __init__(self, folder: str | os.PathLike, device: str = "cpu"):
        p = Path(folder)
        if not p.is_dir():
            raise CheckpointError(
                p, "is not a folder (the NSFW classifier folder was not found).", _FOLDER_FIX
            )
        if not (p / "config.json").is_file():
            raise CheckpointError(
                p, "has no config.json, so it is not a Hugging Face model folder.", _FOLDER_FIX
            )
        if not any(p.glob("*.safetensors")):
            found = ", ".join(sorted(f.name for f in p.iterdir() if f.is_file())) or "nothing"
            raise CheckpointError(
                p,
                f"holds no .safetensors weights (found: {found}); only safetensors are loaded, never pickled "
                "files such as pytorch_model.bin.",
                _FOLDER_FIX,
            )
        if not (p / "preprocessor_config.json").is_file():
            raise CheckpointError(
                p, "has no preprocessor_config.json (the image preprocessing).", _FOLDER_FIX
            )
        transformers = require("transformers", "the NSFW classifier")
        try:
            model = transformers.AutoModelForImageClassification.from_pretrained(
                str(p), local_files_only=True, use_safetensors=True
            )
            processor = transformers.AutoImageProcessor.from_pretrained(str(p), local_files_only=True)
        except (OSError, ValueError, KeyError) as e:
            raise CheckpointError(
                p, f"could not be loaded as an image classifier ({e}).", _FOLDER_FIX
            ) from None
        labels = {int(i): str(n) for i, n in model.config.id2label.items()}
        nsfw = [i for i, n in labels.items() if n.lower() == NSFW_LABEL]
        if not nsfw:
            raise CheckpointError(
                p,
                f"classifies into {sorted(labels.values())}, with no '{NSFW_LABEL}' label.",
                _FOLDER_FIX,
            )
        self.folder = p
        self.labels = labels
        self.label = labels[nsfw[0]]
        self.pipeline = transformers.pipeline(
            "image-classification", model=model.eval(), image_processor=processor, device=device
        )
        logger.info("NSFW classifier loaded from %s (labels %s)", p, sorted(labels.values()))

    def scores(self, images: Sequence) -> list[float]:
        """The "nsfw" probability of each image.

        Args:
            images: PIL images (RGB).

        Returns:
            One score in [0, 1] per image.
        """
        if not images:
            return []
        results = self.pipeline(list(images), top_k=None)
        out = []
        for per_image in results:
            out.append(float(next(r["score"] for r in per_image if r["label"] == self.label)))
        return out


_LOADED: dict[tuple, NsfwClassifier] = {}


def load_nsfw_classifier(folder: str | os.PathLike, device: str = "cpu") -> NsfwClassifier:
    """The classifier in ``folder``, loaded once and reused while the folder's files are unchanged."""
    p = Path(folder)
    stamp = tuple(sorted((f.name, f.stat().st_mtime_ns) for f in p.iterdir())) if p.is_dir() else ()
    key = (str(p.resolve()) if p.exists() else str(p), device, stamp)
    if key not in _LOADED:
        classifier = NsfwClassifier(p, device=device)
        _LOADED.clear()  # one classifier at a time
        _LOADED[key] = classifier
    return _LOADED[key]
