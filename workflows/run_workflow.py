"""The main job: run one shared API workflow headless through a real ComfyUI and write its PNG.

Starts the ComfyUI tree at $COMFYUI_PATH on 127.0.0.1 with a temporary --base-directory (this pack
linked into its custom_nodes), POSTs the workflow, polls /history, copies the PNG to --out and stops
the server by its PID.

Models: if every model file the workflow names is in $COMFYUI_PATH/models, those are used. If not,
a tiny random FLUX.2 set is written once into a cache folder and used instead; the picture is then
noise from an untrained model, but every node of the workflow runs for real.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import zlib
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

from comfy_server import ComfyServer, comfyui_path, history_error, history_images, make_base_directory  # noqa: E402

# Which ComfyUI model folders each loader input reads (first match wins, as in ComfyUI).
MODEL_INPUTS = {
    "model_name": ("diffusion_models", "unet"),
    "text_encoder_name": ("text_encoders", "clip"),
    "vae_name": ("vae",),
    "lora_name": ("loras",),
    "classifier": ("safety",),
}
DEFAULT_WORKFLOW = "flux2_klein_4b_text_to_image"


def say(msg: str) -> None:
    print(f"[flux2local] {msg}", flush=True)  # noqa: T201 - a command-line tool talking to its user


def needed_models(prompt: dict) -> list[tuple[tuple[str, ...], str]]:
    out = []
    for node in prompt.values():
        for key, folders in MODEL_INPUTS.items():
            value = node["inputs"].get(key)
            if isinstance(value, str) and value != "none":
                out.append((folders, value))
    return out


def has_models(models_dir: Path, prompt: dict) -> bool:
    return all(
        any((models_dir / f / name).exists() for f in folders) for folders, name in needed_models(prompt)
    )


def tiny_models_dir() -> Path:
    """The cached tiny random set, written on first use."""
    from flux2_core.tiny import is_tiny_model_set, write_tiny_model_set

    cache = Path(
        os.environ.get("FLUX2LOCAL_TINY_MODELS") or Path.home() / ".cache" / "flux2local" / "tiny-models"
    )
    if not is_tiny_model_set(cache):
        say(f"writing a tiny random FLUX.2 model set to {cache} (first run only)")
        write_tiny_model_set(cache)
    return cache


def ensure_inputs(prompt: dict, input_dir: Path, user_input_dir: Path) -> None:
    """Reference images: the user's from $COMFYUI_PATH/input, else generated sample pictures."""
    import numpy as np
    from PIL import Image

    for node in prompt.values():
        if node["class_type"] != "LoadImage":
            continue
        name = node["inputs"]["image"]
        if (user_input_dir / name).is_file():
            shutil.copy(user_input_dir / name, input_dir / name)
            continue
        say(f"no {name} in {user_input_dir}: using a generated sample picture instead")
        rng = np.random.default_rng(zlib.crc32(name.encode()))  # same picture every run
        yy, xx = np.mgrid[0:512, 0:512]
        img = np.stack([xx / 512, yy / 512, (xx * yy) / 512**2], -1) * 200 + rng.uniform(0, 55, (512, 512, 3))
        Image.fromarray(img.astype(np.uint8)).save(input_dir / name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--workflow",
        default=DEFAULT_WORKFLOW,
        help=f"name of a workflows/api/*.api.json file (default {DEFAULT_WORKFLOW}), or a path",
    )
    parser.add_argument("--out", default=str(HERE.parent / "out"), help="folder for the PNG (default ./out)")
    parser.add_argument(
        "--tiny", action="store_true", help="use the tiny random set even if real weights exist"
    )
    args = parser.parse_args(argv)

    path = (
        Path(args.workflow) if args.workflow.endswith(".json") else HERE / "api" / f"{args.workflow}.api.json"
    )
    if not path.is_file():
        names = ", ".join(sorted(p.name.removesuffix(".api.json") for p in (HERE / "api").glob("*.api.json")))
        say(f"no workflow {path}; the shipped ones are: {names}")
        return 2
    prompt = json.loads(path.read_text())
    tree = comfyui_path()
    real_models = tree / "models"
    tiny = args.tiny or not has_models(real_models, prompt)
    if tiny:
        if not args.tiny:
            missing = [
                n
                for folders, n in needed_models(prompt)
                if not any((real_models / f / n).exists() for f in folders)
            ]
            say(f"no real FLUX.2 weights for this workflow in {real_models} (missing: {', '.join(missing)})")
        models = tiny_models_dir()
        say(
            "USING TINY RANDOM WEIGHTS: the picture will be noise from an untrained model. "
            "Every node of the workflow still runs."
        )
    else:
        models = real_models
        say(f"using the real weights in {models}")

    base = Path(tempfile.mkdtemp(prefix="flux2local-run-"))
    make_base_directory(base)
    shutil.rmtree(base / "models")
    (base / "models").symlink_to(models, target_is_directory=True)
    ensure_inputs(prompt, base / "input", tree / "input")

    server = ComfyServer(base)
    t0 = time.monotonic()
    try:
        server.start()
        say(
            f"ComfyUI (pid {server.proc.pid}) up on {server.url} in {time.monotonic() - t0:.1f} s; running {path.name}"
        )
        t1 = time.monotonic()
        entry = server.run(prompt, timeout=24 * 3600)
        err = history_error(entry)
        if err is not None:
            say(f"the workflow failed in {err.get('node_type')}: {err.get('exception_message', '').strip()}")
            return 1
        images = history_images(entry)
        if not images:
            say(f"the workflow produced no image:\n{server.log_tail()}")
            return 1
        out_dir = Path(args.out)
        out_dir.mkdir(parents=True, exist_ok=True)
        dest = out_dir / f"{path.name.removesuffix('.api.json')}{'_tiny-random' if tiny else ''}.png"
        dest.write_bytes(server.view(images[0]))
        say(f"ran in {time.monotonic() - t1:.1f} s")
        if tiny:
            say("note: this PNG is noise from an untrained tiny random model (no real weights were found)")
        say(f"PNG written to {dest.resolve()}")
        return 0
    finally:
        server.stop()
        log = base / "comfyui.log"
        if log.exists():
            say(f"ComfyUI log: {log}")


if __name__ == "__main__":
    sys.exit(main())
