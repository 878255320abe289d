"""Optional packages of the safety tools, imported only when a check or mark is asked for.

The pack runs without them; asking for a watermark, a C2PA manifest or the NSFW classifier without
the package installed raises ``MissingPackageError`` naming the package and the pip command.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from ..errors import Flux2Error

# module -> (PyPI package, the version the tests run against)
PACKAGES = {
    "imwatermark": ("invisible-watermark", "0.2.0"),
    "c2pa": ("c2pa-python", "0.38.1"),
    "cv2": ("opencv-python", None),
    "transformers": ("transformers", None),
    "cryptography": ("cryptography", None),
}


class MissingPackageError(Flux2Error, ImportError):
    """An optional package that a safety feature needs is not installed."""


def require(module: str, purpose: str) -> ModuleType:
    """Imports ``module`` or raises ``MissingPackageError`` saying how to install it.

    Args:
        module: the import name (a key of ``PACKAGES``).
        purpose: what needs it, for the message (e.g. "the invisible watermark").

    Returns:
        The imported module.
    """
    try:
        return importlib.import_module(module)
    except ImportError as e:
        package, version = PACKAGES.get(module, (module, None))
        spec = f"{package}=={version}" if version else package
        raise MissingPackageError(
            f"{purpose} needs the Python package '{package}' (import {module}), which is not installed "
            f"({e}). Install it into ComfyUI's Python: `python -m pip install {spec}` (or `pip install -r "
            "requirements-safety.txt` in the Flux2Local folder), then restart ComfyUI."
        ) from None
