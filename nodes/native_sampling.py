"""FLUX.2 Sampler on a native MODEL: the work goes to ComfyUI's own sampling (CFGGuider + KSAMPLER).

Used when the Sampler is given a ComfyUI MODEL (ours from FLUX.2 To Native MODEL, UNETLoader's,
ComfyUI-GGUF's ...) or a conditioning only ComfyUI can sample (several entries, areas, masks). The
schedule, the seed's noise and the variant rules are the Sampler's own, so the same settings give
the same latents as on our own path; ComfyUI's model patches and wrappers (LoRA loaders, EasyCache,
ModelSamplingFlux ...) apply, and its progress bar, previews and Cancel work as in its samplers.
"""

from __future__ import annotations

import logging

import comfy.model_base
import comfy.model_patcher
import comfy.samplers
import comfy.utils
import latent_preview
import node_helpers
import torch

from ..flux2_core.config import config_from_bfl_shapes
from ..flux2_core.errors import InputError
from ..flux2_core.sampling.guidance import DEFAULT_GUIDANCE
from ..flux2_core.sampling.plan import distilled_for_unknown
from . import memory
from .native_patcher import Flux2LocalModelPatcher

log = logging.getLogger(__name__)


def is_native_model(model: object) -> bool:
    return isinstance(model, comfy.model_patcher.ModelPatcher)


def native_config(where: str, model, guidance: float | None):
    """The ``Flux2Config`` of a native MODEL: ours exactly; another loader's from its weights' shapes."""
    if isinstance(model, Flux2LocalModelPatcher):
        return model.flux2_holder.module.config
    flux2 = getattr(comfy.model_base, "Flux2", None)
    if flux2 is None or not isinstance(model.model, flux2):
        raise InputError(
            f"{where}: the model is a {type(model.model).__name__} MODEL, not FLUX.2: connect a FLUX.2 model "
            "(FLUX.2 Model Loader, or UNETLoader with a FLUX.2 file)."
        )
    shapes = {k: tuple(v.shape) for k, v in model.model.diffusion_model.state_dict().items()}
    return config_from_bfl_shapes(shapes, is_distilled=distilled_for_unknown(guidance))


def with_guidance(cond: list, guidance: float | None) -> list:
    """[dev]'s embedded guidance on every entry: ``guidance`` if given, else kept, else BFL's default."""
    if guidance is not None:
        return node_helpers.conditioning_set_values(cond, {"guidance": guidance})
    out = []
    for t, d in cond:
        out.append([t, d if d.get("guidance") is not None else {**d, "guidance": DEFAULT_GUIDANCE}])
    return out


def zero_like(cond: list) -> list:
    """ComfyUI's ConditioningZeroOut: the negative of distilled models (never evaluated at CFG 1)."""
    return [[torch.zeros_like(t), {**d, "pooled_output": None}] for t, d in cond]


def sample_native(
    model,
    positive: list,
    negative: list | None,
    cfg: float,
    sampler_name: str,
    sigmas: list[float],
    noise: torch.Tensor,
    latent: torch.Tensor,
    seed: int,
) -> torch.Tensor:
    """ComfyUI's sampling of ``latent`` (B, 128, h, w) along ``sigmas`` (noise scaled in by its model).

    Args:
        model: a ModelPatcher of FLUX.2.
        positive, negative: native CONDITIONING (negative None: zeros, only used when cfg > 1).
        cfg: CFG scale (1 = a single pass on the positive).
        sampler_name: a ComfyUI sampler name (our solver names are ComfyUI's).
        sigmas: the schedule, from the first sigma run down to 0.
        noise: (B, 128, h, w) initial noise (ComfyUI's seed convention).
        latent: zeros for text-to-image, the input latents for image-to-image.
        seed: the noise seed (ComfyUI's samplers that draw noise use it).

    Returns:
        (B, 128, h, w) float32 latents on ComfyUI's intermediate device.
    """
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(positive, negative if negative is not None else zero_like(positive))
    guider.set_cfg(cfg)
    sampler = comfy.samplers.sampler_object(sampler_name)
    steps = len(sigmas) - 1
    callback = latent_preview.prepare_callback(model, steps, {})  # progress bar + previews
    samples = guider.sample(
        noise,
        latent,
        sampler,
        torch.tensor(sigmas, dtype=torch.float32),
        denoise_mask=None,
        callback=callback,
        disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED,
        seed=seed,
    )
    return samples.to(memory.output_device(), torch.float32)


def route(where: str, model, conditioning, negative, guidance: float):
    """FLUX.2 Sampler's inputs checked and routed: (model, conditioning, guidance, native).

    Our model and conditioning stay ours. A native CONDITIONING that our sampler reproduces exactly
    (one entry of embeddings, guidance and index references) becomes ours; any other goes, with our
    model as a native MODEL, to ComfyUI's sampling (native True), as does a native MODEL.

    Raises:
        InputError: an input holds something else than its socket types' values.
    """
    from .common import expect
    from .holders import MODEL_HOLDERS
    from .native_cond import check_native, from_terms, simple_terms
    from .types import Conditioning

    native = is_native_model(model)
    if not native:
        expect(
            where, "model", model, MODEL_HOLDERS, "a FLUX.2 Model Loader or LoRA Loader output, or a MODEL"
        )
    if isinstance(conditioning, list):
        check_native(where, "conditioning", conditioning)
    else:
        expect(
            where,
            "conditioning",
            conditioning,
            Conditioning,
            "a FLUX.2 Encode Prompt or Multi-Reference output, or a CONDITIONING",
        )
    if negative is not None:
        check_native(where, "negative", negative)
    if isinstance(conditioning, list) and not native:
        terms = simple_terms(conditioning)
        neg_terms = None if negative is None else simple_terms(negative)
        if terms is None or (negative is not None and neg_terms is None):
            from .native_patcher import native_model_for

            return native_model_for(model), conditioning, guidance, True
        conditioning, guidance = from_terms(where, terms, neg_terms, model.module.config, guidance)
    return model, conditioning, guidance, native


def _reference_tokens(cond) -> int:
    from ..flux2_core.sampling import reference_token_count

    if isinstance(cond, list):
        return reference_token_count(list(cond[0][1].get("reference_latents") or []))
    return reference_token_count(cond.reference_latents)


def run_native(
    where,
    model,
    conditioning,
    negative,
    size,
    sampler_name,
    scheduler,
    *,
    seed,
    steps,
    guidance,
    denoise,
    init,
):
    """FLUX.2 Sampler's settings applied through ComfyUI's sampling (see the module docstring).

    Args:
        where: the node's name, for messages.
        model: a native MODEL (ModelPatcher of FLUX.2).
        conditioning: our ``Conditioning`` or a native CONDITIONING.
        negative: a native CONDITIONING or None.
        size: (width, height) in pixels.
        sampler_name, scheduler: the solver and the schedule.
        seed, steps, guidance, denoise: the node's widgets (0 = the variant's default).
        init: (B, 128, h, w) latents to start from (image-to-image), or None.
    """
    import comfy.sample

    from ..flux2_core.sampling import latent_shape, plan_sampling, schedule_sigmas
    from ..flux2_core.sampling.plan import check_text_encoder, text_encoder_kind
    from ..flux2_core.sampling.sampler import start_index
    from .native_cond import to_native

    width, height = size
    config = native_config(where, model, guidance or None)
    plan = plan_sampling(
        config,
        width,
        height,
        reference_tokens=_reference_tokens(conditioning),
        batch=1 if init is None else init.shape[0],
        steps=steps or None,
        guidance=guidance or None,
    )
    if isinstance(conditioning, list):
        positive = conditioning
        for t, _ in [*conditioning, *(negative or [])]:
            check_text_encoder(
                config, int(t.shape[-1]), text_encoder_kind(config), encoder_name="the CONDITIONING"
            )
    else:
        check_text_encoder(
            config,
            conditioning.context_dim,
            conditioning.encoder_kind,
            encoder_name=conditioning.encoder_file,
        )
        positive = to_native(conditioning)
        if conditioning.negative_embeds is not None:
            negative = to_native(conditioning, negative=True)
    mode, cfg = plan.guidance.mode, 1.0
    if mode == "embedded":
        positive = with_guidance(positive, guidance or None)
    elif mode == "cfg":
        if negative is None:
            raise InputError(
                f"{where}: FLUX.2 {config.variant} runs true CFG (guidance {plan.guidance.scale:g}) and needs a "
                "negative prompt: connect a CONDITIONING to 'negative', or set guidance to 1."
            )
        cfg = plan.guidance.scale
    sigmas = schedule_sigmas(scheduler, plan.steps, (height // 16) * (width // 16))
    first = 0 if init is None else start_index(plan.steps, denoise)
    latent = init if init is not None else torch.zeros(latent_shape(width, height))
    noise = comfy.sample.prepare_noise(latent, seed)
    log.info(
        "Flux2Local: ComfyUI samples %d steps of %s/%s at %dx%d on %s (cfg %.2f, seed %d)",
        plan.steps - first,
        sampler_name,
        scheduler,
        width,
        height,
        type(model).__name__,
        cfg,
        seed,
    )
    return sample_native(model, positive, negative, cfg, sampler_name, sigmas[first:], noise, latent, seed)
