"""One real ComfyUI server for the whole test session (see tests/comfyui/server.py).

The pinned tree at $COMFYUI_PATH runs headless on CPU on 127.0.0.1 with a temporary
--base-directory; this pack is linked into its custom_nodes under an arbitrary folder name (so only
relative imports work) and a tiny random FLUX.2 set is written into its models folders under the
official file names. Without a ComfyUI tree the tests FAIL, saying how to get one.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

HERE = Path(__file__).resolve().parent
# Not packages: the server harness lives in workflows/ (the main job uses it too), helpers here.
sys.path[:0] = [str(HERE), str(HERE.parents[1] / "workflows")]

from comfy_server import ComfyServer, ComfyUIMissing, comfyui_path, make_base_directory  # noqa: E402

WORKFLOWS = HERE.parents[1] / "workflows"
REFERENCE_SIZES = ((96, 64), (64, 64), (80, 112))  # (width, height), deliberately not square


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


@pytest.fixture(scope="session")
def comfy(tmp_path_factory) -> ComfyServer:
    try:
        comfyui_path()
    except ComfyUIMissing as e:
        pytest.fail(str(e), pytrace=False)
    from flux2_core.tiny import write_tiny_model_set

    base = tmp_path_factory.mktemp("comfyui-base")
    models = make_base_directory(base, pack_folder_name="any-name_flux2pack")
    (base / "custom_nodes" / "flux2local_test_bridge").symlink_to(HERE / "bridge_pack", target_is_directory=True)
    write_tiny_model_set(models)
    write_reference_images(base / "input")
    server = ComfyServer(base).start()
    try:
        object_info = server.get_json("/object_info/Flux2LocalSampler")
        if "Flux2LocalSampler" not in object_info:
            pytest.fail(f"Flux2Local nodes did not load into ComfyUI:\n{server.log_tail(80)}", pytrace=False)
        yield server
    finally:
        server.stop()


def load_workflow(name: str) -> dict:
    return json.loads((WORKFLOWS / name).read_text())
