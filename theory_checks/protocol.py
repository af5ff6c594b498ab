"""The protocol of a theory check (SPEC 5): what a check module defines and returns.

A check (one module per claim, ``theory_checks/gNN_*.py``) defines ``CHECK = Check(...)`` with

- ``name`` ("G3"), ``slug`` (its module name), ``title``, ``claim``: the prediction in one sentence;
- ``rule``: the verdict rule in words (the code that applies it is in the check's ``run``);
- ``presets``: ``{"smoke": {...}, "quick": {...}, "full": {...}}`` of parameters (steps, width, ...);
- ``plan(preset, params) -> CheckPlan``: the pre-registration (:mod:`theory_checks.plan`): arms,
  parts (primary / context / implementation, deltas and their sources), gates; written to
  ``plan.json`` before any training, and the only thing the verdict is decided by;
- ``run(ctx, params) -> Finding``: trains what it needs through
  :meth:`theory_checks.context.Context.train` (which calls :func:`gradsparse.train.train`; no check
  has its own training loop), measures, and decides with :mod:`theory_checks.verdicts`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from gradsparse.io import json_ready
from theory_checks.verdicts import Gate, Verdict

#: smoke: the test suite's code-path run (not evidence); quick: the README's main job (~15 min on
#: 2 CPU cores, 3 seeds); standard: 5 seeds and the full protocols at CPU sizes (< 90 min on 2
#: cores); full: sized for a GPU (runs anywhere)
PRESETS = ("smoke", "quick", "standard", "full")
#: default number of seeds per preset
PRESET_SEEDS = {"smoke": 3, "quick": 3, "standard": 5, "full": 5}


@dataclass
class Finding:
    """What a check's ``run`` returns.

    ``verdict``: ignored when the check has a plan (the judge decides from the plan's primary
    parts; pass None); ``measured``: one line with the key numbers;
    ``per_seed``: {metric: [value per seed]}; ``numbers``: {name: summary number};
    ``parts``: {part name: Verdict} for multi-part claims; ``series``: JSON-ready data for
    figures (see ``gradsparse.figures``); ``notes``: free-text remarks (settings, caveats);
    ``gates``: the regime premises (:class:`theory_checks.verdicts.Gate`) — when one fails the
    check is INCONCLUSIVE "regime not reached"; ``model``: what was trained (named in the report).
    """

    verdict: Verdict | None
    measured: str
    per_seed: dict[str, list[float]] = field(default_factory=dict)
    numbers: dict[str, float] = field(default_factory=dict)
    parts: dict[str, Verdict] = field(default_factory=dict)
    series: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    gates: list[Gate] = field(default_factory=list)
    model: str = ""


@dataclass
class CheckResult:
    """A finished check, as written to report.json."""

    name: str
    slug: str
    title: str
    claim: str
    rule: str
    preset: str
    seeds: list[int]
    verdict: str
    agree: int
    n: int
    reason: str
    measured: str
    per_seed: dict[str, list[float]]
    numbers: dict[str, float]
    parts: dict[str, dict[str, Any]]
    notes: list[str]
    figures: list[str]
    elapsed_s: float
    series: dict[str, Any] = field(default_factory=dict, repr=False)
    error: str | None = None
    gates: list[dict[str, Any]] = field(default_factory=list)
    model: str = ""
    #: "theory" (decided by primary parts) or "implementation" (identities, unit-level checks)
    section: str = "theory"
    #: the leave-one-seed-out flag of the verdict (None: not near the boundary)
    near_boundary: str | None = None
    #: runs this check trained that its plan did not declare (should be empty)
    unplanned: list[str] = field(default_factory=list)
    #: the plan's primary parts: {name: why the mechanism makes it the test}
    primaries: dict[str, str] = field(default_factory=dict)

    def to_dict(self, with_series: bool = False) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if not with_series:
            d.pop("series")
        return json_ready(d)


class Unavailable(RuntimeError):
    """Raised by a check when a piece it needs (a module, a dataset) is missing: the verdict is
    INCONCLUSIVE with this message as the reason, not a crash."""


@dataclass(frozen=True)
class Check:
    """One claim of SPEC 5 (see the module docstring)."""

    name: str
    slug: str
    title: str
    claim: str
    rule: str
    presets: dict[str, dict[str, Any]]
    run: Callable[[Any, dict[str, Any]], Finding]
    figures: Callable[[dict[str, Any], Path], list[Path]] | None = None
    plan: Callable[[str, dict[str, Any]], Any] | None = None

    def __post_init__(self) -> None:
        if "standard" not in self.presets and "quick" in self.presets:  # standard = quick sizes, 5 seeds
            self.presets["standard"] = dict(self.presets["quick"])
        missing = [p for p in PRESETS if p not in self.presets]
        if missing:
            raise ValueError(f"check {self.name}: presets {missing} are missing")
        if not self.claim.strip() or not self.rule.strip():
            raise ValueError(f"check {self.name}: claim and rule must be non-empty")

    def params(self, preset: str) -> dict[str, Any]:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; allowed: {', '.join(PRESETS)}")
        return dict(self.presets[preset])

    def make_plan(self, preset: str) -> Any:
        """This check's :class:`theory_checks.plan.CheckPlan` at ``preset`` (None when it has none)."""
        return None if self.plan is None else self.plan(preset, self.params(preset))
