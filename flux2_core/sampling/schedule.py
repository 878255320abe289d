"""The FLUX.2 flow-matching sigma schedule (as BFL's flux2 sampling code and diffusers' FLUX.2 pipelines).

sigmas = linspace(1, 0, n + 1) warped by t -> e^mu / (e^mu + 1/t - 1), where mu comes from an
empirical fit in the number of target image tokens and the number of steps.
"""

from __future__ import annotations

import math

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
