"""Pre-registration of a theory check: the plan written before any training, and the judge that
applies it to what the check measured.

A check declares, as a pure function of (preset, parameters), its :class:`CheckPlan`:

- ``arms``: the runs it trains (:class:`ArmPlan`: a name and the full training config; the seed
  is replaced by each of the check's seeds; ``start`` names the arm a finetune starts from);
- ``parts``: what it will judge (:class:`PartPlan`): kind ("effect", "margin", "exact" or
  "bound"), role ("primary", "context" or "implementation"), delta or margin with its source,
  the gates the part needs, and, for primaries, WHY the mechanism makes this the test;
- ``gates``: the regime premises as numbers (:class:`GatePlan`), each naming the arms it is
  computed on; a part listing a gate is INCONCLUSIVE with the gate's numbers when it fails.

:func:`theory_checks.suite.run_checks` writes every selected check's plan to ``DIR/plan.json``
before the first run and prints its SHA-256 in report.md. :func:`judge` then decides a check
from the plan alone: the measured parts must be exactly the planned ones, with the planned
deltas, margins and gate thresholds (a mismatch is an error, never a silent change); each part
is gated by ITS gates; the verdict comes from the primary parts (or, in an implementation
check, the implementation parts) through :func:`theory_checks.verdicts.combine`. Context parts
are reported beside it and never decide it. Judgement bounds (kind "bound": thresholds without
error control) may only be context.

Leave-one-seed-out (:func:`boundary_flags`): a part, or the check, is flagged "near the
boundary" when removing any one seed would change its verdict (the remaining seeds decided by
the same rule with at least 2 seeds).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from gradsparse.io import json_ready
from theory_checks.verdicts import Gate, Verdict, combine, gated, redecide

KINDS = ("effect", "margin", "exact", "bound")
ROLES = ("primary", "context", "implementation")
OPS = ("<", "<=", ">", ">=")


@dataclass(frozen=True)
class ArmPlan:
    """One training config of a check (all seeds): ``config`` is ``TrainConfig.to_dict()``;
    ``start``: the arm this one finetunes from (its run depends on that run)."""

    name: str
    config: dict[str, Any]
    start: str | None = None
    note: str = ""


@dataclass(frozen=True)
class GatePlan:
    """A regime premise: the measured value must satisfy ``op threshold``; ``arms``: the arms it
    is computed on (per-arm gates: one gate per arm that enters a comparison)."""

    name: str
    op: str
    threshold: float
    what: str
    arms: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ValueError(f"gate {self.name}: op {self.op!r}; allowed: {', '.join(OPS)}")
        if not math.isfinite(float(self.threshold)):
            raise ValueError(f"gate {self.name}: threshold must be finite, got {self.threshold!r}")


@dataclass(frozen=True)
class PartPlan:
    """A part of a check's claim, fixed before the run.

    ``kind``: effect (:func:`~theory_checks.verdicts.effect_verdict`, ``delta``), margin
    (:func:`~theory_checks.verdicts.margin_verdict`, ``delta`` is the margin), exact (a float
    tolerance) or bound (a judgement threshold: context only). ``role``: primary, context or
    implementation. ``gates``: names of the check's gates this part needs (None: all of them).
    ``why``: for a primary, the mechanism that makes it the test; for context, why it does not
    decide."""

    name: str
    kind: str
    role: str
    what: str
    delta: float | None = None
    source: str = ""
    gates: tuple[str, ...] | None = None
    why: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"part {self.name}: kind {self.kind!r}; allowed: {', '.join(KINDS)}")
        if self.role not in ROLES:
            raise ValueError(f"part {self.name}: role {self.role!r}; allowed: {', '.join(ROLES)}")
        if self.kind in ("effect", "margin"):
            if self.delta is None or not math.isfinite(float(self.delta)) or float(self.delta) <= 0:
                raise ValueError(f"part {self.name}: a {self.kind} part needs a finite delta > 0, got {self.delta!r}")
            if not self.source.strip():
                raise ValueError(f"part {self.name}: say where delta {self.delta} comes from (source=...)")
        if self.kind == "bound" and self.role != "context":
            raise ValueError(f"part {self.name}: a judgement bound has no error control and may only be context; "
                             "make it an effect or margin part to let it decide")
        if self.role == "primary" and not self.why.strip():
            raise ValueError(f"part {self.name}: a primary part says why the mechanism makes it the test (why=...)")


@dataclass
class CheckPlan:
    """Everything a check fixes before it trains (module docstring)."""

    arms: list[ArmPlan]
    parts: list[PartPlan]
    gates: list[GatePlan] = field(default_factory=list)
    #: how many seeds this check uses (None: the context's); more where a part sits near its boundary
    seeds: int | None = None
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        names = [p.name for p in self.parts]
        if len(set(names)) != len(names):
            raise ValueError(f"plan: duplicate part names {sorted(n for n in names if names.count(n) > 1)}")
        arms = [a.name for a in self.arms]
        if len(set(arms)) != len(arms):
            raise ValueError(f"plan: duplicate arm names {arms}")
        gnames = {g.name for g in self.gates}
        for p in self.parts:
            unknown = [g for g in (p.gates or ()) if g not in gnames]
            if unknown:
                raise ValueError(f"part {p.name}: unknown gate(s) {unknown}; planned gates: {sorted(gnames)}")
        for g in self.gates:
            bad = [a for a in g.arms if a not in arms]
            if bad:
                raise ValueError(f"gate {g.name}: unknown arm(s) {bad}; planned arms: {arms}")
        for a in self.arms:
            if a.start is not None and a.start not in arms:
                raise ValueError(f"arm {a.name}: starts from unknown arm {a.start!r}")
        if not any(p.role in ("primary", "implementation") for p in self.parts):
            raise ValueError("plan: at least one part must be primary (or implementation, for an implementation check)")

    @property
    def section(self) -> str:
        """"implementation" when no part is primary (identities, unit-level checks), else "theory"."""
        return "theory" if any(p.role == "primary" for p in self.parts) else "implementation"

    @property
    def deciding(self) -> list[str]:
        role = "primary" if self.section == "theory" else "implementation"
        return [p.name for p in self.parts if p.role == role]

    def part(self, name: str) -> PartPlan:
        for p in self.parts:
            if p.name == name:
                return p
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return json_ready({"section": self.section, "seeds": self.seeds, "deciding": self.deciding,
                           "arms": [dataclasses.asdict(a) for a in self.arms],
                           "parts": [dataclasses.asdict(p) for p in self.parts],
                           "gates": [dataclasses.asdict(g) for g in self.gates], "notes": list(self.notes)})


def plan_bytes(plans: Mapping[str, Any]) -> bytes:
    """The canonical bytes of a plan file (sorted keys, no spaces variation): what is hashed."""
    return (json.dumps(json_ready(plans), sort_keys=True, indent=1) + "\n").encode()


def plan_sha256(plans: Mapping[str, Any]) -> str:
    return hashlib.sha256(plan_bytes(plans)).hexdigest()


def _same(a: float, b: float) -> bool:
    return math.isclose(float(a), float(b), rel_tol=1e-12, abs_tol=1e-15)


def check_against_plan(plan: CheckPlan, parts: Mapping[str, Verdict], gates: Sequence[Gate]) -> None:
    """ValueError unless the measured ``parts`` and ``gates`` are exactly the planned ones, with the
    planned kinds, deltas/margins, ops and thresholds (nothing decided after the run)."""
    planned = [p.name for p in plan.parts]
    extra = [k for k in parts if k not in planned]
    missing = [k for k in planned if k not in parts]
    if extra or missing:
        raise ValueError(f"measured parts differ from the plan: not planned {extra}, planned but not measured {missing}")
    for pp in plan.parts:
        v = parts[pp.name]
        if v.kind != pp.kind:
            raise ValueError(f"part {pp.name}: measured as kind {v.kind!r}, planned {pp.kind!r}")
        got = v.delta if pp.kind == "effect" else v.margin if pp.kind == "margin" else None
        if pp.kind in ("effect", "margin") and (got is None or not _same(got, pp.delta)):
            raise ValueError(f"part {pp.name}: measured with delta {got}, planned {pp.delta}")
    gp = {g.name: g for g in plan.gates}
    for g in gates:
        if g.name not in gp:
            raise ValueError(f"gate {g.name} was not planned; planned gates: {sorted(gp)}")
        if g.op != gp[g.name].op or not _same(g.threshold, gp[g.name].threshold):
            raise ValueError(f"gate {g.name}: measured with {g.op} {g.threshold}, planned {gp[g.name].op} "
                             f"{gp[g.name].threshold}")


def _gate_parts(plan: CheckPlan, parts: Mapping[str, Verdict], gates: Sequence[Gate]) -> dict[str, Verdict]:
    by = {g.name: g for g in gates}
    out: dict[str, Verdict] = {}
    for pp in plan.parts:
        names = [g.name for g in plan.gates] if pp.gates is None else list(pp.gates)
        missing = [n for n in names if n not in by]
        v = parts[pp.name]
        if missing:
            v = dataclasses.replace(v, verdict="INCONCLUSIVE",
                                    reason=f"gate(s) {missing} not measured (the measured verdict would be "
                                           f"{v.verdict}: {v.reason})")
        else:
            v = gated(v, [by[n] for n in names])
        out[pp.name] = dataclasses.replace(v, role=pp.role)
    return out


def boundary_flags(parts: Mapping[str, Verdict], deciding: Sequence[str]) -> tuple[dict[str, str], str | None]:
    """Leave-one-seed-out: {part: flag} for the parts whose verdict changes when any one seed is
    removed, and the check-level flag (the deciding parts re-combined without that seed).

    Gated parts are not re-decided (their gate, not the seeds, set the verdict)."""
    flags: dict[str, str] = {}
    n = max((p.n for p in parts.values()), default=0)
    check_flag = None
    if n < 3:
        return flags, check_flag
    full = combine({k: parts[k] for k in deciding}).verdict
    for drop in range(n):
        keep = [i for i in range(n) if i != drop]
        redone: dict[str, Verdict] = {}
        for k, v in parts.items():
            if v.reason.startswith("regime not reached") or v.reason.startswith("gate(s)") or v.n != n:
                redone[k] = v
                continue
            r = redecide(v, keep)
            redone[k] = r
            if r.verdict != v.verdict and k not in flags:
                flags[k] = f"near the boundary: without seed #{drop} it is {r.verdict}"
        now = combine({k: redone[k] for k in deciding}).verdict
        if now != full and check_flag is None:
            check_flag = f"near the boundary: without seed #{drop} the verdict is {now}"
    return flags, check_flag


def judge(plan: CheckPlan, parts: Mapping[str, Verdict], gates: Sequence[Gate]) -> tuple[Verdict, dict[str, Verdict]]:
    """(the check's verdict, its gated parts with roles and boundary flags) by the plan
    (module docstring). Raises ValueError when the measurement does not match the plan."""
    check_against_plan(plan, parts, gates)
    gp = _gate_parts(plan, parts, gates)
    flags, check_flag = boundary_flags(gp, plan.deciding)
    gp = {k: dataclasses.replace(v, near_boundary=flags.get(k)) for k, v in gp.items()}
    verdict = combine(gp, primary=plan.deciding)
    role = "primary" if plan.section == "theory" else "implementation"
    verdict = dataclasses.replace(verdict, near_boundary=check_flag, role=role)
    return verdict, gp


def arm(name: str, cfg: Any, *, start: str | None = None, note: str = "") -> ArmPlan:
    """An :class:`ArmPlan` from a TrainConfig (its seed is a placeholder: each seed replaces it)."""
    d = dict(cfg.to_dict())
    d.pop("seed", None)
    return ArmPlan(name, d, start=start, note=note)
