"""LoRAs for the FLUX.2 transformer: every common file format, applied beside any layer class.

``load_lora(path) -> Flux2LoRA`` reads and maps a file (``lora_from_updates`` builds one from factors
in memory); ``apply_loras(transformer, [(lora, strength), ...])`` applies a stack (on the fly by
default, optionally merged) and ``apply_loras(transformer, [])`` removes it again.
"""

from .apply import applied_loras, apply_loras, check_lora_fits, release_device_copies
from .factors import Kron, LowRank
from .in_memory import lora_from_updates, row_slot
from .keys import Slot
from .loader import Flux2LoRA, load_lora

__all__ = [
    "Flux2LoRA",
    "Kron",
    "LowRank",
    "Slot",
    "applied_loras",
    "apply_loras",
    "check_lora_fits",
    "load_lora",
    "lora_from_updates",
    "release_device_copies",
    "row_slot",
]
