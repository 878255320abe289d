"""How a workflow description becomes ComfyUI's two JSON formats: the editor's (UI) and /prompt's (API).

A workflow is a list of ``Node``s, each placed in a named column. Columns run left to right in the
order of ``COLUMNS`` (note, models, prompt, references, sampling, output) and each is framed by a
group; nodes stack top to bottom inside their column. Sizes are generous on purpose: the editor
grows a node to fit its widgets (and image previews) but never shrinks it, so a layout made of
these sizes keeps its gaps after the editor has laid it out (tests/comfyui checks the real bounds).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

# Title bar above each node's position (LiteGraph draws it outside the node's size).
TITLE_H = 30
GAP = 30  # between nodes in a column
COLUMN_GAP = 40
GROUP_PAD = 16
GROUP_TITLE_H = 44
# The first view: at least this zoom, below which the editor stops drawing text (its default level
# of detail hides 14 px text drawn smaller than 8 px); wider graphs then continue off screen.
MIN_SCALE = 0.6
VIEW = (1480, 860)  # screen pixels for the graph in a 1600 x 1000 window, right of the side bar

# Columns left to right; each is a stack of sections (key, group title, colour). The note has no
# group and sits above the models, where a person starts reading.
COLUMNS = (
    (("note", None, None), ("models", "Models", "#3f789e")),
    (("prompt", "Prompt", "#8a6f3f"),),
    (("references", "Reference images", "#4f7a4f"),),
    (("sampling", "Sample", "#6f4f8a"),),
    (("output", "Decode and save", "#7a4f4f"),),
)
SECTION_GAP = 40  # between the note and the group below it

# Per node type: outputs (name, type) and the widget inputs in schema order. A seed widget's
# control_after_generate value follows it in widgets_values (UI only); so does the upload button's
# value ("image") after a LoadImage file name.
OUTPUTS = {
    "Flux2LocalModelLoader": [("model", "FLUX2LOCAL_MODEL"), ("info", "STRING")],
    "Flux2LocalLoRALoader": [("model", "FLUX2LOCAL_MODEL")],
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
    "Flux2LocalContentFilter": [("prompt", "STRING"), ("reference_images", "IMAGE"), ("images", "IMAGE")],
    "Flux2LocalSaveImage": [],
    "LoadImage": [("IMAGE", "IMAGE"), ("MASK", "MASK")],
    "SaveImage": [],
    "MarkdownNote": [],
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
    "Flux2LocalLoRALoader": ["lora_name", "strength"],
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
    "Flux2LocalContentFilter": ["classifier", "nsfw_threshold", "vlm_check", "vlm_threshold", "prompt"],
    "Flux2LocalSaveImage": [
        "filename_prefix",
        "format",
        "jpeg_quality",
        "watermark",
        "c2pa_certificate",
        "c2pa_private_key",
    ],
    "LoadImage": ["image"],
    "SaveImage": ["filename_prefix"],
    "MarkdownNote": ["text"],
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
UPLOAD_WIDGETS = {("LoadImage", "image")}
# Socket inputs in schema order (Multi-Reference shows the connected images plus one free slot).
LINK_INPUTS = {
    "Flux2LocalLoRALoader": [("model", "FLUX2LOCAL_MODEL")],
    "Flux2LocalEncodePrompt": [("text_encoder", "FLUX2LOCAL_TEXT_ENCODER"), ("upsample_images", "IMAGE")],
    "Flux2LocalMultiReference": [("conditioning", "FLUX2LOCAL_CONDITIONING"), ("vae", "FLUX2LOCAL_VAE")]
    + [(f"images.image_{i}", "IMAGE") for i in range(1, 11)],
    # A socket taking ours or ComfyUI's type (io.MultiType) lists both, comma-separated.
    "Flux2LocalSampler": [
        ("model", "FLUX2LOCAL_MODEL,MODEL"),
        ("conditioning", "FLUX2LOCAL_CONDITIONING,CONDITIONING"),
        ("latent", "LATENT"),
        ("negative", "CONDITIONING"),
    ],
    "Flux2LocalVAEDecode": [("vae", "FLUX2LOCAL_VAE"), ("samples", "LATENT")],
    "Flux2LocalContentFilter": [
        ("text_encoder", "FLUX2LOCAL_TEXT_ENCODER"),
        ("reference_images", "IMAGE"),
        ("images", "IMAGE"),
    ],
    "Flux2LocalSaveImage": [("images", "IMAGE"), ("model", "FLUX2LOCAL_MODEL")],
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
# (width, height) of the node body. The Sampler and the image savers leave room below their widgets
# for the live preview and the result; Load Image for its picture; the loaders for the line of
# loading progress they show during a run.
SIZES = {
    "Flux2LocalModelLoader": (360, 250),  # room for the detected model and the loading progress
    "Flux2LocalLoRALoader": (360, 100),
    "Flux2LocalTextEncoderLoader": (360, 120),
    "Flux2LocalVAELoader": (360, 120),
    "Flux2LocalEncodePrompt": (400, 330),
    "Flux2LocalMultiReference": (300, 180),
    "Flux2LocalSampler": (360, 600),
    "Flux2LocalVAEDecode": (360, 80),
    "Flux2LocalContentFilter": (360, 230),
    "Flux2LocalSaveImage": (380, 540),
    "LoadImage": (280, 320),
    "SaveImage": (380, 480),
    "MarkdownNote": (380, 440),
    "Flux2LocalToNativeModel": (300, 60),
    "EasyCache": (300, 130),
    "CFGGuider": (300, 90),
    "RandomNoise": (300, 90),
    "KSamplerSelect": (300, 60),
    "Flux2Scheduler": (300, 110),
    "EmptyFlux2LatentImage": (300, 110),
    "SamplerCustomAdvanced": (380, 520),
}


@dataclass
class Node:
    """One node: its widget values in ``WIDGETS`` order and its socket links.

    Attributes:
        links: input name -> (source node id, source output slot).
        models: the Missing Models dialog's entries for this loader ({name, url, directory}).
    """

    id: int
    type: str
    column: str
    widgets: list = field(default_factory=list)
    links: dict[str, tuple[int, int]] = field(default_factory=dict)
    title: str | None = None
    models: list[dict] | None = None
    seed_control: str = "randomize"
    sub: int = 0  # sub-column inside its section (Load Image nodes left of what they feed)
    size: tuple[int, int] | None = None  # instead of SIZES[type]

    @property
    def extent(self) -> tuple[int, int]:
        return self.size or SIZES[self.type]


def note_size(text: str, width: int = 380) -> tuple[int, int]:
    """A Markdown note tall enough to show ``text`` without scrolling: at the editor's note font about
    72 characters fit a line of a 380-unit note, 11.5 units high; headings take about 2.5 lines."""
    per_line = width * 72 // 380
    lines = 0.0
    for line in text.splitlines():
        lines += 2.5 if line.startswith("#") else -(-len(line) // per_line) if line else 0.5
    return width, int(70 + 11.5 * lines)


def to_api(nodes: list[Node]) -> dict:
    """The /prompt format: {id: {class_type, inputs, _meta}}; editor-only nodes are left out."""
    out = {}
    for n in nodes:
        if n.type == "MarkdownNote":
            continue
        inputs = dict(zip(WIDGETS[n.type], n.widgets))
        inputs.update({k: [str(src), slot] for k, (src, slot) in n.links.items()})
        out[str(n.id)] = {"class_type": n.type, "inputs": inputs, "_meta": {"title": n.title or n.type}}
    return out


def _ui_inputs(n: Node) -> list[tuple[str, str]]:
    spec = LINK_INPUTS.get(n.type, [])
    if n.type != "Flux2LocalMultiReference":
        return spec
    used = sum(1 for k in n.links if k.startswith("images."))
    return spec[:2] + spec[2 : 2 + min(used + 1, 10)]


def _section(members: list[Node], x: float, y: float) -> tuple[dict[int, tuple[float, float]], float, float]:
    """Places a section's nodes from (x, y): sub-columns side by side, nodes stacked in each.

    Returns positions, the section's width and its bottom.
    """
    pos = {}
    bottom = y
    for sub in sorted({n.sub for n in members}):
        column = [n for n in members if n.sub == sub]
        top = y + TITLE_H
        for n in column:
            pos[n.id] = (x, top)
            top += n.extent[1] + GAP + TITLE_H
        bottom = max(bottom, top - GAP - TITLE_H)
        x += max(n.extent[0] for n in column) + GAP
    return pos, x - GAP, bottom


def place(
    nodes: list[Node], titles: dict[str, str] | None = None
) -> tuple[dict[int, tuple[float, float]], list[dict]]:
    """Positions (node body top-left) and groups: columns left to right, sections stacked in each.

    Args:
        titles: section key -> group title, where a workflow names a step differently.
    """
    pos: dict[int, tuple[float, float]] = {}
    groups = []
    x = 0.0
    for column in COLUMNS:
        y, right = 0.0, x
        for key, title, colour in column:
            members = [n for n in nodes if n.column == key]
            if not members:
                continue
            pad, head = (GROUP_PAD, GROUP_TITLE_H) if title else (0, 0)
            title = (titles or {}).get(key, title)
            placed, end_x, bottom = _section(members, x + pad, y + head)
            pos.update(placed)
            if title:
                bounds = [x, y, end_x + pad - x, bottom + pad - y]
                number = len(groups) + 1  # the steps in reading order: 1. Models, 2. Prompt, ...
                groups.append(
                    {
                        "id": number,
                        "title": f"{number}. {title}",
                        "bounding": bounds,
                        "color": colour,
                        "font_size": 24,
                        "flags": {},
                    }
                )
                end_x, bottom = end_x + pad, bottom + pad
            right = max(right, end_x)
            y = bottom + SECTION_GAP
        if right > x:
            x = right + COLUMN_GAP
    return pos, groups


def to_ui(nodes: list[Node], name: str, titles: dict[str, str] | None = None) -> dict:
    """The editor's format (version 0.4): nodes with positions and sizes, links, groups."""
    pos, groups = place(nodes, titles)
    links, ui_nodes = [], []
    out_links: dict[tuple[int, int], list[int]] = {}
    in_links: dict[tuple[int, str], int] = {}
    by_id = {n.id: n for n in nodes}
    for n in nodes:
        for inp, (src, slot) in n.links.items():
            link_id = len(links) + 1
            ltype = OUTPUTS[by_id[src].type][slot][1]
            target_slot = [i for i, _ in _ui_inputs(n)].index(inp)
            links.append([link_id, src, slot, n.id, target_slot, ltype])
            out_links.setdefault((src, slot), []).append(link_id)
            in_links[(n.id, inp)] = link_id
    for order, n in enumerate(nodes):
        widgets = []
        for wname, value in zip(WIDGETS[n.type], n.widgets):
            widgets.append(value)
            if (n.type, wname) in SEED_WIDGETS:
                widgets.append(n.seed_control)
            if (n.type, wname) in UPLOAD_WIDGETS:
                widgets.append("image")
        properties: dict = {"Node name for S&R": n.type}
        if n.models:
            properties["models"] = n.models
        node = {
            "id": n.id,
            "type": n.type,
            "pos": list(pos[n.id]),
            "size": list(n.extent),
            "flags": {},
            "order": order,
            "mode": 0,
            "inputs": [
                {"name": inp, "type": t, "link": in_links.get((n.id, inp))}
                | ({"label": inp.split(".")[-1]} if "." in inp else {})
                for inp, t in _ui_inputs(n)
            ],
            "outputs": [
                {"name": oname, "type": t, "links": out_links.get((n.id, slot), []), "slot_index": slot}
                for slot, (oname, t) in enumerate(OUTPUTS[n.type])
            ],
            "properties": properties,
            "widgets_values": widgets,
        }
        if n.title:
            node["title"] = n.title
        ui_nodes.append(node)
    right = max(p[0] + by_id[i].extent[0] for i, p in pos.items())
    bottom = max(p[1] + by_id[i].extent[1] for i, p in pos.items())
    # The whole graph in the first view where it fits at a readable zoom (the editor restores it).
    scale = round(max(MIN_SCALE, min(1.0, VIEW[0] / right, VIEW[1] / bottom)), 3)
    return {
        "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"flux2local/workflows/{name}")),
        "revision": 0,
        "last_node_id": max(n.id for n in nodes),
        "last_link_id": len(links),
        "nodes": ui_nodes,
        "links": links,
        "groups": groups,
        "config": {},
        "extra": {"ds": {"scale": scale, "offset": [70 / scale, 100 / scale]}},
        "version": 0.4,
    }
