"""The FLUX.2 autoencoder: encoder, decoder and the normalised 128-channel latent.

Credit: architecture as described by BFL's ``flux2/autoencoder.py`` and diffusers'
``AutoencoderKLFlux2``; module names equal the BFL checkpoint keys.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import Flux2VAEConfig
from .layers import Downsample, MidBlock, ResnetBlock, Upsample, group_norm
from .tiling import TileArg, tiled_decode, tiled_encode

logger = logging.getLogger(__name__)


class _Level(nn.Module):
    """One resolution level: ``block`` ResNets plus an optional ``downsample``/``upsample``."""

    def __init__(self, blocks: list[nn.Module], resample: nn.Module | None, name: str):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        if resample is not None:
            self.add_module(name, resample)


class Encoder(nn.Module):
    """(B, 3, H, W) in [-1, 1] -> moments (B, 2*z, H/8, W/8) (after ``quant_conv``)."""

    def __init__(self, cfg: Flux2VAEConfig):
        super().__init__()
        widths, g = cfg.encoder_widths, cfg.norm_groups
        self.conv_in = nn.Conv2d(3, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        block_in = cfg.ch
        for i, w in enumerate(widths):
            blocks = []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(block_in, w, g))
                block_in = w
            last = i == len(widths) - 1
            self.down.append(_Level(blocks, None if last else Downsample(w), "downsample"))
        self.mid = MidBlock(block_in, g)
        self.norm_out = group_norm(block_in, g)
        self.conv_out = nn.Conv2d(block_in, 2 * cfg.z_channels, 3, padding=1)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.z_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        h = self.conv_out(F.silu(self.norm_out(h)))
        return self.quant_conv(h)


class Decoder(nn.Module):
    """(B, z, H/8, W/8) -> (B, 3, H, W). ``up[i]`` is level i (0 = full resolution), run deepest first."""

    def __init__(self, cfg: Flux2VAEConfig):
        super().__init__()
        widths, g = cfg.decoder_widths, cfg.norm_groups
        self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 1)
        block_in = widths[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, 3, padding=1)
        self.mid = MidBlock(block_in, g)
        levels: list[nn.Module] = []
        for i in reversed(range(len(widths))):
            blocks = []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, widths[i], g))
                block_in = widths[i]
            levels.append(_Level(blocks, Upsample(block_in) if i > 0 else None, "upsample"))
        # Stored by level index so the keys read ``up.0`` for the full-resolution level.
        self.up = nn.ModuleList(reversed(levels))
        self.norm_out = group_norm(block_in, g)
        self.conv_out = nn.Conv2d(block_in, 3, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.conv_in(self.post_quant_conv(z))
        h = self.mid(h)
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class _LatentNorm(nn.Module):
    """Holds the batch-norm running statistics of the 128-channel packed latent (no affine)."""

    def __init__(self, channels: int):
        super().__init__()
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))


def patchify(z: Tensor, p: int = 2) -> Tensor:
    """(B, C, H, W) -> (B, C*p*p, H/p, W/p); output channel = c*p*p + dy*p + dx."""
    b, c, h, w = z.shape
    z = z.reshape(b, c, h // p, p, w // p, p).permute(0, 1, 3, 5, 2, 4)
    return z.reshape(b, c * p * p, h // p, w // p)


def unpatchify(z: Tensor, p: int = 2) -> Tensor:
    """Inverse of ``patchify``: (B, C*p*p, h, w) -> (B, C, h*p, w*p)."""
    b, cpp, h, w = z.shape
    z = z.reshape(b, cpp // (p * p), p, p, h, w).permute(0, 1, 4, 2, 5, 3)
    return z.reshape(b, cpp // (p * p), h * p, w * p)


class Flux2VAE(nn.Module):
    """FLUX.2 VAE with the normalised, 2x2-packed 128-channel latent interface.

    Args:
        config: the architecture (``Flux2VAEConfig.from_name("flux2")`` for the published model).
    """

    def __init__(self, config: Flux2VAEConfig | None = None):
        super().__init__()
        self.config = config or Flux2VAEConfig()
        self.encoder = Encoder(self.config)
        self.decoder = Decoder(self.config)
        self.bn = _LatentNorm(self.config.latent_channels)
        self.checkpoint_format: str | None = None

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.conv_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.encoder.conv_in.weight.device

    def _bn_stats(self, like: Tensor) -> tuple[Tensor, Tensor]:
        mean = self.bn.running_mean.to(like.device, torch.float32).view(1, -1, 1, 1)
        std = torch.sqrt(
            self.bn.running_var.to(like.device, torch.float32).view(1, -1, 1, 1) + self.config.bn_eps
        )
        return mean, std

    def normalize(self, z32: Tensor) -> Tensor:
        """Raw encoder means (B, z, H/8, W/8) -> normalised packed latents (B, 128, H/16, W/16), fp32."""
        packed = patchify(z32.float(), self.config.patch)
        mean, std = self._bn_stats(packed)
        return (packed - mean) / std

    def denormalize(self, latents: Tensor) -> Tensor:
        """Normalised packed latents (B, 128, h, w) -> raw decoder input (B, z, 2h, 2w), fp32."""
        mean, std = self._bn_stats(latents)
        return unpatchify(latents.float() * std + mean, self.config.patch)

    def _encode_tile(self, images: Tensor) -> Tensor:
        moments = self.encoder(images.to(self.device, self.dtype))
        # KL posterior mean (first half of the moments); FLUX.2 never samples here.
        return self.normalize(moments[:, : self.config.z_channels])

    def _decode_tile(self, latents: Tensor) -> Tensor:
        z = self.denormalize(latents.to(self.device)).to(self.dtype)
        return self.decoder(z).float()

    def _check_images(self, images: Tensor) -> None:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"VAE.encode expects images (B, 3, H, W), got shape {tuple(images.shape)}.")
        f = self.config.downscale
        if images.shape[2] % f or images.shape[3] % f:
            raise ValueError(
                f"VAE.encode: height and width must be multiples of {f}, got {tuple(images.shape[2:])}; "
                "resize or crop the image first."
            )

    @torch.no_grad()
    def encode(self, images: Tensor, tile: TileArg = None) -> Tensor:
        """Encode images to normalised packed latents.

        Args:
            images: (B, 3, H, W) in [-1, 1]; H and W multiples of 16.
            tile: None (one pass), "auto" (tile when the image would not fit in free memory) or a
                tile size in pixels.

        Returns:
            (B, 128, H/16, W/16) float32 latents on the VAE's device.
        """
        self._check_images(images)
        return tiled_encode(self._encode_tile, images, self.config, tile, self.device, self.dtype)

    @torch.no_grad()
    def decode(self, latents: Tensor, tile: TileArg = None) -> Tensor:
        """Decode normalised packed latents to images.

        Args:
            latents: (B, 128, h, w) normalised latents.
            tile: None, "auto" or a tile size in pixels (see ``encode``).

        Returns:
            (B, 3, 16h, 16w) float32 images, nominally in [-1, 1] (not clamped).
        """
        if latents.ndim != 4 or latents.shape[1] != self.config.latent_channels:
            raise ValueError(
                f"VAE.decode expects latents (B, {self.config.latent_channels}, h, w), "
                f"got shape {tuple(latents.shape)}."
            )
        return tiled_decode(self._decode_tile, latents, self.config, tile, self.device, self.dtype)
