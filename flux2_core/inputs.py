"""Checks of user-supplied values shared by the library API and the ComfyUI nodes.

Clients can send what a form never would: JSON allows ``NaN`` (and a range check ``value < min``
is False for NaN, so it passes), and JSON strings may hold lone UTF-16 surrogates that no text
encoding accepts. Both are refused here with a message naming the input.
"""

from __future__ import annotations

import math

from .errors import InputError


def check_finite(where: str, **values: float | int | None) -> None:
    """Raise ``InputError`` naming the first of ``values`` that is NaN or infinite.

    Args:
        where: who is asking, for the message (e.g. "FLUX.2 Sampler").
        **values: setting name -> value; None is skipped (an optional setting left out).
    """
    for name, value in values.items():
        if value is None:
            continue
        try:
            ok = math.isfinite(value)
        except TypeError:
            raise InputError(f"{where}: {name} must be a number, got {value!r}.") from None
        if not ok:
            raise InputError(
                f"{where}: {name} is {value}; it must be a finite number. Fix: enter a number within "
                "the input's range."
            )


def check_text(where: str, name: str, text: object) -> str:
    """Return ``text`` if it is a string that can be encoded as UTF-8, else raise ``InputError``.

    A lone surrogate (e.g. the JSON escape ``"\\ud800"`` without its pair) is not a character: no
    tokenizer can read it.
    """
    if not isinstance(text, str):
        raise InputError(f"{where}: {name} is a {type(text).__name__}, not text.")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InputError(
            f"{where}: {name} contains a lone UTF-16 surrogate (U+{ord(text[e.start]):04X}) at character "
            f"{e.start}, which is not valid text. Fix: remove it or send the complete character."
        ) from None
    return text
