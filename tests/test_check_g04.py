"""G4 (flatness and gradient sparsity fall together): partial Spearman on constructed data, the
noise-aware plateau gate on synthetic series, the plateau window, and plan == run's parts."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import rankdata, spearmanr

from theory_checks import g04_flatness_together as g
from theory_checks.plan import check_against_plan, judge


def test_partial_spearman_equals_the_residual_correlation_of_ranks():
    """Closed form: r_xy.z is the Pearson correlation of the residuals of rank(x) and rank(y) after a
    least-squares fit on rank(z)."""
    rng = np.random.default_rng(0)
    z = rng.normal(size=40)
    x = z + rng.normal(size=40)
    y = 0.5 * z - 0.7 * x + rng.normal(size=40)
    rx, ry, rz = rankdata(x), rankdata(y), rankdata(z)
    A = np.vstack([rz, np.ones_like(rz)]).T
    ex = rx - A @ np.linalg.lstsq(A, rx, rcond=None)[0]
    ey = ry - A @ np.linalg.lstsq(A, ry, rcond=None)[0]
    assert g.partial_spearman(x, y, z) == pytest.approx(float(np.corrcoef(ex, ey)[0, 1]), abs=1e-12)


def test_partial_spearman_removes_a_shared_loss_trend():
    """A quantity that only follows the loss has a strong raw trend with the step and none once the
    loss is partialled out; a quantity that falls with the step at constant-rank loss keeps -1."""
    rng = np.random.default_rng(1)
    step = np.arange(30.0)
    loss = 1.0 - step / 30 + 0.02 * rng.normal(size=30)
    trace = 100 * loss + 0.5 * rng.normal(size=30)
    assert spearmanr(step, trace).statistic < -0.9
    assert abs(g.partial_spearman(step, trace, loss)) < 0.5
    flat_loss = rng.permutation(30).astype(float)   # no trend in the loss
    assert g.partial_spearman(step, -step, flat_loss) == pytest.approx(-1.0)
    assert math.isnan(g.partial_spearman(step[:3], step[:3], step[:3]))          # too few points
    assert math.isnan(g.partial_spearman(step, loss, loss))                       # y's ranks are z's
    assert math.isnan(g.partial_spearman(step, np.full(30, 1.0), loss))           # a constant series
    with pytest.raises(ValueError):
        g.partial_spearman(step, step[:5], step)


def test_relative_fall_and_plateau_gate_on_synthetic_series():
    s = np.arange(0, 3000, 50.0)
    assert g.relative_fall(s, np.full(s.size, 0.2)) == pytest.approx(0.0)
    lin = 0.3 - 0.1 * s / s[-1]                       # a loss still falling linearly
    t = s / s[-1]
    q3, q4 = lin[(t >= 0.5) & (t <= 0.75 + 1e-9)].mean(), lin[t >= 0.75 - 1e-9].mean()
    assert g.relative_fall(s, lin) == pytest.approx((q3 - q4) / q3)
    assert math.isnan(g.relative_fall(s, np.zeros(s.size)))  # the float32 floor: no ratio
    # the gate is the one-sided t upper bound over seeds, not the max of point values
    ok, floor = g.plateau_gates([0.05, 0.06, 0.04], [0.15, 0.16, 0.14])
    assert ok.ok and ok.value == pytest.approx(0.05 + 2.919986 * 0.01 / math.sqrt(3), rel=1e-5) and floor.ok
    bad, _ = g.plateau_gates([0.2, 0.25, 0.22], [0.15, 0.16, 0.14])
    assert not bad.ok
    noisy, _ = g.plateau_gates([0.0, 0.15, -0.1], [0.15, 0.16, 0.14])   # a flat loss whose seeds scatter widely
    assert not noisy.ok
    _, fl = g.plateau_gates([0.01, 0.0, 0.02], [0.01, 0.2, 0.2])
    assert not fl.ok
    nan_gate, _ = g.plateau_gates([math.nan, 0.0, 0.0], [0.2, 0.2, 0.2])
    assert not nan_gate.ok


def synth_phase(seed: int, steps: int = 3000, log_every: int = 50, flat_every: int = 150, falls: bool = True):
    """A label-noise phase: the loss falls over the first half, then plateaus with 10% noise; the
    trace, ||eta||^2 and density fall with the step on the plateau (or stay flat) on top of a
    loss-following part."""
    rng = np.random.default_rng(seed)
    rows = []
    for s in [t for t in range(steps) if t % log_every == 0 or t == steps - 1]:
        u = s / (steps - 1)
        loss = (0.15 + 0.2 * max(0.0, 0.5 - u)) * (1 + 0.1 * rng.normal())
        drift = (1 - 0.3 * u) if falls else 1.0
        d = 0.3 * drift + 0.002 * rng.normal()
        r = {"step": s, "fixed/loss": loss, "fixed/eta_l2sq/mean": 1e-6 * drift * (1 + 0.02 * rng.normal()),
             "heldout/density": [0.5, d, d, d]}
        if s % flat_every == 0 or s == steps - 1:
            r["flat/trace_k"] = 100 * drift * (1 + 0.02 * rng.normal()) + 50 * loss
        rows.append(r)
    return rows


def test_measure_on_synthetic_phases_matches_the_plan_and_decides():
    p = g.CHECK.params("quick")
    plan = g.plan("quick", p)
    hist = [synth_phase(s) for s in range(3)]
    parts, gates, m = g.measure(hist, plan)
    check_against_plan(plan, parts, gates)
    assert m["n_est"] == [11, 11, 11]
    assert all(x > 0.8 for k in g.KEYS for x in m["plateau"][k])
    verdict, gp = judge(plan, parts, gates)
    assert verdict.verdict == "PASS", verdict.reason
    # flat quantities on the plateau: the primaries FAIL (the data exclude a trend of 0.3)
    flat = [synth_phase(s, falls=False) for s in range(3, 6)]
    parts, gates, _ = g.measure(flat, plan)
    verdict, gp = judge(plan, parts, gates)
    assert gp["density_falls_on_plateau"].verdict in ("FAIL", "INCONCLUSIVE")
    assert verdict.verdict in ("FAIL", "INCONCLUSIVE") and verdict.verdict != "PASS"


def test_a_loss_still_falling_gates_the_primaries():
    p = g.CHECK.params("quick")
    plan = g.plan("quick", p)
    hist = synth_phase(0)
    for r in hist:  # the loss halves over the last half: still fitting
        r["fixed/loss"] = 0.3 * (1 - 0.5 * r["step"] / 2999)
    parts, gates, _ = g.measure([hist, hist, hist], plan)
    verdict, gp = judge(plan, parts, gates)
    assert not {x.name: x for x in gates}["loss_plateau"].ok
    assert gp["trace_k_falls_on_plateau"].verdict == "INCONCLUSIVE"
    assert "regime not reached" in gp["trace_k_falls_on_plateau"].reason and "loss_plateau" in \
        gp["trace_k_falls_on_plateau"].reason
    assert verdict.verdict == "INCONCLUSIVE"


def test_plan_window_and_arms():
    assert g.estimates_in_window(3000, 50, 150) == 11
    assert g.estimates_in_window(80, 10, 10) == 5
    assert g.estimates_in_window(1000, 100, 100) == 6
    with pytest.raises(ValueError):
        g.estimates_in_window(0, 50, 150)
    for preset in ("smoke", "quick", "standard", "full"):
        plan = g.CHECK.make_plan(preset)
        assert plan.deciding == [f"{k}_falls_on_plateau" for k in g.KEYS]
        assert [a.name for a in plan.arms] == ["sgd", "labelnoise"] and plan.arms[1].start == "sgd"
    with pytest.raises(ValueError, match="trace estimates"):
        g.plan("quick", dict(g.CHECK.params("quick"), phase_steps=1000, flatness_every=100, log_every=100))
    # the phase arm is the config run() trains (surgery options included)
    from gradsparse.factory import finetune_start
    from theory_checks.context import Context, init_model, load_data
    cfg = g.phase_config("smoke", g.CHECK.params("smoke"))
    model = init_model(g.sgd_config("smoke"), load_data("mnist1d"))
    _, opts = finetune_start(model, cfg)
    d = cfg.replace(surgery=opts).to_dict()
    d.pop("seed")
    assert g.plan("smoke", g.CHECK.params("smoke")).arms[1].config == d
    assert Context  # imported for the type of the run's context
