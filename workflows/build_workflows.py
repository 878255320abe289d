"""Writes the shared workflows in both formats from one description: ``<name>.json`` (UI format, opens
in the ComfyUI editor) and ``<name>.api.json`` (API format, for POST /prompt and workflows/run.sh).

Run ``python workflows/build_workflows.py`` after changing a workflow here. The UI files list widget
values in the order the node schemas declare their inputs; tests/comfyui/test_workflows.py converts
each UI file back to API format with the live server's /object_info and checks it equals the API file,
so a drift between the two (or between them and the nodes) fails the tests.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent

# Official file names (Comfy-Org / BFL repositories); the tiny random set uses the same names.
DEV_MODEL = "flux2_dev_fp8mixed.safetensors"
DEV_TE = "mistral_3_small_flux2_bf16.safetensors"
KLEIN_MODEL = "flux-2-klein-4b.safetensors"
KLEIN_BASE_MODEL = "flux-2-klein-base-4b.safetensors"
KLEIN_TE = "qwen_3_4b.safetensors"
VAE = "flux2-vae.safetensors"
REFERENCE_IMAGES = ("flux2_reference_1.png", "flux2_reference_2.png", "flux2_reference_3.png")

NOTE_FILES = {
    "dev": f"""Model files (put them in ComfyUI/models/...):
- diffusion_models/{DEV_MODEL}  (Comfy-Org/flux2-dev; or flux2-dev.safetensors from black-forest-labs/FLUX.2-dev)
- text_encoders/{DEV_TE}  (Comfy-Org/flux2-dev; the _fp8 version also works)
- vae/{VAE}  (Comfy-Org/flux2-dev; or ae.safetensors from black-forest-labs/FLUX.2-dev)""",
    "klein": f"""Model files (put them in ComfyUI/models/...):
- diffusion_models/{KLEIN_MODEL}  (Comfy-Org/flux2-klein; or black-forest-labs/FLUX.2-klein-4B)
- text_encoders/{KLEIN_TE}  (Comfy-Org/flux2-klein)
- vae/{VAE}  (Comfy-Org/flux2-dev)""",
    "klein-base": f"""Model files (put them in ComfyUI/models/...):
- diffusion_models/{KLEIN_BASE_MODEL}  (Comfy-Org/flux2-klein; or black-forest-labs/FLUX.2-klein-base-4B)
- text_encoders/{KLEIN_TE}  (Comfy-Org/flux2-klein)
- vae/{VAE}  (Comfy-Org/flux2-dev)""",
}


@dataclass
class Node:
    id: int
    type: str
    widgets: list = field(default_factory=list)
    # input name -> (source node id, source output slot)
    links: dict[str, tuple[int, int]] = field(default_factory=dict)
    title: str | None = None


# Per node type: output (name, type) list and the widget input names in schema order (the
# control_after_generate value of a seed widget is UI-only and follows it in widgets_values).
OUTPUTS = {
    "Flux2LocalModelLoader": [("model", "FLUX2LOCAL_MODEL"), ("info", "STRING")],
    "Flux2LocalTextEncoderLoader": [("text_encoder", "FLUX2LOCAL_TEXT_ENCODER")],
    "Flux2LocalEncodePrompt": [
        ("conditioning", "FLUX2LOCAL_CONDITIONING"),
        ("prompt", "STRING"),
        ("CONDITIONING", "CONDITIONING"),
        ("negative", "CONDITIONING"),
    ],
    "Flux2LocalMultiReference": [("conditioning", "FLUX2LOCAL_CONDITIONING")],
    "Flux2LocalSampler": [("LATENT", "LATENT")],
    "Flux2LocalVAELoader": [("vae", "FLUX2LOCAL_VAE")],
    "Flux2LocalVAEDecode": [("IMAGE", "IMAGE")],
    "Flux2LocalVAEEncode": [("LATENT", "LATENT")],
    "LoadImage": [("IMAGE", "IMAGE"), ("MASK", "MASK")],
    "SaveImage": [],
    "Note": [],
    # ComfyUI's own nodes used beside ours
    "Flux2LocalToNativeModel": [("MODEL", "MODEL")],
    "EasyCache": [("MODEL", "MODEL")],
    "CFGGuider": [("GUIDER", "GUIDER")],
    "RandomNoise": [("NOISE", "NOISE")],
    "KSamplerSelect": [("SAMPLER", "SAMPLER")],
    "Flux2Scheduler": [("SIGMAS", "SIGMAS")],
    "EmptyFlux2LatentImage": [("LATENT", "LATENT")],
    "SamplerCustomAdvanced": [("output", "LATENT"), ("denoised_output", "LATENT")],
}
WIDGETS = {
    "Flux2LocalModelLoader": ["model_name", "dtype", "keep_fp8", "vram_budget_gb", "pinned_ram_gb"],
    "Flux2LocalTextEncoderLoader": ["text_encoder_name", "tokenizer", "dtype"],
    "Flux2LocalEncodePrompt": [
        "prompt",
        "negative_prompt",
        "upsample_prompt",
        "upsample_seed",
        "upsample_max_tokens",
    ],
    "Flux2LocalMultiReference": ["megapixels_per_reference"],
    "Flux2LocalSampler": [
        "width",
        "height",
        "seed",
        "steps",
        "guidance",
        "denoise",
        "sampler_name",
        "scheduler",
    ],
    "Flux2LocalVAELoader": ["vae_name", "dtype"],
    "Flux2LocalVAEDecode": ["tiling"],
    "Flux2LocalVAEEncode": ["tiling"],
    "LoadImage": ["image"],
    "SaveImage": ["filename_prefix"],
    "Note": [],
    "Flux2LocalToNativeModel": [],
    "EasyCache": ["reuse_threshold", "start_percent", "end_percent", "verbose"],
    "CFGGuider": ["cfg"],
    "RandomNoise": ["noise_seed"],
    "KSamplerSelect": ["sampler_name"],
    "Flux2Scheduler": ["steps", "width", "height"],
    "EmptyFlux2LatentImage": ["width", "height", "batch_size"],
    "SamplerCustomAdvanced": [],
}
SEED_WIDGETS = {("Flux2LocalSampler", "seed"), ("RandomNoise", "noise_seed")}
# An image_upload combo gets an upload button in the editor, whose value ("image") it saves right
# after the file name: UI-only, never sent to the server.
UPLOAD_WIDGETS = {("LoadImage", "image")}
LINK_INPUTS = {
    "Flux2LocalEncodePrompt": [("text_encoder", "FLUX2LOCAL_TEXT_ENCODER"), ("upsample_images", "IMAGE")],
    "Flux2LocalMultiReference": [("conditioning", "FLUX2LOCAL_CONDITIONING"), ("vae", "FLUX2LOCAL_VAE")]
    + [(f"images.image_{i}", "IMAGE") for i in range(1, 11)],
    "Flux2LocalSampler": [
        ("model", "FLUX2LOCAL_MODEL,MODEL"),
        ("conditioning", "FLUX2LOCAL_CONDITIONING,CONDITIONING"),
        ("latent", "LATENT"),
        ("negative", "CONDITIONING"),
    ],
    "Flux2LocalVAEDecode": [("vae", "FLUX2LOCAL_VAE"), ("samples", "LATENT")],
    "Flux2LocalVAEEncode": [("vae", "FLUX2LOCAL_VAE"), ("pixels", "IMAGE")],
    "SaveImage": [("images", "IMAGE")],
    "Flux2LocalToNativeModel": [("model", "FLUX2LOCAL_MODEL")],
    "EasyCache": [("model", "MODEL")],
    "CFGGuider": [("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING")],
    "SamplerCustomAdvanced": [
        ("noise", "NOISE"),
        ("guider", "GUIDER"),
        ("sampler", "SAMPLER"),
        ("sigmas", "SIGMAS"),
        ("latent_image", "LATENT"),
    ],
}


def pipeline(
    model: str,
    te: str,
    prompt: str,
    *,
    negative: str = "",
    width=1024,
    height=1024,
    steps=0,
    guidance=0.0,
    vram_gb=0.0,
    refs: tuple[str, ...] = (),
    prefix="flux2",
) -> list[Node]:
    """The common graph: loaders -> encode -> [references] -> sampler -> decode -> save."""
    nodes = [
        Node(1, "Flux2LocalModelLoader", [model, "bf16", True, vram_gb, 0.0]),
        Node(2, "Flux2LocalTextEncoderLoader", [te, "auto", "bf16"]),
        Node(3, "Flux2LocalVAELoader", [VAE, "bf16"]),
        Node(4, "Flux2LocalEncodePrompt", [prompt, negative, False, 0, 512], {"text_encoder": (2, 0)}),
    ]
    cond = (4, 0)
    if refs:
        links = {"conditioning": cond, "vae": (3, 0)}
        for i, name in enumerate(refs, start=1):
            nodes.append(Node(20 + i, "LoadImage", [name]))
            links[f"images.image_{i}"] = (20 + i, 0)
        nodes.append(Node(5, "Flux2LocalMultiReference", [1.0], links))
        cond = (5, 0)
    nodes += [
        Node(
            6,
            "Flux2LocalSampler",
            [width, height, 42, steps, guidance, 1.0, "euler", "flux2"],
            {"model": (1, 0), "conditioning": cond},
        ),
        Node(7, "Flux2LocalVAEDecode", ["auto"], {"vae": (3, 0), "samples": (6, 0)}),
        Node(8, "SaveImage", [prefix], {"images": (7, 0)}),
    ]
    return nodes


def native_mix(model: str, te: str, prompt: str, negative: str, steps: int, cfg: float) -> list[Node]:
    """Our loaders, streaming and prompt encoding under ComfyUI's own sampling nodes and EasyCache."""
    return [
        Node(1, "Flux2LocalModelLoader", [model, "bf16", True, 0.0, 0.0]),
        Node(2, "Flux2LocalTextEncoderLoader", [te, "auto", "bf16"]),
        Node(3, "Flux2LocalVAELoader", [VAE, "bf16"]),
        Node(4, "Flux2LocalEncodePrompt", [prompt, negative, False, 0, 512], {"text_encoder": (2, 0)}),
        Node(5, "Flux2LocalToNativeModel", [], {"model": (1, 0)}),
        Node(6, "EasyCache", [0.2, 0.15, 0.95, False], {"model": (5, 0)}),
        Node(7, "CFGGuider", [cfg], {"model": (6, 0), "positive": (4, 2), "negative": (4, 3)}),
        Node(8, "RandomNoise", [42]),
        Node(9, "KSamplerSelect", ["euler"]),
        Node(10, "Flux2Scheduler", [steps, 1024, 1024]),
        Node(11, "EmptyFlux2LatentImage", [1024, 1024, 1]),
        Node(
            12,
            "SamplerCustomAdvanced",
            [],
            {
                "noise": (8, 0),
                "guider": (7, 0),
                "sampler": (9, 0),
                "sigmas": (10, 0),
                "latent_image": (11, 0),
            },
        ),
        Node(13, "Flux2LocalVAEDecode", ["auto"], {"vae": (3, 0), "samples": (12, 0)}),
        Node(14, "SaveImage", ["flux2_native_mix"], {"images": (13, 0)}),
    ]


WORKFLOWS: dict[str, tuple[str, list[Node]]] = {
    "flux2_dev_text_to_image": (
        NOTE_FILES["dev"]
        + "\n\n[dev] text-to-image: 28 steps (BFL's suggested trade-off; 50 is the default), "
        "embedded guidance 4. Needs about 24 GB of VRAM with FP8 weights; streaming fills the rest from RAM.",
        pipeline(
            DEV_MODEL,
            DEV_TE,
            "A red fox sitting in fresh snow at sunrise, detailed fur, 85mm photo",
            steps=28,
            guidance=4.0,
            prefix="flux2_dev",
        ),
    ),
    "flux2_klein_4b_text_to_image": (
        NOTE_FILES["klein"]
        + "\n\n[klein] 4B distilled: 4 steps, guidance fixed at 1 (no CFG). Fits 12 GB cards.",
        pipeline(
            KLEIN_MODEL,
            KLEIN_TE,
            "A lighthouse on a cliff in a storm, oil painting",
            steps=4,
            guidance=1.0,
            prefix="flux2_klein_4b",
        ),
    ),
    "flux2_klein_base_cfg": (
        NOTE_FILES["klein-base"]
        + "\n\n[klein] base 4B (undistilled): 50 steps with CFG 4 and a negative prompt.",
        pipeline(
            KLEIN_BASE_MODEL,
            KLEIN_TE,
            "A ceramic teapot shaped like a snail, studio photo",
            negative="blurry, low quality",
            steps=50,
            guidance=4.0,
            prefix="flux2_klein_base",
        ),
    ),
    "flux2_edit_single_image": (
        NOTE_FILES["klein"] + "\n\nSingle-image edit: put your picture in ComfyUI/input/ and pick it in "
        "Load Image. The reference is scaled to 1 MP and attached to the conditioning.",
        pipeline(
            KLEIN_MODEL,
            KLEIN_TE,
            "Make it a winter scene with snow on every surface",
            steps=4,
            guidance=1.0,
            refs=REFERENCE_IMAGES[:1],
            prefix="flux2_edit",
        ),
    ),
    "flux2_multi_reference": (
        NOTE_FILES["klein"] + "\n\nMulti-reference with 3 images (up to 10: the next image input appears "
        "when the previous one is connected).",
        pipeline(
            KLEIN_MODEL,
            KLEIN_TE,
            "The person from image 1 wearing the jacket from image 2 in the room from image 3",
            steps=4,
            guidance=1.0,
            refs=REFERENCE_IMAGES,
            prefix="flux2_multi_ref",
        ),
    ),
    "flux2_klein_base_native_samplers": (
        NOTE_FILES["klein-base"]
        + "\n\nOur loaders and prompt encoding under ComfyUI's own sampling: FLUX.2 To Native MODEL hands "
        "the model (streamed when it does not fit) to EasyCache and CFGGuider; SamplerCustomAdvanced with "
        "Flux2Scheduler samples 20 steps at CFG 5 (the official [klein] base settings). Native LoRA loaders "
        "(LoraLoaderModelOnly) can go between To Native MODEL and EasyCache.",
        native_mix(
            KLEIN_BASE_MODEL,
            KLEIN_TE,
            "A ceramic teapot shaped like a snail, studio photo",
            "blurry, low quality",
            steps=20,
            cfg=5.0,
        ),
    ),
    "flux2_dev_12gb_streaming": (
        NOTE_FILES["dev"]
        + "\n\n[dev] on a 12 GB card: FP8 weights kept in FP8, 8 GB of them resident on the "
        "GPU, the other blocks streamed from pinned RAM (about 40 GB of system RAM needed).",
        pipeline(
            DEV_MODEL,
            DEV_TE,
            "A watercolor map of an imaginary island with mountains and rivers",
            steps=28,
            guidance=4.0,
            vram_gb=8.0,
            prefix="flux2_dev_12gb",
        ),
    ),
}


def to_api(nodes: list[Node]) -> dict:
    out = {}
    for n in nodes:
        inputs = dict(zip(WIDGETS[n.type], n.widgets))
        inputs.update({k: [str(src), slot] for k, (src, slot) in n.links.items()})
        out[str(n.id)] = {"class_type": n.type, "inputs": inputs, "_meta": {"title": n.title or n.type}}
    return out


def to_ui(nodes: list[Node], note: str, name: str) -> dict:
    links, ui_nodes = [], []
    link_id = 0
    out_links: dict[tuple[int, int], list[int]] = {}
    in_links: dict[tuple[int, str], int] = {}
    by_id = {n.id: n for n in nodes}
    for n in nodes:
        for name, (src, slot) in n.links.items():
            link_id += 1
            ltype = OUTPUTS[by_id[src].type][slot][1]
            target_slot = [i for i, _ in _ui_inputs(n)].index(name)
            links.append([link_id, src, slot, n.id, target_slot, ltype])
            out_links.setdefault((src, slot), []).append(link_id)
            in_links[(n.id, name)] = link_id
    for order, n in enumerate(nodes):
        widgets = []
        for name, value in zip(WIDGETS[n.type], n.widgets):
            widgets.append(value)
            if (n.type, name) in SEED_WIDGETS:
                widgets.append("fixed")
            if (n.type, name) in UPLOAD_WIDGETS:
                widgets.append("image")
        ui_nodes.append(
            {
                "id": n.id,
                "type": n.type,
                "pos": [40 + 360 * (order % 4), 40 + 300 * (order // 4)],
                "size": [320, 200],
                "flags": {},
                "order": order,
                "mode": 0,
                "inputs": [
                    {"name": name, "type": t, "link": in_links.get((n.id, name))}
                    | ({"label": name.split(".")[-1]} if "." in name else {})
                    for name, t in _ui_inputs(n)
                ],
                "outputs": [
                    {"name": name, "type": t, "links": out_links.get((n.id, slot), []), "slot_index": slot}
                    for slot, (name, t) in enumerate(OUTPUTS[n.type])
                ],
                "properties": {"Node name for S&R": n.type},
                "widgets_values": widgets,
            }
        )
    note_id = max(n.id for n in nodes) + 1
    ui_nodes.append(
        {
            "id": note_id,
            "type": "Note",
            "pos": [40, 40 + 300 * ((len(nodes) + 3) // 4)],
            "size": [700, 180],
            "flags": {},
            "order": len(nodes),
            "mode": 0,
            "inputs": [],
            "outputs": [],
            "properties": {"text": ""},
            "widgets_values": [note],
            "title": "Model files",
        }
    )
    return {
        "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"flux2local/workflows/{name}")),
        "revision": 0,
        "last_node_id": note_id,
        "last_link_id": link_id,
        "nodes": ui_nodes,
        "links": links,
        "groups": [],
        "config": {},
        # The offset keeps the first row and the Note clear of the editor's side bar and tab bar.
        "extra": {"ds": {"scale": 0.8, "offset": [80, 80]}},
        "version": 0.4,
    }


def _ui_inputs(n: Node) -> list[tuple[str, str]]:
    """Socket inputs shown on the node: link inputs; for Multi-Reference the connected images + one free slot."""
    spec = LINK_INPUTS.get(n.type, [])
    if n.type != "Flux2LocalMultiReference":
        return spec
    used = sum(1 for k in n.links if k.startswith("images."))
    return spec[:2] + spec[2 : 2 + min(used + 1, 10)]


def main() -> None:
    for name, (note, nodes) in WORKFLOWS.items():
        (HERE / f"{name}.json").write_text(json.dumps(to_ui(nodes, note, name), indent=2) + "\n")
        (HERE / f"{name}.api.json").write_text(json.dumps(to_api(nodes), indent=2) + "\n")


if __name__ == "__main__":
    main()
