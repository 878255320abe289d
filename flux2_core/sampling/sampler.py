"""Flow-matching sampler for FLUX.2 (text-to-image, image-to-image, references, KV variant).

The model predicts v ~ noise - data; a solver (``solvers.py``: Euler by default,
x_{i+1} = x_i + (sigma_{i+1} - sigma_i) * v(x_i, sigma_i)) advances the latents along a sigma
schedule (``schedule.py``), and the denoised estimate shown to progress callbacks is x_i - sigma_i * v.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import GenerationCancelled, InputError
from ..model.transformer import Flux2Transformer
from .guidance import GuidancePlan, plan_guidance
from .schedule import schedule_sigmas
from .solvers import make_solver
from .tokens import (
    DOWNSCALE,
    LATENT_CHANNELS,
    image_ids,
    pack,
    reference_tokens,
    text_ids,
    unpack,
    validate_size,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepInfo:
    """Progress after one denoising step.

    Attributes:
        step: 1-based index of the step just finished.
        total: number of steps this run executes.
        sigma: noise level the model was evaluated at.
        sigma_next: noise level of ``latents``.
        denoised: (B, 128, h, w) float32 estimate of the clean latent (for previews).
        latents: (B, 128, h, w) float32 current noisy latent.
    """

    step: int
    total: int
    sigma: float
    sigma_next: float
    denoised: Tensor
    latents: Tensor


StepCallback = Callable[[StepInfo], bool | None]


def make_noise(shape: tuple[int, ...], seed: int, device: torch.device | str) -> Tensor:
    """Standard normal float32 noise drawn on the CPU from ``seed`` (same values on every device)."""
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    return torch.randn(shape, generator=gen, dtype=torch.float32).to(device)


def _check_embeds(name: str, embeds: Tensor, context_dim: int) -> None:
    if not isinstance(embeds, Tensor) or embeds.ndim != 3:
        shape = tuple(embeds.shape) if isinstance(embeds, Tensor) else type(embeds).__name__
        raise InputError(f"{name} must be a (B, L, context_dim) tensor, got {shape}.")
    if embeds.shape[-1] != context_dim:
        raise InputError(
            f"{name} has feature width {embeds.shape[-1]} but the transformer expects "
            f"{context_dim}. Fix: use the text encoder that belongs to this FLUX.2 model."
        )


def _check_batch(name: str, t: Tensor, batch: int) -> None:
    if t.shape[0] not in (1, batch):
        raise InputError(
            f"{name} has batch size {t.shape[0]} but the prompt embeddings have {batch}. "
            "Fix: give one item (shared) or one per prompt."
        )


def start_index(steps: int, denoise: float) -> int:
    """First schedule index for image-to-image: the last round(steps * denoise) steps are run."""
    if not 0.0 < denoise <= 1.0:
        raise InputError(f"denoise must be in (0, 1], got {denoise}.")
    return steps - max(1, round(steps * denoise))


class _Velocity:
    """v(x, sigma) for one guidance plan, with target + reference tokens or the KV cache."""

    def __init__(
        self,
        transformer: Flux2Transformer,
        plan: GuidancePlan,
        txt: Tensor,
        neg: Tensor | None,
        img_ids: Tensor,
        refs: tuple[Tensor, Tensor] | None,
        device: torch.device,
    ):
        self.model, self.plan = transformer, plan
        self.txt, self.neg = txt, neg
        self.txt_ids = text_ids(txt.shape[0], txt.shape[1], device)
        self.neg_ids = None if neg is None else text_ids(neg.shape[0], neg.shape[1], device)
        self.img_ids, self.refs = img_ids, refs
        self.kv = transformer.config.kv_refs and refs is not None
        self.caches: dict[str, object] = {}
        if self.kv:
            from ..kv_cache import Flux2KVCache

            self.caches = {"pos": Flux2KVCache(), "neg": Flux2KVCache()}
        b = txt.shape[0]
        self.guidance = None
        if plan.mode == "embedded":
            self.guidance = torch.full((b,), plan.scale, dtype=torch.float32, device=device)

    def _one(self, x: Tensor, t: Tensor, txt: Tensor, txt_ids: Tensor, which: str) -> Tensor:
        n = x.shape[1]
        kw = dict(txt=txt, txt_ids=txt_ids, timesteps=t, guidance=self.guidance)
        if self.refs is None:
            out = self.model(img=x, img_ids=self.img_ids, **kw)
        elif self.kv:
            cache = self.caches[which]
            extra = {} if cache.filled else {"ref_img": self.refs[0], "ref_ids": self.refs[1]}
            out = self.model(img=x, img_ids=self.img_ids, kv_cache=cache, **extra, **kw)
        else:
            # In-context references: appended after the target tokens, their outputs dropped.
            img = torch.cat((x, self.refs[0].to(x.dtype)), dim=1)  # (B, N + R, 128)
            ids = torch.cat((self.img_ids, self.refs[1]), dim=1)
            out = self.model(img=img, img_ids=ids, **kw)
        return out[:, :n].float()

    def __call__(self, x: Tensor, sigma: float) -> Tensor:
        t = torch.full((x.shape[0],), sigma, dtype=torch.float32, device=x.device)
        v = self._one(x, t, self.txt, self.txt_ids, "pos")
        if self.plan.mode == "cfg":
            v_neg = self._one(x, t, self.neg, self.neg_ids, "neg")
            v = v_neg + self.plan.scale * (v - v_neg)
        return v

    def release(self) -> None:
        for cache in self.caches.values():
            cache.clear()


def sample_latents(
    *,
    transformer: Flux2Transformer,
    prompt_embeds: Tensor,
    negative_prompt_embeds: Tensor | None = None,
    reference_latents: list[Tensor] | None = None,
    width: int = 1024,
    height: int = 1024,
    steps: int | None = None,
    guidance: float | None = None,
    seed: int = 0,
    noise: Tensor | None = None,
    init_latents: Tensor | None = None,
    denoise: float = 1.0,
    callback: StepCallback | None = None,
    sigmas: list[float] | None = None,
    device: torch.device | str | None = None,
    sampler: str = "euler",
    scheduler: str = "flux2",
) -> Tensor:
    """Denoise FLUX.2 latents.

    Args:
        transformer: a ``Flux2Transformer`` (its ``config`` decides the guidance mode).
        prompt_embeds: (B, L, context_dim) text features.
        negative_prompt_embeds: (B or 1, L', context_dim); the unconditional branch of true CFG
            (base models). Required there: pass the encoding of the empty prompt "" by default.
        reference_latents: up to 10 (1, 128, h_k, w_k) latents from ``prepare_reference_latents``.
        width, height: output size in pixels (multiples of 16, 64..4 MP).
        steps: denoising steps (default: 4 for distilled klein, 50 otherwise).
        guidance: scale ([dev]: embedded, default 4; base: CFG, default 4; distilled: ignored).
        seed: seed of the initial noise (drawn on the CPU, so identical on every device).
        noise: (B, 128, H/16, W/16) initial noise to use instead of the seed.
        init_latents: (B or 1, 128, H/16, W/16) normalised latents of an input image (image-to-image).
        denoise: image-to-image strength in (0, 1]; the last round(steps * denoise) steps are run,
            starting from sigma * noise + (1 - sigma) * init_latents.
        callback: called with a ``StepInfo`` after each step; returning True cancels.
        sigmas: explicit schedule (num_steps + 1 values ending at 0) instead of ``scheduler``'s.
        device: where to compute (default: the device of ``prompt_embeds``).
        sampler: the solver, a name of ``solvers.SOLVERS`` ("euler", "dpmpp_2m", "res_multistep").
        scheduler: the schedule when ``sigmas`` is None: "flux2" (FLUX.2's, the default) or
            "simple" (ComfyUI's KSampler "simple" on FLUX.2).

    Returns:
        (B, 128, H/16, W/16) float32 normalised latents (decode with ``Flux2VAE.decode``).

    Raises:
        InputError: bad size, embeddings, references, denoise, noise shape, sampler or scheduler.
        GenerationCancelled: the callback returned True.
    """
    validate_size(width, height)
    solver = make_solver(sampler)
    cfg = transformer.config
    _check_embeds("prompt_embeds", prompt_embeds, cfg.context_dim)
    device = torch.device(device) if device is not None else prompt_embeds.device
    plan = plan_guidance(cfg, guidance)
    b = prompt_embeds.shape[0]
    neg = None
    if plan.mode == "cfg":
        if negative_prompt_embeds is None:
            raise InputError(
                f"{cfg.variant} is a base (undistilled) model that "
                "needs true CFG: pass negative_prompt_embeds (the encoding of the empty prompt "
                '"" if you have no negative prompt), or set guidance to 1 to disable CFG.'
            )
        _check_embeds("negative_prompt_embeds", negative_prompt_embeds, cfg.context_dim)
        _check_batch("negative_prompt_embeds", negative_prompt_embeds, b)
        neg = negative_prompt_embeds.to(device).expand(b, -1, -1)

    if sigmas is None:
        steps = plan.default_steps if steps is None else int(steps)
        if steps < 1:
            raise InputError(f"steps must be >= 1, got {steps}.")
    h, w = height // DOWNSCALE, width // DOWNSCALE
    if sigmas is not None:
        schedule = [float(v) for v in sigmas]
    else:
        schedule = schedule_sigmas(scheduler, steps, h * w)
    if len(schedule) < 2:
        raise InputError(f"sigmas needs at least 2 values (start and end), got {len(schedule)}.")
    first = 0
    if init_latents is not None:
        first = start_index(len(schedule) - 1, denoise)
    elif denoise != 1.0:
        raise InputError("denoise < 1 needs init_latents (the VAE-encoded input image).")

    shape = (b, LATENT_CHANNELS, h, w)
    if noise is None:
        noise = make_noise(shape, seed, device)
    elif tuple(noise.shape) != shape:
        raise InputError(f"noise has shape {tuple(noise.shape)}; expected {shape} for {width}x{height}.")
    x = noise.to(device, torch.float32)
    if init_latents is not None:
        if init_latents.ndim != 4 or tuple(init_latents.shape[1:]) != shape[1:]:
            raise InputError(
                f"init_latents has shape {tuple(init_latents.shape)}; expected (B, "
                f"{LATENT_CHANNELS}, {h}, {w}) for {width}x{height}."
            )
        _check_batch("init_latents", init_latents, b)
        s0 = schedule[first]
        x = s0 * x + (1.0 - s0) * init_latents.to(device, torch.float32).expand(b, -1, -1, -1)

    refs = None
    if reference_latents:
        tokens, ids = reference_tokens([r.to(device) for r in reference_latents], b)
        refs = (tokens.float(), ids)

    velocity = _Velocity(
        transformer,
        plan,
        prompt_embeds.to(device),
        neg,
        image_ids(h, w, batch=b, device=device),
        refs,
        device,
    )
    x = pack(x)  # (B, N, 128)
    total = len(schedule) - 1 - first
    run = schedule[first:]  # a multistep solver's history starts with the first step run
    logger.debug(
        "sampling %dx%d, %d steps of %s (%s guidance), %d reference tokens",
        width,
        height,
        total,
        sampler,
        plan.mode,
        0 if refs is None else refs[0].shape[1],
    )
    try:
        with torch.no_grad():
            for i in range(total):
                s, s_next = run[i], run[i + 1]
                v = velocity(x, s)
                denoised = x - s * v
                x = solver.step(x, v, run, i)
                if callback is not None:
                    info = StepInfo(i + 1, total, s, s_next, unpack(denoised, h, w), unpack(x, h, w))
                    if callback(info) is True:
                        raise GenerationCancelled(
                            f"Generation cancelled by the progress callback after step {i + 1} of "
                            f"{total}; no result was produced."
                        )
    finally:
        velocity.release()
    return unpack(x, h, w)
