"""Pre-registration and judging: plans validate, the judge decides from the plan's primaries with
per-part gates, margin parts control their errors, the leave-one-seed-out flag, plan.json is written
before any training and unchanged after, and the suite-level multiplicity statement."""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pytest

from theory_checks.plan import CheckPlan, GatePlan, PartPlan, arm, boundary_flags, judge
from theory_checks.protocol import PRESETS, Check, Finding
from theory_checks.verdicts import VERDICTS, Gate, Verdict, bound_verdict, combine, effect_verdict, margin_verdict


class _Cfg:
    def __init__(self, **kw):
        self.kw = kw

    def to_dict(self):
        return dict(self.kw)


def _plan(**kw):
    parts = kw.pop("parts", None) or [
        PartPlan("a", "effect", "primary", "effect a", 0.1, "stated", gates=("arm_b_ok",), why="mechanism"),
        PartPlan("b", "effect", "context", "effect b", 0.1, "stated", gates=()),
    ]
    gates = kw.pop("gates", None) or [GatePlan("arm_b_ok", ">=", 0.05, "arm b not interpolated", arms=("b",))]
    return CheckPlan(arms=[arm("a", _Cfg(lr=0.1, seed=3)), arm("b", _Cfg(lr=0.01, seed=3))], parts=parts, gates=gates,
                     **kw)


def test_plan_validates_parts_gates_and_arms():
    p = _plan()
    assert p.section == "theory" and p.deciding == ["a"]
    assert "seed" not in p.arms[0].config  # the seed is a placeholder, each seed replaces it
    with pytest.raises(ValueError, match="judgement bound"):
        PartPlan("x", "bound", "primary", "w", why="m")
    with pytest.raises(ValueError, match="delta"):
        PartPlan("x", "effect", "primary", "w", None, "s", why="m")
    with pytest.raises(ValueError, match="source"):
        PartPlan("x", "effect", "primary", "w", 0.1, "", why="m")
    with pytest.raises(ValueError, match="why"):
        PartPlan("x", "effect", "primary", "w", 0.1, "s")
    with pytest.raises(ValueError, match="role"):
        PartPlan("x", "effect", "main", "w", 0.1, "s")
    with pytest.raises(ValueError, match="unknown gate"):
        _plan(parts=[PartPlan("a", "effect", "primary", "w", 0.1, "s", gates=("nope",), why="m")])
    with pytest.raises(ValueError, match="unknown arm"):
        _plan(gates=[GatePlan("arm_b_ok", ">=", 1.0, "w", arms=("zzz",))])
    with pytest.raises(ValueError, match="at least one part must be primary"):
        _plan(parts=[PartPlan("a", "effect", "context", "w", 0.1, "s")])
    with pytest.raises(ValueError, match="op"):
        GatePlan("g", "==", 1.0, "w")
    impl = _plan(parts=[PartPlan("i", "exact", "implementation", "identity", source="float")], gates=[])
    assert impl.section == "implementation" and impl.deciding == ["i"]
    json.dumps(p.to_dict())  # plain data


def test_judge_decides_from_primaries_with_per_part_gates():
    plan = _plan()
    good_a = effect_verdict([0.3, 0.25, 0.35], 0.1)
    bad_b = effect_verdict([-1.0, -1.1, -0.9], 0.1)
    ok_gate = Gate("arm_b_ok", 0.3, ">=", 0.05)
    v, parts = judge(plan, {"a": good_a, "b": bad_b}, [ok_gate])
    # the context part's FAIL never decides
    assert v.verdict == "PASS" and parts["b"].verdict == "FAIL" and parts["b"].role == "context"
    # arm b interpolated: the part that needs it is INCONCLUSIVE with the numbers; b (no gates) is not gated
    v, parts = judge(plan, {"a": good_a, "b": bad_b}, [Gate("arm_b_ok", 9e-4, ">=", 0.05, "arm b interpolated")])
    assert v.verdict == "INCONCLUSIVE" and parts["a"].reason.startswith("regime not reached: arm_b_ok = 9.000e-04")
    assert "arm b interpolated" in parts["a"].reason and parts["b"].verdict == "FAIL"
    # an unmeasured gate is not a pass
    v, parts = judge(plan, {"a": good_a, "b": bad_b}, [])
    assert v.verdict == "INCONCLUSIVE" and "not measured" in parts["a"].reason


def test_judge_refuses_anything_not_planned():
    plan = _plan()
    a, b = effect_verdict([0.3, 0.25, 0.35], 0.1), effect_verdict([0.3, 0.25, 0.35], 0.1)
    g = Gate("arm_b_ok", 0.3, ">=", 0.05)
    with pytest.raises(ValueError, match="not planned"):
        judge(plan, {"a": a, "b": b, "c": b}, [g])
    with pytest.raises(ValueError, match="planned but not measured"):
        judge(plan, {"a": a}, [g])
    with pytest.raises(ValueError, match="delta"):
        judge(plan, {"a": effect_verdict([0.3, 0.25, 0.35], 0.05), "b": b}, [g])
    with pytest.raises(ValueError, match="planned >= 0.05"):
        judge(plan, {"a": a, "b": b}, [Gate("arm_b_ok", 0.3, ">=", 0.01)])
    with pytest.raises(ValueError, match="was not planned"):
        judge(plan, {"a": a, "b": b}, [g, Gate("other", 1.0, ">", 0.0)])
    with pytest.raises(ValueError, match="kind"):
        judge(plan, {"a": margin_verdict([0.01, 0.02, 0.0], 0.1), "b": b}, [g])


def test_judgement_bounds_never_fail_a_check_but_exact_bounds_do():
    ok = dict(passes=lambda v: v <= 1.0, fails=lambda v: v > 5.0, what="r", bound="<= 1", fail_bound="> 5")
    judged = bound_verdict([9.0, 9.0, 9.0], **ok)
    exact = bound_verdict([9.0, 9.0, 9.0], kind="exact", **ok)
    p = effect_verdict([0.3, 0.25, 0.35], 0.1)
    assert judged.verdict == exact.verdict == "FAIL"
    c = combine({"p": p, "j": judged})
    assert c.verdict == "INCONCLUSIVE" and "decides nothing" in c.reason
    assert combine({"p": p, "e": exact}).verdict == "FAIL"
    # a primary set: only those parts decide
    assert combine({"p": p, "j": judged}, primary=["p"]).verdict == "PASS"
    with pytest.raises(ValueError, match="primary"):
        combine({"p": p}, primary=["q"])
    with pytest.raises(ValueError, match="kind"):
        bound_verdict([1.0], kind="soft", **ok)


def test_margin_verdict_rule_and_error_rates():
    v = margin_verdict([0.01, 0.02, 0.015], 0.05, what="loss increase", source="stated")
    assert v.verdict == "PASS" and v.hi < 0.05 and v.kind == "margin" and v.margin == 0.05
    v = margin_verdict([0.2, 0.21, 0.19], 0.05)
    assert v.verdict == "FAIL" and v.lo > 0.05 and v.p_fail < 0.01
    assert margin_verdict([0.0, 0.1, 0.05], 0.05).verdict == "INCONCLUSIVE"
    assert margin_verdict([0.01, 0.02], 0.05).verdict == "INCONCLUSIVE"
    with pytest.raises(ValueError, match="margin"):
        margin_verdict([0.1, 0.2, 0.3], 0.0)
    # at a true harm exactly at the margin each direction errs at most ~5% (2000 simulated seed sets)
    rng = np.random.default_rng(0)
    for n in (3, 5):
        sims = rng.normal(0.05, 0.02, (2000, n))
        rates = {k: np.mean([margin_verdict(row, 0.05).verdict == k for row in sims]) for k in VERDICTS}
        assert rates["PASS"] <= 0.065 and rates["FAIL"] <= 0.065
        # a clearly harmless arm passes most of the time
        good = rng.normal(0.0, 0.005, (500, n))
        assert np.mean([margin_verdict(row, 0.05).verdict == "PASS" for row in good]) >= 0.8
    # p_fail is the one-sided p of "harm <= margin": small when the harm is clearly above it
    assert margin_verdict([0.3, 0.31, 0.29], 0.05).p_fail < margin_verdict([0.06, 0.08, 0.07], 0.05).p_fail


def test_leave_one_seed_out_flags_fragile_verdicts():
    solid = effect_verdict([0.30, 0.31, 0.29, 0.30, 0.32], 0.1)
    flags, check = boundary_flags({"s": solid}, ["s"])
    assert flags == {} and check is None
    # a PASS carried by one seed: without seed #0 the mean (0.2) is below delta and tightly so -> FAIL
    carried = effect_verdict([0.5, 0.2, 0.21, 0.19], 0.25)
    assert carried.verdict == "PASS"
    flags, check = boundary_flags({"c": carried, "s": effect_verdict([0.3, 0.31, 0.29, 0.3], 0.1)}, ["c", "s"])
    assert flags == {"c": "near the boundary: without seed #0 it is FAIL"}
    assert check == "near the boundary: without seed #0 the verdict is FAIL"
    # a gated part is not re-decided (its gate set the verdict)
    gated_part = Verdict("INCONCLUSIVE", 3, 4, "regime not reached: g = 0", kind="effect", values=[1, 1, 1, 1],
                         delta=0.1)
    assert boundary_flags({"g": gated_part}, ["g"]) == ({}, None)


def _fake(name, plan_fn, run_fn):
    return Check(name=name, slug=f"g99_fake_{name.lower()}", title="fake", claim="a fake claim", rule="a fake rule",
                 presets={p: {} for p in PRESETS}, run=run_fn, plan=plan_fn)


def test_plan_json_is_written_before_the_first_run_and_unchanged_after(tmp_path, monkeypatch):
    from theory_checks import context as context_mod
    from theory_checks.suite import run_checks

    seen = []

    def plan_fn(preset, p):
        return CheckPlan(arms=[], parts=[PartPlan("e", "effect", "primary", "w", 0.1, "stated", why="m")])

    def run_fn(ctx, p):
        # what a training run would see: the plan is already on disk
        path = tmp_path / "plan.json"
        seen.append(hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None)
        return Finding(None, "ok", parts={"e": effect_verdict([0.3, 0.2, 0.4], 0.1)})

    results, crashed = run_checks([_fake("G98", plan_fn, run_fn), _fake("G99", plan_fn, run_fn)], "smoke", tmp_path,
                                  [0, 1, 2], progress=False, echo=False)
    assert not crashed and [r.verdict for r in results] == ["PASS", "PASS"]
    after = hashlib.sha256((tmp_path / "plan.json").read_bytes()).hexdigest()
    assert seen == [after, after]  # written before the first check ran, unchanged after the last
    md = (tmp_path / "report.md").read_text()
    assert f"SHA-256 `{after}`" in md
    data = json.loads((tmp_path / "plan.json").read_text())
    assert set(data["checks"]) == {"G98", "G99"} and data["checks"]["G98"]["deciding"] == ["e"]
    assert json.loads((tmp_path / "report.json").read_text())["plan_sha256"] == after
    assert context_mod is not None


def test_a_check_that_measures_something_else_than_planned_crashes_loudly(tmp_path):
    from theory_checks.suite import run_checks

    def plan_fn(preset, p):
        return CheckPlan(arms=[], parts=[PartPlan("e", "effect", "primary", "w", 0.1, "stated", why="m")])

    def run_fn(ctx, p):
        return Finding(None, "ok", parts={"e": effect_verdict([0.3, 0.2, 0.4], 0.05)})  # delta changed after the run

    results, crashed = run_checks([_fake("G97", plan_fn, run_fn)], "smoke", tmp_path, [0, 1, 2], progress=False,
                                  echo=False)
    assert crashed and "planned 0.1" in results[0].reason


def test_multiplicity_statement():
    from theory_checks.protocol import CheckResult
    from theory_checks.report import multiplicity_lines

    def res(name, verdict, p_fail):
        part = {"verdict": verdict, "role": "primary", "kind": "effect", "p_fail": p_fail, "agree": 0, "n": 3,
                "reason": ""}
        return CheckResult(name=name, slug=name, title="", claim="", rule="", preset="quick", seeds=[0, 1, 2],
                           verdict=verdict, agree=0, n=3, reason="", measured="", per_seed={}, numbers={},
                           parts={"x": part}, notes=[], figures=[], elapsed_s=0.0)

    text = "\n".join(multiplicity_lines([res("G1", "PASS", 0.9), res("G2", "FAIL", 0.001), res("G3", "FAIL", 0.04),
                                         res("G4", "PASS", 0.8)]))
    # 4 checks: expected false FAILs <= 0.20; Holm over 4: 0.001 <= 0.05/4 survives, 0.04 > 0.05/3 does not
    assert "4 theory check(s)" in text and "at most 0.20" in text
    assert "(family-wise 0.05): G2; FAILs that do not: G3" in text
    assert math.isclose(0.05 / 4, 0.0125)
