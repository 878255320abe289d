"""Per-block FLOP counts against the counting rule stated in flux2_core/model/flops.py (2 x params x
tokens per linear layer, 4 x T^2 x H for attention)."""

import pytest
import torch

from flux2_core import Flux2Config, Flux2Transformer, block_flops, tokens_for


def _linear_params(module: torch.nn.Module) -> int:
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, torch.nn.Linear))


def test_tokens_for_1024_with_text_and_references():
    assert tokens_for(1024, 1024) == 4096 + 512
    assert tokens_for(1024, 768, text_tokens=512, reference_images=2) == 3 * 64 * 48 + 512
    assert tokens_for(512, 512, reference_tokens=100) == 1024 + 512 + 100


def test_flops_match_formula_on_the_real_block_shapes():
    """2 x (linear params a token passes through) x T + 4 T^2 H, with params taken from the modules."""
    cfg = Flux2Config.from_name("dev").replace(hidden_size=256, num_heads=2, depth=2, depth_single=3)
    with torch.device("meta"):
        model = Flux2Transformer(cfg)
    T, H = 777, cfg.hidden_size
    f = block_flops(cfg, T)
    single_params = _linear_params(model.single_blocks[0])
    double_params = _linear_params(model.double_blocks[0])
    # Section 1's rule for a single block: every token through every weight.
    assert f.single == 2 * single_params * T + 4 * T * T * H
    # A double block holds two streams; a token passes through one of them (half the parameters).
    assert double_params == 2 * single_params
    assert f.double == 2 * (double_params // 2) * T + 4 * T * T * H
    assert f.per_block == (f.double,) * 2 + (f.single,) * 3
    assert f.total == pytest.approx(2 * f.double + 3 * f.single)


def test_dev_at_1024_totals():
    """[dev] at 1024^2: section 1 gives about 3.2e14 with 9% attention, counting 2 x P x T over all
    31.4 B block parameters; counting a double block's tokens through one stream only (half its
    parameters) removes 8 x 0.49 B x 2 x 4608 = 3.6e13, leaving about 2.8e14 with 10% attention."""
    cfg = Flux2Config.from_name("dev")
    T = tokens_for(1024, 1024)
    f = block_flops(cfg, T)
    H, M = cfg.hidden_size, cfg.mlp_hidden
    all_params = cfg.depth * 2 * (4 * H * H + 3 * H * M) + cfg.depth_single * (4 * H * H + 3 * H * M)
    section1 = 2 * all_params * T + (cfg.depth + cfg.depth_single) * 4 * T * T * H
    assert section1 == pytest.approx(3.2e14, rel=0.02)
    overcount = cfg.depth * 2 * (4 * H * H + 3 * H * M) * T
    assert f.total == pytest.approx(section1 - overcount, rel=1e-12)
    assert f.total == pytest.approx(2.82e14, rel=0.01)
    assert f.attention_fraction == pytest.approx(0.103, abs=0.002)


def test_kv_tokens_only_add_attention():
    cfg = Flux2Config.from_name("klein-9b")
    base, kv = block_flops(cfg, 4608), block_flops(cfg, 4608, kv_tokens=4096)
    assert kv.single - base.single == 4 * 4608 * 4096 * cfg.hidden_size


def test_bad_token_counts_raise():
    cfg = Flux2Config.from_name("dev")
    with pytest.raises(ValueError, match="tokens"):
        block_flops(cfg, 0)
    with pytest.raises(ValueError, match="kv_tokens"):
        block_flops(cfg, 10, kv_tokens=-1)
