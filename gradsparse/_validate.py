"""One wording for every scalar check: ``"field: what is wrong; allowed: what is allowed"``.

Every public function of gradsparse validates its scalar arguments through these helpers, so a
user mistake reads the same wherever it is made, e.g.::

    width: must be an integer, got -3; allowed: [1, 65536]
    rho: must be a finite number, got nan; allowed: >= 0
    model: unknown value 'cnn'; allowed: mlp, vit, lm

Each helper returns the checked value (converted to ``int`` / ``float``) or raises ValueError.
Booleans are never accepted as numbers.
"""

from __future__ import annotations

import math
from typing import Any, Iterable


def _bounds(lo: float | None, hi: float | None, lo_open: bool = False, hi_open: bool = False) -> str:
    if lo is not None and hi is not None:
        return f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {lo}"
    if hi is not None:
        return f"{'<' if hi_open else '<='} {hi}"
    return "any value"


def check_int(name: str, v: Any, lo: int | None = None, hi: int | None = None) -> int:
    """``v`` as an int in [lo, hi] (either bound optional); ValueError otherwise."""
    if isinstance(v, bool) or not isinstance(v, int) or (lo is not None and v < lo) or (hi is not None and v > hi):
        raise ValueError(f"{name}: must be an integer, got {v!r}; allowed: {_bounds(lo, hi)}")
    return int(v)


def check_float(name: str, v: Any, lo: float | None = None, hi: float | None = None, *,
                lo_open: bool = False, hi_open: bool = False) -> float:
    """``v`` as a finite float in [lo, hi] (``lo_open``/``hi_open`` exclude the bound); ValueError otherwise."""
    ok = not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)
    if ok and lo is not None:
        ok = v > lo if lo_open else v >= lo
    if ok and hi is not None:
        ok = v < hi if hi_open else v <= hi
    if not ok:
        raise ValueError(f"{name}: must be a finite number, got {v!r}; allowed: {_bounds(lo, hi, lo_open, hi_open)}")
    return float(v)


def check_bool(name: str, v: Any) -> bool:
    """``v`` when it is True or False; ValueError otherwise (no truthiness)."""
    if not isinstance(v, bool):
        raise ValueError(f"{name}: must be true or false, got {v!r}; allowed: true, false")
    return v


def check_choice(name: str, v: Any, allowed: Iterable[str]) -> str:
    """``v`` when it is one of ``allowed``; ValueError listing them otherwise."""
    allowed = tuple(allowed)
    if not isinstance(v, str) or v not in allowed:
        raise ValueError(f"{name}: unknown value {v!r}; allowed: {', '.join(allowed)}")
    return v
