"""One check run end to end at the smoke preset, with the structure every check's result must have."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from theory_checks.context import Context
from theory_checks.suite import run_check


def smoke_check(check: Any, tmp_path: Path, finite: tuple[str, ...] | None = None) -> Any:
    """``check`` judged on seeds 0-2 at smoke (its runs trained into ``tmp_path``): asserts no error,
    nothing trained outside the plan, every planned part and gate reported, the per-seed numbers
    ``finite`` (all when None) finite for the 3 seeds, and every figure written. Returns the result."""
    ctx = Context(preset="smoke", seeds=[0, 1, 2], out_dir=tmp_path)
    plan = check.make_plan("smoke")
    res = run_check(check, ctx, fig_dir=tmp_path / "figures", plan=plan)
    assert res.error is None and res.unplanned == []
    assert set(res.parts) == {p.name for p in plan.parts}
    assert {g["name"] for g in res.gates} == {g.name for g in plan.gates}
    for k in res.per_seed if finite is None else finite:
        vals = res.per_seed[k]
        assert len(vals) == 3 and all(math.isfinite(v) for v in vals), k
    assert res.figures and all((tmp_path / f).is_file() for f in res.figures)
    return res
