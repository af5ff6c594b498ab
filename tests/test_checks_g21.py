"""G21 (derivative vs activation set stability): the set statistics on synthetic cases with known
answers, ReLU's identical sets, the plan, and the check end to end at smoke."""

from __future__ import annotations

import math

import numpy as np
import pytest
from check_smoke import smoke_check

from gradsparse.activations import get_activation
from theory_checks import g21_derivative_stability as g21
from theory_checks.protocol import PRESETS


def test_jaccard_distance_known_values():
    s = np.array([1, 1, 1, 1, 0, 0], bool)
    t = np.array([0, 1, 1, 1, 1, 0], bool)
    assert g21.jaccard_distance(s, t) == pytest.approx(1 - 3 / 5)
    assert g21.jaccard_distance(s, s) == 0.0
    assert g21.jaccard_distance(s, ~s) == 1.0
    assert g21.jaccard_distance(np.zeros(4, bool), np.zeros(4, bool)) == 0.0
    with pytest.raises(ValueError, match="shapes"):
        g21.jaccard_distance(s, t[:5])


def test_relu_sets_are_identical_and_ratios_are_zero():
    # for ReLU sigma'(z) = 0 exactly where a = 0: with exact definitions (tau 0) D and A are one set
    relu = get_activation("relu")
    rng = np.random.default_rng(0)
    snaps = [[rng.normal(size=(64, 32)).astype(np.float32)] for _ in range(4)]
    for zs in snaps:
        assert np.array_equal(g21.deriv_set(relu, zs[0], 0.0), g21.act_set(relu, zs[0], 0.0))
    st = g21.churn(relu, snaps, 0.0, 0.0, np.random.default_rng(1))
    assert st["I_A"] == st["I_D"] and st["N_A"] == st["N_D"] and st["flips_A"] == st["flips_D"]
    assert st["J_AD_end"] == 1.0 and st["frac_A"] == st["frac_D"]
    eff = g21.seed_effects(st)
    assert eff["excess_churn"] == 0.0 and eff["jaccard_churn"] == 0.0 and eff["flip_churn"] == 0.0


def test_relative_variation_and_known_ratio():
    # two fraction series with known relative step-to-step variation: ln(R_A / R_D) = ln 2
    f_d = np.array([0.40, 0.41, 0.40, 0.41, 0.40])
    f_a = np.array([0.20, 0.21, 0.20, 0.21, 0.20])
    assert g21.relative_variation(f_d) == pytest.approx(0.01 / 0.404)
    assert g21.relative_variation(f_a) == pytest.approx(0.01 / 0.204)
    st = {"I_A": 0.6, "I_D": 0.3, "N_A": 0.3, "N_D": 0.3, "flips_A": 0.1, "flips_D": 0.4,
          "R_A": g21.relative_variation(f_a), "R_D": g21.relative_variation(f_d)}
    eff = g21.seed_effects(st)
    assert eff["jaccard_churn"] == pytest.approx(math.log(2))
    assert eff["excess_churn"] == pytest.approx(math.log(2))
    assert eff["flip_churn"] == pytest.approx(math.log(0.25))
    assert eff["fraction_variation"] == pytest.approx(math.log(0.404 / 0.204))
    # the excess ratio removes what the null explains: A churns twice as much, and so does its null
    st.update(N_A=0.6)
    assert g21.seed_effects(st)["excess_churn"] == pytest.approx(0.0, abs=1e-12)
    assert math.isnan(g21.relative_variation([0.0, 0.0]))
    with pytest.raises(ValueError):
        g21.relative_variation([0.3])


def test_churn_of_a_known_threshold_set():
    # ReLU, one unit: z moves from -1 to +1 for 2 of 8 examples -> D loses 2 of 6 members
    relu = get_activation("relu")
    z0 = np.array([[-1.0]] * 6 + [[1.0]] * 2, np.float32)
    z1 = z0.copy()
    z1[:2] = 1.0
    st = g21.churn(relu, [[z0], [z1]], 0.0, 0.0, np.random.default_rng(0))
    assert st["I_D"] == pytest.approx(1 - 4 / 6) and st["flips_D"] == pytest.approx(2 / 8)
    assert st["frac_D"] == [0.75, 0.5]


def test_permuted_step_keeps_each_units_displacements():
    rng = np.random.default_rng(3)
    z0, z1 = rng.normal(size=(50, 7)), rng.normal(size=(50, 7))
    zn = g21.permuted_step(z0, z1, np.random.default_rng(4))
    for j in range(7):
        assert np.allclose(np.sort(zn[:, j] - z0[:, j]), np.sort(z1[:, j] - z0[:, j]))
    assert not np.allclose(zn, z1)
    # a displacement common to every example of a unit: the null is the observed step exactly
    common = z0 + rng.normal(size=(1, 7))
    assert np.allclose(g21.permuted_step(z0, common, rng), common)
    with pytest.raises(ValueError):
        g21.permuted_step(z0, z1[:, :3], rng)


def test_null_matches_churn_when_motion_ignores_position():
    # i.i.d. displacements independent of z: observed and permuted churn agree (excess ratio ~ 0)
    gelu = get_activation("gelu")
    rng = np.random.default_rng(5)
    z = [rng.normal(size=(400, 100)).astype(np.float32)]
    for _ in range(3):
        z.append(z[-1] + 0.3 * rng.normal(size=z[-1].shape).astype(np.float32))
    st = g21.churn(gelu, [[x] for x in z], g21.TAU, g21.TAU, np.random.default_rng(6))
    assert abs(g21.seed_effects(st)["excess_churn"]) < 0.05
    # and a motion that keeps members of D in place is more stable than its null: positive effect on D's side
    z2 = [z[0]]
    for _ in range(3):
        step = 0.3 * rng.normal(size=z[0].shape).astype(np.float32)
        inside = np.asarray(g21.deriv_set(gelu, z2[-1], g21.TAU))
        z2.append(z2[-1] + np.where(inside, 0.0, step))
    st2 = g21.churn(gelu, [[x] for x in z2], g21.TAU, g21.TAU, np.random.default_rng(7))
    assert st2["I_D"] < st2["N_D"] and g21.seed_effects(st2)["excess_churn"] > 0.1


def test_tolerance_sets():
    gelu = get_activation("gelu")
    z = np.array([-10.0, -0.7518, 0.0, 0.01, 2.0], np.float32)
    d = g21.deriv_set(gelu, z, 0.1)
    assert d.tolist() == [True, True, False, False, False]
    a = g21.act_set(gelu, z, 0.1)  # RMS of a ~ 0.9: |a| <= ~0.09
    assert a.tolist() == [True, False, True, True, False]
    with pytest.raises(ValueError):
        g21.deriv_set(gelu, z, -1.0)


def test_window_steps():
    assert g21.window_steps(1000, 50) == [800, 850, 900, 950, 1000]
    assert g21.window_steps(120, 12) == [96, 108, 120]
    with pytest.raises(ValueError):
        g21.window_steps(100, 60)


def test_plan_every_preset_gates_every_primary_per_arm():
    for preset in PRESETS:
        plan = g21.CHECK.make_plan(preset)
        assert plan.section == "theory" and set(plan.deciding) == {"gelu_excess_churn", "same_sign_excess_churn"}
        gates = {g.name: g for g in plan.gates}
        for part in plan.parts:
            arm = part.name.split("_excess")[0].split("_jaccard")[0].split("_flip")[0].split("_fraction")[0]
            assert {a for g in part.gates for a in gates[g].arms} == {arm}, part.name
        cfgs = {a.name: a.config for a in plan.arms}
        assert cfgs["gelu"]["activation"] == "gelu" and cfgs["same_sign"]["activation"] == "sshaped2(1.5,1.6,1.6)"
        assert all(c["checkpoint_every"] == g21.CKPT[preset] for c in cfgs.values())


def test_smoke_end_to_end(tmp_path):
    res = smoke_check(g21.CHECK, tmp_path)
    same = res.per_seed["same_sign/J_spec21_D"]
    assert min(same) > 0.99  # SPEC 2.1's set on the shifted arm is the flat set
