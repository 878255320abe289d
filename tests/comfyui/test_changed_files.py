"""Model files that change under the running server: truncated, replaced, rewritten in place.

Re-downloading over the same name (cp, curl -o, wget -O) truncates a file that a loaded model may
still view through a memory mapping; touching those pages is SIGBUS, which would kill the server
with its whole queue. Each test works on its own copy of a tiny file, so the shared set stays intact.
Transformers are checked as safetensors and as GGUF (Q4_K_M) files.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from comfy_helpers import WORKFLOWS, decode_png, load, nodes_of, shrink
from comfy_server import ComfyServer, history_error, history_images, make_base_directory

KLEIN = WORKFLOWS / "flux2_klein_4b_text_to_image.api.json"
SAFETENSORS_KLEIN = "flux-2-klein-4b.safetensors"
GGUF_KLEIN = "flux-2-klein-4b-Q4_K_M.gguf"
FORMATS = {"safetensors": (SAFETENSORS_KLEIN, ".safetensors"), "gguf": (GGUF_KLEIN, ".gguf")}


@pytest.fixture(scope="module")
def klein_files(comfy) -> dict[str, tuple[str, str]]:
    """Format -> (tiny klein-4b file in diffusion_models, suffix); the GGUF one is written here."""
    if not (comfy.base / "models" / "diffusion_models" / GGUF_KLEIN).exists():
        _other_klein(comfy, GGUF_KLEIN, seed=3)
    return FORMATS


def _prompt(model: str | None = None, encoder: str | None = None, seed: int = 1, text: str | None = None):
    prompt = shrink(load(KLEIN), width=64, height=64)
    if model:
        nodes_of(prompt, "Flux2LocalModelLoader")[0]["inputs"]["model_name"] = model
    if encoder:
        nodes_of(prompt, "Flux2LocalTextEncoderLoader")[0]["inputs"]["text_encoder_name"] = encoder
    nodes_of(prompt, "Flux2LocalSampler")[0]["inputs"]["seed"] = seed
    if text is not None:
        nodes_of(prompt, "Flux2LocalEncodePrompt")[0]["inputs"]["prompt"] = text
    return prompt


def _image(comfy, prompt) -> np.ndarray:
    entry = comfy.run(prompt)
    assert history_error(entry) is None, history_error(entry)
    (img,) = history_images(entry)
    return decode_png(comfy.view(img))


def _error(comfy, prompt) -> dict:
    entry = comfy.run(prompt)
    err = history_error(entry)
    assert err is not None, f"expected an execution error, got {entry['status']}"
    assert err["exception_type"] == "Flux2Local.Flux2LocalError", err
    return err


def _copy(comfy, folder: str, source: str, name: str) -> str:
    models = comfy.base / "models" / folder
    shutil.copy(models / source, models / name)
    return str(models / name)


def _other_klein(comfy, name: str, seed: int) -> str:
    """Another tiny klein-4b file (other random weights, same shapes and size) under ``name``: a
    ComfyUI-layout safetensors file, or a Q4_K_M GGUF when the name ends in .gguf."""
    from safetensors import safe_open

    from flux2_core.tiny.gguf import write_tiny_gguf_transformer
    from flux2_core.tiny.transformer import write_tiny_transformer

    models = comfy.base / "models" / "diffusion_models"
    with safe_open(str(models / SAFETENSORS_KLEIN), "pt") as f:
        key = next(k for k in f.keys() if k.endswith("txt_in.weight"))
        context_dim = f.get_slice(key).get_shape()[1]
    path = models / name
    if name.endswith(".gguf"):
        write_tiny_gguf_transformer(path, "klein-4b", mix="Q4_K_M", seed=seed, context_dim=context_dim)
    else:
        write_tiny_transformer(path, variant="klein-4b", layout="comfyui", seed=seed, context_dim=context_dim)
    return str(path)


def _assert_serving(comfy):
    assert comfy.alive(), comfy.log_tail()
    _image(comfy, _prompt(seed=77))


@pytest.mark.parametrize("which", ["transformer", "gguf transformer", "text_encoder"])
def test_truncated_while_loaded_fails_cleanly_and_the_next_load_works(comfy, klein_files, which):
    if which.endswith("transformer"):
        source, suffix = klein_files["gguf" if which.startswith("gguf") else "safetensors"]
        name = "trunc-klein" + suffix
        path = _copy(comfy, "diffusion_models", source, name)
        make = lambda seed, text: _prompt(model=name, seed=seed, text=text)  # noqa: E731
    else:
        name = "trunc-qwen.safetensors"
        path = _copy(comfy, "text_encoders", "qwen_3_4b.safetensors", name)
        make = lambda seed, text: _prompt(encoder=name, seed=seed, text=text)  # noqa: E731
    original = open(path, "rb").read()
    _image(comfy, make(1, "a lighthouse"))
    os.truncate(path, len(original) // 2)  # truncate -s 50%
    err = _error(comfy, make(2, "a lighthouse at night"))  # new seed and prompt: no cached outputs
    assert name in err["exception_message"] and "truncated" in err["exception_message"]
    assert comfy.alive(), comfy.log_tail()
    time.sleep(0.05)
    with open(path, "wb") as f:  # the download finishes: the same name works again
        f.write(original)
    _image(comfy, make(3, "a lighthouse at dawn"))
    _assert_serving(comfy)


@pytest.mark.parametrize("fmt", ["safetensors", "gguf"])
def test_truncated_between_loader_and_sampler_is_refused_naming_the_file(comfy, klein_files, fmt):
    """The loader ran and then the file changed: the sampler must not touch the mapping."""
    source, suffix = klein_files[fmt]
    name = "midrun-klein" + suffix
    path = _copy(comfy, "diffusion_models", source, name)
    original = open(path, "rb").read()
    prompt = _prompt(model=name, seed=11)
    prompt["cut"] = {
        "class_type": "Flux2LocalTestTruncateFile",
        "inputs": {"model": ["1", 0], "path": path, "fraction": 0.5},
    }
    nodes_of(prompt, "Flux2LocalSampler")[0]["inputs"]["model"] = ["cut", 0]
    err = _error(comfy, prompt)
    assert err["node_type"] == "Flux2LocalSampler"
    msg = err["exception_message"]
    assert name in msg and "truncated" in msg and "Queue the prompt again" in msg
    with open(path, "wb") as f:
        f.write(original)
    _assert_serving(comfy)


@pytest.mark.parametrize("fmt", ["safetensors", "gguf"])
@pytest.mark.parametrize("how", ["os.replace", "rewritten in place"])
def test_changed_file_is_reloaded(comfy, klein_files, how, fmt):
    source, suffix = klein_files[fmt]
    name = f"changing-klein-{how.replace(' ', '-').replace('.', '-')}{suffix}"
    path = _copy(comfy, "diffusion_models", source, name)
    fresh = _other_klein(comfy, f"fresh-{name}", seed=999)
    expected = _image(comfy, _prompt(model=f"fresh-{name}", seed=5))  # what the new weights give
    before = _image(comfy, _prompt(model=name, seed=5))  # now cached: loader, encoder and sampler outputs
    assert not np.array_equal(before, expected)
    time.sleep(0.05)  # file times come from a coarse clock
    if how == "os.replace":
        tmp = path + ".partial"
        shutil.copy(fresh, tmp)
        os.replace(tmp, path)
    else:
        st = os.stat(path)
        data = open(fresh, "rb").read()
        assert len(data) == st.st_size
        with open(path, "r+b") as f:
            f.write(data)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # even with its old modification time
    after = _image(comfy, _prompt(model=name, seed=5))  # same inputs as `before`
    np.testing.assert_array_equal(after, expected)


def _mapped_files(pid: int) -> str:
    with open(f"/proc/{pid}/maps") as f:
        return f.read()


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads Linux /proc/<pid>/maps")
def test_disable_mmap_is_honoured(comfy, klein_files, tmp_path):
    """With --disable-mmap no model file stays mapped; by default the loaded file is mapped."""
    name = "mapped-klein.safetensors"
    path = _copy(comfy, "diffusion_models", SAFETENSORS_KLEIN, name)
    gguf_name = "mapped-klein.gguf"
    gguf_path = _copy(comfy, "diffusion_models", klein_files["gguf"][0], gguf_name)
    for n, p in ((name, path), (gguf_name, gguf_path)):  # (the loader's cache holds the last model)
        _image(comfy, _prompt(model=n, seed=21))
        assert p in _mapped_files(comfy.proc.pid)  # the default: zero-copy views of the file

    base = tmp_path / "nommap"
    base.mkdir()
    (base / "models").symlink_to(comfy.base / "models", target_is_directory=True)
    for sub in ("input",):
        (base / sub).symlink_to(comfy.base / sub, target_is_directory=True)
    make_base_directory(base)
    server = ComfyServer(base, extra_args=["--disable-mmap"]).start()
    try:
        _image(server, _prompt(model=name, seed=21))
        _image(server, _prompt(model=gguf_name, seed=21))
        maps = _mapped_files(server.proc.pid)
        for suffix in (".safetensors", ".gguf"):
            assert suffix not in maps, [line for line in maps.splitlines() if suffix in line]
        # and a file truncated under it cannot crash it: the weights are the pack's own memory
        for n, p in ((name, path), (gguf_name, gguf_path)):
            os.truncate(p, os.path.getsize(p) // 2)
            err = history_error(server.run(_prompt(model=n, seed=22)))
            assert err is not None and n in err["exception_message"]
        assert server.alive()
    finally:
        server.stop()


def _tokenizer_folder(comfy, name: str, swap: bool) -> str:
    """models/text_encoders/<name>/tokenizer.json: the Qwen3 tokenizer, optionally with two ids swapped."""
    import json

    src = Path(os.environ["FLUX2LOCAL_ASSETS"]) / "qwen3-tokenizer" / "tokenizer.json"
    data = json.loads(src.read_text())
    if swap:
        vocab = data["model"]["vocab"]
        vocab["Ġcat"], vocab["Ġdog"] = vocab["Ġdog"], vocab["Ġcat"]
    folder = comfy.base / "models" / "text_encoders" / name
    folder.mkdir(exist_ok=True)
    (folder / "tokenizer.json").write_text(json.dumps(data))
    return f"{name}/"


def _with_tokenizer(tokenizer: str, seed: int, text: str):
    prompt = _prompt(seed=seed, text=text)
    nodes_of(prompt, "Flux2LocalTextEncoderLoader")[0]["inputs"]["tokenizer"] = tokenizer
    return prompt


def test_replaced_tokenizer_gives_fresh_embeddings(comfy):
    """Same weights, same prompt, tokenizer.json replaced: no stale cached embeddings."""
    expected = _image(comfy, _with_tokenizer(_tokenizer_folder(comfy, "tok-swapped", True), 8, "a cat"))
    tok = _tokenizer_folder(comfy, "tok-changing", False)
    before = _image(comfy, _with_tokenizer(tok, 8, "a cat"))
    assert not np.array_equal(before, expected)
    time.sleep(0.05)
    _tokenizer_folder(comfy, "tok-changing", True)
    np.testing.assert_array_equal(_image(comfy, _with_tokenizer(tok, 8, "a cat")), expected)


def test_free_model_and_node_cache_empties_the_embedding_cache(comfy):
    _image(comfy, _prompt(seed=31, text="a prompt only this test encodes"))
    start = len(comfy.log_path.read_text(errors="replace"))
    comfy.free()
    deadline = time.monotonic() + 30
    while "cached prompt embeddings" not in comfy.log_path.read_text(errors="replace")[start:]:
        assert time.monotonic() < deadline, comfy.log_tail()
        time.sleep(0.1)
    _assert_serving(comfy)
