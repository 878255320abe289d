"""Opt-in: the pack also loads and runs on an older ComfyUI (0.3.64: V3 API without Autogrow, no native FLUX.2).

Set FLUX2LOCAL_OLD_COMFYUI_PATH to such a tree (e.g. `git archive a125cd84` of Comfy-Org/ComfyUI) in an
environment that satisfies its requirements; it starts a second server for this one test.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from comfy_helpers import WORKFLOWS, load, shrink
from comfy_server import ComfyServer, history_error, history_images, make_base_directory
from conftest import write_reference_images

OLD_TREE = os.environ.get("FLUX2LOCAL_OLD_COMFYUI_PATH")


@pytest.mark.skipif(not OLD_TREE, reason="opt-in: set FLUX2LOCAL_OLD_COMFYUI_PATH to a ComfyUI 0.3.64 tree")
def test_workflows_run_on_old_comfyui(tmp_path, comfy):
    base = tmp_path / "old-base"
    make_base_directory(base)
    for folder in ("diffusion_models", "text_encoders", "vae"):  # reuse the session's tiny set
        for f in (comfy.base / "models" / folder).glob("*.safetensors"):
            (base / "models" / folder / f.name).symlink_to(f)
    write_reference_images(base / "input")
    server = ComfyServer(base, tree=Path(OLD_TREE)).start()
    try:
        info = server.get_json("/object_info")
        assert "images.image_2" in info["Flux2LocalMultiReference"]["input"]["optional"]  # no Autogrow there
        for name in ("flux2_klein_4b_text_to_image", "flux2_multi_reference"):
            entry = server.run(shrink(load(WORKFLOWS / f"{name}.api.json"), steps=2))
            assert history_error(entry) is None, history_error(entry)
            assert history_images(entry)
    finally:
        server.stop()
