"""Load a FLUX.2 VAE from a BFL, ComfyUI or diffusers checkpoint (config inferred from key shapes)."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import torch

from ..checkpoint import open_checkpoint
from ..checkpoint.assign import check_tensors
from ..checkpoint.identify import FLUX2_VAE, identify, wrong_model
from ..checkpoint.keys import count_blocks
from ..errors import CheckpointError
from .config import Flux2VAEConfig
from .keymap import IGNORED_SUFFIXES, bfl_to_diffusers_key, is_attention_projection, strip_prefix
from .model import Flux2VAE

logger = logging.getLogger(__name__)

_FIX_PICK_VAE = (
    "Select the FLUX.2 VAE: 'ae.safetensors' from a FLUX.2 repo, ComfyUI's "
    "'flux2-vae.safetensors', or a diffusers FLUX.2 folder (with 'vae/')."
)


def _refuse_foreign(path: str, keys: list[str], get_shape) -> None:
    """Raise a CheckpointError that names what the file is when it is not a FLUX.2 VAE."""
    kind = identify(keys, get_shape)
    if kind is not None and kind.key == FLUX2_VAE:
        return
    raise wrong_model(
        path,
        kind,
        "the FLUX.2 VAE (32 channels + latent batch-norm)",
        _FIX_PICK_VAE,
        "no 'decoder.conv_in.weight' / 'bn.running_mean'",
    )


def infer_config(shape_of, keys: list[str], path: str) -> Flux2VAEConfig:
    """Architecture from BFL-named key shapes.

    Args:
        shape_of: callable BFL key -> shape.
        keys: the file's keys in BFL naming.
        path: for error messages.
    """
    try:
        ch = shape_of("encoder.conv_in.weight")[0]
        levels = count_blocks(keys, "encoder.down.")
        res = count_blocks(keys, "encoder.down.0.block.")
        enc = [shape_of(f"encoder.down.{i}.block.0.conv1.weight")[0] for i in range(levels)]
        dec = [shape_of(f"decoder.up.{i}.block.0.conv1.weight")[0] for i in range(levels)]
        z = shape_of("decoder.conv_in.weight")[1]
        dec_res = count_blocks(keys, "decoder.up.0.block.")
    except KeyError as e:
        raise CheckpointError(
            path,
            f"misses the VAE key {e.args[0]!r}: the file is incomplete or not a FLUX.2 VAE.",
            _FIX_PICK_VAE,
        ) from None
    if any(w % ch for w in enc) or dec_res != res + 1:
        raise CheckpointError(
            path,
            f"has an unexpected VAE structure (encoder widths {enc}, "
            f"{res} encoder / {dec_res} decoder blocks per level).",
            _FIX_PICK_VAE,
        )
    dec_ch = math.gcd(*dec)
    try:
        return Flux2VAEConfig(
            ch=ch,
            ch_mult=tuple(w // ch for w in enc),
            num_res_blocks=res,
            z_channels=z,
            decoder_ch=None if dec == enc else dec_ch,
            decoder_ch_mult=None if dec == enc else tuple(w // dec_ch for w in dec),
        )
    except ValueError as e:
        raise CheckpointError(path, f"has VAE shapes this loader cannot build: {e}", _FIX_PICK_VAE) from None


def load_vae(
    path: str | os.PathLike, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu"
) -> Flux2VAE:
    """Load the FLUX.2 VAE.

    Args:
        path: ``ae.safetensors`` (BFL), ``flux2-vae.safetensors`` (ComfyUI), a diffusers ``vae/``
            folder or a diffusers pipeline folder containing ``vae/``.
        dtype: parameter dtype (the latent statistics stay float32).
        device: where to put the model.

    Returns:
        A ``Flux2VAE`` in eval mode with ``.checkpoint_format`` set to "bfl", "comfyui" or "diffusers".

    Raises:
        CheckpointError: the file is not a FLUX.2 VAE (FLUX.1/SDXL VAEs, transformers, text encoders),
            or keys/shapes do not match.
    """
    reader = open_checkpoint(path, subfolder="vae")
    where = str(path)
    keys = [k for k in reader.keys() if not k.endswith(IGNORED_SUFFIXES)]
    is_diffusers = any(k.startswith("encoder.down_blocks.") for k in keys)
    if is_diffusers:
        prefix, inner = "", keys
        fmt = "diffusers"
    else:
        prefix, inner = strip_prefix(keys)
        fmt = (
            "comfyui" if prefix or any(k.endswith("bn.num_batches_tracked") for k in reader.keys()) else "bfl"
        )
        if not prefix:
            _refuse_foreign(where, inner, lambda k: reader.shape(k))

    # Our (BFL) name -> key in the file.
    if is_diffusers:
        levels = count_blocks(keys, "encoder.down_blocks.")
        bfl_names = _diffusers_to_bfl_names(inner, levels, where)
    else:
        bfl_names = {k: prefix + k for k in inner}
    if "bn.running_mean" not in bfl_names or "decoder.conv_in.weight" not in bfl_names:
        _refuse_foreign(where, list(bfl_names), lambda k: reader.shape(bfl_names[k]))

    cfg = infer_config(lambda k: reader.shape(bfl_names[k]), list(bfl_names), where)
    if is_diffusers and os.path.isdir(reader.path):
        cfg = apply_diffusers_config(cfg, Path(reader.path) / "config.json")
    with torch.device("meta"):
        model = Flux2VAE(cfg)
    own_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}

    def provided_shape(name: str) -> tuple[int, ...]:
        shape = tuple(reader.shape(bfl_names[name]))
        # diffusers stores the attention projections as Linear (C, C); ours are 1x1 convs (C, C, 1, 1)
        if (
            name in own_shapes
            and is_attention_projection(name)
            and math.prod(shape) == math.prod(own_shapes[name])
        ):
            return own_shapes[name]
        return shape

    check_tensors(
        where,
        "the FLUX.2 VAE layout",
        own_shapes,
        {name: provided_shape(name) for name in bfl_names},
        fix=_FIX_PICK_VAE,
    )

    state: dict[str, torch.Tensor] = {}
    for name, file_key in bfl_names.items():
        t = reader.get(file_key)
        if tuple(t.shape) != own_shapes[name]:
            t = t.reshape(own_shapes[name])  # diffusers Linear (C, C) -> 1x1 conv (C, C, 1, 1)
        target = torch.float32 if name.startswith("bn.") else dtype
        state[name] = t.to(device=device, dtype=target)
    model.load_state_dict(state, strict=True, assign=True)
    model.eval().requires_grad_(False)
    model.checkpoint_format = fmt
    logger.info("loaded FLUX.2 VAE (%s layout, ch %d, %s) from %s", fmt, cfg.ch, dtype, where)
    return model


def _config_checks(cfg: Flux2VAEConfig) -> dict[str, object]:
    """diffusers ``AutoencoderKLFlux2`` config keys -> the value the weights (or this model) fix."""
    same_decoder = cfg.decoder_widths == cfg.encoder_widths
    return {
        "latent_channels": cfg.z_channels,
        "block_out_channels": list(cfg.encoder_widths),
        "decoder_block_out_channels": None if same_decoder else list(cfg.decoder_widths),
        "layers_per_block": cfg.num_res_blocks,
        "patch_size": [cfg.patch, cfg.patch],
        # what the architecture always has (other values would need another model)
        "in_channels": 3,
        "out_channels": 3,
        "act_fn": "silu",
        "mid_block_add_attention": True,
        "use_quant_conv": True,
        "use_post_quant_conv": True,
    }


def apply_diffusers_config(cfg: Flux2VAEConfig, config_path: Path) -> Flux2VAEConfig:
    """Settings a diffusers ``vae/config.json`` holds that the weights' shapes cannot tell.

    ``norm_num_groups`` and ``batch_norm_eps`` change the computation without changing any shape;
    every other key is checked against the shapes (a config that contradicts the weights means a
    mixed-up folder). Without a ``config.json`` the published defaults stay.

    Raises:
        CheckpointError: the JSON is broken, contradicts the weights, or asks for something this
            model cannot do.
    """
    if not config_path.is_file():
        return cfg
    fix = "Download the VAE's config.json again, or remove it to use the published FLUX.2 settings."
    try:
        data = json.loads(config_path.read_text())
        if not isinstance(data, dict):
            raise ValueError("not an object")
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(config_path, f"is not a readable diffusers config.json ({e}).", fix) from None
    for key, expected in _config_checks(cfg).items():
        if key not in data:
            continue
        value = list(data[key]) if isinstance(data[key], (list, tuple)) else data[key]
        if key == "decoder_block_out_channels" and value == list(cfg.encoder_widths):
            value = None  # the same as giving none
        if value != expected:
            raise CheckpointError(
                config_path,
                f"says {key} = {data[key]!r}, but the weights next to it (or this FLUX.2 VAE) have {expected!r}.",
                fix,
            )
    groups = data.get("norm_num_groups", cfg.norm_groups)
    eps = data.get("batch_norm_eps", cfg.bn_eps)
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        raise CheckpointError(
            config_path, f"has norm_num_groups = {groups!r}; expected a positive integer.", fix
        )
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not (math.isfinite(eps) and eps > 0):
        raise CheckpointError(config_path, f"has batch_norm_eps = {eps!r}; expected a positive number.", fix)
    try:
        return cfg.replace(norm_groups=groups, bn_eps=float(eps))
    except ValueError as e:
        raise CheckpointError(config_path, f"has settings the weights do not allow: {e}", fix) from None


def _diffusers_to_bfl_names(keys: list[str], levels: int, where: str) -> dict[str, str]:
    """Map every BFL name of a model with ``levels`` levels to the diffusers key present in ``keys``."""
    # Build the inverse map from a meta model whose structure we take from the file's block counts.
    res = count_blocks(keys, "encoder.down_blocks.0.resnets.")
    ch_mult = tuple(range(1, levels + 1))  # placeholder widths: only the key names matter here
    cfg = Flux2VAEConfig(ch=32, ch_mult=ch_mult, num_res_blocks=max(res, 1))
    with torch.device("meta"):
        names = list(Flux2VAE(cfg).state_dict().keys())
    present = set(keys)
    out: dict[str, str] = {}
    for name in names:
        d = bfl_to_diffusers_key(name, levels)
        if d in present:
            out[name] = d
    mapped = set(out.values())
    extra = sorted(present - mapped)
    if extra:
        raise CheckpointError(
            where, f"has diffusers VAE keys this loader does not know: {extra[:8]}.", _FIX_PICK_VAE
        )
    return out
