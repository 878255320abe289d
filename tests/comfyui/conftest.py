"""One real ComfyUI server for the whole test session (harness: workflows/comfy_server.py).

The pinned tree at $COMFYUI_PATH runs headless on CPU on 127.0.0.1 with a temporary
--base-directory; this pack is linked into its custom_nodes under an arbitrary folder name (so only
relative imports work) and a tiny random FLUX.2 set is written into its models folders under the
official file names. Without a ComfyUI tree the tests FAIL, saying how to get one.
city96's ComfyUI-GGUF (the GGUF anchor) is linked into custom_nodes too when present; the anchor
test FAILS, saying how to fetch it, when it is not.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
# Not packages: the server harness lives in workflows/ (the main job uses it too), helpers here.
sys.path[:0] = [str(HERE), str(HERE.parents[1] / "workflows")]

from comfy_helpers import comfyui_gguf_missing, comfyui_gguf_path, write_reference_images  # noqa: E402
from comfy_server import ComfyServer, ComfyUIMissing, comfyui_path, make_base_directory  # noqa: E402


@pytest.fixture(scope="session")
def comfy(tmp_path_factory) -> ComfyServer:
    try:
        comfyui_path()
    except ComfyUIMissing as e:
        pytest.fail(str(e), pytrace=False)
    from flux2_core.tiny import write_tiny_model_set

    base = tmp_path_factory.mktemp("comfyui-base")
    models = make_base_directory(base, pack_folder_name="any-name_flux2pack")
    (base / "custom_nodes" / "flux2local_test_bridge").symlink_to(
        HERE / "bridge_pack", target_is_directory=True
    )
    if comfyui_gguf_missing() is None:
        (base / "custom_nodes" / "ComfyUI-GGUF").symlink_to(comfyui_gguf_path(), target_is_directory=True)
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


_SHOTS: list[Path] = []  # the screenshot folder, once made, for the end-of-run summary


@pytest.fixture(scope="session")
def screenshots(tmp_path_factory) -> Path:
    """Where the editor tests save screenshots for a person to look at (the tests do not read them):
    $FLUX2LOCAL_SCREENSHOT_DIR, else ``editor-screenshots`` under pytest's base temp folder."""
    folder = Path(
        os.environ.get("FLUX2LOCAL_SCREENSHOT_DIR") or tmp_path_factory.getbasetemp() / "editor-screenshots"
    )
    folder.mkdir(parents=True, exist_ok=True)
    _SHOTS[:] = [folder]
    return folder


@pytest.fixture(scope="session")
def editor(comfy):
    """One headless Chromium on the session server's editor, ready and with no dialog open."""
    from browser import BrowserError, Page
    from editor_page import CLOSE_DIALOGS, DIALOGS, READY

    try:
        page = Page().__enter__()
    except BrowserError as e:
        failure = str(e)  # failed outside the except block, so the report is just this message
    else:
        failure = None
    if failure:
        pytest.fail(failure, pytrace=False)
    try:
        page.navigate(comfy.url + "/")
        page.wait_for(READY, timeout=90, what="the ComfyUI editor with the Flux2Local nodes")
        # A new user gets the templates browser on start: close it, so that any dialog seen later
        # comes from what a test did.
        left = page.call(CLOSE_DIALOGS)
        assert left == 0, f"could not close the start-up dialogs: {page.evaluate(DIALOGS)}"
        yield page
    finally:
        page.close()


def pytest_terminal_summary(terminalreporter):
    if _SHOTS and _SHOTS[0].is_dir():
        count = len(list(_SHOTS[0].glob("*.png")))
        terminalreporter.write_line(f"editor screenshots ({count}): {_SHOTS[0]}")


def pytest_collection_modifyitems(config, items):
    # Every test here talks to the real server: mark them so `-m "not comfyui"` can leave them out.
    for item in items:
        if HERE in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.comfyui)
