"""Shared by the CPU and GPU fast-path tests: models on the same weights in fp32, bf16 and FP8, and the
error of each path against the fp32 reference."""

from __future__ import annotations

import torch

from flux2_core import Flux2Transformer
from flux2_core.config import is_block_linear
from flux2_core.quant import FP8Linear, quantize_fp8
from flux2_core.quant.fp8 import FP8_MAX
from flux2_core.tiny.transformer import random_bfl_state_dict


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm()).item()


def build(cfg, dtype: torch.dtype, device, seed: int = 0) -> Flux2Transformer:
    """The model on random BFL-layout weights (the same for every dtype of one seed), eager by default."""
    sd = random_bfl_state_dict(cfg, seed=seed)
    with torch.device("meta"):
        model = Flux2Transformer(cfg, dtype=dtype)
    model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in sd.items()}, assign=True)
    model.fast_path = "eager"
    model.cuda_graphs = "off"
    return model.eval()


def block_linear_names(model) -> list[str]:
    return [n[: -len(".weight")] for n, _ in model.named_parameters() if is_block_linear(n)]


def calibrate_input_scales(model, inputs: dict) -> dict[str, float]:
    """Static FP8 input scales (amax / 448 of each block linear's input), as FP8 checkpoints ship them."""
    amax: dict[str, float] = {}
    hooks = []
    for name in block_linear_names(model):

        def hook(_m, args, name=name):
            amax[name] = max(amax.get(name, 0.0), args[0].detach().abs().amax().float().item())

        hooks.append(model.get_submodule(name).register_forward_pre_hook(hook))
    try:
        with torch.inference_mode():
            model(**inputs)
    finally:
        for h in hooks:
            h.remove()
    return {k: max(v, 1e-6) / FP8_MAX for k, v in amax.items()}


def to_fp8(model, input_scales: dict[str, float] | None) -> None:
    """Every block Linear becomes an FP8Linear (per-tensor scales; a static input scale when given)."""
    for name in block_linear_names(model):
        old = model.get_submodule(name)
        dev = old.weight.device
        new = FP8Linear(old.in_features, old.out_features, input_scales is not None, device=dev)
        q, scale = quantize_fp8(old.weight.data)
        new.weight.data = q
        new.weight_scale.data = scale.to(dev)
        if input_scales is not None:
            new.input_scale.data = torch.tensor(input_scales[name], device=dev)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, new)


def fp32_reference_of(model, cfg, device) -> Flux2Transformer:
    """An fp32 model with exactly ``model``'s weights (FP8 weights dequantized), activations in fp32."""
    ref = build(cfg, torch.float32, device)
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, FP8Linear):
                ref.get_submodule(name).weight.copy_(mod.dequantized(torch.float32))
        quantized = {name for name, mod in model.named_modules() if isinstance(mod, FP8Linear)}
        for name, p in model.named_parameters():
            if name.rpartition(".")[0] in quantized:
                continue  # weight and its scales: copied dequantized above
            if p.dtype.is_floating_point and p.dtype.itemsize >= 2:
                ref.get_parameter(name).copy_(p.float())
    return ref


def inputs_for(cfg, device, n_img: int, n_txt: int, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    side = max(1, int(n_img**0.5))
    img_ids = torch.zeros(1, n_img, 4)
    img_ids[0, :, 1] = torch.arange(n_img) // side
    img_ids[0, :, 2] = torch.arange(n_img) % side
    txt_ids = torch.zeros(1, n_txt, 4)
    txt_ids[0, :, 3] = torch.arange(n_txt)
    x = dict(
        img=torch.randn(1, n_img, 128, generator=g),
        img_ids=img_ids,
        txt=torch.randn(1, n_txt, cfg.context_dim, generator=g),
        txt_ids=txt_ids,
        timesteps=torch.tensor([0.6]),
        guidance=torch.tensor([4.0]) if cfg.guidance_embed else None,
    )
    return {k: (None if v is None else v.to(device)) for k, v in x.items()}


def errors_by_mode(
    model, ref_out: torch.Tensor, inputs: dict, modes=("eager", "compile")
) -> dict[str, float]:
    """Relative error against ``ref_out`` of one forward per fast-path mode (same weights, inputs)."""
    out = {}
    with torch.inference_mode():
        for mode in modes:
            model.fast_path = mode
            out[mode] = rel_err(model(**inputs), ref_out)
    model.fast_path = "eager"
    return out


def explain_stages(model, dtype: torch.dtype, device) -> dict[str, tuple[int, list]]:
    """torch._dynamo.explain of the four eager stage functions on the model's first blocks.

    Returns:
        stage name -> (graph count, break reasons).
    """
    from flux2_core.model.blocks import EAGER_STAGES
    from flux2_core.model.embeddings import ModulationOut
    from flux2_core.model.rope import rope_tables

    cfg = model.config
    g = torch.Generator().manual_seed(0)
    H, n_txt, n_img = cfg.hidden_size, 6, 10

    def mod():
        return ModulationOut(*(0.1 * torch.randn(1, 1, H, generator=g).to(device, dtype) for _ in range(3)))

    ids = torch.zeros(1, n_txt + n_img, 4)
    ids[0, :, 1] = torch.arange(n_txt + n_img)
    rope = rope_tables(ids.to(device), cfg.axes_dim, cfg.theta)
    img = torch.randn(1, n_img, H, generator=g).to(device, dtype)
    txt = torch.randn(1, n_txt, H, generator=g).to(device, dtype)
    x = torch.cat((txt, img), 1)
    m_img, m_txt = (mod(), mod()), (mod(), mod())
    dbl, sgl = model.double_blocks[0], model.single_blocks[0]
    out = {}
    with torch.inference_mode():
        q, k, v = EAGER_STAGES.double_pre(dbl, img, txt, m_img, m_txt, rope)
        att = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        )
        att = att.transpose(1, 2)
        h = EAGER_STAGES.single_pre(sgl, x, m_txt[0], rope)[3]
        calls = {
            "double_pre": (dbl, img, txt, m_img, m_txt, rope),
            "double_post": (dbl, img, txt, att, m_img, m_txt),
            "single_pre": (sgl, x, m_txt[0], rope),
            "single_post": (sgl, x, [att, h], m_txt[0]),
        }
        for name, args in calls.items():
            e = torch._dynamo.explain(getattr(EAGER_STAGES, name))(*args)
            out[name] = (e.graph_count, [str(r.reason)[:300] for r in e.break_reasons])
    return out
