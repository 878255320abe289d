"""The FLUX.2 transformer (all variants), after BFL's ``flux2/src/flux2/model.py``.

Module names equal the BFL checkpoint keys, so BFL files load with an identity key map.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import Flux2Config
from ..errors import InputError
from ..fast.attention import attention_for
from ..fast.path import FastPath
from ..kv_cache import Flux2KVCache, RefCachedAttention, RefExtractAttention
from .blocks import DoubleStreamBlock, LastLayer, SingleStreamBlock
from .embeddings import MLPEmbedder, Modulation, ModulationOut, timestep_embedding
from .rope import cat_rope, rope_tables


class Flux2Transformer(nn.Module):
    """FLUX.2 MMDiT: double-stream then single-stream blocks with shared modulation.

    Args:
        config: shapes and variant.
        dtype: parameter dtype.
        device: parameter device (``"meta"`` to build without memory, then assign-load).

    Attributes:
        fast_path: "auto" (default), "eager", "compile" or "kitchen": how the blocks run (see
            ``flux2_core.fast.settings``; with "auto" the ``FLUX2LOCAL_FAST`` environment variable
            decides, and by default CUDA with Triton compiles). Parity tests set "eager".
        cuda_graphs: "auto" (small shapes, resident model), "on" or "off".
        attention: "sdpa" (default) or an optional quantized backend ("kitchen-int8", "sage").
    """

    streamable_blocks = ("double_blocks", "single_blocks")

    def __init__(self, config: Flux2Config, dtype: torch.dtype | None = None, device=None):
        super().__init__()
        self.config = config
        self.checkpoint_format: str | None = None
        self.fast_path = "auto"
        self.cuda_graphs = "auto"
        self.attention = "sdpa"
        self.fast = FastPath()
        H, kw = config.hidden_size, {"dtype": dtype, "device": device}
        self.img_in = nn.Linear(config.in_channels, H, bias=False, **kw)
        self.txt_in = nn.Linear(config.context_dim, H, bias=False, **kw)
        self.time_in = MLPEmbedder(256, H, **kw)
        self.guidance_in = MLPEmbedder(256, H, **kw) if config.guidance_embed else None
        self.double_stream_modulation_img = Modulation(H, 2, **kw)
        self.double_stream_modulation_txt = Modulation(H, 2, **kw)
        self.single_stream_modulation = Modulation(H, 1, **kw)
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(config, **kw) for _ in range(config.depth))
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(config, **kw) for _ in range(config.depth_single)
        )
        self.final_layer = LastLayer(H, config.in_channels, **kw)

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.img_in.weight.dtype

    def _vec(
        self, timesteps: torch.Tensor, guidance: torch.Tensor | None, dtype: torch.dtype
    ) -> torch.Tensor:
        vec = self.time_in(timestep_embedding(timesteps).to(dtype))  # (B, H)
        if self.guidance_in is not None:
            if guidance is None:
                raise InputError(
                    f"this FLUX.2 {self.config.variant} model embeds the guidance scale: pass guidance "
                    "(e.g. 4.0) for every sample."
                )
            vec = vec + self.guidance_in(
                timestep_embedding(guidance.reshape(-1).expand(vec.shape[0])).to(dtype)
            )
        return vec

    def forward(
        self,
        *,
        img: torch.Tensor,
        img_ids: torch.Tensor,
        txt: torch.Tensor,
        txt_ids: torch.Tensor,
        timesteps: torch.Tensor,
        guidance: torch.Tensor | None = None,
        ref_img: torch.Tensor | None = None,
        ref_ids: torch.Tensor | None = None,
        kv_cache: Flux2KVCache | None = None,
    ) -> torch.Tensor:
        """Predict the flow velocity of the image tokens.

        Args:
            img: (B, N, 128) packed latent tokens (target, then any in-context reference tokens).
            img_ids: (B, N, 4) positions (t, h, w, l).
            txt: (B, L, context_dim) text features.
            txt_ids: (B, L, 4).
            timesteps: (B,) sigmas in [0, 1].
            guidance: (B,) guidance scales, needed by models with a guidance embedder, else ignored.
            ref_img: KV variant: (B, R, 128) reference tokens, modulated at t = 0, attended only by
                themselves. Ignored when ``kv_cache`` is already filled.
            ref_ids: (B, R, 4) positions of ``ref_img``.
            kv_cache: KV variant: an empty cache is filled from ``ref_img``; a filled one replaces it.

        Returns:
            (B, N, 128) velocity, in the model dtype.
        """
        inputs = dict(
            img=img, img_ids=img_ids, txt=txt, txt_ids=txt_ids, timesteps=timesteps, guidance=guidance
        )
        if (
            ref_img is None
            and kv_cache is None
            and all(isinstance(v, torch.Tensor) or v is None for v in inputs.values())
        ):
            device = img.device
            tokens = img.shape[1] + txt.shape[1]
            if self.fast.use_graphs(self.cuda_graphs, self.fast_path, self, device, tokens):
                return self.fast.graphs(self._forward, self, inputs)
        return self._forward(**inputs, ref_img=ref_img, ref_ids=ref_ids, kv_cache=kv_cache)

    def release_fast_path(self) -> None:
        """Free what the fast path holds on the device (captured CUDA graphs and their activations)."""
        self.fast.release()

    def _apply(self, fn, recurse=True):
        # Moving the weights (.to(), .cpu(), ...) makes captured graphs unusable: free them first.
        self.fast.release()
        return super()._apply(fn, recurse)

    def _forward(
        self,
        *,
        img: torch.Tensor,
        img_ids: torch.Tensor,
        txt: torch.Tensor,
        txt_ids: torch.Tensor,
        timesteps: torch.Tensor,
        guidance: torch.Tensor | None = None,
        ref_img: torch.Tensor | None = None,
        ref_ids: torch.Tensor | None = None,
        kv_cache: Flux2KVCache | None = None,
    ) -> torch.Tensor:
        dtype = self.compute_dtype
        B = img.shape[0]
        timesteps = timesteps.reshape(-1).expand(B)
        vec = self._vec(timesteps, guidance, dtype)
        mod_img = self.double_stream_modulation_img(vec)
        mod_txt = self.double_stream_modulation_txt(vec)
        (mod_single,) = self.single_stream_modulation(vec)

        img = self.img_in(img.to(dtype))  # (B, N, H)
        txt = self.txt_in(txt.to(dtype))  # (B, L, H)
        n_txt, n_img = txt.shape[1], img.shape[1]
        cached = kv_cache is not None and kv_cache.filled
        extract = ref_img is not None and not cached
        n_ref = ref_img.shape[1] if extract else 0
        if extract:
            if ref_ids is None:
                raise InputError("ref_img was given without ref_ids (B, R, 4).")
            # Reference tokens are clean: their modulation comes from t = 0 (same guidance).
            vec_ref = self._vec(torch.zeros_like(timesteps), guidance, dtype)
            ref_d = self.double_stream_modulation_img(vec_ref)
            (ref_s,) = self.single_stream_modulation(vec_ref)
            mod_img = tuple(ModulationOut.cat([(r, n_ref), (m, n_img)]) for r, m in zip(ref_d, mod_img))
            mod_single = ModulationOut.cat([(mod_single, n_txt), (ref_s, n_ref), (mod_single, n_img)])
            img = torch.cat((self.img_in(ref_img.to(dtype)), img), dim=1)  # (B, R + N, H)
            ids = [txt_ids, ref_ids, img_ids]
            if kv_cache is not None:
                kv_cache.clear()
                kv_cache.num_ref_tokens = n_ref
        else:
            ids = [txt_ids, img_ids]
        axes, theta = self.config.axes_dim, self.config.theta
        # ids may be (L, 4) or (1, L, 4) shared by the batch, or (B, L, 4)
        rope = cat_rope(
            [rope_tables(i.reshape(-1, *i.shape[-2:]).expand(B, -1, -1), axes, theta) for i in ids]
        )

        plain = attention_for(self.attention, img.device)
        stages = self.fast.stages(self.fast_path, self.config, img.device)

        def attention(kind: str, index: int):
            if extract:
                store = None if kv_cache is None else getattr(kv_cache, kind)
                return RefExtractAttention(n_txt, n_ref, store, index)
            if cached:
                return RefCachedAttention(n_txt, *getattr(kv_cache, kind)[index])
            return plain

        for i, block in enumerate(self.double_blocks):
            img, txt = block(img, txt, mod_img, mod_txt, rope, attention("double", i), stages=stages)
        x = torch.cat((txt, img), dim=1)  # (B, L + R + N, H)
        del img, txt
        for i, block in enumerate(self.single_blocks):
            x = block(x, mod_single, rope, attention("single", i), stages=stages)
        return self.final_layer(x[:, n_txt + n_ref :], vec)
