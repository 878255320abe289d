"""Tiny models for the safety checks, written in the layouts users download.

- ``write_tiny_nsfw_classifier``: a Hugging Face image-classification folder (ViT, labels "normal"
  and "nsfw", ``model.safetensors`` + ``preprocessor_config.json``) whose classifier head can be set
  to one verdict for every image.
- ``write_tiny_integrity_judge``: the tiny Mistral Small 3.x pipeline folder (``text_encoder/`` +
  ``tokenizer/``, see ``tiny/text_encoder.py``) edited so that its first answer token is "yes" or
  "no" for any chat, while an unrelated token has the highest logit of all (so only a check that
  restricts the answer to yes/no gets the intended answer).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)

NSFW_LABELS = {0: "normal", 1: "nsfw"}
DECOY_TOKEN = 1000  # a plain vocabulary token given the top logit by the judge


def write_tiny_nsfw_classifier(folder: str | os.PathLike, verdict: str | None = None, seed: int = 0) -> Path:
    """Writes a tiny ViT image classifier folder.

    Args:
        folder: the folder to write (created).
        verdict: "nsfw" or "normal" to make every image score about 0.998 for that label; None keeps
            the random head (scores differ from image to image).
        seed: weight seed.

    Returns:
        ``folder``.
    """
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    if verdict not in (None, *NSFW_LABELS.values()):
        raise ValueError(f"verdict must be None, 'nsfw' or 'normal', got {verdict!r}")
    torch.manual_seed(seed)
    config = ViTConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=32,
        patch_size=16,
        id2label=dict(NSFW_LABELS),
        label2id={v: k for k, v in NSFW_LABELS.items()},
    )
    model = ViTForImageClassification(config).eval()
    if verdict is not None:
        with torch.no_grad():
            model.classifier.weight.zero_()
            sign = 1.0 if verdict == "nsfw" else -1.0
            model.classifier.bias.copy_(torch.tensor([-3.0 * sign, 3.0 * sign]))
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder), safe_serialization=True)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(str(folder))
    log.info("tiny NSFW classifier (%s) written to %s", verdict or "random head", folder)
    return folder


def write_tiny_integrity_judge(root: str | os.PathLike, answer: str = "yes", seed: int = 0) -> Path:
    """Writes a tiny Mistral Small 3.x pipeline folder that answers the integrity check with ``answer``.

    Every decoder layer's output projections (attention ``o_proj``, MLP ``down_proj``) are zeroed, so
    the last hidden state is the final norm of the last token's embedding; every chat ends with
    ``[/INST]``, so that state is known and the output head rows of "yes"/"Yes" and "no"/"No" are
    set along it (with opposite signs), and the row of ``DECOY_TOKEN`` twice as strongly.

    Args:
        root: the pipeline folder (``text_encoder/`` and ``tokenizer/`` are written in it).
        answer: "yes" or "no".
        seed: weight seed of the underlying tiny encoder.

    Returns:
        The ``text_encoder/`` folder (what FLUX.2 Text Encoder Loader lists).
    """
    from safetensors.torch import load_file, save_file

    from ..text_encoders.spec import MISTRAL3_SPECIAL_IDS
    from ..text_encoders.tokenizer import load_prompt_tokenizer
    from .text_encoder import write_tiny_text_encoder

    if answer not in ("yes", "no"):
        raise ValueError(f"answer must be 'yes' or 'no', got {answer!r}")
    root = Path(root)
    write_tiny_text_encoder(root, kind="mistral3", layout="hf", seed=seed)
    te = root / "text_encoder"
    tok = load_prompt_tokenizer("mistral3", te)
    index = json.loads((te / "model.safetensors.index.json").read_text())
    shards = {name: load_file(str(te / name)) for name in sorted(set(index["weight_map"].values()))}
    weights = {k: v for sd in shards.values() for k, v in sd.items()}
    pre = "model.language_model."
    last = MISTRAL3_SPECIAL_IDS["[/INST]"]
    direction = weights[pre + "embed_tokens.weight"][last].float() * weights[pre + "norm.weight"].float()
    direction = direction / direction.norm()  # (hidden,) the final hidden state's direction
    head = weights["lm_head.weight"].float().clone()  # (vocab, hidden)
    sign = 1.0 if answer == "yes" else -1.0
    for word, s in (("yes", sign), ("Yes", sign), ("no", -sign), ("No", -sign)):
        (token,) = tok.text_ids(word)
        head[token] = s * direction
    head[DECOY_TOKEN] = 2.0 * direction
    edits = {"lm_head.weight": head}
    for key, value in weights.items():
        if key.startswith(pre + "layers.") and key.endswith(
            ("self_attn.o_proj.weight", "mlp.down_proj.weight")
        ):
            edits[key] = torch.zeros_like(value)
    for name, sd in shards.items():
        changed = {k: edits[k].to(v.dtype).contiguous() for k, v in sd.items() if k in edits}
        if changed:
            save_file({**sd, **changed}, str(te / name), metadata={"format": "pt"})
    log.info("tiny integrity judge answering %r written to %s", answer, root)
    return te
