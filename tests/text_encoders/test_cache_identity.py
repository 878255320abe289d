"""The embedding cache keys encoders and tokenizers by content identity, never by name alone."""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest
import torch
from torch.testing import assert_close

from flux2_core.text_encoders import EmbeddingCache, load_text_encoder


def _load(path, tokenizer, cache):
    return load_text_encoder(path, tokenizer=tokenizer, dtype=torch.float32, cache=cache)


@pytest.mark.parametrize("how", ["os.replace", "rewritten in place"])
def test_replaced_encoder_with_same_size_and_mtime_is_not_served_stale(
    tiny_file, tmp_path, qwen_tokenizer_dir, how
):
    a, b = tiny_file("qwen3-4b", "comfyui", seed=0), tiny_file("qwen3-4b", "comfyui", seed=1)
    assert os.path.getsize(a) == os.path.getsize(b)
    truth = _load(b, qwen_tokenizer_dir, None).encode("a cat")  # what the new weights give
    cache = EmbeddingCache()
    path = tmp_path / "qwen_3_4b.safetensors"
    shutil.copy(a, path)
    old = _load(path, qwen_tokenizer_dir, cache).encode("a cat")
    assert not torch.allclose(old, truth)
    st = os.stat(path)
    time.sleep(0.05)  # file times come from a coarse clock
    if how == "os.replace":
        shutil.copy(b, tmp_path / "new.safetensors")
        os.replace(tmp_path / "new.safetensors", path)
    else:
        with open(path, "r+b") as f:
            f.write(open(b, "rb").read())
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # size and modification time as before
    assert_close(_load(path, qwen_tokenizer_dir, cache).encode("a cat"), truth)


def _swapped_tokenizer(src_dir, dst_dir, a: str = "Ġcat", b: str = "Ġdog"):
    """A copy of a tokenizer.json with the ids of two words swapped (a different tokenizer, same size)."""
    data = json.loads((src_dir / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    dst_dir.mkdir(parents=True, exist_ok=True)
    (dst_dir / "tokenizer.json").write_text(json.dumps(data))
    return dst_dir


def test_replaced_tokenizer_json_is_not_served_stale(tiny_file, tmp_path, qwen_tokenizer_dir):
    model = tiny_file("qwen3-4b", "comfyui")
    tok = tmp_path / "tok"
    tok.mkdir()
    shutil.copy(qwen_tokenizer_dir / "tokenizer.json", tok / "tokenizer.json")
    cache = EmbeddingCache()
    old = _load(model, tok, cache).encode("a cat")
    truth = _load(model, _swapped_tokenizer(qwen_tokenizer_dir, tmp_path / "fresh"), None).encode("a cat")
    assert not torch.allclose(old, truth)
    _swapped_tokenizer(qwen_tokenizer_dir, tok)  # same path, other content
    enc = _load(model, tok, cache)
    assert_close(enc.encode("a cat"), truth)
    # identical bytes under another path are the same tokenizer: shared entries
    same = _load(model, _swapped_tokenizer(qwen_tokenizer_dir, tmp_path / "copy"), cache)
    assert same.tokenizer.identity == enc.tokenizer.identity and same.tokenizer.source != enc.tokenizer.source
    hits = cache.hits
    same.encode("a cat")
    assert cache.hits == hits + 1
