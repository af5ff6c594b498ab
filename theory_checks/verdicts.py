"""Verdict rules of the theory checks: how per-seed numbers become PASS / FAIL / INCONCLUSIVE.

**Effect parts** (:func:`effect_verdict`): per-seed paired effects e_1..e_n, oriented so that the
prediction says e > 0, and a minimal effect ``delta`` > 0 fixed in the check's code BEFORE the
run, with its stated source (a pilot run, MP at the measured c, a physical argument). With mean
m, sample sd s, SE = s / sqrt(n) and the one-sided 95% t quantile t = t_{0.95, n-1}:

- PASS when the lower bound m - t SE > 0 AND m > delta;
- FAIL when the upper bound m + t SE < delta: the data EXCLUDE the predicted effect size (this
  covers both "no effect" and "the opposite effect"; the latter is flagged when m + t SE < 0);
- INCONCLUSIVE otherwise (and with fewer than :data:`MIN_SEEDS` seeds or non-finite values).

Each effect part reports mean, the one-sided bounds, seeds, and the minimal detectable effect
MDE = (t_{0.95, n-1} + t_{0.80, n-1}) SE: the smallest true effect the rule passes 80% of the
time given the seed spread. Under a true effect of 0 the rule passes at most 5% of the time, and
under a true effect of exactly delta it fails at most 5% of the time (tests/test_checks.py checks
both, and the bounds' coverage, on 2000 simulated seed sets).

**Bound parts** (:func:`bound_verdict`, identities and sandwiches that hold per seed): PASS when
every seed satisfies the bound; FAIL when a strict majority violates the stated failure bound;
INCONCLUSIVE otherwise.

**Several parts** (:func:`combine`): a check names its ``primary`` part, whose verdict is the
check's (the others are reported); or, without a primary, PASS needs every part to pass (an
intersection-union test: no correction needed) and FAIL needs a part whose FAIL survives Holm's
correction over the effect parts' FAIL tests (p = P(T <= (m - delta)/SE), alpha 0.05), or a
failed bound part; INCONCLUSIVE otherwise.

**Regime gates** (:class:`Gate`): a check's premise as numbers, computed on the control or
baseline arm over all seeds, with thresholds fixed in code; a gate is never a function of the
quantity the verdict tests. When a gate fails, the check is INCONCLUSIVE "regime not reached".
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
from scipy import stats

VERDICTS = ("PASS", "FAIL", "INCONCLUSIVE")
#: a verdict other than INCONCLUSIVE needs at least this many seeds
MIN_SEEDS = 3
#: one-sided level of the effect rule's bounds
ALPHA = 0.05
#: power at which the minimal detectable effect is stated
POWER = 0.8


@dataclass
class Verdict:
    """A decided verdict: ``verdict`` in VERDICTS, ``agree`` of ``n`` seeds agreeing with the
    prediction, ``reason``: the rule as applied, with the numbers. Effect parts also carry
    ``mean``, ``lo``/``hi`` (one-sided 95% bounds), ``delta``, ``mde``, ``p_fail`` (for Holm)."""

    verdict: str
    agree: int
    n: int
    reason: str
    kind: str = "bound"
    mean: float | None = None
    lo: float | None = None
    hi: float | None = None
    delta: float | None = None
    mde: float | None = None
    p_fail: float | None = None
    source: str | None = None
    #: per-seed values the verdict was decided from (for the leave-one-seed-out boundary flag)
    values: list[float] | None = None
    #: bound parts: per seed, whether the pass bound / the failure bound was met
    seed_ok: list[bool] | None = None
    seed_bad: list[bool] | None = None
    #: margin parts: the pre-registered margin
    margin: float | None = None
    #: set by the judge: "primary", "context" or "implementation"; and the leave-one-seed-out flag
    role: str | None = None
    near_boundary: str | None = None

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


def t_bounds(values: Sequence[float], alpha: float = ALPHA) -> tuple[float, float, float, float]:
    """(mean, SE, lower, upper) of per-seed values: one-sided (1 - alpha) t bounds m -/+ t SE."""
    e = np.asarray(values, dtype=np.float64)
    n = e.size
    if n < 2 or not np.all(np.isfinite(e)):
        return math.nan, math.nan, math.nan, math.nan
    m, se = float(e.mean()), float(e.std(ddof=1) / math.sqrt(n))
    t = float(stats.t.ppf(1 - alpha, n - 1))
    return m, se, m - t * se, m + t * se


def min_detectable_effect(se: float, n: int, alpha: float = ALPHA, power: float = POWER) -> float:
    """(t_{1-alpha} + t_{power}) SE with n - 1 degrees of freedom: the true effect the PASS bound
    clears with probability ~``power``."""
    if n < 2 or not math.isfinite(se):
        return math.nan
    return float((stats.t.ppf(1 - alpha, n - 1) + stats.t.ppf(power, n - 1)) * se)


def effect_verdict(effects: Iterable[float], delta: float, *, what: str = "effect", source: str = "",
                   min_seeds: int = MIN_SEEDS) -> Verdict:
    """Decide from per-seed effects oriented so that the prediction is ``effect > 0`` (module docstring).

    ``delta`` > 0 is the minimal effect (fixed before the run; ``source`` says where it comes from).
    """
    e = _as_values(effects, "effects")
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not math.isfinite(delta) or delta <= 0:
        raise ValueError(f"delta: must be a finite number, got {delta!r}; allowed: > 0 (the minimal effect, "
                         "stated before the run)")
    n = int(e.size)
    finite = np.isfinite(e)
    agree = int(np.sum(finite & (e > 0)))
    m, se, lo, hi = t_bounds(e)
    mde = min_detectable_effect(se, n)
    p_fail = float(stats.t.cdf((m - delta) / se, n - 1)) if n >= 2 and se > 0 and math.isfinite(se) else \
        (0.0 if math.isfinite(m) and n >= 2 and m < delta else 1.0)
    src = f" (delta from {source})" if source else ""
    desc = (f"{what} per seed {_fmt_list(e)}, mean {fmt(m)}, one-sided 95% bounds [{fmt(lo)}, {fmt(hi)}], "
            f"delta {fmt(delta)}{src}, MDE {fmt(mde)}")
    kw = dict(kind="effect", mean=m, lo=lo, hi=hi, delta=float(delta), mde=mde, p_fail=p_fail, source=source or None,
              values=[float(x) for x in e])
    if n < min_seeds:
        return Verdict("INCONCLUSIVE", agree, n, f"only {n} seed(s), need >= {min_seeds}; {desc}", **kw)
    if not finite.all():
        return Verdict("INCONCLUSIVE", agree, n, f"{int(np.sum(~finite))} non-finite value(s); {desc}", **kw)
    if lo > 0 and m > delta:
        return Verdict("PASS", agree, n, f"lower bound > 0 and mean > delta; {desc}", **kw)
    if hi < delta:
        flag = "; opposite sign (upper bound < 0)" if hi < 0 else ""
        return Verdict("FAIL", agree, n, f"upper bound < delta: the data exclude the predicted effect{flag}; {desc}",
                       **kw)
    why = "mean below delta" if lo > 0 else "lower bound <= 0"
    return Verdict("INCONCLUSIVE", agree, n, f"{why} and upper bound >= delta; {desc}", **kw)


def bound_verdict(values: Iterable[float], *, passes: Callable[[float], bool], fails: Callable[[float], bool],
                  what: str, bound: str, fail_bound: str, min_seeds: int = MIN_SEEDS, kind: str = "bound") -> Verdict:
    """Decide from per-seed measurements that should satisfy a bound.

    PASS: ``passes(v)`` for every seed. FAIL: ``fails(v)`` for a strict majority of seeds.
    INCONCLUSIVE: otherwise, or fewer than ``min_seeds`` seeds. ``bound``/``fail_bound`` are the
    bounds in words (e.g. "<= 1e-5") for the reason string. NaN/inf never pass.

    ``kind``: "exact" for identities and algebraic bounds whose thresholds are float tolerances
    (they may decide an implementation check); "bound" (default) for judgement thresholds, which
    carry no error control: the judge never lets such a part decide a verdict (context only).
    """
    if kind not in ("bound", "exact"):
        raise ValueError(f"kind: got {kind!r}; allowed: bound (a judgement threshold), exact (a float tolerance)")
    if not callable(passes) or not callable(fails):
        raise ValueError("passes and fails must be callables float -> bool")
    v = _as_values(values, "values")
    n = int(v.size)
    ok = [bool(math.isfinite(x) and passes(float(x))) for x in v]
    bad = [bool(math.isfinite(x) and fails(float(x))) for x in v]
    agree, against = sum(ok), sum(bad)
    desc = f"{what} per seed {_fmt_list(v)} (pass: {bound} in every seed; fail: {fail_bound} in a majority)"
    mean = float(np.mean(v)) if n else None
    kw = dict(kind=kind, mean=mean, values=[float(x) for x in v], seed_ok=ok, seed_bad=bad)
    return _bound_decision(agree, against, n, min_seeds, desc, kw)


def _bound_decision(agree: int, against: int, n: int, min_seeds: int, desc: str, kw: dict[str, Any]) -> Verdict:
    if n < min_seeds:
        return Verdict("INCONCLUSIVE", agree, n, f"only {n} seed(s), need >= {min_seeds}; {desc}", **kw)
    if agree == n:
        return Verdict("PASS", agree, n, f"bound met in {agree}/{n} seeds; {desc}", **kw)
    if against > n / 2:
        return Verdict("FAIL", agree, n, f"failure bound hit in {against}/{n} seeds; {desc}", **kw)
    return Verdict("INCONCLUSIVE", agree, n, f"bound met in only {agree}/{n} seeds; {desc}", **kw)


def margin_verdict(harms: Iterable[float], margin: float, *, what: str = "harm", source: str = "",
                   min_seeds: int = MIN_SEEDS) -> Verdict:
    """A non-inferiority test with error control: per-seed ``harms`` (e.g. a loss increase; the
    prediction is that the harm stays below ``margin``), one-sided 95% t bounds over seeds.

    PASS when the upper bound < margin (the data exclude a harm >= margin); FAIL when the lower
    bound > margin (the data exclude a harm below the margin); INCONCLUSIVE otherwise. Each
    direction errs at most 5% at the boundary (harm = margin). ``p_fail`` = P(T >= (m - margin)/SE),
    the one-sided p-value of "harm <= margin", so such FAILs enter Holm's correction like effect
    parts. ``margin`` > 0 is fixed before the run (``source`` says where it comes from).
    """
    h = _as_values(harms, "harms")
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin) or margin <= 0:
        raise ValueError(f"margin: must be a finite number, got {margin!r}; allowed: > 0 (the largest acceptable "
                         "harm, stated before the run)")
    n = int(h.size)
    finite = np.isfinite(h)
    agree = int(np.sum(finite & (h < margin)))
    m, se, lo, hi = t_bounds(h)
    p_fail = float(stats.t.sf((m - margin) / se, n - 1)) if n >= 2 and se > 0 and math.isfinite(se) else \
        (0.0 if math.isfinite(m) and n >= 2 and m > margin else 1.0)
    src = f" (margin from {source})" if source else ""
    desc = (f"{what} per seed {_fmt_list(h)}, mean {fmt(m)}, one-sided 95% bounds [{fmt(lo)}, {fmt(hi)}], "
            f"margin {fmt(margin)}{src}")
    kw = dict(kind="margin", mean=m, lo=lo, hi=hi, margin=float(margin), p_fail=p_fail, source=source or None,
              values=[float(x) for x in h], mde=min_detectable_effect(se, n))
    if n < min_seeds:
        return Verdict("INCONCLUSIVE", agree, n, f"only {n} seed(s), need >= {min_seeds}; {desc}", **kw)
    if not finite.all():
        return Verdict("INCONCLUSIVE", agree, n, f"{int(np.sum(~finite))} non-finite value(s); {desc}", **kw)
    if hi < margin:
        return Verdict("PASS", agree, n, f"upper bound < margin: a harm >= margin is excluded; {desc}", **kw)
    if lo > margin:
        return Verdict("FAIL", agree, n, f"lower bound > margin: the data exclude a harm below the margin; {desc}",
                       **kw)
    return Verdict("INCONCLUSIVE", agree, n, f"the bounds straddle the margin; {desc}", **kw)


def redecide(v: Verdict, keep: Sequence[int], min_seeds: int = 2) -> Verdict:
    """The verdict ``v`` would have on the seeds at positions ``keep`` (same rule, same delta or
    margin or bounds; ``min_seeds`` lowered to 2 so that leaving one seed out of 3 still decides).
    Parts without stored per-seed values are returned unchanged."""
    if v.kind == "effect" and v.values is not None and v.delta is not None:
        return effect_verdict([v.values[i] for i in keep], v.delta, min_seeds=min_seeds)
    if v.kind == "margin" and v.values is not None and v.margin is not None:
        return margin_verdict([v.values[i] for i in keep], v.margin, min_seeds=min_seeds)
    if v.kind in ("bound", "exact") and v.seed_ok is not None and v.seed_bad is not None:
        ok = [v.seed_ok[i] for i in keep]
        bad = [v.seed_bad[i] for i in keep]
        return _bound_decision(sum(ok), sum(bad), len(keep), min_seeds, "", dict(kind=v.kind))
    return v


def holm_rejections(pvalues: Sequence[float], alpha: float = ALPHA) -> list[bool]:
    """Holm's step-down procedure: which of the hypotheses are rejected at family-wise level alpha."""
    p = np.asarray(pvalues, dtype=np.float64)
    order = np.argsort(p)
    rej = np.zeros(p.size, dtype=bool)
    for rank, i in enumerate(order):
        if p[i] <= alpha / (p.size - rank):
            rej[i] = True
        else:
            break
    return rej.tolist()


def combine(parts: Mapping[str, Verdict], primary: str | Sequence[str] | None = None) -> Verdict:
    """The check's verdict from its parts (module docstring).

    ``primary``: one part name (its verdict is the check's) or a set of names: the verdict then
    comes from those parts ONLY (the others are reported beside it, never decide it) by the rule
    below. Without ``primary`` every part enters. PASS when every deciding part passes; FAIL when a
    deciding part's FAIL survives Holm's correction over the deciding effect and margin parts, or
    an "exact" bound part fails; a FAIL of a judgement bound part (kind "bound": no error control)
    never fails the check; INCONCLUSIVE otherwise.

    ``agree``/``n`` are those of the primary part, else of the weakest deciding part.
    """
    if not parts:
        raise ValueError("combine needs at least one part")
    listing = ", ".join(f"{k}: {p.verdict}" for k, p in parts.items())
    if isinstance(primary, str):
        if primary not in parts:
            raise ValueError(f"primary: unknown part {primary!r}; allowed: {', '.join(parts)}")
        p = parts[primary]
        return dataclasses.replace(p, reason=f"primary part {primary}: {p.verdict} ({listing}); {p.reason}")
    if primary is not None:
        primary = list(primary)
        unknown = [k for k in primary if k not in parts]
        if unknown or not primary:
            raise ValueError(f"primary: unknown or empty part set {unknown or primary!r}; allowed: {', '.join(parts)}")
        context = [k for k in parts if k not in primary]
        decided = combine({k: parts[k] for k in primary})
        extra = f"; parts that do not decide: {', '.join(f'{k}: {parts[k].verdict}' for k in context)}" \
            if context else ""
        return dataclasses.replace(decided, reason=f"deciding parts (the plan's primaries): {decided.reason}{extra}")
    vs = list(parts.values())
    weakest = min(vs, key=lambda p: (p.agree / p.n) if p.n else 0.0)
    if all(p.verdict == "PASS" for p in vs):
        return Verdict("PASS", weakest.agree, weakest.n, f"every part passes ({listing})")
    effect = [(k, p) for k, p in parts.items() if p.kind in ("effect", "margin") and p.p_fail is not None]
    holm = dict(zip([k for k, _ in effect], holm_rejections([p.p_fail for _, p in effect]))) if effect else {}
    failed = [k for k, p in parts.items()
              if p.verdict == "FAIL" and (holm.get(k, False) if p.kind in ("effect", "margin") else p.kind != "bound")]
    if failed:
        return Verdict("FAIL", weakest.agree, weakest.n,
                       f"failed part(s) {failed} after Holm's correction over {len(effect)} effect part(s) ({listing})")
    unheld = [k for k, p in parts.items() if p.verdict == "FAIL" and p.kind in ("effect", "margin")]
    judged = [k for k, p in parts.items() if p.verdict == "FAIL" and p.kind == "bound"]
    extra = f"; FAIL of {unheld} does not survive Holm's correction" if unheld else ""
    extra += (f"; FAIL of {judged} is a judgement bound without error control and decides nothing" if judged else "")
    return Verdict("INCONCLUSIVE", weakest.agree, weakest.n, f"not every part decided ({listing}){extra}")


@dataclass
class Gate:
    """A regime premise as a number: ``value`` must satisfy ``op`` ``threshold`` (``op`` in
    '<', '<=', '>', '>='). ``what`` says what it measures and on which arm."""

    name: str
    value: float
    op: str
    threshold: float
    what: str = ""

    def __post_init__(self) -> None:
        if self.op not in ("<", "<=", ">", ">="):
            raise ValueError(f"op: unknown value {self.op!r}; allowed: <, <=, >, >=")

    @property
    def ok(self) -> bool:
        v, t = float(self.value), float(self.threshold)
        if not math.isfinite(v):
            return False
        return {"<": v < t, "<=": v <= t, ">": v > t, ">=": v >= t}[self.op]

    def describe(self) -> str:
        return f"{self.name} = {fmt(self.value)} (needs {self.op} {fmt(self.threshold)}{'; ' + self.what if self.what else ''})"

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "ok": self.ok}


def gated(verdict: Verdict, gates: Sequence[Gate]) -> Verdict:
    """``verdict`` unchanged when every gate holds, else INCONCLUSIVE "regime not reached: <numbers>"."""
    bad = [g for g in gates if not g.ok]
    if not bad:
        return verdict
    return dataclasses.replace(verdict, verdict="INCONCLUSIVE",
                               reason="regime not reached: " + "; ".join(g.describe() for g in bad)
                               + f" (the measured verdict would be {verdict.verdict}: {verdict.reason})")


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
