"""4-axis rotary position embedding (t, h, w, l), theta 2000, on adjacent channel pairs.

Tables are computed once per forward in fp32 (angles in fp64 where the device has it). Each block
folds its QK-RMSNorm scales into the tables (``fold_scales``), so normalise + scale + rotate costs one
RMSNorm kernel plus two fused multiply-adds on the joint (q, k) tensor.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class Rope:
    """Rotation tables for one token sequence, shapes (B, L, 1, 1, D) fp32.

    ``cos[..., 2j] = cos[..., 2j+1] = cos(a_j)`` and ``sin = (-sin(a_j), +sin(a_j))`` per pair, so that
    ``rot(x) = x * cos + swap_pairs(x) * sin``.
    """

    cos: torch.Tensor
    sin: torch.Tensor
    _freqs: torch.Tensor | None = field(default=None, repr=False, compare=False)

    @property
    def seq_len(self) -> int:
        return self.cos.shape[1]

    def freqs_cis(self) -> torch.Tensor:
        """The same rotation as 2x2 matrices per channel pair, the layout of ComfyUI's and comfy-kitchen's
        RoPE kernels: (B, L, 1, D/2, 2, 2) fp32, ``[[cos, -sin], [sin, cos]]``. Made once per table."""
        if self._freqs is None:
            c = self.cos[:, :, 0, 0, 0::2]  # (B, L, D/2)
            s = self.sin[:, :, 0, 0, 1::2]  # +sin of each pair
            self._freqs = torch.stack((c, -s, s, c), dim=-1).unflatten(-1, (2, 2))[:, :, None]
        return self._freqs


def _angle_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


def rope_tables(ids: torch.Tensor, axes_dim: tuple[int, ...], theta: float) -> Rope:
    """Build rotation tables from position ids.

    Args:
        ids: (B, L, n_axes) positions (float or int), e.g. (t, h, w, l).
        axes_dim: head-dim channels per axis (even, summing to the head dim).
        theta: RoPE base.
    """
    dt = _angle_dtype(ids.device)
    angles = []
    for a, dim in enumerate(axes_dim):
        omega = theta ** -(torch.arange(0, dim, 2, dtype=dt, device=ids.device) / dim)  # (dim/2,)
        angles.append(ids[..., a].to(dt)[..., None] * omega)  # (B, L, dim/2)
    ang = torch.cat(angles, dim=-1)  # (B, L, D/2)
    cos, sin = ang.cos().float(), ang.sin().float()
    cos = torch.stack((cos, cos), dim=-1).flatten(-2)  # (B, L, D) pair-interleaved
    sin = torch.stack((-sin, sin), dim=-1).flatten(-2)
    return Rope(cos[:, :, None, None], sin[:, :, None, None])


def cat_rope(parts: list[Rope]) -> Rope:
    """Tables of concatenated sequences (same order as the token concatenation)."""
    return Rope(torch.cat([p.cos for p in parts], dim=1), torch.cat([p.sin for p in parts], dim=1))


def _swap_pairs(x: torch.Tensor) -> torch.Tensor:
    return x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)


def fold_scales(
    rope: Rope, segments: list[tuple[torch.Tensor, torch.Tensor, int]]
) -> tuple[torch.Tensor, ...]:
    """Fold per-segment QK-norm scales into the rotation tables.

    Args:
        rope: tables of the whole sequence (L tokens).
        segments: (q_scale (D,), k_scale (D,), length) for consecutive token ranges summing to L.

    Returns:
        (cos_s, sin_s), each (B, L, 2, 1, D) fp32: index 2 is (q, k).
    """
    scales = []
    for q_scale, k_scale, n in segments:
        s = torch.stack((q_scale, k_scale)).float()[:, None]  # (2, 1, D)
        scales.append(s.expand(n, 2, 1, s.shape[-1]))
    s = torch.cat(scales) if len(scales) > 1 else scales[0]  # (L, 2, 1, D)
    return rope.cos * s, rope.sin * _swap_pairs(s)


def norm_rope_qk(
    qk: torch.Tensor, tables: tuple[torch.Tensor, torch.Tensor], out_dtype: torch.dtype
) -> torch.Tensor:
    """RMS-normalise q and k over the head dim, apply their scales and the rotation, in fp32.

    Args:
        qk: (B, L, 2, heads, D) projected queries and keys.
        tables: ``fold_scales`` output.
        out_dtype: result dtype (the dtype of v, as the reference casts).

    Returns:
        (B, L, 2, heads, D) in ``out_dtype``.
    """
    cos_s, sin_s = tables
    out = torch.empty(qk.shape, dtype=out_dtype, device=qk.device)
    # q then k: halves the fp32 temporaries (the activation peak of a block) for a few more launches.
    for i in range(2):
        # Normalised values are rounded to the input dtype (as the reference casts after its fp32
        # norm); scale and rotation then run in fp32 against the fp32 tables, rounded once on store.
        x = F.rms_norm(qk[:, :, i], (qk.shape[-1],), eps=1e-6)  # (B, L, heads, D)
        y = x * cos_s[:, :, i]
        y.addcmul_(_swap_pairs(x), sin_s[:, :, i])
        out[:, :, i] = y
    return out
