"""SafetensorsFile / open_checkpoint: round trips, zero-copy views, read_into and every damaged-file case."""

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from flux2_core.checkpoint import SafetensorsFile, open_checkpoint
from flux2_core.errors import CheckpointError


@pytest.fixture()
def tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(4, 6, generator=g).to(torch.bfloat16),
        "b.scale": torch.randn(3, generator=g),
        "c.fp8": torch.randn(2, 8, generator=g).to(torch.float8_e4m3fn),
        "d.scalar": torch.tensor(2.5),
        "e.u8": torch.arange(5, dtype=torch.uint8),
    }


def _bytes(t):
    return t.reshape(-1).view(torch.uint8)


def _write(path, tensors, metadata=None):
    save_file(tensors, str(path), metadata=metadata)
    return path


def test_roundtrip_get_and_metadata(tmp_path, tensors):
    f = SafetensorsFile(_write(tmp_path / "m.safetensors", tensors, {"format": "pt"}))
    assert sorted(f.keys()) == sorted(tensors)
    assert f.metadata == {"format": "pt"}
    for k, t in tensors.items():
        assert f.shape(k) == tuple(t.shape) and f.dtype(k) == t.dtype
        assert f.nbytes(k) == t.numel() * t.element_size()
        got = f.get(k)
        assert got.dtype == t.dtype and torch.equal(_bytes(got), _bytes(t))


def test_get_is_a_view_of_the_mapped_file(tmp_path, tensors):
    f = SafetensorsFile(_write(tmp_path / "m.safetensors", tensors))
    a, b = f.get("a.weight"), f.get("b.scale")
    # both views share the one mapped storage: nothing was copied
    assert a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
    a.zero_()  # private mapping: the file is not changed
    assert torch.equal(SafetensorsFile(f.path).get("a.weight"), tensors["a.weight"])


def test_read_into_preallocated(tmp_path, tensors):
    f = SafetensorsFile(_write(tmp_path / "m.safetensors", tensors))
    for k, t in tensors.items():
        out = torch.empty(t.shape, dtype=t.dtype)
        assert f.read_into(k, out) is out
        assert torch.equal(_bytes(out), _bytes(t))
    with pytest.raises(ValueError):
        f.read_into("a.weight", torch.empty(4, 6))


def _raw(path, header_bytes, data=b"", declared=None):
    n = len(header_bytes) if declared is None else declared
    path.write_bytes(struct.pack("<Q", n) + header_bytes + data)
    return path


@pytest.mark.parametrize(
    "case, needle",
    [
        ("empty", "empty"),
        ("short", "too short"),
        ("header_past_end", "truncated"),
        ("bad_json", "corrupt"),
        ("not_json", "not JSON"),
        ("offsets_past_end", "truncated"),
        ("size_mismatch", "should take"),
        ("unknown_dtype", "F4_WHATEVER"),
    ],
)
def test_damaged_files(tmp_path, case, needle):
    p = tmp_path / f"{case}.safetensors"
    good = {"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    if case == "empty":
        p.write_bytes(b"")
    elif case == "short":
        p.write_bytes(b"\x01\x02")
    elif case == "header_past_end":
        _raw(p, json.dumps(good).encode(), declared=10_000)
    elif case == "bad_json":
        _raw(p, b'{"x": {"dtype": ', b"\0" * 8)
    elif case == "not_json":
        _raw(p, b"garbage!", b"")
    elif case == "offsets_past_end":
        _raw(p, json.dumps(good).encode(), b"\0" * 4)
    elif case == "size_mismatch":
        bad = {"x": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}
        _raw(p, json.dumps(bad).encode(), b"\0" * 8)
    elif case == "unknown_dtype":
        bad = {"x": {"dtype": "F4_WHATEVER", "shape": [2], "data_offsets": [0, 8]}}
        _raw(p, json.dumps(bad).encode(), b"\0" * 8)
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(p)
    assert str(p) in str(e.value) and needle in str(e.value)


def test_truncated_real_file(tmp_path, tensors):
    p = _write(tmp_path / "m.safetensors", tensors)
    p.write_bytes(p.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="truncated"):
        SafetensorsFile(p)


def test_pickle_formats_refused(tmp_path):
    p = tmp_path / "model.bin"
    torch.save({"a": torch.zeros(1)}, p)
    with pytest.raises(CheckpointError, match="pickle"):
        open_checkpoint(p)
    renamed = tmp_path / "model.safetensors"
    renamed.write_bytes(p.read_bytes())
    with pytest.raises(CheckpointError, match="pickle"):
        open_checkpoint(renamed)
    folder = tmp_path / "only_pickle"
    folder.mkdir()
    (folder / "diffusion_pytorch_model.bin").write_bytes(p.read_bytes())
    with pytest.raises(CheckpointError, match="pickle"):
        open_checkpoint(folder)


def test_missing_path_and_empty_folder(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        open_checkpoint(tmp_path / "nope.safetensors")
    with pytest.raises(CheckpointError, match="no .safetensors"):
        open_checkpoint(tmp_path)


def test_sharded_diffusers_folder(tmp_path, tensors):
    sub = tmp_path / "transformer"
    sub.mkdir()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[:2], "model-00002-of-00002.safetensors": names[2:]}
    weight_map = {}
    for fname, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(sub / fname))
        weight_map.update({k: fname for k in keys})
    (sub / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"weight_map": weight_map})
    )
    (tmp_path / "model_index.json").write_text("{}")
    r = open_checkpoint(tmp_path, subfolder="transformer")
    assert sorted(r.keys()) == names and len(r.files) == 2
    for k in names:
        assert r.path_of(k).endswith(weight_map[k])
        assert torch.equal(_bytes(r.get(k)), _bytes(tensors[k]))
        out = torch.empty_like(tensors[k])
        r.read_into(k, out)
        assert torch.equal(_bytes(out), _bytes(tensors[k]))
    # pointing straight at the component folder works too
    assert sorted(open_checkpoint(sub).keys()) == names
    # a missing shard is named
    (sub / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing"):
        open_checkpoint(tmp_path, subfolder="transformer")


def test_get_falls_back_to_reading_when_mapping_fails(tmp_path, tensors, monkeypatch):
    f = SafetensorsFile(_write(tmp_path / "m.safetensors", tensors))

    def no_map(*args, **kwargs):
        raise RuntimeError("no private mappings here")

    monkeypatch.setattr(torch.UntypedStorage, "from_file", no_map)
    for k, t in tensors.items():
        assert torch.equal(_bytes(f.get(k)), _bytes(t))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (pinned memory)")
def test_read_into_pinned_and_cuda(tmp_path, tensors):
    f = SafetensorsFile(_write(tmp_path / "m.safetensors", tensors))
    t = tensors["a.weight"]
    pinned = torch.empty(t.shape, dtype=t.dtype).pin_memory()
    f.read_into("a.weight", pinned)
    assert pinned.is_pinned() and torch.equal(pinned, t)
    on_gpu = torch.empty(t.shape, dtype=t.dtype, device="cuda")
    f.read_into("a.weight", on_gpu)
    assert torch.equal(on_gpu.cpu(), t)


# Headers the safetensors library itself refuses or accepts: our validator must agree with it.
_F32x2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
_FORMAT_CASES = {
    "overlapping_offsets": ({"a": _F32x2, "b": _F32x2}, 8),
    "gap_between_tensors": (
        {
            "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
            "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]},
        },
        12,
    ),
    # int() of 256.9 is 256, and 256 x 192 float32 values are exactly what the offsets span
    "float_shape": ({"a": {"dtype": "F32", "shape": [256.9, 192], "data_offsets": [0, 196608]}}, 196608),
    "integral_float_shape": ({"a": {"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}}, 8),
    "bool_shape": ({"a": {"dtype": "F32", "shape": [True, 2], "data_offsets": [0, 8]}}, 8),
    "float_offset": ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8.0]}}, 8),
    "negative_shape": ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, 8),
    "bytes_after_last_tensor": ({"a": _F32x2}, 12),
    "non_string_metadata": ({"__metadata__": {"a": 1}, "a": _F32x2}, 8),
    "shape_not_a_list": ({"a": {"dtype": "F32", "shape": 2, "data_offsets": [0, 8]}}, 8),
    "three_offsets": ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8, 8]}}, 8),
    # accepted by the library: listed so the comparison covers both answers
    "tensors_out_of_file_order": (
        {
            "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]},
            "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
        },
        8,
    ),
    "empty_tensors_share_an_offset": (
        {
            "e": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]},
            "f": {"dtype": "F32", "shape": [3, 0], "data_offsets": [0, 0]},
            "a": _F32x2,
        },
        8,
    ),
}


def _library_accepts(path) -> bool:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            for k in f.keys():
                f.get_tensor(k)
        return True
    except SafetensorError:
        return False


@pytest.mark.parametrize("case", sorted(_FORMAT_CASES))
def test_validator_agrees_with_the_safetensors_library(tmp_path, case):
    header, data_bytes = _FORMAT_CASES[case]
    p = _raw(tmp_path / f"{case}.safetensors", json.dumps(header).encode(), b"\0" * data_bytes)
    if _library_accepts(p):
        f = SafetensorsFile(p)
        assert sorted(f.keys()) == sorted(k for k in header if k != "__metadata__")
        for k in f.keys():
            assert f.get(k).shape == tuple(header[k]["shape"])
    else:
        with pytest.raises(CheckpointError) as e:
            SafetensorsFile(p)
        assert str(p) in str(e.value)


@pytest.mark.parametrize("shard", ["../outside.safetensors", "ABSOLUTE", "sub/../../outside.safetensors"])
def test_shard_index_cannot_name_files_outside_the_folder(tmp_path, tensors, shard):
    outside = _write(tmp_path / "outside.safetensors", {"a.weight": tensors["a.weight"]})
    folder = tmp_path / "model" / "transformer"
    (folder / "sub").mkdir(parents=True)
    name = str(outside) if shard == "ABSOLUTE" else shard
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a.weight": name}})
    )
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(folder)
    assert name in str(e.value) and "inside" in str(e.value)


def test_shards_may_be_symlinks_into_a_cache(tmp_path, tensors):
    """Hugging Face cache snapshots hold shards as links to ../../blobs: names are checked, not targets."""
    (tmp_path / "blobs").mkdir()
    blob = _write(tmp_path / "blobs" / "0123abcd", {"a.weight": tensors["a.weight"]})
    folder = tmp_path / "snapshots" / "rev" / "transformer"
    folder.mkdir(parents=True)
    (folder / "model-00001-of-00001.safetensors").symlink_to(blob)
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a.weight": "model-00001-of-00001.safetensors"}})
    )
    assert torch.equal(_bytes(open_checkpoint(folder).get("a.weight")), _bytes(tensors["a.weight"]))
