"""G5 (SGD noise -> flatter and sparser): the pure helpers on synthetic histories with known answers,
the per-arm interpolation gates, the float32 floor, and plan == run's parts."""

from __future__ import annotations

import math

import numpy as np
import pytest

from theory_checks import g05_sgd_noise as g
from theory_checks.plan import check_against_plan, judge

P = g.CHECK.params("quick")


def synth(steps: int, log_every: int, flat_every: int, loss, trace, density) -> list[dict]:
    """A training log: rows every ``log_every`` steps and the last; traces every ``flat_every``;
    held-out density per block (4 blocks: block 1 differs, blocks 2..L carry ``density(step)``)."""
    rows = []
    for s in [t for t in range(steps) if t % log_every == 0 or t == steps - 1]:
        d = density(s)
        r = {"step": s, "fixed/loss": loss(s), "heldout/density": [0.9, d, d, d]}
        if s % flat_every == 0 or s == steps - 1:
            r["flat/trace_k"] = trace(s)
        rows.append(r)
    return rows


def test_interp_at_linear_and_no_extrapolation():
    s, v = [0, 100, 200], [0.0, 10.0, 30.0]
    assert g.interp_at(s, v, 50) == pytest.approx(5.0)
    assert g.interp_at(s, v, 150) == pytest.approx(20.0)
    assert g.interp_at(s, v, 200) == pytest.approx(30.0)
    assert math.isnan(g.interp_at(s, v, 201)) and math.isnan(g.interp_at(s, v, -1))
    assert math.isnan(g.interp_at(s, v, math.nan))
    with pytest.raises(ValueError, match="ascending"):
        g.interp_at([0, 200, 100], v, 50)


def test_matched_step_interpolates_the_first_crossing_and_refuses_the_float_floor():
    s, l = [0, 100, 200, 300], [1.0, 0.5, 0.2, 0.4]
    step, prob = g.matched_step(s, l, 0.35)
    assert prob is None and step == pytest.approx(150.0)  # w = (0.5 - 0.35) / 0.3 = 0.5
    assert g.matched_step(s, l, 2.0) == (0.0, None)       # already there at the first log
    step, prob = g.matched_step(s, l, 0.0)                 # a float32 floor of exactly 0
    assert math.isnan(step) and "float32 floor" in prob
    step, prob = g.matched_step(s, l, 0.1)
    assert math.isnan(step) and "never reached" in prob
    assert math.isnan(g.matched_step(s, l, math.nan)[0])


def test_equal_samples_mean_is_pointwise_over_ref_window():
    """bigB's value = its step: the equal-samples value is the mean of ratio * (ref's window steps)."""
    ref_steps = np.array(list(range(0, 2000, 100)) + [1999], float)
    big_steps = ref_steps.copy()
    win = ref_steps[ref_steps / 1999 >= 0.75 - 1e-9]   # 1500, ..., 1900, 1999
    got = g.equal_samples_mean(ref_steps, 0.75, 0.25, big_steps, big_steps)
    assert got == pytest.approx(float(np.mean(win * 0.25)))
    # a trace every 200 steps: 400 -> 100, 600 -> 300; the point 450 interpolates to 150
    assert g.equal_samples_mean([0, 1800], 0.0, 0.25, [0, 400, 600], [0.0, 100.0, 300.0]) == pytest.approx(
        np.mean([0.0, 150.0]))
    assert math.isnan(g.equal_samples_mean(ref_steps, 0.75, 2.0, big_steps, big_steps))  # beyond bigB's log
    with pytest.raises(ValueError):
        g.equal_samples_mean(ref_steps, 0.75, 0.0, big_steps, big_steps)


def test_log_ratio_refuses_nonpositive_traces():
    assert g.log_ratio(math.e, 1.0) == (pytest.approx(1.0), None)
    v, prob = g.log_ratio(-2.5, 100.0)
    assert math.isnan(v) and "<= 0" in prob
    v, prob = g.log_ratio(math.inf, 1.0)
    assert math.isnan(v) and "not finite" in prob


def arms(jitter=(0.0, 0.01, -0.01), ref_floor=0.3):
    """Three seeds of ref (never interpolates), lowlr (slow) and bigB (interpolates by step 800;
    trace 150 before, shrinking with the loss after; density 0.42 flat) with known answers."""
    out = {"ref": [], "lowlr": [], "bigB": []}
    for j in jitter:
        ref_loss = (lambda s: max(2.3 - s / 1000, ref_floor)) if ref_floor > 0 else (  # noqa: E731
            lambda s: 0.0 if s >= 1500 else 1.0)  # the float32 floor: exactly 0 from step 1500
        out["ref"].append(synth(2000, 100, 200, ref_loss,
                                lambda s: 100.0 * (1 + j), lambda s: 0.35 + j / 10))
        out["lowlr"].append(synth(2000, 100, 200, lambda s: max(2.3 - s / 2000, 0.5),
                                  lambda s: 400.0, lambda s: 0.48))
        big_loss = lambda s: 2.3 * math.exp(-s / 150)  # noqa: E731 (2.3 -> 0.3 at ~306, 2e-5 at 2000)
        out["bigB"].append(synth(2000, 100, 200, big_loss,
                                 lambda s, bl=big_loss: 150.0 * min(1.0, bl(s) / 0.05), lambda s: 0.42))
    return out


def _measured(hists, gd=False):
    nums = {a: [g.arm_numbers(h) for h in hs] for a, hs in hists.items()}
    vals, probs, gates, extra = g.measure(nums, 32 / 128, gd=gd)
    parts = {pp.name: g.decide(vals[pp.name], probs[pp.name], pp) for pp in g._parts(gd)}
    return vals, parts, gates, extra


def test_interpolated_arm_gates_its_equal_steps_parts_and_matched_loss_decides():
    hists = arms()
    vals, parts, gates, extra = _measured(hists)
    plan = g.plan("quick", P)
    check_against_plan(plan, parts, gates)  # names, kinds, deltas and gate thresholds are the plan's
    by = {x.name: x for x in gates}
    assert not by["bigB_not_interpolated"].ok and "arm bigB interpolated" in by["bigB_not_interpolated"].what
    assert by["ref_not_interpolated"].ok and by["lowlr_not_interpolated"].ok
    # matched loss: bigB's trace 150 vs ref's 100*(1+j), density 0.42 vs 0.35 + j/10: known answers
    np.testing.assert_allclose(vals["smaller_batch_flatter_at_matched_loss"],
                               [math.log(150 / (100 * (1 + j))) for j in (0.0, 0.01, -0.01)], rtol=1e-9)
    np.testing.assert_allclose(vals["smaller_batch_sparser_at_matched_loss"],
                               [0.42 - 0.35 - j / 10 for j in (0.0, 0.01, -0.01)], rtol=1e-9)
    # at equal steps bigB's trace has collapsed with its loss: the raw comparison is strongly negative ...
    assert max(vals["smaller_batch_flatter"]) < -1.0
    verdict, gp = judge(plan, parts, gates)
    # ... but it is gated: INCONCLUSIVE "arm bigB interpolated" with the numbers, and it does not decide
    r = gp["smaller_batch_flatter"]
    assert r.verdict == "INCONCLUSIVE" and "regime not reached" in r.reason and "arm bigB interpolated" in r.reason
    assert "bigB_not_interpolated = " in r.reason and "FAIL" in r.reason
    assert gp["smaller_batch_sparser"].verdict == "INCONCLUSIVE"
    assert gp["smaller_batch_flatter_at_matched_loss"].verdict == "PASS"
    assert gp["smaller_batch_sparser_at_matched_loss"].verdict == "PASS"
    assert gp["larger_lr_flatter"].role == "context"
    assert verdict.verdict == "PASS"


def test_equal_samples_gate_and_value():
    """bigB at 1/4 of ref's steps: the gate reads its loss there (not interpolated) and its density."""
    vals, parts, gates, extra = _measured(arms())
    by = {x.name: x for x in gates}
    win = np.array([1800, 1900, 1999]) * 0.25   # ref's last-10% window, in bigB's steps
    # bigB's loss is logged every 100 steps: the gate interpolates linearly between logs
    lin = [np.interp(s, [400, 500], [2.3 * math.exp(-400 / 150), 2.3 * math.exp(-500 / 150)]) for s in win]
    assert by[g.SAMPLES_GATE].value == pytest.approx(float(np.mean(lin)), rel=1e-6) and by[g.SAMPLES_GATE].ok
    np.testing.assert_allclose(vals["smaller_batch_sparser_at_equal_samples"],
                               [0.42 - 0.35 - j / 10 for j in (0.0, 0.01, -0.01)], rtol=1e-9)


def test_float32_floor_gives_inconclusive_with_a_reason():
    """ref's loss at exactly 0 (the float32 floor): no matched point, never -inf; the part says why."""
    hists = arms(ref_floor=0.0)
    vals, parts, gates, extra = _measured(hists)
    v = parts["smaller_batch_flatter_at_matched_loss"]
    assert v.verdict == "INCONCLUSIVE" and "float32 floor" in v.reason
    assert all(math.isnan(x) for x in vals["smaller_batch_flatter_at_matched_loss"])
    assert not any(x == -math.inf for vs in vals.values() for x in vs)
    verdict, gp = judge(g.plan("quick", P), parts, gates)
    assert gp["smaller_batch_flatter_at_matched_loss"].verdict == "INCONCLUSIVE"
    assert verdict.verdict == "INCONCLUSIVE"


def test_plan_validates_and_lists_both_arms_gates():
    for preset in ("smoke", "quick", "standard", "full"):
        plan = g.CHECK.make_plan(preset)
        assert plan.deciding == ["smaller_batch_flatter_at_matched_loss", "smaller_batch_sparser_at_matched_loss"]
        names = {a.name for a in plan.arms}
        for pp in plan.parts:
            assert pp.gates is not None
            if pp.name in ("smaller_batch_flatter", "smaller_batch_sparser"):
                assert set(pp.gates) == {"ref_not_interpolated", "bigB_not_interpolated"}
            if pp.name in ("larger_lr_flatter", "larger_lr_sparser"):
                assert set(pp.gates) == {"ref_not_interpolated", "lowlr_not_interpolated"}
            if pp.role == "primary":
                assert "fitting" not in pp.why or "CE" in pp.why
        assert ("gd" in names) == (preset == "full")
        assert {x.name for x in plan.gates} == {f"{a}_not_interpolated" for a in names} | {g.SAMPLES_GATE}
    # the plan's arms are exactly the configs run() trains (sgd_config with the same changes)
    from theory_checks.context import sgd_config
    plan = g.plan("quick", P)
    cfg = {a.name: a.config for a in plan.arms}
    d = sgd_config("quick", batch_size=128).to_dict()
    d.pop("seed")
    assert cfg["bigB"] == d


def test_full_preset_parts_match_plan_with_gd():
    hists = arms()
    hists["gd"] = hists["lowlr"]
    _, parts, gates, _ = _measured(hists, gd=True)
    check_against_plan(g.plan("full", g.CHECK.params("full")), parts, gates)
