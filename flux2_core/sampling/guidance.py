"""Which guidance a FLUX.2 transformer uses, read from its config, and the variants' defaults.

- ``guidance_embed`` ([dev]): the scale is an input of the model (embedded guidance), one pass.
- distilled without embedder ([klein] 4B/9B/9B-KV): no guidance at all.
- base ([klein] base 4B/9B): true classifier-free guidance, v = v_neg + g * (v_pos - v_neg).

Defaults follow BFL's reference settings: [dev] 50 steps at embedded guidance 4, distilled
[klein] 4 steps without guidance, base [klein] 50 steps at CFG 4.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from ..config import Flux2Config
from ..errors import InputError

logger = logging.getLogger(__name__)

DEFAULT_GUIDANCE = 4.0
DEFAULT_STEPS_DISTILLED = 4
DEFAULT_STEPS = 50


@dataclass(frozen=True)
class GuidancePlan:
    """How velocities are computed.

    Attributes:
        mode: "embedded" (scale fed to the model), "none" (single plain pass) or "cfg".
        scale: guidance scale (None for "none").
        default_steps: recommended steps for the variant.
    """

    mode: str
    scale: float | None
    default_steps: int

    @property
    def passes(self) -> int:
        """Transformer passes per step and image: CFG runs the prompt and the negative."""
        return 2 if self.mode == "cfg" else 1


def plan_guidance(config: Flux2Config, guidance: float | None) -> GuidancePlan:
    """Pick the guidance mode from a ``Flux2Config`` (``guidance_embed``, ``distilled``) and a scale.

    Args:
        config: the transformer's config.
        guidance: user scale or None for the variant default (4.0 for [dev] and base models).

    Raises:
        InputError: a negative or non-finite scale (NaN would give black images with embedded
            guidance and silently turn CFG off).
    """
    if guidance is not None and not (math.isfinite(guidance) and guidance >= 0):
        raise InputError(f"guidance must be a finite number >= 0, got {guidance}.")
    if config.guidance_embed:
        return GuidancePlan(
            "embedded", DEFAULT_GUIDANCE if guidance is None else float(guidance), DEFAULT_STEPS
        )
    if config.distilled:
        if guidance not in (None, 1.0):
            logger.warning(
                "guidance %.2f ignored: %s is step-distilled and runs without guidance",
                guidance,
                config.variant,
            )
        return GuidancePlan("none", None, DEFAULT_STEPS_DISTILLED)
    scale = DEFAULT_GUIDANCE if guidance is None else float(guidance)
    # g <= 1 makes CFG a no-op or an extrapolation away from the prompt; diffusers also skips it.
    return GuidancePlan("cfg" if scale > 1.0 else "none", scale if scale > 1.0 else None, DEFAULT_STEPS)
