"""How a checkpoint's weights are stored: storage type -> fraction of the parameters."""

from __future__ import annotations

from collections.abc import Iterable


def quant_summary(entries: Iterable[tuple[str, int]]) -> dict[str, float]:
    """Fractions of parameters per storage type.

    Args:
        entries: (storage type, number of values) per weight tensor, e.g. ("Q4_K", 37748736).

    Returns:
        Storage type -> fraction of all values, largest first (fractions sum to 1).
    """
    totals: dict[str, int] = {}
    for storage, n in entries:
        totals[storage] = totals.get(storage, 0) + int(n)
    grand = sum(totals.values()) or 1
    return {k: v / grand for k, v in sorted(totals.items(), key=lambda kv: (-kv[1], kv[0]))}


def format_quant_summary(summary: dict[str, float]) -> str:
    """One line such as "Q4_K 61%, Q6_K 30%, F32 9%" (types under 0.5% shown as "<1%")."""
    parts = []
    for storage, frac in sorted(summary.items(), key=lambda kv: -kv[1]):
        pct = frac * 100
        parts.append(f"{storage} {pct:.0f}%" if pct >= 0.5 else f"{storage} <1%")
    return ", ".join(parts)
