"""Which guidance a FLUX.2 transformer uses, read from its config (flux2-spec.md §6).

- ``guidance_embed`` ([dev]): the scale is an input of the model (embedded guidance), one pass.
- distilled without embedder ([klein] 4B/9B/9B-KV): no guidance at all.
- base ([klein] base 4B/9B): true classifier-free guidance, v = v_neg + g * (v_pos - v_neg).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

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


def plan_guidance(config, guidance: float | None) -> GuidancePlan:
    """Pick the guidance mode from a ``Flux2Config`` (``guidance_embed``, ``distilled``) and a scale.

    Args:
        config: the transformer's config.
        guidance: user scale or None for the variant default (4.0 for [dev] and base models).
    """
    if guidance is not None and guidance < 0:
        raise InputError(f"guidance must be >= 0, got {guidance}.")
    if getattr(config, "guidance_embed", False):
        return GuidancePlan(
            "embedded", DEFAULT_GUIDANCE if guidance is None else float(guidance), DEFAULT_STEPS
        )
    if getattr(config, "distilled", True):
        if guidance not in (None, 1.0):
            logger.warning(
                "guidance %.2f ignored: %s is step-distilled and runs without guidance",
                guidance,
                getattr(config, "variant", "this model"),
            )
        return GuidancePlan("none", None, DEFAULT_STEPS_DISTILLED)
    scale = DEFAULT_GUIDANCE if guidance is None else float(guidance)
    # g <= 1 makes CFG a no-op or an extrapolation away from the prompt; diffusers also skips it.
    return GuidancePlan("cfg" if scale > 1.0 else "none", scale if scale > 1.0 else None, DEFAULT_STEPS)
