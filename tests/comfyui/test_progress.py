"""The sampler reports progress with latent previews over ComfyUI's websocket, as native samplers do."""

from __future__ import annotations

import asyncio
import json

import aiohttp
from comfy_helpers import WORKFLOWS, load, nodes_of, shrink


async def _run_and_listen(comfy, prompt: dict, timeout: float = 120.0) -> tuple[list[dict], int]:
    messages, previews = [], 0
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(f"{comfy.url}/ws?clientId={comfy.client_id}") as ws:
            async with session.post(
                f"{comfy.url}/prompt", json={"prompt": prompt, "client_id": comfy.client_id}
            ) as r:
                assert r.status == 200, await r.text()
                prompt_id = (await r.json())["prompt_id"]
            async with asyncio.timeout(timeout):
                async for msg in ws:
                    if msg.type == aiohttp.WSMsgType.BINARY:
                        previews += 1
                        continue
                    data = json.loads(msg.data)
                    messages.append(data)
                    if data["type"] in ("execution_success", "execution_error", "execution_interrupted") and (
                        data["data"].get("prompt_id") == prompt_id
                    ):
                        break
    return messages, previews


def test_sampler_progress_and_previews(comfy):
    prompt = shrink(load(WORKFLOWS / "flux2_klein_4b_text_to_image.api.json"), width=128, height=128, steps=5)
    sampler_id = next(k for k, n in prompt.items() if n["class_type"] == "Flux2LocalSampler")
    nodes_of(prompt, "Flux2LocalSampler")[0]["inputs"]["seed"] = 777  # not cached from other tests
    messages, previews = asyncio.run(_run_and_listen(comfy, prompt))
    assert messages[-1]["type"] == "execution_success", messages[-1]
    progress = [
        m["data"] for m in messages if m["type"] == "progress" and m["data"].get("node") == sampler_id
    ]
    assert progress, [m["type"] for m in messages]
    assert all(p["max"] == 5 for p in progress)
    assert progress[-1]["value"] == 5
    assert previews >= 1, "no latent preview frames were sent during sampling"
