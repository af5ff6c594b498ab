"""G18 (gradient sparsity before or with the density fall): the onset statistic on synthetic logs with
a known lag, a lagging gradient that must FAIL, the tautological forms the check rules out, (b)'s
factor split, and the check end to end at smoke."""

from __future__ import annotations

import math

import numpy as np
import pytest
from check_smoke import smoke_check

from theory_checks import g18_gradient_leads as g18
from theory_checks.plan import judge
from theory_checks.protocol import PRESETS

N = 512            # hidden units per block
STEPS = np.arange(0, 2001, 100)


def ramp(t, t0, t1):
    """0 before t0, 1 after t1, linear in between."""
    return np.clip((np.asarray(t, np.float64) - t0) / (t1 - t0), 0.0, 1.0)


def make_log(density, g2, g1=None, small=None, gsp=None, loss=None, blocks=4, steps=STEPS):
    """A fixed/ training log whose blocks 2..L carry the given series; block 1 holds decoy values that
    must be ignored. eta_l2sq = n density G2, eta_l1 = n density G1, eta_sparse = (1 - density) +
    density * small (ReLU: the inactive entries are exact zeros), af_k = x_sq eta_l2sq, x_sq = 128."""
    T = len(steps)
    g1 = np.full(T, 3e-5) if g1 is None else g1
    small = np.full(T, 1e-3) if small is None else small
    gsp = np.full(T, 1e-3) if gsp is None else gsp
    loss = np.linspace(2.3, 0.3, T) if loss is None else loss
    rows = []
    for i, s in enumerate(steps):
        d = float(density[i])
        per = {"density": d, "act_sparsity": 1 - d, "eta_l2sq": N * d * g2[i], "eta_l1": N * d * g1[i],
               "eta_sparse_0.001": (1 - d) + d * small[i], "g_sparse_0.001": gsp[i], "x_sq": 128.0,
               "af_k": 128.0 * N * d * g2[i]}
        row = {"step": int(s), "loss": float(loss[i]), "fixed/loss": float(loss[i])}
        for k, v in per.items():
            row[f"fixed/{k}"] = [7.0 if k != "act_sparsity" else 0.5] + [float(v)] * (blocks - 1)
        rows.append(row)
    return rows


DENS = 0.5 - 0.15 * ramp(STEPS, 200, 800)     # half-way (0.425) at step 500


def g2_falling(t0, t1, by=1.0):
    return 1e-9 * np.exp(-by * ramp(STEPS, t0, t1))


def test_t50_interpolates_the_first_half_crossing_and_refuses_the_wrong_direction():
    s = [0, 100, 200]
    assert g18.t50(s, [0.0, 0.2, 1.0], "lin", "rise") == pytest.approx(137.5)
    assert g18.t50(s, [1.0, 0.8, 0.0], "lin", "fall") == pytest.approx(137.5)
    assert math.isnan(g18.t50(s, [0.0, 0.2, 1.0], "lin", "fall"))      # moved the other way: no onset
    # ln scale: 1 -> e^-2, half-way (ln -1) at step 50 of a log-linear fall
    assert g18.t50(s, np.exp([0.0, -2.0, -2.0]), "ln", "fall") == pytest.approx(50.0)
    assert g18.change(s, np.exp([0.0, -2.0, -2.0]), "ln", "fall") == pytest.approx(2.0)
    with pytest.raises(ValueError):
        g18.change(s, [1, 2, 3], "log", "fall")


def test_known_lead_is_recovered_and_passes():
    # G2 falls by e between steps 0 and 600 (t50 300): it leads the density (t50 500) by 200 steps
    nums = [g18.seed_numbers(make_log(DENS, g2_falling(k, 600 + k)), N) for k in (0, 20, 40)]
    assert nums[0]["density_t50"] == pytest.approx(500.0)
    assert nums[0]["g2_active_t50"] == pytest.approx(300.0)
    assert [n["g2_active_lag"] for n in nums] == pytest.approx([-200.0, -180.0, -160.0])
    assert nums[0]["g2_active_change"] == pytest.approx(1.0)
    assert nums[0]["density_change"] == pytest.approx(0.15)
    parts, gates = g18.measure(nums)
    assert parts["g2_active_falls"].verdict == "PASS"
    assert parts["g2_active_leads"].verdict == "PASS"
    verdict, gp = judge(g18.CHECK.make_plan("quick"), parts, gates)
    assert verdict.verdict == "PASS" and gp["g2_active_leads"].verdict == "PASS"


def test_lagging_gradient_fails():
    # G2 falls only between steps 800 and 1400 (t50 1100): 600 steps after the density's half-way point
    nums = [g18.seed_numbers(make_log(DENS, g2_falling(800 + k, 1400 + k)), N) for k in (-30, 0, 30)]
    assert nums[1]["g2_active_lag"] == pytest.approx(600.0)
    parts, gates = g18.measure(nums)
    assert parts["g2_active_falls"].verdict == "PASS"          # it does fall ...
    assert parts["g2_active_leads"].verdict == "FAIL"          # ... but after the density: excluded
    verdict, _ = judge(g18.CHECK.make_plan("quick"), parts, gates)
    assert verdict.verdict == "FAIL"


def test_a_rising_gradient_fails_the_first_primary_and_leaves_the_lag_undefined():
    g2 = 1e-9 * np.exp(1.1 * ramp(STEPS, 200, 1500))           # grows 3x, as in the pilot
    nums = [g18.seed_numbers(make_log(DENS, g2 * f), N) for f in (0.9, 1.0, 1.1)]
    assert math.isnan(nums[0]["g2_active_t50"])
    parts, gates = g18.measure(nums)
    assert parts["g2_active_falls"].verdict == "FAIL"
    verdict, gp = judge(g18.CHECK.make_plan("quick"), parts, gates)
    assert verdict.verdict == "FAIL"
    assert gp["g2_active_leads"].verdict == "INCONCLUSIVE" and "g2_active_moved" in gp["g2_active_leads"].reason


def test_tautological_forms_pass_when_the_gradient_does_nothing_and_the_check_does_not():
    """g constant on the active units: the raw ||eta||^2 (count x G2) and the fraction of |eta| below
    tau RMS (inactive fraction + small share) still move with the density and 'pass' the lag; the
    check's primaries, on G2, do not."""
    flat = np.full(len(STEPS), 1e-9)
    nums = [g18.seed_numbers(make_log(DENS + e, flat), N) for e in (-0.002, 0.0, 0.002)]
    n = nums[1]
    assert n["eta_sparse_lag"] == pytest.approx(0.0, abs=1e-9)     # eta_sparse = 1 - density exactly
    # ln(n d G2) follows ln d: half-way at ln d = (ln 0.5 + ln 0.35) / 2, crossed between the logs at
    # steps 500 (d 0.425) and 600 (d 0.4), interpolated linearly in ln d
    h = (math.log(0.5) + math.log(0.35)) / 2
    assert n["eta_l2sq_t50"] == pytest.approx(500 + (h - math.log(0.425)) / math.log(0.4 / 0.425) * 100, rel=1e-9)
    assert abs(n["eta_l2sq_lag"]) < 100
    assert n["g2_active_change"] == pytest.approx(0.0, abs=1e-12)
    parts, gates = g18.measure(nums)
    assert parts["eta_sparse_leads"].verdict == "PASS" and parts["eta_l2sq_leads"].verdict == "PASS"
    verdict, gp = judge(g18.CHECK.make_plan("quick"), parts, gates)
    assert gp["g2_active_falls"].verdict == "FAIL"                # no fall of the gradient factor
    assert verdict.verdict == "FAIL"
    assert gp["eta_sparse_leads"].role == "context" and gp["eta_l2sq_leads"].role == "context"


def test_b_factor_split_is_exact_and_blocks_2_to_L_only():
    g2 = g2_falling(0, 600, by=0.5)
    n = g18.seed_numbers(make_log(DENS, g2), N)
    assert n["dln_x_sq"] == pytest.approx(0.0, abs=1e-12)
    assert n["dln_active"] == pytest.approx(math.log(0.35 / 0.5))
    assert n["dln_g2_active"] == pytest.approx(-0.5)
    assert n["dln_af_k"] == pytest.approx(math.log(0.35 / 0.5) - 0.5)
    assert n["dln_residual"] == pytest.approx(0.0, abs=1e-9)
    # a one-block model uses its only block (tail), a 4-block one ignores block 1's decoys
    one = g18.seed_numbers(make_log(DENS, g2, blocks=1), N)
    assert one["density_change"] == pytest.approx(7.0 - 7.0)     # block 1 is the decoy 7.0 there


def test_gates_and_plan_and_the_shared_run():
    # the one arm is the shared plain-SGD baseline (G5's ref, G15's sgd): no new training
    from theory_checks import g05_sgd_noise as g05
    for preset in ("smoke", "quick", "full"):
        (a,) = g18.CHECK.make_plan(preset).arms
        assert a.config == {x.name: x.config for x in g05.CHECK.make_plan(preset).arms}["ref"]
    for preset in PRESETS:
        plan = g18.CHECK.make_plan(preset)
        assert plan.deciding == ["g2_active_falls", "g2_active_leads"]
        lead = plan.part("g2_active_leads")
        assert lead.delta == g18.lag_delta(preset) > 0
        assert "g2_active_moved" in lead.gates and "density_fell" in lead.gates
    assert g18.lag_delta("quick") == 100.0
    nums = [g18.seed_numbers(make_log(0.5 - 0.01 * ramp(STEPS, 200, 800), g2_falling(0, 600)), N)] * 3
    by = {g.name: g for g in g18.measure(nums)[1]}
    assert not by["density_fell"].ok and by["density_fell"].value == pytest.approx(0.01)
    assert by["not_interpolated"].ok and by["g2_active_moved"].ok
    with pytest.raises(ValueError):
        g18.seed_numbers(make_log(DENS, g2_falling(0, 600))[:2], N)


def test_smoke_end_to_end(tmp_path):
    smoke_check(g18.CHECK, tmp_path, finite=("density_change", "g2_active_change", "dln_residual"))
