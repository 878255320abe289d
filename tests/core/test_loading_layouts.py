"""Tiny random models of each variant written in each published layout, loaded back and compared."""

import pytest
import torch

from flux2_core import Flux2Transformer, load_transformer
from flux2_core.quant import FP8Linear
from flux2_core.tiny.transformer import random_bfl_state_dict, tiny_config

from .conftest import make_inputs

FORMATS = {
    "bfl": "bfl",
    "comfyui": "comfyui",
    "diffusers": "diffusers",
    "bfl-fp8": "bfl-fp8",
    "comfy-fp8": "comfy-fp8",
    "comfy-scaled-fp8": "comfy-fp8",
    "nvfp4": "nvfp4",
}
FLAGS = {  # variant -> (guidance_embed, distilled, kv_refs)
    "dev": (True, True, False),
    "klein-4b": (False, True, False),
    "klein-base-4b": (False, False, False),
    "klein-9b": (False, True, False),
    "klein-base-9b": (False, False, False),
    "klein-9b-kv": (False, True, True),
}


def _expected(variant):
    return random_bfl_state_dict(tiny_config(variant), seed=0, dtype=torch.float32)


@pytest.mark.parametrize("variant", list(FLAGS))
@pytest.mark.parametrize("layout", ["bfl", "comfyui", "diffusers"])
def test_lossless_layouts(tiny_files, variant, layout):
    model = load_transformer(tiny_files(variant, layout), dtype=torch.float32)
    assert model.checkpoint_format == FORMATS[layout]
    c = model.config
    assert (c.guidance_embed, c.distilled, c.kv_refs) == FLAGS[variant]
    assert (c.hidden_size, c.depth, c.depth_single) == (256, 2, 2)
    sd = model.state_dict()
    exp = _expected(variant)
    assert sorted(sd) == sorted(exp)
    for k, v in exp.items():
        torch.testing.assert_close(sd[k], v, rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("variant", ["dev", "klein-9b-kv"])
@pytest.mark.parametrize("layout", ["bfl-fp8", "comfy-fp8", "comfy-scaled-fp8", "nvfp4"])
def test_quantized_layouts_dequantize(tiny_files, variant, layout):
    model = load_transformer(tiny_files(variant, layout), dtype=torch.float32, keep_quantized=False)
    assert model.checkpoint_format == FORMATS[layout]
    assert model.config.kv_refs == FLAGS[variant][2]
    sd, exp = model.state_dict(), _expected(variant)
    assert sorted(sd) == sorted(exp)
    # fp8 E4M3 keeps ~3 mantissa bits; NVFP4 (E2M1 + fp8 block scales) ~1.
    rel = 0.07 if "fp8" in layout else 0.3
    for k, v in exp.items():
        err = (sd[k] - v).norm() / v.norm()
        assert err < rel, (k, err)
        if (
            ".qkv." not in k
            and "linear1" not in k
            and "mlp" not in k
            and "proj" not in k
            and "linear2" not in k
        ):
            torch.testing.assert_close(sd[k], v, rtol=0, atol=0)  # unquantized tensors are exact


def test_bf16_and_fp16_loading(tiny_files):
    path = tiny_files("klein-4b", "bfl", torch.bfloat16)
    exp = {k: v.to(torch.bfloat16) for k, v in _expected("klein-4b").items()}
    for dtype in (torch.bfloat16, torch.float16, "fp32"):
        model = load_transformer(path, dtype=dtype)
        want = torch.float32 if dtype == "fp32" else dtype
        assert all(p.dtype == want for p in model.parameters())
        for k, v in model.state_dict().items():
            torch.testing.assert_close(v, exp[k].to(want), rtol=0, atol=0)
    model = load_transformer(path, dtype=torch.bfloat16)
    with torch.no_grad():
        out = model(**make_inputs(model.config))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_bf16_file_loads_without_copying(tiny_files):
    path = tiny_files("klein-4b", "bfl", torch.bfloat16)
    model = load_transformer(path, dtype=torch.bfloat16)
    # same dtype: every parameter is a view of the one memory-mapped file, not a copy
    storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    assert len(storages) == 1
    assert model.img_in.weight.untyped_storage().nbytes() == path.stat().st_size
    # converting dtype makes each tensor once (fp32 copies), never a second bf16 copy
    model32 = load_transformer(path, dtype=torch.float32)
    assert len({p.untyped_storage().data_ptr() for p in model32.parameters()}) == len(
        list(model32.parameters())
    )


def test_keep_fp8_uses_fp8_linear(tiny_files):
    path = tiny_files("klein-4b", "bfl-fp8")
    deq = load_transformer(path, dtype=torch.float32)
    kept = load_transformer(path, dtype=torch.float32, keep_fp8=True)
    fp8 = [m for m in kept.modules() if isinstance(m, FP8Linear)]
    assert len(fp8) == 2 * 2 * 4 + 2 * 2  # 4 linears per stream per double block, 2 per single block
    assert all(m.weight.dtype == torch.float8_e4m3fn and m.input_scale is not None for m in fp8)
    assert kept.img_in.weight.dtype == torch.float32
    x = make_inputs(kept.config)
    with torch.no_grad():
        torch.testing.assert_close(kept(**x), deq(**x), rtol=1e-4, atol=1e-4)


def test_streamable_blocks_take_modulation_as_arguments(tiny_files):
    model = load_transformer(tiny_files("dev", "bfl"), dtype=torch.float32)
    assert isinstance(model, Flux2Transformer)
    for attr in model.streamable_blocks:
        blocks = getattr(model, attr)
        assert isinstance(blocks, torch.nn.ModuleList) and len(blocks) > 0
        # a block owns only its own weights: nothing shared with the model's other parts
        names = {n.split(".")[0] for n, _ in blocks[0].named_parameters()}
        assert "double_stream_modulation_img" not in names and "time_in" not in names


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("layout", ["bfl", "bfl-fp8", "nvfp4"])
def test_gpu_load_and_bf16_forward(tiny_files, layout):
    path = tiny_files("dev", layout)
    ref = load_transformer(path, dtype=torch.float32)
    model = load_transformer(path, dtype=torch.bfloat16, device="cuda", keep_fp8=layout == "bfl-fp8")
    assert next(model.parameters()).is_cuda
    x = make_inputs(ref.config)
    with torch.no_grad():
        want = ref(**x)
        got = model(**{k: None if v is None else v.cuda() for k, v in x.items()}).float().cpu()
    assert (got - want).norm() / want.norm() < 0.05


def test_per_row_fp8_scales_load_as_per_row_layers(tmp_path, tiny_files):
    from safetensors.torch import load_file, save_file

    from flux2_core.quant import quantize_fp8

    sd = load_file(str(tiny_files("klein-4b", "bfl-fp8")))
    exp = _expected("klein-4b")
    layer = "double_blocks.0.img_mlp.0"
    q, s = quantize_fp8(exp[f"{layer}.weight"], per_row=True)  # (out, 1) scales, as per-row fp8 files store
    sd[f"{layer}.weight"], sd[f"{layer}.weight_scale"] = q, s.reshape(-1)
    path = tmp_path / "flux-2-klein-4b-fp8-rows.safetensors"
    save_file(sd, str(path))
    kept = load_transformer(path, dtype=torch.float32, keep_fp8=True)
    m = kept.get_submodule(layer)
    assert (
        isinstance(m, FP8Linear) and m.storage == "FP8_E4M3_ROW" and m.weight_scale.shape == (q.shape[0], 1)
    )
    assert torch.equal(m.dequantized(torch.float32), q.float() * s)
    dense = load_transformer(path, dtype=torch.float32)
    assert torch.equal(dense.get_parameter(f"{layer}.weight"), q.float() * s)
    x = make_inputs(kept.config)
    with torch.no_grad():
        torch.testing.assert_close(kept(**x), dense(**x), rtol=1e-5, atol=1e-5)
