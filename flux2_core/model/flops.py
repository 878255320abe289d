"""FLOPs of each FLUX.2 transformer block for a token count (shapes only, no weights needed).

Feeds `weight_streaming.StreamingConfig.block_flops`, from which the streamer estimates per-block
compute time with a matmul probe, so a card that cannot hold the model resident still gets plans
ranked by modelled step time.

Counting: a linear layer costs 2 x params x tokens FLOPs
(multiply + add), attention 4 x T^2 x H (QK^T and AV, each 2 x T^2 x head_dim per head). Layer norms,
modulation, RoPE, QK-norm and SwiGLU gating are O(T x H) and left out (under 1% of the total).

    H = hidden, M = mlp_hidden, T = image + text tokens
    one stream's weights:  4H^2 (qkv 3H^2 + proj H^2) + 3HM (mlp in 2HM + out MH)
    double block:          2 x (4H^2 + 3HM) x T + 4 T^2 H
                           (each token passes through one stream's weights only: img tokens through
                           img_*, text tokens through txt_*; half the block's parameters)
    single block:          2 x (4H^2 + 3HM) x T + 4 T^2 H
                           (linear1 H x (3H + 2M) and linear2 (H + M) x H: the same 4H^2 + 3HM)

Reference tokens (in-context editing) join the sequence like image tokens, so they count in T. With
the KV-cached reference path (klein 9B-KV) a cached pass skips the reference tokens' linears but their
keys and values still enter attention: pass them as `kv_tokens`.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import Flux2Config


@dataclass(frozen=True)
class BlockFlops:
    """FLOPs of one forward pass, split by block kind.

    Attributes:
        double: FLOPs of each double-stream block (all equal).
        single: FLOPs of each single-stream block (all equal).
        depth: number of double blocks.
        depth_single: number of single blocks.
        attention_fraction: share of the block FLOPs spent in attention.
    """

    double: float
    single: float
    depth: int
    depth_single: int
    attention_fraction: float

    @property
    def per_block(self) -> tuple[float, ...]:
        """FLOPs of every block in execution order (double blocks first, then single blocks)."""
        return (self.double,) * self.depth + (self.single,) * self.depth_single

    @property
    def total(self) -> float:
        return self.double * self.depth + self.single * self.depth_single


def tokens_for(
    width: int,
    height: int,
    text_tokens: int = 512,
    reference_images: int = 0,
    reference_tokens: int | None = None,
) -> int:
    """Sequence length of one forward pass: image tokens (16x16 pixels each) + text + references.

    Args:
        width: image width in pixels.
        height: image height in pixels.
        text_tokens: text sequence length (512 for FLUX.2).
        reference_images: reference images of the same size as the output (when `reference_tokens`
            is None).
        reference_tokens: total reference tokens, if the references differ in size.
    """
    image = (width // 16) * (height // 16)
    refs = reference_tokens if reference_tokens is not None else reference_images * image
    return image + text_tokens + refs


def block_flops(config: Flux2Config, tokens: int, kv_tokens: int = 0) -> BlockFlops:
    """FLOPs of each transformer block for one forward pass of batch size 1.

    Args:
        config: the transformer's shape.
        tokens: tokens that run through the blocks' linear layers (image + text + references).
        kv_tokens: extra tokens that only enter attention as cached keys and values (klein 9B-KV).

    Returns:
        The `BlockFlops`; `per_block` is what `StreamingConfig.block_flops` takes.
    """
    if tokens <= 0 or kv_tokens < 0:
        raise ValueError(f"tokens must be > 0 and kv_tokens >= 0, got {tokens} and {kv_tokens}")
    H, M = config.hidden_size, config.mlp_hidden
    stream_params = 4 * H * H + 3 * H * M
    linear = 2.0 * stream_params * tokens
    attention = 4.0 * tokens * (tokens + kv_tokens) * H
    per = linear + attention
    return BlockFlops(per, per, config.depth, config.depth_single, attention / per)
