"""Sigma schedules: FLUX.2's own and ComfyUI's "simple" one.

- "flux2" (BFL's flux2 sampling code, diffusers' FLUX.2 pipelines, ComfyUI's Flux2Scheduler):
  sigmas = linspace(1, 0, n + 1) warped by t -> e^mu / (e^mu + 1/t - 1), where mu comes from an
  empirical fit in the number of target image tokens and the number of steps.
- "simple" (ComfyUI's KSampler "simple" scheduler on its FLUX.2 model): n evenly spaced entries of a
  table of 10000 sigmas time_shift(2.02, k / 10000), k = 1 .. 10000 (ComfyUI's ModelSamplingFlux with
  the FLUX.2 shift 2.02 of comfy/supported_models.py), from the top, then 0. It ignores the image size.
"""

from __future__ import annotations

import math

from ..errors import InputError

# Empirical fit of mu (BFL): linear in token count at 10 and 200 steps, interpolated in steps.
_A_10, _B_10 = 8.73809524e-05, 1.89833333
_A_200, _B_200 = 0.00016927, 0.45666666
# Above this many tokens the 200-step line is used for any step count.
_LARGE_SEQ = 4300


def empirical_mu(image_seq_len: int, num_steps: int) -> float:
    """Time-shift mu for ``image_seq_len`` target tokens (references excluded) and ``num_steps`` steps."""
    m200 = _A_200 * image_seq_len + _B_200
    if image_seq_len > _LARGE_SEQ:
        return m200
    m10 = _A_10 * image_seq_len + _B_10
    slope = (m200 - m10) / 190.0
    return slope * num_steps + (m200 - 200.0 * slope)


def time_shift(mu: float, t: float) -> float:
    """Exponential time shift e^mu / (e^mu + (1/t - 1)); t = 0 stays 0."""
    if t <= 0.0:
        return 0.0
    return math.exp(mu) / (math.exp(mu) + (1.0 / t - 1.0))


def flux2_sigmas(num_steps: int, image_seq_len: int) -> list[float]:
    """The sigmas of a FLUX.2 run.

    Args:
        num_steps: number of denoising steps (>= 1).
        image_seq_len: number of target latent tokens, (H/16) * (W/16).

    Returns:
        num_steps + 1 floats from 1.0 down to 0.0 (4 steps at 1024x1024: 1.0, 0.9674, 0.9081, 0.7672, 0.0).
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}.")
    mu = empirical_mu(image_seq_len, num_steps)
    return [time_shift(mu, 1.0 - i / num_steps) for i in range(num_steps + 1)]


# ComfyUI's FLUX.2 sampling setting ("shift" in comfy/supported_models.py) and table length
# (comfy/model_sampling.py ModelSamplingFlux).
COMFY_FLUX2_SHIFT = 2.02
_TABLE = 10000


def simple_sigmas(num_steps: int, shift: float = COMFY_FLUX2_SHIFT) -> list[float]:
    """ComfyUI's "simple" schedule over its FLUX.2 sigma table (see the module docstring).

    Args:
        num_steps: number of denoising steps (>= 1).
        shift: mu of the table's time shift (2.02 for FLUX.2).

    Returns:
        num_steps + 1 floats, the first time_shift(shift, 1) = 1.0, the last 0.0.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}.")
    stride = _TABLE / num_steps
    # Entry -(1 + int(i * stride)) of the table is k = _TABLE - int(i * stride).
    return [time_shift(shift, (_TABLE - int(i * stride)) / _TABLE) for i in range(num_steps)] + [0.0]


SCHEDULERS = ("flux2", "simple")


def schedule_sigmas(scheduler: str, num_steps: int, image_seq_len: int) -> list[float]:
    """The sigmas of ``scheduler`` ("flux2" or "simple") for ``num_steps`` steps.

    Raises:
        InputError: an unknown scheduler name.
    """
    if scheduler == "flux2":
        return flux2_sigmas(num_steps, image_seq_len)
    if scheduler == "simple":
        return simple_sigmas(num_steps)
    raise InputError(f"unknown scheduler '{scheduler}'; choose one of: {', '.join(SCHEDULERS)}.")
