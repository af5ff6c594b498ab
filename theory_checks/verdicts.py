"""Verdict rules of the theory checks: how per-seed numbers become PASS / FAIL / INCONCLUSIVE.

All rules need at least :data:`MIN_SEEDS` = 3 seeds; fewer gives INCONCLUSIVE.

- :func:`effect_verdict` (a paired effect per seed, oriented so that the prediction says > 0):
  PASS when the effect is > 0 in every seed AND its mean exceeds the stated threshold;
  FAIL when it is < 0 in a strict majority of seeds; INCONCLUSIVE otherwise (mixed signs, or
  the right sign but an effect too small to count).
- :func:`bound_verdict` (a per-seed measurement that should satisfy a stated bound):
  PASS when every seed satisfies it; FAIL when a strict majority violates the (possibly looser)
  failure bound; INCONCLUSIVE otherwise.
- :func:`combine`: a claim with several parts is PASS when every part passes, FAIL when any
  part fails, INCONCLUSIVE otherwise.

Non-finite numbers never pass: a NaN effect counts as "not the predicted sign" and is reported.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

VERDICTS = ("PASS", "FAIL", "INCONCLUSIVE")
#: a verdict other than INCONCLUSIVE needs at least this many seeds
MIN_SEEDS = 3


@dataclass
class Verdict:
    """A decided verdict: ``verdict`` in VERDICTS, ``agree`` of ``n`` seeds agreeing with the
    prediction, and ``reason``: the rule as applied, with the numbers."""

    verdict: str
    agree: int
    n: int
    reason: str

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {VERDICTS}, got {self.verdict!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _as_values(values: Iterable[float], what: str) -> np.ndarray:
    try:
        arr = np.asarray([float(v) for v in values], dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{what}: expected a sequence of numbers, got {values!r}") from None
    return arr


def _fmt_list(arr: np.ndarray) -> str:
    return "[" + ", ".join(fmt(v) for v in arr) + "]"


def effect_verdict(effects: Iterable[float], min_effect: float, *, what: str = "effect",
                   min_seeds: int = MIN_SEEDS) -> Verdict:
    """Decide from per-seed effects oriented so that the prediction is ``effect > 0``.

    PASS: ``effect > 0`` in every seed and ``mean(effect) > min_effect``.
    FAIL: ``effect < 0`` in a strict majority of seeds.
    INCONCLUSIVE: otherwise, or fewer than ``min_seeds`` seeds. NaN/inf count as not agreeing.
    """
    e = _as_values(effects, "effects")
    if not isinstance(min_effect, (int, float)) or not math.isfinite(min_effect) or min_effect < 0:
        raise ValueError(f"min_effect must be a finite number >= 0, got {min_effect!r}")
    n = int(e.size)
    finite = np.isfinite(e)
    agree = int(np.sum(finite & (e > 0)))
    against = int(np.sum(finite & (e < 0)))
    mean = float(np.mean(e)) if n and finite.all() else math.nan
    desc = f"{what} per seed {_fmt_list(e)}, mean {fmt(mean)}, threshold {fmt(min_effect)}"
    if n < min_seeds:
        return Verdict("INCONCLUSIVE", agree, n, f"only {n} seed(s), need >= {min_seeds}; {desc}")
    if agree == n and mean > min_effect:
        return Verdict("PASS", agree, n, f"predicted sign in {agree}/{n} seeds and mean > threshold; {desc}")
    if against > n / 2:
        return Verdict("FAIL", agree, n, f"opposite sign in {against}/{n} seeds; {desc}")
    why = "mean below threshold" if agree == n else f"predicted sign in only {agree}/{n} seeds"
    if not finite.all():
        why += f"; {int(np.sum(~finite))} non-finite value(s)"
    return Verdict("INCONCLUSIVE", agree, n, f"{why}; {desc}")


def bound_verdict(values: Iterable[float], *, passes: Callable[[float], bool], fails: Callable[[float], bool],
                  what: str, bound: str, fail_bound: str, min_seeds: int = MIN_SEEDS) -> Verdict:
    """Decide from per-seed measurements that should satisfy a bound.

    PASS: ``passes(v)`` for every seed. FAIL: ``fails(v)`` for a strict majority of seeds.
    INCONCLUSIVE: otherwise, or fewer than ``min_seeds`` seeds. ``bound``/``fail_bound`` are the
    bounds in words (e.g. "<= 1e-5") for the reason string. NaN/inf never pass.
    """
    if not callable(passes) or not callable(fails):
        raise ValueError("passes and fails must be callables float -> bool")
    v = _as_values(values, "values")
    n = int(v.size)
    ok = [bool(math.isfinite(x) and passes(float(x))) for x in v]
    bad = [bool(math.isfinite(x) and fails(float(x))) for x in v]
    agree, against = sum(ok), sum(bad)
    desc = f"{what} per seed {_fmt_list(v)} (pass: {bound}; fail: {fail_bound})"
    if n < min_seeds:
        return Verdict("INCONCLUSIVE", agree, n, f"only {n} seed(s), need >= {min_seeds}; {desc}")
    if agree == n:
        return Verdict("PASS", agree, n, f"bound met in {agree}/{n} seeds; {desc}")
    if against > n / 2:
        return Verdict("FAIL", agree, n, f"failure bound hit in {against}/{n} seeds; {desc}")
    return Verdict("INCONCLUSIVE", agree, n, f"bound met in only {agree}/{n} seeds; {desc}")


def combine(parts: Mapping[str, Verdict]) -> Verdict:
    """PASS if every part passes, FAIL if any part fails, INCONCLUSIVE otherwise.

    ``agree``/``n`` are those of the weakest part (fewest agreeing seeds).
    """
    if not parts:
        raise ValueError("combine needs at least one part")
    vs = list(parts.values())
    weakest = min(vs, key=lambda p: (p.agree / p.n) if p.n else 0.0)
    names = {k: p.verdict for k, p in parts.items()}
    listing = ", ".join(f"{k}: {v}" for k, v in names.items())
    if all(p.verdict == "PASS" for p in vs):
        return Verdict("PASS", weakest.agree, weakest.n, f"every part passes ({listing})")
    if any(p.verdict == "FAIL" for p in vs):
        failed = [k for k, p in parts.items() if p.verdict == "FAIL"]
        return Verdict("FAIL", weakest.agree, weakest.n, f"failed part(s) {failed} ({listing})")
    return Verdict("INCONCLUSIVE", weakest.agree, weakest.n, f"not every part decided ({listing})")


def fmt(v: Any) -> str:
    """Compact number formatting for reports (4 significant digits; ints as ints)."""
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v)
    if not math.isfinite(f):
        return str(f)
    if f == 0:
        return "0"
    if abs(f) >= 1e4 or abs(f) < 1e-3:
        return f"{f:.3e}"
    return f"{f:.4g}"


def mean_sd(values: Sequence[float]) -> str:
    """'mean ± sd' of per-seed values."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return "n/a"
    sd = float(np.std(v, ddof=1)) if v.size > 1 else 0.0
    return f"{fmt(float(np.mean(v)))} ± {fmt(sd)}"
