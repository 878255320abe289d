"""Writes the shipped workflows from one description of each: the editor templates and the API files.

- ``example_workflows/<title>.json`` (UI format) and ``<title>.jpg`` (its card picture): ComfyUI's
  templates browser lists every ``*.json`` at the top of a pack's ``example_workflows/`` folder, titles
  the card with the file name and shows ``<same name>.jpg`` on it.
- ``workflows/api/<slug>.api.json`` (API format) for POST /prompt and ``workflows/run.sh``; a subfolder,
  so the templates browser does not list them as cards.

Run ``python workflows/build_workflows.py`` after changing a workflow here. The UI files list widget
values in the order the node schemas declare their inputs; tests/comfyui/test_workflows.py converts
each UI file back to API format with the live server's /object_info and checks it equals the API file,
so a drift between the two (or between them and the nodes) fails the tests.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from layout import Node, note_size, to_api, to_ui  # noqa: E402

TEMPLATES_DIR = HERE.parent / "example_workflows"
API_DIR = HERE / "api"

HF = "https://huggingface.co"
COMFY_DEV = f"{HF}/Comfy-Org/flux2-dev/resolve/main/split_files"
COMFY_KLEIN = f"{HF}/Comfy-Org/flux2-klein/resolve/main/split_files"
# (file name, ComfyUI model folder, download URL) of every file the workflows name. The tiny
# random set (flux2_core/tiny) uses the same names, so the workflows run unchanged on it.
DEV_FP8 = (
    "flux2_dev_fp8mixed.safetensors",
    "diffusion_models",
    f"{COMFY_DEV}/diffusion_models/flux2_dev_fp8mixed.safetensors",
)
DEV_GGUF = (
    "flux2-dev-Q4_K_M.gguf",
    "diffusion_models",
    f"{HF}/city96/FLUX.2-dev-gguf/resolve/main/flux2-dev-Q4_K_M.gguf",
)
MISTRAL = (
    "mistral_3_small_flux2_bf16.safetensors",
    "text_encoders",
    f"{COMFY_DEV}/text_encoders/mistral_3_small_flux2_bf16.safetensors",
)
MISTRAL_FP8_URL = f"{COMFY_DEV}/text_encoders/mistral_3_small_flux2_fp8.safetensors"
KLEIN = (
    "flux-2-klein-4b.safetensors",
    "diffusion_models",
    f"{COMFY_KLEIN}/diffusion_models/flux-2-klein-4b.safetensors",
)
KLEIN_BASE = (
    "flux-2-klein-base-4b.safetensors",
    "diffusion_models",
    f"{COMFY_KLEIN}/diffusion_models/flux-2-klein-base-4b.safetensors",
)
QWEN = ("qwen_3_4b.safetensors", "text_encoders", f"{COMFY_KLEIN}/text_encoders/qwen_3_4b.safetensors")
VAE = ("flux2-vae.safetensors", "vae", f"{COMFY_DEV}/vae/flux2-vae.safetensors")
TURBO = ("Flux2TurboComfyv2.safetensors", "loras", f"{COMFY_DEV}/loras/Flux2TurboComfyv2.safetensors")
NSFW_CLASSIFIER = "nsfw_image_detection"  # a folder under models/safety/
REFERENCE_IMAGES = ("flux2_reference_1.png", "flux2_reference_2.png", "flux2_reference_3.png")
# The Missing Models dialog takes only .safetensors / .sft files (a .gguf entry shows an error there).
DIALOG_SUFFIXES = (".safetensors", ".sft")


@dataclass(frozen=True)
class Template:
    """One shipped workflow. ``slug`` names the API file, ``title`` the template card and UI file."""

    slug: str
    title: str
    nodes: list[Node]
    note: str
    card: dict  # what the card picture shows (workflows/thumbnails.py)
    titles: dict | None = None  # group titles other than the usual ones (layout.COLUMNS)


def _models(*files: tuple[str, str, str]) -> list[dict] | None:
    entries = [{"name": n, "url": u, "directory": d} for n, d, u in files if n.endswith(DIALOG_SUFFIXES)]
    return entries or None


def _link(file: tuple[str, str, str]) -> str:
    name, folder, url = file
    return f"- [{name}]({url}) → `ComfyUI/models/{folder}/`"


def pipeline(
    model: tuple[str, str, str],
    te: tuple[str, str, str],
    prompt: str,
    *,
    negative: str = "",
    steps: int = 0,
    guidance: float = 0.0,
    refs: tuple[str, ...] = (),
    lora: tuple[tuple[str, str, str], float] | None = None,
    prefix: str = "flux2",
    safety: bool = False,
) -> list[Node]:
    """The common graph: loaders -> encode -> [references] -> sampler -> decode -> [filter] -> save.

    Widget values left at 0 (steps, guidance, VRAM budget, pinned RAM) mean "auto": the editor shows
    "auto" and, after a run, what auto picked for the loaded model.
    """
    nodes = [
        Node(1, "Flux2LocalModelLoader", "models", [model[0], "bf16", True, 0.0, 0.0], models=_models(model)),
        Node(2, "Flux2LocalTextEncoderLoader", "models", [te[0], "auto", "bf16"], models=_models(te)),
        Node(3, "Flux2LocalVAELoader", "models", [VAE[0], "bf16"], models=_models(VAE)),
        Node(
            4, "Flux2LocalEncodePrompt", "prompt", [prompt, negative, False, 0, 512], {"text_encoder": (2, 0)}
        ),
    ]
    model_out = (1, 0)
    if lora is not None:
        file, strength = lora
        nodes.insert(
            1,
            Node(
                9,
                "Flux2LocalLoRALoader",
                "models",
                [file[0], strength],
                {"model": (1, 0)},
                models=_models(file),
            ),
        )
        model_out = (9, 0)
    cond = (4, 0)
    if refs:
        links = {"conditioning": cond, "vae": (3, 0)}
        for i, name in enumerate(refs, start=1):
            nodes.append(Node(20 + i, "LoadImage", "references", [name]))
            links[f"images.image_{i}"] = (20 + i, 0)
        nodes.append(Node(5, "Flux2LocalMultiReference", "references", [1.0], links, sub=1))
        cond = (5, 0)
    nodes += [
        Node(
            6,
            "Flux2LocalSampler",
            "sampling",
            [1024, 1024, 42, steps, guidance, 1.0, "euler", "flux2"],
            {"model": model_out, "conditioning": cond},
        ),
        Node(7, "Flux2LocalVAEDecode", "output", ["auto"], {"vae": (3, 0), "samples": (6, 0)}),
    ]
    if safety:
        nodes += [
            Node(
                10,
                "Flux2LocalContentFilter",
                "output",
                [NSFW_CLASSIFIER, 0.85, "off", 0.5, ""],
                {"images": (7, 0)},
            ),
            Node(
                8,
                "Flux2LocalSaveImage",
                "output",
                [prefix, "png", 90, True, "", ""],
                {"images": (10, 2), "model": (1, 0)},
            ),
        ]
    else:
        nodes.append(Node(8, "SaveImage", "output", [prefix], {"images": (7, 0)}))
    return nodes


KLEIN_FILES = "\n".join(_link(f) for f in (KLEIN, QWEN, VAE))
KLEIN_HOW = (
    "**Run**: type a prompt in *FLUX.2 Encode Prompt* and press Run. Steps and guidance on *auto* use "
    "the model's own settings (after a run the sampler shows them: 4 steps, no guidance). The seed "
    "changes after every run (*randomize*); set it to *fixed* to keep an image.\n\n"
    "**12 GB card**: fits as it is (the 4B transformer is about 8 GB in bf16). On 8 GB it still runs: "
    "what does not fit is streamed from system RAM.\n\n"
    "Model card and licence (Apache 2.0): [black-forest-labs/FLUX.2-klein-4B]"
    f"({HF}/black-forest-labs/FLUX.2-klein-4B)."
)
EXPERT = (
    "Expert settings (compute dtype, FP8, VRAM budget, pinned RAM, tokenizer) are hidden: right-click a "
    "node → *Show Advanced*."
)


def native_mix(
    model: tuple[str, str, str], te: tuple[str, str, str], prompt: str, negative: str, steps: int, cfg: float
) -> list[Node]:
    """Our loaders, streaming and prompt encoding under ComfyUI's own sampling nodes and EasyCache.

    The sampling group has three sub-columns, so every wire runs right or down: the model's chain
    (To Native MODEL -> EasyCache -> CFGGuider), the sampler's other inputs, SamplerCustomAdvanced.
    """
    size = 1024
    return [
        Node(1, "Flux2LocalModelLoader", "models", [model[0], "bf16", True, 0.0, 0.0], models=_models(model)),
        Node(2, "Flux2LocalTextEncoderLoader", "models", [te[0], "auto", "bf16"], models=_models(te)),
        Node(3, "Flux2LocalVAELoader", "models", [VAE[0], "bf16"], models=_models(VAE)),
        Node(
            4, "Flux2LocalEncodePrompt", "prompt", [prompt, negative, False, 0, 512], {"text_encoder": (2, 0)}
        ),
        Node(5, "Flux2LocalToNativeModel", "sampling", [], {"model": (1, 0)}),
        Node(6, "EasyCache", "sampling", [0.2, 0.15, 0.95, False], {"model": (5, 0)}),
        # Encode Prompt's outputs 2 and 3: the prompt and the negative prompt as native CONDITIONING.
        Node(7, "CFGGuider", "sampling", [cfg], {"model": (6, 0), "positive": (4, 2), "negative": (4, 3)}),
        Node(8, "RandomNoise", "sampling", [42], sub=1),
        Node(9, "KSamplerSelect", "sampling", ["euler"], sub=1),
        Node(10, "Flux2Scheduler", "sampling", [steps, size, size], sub=1),
        Node(11, "EmptyFlux2LatentImage", "sampling", [size, size, 1], sub=1),
        Node(
            12,
            "SamplerCustomAdvanced",
            "sampling",
            [],
            {
                "noise": (8, 0),
                "guider": (7, 0),
                "sampler": (9, 0),
                "sigmas": (10, 0),
                "latent_image": (11, 0),
            },
            sub=2,
        ),
        Node(13, "Flux2LocalVAEDecode", "output", ["auto"], {"vae": (3, 0), "samples": (12, 0)}),
        Node(14, "SaveImage", "output", ["flux2_native_mix"], {"images": (13, 0)}),
    ]


def _note(title: str, what: str, files: str, how: str) -> str:
    return (
        f"# {title}\n\n{what}\n\n## Model files\nPut each file in the folder named after it, then press "
        f"`r` (refresh) in the editor. Missing files are listed when the workflow opens.\n\n{files}\n\n"
        f"## How to use it\n{how}\n\n{EXPERT}"
    )


def templates() -> list[Template]:
    dev_files = "\n".join(_link(f) for f in (DEV_FP8, MISTRAL, VAE)) + (
        f"\n- with 32 GB of RAM, the text encoder in FP8 instead: [mistral_3_small_flux2_fp8.safetensors]"
        f"({MISTRAL_FP8_URL}) → `ComfyUI/models/text_encoders/` (pick it in the Text Encoder Loader)"
    )
    dev_licence = (
        f"Model card and licence (FLUX.2 [dev] non-commercial licence): [black-forest-labs/FLUX.2-dev]"
        f"({HF}/black-forest-labs/FLUX.2-dev)."
    )
    return [
        Template(
            "flux2_klein_4b_text_to_image",
            "FLUX.2 klein 4B - text to image",
            pipeline(
                KLEIN, QWEN, "A lighthouse on a cliff in a storm, oil painting", prefix="flux2_klein_4b"
            ),
            _note(
                "FLUX.2 [klein] 4B: text to image",
                "The fastest FLUX.2: 4 steps, no guidance.",
                KLEIN_FILES,
                KLEIN_HOW,
            ),
            {
                "model": "klein 4B",
                "task": "text to image",
                "badges": ["4 steps", "8-12 GB"],
                "steps": ["models", "prompt", "sample", "save"],
            },
        ),
        Template(
            "flux2_edit_single_image",
            "FLUX.2 klein 4B - edit an image",
            pipeline(
                KLEIN,
                QWEN,
                "Make it a winter scene with snow on every surface",
                refs=REFERENCE_IMAGES[:1],
                prefix="flux2_edit",
            ),
            _note(
                "FLUX.2 [klein] 4B: edit an image",
                "Changes a picture as the prompt says: the image is scaled to 1 MP and attached to the prompt.",
                KLEIN_FILES,
                "**Run**: put your picture in `ComfyUI/input/` (or drag it onto *Load Image*), say what to "
                "change, press Run. Set the sampler's width and height to the shape you want out (the "
                "picture's aspect ratio usually).\n\n" + KLEIN_HOW.split("\n\n", 1)[1],
            ),
            {
                "model": "klein 4B",
                "task": "edit an image",
                "badges": ["1 reference", "8-12 GB"],
                "steps": ["models", "prompt", "image", "sample", "save"],
            },
        ),
        Template(
            "flux2_multi_reference",
            "FLUX.2 klein 4B - combine images",
            pipeline(
                KLEIN,
                QWEN,
                "The person from image 1 wearing the jacket from image 2 in the room from image 3",
                refs=REFERENCE_IMAGES,
                prefix="flux2_multi_ref",
            ),
            _note(
                "FLUX.2 [klein] 4B: combine reference images",
                "Up to 10 reference images; the prompt refers to them as image 1, image 2, ...",
                KLEIN_FILES,
                "**Run**: load your pictures, say in the prompt what to take from which image, press Run. "
                "*FLUX.2 Multi-Reference* grows a new image input each time the last one is connected. "
                "Each reference adds tokens: lower *megapixels_per_reference* if it gets slow.\n\n"
                + KLEIN_HOW.split("\n\n", 1)[1],
            ),
            {
                "model": "klein 4B",
                "task": "combine references",
                "badges": ["up to 10 images", "12 GB"],
                "steps": ["models", "prompt", "images", "sample", "save"],
            },
        ),
        Template(
            "flux2_klein_base_cfg",
            "FLUX.2 klein base 4B - with CFG",
            pipeline(
                KLEIN_BASE,
                QWEN,
                "A ceramic teapot shaped like a snail, studio photo",
                negative="blurry, low quality",
                prefix="flux2_klein_base",
            ),
            _note(
                "FLUX.2 [klein] base 4B: text to image with CFG",
                "The undistilled model: slower (50 steps, two passes per step), more varied, and it "
                "reads a negative prompt.",
                "\n".join(_link(f) for f in (KLEIN_BASE, QWEN, VAE)),
                "**Run**: prompt and negative prompt in *FLUX.2 Encode Prompt*, then Run. On this model "
                "the sampler's guidance is the **CFG scale** (auto = 4; above 1 the negative prompt is "
                "used). Steps on auto = 50.\n\n**12 GB card**: fits as it is.\n\nModel card: "
                f"[black-forest-labs/FLUX.2-klein-base-4B]({HF}/black-forest-labs/FLUX.2-klein-base-4B).",
            ),
            {
                "model": "klein base 4B",
                "task": "CFG + negative prompt",
                "badges": ["50 steps", "12 GB"],
                "steps": ["models", "prompt", "sample", "save"],
            },
        ),
        Template(
            "flux2_klein_base_native_samplers",
            "FLUX.2 klein base 4B - ComfyUI samplers and EasyCache",
            native_mix(
                KLEIN_BASE,
                QWEN,
                "A ceramic teapot shaped like a snail, studio photo",
                "blurry, low quality",
                steps=20,
                cfg=5.0,
            ),
            _note(
                "FLUX.2 [klein] base 4B under ComfyUI's own samplers",
                "Our loaders (with streaming) and prompt encoding, sampled by ComfyUI's nodes: *FLUX.2 To "
                "Native MODEL* turns the model into a native MODEL for EasyCache (skips steps that change "
                "little), CFGGuider and SamplerCustomAdvanced; Encode Prompt's CONDITIONING and negative "
                "outputs feed the guider. 20 steps at CFG 5, the official [klein] base settings.",
                "\n".join(_link(f) for f in (KLEIN_BASE, QWEN, VAE)),
                "**Run**: type a prompt and a negative prompt in *FLUX.2 Encode Prompt*, press Run. Size: "
                "*EmptyFlux2LatentImage* and *Flux2Scheduler* take the same width and height. Other "
                "samplers: pick one in *KSamplerSelect*. A native LoRA loader (LoraLoaderModelOnly) goes "
                "between *To Native MODEL* and *EasyCache*; to sample without EasyCache, bypass it "
                "(select it, Ctrl+B).\n\n**12 GB card**: fits as it is; what does not fit on the GPU is streamed "
                "from system RAM, also under ComfyUI's samplers.\n\nModel card: "
                f"[black-forest-labs/FLUX.2-klein-base-4B]({HF}/black-forest-labs/FLUX.2-klein-base-4B).",
            ),
            {
                "model": "klein base 4B",
                "task": "ComfyUI samplers",
                "badges": ["EasyCache", "12 GB"],
                "steps": ["models", "prompt", "native", "sample", "save"],
            },
            titles={"sampling": "Sample (ComfyUI's nodes)"},
        ),
        Template(
            "flux2_dev_text_to_image",
            "FLUX.2 dev - text to image",
            pipeline(
                DEV_FP8,
                MISTRAL,
                "A red fox sitting in fresh snow at sunrise, detailed fur, 85mm photo",
                steps=28,
                prefix="flux2_dev",
            ),
            _note(
                "FLUX.2 [dev]: text to image",
                "The large FLUX.2 (32B): the best quality, with embedded guidance (4) and 28 steps "
                "(BFL's trade-off; 50 is the default).",
                dev_files,
                "**Run**: type a prompt, press Run. On [dev] the sampler's guidance is **embedded "
                "guidance** (auto = 4).\n\n**12 GB card (or 16, 24 GB)**: the FP8 file with *keep_fp8* on "
                "(the default) and the *VRAM budget* on auto is what makes it fit: the blocks that do "
                "not fit on the GPU are streamed from system RAM, nothing to set. Set *vram_budget_gb* "
                "(Show Advanced) only to leave VRAM to other programs. The FP8 transformer is over 30 GB: "
                "with 64 GB of RAM it streams from memory; with 32 GB prefer the GGUF template.\n\n"
                + dev_licence,
            ),
            {
                "model": "dev",
                "task": "text to image",
                "badges": ["FP8", "12-24 GB"],
                "steps": ["models", "prompt", "sample", "save"],
            },
        ),
        Template(
            "flux2_dev_gguf",
            "FLUX.2 dev GGUF - 12 GB cards",
            pipeline(
                DEV_GGUF,
                MISTRAL,
                "A watercolor map of an imaginary island with mountains and rivers",
                steps=28,
                prefix="flux2_dev_gguf",
            ),
            _note(
                "FLUX.2 [dev] GGUF: text to image on 12 GB",
                "[dev] from a GGUF file (Q4_K_M, about 19 GB): it stays in its 4-bit blocks in RAM and "
                "on the GPU, and each layer is unpacked just before use.",
                "\n".join(_link(f) for f in (DEV_GGUF, MISTRAL, VAE))
                + f"\n\nOther sizes (Q2_K 11 GB ... Q8_0 35 GB): [city96/FLUX.2-dev-gguf]({HF}/city96/FLUX.2-dev-gguf). "
                "GGUF files are not listed in ComfyUI's missing-models window (it takes .safetensors "
                "only): download them from the link above.",
                "**Run**: type a prompt, press Run (embedded guidance auto = 4, 28 steps).\n\n"
                "**12 GB card with 32 GB of RAM**: the setting that matters is the file: Q4_K_M (or "
                "Q3_K_M, 14.5 GB) leaves RAM for the text encoder; the VRAM budget stays on auto.\n\n"
                + dev_licence,
            ),
            {
                "model": "dev",
                "task": "GGUF Q4_K_M",
                "badges": ["32 GB RAM", "12 GB"],
                "steps": ["models", "prompt", "sample", "save"],
            },
        ),
        Template(
            "flux2_dev_turbo_lora",
            "FLUX.2 dev - Turbo LoRA in 8 steps",
            pipeline(
                DEV_FP8,
                MISTRAL,
                "A cozy reading nook with a cat asleep on a pile of books, warm light",
                steps=8,
                lora=(TURBO, 1.0),
                prefix="flux2_dev_turbo",
            ),
            _note(
                "FLUX.2 [dev] with a LoRA: Turbo in 8 steps",
                "A LoRA changes the model without touching its weights: here the Turbo LoRA, which "
                "makes [dev] good in 8 steps instead of 28-50.",
                "\n".join(_link(f) for f in (DEV_FP8, MISTRAL, VAE, TURBO)),
                "**Run**: press Run. Chain more *FLUX.2 LoRA Loader* nodes between the Model Loader and "
                "the sampler for a stack; *strength* 0 turns one off, and changing it needs no reload. "
                "Put LoRAs in `ComfyUI/models/loras/`; FLUX.1 and SDXL LoRAs are refused with a message.\n\n"
                "**12 GB card**: as the [dev] template (the LoRA's factors stay on the GPU, inside the VRAM "
                "budget).\n\n" + dev_licence,
            ),
            {
                "model": "dev",
                "task": "Turbo LoRA",
                "badges": ["8 steps", "12-24 GB"],
                "steps": ["models", "LoRA", "prompt", "sample", "save"],
            },
        ),
        Template(
            "flux2_klein_4b_safety",
            "FLUX.2 klein 4B - safety checks",
            pipeline(
                KLEIN,
                QWEN,
                "A bowl of ramen on a wooden table, food photography",
                prefix="flux2_checked",
                safety=True,
            ),
            _note(
                "FLUX.2 [klein] 4B: content filter and watermark",
                "Checks every generated image with an NSFW classifier before saving (a flagged image "
                "stops the run) and saves it with BFL's invisible FLUX.2 watermark.",
                KLEIN_FILES
                + f"\n- the NSFW classifier: the files of [Falconsai/nsfw_image_detection]({HF}/Falconsai/nsfw_image_detection) "
                f"(config.json, model.safetensors, preprocessor_config.json) → `ComfyUI/models/safety/{NSFW_CLASSIFIER}/`\n\n"
                "The watermark and C2PA signing need `pip install -r requirements-safety.txt` in "
                "ComfyUI's Python.",
                "**Run**: press Run; images must be at least 256x256 for the watermark. To sign a C2PA "
                "manifest, give *FLUX.2 Save Image* your certificate chain and key (PEM files). To also "
                "check prompts for copyrighted characters, trademarks and public figures, put a *FLUX.2 "
                "Content Filter* before the prompt with *vlm_check* on (it needs a text encoder with its "
                "output head: a Hugging Face `text_encoder/` folder).\n\n" + KLEIN_HOW.split("\n\n", 1)[1],
            ),
            {
                "model": "klein 4B",
                "task": "filter + watermark",
                "badges": ["NSFW check", "provenance"],
                "steps": ["models", "prompt", "sample", "check", "save"],
            },
            titles={"output": "Decode, check and save"},
        ),
    ]


def write_all() -> list[Template]:
    from thumbnails import draw_card

    TEMPLATES_DIR.mkdir(exist_ok=True)
    API_DIR.mkdir(exist_ok=True)
    items = templates()
    for t in items:
        note = Node(99, "MarkdownNote", "note", [t.note], title="Read me", size=note_size(t.note))
        ui = to_ui([note, *t.nodes], t.slug, t.titles)
        (TEMPLATES_DIR / f"{t.title}.json").write_text(json.dumps(ui, indent=2, ensure_ascii=False) + "\n")
        (API_DIR / f"{t.slug}.api.json").write_text(json.dumps(to_api(t.nodes), indent=2) + "\n")
        draw_card(TEMPLATES_DIR / f"{t.title}.jpg", **t.card)
    return items


if __name__ == "__main__":
    write_all()
