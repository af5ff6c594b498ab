"""G8 (eta^T K K^T eta bounds; routes not opened by training): planted statistics and the plan against run()."""

from __future__ import annotations

import math
from types import SimpleNamespace

import equinox as eqx
import numpy as np
import pytest

from theory_checks import g07_spectral_concentration as g07
from theory_checks import g08_kkt_bounds as g08
from theory_checks.context import SGD, Context, init_model, sgd_config
from theory_checks.plan import check_against_plan, judge
from theory_checks.verdicts import margin_verdict


def _stats(share: float, rho: float) -> dict[str, float]:
    return {"proj_frac_median": share, "rho_over_mean_median": rho}


def test_route_harms_closed_forms():
    init = [_stats(0.25, 1.0)] * 3
    # training raised the share and rho (the wd pilot: 0.8 and 11): negative harms, routes closed
    sh, rh = g08.route_harms([_stats(0.25, 1.0), _stats(0.8, 11.0), _stats(0.8, 11.0)], init)
    assert sh == pytest.approx(math.log(0.25 / 0.8)) and rh == pytest.approx(-math.log(11.0))
    # block 1 is left out (its inputs span the data's 40 features); the worst later block decides
    sh, rh = g08.route_harms([_stats(1e-3, 1e-3), _stats(0.125, 2.0), _stats(0.5, 0.25)], init)
    assert sh == pytest.approx(math.log(2.0)) and rh == pytest.approx(math.log(4.0))
    # a route opened completely (share 0) gives a large finite harm, not a crash
    sh, _ = g08.route_harms([_stats(0.25, 1.0), _stats(0.0, 1.0), _stats(0.25, 1.0)], init)
    assert math.isfinite(sh) and sh > 20
    with pytest.raises(ValueError):
        g08.route_harms(init[:2], init)


def test_eta_hidden_in_the_null_space_opens_the_route_and_fails_the_margin():
    rng = np.random.default_rng(0)
    n, d = 32, 8
    K = rng.standard_normal((n, d))
    q, _ = np.linalg.qr(K, mode="complete")
    eta_rand = rng.standard_normal((200, n))
    eta_null = (rng.standard_normal((200, n - d)) @ q[:, d:].T) + 1e-3 * eta_rand   # almost all in null(K^T)
    init = g08.bound_stats(K, eta_rand)
    hid = g08.bound_stats(K, eta_null)
    assert init["proj_frac_median"] == pytest.approx(d / n, rel=0.35) and hid["proj_frac_median"] < 1e-4
    assert hid["sandwich_frac"] == 1.0   # the sandwich is a theorem: it holds whatever eta does
    harms = [g08.route_harms([init, hid], [init, init])[0] + e for e in (0.0, 0.1, -0.1)]
    assert margin_verdict(harms, g08.ROUTE_MARGIN).verdict == "FAIL"
    # eta inside range(K): the share is 1, the route is closed
    inside = g08.bound_stats(K, rng.standard_normal((50, d)) @ q[:, :d].T)
    assert inside["proj_frac_median"] == pytest.approx(1.0)


def _fake_runs(cfg, ds, seeds, make_k):
    runs = []
    for s in seeds:
        m = init_model(cfg.replace(seed=s), ds)
        rng = np.random.default_rng(s + 11)
        for i, b in enumerate(m.mlp_blocks()):
            m = eqx.tree_at(lambda t, i=i: t.blocks[i].key.weight, m,
                            np.asarray(make_k(np.asarray(b.key.weight), rng), np.float32))
        L = len(m.mlp_blocks())
        hist = [{"step": 0, "train/gv_norm": [1.0] * L, "heldout/density": [0.5] * L},
                {"step": cfg.steps, "train/gv_norm": [0.8] * L, "heldout/density": [0.4] * L}]
        runs.append(SimpleNamespace(model=m, history=hist, final={"test_accuracy": 0.6}))
    return runs


def test_plan_matches_run(monkeypatch):
    ctx = Context(preset="smoke", seeds=[0, 1, 2])
    p = g08.CHECK.params("smoke")
    r = g07.decay_factor(0.1, p["wd"], SGD["smoke"]["steps"])
    ds = ctx.data("mnist1d")

    def fake(c, **changes):
        k = (lambda K0, rng: r * K0 + K0.std() * rng.standard_normal(K0.shape)) if changes else \
            (lambda K0, rng: K0 + 0.3 * K0.std() * rng.standard_normal(K0.shape))
        return _fake_runs(sgd_config("smoke", **changes), ds, c.seeds, k)

    monkeypatch.setattr(g07, "sgd_runs", fake)
    monkeypatch.setattr(g08, "sgd_runs", fake)
    f = g08.run(ctx, p)
    plan = g08.CHECK.make_plan("smoke")
    check_against_plan(plan, f.parts, f.gates)
    verdict, parts = judge(plan, f.parts, f.gates)
    assert parts["sandwich"].verdict == "PASS" and parts["sandwich"].role == "implementation"
    assert parts["sgd_null_route_closed"].reason.startswith("regime not reached: sgd_init_forgotten")
    # an iid K replacing the initialisation: eta's share and rho stay at their random-direction levels
    assert parts["wd_null_route_closed"].verdict == "PASS", parts["wd_null_route_closed"].reason
    assert verdict.verdict in ("PASS", "INCONCLUSIVE")


def test_plan_is_pure_and_shares_g07_arms():
    for preset in ("smoke", "quick", "standard", "full"):
        p8, p7 = g08.CHECK.make_plan(preset), g07.CHECK.make_plan(preset)
        assert [a.config for a in p8.arms] == [a.config for a in p7.arms]  # same configs: the runs are shared
        assert {g.name for g in p8.gates} == set(g08.GATES)
        assert p8.deciding == ["wd_null_route_closed", "wd_small_eigen_route_closed"]
        assert [q.name for q in p8.parts if q.role == "implementation"] == ["sandwich"]
