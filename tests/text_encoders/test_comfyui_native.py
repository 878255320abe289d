"""Parity with ComfyUI's own FLUX.2 text encoders (its model code and tokenizer) on tiny files.

ComfyUI is imported only in a subprocess (native_comfy_te.py), never in the test process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file
from torch.testing import assert_close

HERE = Path(__file__).parent


def _run_native(path: Path, kind: str, inputs: list, tmp_path: Path) -> dict:
    comfy = Path(os.environ.get("COMFYUI_PATH", Path.home() / "ComfyUI"))
    if not (comfy / "comfy" / "text_encoders" / "flux.py").is_file():
        pytest.fail(f"no ComfyUI tree at {comfy}; set COMFYUI_PATH (see DEVELOPERS.md).")
    out = tmp_path / "native.safetensors"
    env = dict(os.environ, PYTHONPATH=str(comfy), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(HERE / "native_comfy_te.py"), str(path), kind, str(out), json.dumps(inputs)],
        cwd=comfy,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report == {"missing": [], "unexpected": []}  # ComfyUI read every tensor of our file
    return load_file(str(out))


def test_qwen3_matches_comfyui_klein_encoder(tiny_file, encoder, tmp_path):
    """Same ids (ComfyUI's KleinTokenizer pads right to 512 with 151643) and same stacked states."""
    prompts = ["a red fox in the snow", ""]
    native = _run_native(tiny_file("qwen3-4b", "comfyui"), "qwen3-4b", prompts, tmp_path)
    enc = encoder("qwen3-4b", "comfyui")
    ids, _ = enc.tokenize(prompts)
    ours = enc.encode(prompts)
    for i in range(len(prompts)):
        assert native[f"ids{i}"].tolist() == ids[i].tolist()
        assert_close(ours[i], native[f"out{i}"])


@pytest.mark.parametrize("layout", ["comfyui", "comfyui-pruned"])
def test_mistral3_matches_comfyui_flux2_model(layout, tiny_file, encoder, tmp_path):
    """ComfyUI's Mistral model on the unpadded ids equals our real-token rows.

    ComfyUI does not pad [dev] prompts to 512 (the reference does, on the left); RoPE is relative, so
    the real tokens' states agree and only the padding rows differ.
    """
    enc = encoder("mistral3", layout)
    prompt = "a lighthouse on a cliff at dusk"
    ids = enc.tokenizer.prompt_ids(prompt)
    native = _run_native(tiny_file("mistral3", layout), "mistral3", [ids], tmp_path)
    ours = enc.encode(prompt)[0]
    assert native["out0"].shape == (len(ids), enc.context_dim)
    assert_close(ours[-len(ids) :], native["out0"], atol=2e-5, rtol=1e-4)
