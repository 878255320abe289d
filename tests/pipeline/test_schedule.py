"""Schedule values, position ids, packing and size validation."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

from flux2_core import InputError, flux2_sigmas, nearest_valid_size, validate_size
from flux2_core.sampling import MAX_PIXELS, MIN_SIDE, image_ids, pack, reference_tokens, text_ids, unpack
from flux2_core.sampling.schedule import empirical_mu


def test_sigmas_4_steps_1024():
    s = flux2_sigmas(4, (1024 // 16) ** 2)
    assert len(s) == 5
    np.testing.assert_allclose(s, [1.0, 0.9674, 0.9081, 0.7672, 0.0], atol=5e-5)


def test_mu_examples_and_jump():
    assert empirical_mu(4096, 4) == pytest.approx(2.291, abs=1e-3)
    assert empirical_mu(4096, 50) == pytest.approx(2.023, abs=1e-3)
    assert empirical_mu(16384, 4) == pytest.approx(3.230, abs=1e-3)
    # The fit switches to the 200-step line above 4300 tokens (a property of the published formula).
    assert empirical_mu(4300, 4) - empirical_mu(4301, 4) > 1.0


@pytest.mark.parametrize("steps, tokens", [(4, 4096), (50, 4096), (28, 16384), (3, 24), (1, 256)])
def test_sigmas_match_diffusers_scheduler(steps, tokens):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

    sch = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, shift=3.0)
    sch.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=compute_empirical_mu(tokens, steps))
    np.testing.assert_allclose(flux2_sigmas(steps, tokens), sch.sigmas.numpy(), atol=1e-6)


def test_bad_steps():
    with pytest.raises(ValueError):
        flux2_sigmas(0, 4096)


def test_ids():
    t = text_ids(2, 5)
    assert t.shape == (2, 5, 4)
    assert t[1, 3].tolist() == [0, 0, 0, 3]
    i = image_ids(2, 3)
    assert i.shape == (1, 6, 4)
    assert i[0].tolist() == [
        [0, 0, 0, 0],
        [0, 0, 1, 0],
        [0, 0, 2, 0],
        [0, 1, 0, 0],
        [0, 1, 1, 0],
        [0, 1, 2, 0],
    ]


def test_reference_tokens_time_offsets():
    refs = [torch.randn(1, 128, 2, 2), torch.randn(1, 128, 1, 3), torch.randn(1, 128, 1, 1)]
    tok, ids = reference_tokens(refs, batch=2)
    assert tok.shape == (2, 4 + 3 + 1, 128) and ids.shape == (2, 8, 4)
    assert ids[0, :, 0].tolist() == [10] * 4 + [20] * 3 + [30]
    assert ids[0, 4:7, 1:].tolist() == [[0, 0, 0], [0, 1, 0], [0, 2, 0]]  # own grid from (0, 0)
    torch.testing.assert_close(tok[1, 4:7], pack(refs[1])[0])


def test_pack_unpack_roundtrip():
    x = torch.randn(2, 128, 3, 5)
    p = pack(x)
    assert p.shape == (2, 15, 128)
    torch.testing.assert_close(p[0, 5 + 2], x[0, :, 1, 2])  # row-major
    torch.testing.assert_close(unpack(p, 3, 5), x)


@pytest.mark.parametrize("w, h", [(1000, 1024), (1024, 1000), (48, 1024), (2064, 2048), (4096, 1040)])
def test_bad_sizes(w, h):
    with pytest.raises(InputError, match=f"{w}x{h}") as e:
        validate_size(w, h)
    assert "Fix:" in str(e.value)


@pytest.mark.parametrize("w, h", [(64, 64), (1024, 1024), (2048, 2048), (4096, 1024), (1360, 768)])
def test_good_sizes(w, h):
    validate_size(w, h)


def _suggested(w: int, h: int) -> tuple[int, int]:
    with pytest.raises(InputError) as e:
        validate_size(w, h)
    found = re.search(r"Fix: use e\.g\. (\d+)x(\d+)", str(e.value))
    assert found, str(e.value)
    return int(found[1]), int(found[2])


# Too large (square, wide, tall, just over), not multiples of 16, too small, and sizes a client could
# send that no widget allows; plus a seeded spread of random ones.
_rng = np.random.default_rng(7)
BAD_SIZES = [(8192, 8192), (4096, 4096), (2064, 2048), (4096, 1040), (1000, 1024), (1023, 777), (48, 1024)]
BAD_SIZES += [(8192, 512 + 16), (30, 30), (100000, 100), (10, 10_000_000), (3000, 2000), (2560, 1700)]
BAD_SIZES += [tuple(int(v) for v in _rng.integers(16, 9000, 2)) for _ in range(60)]


@pytest.mark.parametrize(
    "w, h", [s for s in BAD_SIZES if s[0] % 16 or s[1] % 16 or min(s) < 64 or s[0] * s[1] > MAX_PIXELS]
)
def test_size_suggestion_is_valid_and_keeps_the_shape(w, h):
    sw, sh = _suggested(w, h)
    validate_size(sw, sh)  # the suggestion itself is accepted
    assert nearest_valid_size(sw, sh) == (sw, sh)  # and left alone
    if min(w, h) * math.sqrt(min(1.0, MAX_PIXELS / (w * h))) >= 4 * MIN_SIDE:
        # No side had to be raised to 64: the aspect ratio moves only by the rounding to 16 pixels.
        assert abs(math.log((sw / sh) / (w / h))) <= 2 * 16 / min(sw, sh) + 1e-9, (sw, sh)
    if w * h > MAX_PIXELS:
        # Scaled down to fit, not further than the rounding needs.
        assert sw * sh >= MAX_PIXELS * (1 - 2 * 16 / min(sw, sh)), (sw, sh)
    elif min(w, h) >= MIN_SIDE:
        assert abs(sw - w) < 16 and abs(sh - h) < 16, (sw, sh)


def test_valid_sizes_are_their_own_suggestion():
    for w, h in [(64, 64), (1024, 1024), (2048, 2048), (64, 65536), (1360, 768)]:
        validate_size(w, h)
        assert nearest_valid_size(w, h) == (w, h)
