"""G7 (spectral concentration, no collapse): closed forms, planted matrices, and the plan against run()."""

from __future__ import annotations

import math
from types import SimpleNamespace

import equinox as eqx
import numpy as np
import pytest

from gradsparse.spectra import mass_ratio
from theory_checks import g07_spectral_concentration as g07
from theory_checks.context import SGD, Context, init_model, sgd_config
from theory_checks.plan import check_against_plan, judge


def test_mp_mass80_matches_a_sampled_iid_matrix():
    # MP(1/4): the review's 4.2; an iid 2000 x 500 Gaussian matrix has the same 80% window within 3%
    assert g07.mp_mass80(0.25) == pytest.approx(4.20, abs=0.01)
    rng = np.random.default_rng(0)
    s = np.linalg.svd(rng.standard_normal((2000, 500)), compute_uv=False)
    assert mass_ratio(s ** 2) == pytest.approx(g07.mp_mass80(0.25), rel=0.03)
    assert g07.mp_mass80(0.1) < g07.mp_mass80(0.25) < g07.mp_mass80(0.5)


def test_iid_null_tends_to_mp_at_the_shape_ratio_and_a_planted_low_rank_k_fails_the_margin():
    # N = 5120 samples (c_eta = n/N = 0.05): the iid accumulation is MP at the shape ratio d/n = 1/4
    null = g07.iid_null_mass80(256, 64, 160, 32, 1.0, seed=1)
    assert null == pytest.approx(g07.mp_mass80(0.25), rel=0.08)
    # fewer samples (c_eta 0.2), or heavy decay (Kish N ~ 2100): the finite-N correction widens the window
    assert g07.iid_null_mass80(256, 64, 40, 32, 1.0, seed=1) > 1.05 * g07.mp_mass80(0.25)
    assert g07.iid_null_mass80(256, 64, 200, 32, 0.97, seed=1) > 1.05 * g07.mp_mass80(0.25)
    rng = np.random.default_rng(2)
    K = rng.standard_normal((256, 64))
    assert g07.log_ratio(g07.mass80(K), null) < g07.MASS_MARGIN
    # a few spikes do not move the 80% window (up to 20% of the eigenvalues may lie outside it) ...
    spikes = 30 * rng.standard_normal((256, 3)) @ rng.standard_normal((3, 64)) + K
    assert g07.log_ratio(g07.mass80(spikes), null) < g07.MASS_MARGIN
    # ... a signal of rank 16 (25% of d) 30x the bulk does: the window widens far beyond 2x
    spikes = 30 * rng.standard_normal((256, 16)) @ rng.standard_normal((16, 64)) + K
    assert g07.log_ratio(g07.mass80(spikes), null) > 3 * g07.MASS_MARGIN
    with pytest.raises(ValueError):
        g07.iid_null_mass80(8, 4, 10, 4, 1.5)


def test_decay_and_init_share_closed_forms():
    assert g07.wd_for(SGD["quick"]) == pytest.approx(0.03)
    assert g07.decay_factor(0.1, 0.03, 2000) == pytest.approx(math.exp(-6.0), rel=0.01)
    assert g07.decay_factor(0.1, 0.0, 2000) == 1.0
    rng = np.random.default_rng(3)
    K0 = rng.standard_normal((64, 16))
    # K = K0 + a small update: the init carries ~1/(1 + 0.2^2) of ||K||^2, K moved 0.2: both gates fail
    K = K0 + 0.2 * rng.standard_normal((64, 16))
    assert g07.init_share(K, K0, 1.0) == pytest.approx(1 / 1.04, abs=0.03)
    assert g07.relative_move([K], [K0]) == pytest.approx(0.2, abs=0.02)
    # K = r^T K0 + A with A of unit scale and r^T = e^-6: the init's share is ~e^-12
    r = g07.decay_factor(0.1, 0.03, 2000)
    K = r * K0 + rng.standard_normal((64, 16))
    assert g07.init_share(K, K0, r) < 1e-4
    with pytest.raises(ValueError):
        g07.init_share(np.zeros((4, 2)), np.ones((4, 2)), 1.0)
    with pytest.raises(ValueError):
        g07.wd_changes(0.0)
    with pytest.raises(ValueError):
        g07.log_ratio(0.0, 1.0)


def test_gates_fail_for_a_k_that_is_mostly_its_initialisation():
    st = {"init_share": [0.9, 0.92, 0.88], "acc": [0.7, 0.7, 0.7], "moved": [0.05, 0.3, 0.3]}
    by = {g.name: g for g in g07.measure_gates(st, st, [p.name for p in g07.gate_plans()])}
    assert not by["wd_init_forgotten"].ok and not by["sgd_init_forgotten"].ok and not by["sgd_moved"].ok
    assert by["wd_learned"].ok
    st = {"init_share": [1e-3, 2e-3, 0.05], "acc": [0.45, 0.5, 0.29], "moved": [0.3, 0.3, 0.3]}
    by = {g.name: g for g in g07.measure_gates(st, st, [p.name for p in g07.gate_plans()])}
    assert by["wd_init_forgotten"].ok and by["sgd_moved"].ok and not by["wd_learned"].ok


def _fake_runs(cfg, ds, seeds, make_k, acc=0.6, gv=(1.0, 0.8)):
    """Runs whose models are the real initial models with K replaced by make_k(K0, rng)."""
    runs = []
    for s in seeds:
        m = init_model(cfg.replace(seed=s), ds)
        rng = np.random.default_rng(s + 7)
        for i, b in enumerate(m.mlp_blocks()):
            K0 = np.asarray(b.key.weight)
            m = eqx.tree_at(lambda t, i=i: t.blocks[i].key.weight, m, np.asarray(make_k(K0, rng), np.float32))
        L = len(m.mlp_blocks())
        hist = [{"step": 0, "train/gv_norm": [gv[0]] * L, "heldout/density": [0.5] * L},
                {"step": cfg.steps, "train/gv_norm": [gv[1]] * L, "heldout/density": [0.4] * L}]
        runs.append(SimpleNamespace(model=m, history=hist, final={"test_accuracy": acc}))
    return runs


def _spread(K0, rng):
    """A matrix of K0's shape whose singular values fall geometrically over 3 decades."""
    n, d = K0.shape
    u, _ = np.linalg.qr(rng.standard_normal((n, d)))
    v, _ = np.linalg.qr(rng.standard_normal((d, d)))
    return K0.std() * (u * np.logspace(0, -3, d)) @ v.T * math.sqrt(n)


def _run_with(monkeypatch, wd_k, sgd_k):
    ctx = Context(preset="smoke", seeds=[0, 1, 2])
    p = g07.CHECK.params("smoke")
    wcfg = g07.wd_arm_config("smoke", p["wd"])
    ds = ctx.data(wcfg.data, wcfg.n_train, wcfg.n_test)

    def fake_sgd_runs(c, **changes):
        cfg = sgd_config("smoke", **changes)
        return _fake_runs(cfg, ds, c.seeds, wd_k if changes else sgd_k)

    monkeypatch.setattr(g07, "sgd_runs", fake_sgd_runs)
    f = g07.run(ctx, p)
    runs = fake_sgd_runs(ctx, **g07.wd_changes(p["wd"]))   # the gates' cheap path (G8) agrees with the full one
    full, cheap = g07.arm_stats(runs, wcfg, ds, ctx.seeds), g07.gate_stats(runs, wcfg, ds, ctx.seeds)
    assert all(np.allclose(full[k], cheap[k]) for k in cheap)
    plan = g07.CHECK.make_plan("smoke")
    check_against_plan(plan, f.parts, f.gates)   # the measured parts are exactly the planned ones
    return judge(plan, f.parts, f.gates)


def test_plan_matches_run_and_planted_spectra_decide(monkeypatch):
    r = g07.decay_factor(0.1, g07.CHECK.params("smoke")["wd"], SGD["smoke"]["steps"])
    # wd arm: decayed init + an iid accumulation -> concentrated like the null: PASS; wd 0: K0 + 30% iid update
    iid = lambda K0, rng: r * K0 + K0.std() * rng.standard_normal(K0.shape)  # noqa: E731
    moved = lambda K0, rng: K0 + 0.3 * K0.std() * rng.standard_normal(K0.shape)  # noqa: E731
    verdict, parts = _run_with(monkeypatch, iid, moved)
    assert parts["wd_concentrated"].verdict == "PASS", parts["wd_concentrated"].reason
    assert parts["sgd_fro_kept"].verdict == "PASS" and parts["sgd_gv_kept"].verdict == "PASS"
    assert parts["sgd_concentrated"].reason.startswith("regime not reached")
    assert verdict.verdict == "PASS"
    # wd arm: singular values spread over 3 decades (a strongly anisotropic K): far wider than the null: FAIL
    verdict, parts = _run_with(monkeypatch, _spread, moved)
    assert parts["wd_concentrated"].verdict == "FAIL" and verdict.verdict == "FAIL"
    # wd arm not trained (K is the decayed init alone): the gate says so, whatever the spectrum
    verdict, parts = _run_with(monkeypatch, lambda K0, rng: r * K0, moved)
    assert parts["wd_concentrated"].reason.startswith("regime not reached: wd_init_forgotten")
    assert verdict.verdict == "INCONCLUSIVE"


def test_plan_is_pure_and_valid_for_every_preset():
    for preset in ("smoke", "quick", "standard", "full"):
        plan = g07.CHECK.make_plan(preset)
        assert [a.name for a in plan.arms] == ["sgd", "sgd_wd"]
        wd = plan.arms[1].config
        assert wd["weight_decay"] * wd["lr"] * wd["steps"] == pytest.approx(g07.DECAY_EXPONENT, rel=1e-4)
        assert wd["ln_affine"] is False and plan.arms[0].config["weight_decay"] == 0
        assert plan.deciding == ["wd_concentrated", "sgd_fro_kept", "sgd_gv_kept"]
