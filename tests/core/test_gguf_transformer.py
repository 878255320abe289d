"""GGUF transformers as the converters write them: loaded in their stored bytes, equal to diffusers
on the same (dequantized) weights, every variant detected, every bad file named."""

import os

import gguf
import numpy as np
import pytest
import torch

from flux2_core import CheckpointError, load_transformer
from flux2_core.quant import GGUFLinear, QuantLinear
from flux2_core.tiny.gguf import reference_state_dict, write_tiny_gguf_transformer

from .conftest import make_inputs


def _mapped_file(ptr: int) -> str | None:
    """The file whose memory mapping holds address ``ptr`` (Linux /proc/self/maps), else None."""
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            if lo <= ptr < hi:
                return os.path.realpath(parts[5]) if len(parts) > 5 else None
    return None


@pytest.fixture(scope="module")
def gguf_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    cache = {}

    def get(variant="klein-4b", mix="mixed", prefix=False, arch="flux"):
        key = (variant, mix, prefix, arch)
        if key not in cache:
            folder = root / "-".join(map(str, key))
            cache[key] = write_tiny_gguf_transformer(
                folder, variant, mix=mix, prefix=prefix, arch=arch, seed=3
            )
        return cache[key]

    return get


def _diffusers_reference(path, config):
    from diffusers import Flux2Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers

    sd = {k.removeprefix("model.diffusion_model."): v for k, v in reference_state_dict(path).items()}
    ref = Flux2Transformer2DModel(
        num_layers=config.depth,
        num_single_layers=config.depth_single,
        num_attention_heads=config.num_heads,
        joint_attention_dim=config.context_dim,
        guidance_embeds=config.guidance_embed,
    )
    ref.load_state_dict(convert_flux2_transformer_checkpoint_to_diffusers(sd), strict=True)
    return ref.eval()


@pytest.mark.parametrize(
    ("variant", "prefix", "arch"),
    [("dev", False, "flux"), ("klein-4b", True, "flux2")],
    ids=["dev", "klein-prefixed"],
)
def test_gguf_forward_matches_diffusers_on_the_dequantized_weights(gguf_files, variant, prefix, arch):
    path = gguf_files(variant, "mixed", prefix, arch)
    model = load_transformer(path, dtype=torch.float32)
    assert model.checkpoint_format == "gguf"
    ref = _diffusers_reference(path, model.config)
    x = make_inputs(model.config, batch=2)
    with torch.no_grad():
        ours = model(**x)
        theirs = ref(
            hidden_states=x["img"],
            encoder_hidden_states=x["txt"],
            timestep=x["timesteps"],
            img_ids=x["img_ids"][0],
            txt_ids=x["txt_ids"][0],
            guidance=x["guidance"],
            return_dict=False,
        )[0]
    rel = ((ours - theirs).norm() / theirs.norm()).item()
    assert theirs.std() > 0.1 and rel <= 1e-5, rel


def test_gguf_weights_stay_in_their_stored_bytes(gguf_files):
    path = gguf_files("klein-4b", "mixed")
    model = load_transformer(path, dtype=torch.bfloat16)
    reader = gguf.GGUFReader(str(path))
    stored = {t.name: t for t in reader.tensors}
    layers = {n: m for n, m in model.named_modules() if isinstance(m, GGUFLinear)}
    quantized = {n for n, t in stored.items() if t.tensor_type.name not in ("F32", "F16", "BF16")}
    # every quantized tensor but img_in (kept in the compute dtype) is a GGUFLinear holding the file's bytes
    assert {f"{n}.weight" for n in layers} == quantized - {"img_in.weight"}
    types = set()
    for name, layer in layers.items():
        t = stored[f"{name}.weight"]
        assert layer.storage == t.tensor_type.name and layer.weight.dtype == torch.uint8
        assert np.array_equal(layer.weight.numpy(), np.asarray(t.data))
        assert layer.weight.numel() == t.n_bytes
        types.add(layer.storage)
    assert types >= {"Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL"}
    # no second copy in RAM: the kept bytes are the memory-mapped file's own pages
    for layer in layers.values():
        assert _mapped_file(layer.weight.data_ptr()) == os.path.realpath(path)
    # the summary is the file's mix by parameter count
    counts = {}
    for t in reader.tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + int(t.n_elements)
    total = sum(counts.values())
    assert model.quant_summary.keys() == counts.keys()
    for k, v in counts.items():
        assert model.quant_summary[k] == pytest.approx(v / total)


def test_kept_and_dequantized_gguf_agree_exactly(gguf_files):
    path = gguf_files("klein-4b", "Q4_K_M")
    ref = reference_state_dict(path)
    dense = load_transformer(path, dtype=torch.float32, keep_quantized=False)
    for k, v in dense.state_dict().items():
        assert torch.equal(v, ref[k]), k
    kept = load_transformer(path, dtype=torch.float32)
    assert {m.storage for m in kept.modules() if isinstance(m, QuantLinear)} == {"Q4_K", "Q6_K"}
    for name, m in kept.named_modules():
        if isinstance(m, QuantLinear):
            assert torch.equal(m.dequantized(torch.float32), ref[f"{name}.weight"]), name
    x = make_inputs(kept.config)
    with torch.no_grad():
        torch.testing.assert_close(kept(**x), dense(**x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("variant", "flags"),
    [
        ("dev", (True, True, False)),
        ("klein-base-4b", (False, False, False)),
        ("klein-9b", (False, True, False)),
        ("klein-9b-kv", (False, True, True)),
    ],
)
def test_gguf_variants_detected_as_for_safetensors(tmp_path, variant, flags):
    path = write_tiny_gguf_transformer(tmp_path, variant, mix="Q8_0")
    c = load_transformer(path, dtype=torch.float32).config
    assert (c.guidance_embed, c.distilled, c.kv_refs) == flags


# ------------------------------------------------------------------------------------- bad input
def _write_gguf(path, tensors, arch="flux", types=None):
    w = gguf.GGUFWriter(str(path), arch)
    for name, arr in tensors.items():
        raw = (types or {}).get(name)
        w.add_tensor(name, arr, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _f32(*shape):
    return np.zeros(shape, dtype=np.float32)


def test_unsupported_quant_type_is_named(tmp_path, gguf_files):
    src = gguf.GGUFReader(str(gguf_files("klein-4b", "Q8_0")))
    tensors = {t.name: np.asarray(t.data) for t in src.tensors}
    types = {t.name: t.tensor_type for t in src.tensors if t.tensor_type.name == "Q8_0"}
    name = "double_blocks.0.img_attn.proj.weight"  # (256, 256): 256 IQ2_XXS blocks of 66 bytes
    tensors[name] = np.zeros((256, 66), dtype=np.uint8)
    types[name] = gguf.GGMLQuantizationType.IQ2_XXS
    path = _write_gguf(tmp_path / "flux-2-klein-4b-IQ2_XXS.gguf", tensors, types=types)
    with pytest.raises(CheckpointError) as e:
        load_transformer(path)
    msg = str(e.value)
    assert str(path) in msg and "IQ2_XXS" in msg and name in msg and "Fix:" in msg


@pytest.mark.parametrize(
    ("kind", "tensors", "arch", "needle"),
    [
        (
            "llama-text-encoder",
            {"token_embd.weight": _f32(32, 64), "blk.0.attn_q.weight": _f32(64, 64)},
            "llama",
            "text encoder",
        ),
        (
            "flux1",
            {
                "img_in.weight": _f32(64, 32),
                "double_blocks.0.img_mod.lin.weight": _f32(64, 64),
                "vector_in.in_layer.weight": _f32(64, 32),
            },
            "flux",
            "FLUX.1",
        ),
        (
            "sd3",
            {"joint_blocks.0.x_block.attn.qkv.weight": _f32(96, 32), "x_embedder.proj.weight": _f32(32, 64)},
            "sd3",
            "SD3",
        ),
        (
            "wan",
            {"patch_embedding.weight": _f32(32, 64), "blocks.0.self_attn.q.weight": _f32(32, 32)},
            "wan",
            "Wan",
        ),
    ],
)
def test_gguf_of_another_model_is_named(tmp_path, kind, tensors, arch, needle):
    path = _write_gguf(tmp_path / f"{kind}.gguf", tensors, arch)
    with pytest.raises(CheckpointError) as e:
        load_transformer(path)
    msg = str(e.value)
    assert str(path) in msg and needle in msg and "not a FLUX.2 transformer" in msg and "Fix:" in msg


def test_truncated_and_empty_and_foreign_gguf(tmp_path, gguf_files):
    good = gguf_files("klein-4b", "Q8_0").read_bytes()
    cases = {
        "truncated-data": good[: len(good) - 4096],
        "truncated-header": good[:200],
        "empty": b"",
        "not-gguf": b"\x00" * 64,
    }
    for name, data in cases.items():
        p = tmp_path / f"flux-2-klein-4b-{name}.gguf"
        p.write_bytes(data)
        with pytest.raises(CheckpointError) as e:
            load_transformer(p)
        assert str(p) in str(e.value) and "Fix:" in str(e.value), name


def test_missing_tensor_in_gguf_uses_the_common_report(tmp_path, gguf_files):
    src = gguf.GGUFReader(str(gguf_files("klein-4b", "Q8_0")))
    tensors = {t.name: np.asarray(t.data) for t in src.tensors if t.name != "single_blocks.1.linear2.weight"}
    types = {t.name: t.tensor_type for t in src.tensors if t.tensor_type.name == "Q8_0"}
    path = _write_gguf(tmp_path / "flux-2-klein-4b-cut.gguf", tensors, types=types)
    with pytest.raises(CheckpointError, match=r"1 missing key\(s\): single_blocks\.1\.linear2\.weight"):
        load_transformer(path)
