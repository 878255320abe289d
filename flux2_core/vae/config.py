"""Configuration of the FLUX.2 autoencoder.

The published VAE is an LDM-style KL autoencoder: base width 128, multipliers (1, 2, 4, 4), 2 ResNet
blocks per encoder level (3 per decoder level), 32 latent channels at 1/8 resolution. FLUX.2 then
patchifies 2x2 to 128 channels at 1/16 and normalises them with batch-norm running statistics.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class Flux2VAEConfig:
    """Shape of one FLUX.2 VAE.

    Attributes:
        ch: width of the first level (conv_in output channels).
        ch_mult: width multipliers per level; len(ch_mult) - 1 downsamplings of 2x.
        num_res_blocks: ResNet blocks per encoder level (the decoder has one more per level).
        z_channels: latent channels before 2x2 patchification (32 for FLUX.2).
        norm_groups: GroupNorm groups (32 in the published model; every width must divide by it).
        decoder_ch_mult: decoder multipliers when they differ from the encoder's (small-decoder variant).
        bn_eps: epsilon of the latent batch-norm normalisation.
        patch: patchification factor of the latent (2 -> 4x channels, half resolution).
    """

    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 32
    norm_groups: int = 32
    decoder_ch: int | None = None
    decoder_ch_mult: tuple[int, ...] | None = None
    bn_eps: float = 1e-4
    patch: int = 2

    def __post_init__(self) -> None:
        if self.ch <= 0 or not self.ch_mult or any(m <= 0 for m in self.ch_mult):
            raise ValueError(f"Flux2VAEConfig: bad widths ch={self.ch} ch_mult={self.ch_mult}.")
        if self.num_res_blocks <= 0:
            raise ValueError(f"Flux2VAEConfig: num_res_blocks must be >= 1, got {self.num_res_blocks}.")
        for w in self.encoder_widths + self.decoder_widths:
            if w % self.norm_groups:
                raise ValueError(
                    f"Flux2VAEConfig: width {w} is not divisible by norm_groups={self.norm_groups}."
                )
        if self.decoder_ch_mult is not None and len(self.decoder_ch_mult) != len(self.ch_mult):
            raise ValueError("Flux2VAEConfig: decoder_ch_mult must have as many levels as ch_mult.")

    @property
    def encoder_widths(self) -> tuple[int, ...]:
        return tuple(self.ch * m for m in self.ch_mult)

    @property
    def decoder_widths(self) -> tuple[int, ...]:
        ch = self.decoder_ch if self.decoder_ch is not None else self.ch
        return tuple(ch * m for m in (self.decoder_ch_mult or self.ch_mult))

    @property
    def num_levels(self) -> int:
        return len(self.ch_mult)

    @property
    def latent_channels(self) -> int:
        """Channels of the packed, normalised latent the transformer sees (128 for FLUX.2)."""
        return self.z_channels * self.patch * self.patch

    @property
    def downscale(self) -> int:
        """Pixels per packed-latent cell along each axis (16 for FLUX.2)."""
        return 2 ** (self.num_levels - 1) * self.patch

    @classmethod
    def from_name(cls, name: str) -> Flux2VAEConfig:
        """A named preset: ``"flux2"`` (the published VAE) or ``"tiny"`` (tests)."""
        try:
            return _PRESETS[name]
        except KeyError:
            raise ValueError(f"Unknown VAE preset {name!r}; known: {sorted(_PRESETS)}.") from None

    def replace(self, **changes) -> Flux2VAEConfig:
        return dataclasses.replace(self, **changes)


_PRESETS: dict[str, Flux2VAEConfig] = {
    "flux2": Flux2VAEConfig(),
    # 4 levels like the real model so every code path (3 downsamplings, 16x total) is exercised;
    # ch 32 is the smallest width the real 32-group GroupNorm allows.
    "tiny": Flux2VAEConfig(ch=32, ch_mult=(1, 2, 4, 4), num_res_blocks=1),
}
