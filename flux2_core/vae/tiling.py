"""Tiled VAE encode/decode with overlap blending, tile size chosen from free memory.

Tiles overlap by a quarter of their size; in the overlap each tile's output is weighted by a linear
ramp (falling to ~0 at the tile edge that lies inside the image), and the weighted sum is divided by
the summed weights. Edges on the image border keep full weight. Tiling is not bit-exact: GroupNorm
statistics and the mid-block attention see one tile instead of the whole image (tests bound the
difference).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch
from torch import Tensor

from .config import Flux2VAEConfig

logger = logging.getLogger(__name__)

TileArg = None | str | int

# Fixed tile (pixels) for "auto" on CPU: no free-memory figure is reliable there, and single-head
# attention at the 1/8 mid level of an untiled 2048^2 image would need a 16 GB score matrix.
CPU_AUTO_TILE = 1024
MIN_TILE = 128
MAX_TILE = 4096
# Peak live activations per output pixel, in units of (full-resolution width x dtype bytes):
# at the top decoder level a 2*ch-wide upsampled map, its norm/SiLU copies and the conv outputs.
_DECODE_ACT_FACTOR = 12
_ENCODE_ACT_FACTOR = 6
# Share of the free device memory a tile may use (the rest is weights, allocator slack, other models).
_FREE_SHARE = 0.6


def _bytes_per_pixel(cfg: Flux2VAEConfig, kind: str, dtype: torch.dtype) -> int:
    size = torch.empty((), dtype=dtype).element_size()
    if kind == "decode":
        return _DECODE_ACT_FACTOR * cfg.decoder_widths[0] * size
    return _ENCODE_ACT_FACTOR * cfg.encoder_widths[0] * size


def activation_bytes(
    cfg: Flux2VAEConfig, kind: str, height: int, width: int, dtype: torch.dtype, batch: int = 1
) -> int:
    """Estimated activation peak of one untiled ``kind`` ("encode" / "decode") pass, in bytes.

    What a caller makes room for before the pass (as ComfyUI's VAE nodes ask its memory manager for
    their estimate first): idle models give way, then "auto" tiling sizes tiles from what is free.
    A 2048 x 2048 FLUX.2 decode in bf16 needs about 13 GB untiled.
    """
    return int(batch) * int(height) * int(width) * _bytes_per_pixel(cfg, kind, dtype)


def resolve_tile(
    tile: TileArg,
    height: int,
    width: int,
    cfg: Flux2VAEConfig,
    kind: str,
    device: torch.device,
    dtype: torch.dtype,
) -> int | None:
    """Tile edge in pixels, or None when the image is processed in one pass.

    Args:
        tile: None (never tile), "auto" (tile size from free CUDA memory; CPU_AUTO_TILE on CPU) or
            an explicit edge in pixels (rounded down to a multiple of 16, at least MIN_TILE).
        height, width: image size in pixels.
        cfg: the VAE architecture (for the activation-size estimate).
        kind: "encode" or "decode".
        device, dtype: where and in which dtype the VAE runs.
    """
    f = cfg.downscale
    if tile is None:
        return None
    if isinstance(tile, str):
        if tile != "auto":
            raise ValueError(f"tile must be None, 'auto' or a number of pixels, got {tile!r}.")
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            budget = _FREE_SHARE * free
            bpp = _bytes_per_pixel(cfg, kind, dtype)
            if height * width * bpp <= budget:
                return None
            edge = int(math.sqrt(budget / bpp)) // 64 * 64
            logger.debug("VAE %s: %.2f GB free -> %d px tiles", kind, free / 2**30, edge)
        else:
            edge = CPU_AUTO_TILE
    else:
        edge = int(tile)
    edge = max(MIN_TILE, min(MAX_TILE, edge // f * f))
    if height <= edge and width <= edge:
        return None
    return edge


def _starts(size: int, tile: int, overlap: int) -> list[int]:
    """Tile start offsets covering [0, size) with at least ``overlap`` shared units between neighbours."""
    if size <= tile:
        return [0]
    stride = tile - overlap
    n = math.ceil((size - overlap) / stride)
    return sorted({min(i * stride, size - tile) for i in range(n)})


def _ramp(length: int, ramp: int, fade_start: bool, fade_end: bool) -> Tensor:
    """1-D blend weights (length,): linear ramps of ``ramp`` samples on the faded ends, else 1."""
    idx = torch.arange(length, dtype=torch.float32)
    w = torch.ones(length)
    if ramp > 0:
        if fade_start:
            w = torch.minimum(w, (idx + 0.5) / ramp)
        if fade_end:
            w = torch.minimum(w, (length - idx - 0.5) / ramp)
    return w


def _tiled(
    fn: Callable[[Tensor], Tensor],
    x: Tensor,
    tile_units: int,
    unit_in: int,
    unit_out: int,
    out_channels: int,
    device: torch.device,
) -> Tensor:
    """Run ``fn`` over overlapping tiles of ``x`` and blend.

    Sizes are counted in "units": ``unit_in`` input samples map to ``unit_out`` output samples
    (decode: 1 latent cell -> 16 pixels; encode: 16 pixels -> 1 latent cell).
    """
    b, _, h_in, w_in = x.shape
    hu, wu = h_in // unit_in, w_in // unit_in
    overlap = max(1, tile_units // 4)
    ys, xs = _starts(hu, tile_units, overlap), _starts(wu, tile_units, overlap)
    out = torch.zeros(b, out_channels, hu * unit_out, wu * unit_out, device=device)
    weight = torch.zeros(1, 1, hu * unit_out, wu * unit_out, device=device)
    ramp = overlap * unit_out
    for y0 in ys:
        th = min(tile_units, hu - y0)
        wy = _ramp(th * unit_out, ramp, y0 > 0, y0 + th < hu)
        for x0 in xs:
            tw = min(tile_units, wu - x0)
            wx = _ramp(tw * unit_out, ramp, x0 > 0, x0 + tw < wu)
            piece = x[:, :, y0 * unit_in : (y0 + th) * unit_in, x0 * unit_in : (x0 + tw) * unit_in]
            y = fn(piece).to(device, torch.float32)  # (B, C, th*unit_out, tw*unit_out)
            w2 = (wy[:, None] * wx[None, :]).to(device)
            oy, ox = y0 * unit_out, x0 * unit_out
            out[:, :, oy : oy + th * unit_out, ox : ox + tw * unit_out] += y * w2
            weight[:, :, oy : oy + th * unit_out, ox : ox + tw * unit_out] += w2
    return out / weight


def tiled_decode(
    fn: Callable[[Tensor], Tensor],
    latents: Tensor,
    cfg: Flux2VAEConfig,
    tile: TileArg,
    device: torch.device,
    dtype: torch.dtype,
) -> Tensor:
    """Decode (B, 128, h, w) latents with ``fn`` (one tile -> pixels), tiled if ``tile`` asks for it."""
    f = cfg.downscale
    h, w = latents.shape[2] * f, latents.shape[3] * f
    edge = resolve_tile(tile, h, w, cfg, "decode", device, dtype)
    if edge is None:
        return fn(latents)
    logger.debug("tiled VAE decode of %dx%d in %d px tiles", w, h, edge)
    return _tiled(fn, latents, edge // f, 1, f, 3, device)


def tiled_encode(
    fn: Callable[[Tensor], Tensor],
    images: Tensor,
    cfg: Flux2VAEConfig,
    tile: TileArg,
    device: torch.device,
    dtype: torch.dtype,
) -> Tensor:
    """Encode (B, 3, H, W) images with ``fn`` (one tile -> latents), tiled if ``tile`` asks for it."""
    f = cfg.downscale
    edge = resolve_tile(tile, images.shape[2], images.shape[3], cfg, "encode", device, dtype)
    if edge is None:
        return fn(images)
    logger.debug("tiled VAE encode of %dx%d in %d px tiles", images.shape[3], images.shape[2], edge)
    return _tiled(fn, images, edge // f, f, 1, cfg.latent_channels, device)
