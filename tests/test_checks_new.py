"""G15 (GD vs SGD at matched loss) and G16 (the update's MP bulk where weight decay forgot the init):
plans, the statistics on synthetic cases with known answers, and each check end to end at smoke."""

from __future__ import annotations

import math

import numpy as np
import pytest

from theory_checks import g05_sgd_noise as g05
from theory_checks import g07_spectral_concentration as g07
from theory_checks import g15_gd_vs_sgd as g15
from theory_checks import g16_wd_update_mp as g16
from theory_checks.context import Context
from theory_checks.plan import judge
from theory_checks.protocol import PRESETS
from theory_checks.suite import run_check

NEW = (g15, g16)


def _arms(mod, preset="quick"):
    return {a.name: a.config for a in mod.CHECK.make_plan(preset).arms}


@pytest.mark.parametrize("mod", NEW, ids=lambda m: m.CHECK.name)
def test_plans_validate_at_every_preset_with_primaries_and_gated_parts(mod):
    for preset in PRESETS:
        plan = mod.CHECK.make_plan(preset)
        assert plan.section == "theory" and plan.deciding
        gates = {g.name: g for g in plan.gates}
        for part in plan.parts:
            if part.role == "primary":
                # every primary is gated, and every arm it compares carries one of its gates
                assert part.gates, part.name
                assert {a for g in part.gates for a in gates[g].arms}, part.name


def test_new_checks_reuse_the_shared_runs():
    """An arm with the same config as another check's arm is one run for the executor: G15's sgd arm is
    G5's ref, G16's arms are G7's."""
    for preset in ("smoke", "quick", "full"):
        g5, g7_ = _arms(g05, preset), _arms(g07, preset)
        assert _arms(g15, preset)["sgd"] == g5["ref"] == g7_["sgd"]
        assert _arms(g16, preset) == {"sgd": g7_["sgd"], "sgd_wd": g7_["sgd_wd"]}
    gd = _arms(g15)["gd"]
    assert gd["batch_size"] == 4000 and gd["optimizer"] == "sgd" and gd["lr"] == _arms(g05)["ref"]["lr"]
    assert gd["steps"] == g15.GD_STEPS["quick"] and gd["flatness_every"] == 0 and gd["flatness_subset"] == 512


def _log(steps, loss, dens, blocks=4):
    # held-out density per block; blocks 2..L carry `dens`, block 1 a decoy value that must be ignored
    return [{"step": int(s), "fixed/loss": float(l), "heldout/density": [0.99] + [float(d)] * (blocks - 1)}
            for s, l, d in zip(steps, loss, dens)]


def test_g15_matched_loss_on_synthetic_logs():
    s = np.arange(0, 2001, 100)
    sgd = _log(s, 2.0 - 1.8 * s / 2000, 0.5 - 0.2 * s / 2000)   # loss 2 -> 0.2, density 0.5 -> 0.3
    g = np.arange(0, 301, 25)
    gd = _log(g, 2.0 - 0.9 * g / 300, 0.5 - 0.01 * g / 300)     # ends at loss 1.1, density 0.49
    n = g15.seed_numbers(sgd, gd)
    # sgd reaches 1.1 at step 1000, where its density is 0.4: GD is 0.09 denser at matched loss
    assert n["matched_step"] == pytest.approx(1000.0)
    assert n["sgd_density_at_match"] == pytest.approx(0.4)
    assert n["gd_density"] == pytest.approx(0.49) and n["gd_density_start"] == pytest.approx(0.5)
    assert n["sgd_density_same_step"] == pytest.approx(0.47)
    assert n["sgd_density_end"] == pytest.approx(0.5 - 0.2 * np.mean([1800, 1900, 2000]) / 2000)
    vals, probs, gates = g15.measure([n, n, n])
    assert vals["gd_less_sparse_at_matched_loss"] == pytest.approx([0.09] * 3)
    assert all(p is None for p in probs["gd_less_sparse_at_matched_loss"])
    by = {x.name: x for x in gates}
    assert by["gd_not_interpolated"].ok and by["gd_learned"].ok and by["sgd_reaches_gd_loss"].ok
    assert by["sgd_reaches_gd_loss"].value == pytest.approx(0.2 / 1.1)
    # a GD arm still near chance is outside the regime; an SGD run that never gets there has no matched point
    early = g15.seed_numbers(sgd, _log(g, 2.3 - 0.1 * g / 300, [0.5] * len(g)))
    assert not {x.name: x for x in g15.measure([early] * 3)[2]}["gd_learned"].ok
    far = g15.seed_numbers(sgd, _log(g, 2.0 - 1.9 * g / 300, [0.5] * len(g)))  # GD at 0.1 < sgd's best 0.2
    assert math.isnan(far["matched_step"]) and "never reached" in far["problem"]
    vals, probs, gates = g15.measure([far] * 3)
    v = g15.decide(vals["gd_less_sparse_at_matched_loss"], probs["gd_less_sparse_at_matched_loss"], g15.PARTS[0])
    assert v.verdict == "INCONCLUSIVE" and v.reason.startswith("undefined for seed #0")
    assert not {x.name: x for x in gates}["sgd_reaches_gd_loss"].ok


def test_g16_update_bulk_z_separates_iid_noise_from_a_spread_bulk():
    n, d, steps, batch = 128, 32, 40, 8
    w = 0.95 ** np.arange(steps)[::-1]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((d, steps * batch)) * np.repeat(w, batch)[None, :]
    U = rng.standard_normal((n, steps * batch)) @ x.T          # an iid-factor accumulation: the null itself
    iid = g16.update_stats(U, steps, batch, w, np.random.default_rng(1), draws=12)
    assert iid["z"] < 2.0
    # its 80% window is the simulated accumulation's (finite N and decay widen it beyond MP(d/n) = 4.2)
    assert iid["mass80"] == pytest.approx(g07.iid_null_mass80(n, d, steps, batch, 0.95, seed=3), rel=0.25)
    assert iid["mass80"] > g07.mp_mass80(d / n)
    u, _ = np.linalg.qr(rng.standard_normal((n, d)))
    v, _ = np.linalg.qr(rng.standard_normal((d, d)))
    two = (u * np.r_[np.ones(d // 2), 3 * np.ones(d // 2)]) @ v.T  # a two-cluster bulk: no MP law fits it
    bad = g16.update_stats(two, steps, batch, w, np.random.default_rng(1), draws=12)
    assert bad["spikes"] == 0 and bad["z"] > 5.0
    assert bad["mass80"] == pytest.approx(9.0)                 # the squared ratio of the two clusters


def test_g16_init_range_counts_the_remnant_of_the_initialisation():
    # K = a decayed iid init (tiny) + a rank-4 trained signal (large): by energy the init is nothing,
    # by count 60 of K's 64 singular values are the init's
    rng = np.random.default_rng(0)
    K0 = rng.standard_normal((256, 64)) / 8
    sig = 3 * rng.standard_normal((256, 4)) @ rng.standard_normal((4, 64)) / 8
    dec = 0.0025
    K = dec * K0 + sig
    assert g07.init_share(K, K0, dec) < 1e-4
    assert g16.init_range_share(K, dec * K0) == pytest.approx(60 / 64)
    # ... and K's 80%-mass ratio is MP-like, though it is the remnant's: the trained part has rank 4
    assert g07.mass80(K) < 1.2 * g07.mp_mass80(0.25)


def test_g16_decay_weights_follow_the_arm():
    cfg = g07.wd_arm_config("quick", g16.CHECK.params("quick")["wd"])
    steps, w = g16.decay_weights(cfg)
    r = 1 - cfg.lr * cfg.weight_decay
    assert steps == min(cfg.steps, g07.null_window(cfg.steps, cfg.lr, cfg.weight_decay)) and w[-1] == 1.0
    assert w[0] == pytest.approx(r ** (steps - 1))


@pytest.mark.parametrize("mod", NEW, ids=lambda m: m.CHECK.name)
def test_smoke_end_to_end(mod, tmp_path):
    ctx = Context(preset="smoke", seeds=[0, 1, 2], out_dir=tmp_path)
    plan = mod.CHECK.make_plan("smoke")
    res = run_check(mod.CHECK, ctx, fig_dir=tmp_path / "figures", plan=plan)
    assert res.error is None and res.unplanned == []
    assert set(res.parts) == {p.name for p in plan.parts}
    assert set(res.primaries) == set(plan.deciding)
    assert {g["name"] for g in res.gates} == {g.name for g in plan.gates}
    for k, vals in res.per_seed.items():
        assert len(vals) == 3 and all(math.isfinite(v) for v in vals), k
    for f in res.figures:
        assert (tmp_path / f).is_file()
