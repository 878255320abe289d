"""LoRAs built from factors in memory: equal blocks, arbitrary row ranges, swapped halves, Kron."""

from __future__ import annotations

import pytest
import torch

from flux2_core import CheckpointError, InputError, apply_loras, load_transformer
from flux2_core.lora import Kron, LowRank, Slot, lora_from_updates, row_slot
from flux2_core.lora.factors import swap_rows

from .conftest import make_inputs, merged_reference, rel_err


def test_row_slot_picks_equal_blocks_or_a_start_row():
    assert row_slot(0, 12, 12) == Slot()
    assert row_slot(8, 4, 12) == Slot(2, 3)
    assert row_slot(6, 6, 12, swap=True) == Slot(1, 2, swap=True)
    assert row_slot(3, 6, 9) == Slot(start=3)  # 3 % 6 != 0: not an equal block


def test_updates_on_row_ranges_equal_the_merged_weights(tiny_models):
    path = tiny_models("dev")
    model = load_transformer(path, dtype=torch.float32)
    cfg = model.config
    hidden, g = cfg.hidden_size, torch.Generator().manual_seed(5)

    def rand(*shape):
        return torch.randn(*shape, generator=g) * 0.05

    lin1 = model.single_blocks[0].linear1  # rows: q, k, v (hidden each), then the MLP's 2 x mlp_hidden
    mlp_rows = lin1.out_features - 3 * hidden
    mod = model.double_blocks[0].img_attn.qkv
    final = model.final_layer.adaLN_modulation[1]
    up_mlp, down_mlp = rand(mlp_rows, 3), rand(3, lin1.in_features)
    up_k, down_k = rand(hidden, 2), rand(2, mod.in_features)
    fw1, fw2 = rand(2, 2), rand(final.out_features // 2, final.in_features // 2)
    w1, w2 = rand(2, 4), rand(hidden // 2, mod.in_features // 4)
    layers = {
        "single_blocks.0.linear1": [
            LowRank(down_mlp, up_mlp, 0.5, row_slot(3 * hidden, mlp_rows, lin1.out_features))
        ],
        "double_blocks.0.img_attn.qkv": [
            LowRank(down_k, up_k, 2.0, row_slot(hidden, hidden, mod.out_features)),
            Kron(w1, w2, None, None, 0.7, row_slot(2 * hidden, hidden, mod.out_features)),
        ],
        # (shift, scale) halves stored the other way round, as diffusers stores norm_out; a LowRank's
        # up rows are given in BFL order already, a Kron's product is swapped when applied.
        "final_layer.adaLN_modulation.1": [
            Kron(
                fw1,
                fw2,
                None,
                None,
                1.0,
                row_slot(0, final.out_features, final.out_features, True),
                swap=True,
            )
        ],
    }
    lora = lora_from_updates("test patches", layers)
    assert lora.layers["single_blocks.0.linear1"][0].slot.start == 3 * hidden

    full = torch.zeros(lin1.out_features, lin1.in_features)
    full[3 * hidden :] = 0.5 * up_mlp @ down_mlp
    qkv = torch.zeros(mod.out_features, mod.in_features)
    qkv[hidden : 2 * hidden] = 2.0 * up_k @ down_k
    qkv[2 * hidden :] = 0.7 * torch.kron(w1, w2)
    deltas = {
        "single_blocks.0.linear1": full,
        "double_blocks.0.img_attn.qkv": qkv,
        "final_layer.adaLN_modulation.1": swap_rows(torch.kron(fw1, fw2)),
    }
    x = make_inputs(cfg)
    with torch.no_grad():
        base = model(**x)
        want = merged_reference(path, [(deltas, 0.6)])(**x)
        apply_loras(model, [(lora, 0.6)])
        got = model(**x)
    assert rel_err(want, base) > 1e-3  # the updates matter
    assert rel_err(got, want) < 1e-5
    apply_loras(model, [])
    with torch.no_grad():
        assert torch.equal(model(**x), base)


def test_bad_updates_are_refused(tiny_models):
    model = load_transformer(tiny_models("dev"), dtype=torch.float32)
    mod = model.double_blocks[0].img_attn.qkv
    with pytest.raises(InputError, match="no LoRA updates"):
        lora_from_updates("empty", {})
    with pytest.raises(InputError, match="different ranks"):
        lora_from_updates(
            "x", {"double_blocks.0.img_attn.qkv": [LowRank(torch.zeros(2, 4), torch.zeros(4, 3), 1, Slot())]}
        )
    # a row range past the end of the layer
    past = LowRank(torch.zeros(2, mod.in_features), torch.zeros(8, 2), 1.0, Slot(start=mod.out_features - 4))
    with pytest.raises(CheckpointError, match="rows"):
        apply_loras(model, [(lora_from_updates("past", {"double_blocks.0.img_attn.qkv": [past]}), 1.0)])
