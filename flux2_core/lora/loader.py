"""``load_lora``: one safetensors LoRA file in any common FLUX.2 format -> ``Flux2LoRA``.

Tensors stay views of the memory-mapped file until a LoRA is applied, so loading costs no RAM.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import torch

from ..checkpoint.safetensors_file import SafetensorsFile
from ..errors import CheckpointError
from .factors import Delta, Kron, LowRank, loha_as_low_rank, swap_rows
from .foreign import FLUX1_SHAPE_PROBLEM, describe_foreign, flux1_shape
from .keys import UNSUPPORTED_ROLES, WIDTH_DIM, Target, layer_kind, resolve_module, split_key

logger = logging.getLogger(__name__)

_LIST = 8  # keys listed in errors
_EXAMPLES = 5  # keys shown in the partial-match warning
_PEFT_METADATA = "lora_adapter_metadata"
_PEFT_PREFIXES = ("transformer.", "base_model.model.")
_LOKR_ROLES = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
_LOHA_ROLES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")


@dataclass(frozen=True, eq=False)
class Flux2LoRA:
    """A LoRA mapped onto the FLUX.2 transformer's BFL module names.

    Attributes:
        path: the file.
        format: what the keys looked like, e.g. "kohya / musubi" or "LyCORIS LoKr".
        layers: BFL module path (e.g. "double_blocks.0.img_attn.qkv") -> its updates (q, k and v of a
            fused qkv are three updates on row slices of one layer).
        hidden_size: the model width the factors were made for (None if no layer tells).
        unmatched: file keys that were not used.
    """

    path: str
    format: str
    layers: dict[str, tuple[Delta, ...]]
    hidden_size: int | None = None
    unmatched: tuple[str, ...] = field(default_factory=tuple)

    @property
    def name(self) -> str:
        return os.path.basename(self.path)

    @property
    def num_updates(self) -> int:
        return sum(len(v) for v in self.layers.values())

    def nbytes(self, itemsize: int = 2) -> int:
        """Bytes of the factors once on the compute device in a dtype of ``itemsize`` bytes (bf16: 2)."""
        n = 0
        for deltas in self.layers.values():
            for d in deltas:
                parts = (d.down, d.up) if isinstance(d, LowRank) else (d.w1, d.w2, d.w2_a, d.w2_b)
                n += sum(t.numel() for t in parts if t is not None)
        return n * itemsize

    def __repr__(self) -> str:
        return f"Flux2LoRA({self.name!r}, {self.format}, {len(self.layers)} layers)"


def _refuse_pickle(path: str) -> None:
    """A PyTorch pickle renamed to .safetensors: say so instead of "corrupt header" (never unpickled)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return  # SafetensorsFile reports unreadable files
    # torch.save writes a zip archive (PK\x03\x04); legacy torch.save and plain pickle start with
    # the PROTO opcode 0x80 followed by the protocol number (2-5).
    if head.startswith(b"PK\x03\x04") or (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5):
        raise CheckpointError(
            path,
            "is a PyTorch pickle (.pt/.ckpt/.bin) file with a .safetensors name. Flux2Local never "
            "unpickles files (loading a pickle can run arbitrary code).",
            "download the real .safetensors version of this LoRA, or convert it with a tool you trust.",
        )


class _PeftScales:
    """PEFT scale (lora_alpha / r, per-module patterns) from the ``lora_adapter_metadata`` JSON.

    Pipeline-saved files prefix every entry with the component ("transformer.r"); model-saved files
    do not. Patterns match the way peft's ``get_pattern_key`` does: the pattern equals the module
    name or a dotted suffix of it.
    """

    def __init__(self, metadata: dict[str, str], path: str):
        raw = metadata.get(_PEFT_METADATA)
        self.config: dict = {}
        if raw:
            try:
                config = json.loads(raw)
            except ValueError:
                logger.warning("%s: unreadable %s metadata; LoRA scales default to 1", path, _PEFT_METADATA)
                config = {}
            if isinstance(config, dict):
                for k, v in config.items():
                    for p in _PEFT_PREFIXES:
                        k = k.removeprefix(p)
                    self.config[k] = v

    @staticmethod
    def _pattern(patterns: dict, name: str):
        for key, value in (patterns or {}).items():
            if re.match(rf"(.*\.)?({key})$", name):
                return value
        return None

    def scale(self, module_key: str, rank: int) -> float | None:
        """The scale of one module, or None when the metadata has no alpha."""
        if "lora_alpha" not in self.config:
            return None
        name = module_key
        for p in _PEFT_PREFIXES:
            name = name.removeprefix(p)
        alpha = self._pattern(self.config.get("alpha_pattern"), name)
        alpha = float(self.config["lora_alpha"] if alpha is None else alpha)
        return alpha / (math.sqrt(rank) if self.config.get("use_rslora") else rank)


def _matrix(f: SafetensorsFile, key: str) -> torch.Tensor:
    t = f.get(key)
    if t.dim() != 2:
        raise CheckpointError(
            f.path,
            f"tensor '{key}' has shape {tuple(t.shape)}; FLUX.2 LoRA factors are 2-D matrices (a "
            "convolution LoRA for another model?).",
            "use a LoRA trained for FLUX.2.",
        )
    if not t.dtype.is_floating_point:
        raise CheckpointError(f.path, f"tensor '{key}' is {t.dtype}, not a float LoRA factor.")
    return t


def _build(
    f: SafetensorsFile, module_key: str, roles: dict[str, str], target: Target, peft: _PeftScales
) -> Delta | None:
    """The update of one LoRA module from its tensors (None when it has no factors we apply)."""
    alpha = float(f.get(roles["alpha"]).float().item()) if "alpha" in roles else None
    slot = target.slot
    if "down" in roles or "up" in roles:
        if "down" not in roles or "up" not in roles:
            have, miss = ("up", "down") if "up" in roles else ("down", "up")
            raise CheckpointError(
                f.path,
                f"'{roles[have]}' has no matching {miss} factor (lora_A/lora_down pairs with lora_B/lora_up).",
                "the file is incomplete: download it again or re-export it from the trainer.",
            )
        down, up = _matrix(f, roles["down"]), _matrix(f, roles["up"])
        if down.shape[0] != up.shape[1]:
            raise CheckpointError(
                f.path,
                f"the ranks of '{roles['down']}' {tuple(down.shape)} and '{roles['up']}' {tuple(up.shape)} "
                f"disagree ({down.shape[0]} vs {up.shape[1]}): down is (rank, in), up is (out, rank).",
                "the file is broken: re-export it from the trainer.",
            )
        rank = down.shape[0]
        scale = alpha / rank if alpha is not None else peft.scale(module_key, rank)
        up = swap_rows(up) if slot.swap else up
        return LowRank(down, up, 1.0 if scale is None else scale, slot)
    if any(r in roles for r in _LOHA_ROLES):
        missing = [r for r in _LOHA_ROLES if r not in roles]
        if missing:
            raise CheckpointError(f.path, f"LoHa module '{module_key}' lacks {', '.join(missing)}.")
        w1a, w1b, w2a, w2b = (_matrix(f, roles[r]) for r in _LOHA_ROLES)
        up, down = loha_as_low_rank(w1a, w1b, w2a, w2b)
        scale = alpha / w1b.shape[0] if alpha is not None else 1.0
        return LowRank(down, swap_rows(up) if slot.swap else up, scale, slot)
    if any(r in roles for r in _LOKR_ROLES):
        t = {r: _matrix(f, roles[r]) for r in _LOKR_ROLES if r in roles}
        if "lokr_w1" in t:
            w1, dim = t["lokr_w1"], None
        elif "lokr_w1_a" in t and "lokr_w1_b" in t:
            w1, dim = t["lokr_w1_a"].float() @ t["lokr_w1_b"].float(), t["lokr_w1_b"].shape[0]
        else:
            raise CheckpointError(f.path, f"LoKr module '{module_key}' has no lokr_w1 (or lokr_w1_a/_b).")
        if "lokr_w2" in t:
            w2, w2a, w2b = t["lokr_w2"], None, None
        elif "lokr_w2_a" in t and "lokr_w2_b" in t:
            w2, w2a, w2b, dim = None, t["lokr_w2_a"], t["lokr_w2_b"], t["lokr_w2_b"].shape[0]
        else:
            raise CheckpointError(f.path, f"LoKr module '{module_key}' has no lokr_w2 (or lokr_w2_a/_b).")
        scale = alpha / dim if alpha is not None and dim is not None else 1.0
        return Kron(w1, w2, w2a, w2b, scale, slot, swap=slot.swap)
    return None


def _width(module: str, delta: Delta) -> int | None:
    dim = WIDTH_DIM.get(layer_kind(module))
    if dim is None:
        return None
    return delta.in_features if dim == "in" else delta.out_features * delta.slot.parts


def load_lora(path: str | os.PathLike) -> Flux2LoRA:
    """Read one LoRA file and map it to the transformer's BFL module names.

    Formats: ai-toolkit / BFL (``diffusion_model.`` + lora_A/lora_B), kohya / musubi (``lora_unet_`` +
    lora_down/lora_up + alpha), diffusers / PEFT (``transformer.`` or ``base_model.model.``; q/k/v onto
    row slices of the fused qkv; alpha from ``lora_adapter_metadata``), OneTrainer
    (``lora_transformer_``), bare diffusers or BFL names (DiffSynth), LyCORIS LoKr and LoHa. DoRA files
    are refused (see the error for why).

    Args:
        path: a ``.safetensors`` file.

    Returns:
        The mapped LoRA; keys that map to nothing are logged as a warning and kept in ``unmatched``.

    Raises:
        CheckpointError: not a safetensors file (pickles are refused), a LoRA for another model
            (FLUX.1, SD/SDXL), DoRA, broken factors (ranks that disagree), or no key that maps.
    """
    path = os.fspath(path)
    if os.path.isfile(path):
        _refuse_pickle(path)
    f = SafetensorsFile(path)
    keys = f.keys()
    if not keys:
        raise CheckpointError(path, "holds no tensors.", "pick a LoRA file.")
    foreign = describe_foreign(keys)
    if foreign:
        raise CheckpointError(path, f"is {foreign[0]}.", foreign[1])
    groups: dict[str, dict[str, str]] = defaultdict(dict)
    unmatched: dict[str, str] = {}  # key -> reason
    for k in keys:
        parts = split_key(k)
        if parts is None:
            unmatched[k] = "not a LoRA tensor name"
            continue
        groups[parts[0]][parts[1]] = k
    dora = [roles["dora"] for roles in groups.values() if "dora" in roles]
    if dora:
        raise CheckpointError(
            path,
            f"is a DoRA LoRA ({len(dora)} magnitude tensors, e.g. '{dora[0]}'), which Flux2Local does not "
            "apply: DoRA rescales every row of W + delta by its norm, which needs the full base weights "
            "(streamed and quantized weights never exist whole on the GPU).",
            "export a plain LoRA from the trainer (DoRA off), or use ComfyUI's LoraLoaderModelOnly with "
            "ComfyUI's own FLUX.2 model loader.",
        )
    peft = _PeftScales(f.metadata, path)
    layers: dict[str, list[Delta]] = defaultdict(list)
    labels: Counter[str] = Counter()
    kinds: set[str] = set()
    widths: Counter[int] = Counter()
    for module_key, roles in groups.items():
        target, label = resolve_module(module_key)
        if target is None:
            unmatched.update({k: "no FLUX.2 layer of that name" for k in roles.values()})
            continue
        for role, k in roles.items():
            if role in UNSUPPORTED_ROLES:
                unmatched[k] = UNSUPPORTED_ROLES[role]
        delta = _build(f, module_key, roles, target, peft)
        if delta is None:
            unmatched.update(
                {k: "no LoRA factors for this layer" for k in roles.values() if k not in unmatched}
            )
            continue
        kind = layer_kind(target.module)
        if delta.slot.parts == 1 and flux1_shape(kind, delta.out_features, delta.in_features):
            problem = FLUX1_SHAPE_PROBLEM.format(kind=kind, out=delta.out_features, inp=delta.in_features)
            raise CheckpointError(path, f"is {problem}.", "pick a LoRA trained for FLUX.2.")
        layers[target.module].append(delta)
        labels[label] += 1
        kinds.add("LoKr" if isinstance(delta, Kron) else "LoHa" if "hada_w1_a" in roles else "LoRA")
        if (w := _width(target.module, delta)) is not None:
            widths[w] += 1
    if not layers:
        listed = ", ".join(f"'{k}'" for k in list(keys)[:_LIST])
        more = f" (and {len(keys) - _LIST} more)" if len(keys) > _LIST else ""
        raise CheckpointError(
            path,
            f"no key matches a FLUX.2 transformer layer: {listed}{more}.",
            "pick a LoRA trained for FLUX.2 ([dev] or [klein]); text-encoder-only LoRAs are not supported.",
        )
    if unmatched:
        examples = "; ".join(f"{k} ({why})" for k, why in list(unmatched.items())[:_EXAMPLES])
        logger.warning(
            "%s: %d of %d LoRA keys not loaded (%d layers loaded), e.g. %s",
            path,
            len(unmatched),
            len(keys),
            len(layers),
            examples,
        )
    label = labels.most_common(1)[0][0]
    extra = sorted(kinds - {"LoRA"})
    fmt = f"{label} {'+'.join(extra)}" if extra else label
    hidden = widths.most_common(1)[0][0] if widths else None
    logger.info("loaded LoRA %s: %s, %d layers", os.path.basename(path), fmt, len(layers))
    return Flux2LoRA(path, fmt, {k: tuple(v) for k, v in layers.items()}, hidden, tuple(unmatched))
