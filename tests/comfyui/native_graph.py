"""A small builder for API-format prompts that mix our nodes with ComfyUI's, and latent read-back."""

from __future__ import annotations

import re

import torch
from safetensors.torch import load_file


class Graph:
    """``g.add(class_type, **inputs) -> [id, 0]``; ``g.out(ref, n)`` picks output n of a node."""

    def __init__(self, tag: str):
        self.tag = tag
        self.nodes: dict[str, dict] = {}

    def add(self, class_type: str, **inputs) -> list:
        node_id = f"n{len(self.nodes)}"
        self.nodes[node_id] = {"class_type": class_type, "inputs": inputs}
        return [node_id, 0]

    @staticmethod
    def out(ref: list, n: int) -> list:
        return [ref[0], n]

    def save(self, name: str, samples: list) -> None:
        self.add("SaveLatent", samples=samples, filename_prefix=f"latents/{self.tag}_{name}")

    # --- our nodes -------------------------------------------------------------------------------
    def model(self, file: str) -> list:
        return self.add(
            "Flux2LocalModelLoader",
            model_name=file,
            dtype="fp32",
            keep_fp8=True,
            vram_budget_gb=0.0,
            pinned_ram_gb=0.0,
        )

    def encode(self, te_file: str, prompt: str, negative: str = "") -> list:
        te = self.add(
            "Flux2LocalTextEncoderLoader", text_encoder_name=te_file, tokenizer="auto", dtype="fp32"
        )
        return self.add(
            "Flux2LocalEncodePrompt",
            text_encoder=te,
            prompt=prompt,
            negative_prompt=negative,
            upsample_prompt=False,
            upsample_seed=0,
            upsample_max_tokens=512,
        )

    def sampler(self, model, cond, size, seed, steps, guidance, **extra) -> list:
        w, h = size
        return self.add(
            "Flux2LocalSampler",
            model=model,
            conditioning=cond,
            width=w,
            height=h,
            seed=seed,
            steps=steps,
            guidance=guidance,
            denoise=1.0,
            **extra,
        )

    # --- ComfyUI's nodes -------------------------------------------------------------------------
    def custom_advanced(self, guider, size, seed, steps, sampler="euler") -> list:
        w, h = size
        return self.add(
            "SamplerCustomAdvanced",
            noise=self.add("RandomNoise", noise_seed=seed),
            guider=guider,
            sampler=self.add("KSamplerSelect", sampler_name=sampler),
            sigmas=self.add("Flux2Scheduler", steps=steps, width=w, height=h),
            latent_image=self.empty(size),
        )

    def ksampler(
        self, model, positive, negative, size, seed, steps, cfg, sampler="euler", scheduler="simple"
    ):
        return self.add(
            "KSampler",
            model=model,
            seed=seed,
            steps=steps,
            cfg=cfg,
            sampler_name=sampler,
            scheduler=scheduler,
            positive=positive,
            negative=negative,
            latent_image=self.empty(size),
            denoise=1.0,
        )

    def empty(self, size) -> list:
        w, h = size
        return self.add("EmptyFlux2LatentImage", width=w, height=h, batch_size=1)


def read_latent(comfy, tag: str, name: str) -> torch.Tensor:
    """The last latent SaveLatent wrote as ``latents/<tag>_<name>`` (counter suffix _00001_ ...)."""
    pattern = re.compile(re.escape(f"{tag}_{name}") + r"_\d+_\.latent$")
    files = sorted(p for p in (comfy.base / "output" / "latents").iterdir() if pattern.match(p.name))
    assert files, f"no latent saved for {tag}_{name}"
    return load_file(str(files[-1]))["latent_tensor"].float()
