"""The NSFW classifier through transformers' pipeline, on tiny ViT folders set to each outcome."""

from __future__ import annotations

import shutil
import sys

import pytest
import torch
from PIL import Image

from flux2_core.errors import CheckpointError, InputError
from flux2_core.safety import (
    NSFW_CHECK,
    ContentFilter,
    ContentFlagged,
    MissingPackageError,
    load_nsfw_classifier,
)
from flux2_core.safety.deps import require


def _images(picture, n: int = 2) -> list:
    return [Image.fromarray(picture(96, 80 + 16 * i, i)) for i in range(n)]


def test_scores_equal_the_models_own_probabilities(classifier_dir, picture):
    """The pipeline path gives softmax(logits)[nsfw] of the model on the processor's pixels."""
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    folder = classifier_dir(None)  # random head: the scores differ per image
    images = _images(picture, 3)
    scores = load_nsfw_classifier(folder).scores(images)
    model = AutoModelForImageClassification.from_pretrained(str(folder), use_safetensors=True).eval()
    pixels = AutoImageProcessor.from_pretrained(str(folder))(images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        expected = torch.softmax(model(pixel_values=pixels).logits, dim=-1)[:, 1]  # label 1 = "nsfw"
    torch.testing.assert_close(torch.tensor(scores), expected, atol=1e-5, rtol=1e-5)
    assert len(set(round(s, 6) for s in scores)) == 3


def test_flagged_image_stops_with_check_and_input_named(classifier_dir, picture):
    checks = ContentFilter(classifier=load_nsfw_classifier(classifier_dir("nsfw")))
    with pytest.raises(ContentFlagged) as e:
        checks.check_images(_images(picture), "images", "output image")
    f = e.value.finding
    assert f.check == NSFW_CHECK and f.input_name == "images" and f.item == "output image 1 of 2"
    assert f.score > 0.99 and f.threshold == 0.85
    msg = str(e.value)
    assert "output image 1 of 2 (input 'images')" in msg and "NSFW classifier" in msg and "0.850" in msg


def test_normal_images_pass(classifier_dir, picture):
    checks = ContentFilter(classifier=load_nsfw_classifier(classifier_dir("normal")))
    checks.check_images(_images(picture), "reference_images", "reference image")  # no exception


def test_threshold_is_an_input(classifier_dir, picture):
    clf = load_nsfw_classifier(classifier_dir(None))
    images = _images(picture, 3)
    scores = clf.scores(images)
    hi = max(range(3), key=scores.__getitem__)
    between = (sorted(scores)[1] + sorted(scores)[2]) / 2  # only the highest-scoring image is above
    with pytest.raises(ContentFlagged) as e:
        ContentFilter(classifier=clf, nsfw_threshold=between).check_images(images, "images", "output image")
    assert e.value.finding.item == f"output image {hi + 1} of 3"
    ContentFilter(classifier=clf, nsfw_threshold=max(scores)).check_images(
        images, "images"
    )  # not above: passes
    with pytest.raises(InputError, match="nsfw_threshold must be between 0 and 1"):
        ContentFilter(classifier=clf, nsfw_threshold=1.5)


def test_missing_or_unusable_classifier_folder_is_a_clear_error(tmp_path, classifier_dir):
    with pytest.raises(CheckpointError, match=r"not found.*Falconsai/nsfw_image_detection.*models/safety/"):
        load_nsfw_classifier(tmp_path / "no-such-classifier")
    pickled = tmp_path / "pickled"
    shutil.copytree(classifier_dir("nsfw"), pickled)
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"no \.safetensors.*never pickled"):
        load_nsfw_classifier(pickled)
    no_label = tmp_path / "no-label"
    shutil.copytree(classifier_dir("nsfw"), no_label)
    cfg = (no_label / "config.json").read_text().replace('"nsfw"', '"unsafe"')
    (no_label / "config.json").write_text(cfg)
    with pytest.raises(CheckpointError, match=r"\['normal', 'unsafe'\], with no 'nsfw' label"):
        load_nsfw_classifier(no_label)


def test_missing_package_names_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "imwatermark", None)  # makes `import imwatermark` fail
    with pytest.raises(
        MissingPackageError, match=r"'invisible-watermark'.*pip install invisible-watermark==0\.2\.0"
    ):
        require("imwatermark", "the invisible watermark")
    monkeypatch.setitem(sys.modules, "c2pa", None)
    with pytest.raises(MissingPackageError, match=r"pip install c2pa-python"):
        require("c2pa", "signing the C2PA manifest")
