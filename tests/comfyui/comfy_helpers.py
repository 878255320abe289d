"""Small helpers shared by the ComfyUI tests: workflow edits, PNG checks, UI -> API conversion."""

from __future__ import annotations

import copy
import io
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
# API-format workflows (POST /prompt, workflows/run.sh) and the editor templates (UI format).
WORKFLOWS = REPO / "workflows" / "api"
TEMPLATES = REPO / "example_workflows"
# Editor-only node types: they never reach the server and are absent from /object_info.
FRONTEND_ONLY = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
REFERENCE_SIZES = ((96, 64), (64, 64), (80, 112))  # (width, height), deliberately not square


def api_workflows() -> list[Path]:
    return sorted(WORKFLOWS.glob("*.api.json"))


def ui_workflows() -> list[Path]:
    return sorted(TEMPLATES.glob("*.json"))


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def nodes_of(prompt: dict, class_type: str) -> list[dict]:
    return [n for n in prompt.values() if n["class_type"] == class_type]


def shrink(
    prompt: dict, width: int = 192, height: int = 128, steps: int | None = None, dtype: str | None = None
) -> dict:
    """A copy of an API prompt with a small image size (tiny models on CPU) and optional overrides."""
    prompt = copy.deepcopy(prompt)
    # ComfyUI's own nodes in mixed workflows: the empty latent sets the size, the scheduler its steps.
    for kind in ("Flux2LocalSampler", "EmptyFlux2LatentImage", "Flux2Scheduler"):
        for node in nodes_of(prompt, kind):
            node["inputs"]["width"], node["inputs"]["height"] = width, height
            if steps is not None and kind != "EmptyFlux2LatentImage":
                node["inputs"]["steps"] = steps
    if dtype is not None:
        for t in ("Flux2LocalModelLoader", "Flux2LocalTextEncoderLoader", "Flux2LocalVAELoader"):
            for node in nodes_of(prompt, t):
                node["inputs"]["dtype"] = dtype
    return prompt


def decode_png(data: bytes) -> np.ndarray:
    img = Image.open(io.BytesIO(data))
    assert img.format == "PNG"
    return np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0


def ui_to_api(ui: dict, object_info: dict) -> dict:
    """Converts a UI-format workflow to API format the way the editor does, using /object_info.

    Widget values are matched to the schema's widget inputs in input order; an INT with
    control_after_generate carries one extra UI-only value ("fixed", "randomize"...) that is dropped,
    and so does an image_upload combo (the editor's upload button saves "image").
    """
    links = {link[0]: link for link in ui["links"]}
    out = {}
    for node in ui["nodes"]:
        if node["type"] in FRONTEND_ONLY or node.get("mode", 0) in (2, 4):
            continue
        info = object_info[node["type"]]
        linked = {i["name"]: i["link"] for i in node.get("inputs", []) if i.get("link") is not None}
        values = list(node.get("widgets_values", []))
        inputs: dict = {}
        spec = info["input"].get("required", {}) | info["input"].get("optional", {})
        for name in info["input_order"].get("required", []) + info["input_order"].get("optional", []):
            kind, opts = spec[name][0], (spec[name][1] if len(spec[name]) > 1 else {})
            if name in linked:
                link = links[linked[name]]
                inputs[name] = [str(link[1]), link[2]]
            elif kind == "COMFY_AUTOGROW_V3":
                prefix = name + "."
                for sub, link_id in linked.items():
                    if sub.startswith(prefix):
                        link = links[link_id]
                        inputs[sub] = [str(link[1]), link[2]]
            elif isinstance(kind, list) or kind in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"):
                if opts.get("forceInput"):
                    continue
                if not values:
                    raise AssertionError(
                        f"node {node['id']} ({node['type']}): no widget value left for {name!r}"
                    )
                inputs[name] = values.pop(0)
                if opts.get("control_after_generate"):
                    values.pop(0)
                if opts.get("image_upload") and values and values[0] == "image":
                    values.pop(0)  # the upload button's value, saved by the editor after the file name
        if values:
            raise AssertionError(f"node {node['id']} ({node['type']}): unused widget values {values}")
        out[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return out


def write_reference_images(input_dir: Path) -> list[str]:
    """Three small deterministic RGB images (gradients plus seeded noise) named as the workflows expect."""
    names = []
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate(REFERENCE_SIZES, start=1):
        yy, xx = np.mgrid[0:h, 0:w]
        img = np.stack([xx / w, yy / h, (xx + yy) / (w + h)], -1) * 200 + rng.uniform(0, 55, (h, w, 3))
        name = f"flux2_reference_{i}.png"
        Image.fromarray(img.astype(np.uint8)).save(input_dir / name)
        names.append(name)
    return names


def comfyui_gguf_path() -> Path:
    """city96's ComfyUI-GGUF tree ($COMFYUI_GGUF_PATH, default $HOME/ComfyUI-GGUF); it may be missing."""
    return Path(os.environ.get("COMFYUI_GGUF_PATH") or Path.home() / "ComfyUI-GGUF")


def comfyui_gguf_missing() -> str | None:
    """Why the ComfyUI-GGUF anchor cannot run (how to fetch it), or None when it is there."""
    path = comfyui_gguf_path()
    if (path / "nodes.py").is_file() and (path / "loader.py").is_file():
        return None
    return (
        f"no ComfyUI-GGUF tree at COMFYUI_GGUF_PATH={path}. The GGUF anchor test loads the same GGUF "
        "through city96's ComfyUI-GGUF in the real ComfyUI: fetch github:city96/ComfyUI-GGUF (commit "
        "795e451) into $HOME/ComfyUI-GGUF the way the ComfyUI tree is fetched (DEVELOPERS.md, "
        "'Set-up'), or point COMFYUI_GGUF_PATH at a checkout."
    )
