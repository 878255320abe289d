"""Our transformer as ComfyUI's native FLUX.2 MODEL: a ``comfy.model_base.Flux2`` whose diffusion
model runs ``Flux2Transformer`` behind ComfyUI's Flux forward signature, inside our ModelPatcher.

Why the adapter looks the way it does:
- ComfyUI's LoRA loaders, model merging and saving read ``BaseModel.state_dict()``: the adapter
  registers the transformer's own children, so the keys are ``diffusion_model.<BFL key>``, exactly
  what ComfyUI's FLUX.2 has, and ComfyUI's key maps (kohya, diffusers, ...) find them.
- The unet config is the one ComfyUI's ``model_detection`` infers from these weights' keys and shapes
  (computed from our config on the meta device, no weights read), so ComfyUI's memory estimates,
  latent format (FLUX.2, 128 channels), sampling (flow, shift 2.02) and diffusers key maps are its own.
- The forward runs through ``comfy.patcher_extension.WrapperExecutor`` with the diffusion-model
  wrappers of ``transformer_options``, as ComfyUI's Flux does, so EasyCache and other wrappers work.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

import comfy.model_base
import comfy.model_detection
import comfy.model_management as mm
import comfy.patcher_extension
import torch
from torch import nn

from ..flux2_core.config import bfl_shapes
from ..flux2_core.errors import InputError
from ..flux2_core.sampling.tokens import pack, unpack
from . import memory

log = logging.getLogger(__name__)

# ComfyUI's Flux "index" method spaces references this far apart on the time axis (its FLUX.2
# ref_index_scale, the same 10 as BFL's).
_INDEX_SCALE = 10.0


def _grid_ids(h, w, batch, device, t=0.0, dh=0.0, dw=0.0, scale_h=1.0, scale_w=1.0) -> torch.Tensor:
    """(B, h*w, 4) float position ids (t, row, col, 0) of an h x w latent grid, row-major.

    Rows run dh .. dh + (h - 1) * scale_h (ComfyUI's rope_options scale and shift them), cols likewise.
    """
    rows = torch.linspace(dh, dh + (h - 1) * scale_h, h, device=device, dtype=torch.float32)
    cols = torch.linspace(dw, dw + (w - 1) * scale_w, w, device=device, dtype=torch.float32)
    ids = torch.zeros(h, w, 4, device=device, dtype=torch.float32)
    ids[..., 0] = t
    ids[..., 1] = rows[:, None]
    ids[..., 2] = cols[None, :]
    return ids.reshape(1, h * w, 4).expand(batch, -1, -1)


def _reference_ids(refs: list[torch.Tensor], method: str, h: int, w: int, batch: int) -> list[torch.Tensor]:
    """Position ids of each reference latent (1 or B, 128, h_k, w_k) under ComfyUI's reference methods.

    "index" (FLUX.2's default, BFL's layout): reference k at time 10 (k + 1), its own grid from 0.
    "offset": time 1, each reference placed right of or below the previous ones. "uxo"/"uno": time 0,
    grids shifted past the target's size.
    """
    out, t, dh, dw = [], 0.0, 0, 0
    for ref in refs:
        rh, rw = ref.shape[-2], ref.shape[-1]
        if method == "index":
            t += _INDEX_SCALE
            oh = ow = 0
        elif method in ("uxo", "uxo/uno"):
            t, oh, ow = 0.0, h + dh, w + dw
            dh, dw = dh + rh, dw + rw
        elif method == "offset":
            t, oh, ow = 1.0, 0, 0
            if rh + dh > rw + dw:
                ow = dw
            else:
                oh = dh
            dh, dw = max(dh, rh + oh), max(dw, rw + ow)
        else:
            raise InputError(
                f"reference method '{method}' is not supported by a Flux2Local model; use index (FLUX.2's), "
                "offset or uxo in ReferenceLatent / the conditioning."
            )
        out.append(_grid_ids(rh, rw, batch, ref.device, t, oh, ow))
    return out


@contextmanager
def _interruptible(transformer: nn.Module):
    """ComfyUI's Cancel acts before every transformer block, not only between steps."""

    def check(_module, _args):
        mm.throw_exception_if_processing_interrupted()

    handles = [
        block.register_forward_pre_hook(check)
        for path in getattr(transformer, "streamable_blocks", ())
        for block in transformer.get_submodule(path)
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class Flux2DiffusionModel(nn.Module):
    """ComfyUI's Flux diffusion-model interface over a ``Flux2Transformer`` (shared, never copied).

    Args:
        transformer: the loaded transformer; its children become this module's children (same
            objects), so parameters, hooks, LoRA patches and the weight streamer are shared.
    """

    patch_size = 1  # FLUX.2 latents are already packed 2x2 (ComfyUI's unet config says the same)

    def __init__(self, transformer: nn.Module):
        super().__init__()
        self.__dict__["transformer"] = transformer  # a plain attribute: no "transformer." key prefix
        for name, child in transformer.named_children():
            self.add_module(name, child)

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.compute_dtype

    def _apply(self, fn, recurse=True):
        # Moving the shared weights invalidates the transformer's captured CUDA graphs.
        self.transformer.release_fast_path()
        return super()._apply(fn, recurse)

    def forward(
        self,
        x,
        timestep,
        context,
        y=None,
        guidance=None,
        ref_latents=None,
        control=None,
        transformer_options={},  # noqa: B006 (ComfyUI's signature; never mutated here)
        **kwargs,
    ):
        wrappers = comfy.patcher_extension.get_all_wrappers(
            comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, transformer_options
        )
        return comfy.patcher_extension.WrapperExecutor.new_class_executor(
            self._forward, self, wrappers
        ).execute(x, timestep, context, y, guidance, ref_latents, control, transformer_options, **kwargs)

    def _refuse_unsupported(self, control, transformer_options, kwargs) -> None:
        if control is not None:
            raise InputError(
                "ControlNet is not supported on a Flux2Local model; load the model with ComfyUI's UNETLoader."
            )
        if kwargs.get("attention_mask") is not None:
            raise InputError(
                "attention masks on the conditioning are not supported by a Flux2Local model; load the "
                "model with ComfyUI's UNETLoader."
            )
        if transformer_options.get("patches", {}).get("post_input") or transformer_options.get(
            "patches_replace", {}
        ).get("dit"):
            raise InputError(
                "per-block patches (double/single block replacements or post-input patches) are not supported "
                "by a Flux2Local model, which runs its own transformer blocks; load the model with ComfyUI's "
                "UNETLoader for nodes that need them."
            )

    def _forward(
        self,
        x,
        timestep,
        context,
        y=None,
        guidance=None,
        ref_latents=None,
        control=None,
        transformer_options={},  # noqa: B006
        **kwargs,
    ):
        self._refuse_unsupported(control, transformer_options, kwargs)
        t = self.transformer
        b, _, h, w = x.shape
        if guidance is None and t.guidance_in is not None:
            raise InputError(
                "this FLUX.2 [dev] model embeds the guidance scale, but the conditioning disables it "
                "(FluxDisableGuidance): remove that node or set a guidance (FluxGuidance)."
            )
        rope = transformer_options.get("rope_options") or {}
        img_ids = _grid_ids(
            h,
            w,
            b,
            x.device,
            t=rope.get("shift_t", 0.0),
            dh=rope.get("shift_y", 0.0),
            dw=rope.get("shift_x", 0.0),
            scale_h=rope.get("scale_y", 1.0),
            scale_w=rope.get("scale_x", 1.0),
        )
        img = pack(x)  # (B, N, 128)
        refs = list(ref_latents or [])
        kw = {}
        if refs:
            method = kwargs.get("ref_latents_method") or "index"
            ids = _reference_ids(refs, method, h, w, b)
            tokens = torch.cat([pack(r.to(x.dtype).expand(b, -1, -1, -1)) for r in refs], dim=1)
            ref_ids = torch.cat(ids, dim=1)
            if t.config.kv_refs:
                # [klein] 9B-KV: references attend only to themselves at t = 0 (recomputed each call).
                kw = {"ref_img": tokens, "ref_ids": ref_ids}
            else:
                img, img_ids = torch.cat((img, tokens), dim=1), torch.cat((img_ids, ref_ids), dim=1)
        txt_ids = torch.zeros(b, context.shape[1], 4, device=x.device, dtype=torch.float32)
        txt_ids[..., 3] = torch.arange(context.shape[1], device=x.device, dtype=torch.float32)
        with _interruptible(t):
            out = t(
                img=img,
                img_ids=img_ids,
                txt=context,
                txt_ids=txt_ids,
                timesteps=timestep,
                guidance=None if t.guidance_in is None else guidance,
                **kw,
            )
        return unpack(out[:, : h * w], h, w)


def comfy_model_config(config):
    """ComfyUI's model config (``comfy.supported_models.Flux2``) for a transformer of ``config``.

    ComfyUI's own ``model_detection`` is run on the key shapes these weights have (meta tensors: no
    memory), so the result is what UNETLoader would infer from the file.

    Raises:
        InputError: this ComfyUI has no native FLUX.2 (older than 0.3.72).
    """
    shapes = bfl_shapes(config)
    state_dict = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    unet_config = comfy.model_detection.detect_unet_config(state_dict, "")
    model_config = None
    if unet_config is not None:
        model_config = comfy.model_detection.model_config_from_unet_config(unet_config, state_dict)
    if model_config is None or not hasattr(comfy.model_base, "Flux2"):
        raise InputError(
            "this ComfyUI has no native FLUX.2 model (it arrived in ComfyUI 0.3.72): update ComfyUI to "
            "use FLUX.2 To Native MODEL, or use the FLUX.2 nodes only."
        )
    return model_config


def build_native_model(holder) -> comfy.model_base.BaseModel:
    """A ``comfy.model_base.Flux2`` whose diffusion model is ``holder``'s transformer (shared).

    Args:
        holder: the ``ModuleHolder`` of a loaded transformer.
    """
    transformer = holder.module
    model_config = comfy_model_config(transformer.config)
    # Our layers compute in the transformer's dtype and dequantize themselves: no manual cast.
    model_config.set_inference_dtype(transformer.compute_dtype, None)
    adapter = Flux2DiffusionModel(transformer)
    model = comfy.model_base.Flux2(
        model_config, device=memory.offload_device(), unet_model=lambda **_: adapter
    )
    model.flux2_holder = holder
    return model
