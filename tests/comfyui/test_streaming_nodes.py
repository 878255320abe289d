"""Streamed models through a real ComfyUI server: progress while loading, pinning and encoding, pinned
buffers kept across ComfyUI's unloads, released by "unload all", Cancel during an attach, the
out-of-memory relief while sampling, and ComfyUI's --disable-pinned-memory / --disable-mmap.

The suite has no GPU, so these servers run with the CPU playing a small card (nodes/memory.py
``CpuStandIn``, switched on through the test bridge) and page-locking simulated (recorded by the
bridge): holders place, stream, offload and re-attach through the same code as on a GPU, and the
streamer's telemetry shows which bytes were pinned anew and which were reused.
"""

from __future__ import annotations

import asyncio
import json
import os
import struct
import time

import aiohttp
import numpy as np
import pytest
from comfy_helpers import WORKFLOWS, decode_png, load, nodes_of, shrink
from comfy_server import ComfyServer, history_error, history_images, make_base_directory

KLEIN = WORKFLOWS / "flux2_klein_4b_text_to_image.api.json"
# The tiny klein encoder is 21.4 MB (19.4 MB embedding, 27 layers of 75 KB): on a 21 MB "card" some of
# its layers stream. The tiny transformer (12.9 MB; blocks 3.4, 3.4, 1.7, 1.7 MB) gets a 0.01 GiB
# budget on the loader: every block streams.
STAND_IN_VRAM = 21_000_000
TRANSFORMER_BUDGET_GB = 0.01
TEXT = 3  # ComfyUI's BinaryEventTypes.TEXT (send_progress_text)
MIB = 1 << 20


def _prompt(seed: int, text: str, budget: float = TRANSFORMER_BUDGET_GB) -> dict:
    prompt = shrink(load(KLEIN), width=64, height=64, steps=2)
    nodes_of(prompt, "Flux2LocalModelLoader")[0]["inputs"]["vram_budget_gb"] = budget
    nodes_of(prompt, "Flux2LocalSampler")[0]["inputs"]["seed"] = seed
    nodes_of(prompt, "Flux2LocalEncodePrompt")[0]["inputs"]["prompt"] = text
    return prompt


def _node_id(prompt: dict, class_type: str) -> str:
    return next(k for k, n in prompt.items() if n["class_type"] == class_type)


def _start(comfy, tmp_path_factory, name: str, extra_args=()) -> ComfyServer:
    """A server of its own on the session server's model files, with the CPU playing a small card."""
    base = tmp_path_factory.mktemp(name)
    (base / "models").symlink_to(comfy.base / "models", target_is_directory=True)
    make_base_directory(base)
    (base / "custom_nodes" / "flux2local_test_bridge").symlink_to(
        os.path.join(os.path.dirname(__file__), "bridge_pack"), target_is_directory=True
    )
    server = ComfyServer(base, extra_args=list(extra_args)).start()
    _stand_in(server)
    return server


def _stand_in(server, pin_delay_s: float = 0.0) -> None:
    status, body = server.post_json(
        "/flux2local_test/stand_in", {"vram": STAND_IN_VRAM, "pin_delay_s": pin_delay_s}
    )
    assert status == 200, body


@pytest.fixture(scope="module")
def streamed(comfy, tmp_path_factory):
    server = _start(comfy, tmp_path_factory, "streamed")
    try:
        yield server
    finally:
        server.stop()


def _memory(server) -> dict:
    return server.get_json("/flux2local_test/memory")


def _holders(report: dict, label_start: str, budget: float | None) -> list[dict]:
    """Holders (with a streamer) whose label starts so; transformers by their loader's VRAM budget."""
    return [
        h
        for h in report["holders"]
        if h["label"].startswith(label_start)
        and h["streamer"] is not None
        and (budget is None or h["vram_budget_gb"] == budget)
    ]


def _holder(report: dict, label_start: str, budget: float | None = TRANSFORMER_BUDGET_GB) -> dict:
    (h,) = _holders(report, label_start, budget if label_start == "FLUX.2" else None)
    return h


def _image(server, prompt) -> np.ndarray:
    entry = server.run(prompt)
    assert history_error(entry) is None, (history_error(entry), server.log_tail())
    (img,) = history_images(entry)
    return decode_png(server.view(img))


async def _listen(server, prompt: dict, on_text=None, timeout: float = 180.0):
    """Runs ``prompt`` and returns (json messages, [(node id, text)], how it ended)."""
    messages, texts = [], []
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(f"{server.url}/ws?clientId={server.client_id}") as ws:
            async with session.post(
                f"{server.url}/prompt", json={"prompt": prompt, "client_id": server.client_id}
            ) as r:
                assert r.status == 200, await r.text()
                prompt_id = (await r.json())["prompt_id"]
            async with asyncio.timeout(timeout):
                async for msg in ws:
                    if msg.type == aiohttp.WSMsgType.BINARY:
                        (event,) = struct.unpack(">I", msg.data[:4])
                        if event == TEXT:
                            (n,) = struct.unpack(">I", msg.data[4:8])
                            node, text = msg.data[8 : 8 + n].decode(), msg.data[8 + n :].decode()
                            texts.append((node, text))
                            if on_text is not None:
                                await on_text(session, node, text)
                        continue
                    data = json.loads(msg.data)
                    messages.append(data)
                    ends = ("execution_success", "execution_error", "execution_interrupted")
                    if data["type"] in ends and data["data"].get("prompt_id") == prompt_id:
                        return messages, texts, data["type"]
    raise AssertionError("no end message")


def test_progress_while_loading_pinning_and_encoding_and_pins_kept_across_unloads(streamed, comfy):
    first = _prompt(seed=101, text="a lighthouse, streamed")
    messages, texts, end = asyncio.run(_listen(streamed, first))
    assert end == "execution_success", streamed.log_tail()
    loader, encoder_loader = (
        _node_id(first, "Flux2LocalModelLoader"),
        _node_id(first, "Flux2LocalTextEncoderLoader"),
    )
    encode, sampler = _node_id(first, "Flux2LocalEncodePrompt"), _node_id(first, "Flux2LocalSampler")
    by_node: dict[str, list[str]] = {}
    for node, text in texts:
        by_node.setdefault(node, []).append(text)
    progress = {m["data"]["node"] for m in messages if m["type"] == "progress"}
    # Every slow stage moves a bar on its own node and says what it is doing.
    assert {loader, encoder_loader, encode, sampler} <= progress, (progress, texts)
    assert any(t.startswith("loaded flux-2-klein-4b.safetensors") for t in by_node[loader]), by_node[loader]
    assert any(t.startswith("loading qwen_3_4b.safetensors: ") for t in by_node[encoder_loader])
    assert any("pinning" in t and " of " in t and "MiB" in t for t in by_node[sampler]), by_node[sampler]
    assert by_node[sampler][-1].endswith("placed and pinned)"), by_node[sampler]
    assert any(t.endswith("prompt, layer 27 of 27") for t in by_node[encode]), by_node[encode]
    assert any("reading" in t for t in by_node[encode])  # the encoder's streamed layers, from the file

    after_first = _memory(streamed)
    transformer = _holder(after_first, "FLUX.2")["streamer"]
    assert transformer["attached"] and transformer["streamed_blocks"] == 4
    assert transformer["pinned_bytes"] == transformer["streamed_bytes"] > 0  # all pinned, newly
    assert transformer["reused_pinned_bytes"] == 0
    encoder = _holder(after_first, "text encoder")
    # Preparing the transformer asked ComfyUI for room: our idle encoder was offloaded, its pins kept.
    assert not encoder["placed"] and encoder["streamer"]["kept_pinned_bytes"] > 0
    assert after_first["ledger_used"] == after_first["fake_pinned"] > transformer["streamed_bytes"]
    calls = after_first["register_calls"]

    second = _prompt(seed=102, text="a lighthouse at dawn, streamed")
    streamed_image = _image(streamed, second)
    after = _memory(streamed)
    transformer = _holder(after, "FLUX.2")["streamer"]
    # Both models were offloaded by the other's preparation and attached again from their kept buffers.
    assert transformer["reused_pinned_bytes"] == transformer["streamed_bytes"] == transformer["pinned_bytes"]
    assert after["register_calls"] == calls, "a re-attach after an unload pinned again"
    assert _holder(after, "text encoder")["streamer"]["kept_pinned_bytes"] > 0
    # Streaming (and its kept buffers) changes nothing in the picture: same as the resident run.
    np.testing.assert_array_equal(
        streamed_image, _image(comfy, _prompt(seed=102, text="a lighthouse at dawn, streamed"))
    )

    # "Unload models" (POST /free, the button): everything offloaded, kept pins really released.
    status, _ = streamed.post_json("/free", {"unload_models": True, "free_memory": False})
    assert status == 200
    deadline = time.monotonic() + 30
    while (report := _memory(streamed))["ledger_used"]:
        assert time.monotonic() < deadline, report
        time.sleep(0.2)
    assert report["fake_pinned"] == 0
    assert all(not h["placed"] for h in report["holders"])
    assert all(h["streamer"]["kept_pinned_bytes"] == 0 for h in report["holders"] if h["streamer"])
    np.testing.assert_array_equal(
        _image(streamed, _prompt(seed=102, text="a lighthouse at dawn, streamed ")),
        _image(comfy, _prompt(seed=102, text="a lighthouse at dawn, streamed ")),
    )
    assert _memory(streamed)["register_calls"] > calls  # pinned anew after the release


def test_dropping_the_loaded_model_releases_its_kept_pins(streamed):
    _image(streamed, _prompt(seed=201, text="a boat"))
    _image(streamed, _prompt(seed=202, text="a boat at night"))  # the transformer now keeps its pins
    assert _memory(streamed)["ledger_used"] > 0
    # "Free node cache" only: ComfyUI drops the cached loader outputs (our holders) without unloading.
    streamed.post_json("/free", {"unload_models": False, "free_memory": True})
    deadline = time.monotonic() + 30
    while (report := _memory(streamed))["ledger_used"] or report["holders"]:
        assert time.monotonic() < deadline, report
        time.sleep(0.2)
    assert report["fake_pinned"] == 0


def test_an_out_of_memory_error_in_a_forward_is_relieved_and_the_step_repeated(streamed):
    prompt = _prompt(seed=301, text="a fox")
    expected = _image(streamed, prompt)
    oomed = _prompt(seed=301, text="a fox")
    oomed["oom"] = {"class_type": "Flux2LocalTestOutOfMemoryOnce", "inputs": {"model": ["1", 0]}}
    nodes_of(oomed, "Flux2LocalSampler")[0]["inputs"]["model"] = ["oom", 0]
    before = _memory(streamed)["forced_ooms"]
    got = _image(streamed, oomed)
    report = _memory(streamed)
    assert report["forced_ooms"] == before + 1
    transformer = _holder(report, "FLUX.2")["streamer"]
    assert transformer["oom_retries"] == 1  # one relief: fewer bytes on the device, then the same step
    assert "out of device memory in a forward pass" in streamed.log_path.read_text(errors="replace")
    np.testing.assert_array_equal(got, expected)


def test_cancel_during_an_attach_stops_it_cleanly(streamed):
    streamed.post_json("/free", {"unload_models": True, "free_memory": False})  # so the next attach pins
    _stand_in(streamed, pin_delay_s=0.4)
    prompt = _prompt(seed=401, text="a cancelled lighthouse")
    sampler = _node_id(prompt, "Flux2LocalSampler")
    asked = []

    async def cancel_when_pinning(session, node, text):
        if node == sampler and "pinning" in text and not asked:
            asked.append(text)
            async with session.post(f"{streamed.url}/interrupt", json={}) as r:
                assert r.status == 200

    try:
        _, texts, end = asyncio.run(_listen(streamed, prompt, on_text=cancel_when_pinning))
    finally:
        _stand_in(streamed, pin_delay_s=0.0)
    assert asked, texts
    assert end == "execution_interrupted"
    assert not any(n == sampler and "ready" in t for n, t in texts), "the attach finished despite Cancel"
    report = _memory(streamed)
    assert (
        report["ledger_used"] == report["fake_pinned"]
    )  # no reservation leaked, no buffer left pinned twice
    assert not _holder(report, "FLUX.2")["placed"]
    assert not _holder(report, "FLUX.2")["streamer"]["attached"]
    _image(streamed, _prompt(seed=402, text="a lighthouse after the cancel"))  # and the server goes on


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads Linux /proc/<pid>/maps")
def test_disable_pinned_memory_and_disable_mmap_stream_from_owned_pageable_memory(comfy, tmp_path_factory):
    server = _start(comfy, tmp_path_factory, "nopin", ["--disable-pinned-memory", "--disable-mmap"])
    try:
        prompt = _prompt(seed=501, text="a lighthouse, never pinned")
        got = _image(server, prompt)
        report = _memory(server)
        transformer = _holder(report, "FLUX.2")["streamer"]
        assert transformer["attached"] and transformer["streamed_blocks"] == 4
        assert (
            transformer["pinned_bytes"] == 0
            and transformer["pageable_bytes"] == transformer["streamed_bytes"]
        )
        assert report["register_calls"] == 0 and report["ledger_used"] == 0
        with open(f"/proc/{server.proc.pid}/maps") as f:
            maps = f.read()
        assert ".safetensors" not in maps  # the weights are the process's own memory
        np.testing.assert_array_equal(
            got, _image(comfy, _prompt(seed=501, text="a lighthouse, never pinned"))
        )
    finally:
        server.stop()


def test_4_megapixels_plan_activations_and_tile_the_decode(streamed):
    """2048 x 2048 end to end: the sampler keeps the activations' room free (at 4 MP the tiny
    transformer no longer fits beside them and streams), the decode asks for its own and the idle
    transformer gives way, the decode tiles; the picture comes out whole."""
    from flux2_core import Flux2Config, plan_sampling

    cfg = Flux2Config.from_name("klein-4b").replace(hidden_size=256, num_heads=2, depth=2, depth_single=2)
    act = {side: plan_sampling(cfg, side, side).activation_bytes for side in (1024, 2048)}
    vram = act[2048] + 8 * MIB  # small runs: room for all 12.9 MB of weights; 4 MP: 8 MiB of them
    assert act[1024] + 40 * MIB < vram
    streamed.post_json("/free", {"unload_models": True, "free_memory": False})
    status, body = streamed.post_json("/flux2local_test/stand_in", {"vram": vram})
    try:
        small = _prompt(seed=601, text="a small lighthouse", budget=0.0)  # 0 = auto: what the card allows
        _image(streamed, small)
        report = _memory(streamed)
        # Resident for a small image: placed whole (from page-locked copies), nothing streamed.
        (small_run,) = _holders(report, "FLUX.2", 0.0)
        assert small_run["placed"] and small_run["streamer"]["streamed_blocks"] == 0
        assert small_run["streamer"]["resident_pinned_bytes"] > 0
        big = _prompt(seed=602, text="a big lighthouse", budget=0.0)
        nodes_of(big, "Flux2LocalSampler")[0]["inputs"].update(width=2048, height=2048, steps=1)
        nodes_of(big, "Flux2LocalVAEDecode")[0]["inputs"]["tiling"] = "512"  # CPU: small tiles are fastest
        image = _image(streamed, big)
    finally:
        _stand_in(streamed)
    assert image.shape == (2048, 2048, 3) and image.std() > 0
    report = _memory(streamed)
    transformer = _holder(report, "FLUX.2", budget=0.0)
    log = streamed.log_path.read_text(errors="replace")
    # 4 MP: the resident placement left too little room, the activations took the weights' room and
    # the model streamed; then the decode's request for room offloaded it (its pins kept).
    assert "FLUX.2 custom leaves too little room for this run's activations" in log
    assert not transformer["placed"] and transformer["streamer"]["kept_pinned_bytes"] > 0
    assert "VAE ran out of memory" not in log
