"""GGUF files that change under a loaded model, --disable-mmap for GGUF, and read progress while loading."""

from __future__ import annotations

import os
import shutil
import time

import pytest
import torch

from flux2_core import load_transformer
from flux2_core.checkpoint import GGUFFile, path_identity, track_files
from flux2_core.errors import CheckpointError
from flux2_core.tiny.gguf import write_tiny_gguf_transformer


@pytest.fixture(scope="module")
def gguf_path(tmp_path_factory):
    return write_tiny_gguf_transformer(tmp_path_factory.mktemp("gguf") / "m.gguf", "klein-4b", mix="Q4_K_M")


def _copy(src, tmp_path, name="copy.gguf"):
    dst = tmp_path / name
    shutil.copy(src, dst)
    return dst


def _after_a_tick():
    time.sleep(0.05)  # file times come from a coarse clock


def _mapped(path) -> bool:
    with open("/proc/self/maps") as f:
        return str(path) in f.read()


def test_a_gguf_remembers_its_identity_and_refuses_reads_once_changed(gguf_path, tmp_path):
    p = _copy(gguf_path, tmp_path)
    f = GGUFFile(p)
    key = next(k for k in f.keys() if f.is_quantized(k))
    before = f.get(key).clone()
    assert f.changed() is None
    _after_a_tick()
    st = os.stat(p)
    data = bytearray(p.read_bytes())
    data[-8:] = bytes(range(8))
    with open(p, "r+b") as out:
        out.write(bytes(data))
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert f.changed() == "was rewritten in place"
    with pytest.raises(CheckpointError, match="rewritten") as e:
        f.get(key)
    assert str(p) in str(e.value)
    with pytest.raises(CheckpointError, match="rewritten"):
        f.read_into(key, torch.empty_like(before))

    g = GGUFFile(p)
    os.truncate(p, os.path.getsize(p) // 2)
    with pytest.raises(CheckpointError, match="truncated"):
        g.get(key)  # never touches the mapping past the new end (that would be SIGBUS)


def test_track_files_records_ggufs_and_the_loader_names_a_changed_one(gguf_path, tmp_path):
    p = _copy(gguf_path, tmp_path)
    with track_files() as files:
        model = load_transformer(p, dtype=torch.float32)
    assert files.paths == [str(p)] and model.checkpoint_format == "gguf"
    files.check_unchanged()
    before = path_identity(p)
    _after_a_tick()
    os.replace(_copy(gguf_path, tmp_path, "new.gguf"), p)
    assert files.changes() == [(str(p), "was replaced by another file")]
    assert path_identity(p) != before  # what the loader node's fingerprint sees
    with pytest.raises(CheckpointError, match="replaced"):
        files.check_unchanged()


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads Linux /proc/self/maps")
def test_mmap_off_keeps_no_mapping_and_gives_the_same_model(gguf_path, tmp_path):
    p = _copy(gguf_path, tmp_path)
    mapped = GGUFFile(p)
    assert _mapped(p)
    del mapped
    assert not _mapped(p)
    with track_files(mmap=False) as files:
        owned = load_transformer(p, dtype=torch.float32)
    assert not files.files[0].mmap
    assert not _mapped(p), "a GGUF opened with mmap=False must not stay mapped"
    reference = load_transformer(p, dtype=torch.float32)
    ref_state, own_state = reference.state_dict(), owned.state_dict()
    assert ref_state.keys() == own_state.keys()
    for k in ref_state:
        assert torch.equal(ref_state[k], own_state[k]), k
    f = GGUFFile(p, mmap=False)
    assert f.architecture == GGUFFile(p).architecture and f.field_names() == GGUFFile(p).field_names()
    # Owned memory survives the file being truncated (a mapping would crash on touch).
    t = f.get(next(k for k in f.keys() if f.is_quantized(k)))
    os.truncate(p, 100)
    assert int(t.sum()) >= 0
    with pytest.raises(CheckpointError, match="truncated"):
        f.get(next(iter(f.keys())))


@pytest.mark.parametrize("mmap", [True, False])
def test_on_read_hears_every_tensor_the_loader_reads(gguf_path, mmap):
    seen = []
    with track_files(mmap=mmap, on_read=seen.append) as files:
        load_transformer(gguf_path, dtype=torch.float32)
    f = files.files[0]
    assert len(seen) == len(f.keys())
    assert sum(seen) == sum(f.nbytes(k) for k in f.keys())
    load_transformer(gguf_path, dtype=torch.float32)  # outside the block: nobody is told
    assert len(seen) == len(f.keys())


def test_a_raising_on_read_stops_the_load(gguf_path):
    class Stop(Exception):
        pass

    def stop_after_three(nbytes, calls=[]):  # noqa: B006 - a counter local to this test
        calls.append(nbytes)
        if len(calls) == 3:
            raise Stop

    with pytest.raises(Stop), track_files(on_read=stop_after_three):
        load_transformer(gguf_path, dtype=torch.float32)
