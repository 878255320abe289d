"""Files that change under a loaded model: identities at open, checks before use, owned copies."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from safetensors.torch import save_file

from flux2_core.checkpoint import FileIdentity, SafetensorsFile, open_checkpoint, path_identity, track_files
from flux2_core.errors import CheckpointError


def _tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a.weight": torch.randn(64, 64, generator=g), "b.weight": torch.randn(256, 64, generator=g)}


def _write(path, seed: int = 0):
    save_file(_tensors(seed), str(path))
    return path


def _after_a_tick():
    # File times come from a coarse clock (a few ms): a change within one tick keeps them.
    time.sleep(0.05)


def test_identity_records_the_opened_file_and_every_change(tmp_path):
    p = _write(tmp_path / "m.safetensors")
    f = SafetensorsFile(p)
    assert f.identity == FileIdentity.of(p) and f.changed() is None
    assert len(f.header_digest) == 64
    _after_a_tick()
    # rewritten in place with other bytes, same size, modification time set back: the change time shows it
    st = os.stat(p)
    data = bytearray(p.read_bytes())
    data[-4:] = b"\x01\x02\x03\x04"
    with open(p, "r+b") as out:
        out.write(bytes(data))
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert f.changed() == "was rewritten in place"
    with pytest.raises(CheckpointError) as e:
        f.get("a.weight")
    assert str(p) in str(e.value) and "rewritten" in str(e.value)

    g = SafetensorsFile(p)
    os.truncate(p, os.path.getsize(p) // 2)
    assert g.changed().startswith("was truncated from")
    with pytest.raises(CheckpointError, match="truncated"):
        g.read_into("b.weight", torch.empty(256, 64))

    _write(tmp_path / "m.safetensors")
    h = SafetensorsFile(p)
    _write(tmp_path / "new.safetensors", seed=1)
    os.replace(tmp_path / "new.safetensors", p)
    assert h.changed() == "was replaced by another file"
    os.unlink(p)
    assert h.changed() == "was deleted or moved away"


def test_track_files_names_every_shard_and_reports_changes(tmp_path):
    import json

    folder = tmp_path / "transformer"
    folder.mkdir()
    save_file({"a.weight": torch.zeros(2)}, str(folder / "s1.safetensors"))
    save_file({"b.weight": torch.ones(2)}, str(folder / "s2.safetensors"))
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a.weight": "s1.safetensors", "b.weight": "s2.safetensors"}})
    )
    open_checkpoint(folder)  # opened outside a tracking block: recorded nowhere
    with track_files() as files:
        reader = open_checkpoint(folder)
    assert sorted(files.paths) == sorted(str(folder / n) for n in ("s1.safetensors", "s2.safetensors"))
    files.check_unchanged()
    before = path_identity(folder)
    assert path_identity(folder) == before  # stat only: stable while nothing changes
    _after_a_tick()
    save_file({"b.weight": torch.full((2,), 2.0)}, str(folder / "s2.new"))
    os.replace(folder / "s2.new", folder / "s2.safetensors")
    assert files.changes() == [(str(folder / "s2.safetensors"), "was replaced by another file")]
    with pytest.raises(CheckpointError) as e:
        files.check_unchanged(fix="Queue it again.")
    assert "s2.safetensors" in str(e.value) and "Queue it again." in str(e.value)
    with pytest.raises(CheckpointError):
        reader.get("b.weight")
    assert path_identity(folder) != before
    assert path_identity(folder / "s1.safetensors") == (
        (str(folder / "s1.safetensors"), FileIdentity.of(folder / "s1.safetensors")),
    )


def test_mmap_off_reads_tensors_into_owned_memory(tmp_path):
    p = _write(tmp_path / "m.safetensors")
    with track_files(mmap=False):
        f = SafetensorsFile(p)
    assert not f.mmap and SafetensorsFile(p).mmap  # the choice is made when a file is opened
    a, b = f.get("a.weight"), f.get("b.weight")
    assert a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr()  # separate copies
    assert torch.equal(a, _tensors()["a.weight"]) and torch.equal(b, _tensors()["b.weight"])
    mapped = SafetensorsFile(p, mmap=True)
    x, y = mapped.get("a.weight"), mapped.get("b.weight")
    assert x.untyped_storage().data_ptr() == y.untyped_storage().data_ptr()  # one mapping


_TRUNCATE_THEN_READ = """
import os, sys, torch
from flux2_core.checkpoint import SafetensorsFile
f = SafetensorsFile(sys.argv[1], mmap=sys.argv[2] == "mmap")
t = f.get("b.weight")
os.truncate(sys.argv[1], 100)
print(float(t.sum()))
"""


@pytest.mark.parametrize("mode", ["mmap", "owned"])
def test_truncating_a_mapped_file_crashes_an_owned_copy_does_not(tmp_path, mode):
    """Why the checks exist: a view of a truncated mapping is SIGBUS; an owned copy reads fine."""
    p = _write(tmp_path / "m.safetensors")
    run = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_TRUNCATE_THEN_READ), str(p), mode],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    )
    if mode == "mmap":
        assert run.returncode == -signal.SIGBUS, (run.returncode, run.stderr[-2000:])
    else:
        assert run.returncode == 0, run.stderr[-2000:]
        assert float(run.stdout) == pytest.approx(float(_tensors()["b.weight"].sum()), rel=1e-5)
