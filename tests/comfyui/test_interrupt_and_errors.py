"""Cancel during sampling and bad input through the UI path: clean errors, the server keeps serving."""

from __future__ import annotations

import shutil
import time

from comfy_helpers import WORKFLOWS, load, nodes_of, shrink
from comfy_server import history_error, history_images

KLEIN = WORKFLOWS / "flux2_klein_4b_text_to_image.api.json"
MULTI = WORKFLOWS / "flux2_multi_reference.api.json"


def _wait_for_log(comfy, text: str, start: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in comfy.log_path.read_text(errors="replace")[start:]:
            return
        time.sleep(0.05)
    raise AssertionError(f"{text!r} never appeared in the ComfyUI log:\n{comfy.log_tail()}")


def _assert_still_serving(comfy):
    entry = comfy.run(shrink(load(KLEIN), width=64, height=64))
    assert entry["status"]["status_str"] == "success", history_error(entry)
    assert history_images(entry)


def _error_of(comfy, prompt) -> dict:
    entry = comfy.run(prompt)
    err = history_error(entry)
    assert err is not None, f"expected an execution error, got {entry['status']}"
    return err


def test_interrupt_during_sampling_then_next_run_works(comfy):
    prompt = shrink(load(KLEIN), width=512, height=512, steps=200)
    nodes_of(prompt, "Flux2LocalSampler")[0]["inputs"]["seed"] = 4242  # not cached from other tests
    start = len(comfy.log_path.read_text(errors="replace"))
    status, body = comfy.queue_prompt(prompt)
    assert status == 200, body
    _wait_for_log(comfy, "Flux2Local: sampling 200 steps", start)
    time.sleep(0.3)
    t0 = time.monotonic()
    comfy.interrupt()
    entry = comfy.wait_history(body["prompt_id"], timeout=60)
    stopped_after = time.monotonic() - t0
    kinds = [k for k, _ in entry["status"]["messages"]]
    assert "execution_interrupted" in kinds, kinds
    interrupted = dict(entry["status"]["messages"])["execution_interrupted"]
    assert interrupted["node_type"] == "Flux2LocalSampler"
    assert not history_images(entry)
    assert stopped_after < 10, f"sampling took {stopped_after:.1f} s to stop after /interrupt"
    _assert_still_serving(comfy)


def test_free_models_then_next_run_works(comfy):
    comfy.run(shrink(load(KLEIN), width=64, height=64))
    comfy.free()
    _assert_still_serving(comfy)


def test_missing_model_file_is_rejected_with_the_input_named(comfy):
    prompt = shrink(load(KLEIN))
    nodes_of(prompt, "Flux2LocalModelLoader")[0]["inputs"]["model_name"] = "flux2-does-not-exist.safetensors"
    status, body = comfy.queue_prompt(prompt)
    assert status == 400
    errors = body["node_errors"]["1"]["errors"]
    assert any(
        "flux2-does-not-exist.safetensors" in e["details"] and "model_name" in e["details"] for e in errors
    ), errors
    _assert_still_serving(comfy)


def test_wrong_model_type_in_loader(comfy):
    models = comfy.base / "models"
    shutil.copy(
        models / "vae" / "flux2-vae.safetensors",
        models / "diffusion_models" / "not-a-transformer.safetensors",
    )
    prompt = shrink(load(KLEIN))
    nodes_of(prompt, "Flux2LocalModelLoader")[0]["inputs"]["model_name"] = "not-a-transformer.safetensors"
    err = _error_of(comfy, prompt)
    assert err["node_type"] == "Flux2LocalModelLoader"
    assert err["exception_type"] == "Flux2Local.Flux2LocalError"
    assert "not-a-transformer.safetensors" in err["exception_message"]
    _assert_still_serving(comfy)


def test_truncated_file_gives_a_clear_error(comfy):
    models = comfy.base / "models"
    data = (models / "diffusion_models" / "flux-2-klein-4b.safetensors").read_bytes()
    (models / "diffusion_models" / "truncated-klein.safetensors").write_bytes(data[: len(data) // 2])
    prompt = shrink(load(KLEIN))
    nodes_of(prompt, "Flux2LocalModelLoader")[0]["inputs"]["model_name"] = "truncated-klein.safetensors"
    err = _error_of(comfy, prompt)
    assert err["exception_type"] == "Flux2Local.Flux2LocalError"
    assert "truncated-klein.safetensors" in err["exception_message"]
    _assert_still_serving(comfy)


def test_eleven_references_are_refused(comfy):
    prompt = shrink(load(MULTI))
    first = next(k for k, n in prompt.items() if n["class_type"] == "Flux2LocalMultiReference")
    refs = prompt[first]["inputs"]
    loaders = [refs[f"images.image_{i}"] for i in (1, 2, 3)]
    for i in range(4, 11):  # fill the first node to its 10 inputs
        refs[f"images.image_{i}"] = loaders[i % 3]
    # An 11th reference through a second Multi-Reference chained after the first (the UI's only way).
    prompt["90"] = {
        "class_type": "Flux2LocalMultiReference",
        "inputs": {
            "conditioning": [first, 0],
            "vae": refs["vae"],
            "megapixels_per_reference": 1.0,
            "images.image_1": loaders[0],
        },
    }
    nodes_of(prompt, "Flux2LocalSampler")[0]["inputs"]["conditioning"] = ["90", 0]
    err = _error_of(comfy, prompt)
    assert err["node_type"] == "Flux2LocalMultiReference"
    assert "11 reference images" in err["exception_message"] and "at most 10" in err["exception_message"]
    _assert_still_serving(comfy)


def test_width_not_multiple_of_16_is_refused_when_queued(comfy):
    prompt = shrink(load(KLEIN))
    sampler = next(k for k, n in prompt.items() if n["class_type"] == "Flux2LocalSampler")
    prompt[sampler]["inputs"]["width"] = 1000
    status, body = comfy.queue_prompt(prompt)  # ComfyUI's input validation: before any node runs
    assert status == 400, body
    details = [e["details"] for e in body["node_errors"][sampler]["errors"]]
    assert details and all(
        "1000x128" in d and "multiples of 16" in d and "use e.g. 1008x128" in d for d in details
    )
    _assert_still_serving(comfy)


def test_linked_width_not_multiple_of_16_is_refused_when_the_sampler_runs(comfy):
    """A size that comes through a link is unknown while queueing; the sampler refuses it itself."""
    prompt = shrink(load(KLEIN))
    prompt["91"] = {"class_type": "PrimitiveInt", "inputs": {"value": 1000}}
    nodes_of(prompt, "Flux2LocalSampler")[0]["inputs"]["width"] = ["91", 0]
    err = _error_of(comfy, prompt)
    assert err["node_type"] == "Flux2LocalSampler"
    assert err["exception_type"] == "Flux2Local.Flux2LocalError"
    msg = err["exception_message"]
    assert "1000x128" in msg and "multiples of 16" in msg and "Fix:" in msg
    _assert_still_serving(comfy)
