"""Safety and provenance nodes: content filter, save with watermark / C2PA, provenance check.

All opt-in: the shared workflows do not use them. NSFW classifiers are Hugging Face
image-classification folders under ``ComfyUI/models/safety/`` (registered here as the "safety"
model folder, so extra_model_paths.yaml can add more places).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os

import folder_paths
from comfy_api.latest import io

from . import memory
from .common import user_errors
from .types import CATEGORY, Flux2Model, Flux2TextEncoder

log = logging.getLogger(__name__)

SAFETY_FOLDER = "safety"
VLM_MODES = ("off", "prompt", "prompt and images")
folder_paths.add_model_folder_path(SAFETY_FOLDER, os.path.join(folder_paths.models_dir, SAFETY_FOLDER))


def classifier_choices() -> list[str]:
    """ "none" plus the image-classification folders (one or two levels) under models/safety."""
    from ..flux2_core.safety import is_classifier_folder

    names = []
    for root in folder_paths.get_folder_paths(SAFETY_FOLDER):
        if not os.path.isdir(root):
            continue
        for dirpath, dirnames, _ in os.walk(root, followlinks=True):
            rel = os.path.relpath(dirpath, root)
            if rel != "." and rel.count(os.sep) >= 1:
                dirnames[:] = []
            if rel != "." and is_classifier_folder(dirpath):
                names.append(rel.replace(os.sep, "/"))
    return ["none", *sorted(set(names))]


def _classifier_path(name: str) -> str:
    for root in folder_paths.get_folder_paths(SAFETY_FOLDER):
        candidate = os.path.join(root, name)
        if os.path.isdir(candidate):
            return candidate
    # Not there: the core loader says what to put where.
    return os.path.join(folder_paths.get_folder_paths(SAFETY_FOLDER)[0], name)


def _to_pil(images) -> list:
    """ComfyUI IMAGE (B, H, W, 3) in [0, 1] -> list of PIL images (SaveImage's 8-bit conversion)."""
    from PIL import Image

    from ..flux2_core.safety import tensor_to_rgb

    return [Image.fromarray(tensor_to_rgb(im)) for im in images]


class Flux2LocalContentFilter(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        classifiers = classifier_choices()
        return io.Schema(
            node_id="Flux2LocalContentFilter",
            display_name="FLUX.2 Content Filter",
            category=CATEGORY,
            description="Checks the prompt, reference images and output images as BFL's reference does (NSFW "
            "image classifier; VLM check for copyrighted characters, trademarks and public figures) and stops "
            "the run when one is flagged. Passes its inputs through unchanged.",
            inputs=[
                io.Combo.Input(
                    "classifier",
                    options=classifiers,
                    default=classifiers[1] if len(classifiers) > 1 else "none",
                    tooltip="NSFW image classifier: a Hugging Face image-classification folder with an 'nsfw' "
                    "label (e.g. Falconsai/nsfw_image_detection) in models/safety/. Checks every image. 'none' "
                    "skips it.",
                ),
                io.Float.Input(
                    "nsfw_threshold",
                    default=0.85,
                    min=0.0,
                    max=1.0,
                    step=0.01,
                    tooltip="An image whose 'nsfw' score is above this is flagged. 0.85 is BFL's value; lower "
                    "is stricter.",
                ),
                io.Combo.Input(
                    "vlm_check",
                    options=list(VLM_MODES),
                    default="off",
                    tooltip="Ask the connected text encoder's language model whether the prompt (and the "
                    "images) involve copyrighted characters, trademarks or public figures. Needs the full "
                    "model with its output head (Hugging Face text_encoder/ folder); images need Mistral "
                    "Small 3.x with its vision tower (Qwen3 checks the prompt only).",
                ),
                io.Float.Input(
                    "vlm_threshold",
                    default=0.5,
                    min=0.0,
                    max=1.0,
                    step=0.01,
                    tooltip="Flagged when the model's probability of answering 'yes' (of yes/no) is above "
                    "this. 0.5 = its more likely answer, as BFL; higher lets more through.",
                ),
                Flux2TextEncoder.Input(
                    "text_encoder",
                    optional=True,
                    tooltip="From FLUX.2 Text Encoder Loader; only needed for the VLM check.",
                ),
                io.String.Input(
                    "prompt",
                    multiline=True,
                    default="",
                    optional=True,
                    tooltip="The prompt to check (VLM check). Connect the 'prompt' output to FLUX.2 Encode "
                    "Prompt's prompt so that only a checked prompt is encoded.",
                ),
                io.Image.Input(
                    "reference_images",
                    optional=True,
                    tooltip="Reference / input images to check before they are used (e.g. from Load Image).",
                ),
                io.Image.Input(
                    "images",
                    optional=True,
                    tooltip="Generated images to check (from FLUX.2 VAE Decode), before saving them.",
                ),
            ],
            outputs=[
                io.String.Output(display_name="prompt", tooltip="The prompt, once checked."),
                io.Image.Output(
                    display_name="reference_images", tooltip="The reference images, once checked."
                ),
                io.Image.Output(display_name="images", tooltip="The generated images, once checked."),
            ],
        )

    @classmethod
    @user_errors
    def execute(
        cls,
        classifier,
        nsfw_threshold,
        vlm_check,
        vlm_threshold,
        text_encoder=None,
        prompt="",
        reference_images=None,
        images=None,
    ):
        from ..flux2_core import CheckpointError, InputError
        from ..flux2_core.safety import ContentFilter, EncoderChat, IntegrityJudge, load_nsfw_classifier
        from ..flux2_core.safety.chat import HEAD_FIX

        prompt = prompt or ""
        has_images = reference_images is not None or images is not None
        if not prompt.strip() and not has_images:
            raise InputError(
                "FLUX.2 Content Filter: nothing to check; type or connect a prompt, or connect images."
            )
        if classifier == "none" and vlm_check == "off":
            raise InputError(
                "FLUX.2 Content Filter: every check is off. Choose a classifier (put an NSFW image-classification "
                "folder such as Falconsai/nsfw_image_detection in models/safety/ and refresh) or set vlm_check."
            )
        if prompt.strip() and vlm_check == "off":
            raise InputError(
                "FLUX.2 Content Filter: a prompt is given but only the VLM check reads prompts; set vlm_check to "
                "'prompt' (and connect the text encoder) or clear the prompt input."
            )
        if has_images and classifier == "none" and vlm_check != "prompt and images":
            raise InputError(
                "FLUX.2 Content Filter: images are connected but no check looks at images; choose a classifier "
                "or set vlm_check to 'prompt and images'."
            )
        if vlm_check != "off" and text_encoder is None:
            raise InputError(
                f"FLUX.2 Content Filter: vlm_check is '{vlm_check}' but no text_encoder is connected; connect FLUX.2 "
                "Text Encoder Loader (the full model with its output head) or set vlm_check to off."
            )
        nsfw = load_nsfw_classifier(_classifier_path(classifier)) if classifier != "none" else None
        device = memory.compute_device()
        use_vlm = vlm_check != "off"
        writer = None
        if use_vlm:
            try:
                writer = text_encoder.generator()  # built once, kept with the loaded encoder
            except CheckpointError as e:
                raise CheckpointError(e.path, e.problem, HEAD_FIX) from None
        with writer.using(device) if use_vlm else contextlib.nullcontext():
            judge = IntegrityJudge(EncoderChat(writer.prepare(device))) if use_vlm else None
            checks = ContentFilter(
                classifier=nsfw,
                judge=judge,
                nsfw_threshold=nsfw_threshold,
                vlm_threshold=vlm_threshold,
                judge_images=vlm_check == "prompt and images" and has_images,
            )
            checks.check_prompt(prompt, "prompt")
            if reference_images is not None:
                checks.check_images(_to_pil(reference_images), "reference_images", "reference image")
            if images is not None:
                checks.check_images(_to_pil(images), "images", "output image")
        log.info("Flux2Local: content filter passed")
        return io.NodeOutput(prompt, reference_images, images)


def _user_path(path: str) -> str:
    """A path typed by the user: ~ expanded; relative paths are taken from ComfyUI's base folder."""
    path = os.path.expanduser(path.strip())
    return path if os.path.isabs(path) else os.path.join(folder_paths.base_path, path)


class Flux2LocalSaveImage(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Flux2LocalSaveImage",
            display_name="FLUX.2 Save Image",
            category=CATEGORY,
            description="Saves images to ComfyUI's output folder like Save Image (prompt and workflow in the PNG), "
            "optionally with BFL's invisible FLUX.2 watermark and a signed C2PA manifest.",
            inputs=[
                io.Image.Input("images", tooltip="The images to save."),
                io.String.Input(
                    "filename_prefix",
                    default="Flux2Local",
                    tooltip="File name prefix; may hold a subfolder and %date:...% style fields, as in Save Image.",
                ),
                io.Combo.Input(
                    "format",
                    options=["png", "jpeg"],
                    default="png",
                    tooltip="png keeps the workflow in the file (drag it back into ComfyUI); jpeg is smaller and "
                    "holds no workflow. JPEGs are written with full chroma (4:4:4), which keeps the watermark.",
                ),
                io.Int.Input(
                    "jpeg_quality",
                    default=90,
                    min=1,
                    max=100,
                    tooltip="JPEG quality (jpeg only); 90 keeps the mark.",
                ),
                io.Boolean.Input(
                    "watermark",
                    default=False,
                    tooltip="Embed BFL's invisible FLUX.2 watermark (a fixed 48-bit message, invisible-watermark "
                    "dwtDct). Images must be at least 256x256. Needs `pip install invisible-watermark`.",
                ),
                io.String.Input(
                    "c2pa_certificate",
                    default="",
                    tooltip="To sign a C2PA manifest: PEM file with your signing certificate followed by its "
                    "intermediate CA(s). Absolute, or relative to ComfyUI's folder. Empty = no manifest. Needs "
                    "`pip install c2pa-python`.",
                ),
                io.String.Input(
                    "c2pa_private_key",
                    default="",
                    tooltip="PEM file with the private key of that certificate (unencrypted). Empty = no manifest.",
                ),
                Flux2Model.Input(
                    "model",
                    optional=True,
                    tooltip="From FLUX.2 Model Loader: names the FLUX.2 variant in the C2PA manifest (needed "
                    "when signing).",
                ),
            ],
            outputs=[],
            hidden=[io.Hidden.prompt, io.Hidden.extra_pnginfo],
            is_output_node=True,
        )

    @classmethod
    @user_errors
    def execute(
        cls,
        images,
        filename_prefix,
        format,
        jpeg_quality,
        watermark,
        c2pa_certificate,
        c2pa_private_key,
        model=None,
    ):
        from comfy.cli_args import args

        from ..flux2_core import InputError
        from ..flux2_core.safety import OutputOptions, SigningCredentials, encode_output, tensor_to_rgb

        credentials = None
        if c2pa_certificate.strip() or c2pa_private_key.strip():
            if not (c2pa_certificate.strip() and c2pa_private_key.strip()):
                raise InputError(
                    "FLUX.2 Save Image: C2PA signing needs both c2pa_certificate and c2pa_private_key; fill in "
                    "both, or clear both to save without a manifest."
                )
            if model is None:
                raise InputError(
                    "FLUX.2 Save Image: connect 'model' (from FLUX.2 Model Loader) so the C2PA manifest can name "
                    "the FLUX.2 variant that made the image."
                )
            credentials = SigningCredentials(_user_path(c2pa_certificate), _user_path(c2pa_private_key))
        variant = getattr(getattr(getattr(model, "module", None), "config", None), "variant", None)
        text = None
        if format == "png" and not args.disable_metadata:
            text = {}
            if cls.hidden.prompt is not None:
                text["prompt"] = json.dumps(cls.hidden.prompt)
            for key, value in (cls.hidden.extra_pnginfo or {}).items():
                text[key] = json.dumps(value)
        options = OutputOptions(
            format=format,
            jpeg_quality=jpeg_quality,
            text=text,
            watermark=watermark,
            credentials=credentials,
            variant=variant,
        )
        out_dir = folder_paths.get_output_directory()
        folder, filename, counter, subfolder, _ = folder_paths.get_save_image_path(
            filename_prefix, out_dir, images[0].shape[1], images[0].shape[0]
        )
        ext = "png" if format == "png" else "jpg"
        results = []
        for batch_number, image in enumerate(images):
            name = f"{filename.replace('%batch_num%', str(batch_number))}_{counter:05}_.{ext}"
            data = encode_output(tensor_to_rgb(image), options, title=name)
            with open(os.path.join(folder, name), "wb") as f:
                f.write(data)
            results.append({"filename": name, "subfolder": subfolder, "type": "output"})
            counter += 1
        log.info(
            "Flux2Local: saved %d image(s)%s%s",
            len(results),
            " with watermark" if watermark else "",
            " and C2PA manifest" if credentials else "",
        )
        return io.NodeOutput(ui={"images": results})


def _input_images() -> list[str]:
    root = folder_paths.get_input_directory()
    files = (
        [f for f in os.listdir(root) if os.path.isfile(os.path.join(root, f))] if os.path.isdir(root) else []
    )
    return sorted(folder_paths.filter_files_content_types(files, ["image"]))


class Flux2LocalCheckProvenance(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        upload = {"upload": io.UploadType.image} if hasattr(io, "UploadType") else {}
        return io.Schema(
            node_id="Flux2LocalCheckProvenance",
            display_name="FLUX.2 Check Provenance",
            category=CATEGORY,
            description="Reads the invisible FLUX.2 watermark of an image file and verifies its C2PA manifest "
            "(none / valid / trusted / invalid). Works offline.",
            inputs=[
                io.Combo.Input(
                    "image",
                    options=_input_images(),
                    tooltip="An image file in ComfyUI's input folder (upload one here). The file is read as is, "
                    "so its C2PA manifest is checked against its exact bytes.",
                    **upload,
                ),
                io.String.Input(
                    "trust_anchors",
                    default="",
                    tooltip="Optional PEM file of root certificates you trust; a manifest signed under one of them "
                    "reads 'trusted', otherwise an intact one reads 'valid'. Absolute, or relative to ComfyUI's "
                    "folder.",
                ),
            ],
            outputs=[
                io.String.Output(display_name="report", tooltip="What was found, in words."),
                io.Boolean.Output(
                    display_name="watermarked", tooltip="True if the FLUX.2 watermark was found."
                ),
                io.String.Output(
                    display_name="c2pa", tooltip="The manifest's state: none, valid, trusted or invalid."
                ),
            ],
            is_output_node=True,
        )

    @classmethod
    @user_errors
    def execute(cls, image, trust_anchors):
        from ..flux2_core.safety import check_provenance

        anchors = _user_path(trust_anchors) if trust_anchors.strip() else None
        report = check_provenance(folder_paths.get_annotated_filepath(image), anchors)
        text = report.summary()
        log.info("Flux2Local: %s", text)
        return io.NodeOutput(text, report.watermark.found, report.manifest.state, ui={"text": [text]})
