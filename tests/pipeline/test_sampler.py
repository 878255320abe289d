"""Sampler behaviour: guidance modes, progress/cancel, seeds, explicit noise, image-to-image,
references and input validation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from flux2_core import (
    GenerationCancelled,
    InputError,
    flux2_sigmas,
    generate,
    prepare_reference_latents,
    sample_latents,
)
from flux2_core.sampling import fit_reference, make_noise
from flux2_core.sampling.sampler import start_index
from flux2_core.tiny.transformer import tiny_config

W, H = 64, 48 * 2  # 4 x 6 latent cells


class Recorder(nn.Module):
    """Stand-in transformer honouring the forward contract; records calls.

    Velocity = 0.1 * img + mean(txt) so that conditional and unconditional branches differ.
    """

    def __init__(self, variant: str, zero: bool = False):
        super().__init__()
        self.config = tiny_config(variant)
        self.calls: list[dict] = []
        self.zero = zero

    def forward(
        self,
        *,
        img,
        img_ids,
        txt,
        txt_ids,
        timesteps,
        guidance=None,
        ref_img=None,
        ref_ids=None,
        kv_cache=None,
    ):
        self.calls.append(
            dict(
                n=img.shape[1],
                ids=img_ids.clone(),
                t=timesteps.clone(),
                guidance=guidance,
                txt=txt,
                ref_img=ref_img,
                kv=kv_cache,
            )
        )
        if kv_cache is not None and ref_img is not None:
            kv_cache.num_ref_tokens = ref_img.shape[1]  # what the real model does when filling it
        if self.zero:
            return torch.zeros_like(img)
        return 0.1 * img + txt.mean(dim=(1, 2))[:, None, None]


def _embeds(variant, b=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    ctx = tiny_config(variant).context_dim
    return torch.randn(b, 7, ctx, generator=g), torch.randn(b, 7, ctx, generator=g)


def test_distilled_single_pass_no_guidance():
    m = Recorder("klein-4b")
    pos, _ = _embeds("klein-4b")
    sample_latents(transformer=m, prompt_embeds=pos, width=W, height=H, seed=3)
    assert len(m.calls) == 4  # default 4 steps
    assert all(c["guidance"] is None for c in m.calls)
    sig = flux2_sigmas(4, (W // 16) * (H // 16))
    assert [round(float(c["t"][0]), 6) for c in m.calls] == [round(s, 6) for s in sig[:-1]]


def test_dev_embedded_guidance_default_4():
    m = Recorder("dev")
    pos, _ = _embeds("dev")
    sample_latents(transformer=m, prompt_embeds=pos, width=W, height=H, steps=2)
    assert len(m.calls) == 2
    assert all(float(c["guidance"][0]) == 4.0 for c in m.calls)


def test_base_true_cfg():
    pos, neg = _embeds("klein-base-4b")
    m = Recorder("klein-base-4b")
    noise = make_noise((1, 128, H // 16, W // 16), 0, "cpu")
    out = sample_latents(
        transformer=m,
        prompt_embeds=pos,
        negative_prompt_embeds=neg,
        width=W,
        height=H,
        steps=1,
        guidance=3.0,
        noise=noise,
    )
    assert len(m.calls) == 2 and m.calls[0]["txt"] is not m.calls[1]["txt"]
    x = noise.reshape(1, 128, -1).transpose(1, 2)
    v_c, v_u = 0.1 * x + pos.mean(), 0.1 * x + neg.mean()
    expected = x + (0.0 - 1.0) * (v_u + 3.0 * (v_c - v_u))
    torch.testing.assert_close(out, expected.transpose(1, 2).reshape(out.shape))
    with pytest.raises(InputError, match="negative_prompt_embeds"):
        sample_latents(transformer=m, prompt_embeds=pos, width=W, height=H, steps=1)
    # guidance 1 disables CFG: one pass, no negative needed.
    m.calls.clear()
    sample_latents(transformer=m, prompt_embeds=pos, width=W, height=H, steps=1, guidance=1.0)
    assert len(m.calls) == 1


def test_references_appended_after_target_with_time_offsets():
    m = Recorder("klein-4b")
    pos, _ = _embeds("klein-4b")
    refs = [torch.randn(1, 128, 2, 3), torch.randn(1, 128, 4, 4)]
    out = sample_latents(transformer=m, prompt_embeds=pos, reference_latents=refs, width=W, height=H, steps=1)
    n = (W // 16) * (H // 16)
    c = m.calls[0]
    assert c["n"] == n + 6 + 16 and out.shape == (1, 128, H // 16, W // 16)
    assert c["ids"][0, :n, 0].eq(0).all()
    assert c["ids"][0, n : n + 6, 0].eq(10).all() and c["ids"][0, n + 6 :, 0].eq(20).all()


def test_kv_variant_fills_cache_once_and_releases_it():
    m = Recorder("klein-9b-kv")
    pos, _ = _embeds("klein-9b-kv")
    refs = [torch.randn(1, 128, 2, 3)]
    sample_latents(transformer=m, prompt_embeds=pos, reference_latents=refs, width=W, height=H, steps=3)
    assert m.calls[0]["ref_img"] is not None and m.calls[0]["ref_img"].shape[1] == 6
    assert all(c["ref_img"] is None and c["kv"] is m.calls[0]["kv"] for c in m.calls[1:])
    assert all(c["n"] == (W // 16) * (H // 16) for c in m.calls)  # refs never in img for KV
    assert not m.calls[0]["kv"].filled  # released at the end


def test_callback_and_cancel_leave_no_state():
    pos, _ = _embeds("klein-9b-kv")
    refs = [torch.randn(1, 128, 2, 3)]
    m = Recorder("klein-9b-kv")
    seen = []

    def cancel_at_2(info):
        seen.append(info)
        return info.step == 2

    with pytest.raises(GenerationCancelled, match="step 2 of 4"):
        sample_latents(
            transformer=m,
            prompt_embeds=pos,
            reference_latents=refs,
            width=W,
            height=H,
            seed=5,
            callback=cancel_at_2,
        )
    assert [i.step for i in seen] == [1, 2] and seen[0].total == 4
    assert seen[0].denoised.shape == (1, 128, H // 16, W // 16)
    assert not m.calls[-1]["kv"].filled  # the KV cache was released on cancel
    # A later full run equals a fresh one: nothing was left half-done.
    infos = []
    a = sample_latents(
        transformer=m,
        prompt_embeds=pos,
        reference_latents=refs,
        width=W,
        height=H,
        seed=5,
        callback=infos.append,
    )
    b = sample_latents(
        transformer=Recorder("klein-9b-kv"),
        prompt_embeds=pos,
        reference_latents=refs,
        width=W,
        height=H,
        seed=5,
    )
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    # At the last step sigma_next = 0, so the preview equals the result.
    assert infos[-1].sigma_next == 0.0
    torch.testing.assert_close(infos[-1].denoised, a)


def test_callback_exceptions_propagate():
    pos, _ = _embeds("klein-4b")

    def interrupt(info):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sample_latents(
            transformer=Recorder("klein-4b"), prompt_embeds=pos, width=W, height=H, callback=interrupt
        )


def test_seeds_and_explicit_noise():
    pos, _ = _embeds("klein-4b")

    def run(**kw):
        return sample_latents(transformer=Recorder("klein-4b"), prompt_embeds=pos, width=W, height=H, **kw)

    torch.testing.assert_close(run(seed=7), run(seed=7), rtol=0, atol=0)
    assert (run(seed=7) - run(seed=8)).abs().max() > 0.1
    noise = torch.randn(1, 128, H // 16, W // 16, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(run(noise=noise), run(seed=7), rtol=0, atol=0)  # CPU generator draw
    with pytest.raises(InputError, match="noise has shape"):
        run(noise=torch.zeros(1, 128, 3, 3))


@pytest.mark.gpu
def test_seed_gives_same_noise_on_gpu():
    cpu = make_noise((2, 128, 8, 8), 11, "cpu")
    gpu = make_noise((2, 128, 8, 8), 11, "cuda")
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=0)


def test_image_to_image_starts_at_matching_sigma():
    pos, _ = _embeds("klein-4b")
    m = Recorder("klein-4b", zero=True)  # zero velocity: the result is the blended start point
    init = torch.randn(1, 128, H // 16, W // 16)
    noise = torch.randn(1, 128, H // 16, W // 16)
    seen = []
    out = sample_latents(
        transformer=m,
        prompt_embeds=pos,
        width=W,
        height=H,
        steps=4,
        noise=noise,
        init_latents=init,
        denoise=0.5,
        callback=seen.append,
    )
    sig = flux2_sigmas(4, (W // 16) * (H // 16))
    assert len(m.calls) == 2 and [i.step for i in seen] == [1, 2] and seen[0].total == 2
    assert seen[0].sigma == pytest.approx(sig[2])
    torch.testing.assert_close(out, sig[2] * noise + (1 - sig[2]) * init)
    assert start_index(4, 1.0) == 0 and start_index(4, 0.1) == 3
    with pytest.raises(InputError, match="denoise"):
        sample_latents(transformer=m, prompt_embeds=pos, width=W, height=H, denoise=0.5)
    with pytest.raises(InputError, match="denoise"):
        start_index(4, 1.5)


def test_generate_image_to_image_with_vae(vae):
    pos, _ = _embeds("klein-4b")
    img = torch.rand(1, 3, H, W) * 2 - 1
    out = generate(
        transformer=Recorder("klein-4b", zero=True),
        vae=vae,
        prompt_embeds=pos,
        init_image=img,
        denoise=0.25,
        steps=4,
        seed=1,
    )
    sig = flux2_sigmas(4, (W // 16) * (H // 16))[3]
    expected = vae.decode(
        sig * make_noise((1, 128, H // 16, W // 16), 1, "cpu") + (1 - sig) * vae.encode(img)
    )
    torch.testing.assert_close(out, expected.clamp(-1, 1))


@pytest.mark.parametrize("w, h", [(100, 64), (64, 40), (4096, 2048)])
def test_bad_sizes_rejected(w, h):
    pos, _ = _embeds("klein-4b")
    with pytest.raises(InputError, match="Invalid output size"):
        sample_latents(transformer=Recorder("klein-4b"), prompt_embeds=pos, width=w, height=h)


def test_wrong_text_width_rejected():
    with pytest.raises(InputError, match="feature width"):
        sample_latents(
            transformer=Recorder("klein-4b"), prompt_embeds=torch.zeros(1, 5, 3), width=W, height=H
        )


def test_batch_mismatch_rejected():
    pos, neg = _embeds("klein-base-4b", b=2)
    with pytest.raises(InputError, match="batch size 3"):
        sample_latents(
            transformer=Recorder("klein-base-4b"),
            prompt_embeds=pos,
            width=W,
            height=H,
            negative_prompt_embeds=torch.cat([neg, neg[:1]]),
        )
    with pytest.raises(InputError, match="init_latents has batch size 3"):
        sample_latents(
            transformer=Recorder("klein-base-4b"),
            prompt_embeds=pos,
            negative_prompt_embeds=neg,
            width=W,
            height=H,
            init_latents=torch.zeros(3, 128, H // 16, W // 16),
            denoise=0.5,
        )


def test_eleven_references_rejected(vae):
    images = [torch.zeros(3, 64, 64)] * 11
    with pytest.raises(InputError, match="11 reference images"):
        prepare_reference_latents(vae, images)
    pos, _ = _embeds("klein-4b")
    with pytest.raises(InputError, match="at most 10"):
        sample_latents(
            transformer=Recorder("klein-4b"),
            prompt_embeds=pos,
            width=W,
            height=H,
            reference_latents=[torch.zeros(1, 128, 4, 4)] * 11,
        )
    assert len(prepare_reference_latents(vae, [torch.zeros(3, 64, 64)] * 10)) == 10


def test_reference_fitting():
    img = torch.rand(3, 1500, 2000) * 2 - 1
    out = fit_reference(img, pixel_budget=512 * 512)
    h, w = out.shape[1:]
    assert h % 16 == 0 and w % 16 == 0 and h * w <= 512 * 512
    assert abs(w / h - 2000 / 1500) < 0.05 and w >= 576 and h >= 432
    small = fit_reference(torch.zeros(3, 100, 90))  # never upscaled, only cropped to multiples of 16
    assert small.shape == (3, 96, 80)
    with pytest.raises(InputError, match="reference image 0 .* at least 64"):
        fit_reference(torch.zeros(3, 40, 200))
    with pytest.raises(InputError, match="aspect ratio"):
        fit_reference(torch.zeros(3, 64, 600))
