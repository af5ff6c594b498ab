"""G10 (modules from scratch): the lever computations on constructed models, the plan, and run()
against its plan on planted per-seed numbers (no training)."""

from __future__ import annotations

import types

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gradsparse.models.transformer import ByteLM
from theory_checks import g10_modules_from_scratch as g10
from theory_checks.context import Context
from theory_checks.plan import judge


def _lm(gamma: float | np.ndarray = 1.0, beta: float = 0.0, b0: np.ndarray | None = None) -> ByteLM:
    m = ByteLM.create(jax.random.PRNGKey(0), seq_len=8, width=16, depth=2, heads=2)
    for i in range(2):
        g = jnp.broadcast_to(jnp.asarray(gamma, jnp.float32), (16,))
        m = eqx.tree_at(lambda t: t.blocks[i].mlp.ln.weight, m, g)
        m = eqx.tree_at(lambda t: t.blocks[i].mlp.ln.bias, m, jnp.full((16,), beta, jnp.float32))
        if b0 is not None:
            m = eqx.tree_at(lambda t: t.blocks[i].mlp.zeroth_bias, m, jnp.asarray(b0, jnp.float32),
                            is_leaf=lambda x: x is None)
    return m


def _tokens(n: int = 4) -> np.ndarray:
    return np.asarray(jax.random.randint(jax.random.PRNGKey(1), (n, 8), 0, 256))


def test_input_sq_per_dim_is_gamma_squared():
    """x = gamma * u with ||u||^2 = d var/(var + eps) ~ d: ||x||^2/d = gamma^2 (up to eps)."""
    for c in (0.5, 1.0, 2.0):
        v = g10.input_sq_per_dim(_lm(c), _tokens())
        assert len(v) == 2
        np.testing.assert_allclose(v, c * c, rtol=2e-3)


def test_input_sq_per_dim_adds_a_feature_constant_zeroth_bias():
    """b0[t, j] = b for all j: the cross term sum_j u_j b vanishes (u is centred), so
    ||x||^2/d = gamma^2 + b^2."""
    b0 = np.full((8, 16), 0.3)
    v = g10.input_sq_per_dim(_lm(1.5, b0=b0), _tokens())
    np.testing.assert_allclose(v, 1.5 ** 2 + 0.3 ** 2, rtol=2e-3)


def test_gamma_summary_on_known_gamma():
    g = np.array([0.5, -0.8, 1.0, 2.0] * 4)
    s = g10.gamma_summary(_lm(g))
    assert s[0]["mean"] == pytest.approx(np.mean(np.abs(g)), rel=1e-6)
    assert s[0]["below1"] == pytest.approx(0.5)  # |0.5|, |-0.8| below 1; 1.0 is not
    assert s[0]["q50"] == pytest.approx(np.median(np.abs(g)), rel=1e-6)


def test_zeroth_bias_fill_and_at_clip():
    gamma = np.linspace(1.0, 2.0, 16)
    bound = 0.1 * gamma
    full = g10.zeroth_bias_fill(_lm(gamma, b0=np.tile(bound, (8, 1))))
    assert full[0]["fill"] == pytest.approx(1.0, rel=1e-5) and full[0]["at_clip"] == 1.0
    half = g10.zeroth_bias_fill(_lm(gamma, b0=np.tile(-0.5 * bound, (8, 1))))
    assert half[1]["fill"] == pytest.approx(0.5, rel=1e-5) and half[1]["at_clip"] == 0.0
    none = g10.zeroth_bias_fill(_lm(gamma))
    assert none == [{"fill": 0.0, "at_clip": 0.0, "norm": 0.0}] * 2
    with pytest.raises(ValueError, match="clip"):
        g10.zeroth_bias_fill(_lm(), clip=0.0)


def test_plan_is_pure_and_well_formed():
    for preset in ("smoke", "quick", "standard", "full"):
        pl = g10.CHECK.make_plan(preset)
        assert pl.seeds == (None if preset == "smoke" else 5)
        names = {p.name for p in pl.parts}
        for a in g10.CHECK.params(preset)["arms"]:
            assert {f"{a}_lowers", f"{a}_quality_kept"} <= names
        # a module's part needs its own lever's gate; quality parts are margin parts (error control)
        for p in pl.parts:
            if p.name == "restricted_ln_lowers":
                assert "rln_x_raised" in p.gates
            if p.name in ("zeroth_bias_lowers", "db_mlp_lowers"):
                assert {"zb_used", "db_zb_used"} & set(p.gates)
            if p.name.endswith("quality_kept"):
                assert p.kind == "margin"
    quick = g10.CHECK.make_plan("quick")
    assert "db_mlp" in [a.name for a in quick.arms]
    assert all(p.role == "primary" for p in quick.parts)


def _run(dens: float, loss: float, step0_loss: float = 5.0):
    hist = [{"step": 0, "heldout/loss": step0_loss, "heldout/density/mean": 0.5, "heldout/dsigma_sq/mean": 0.5},
            {"step": 100, "heldout/loss": loss, "heldout/density/mean": dens, "heldout/dsigma_sq/mean": dens}]
    return types.SimpleNamespace(history=hist, model=None, final={})


def test_run_matches_plan_and_gates_each_module_on_its_lever(monkeypatch):
    """Planted: every module lowers density by 0.05 (+ seed noise) at equal loss; the restricted LN
    raises ||x||^2/d by only 3% (its gate fails: INCONCLUSIVE), the zeroth bias fills 0.5 (gate holds)."""
    seeds = [0, 1, 2, 3, 4]
    rng = np.random.default_rng(0)
    base = 0.3 + 0.02 * rng.standard_normal(5)
    noise = {a: 0.003 * rng.standard_normal(5) for a in g10.ARMS}

    def fake_lm_runs(ctx, **changes):
        arm = next((a for a, ch in g10.ARMS.items() if all(changes.get(k) == v for k, v in ch.items())), None)
        if arm is None:
            return [_run(b, 2.0) for b in base]
        return [_run(b - 0.05 + e, 2.0 + e) for b, e in zip(base, noise[arm])]

    def fake_levers(ctx, cfg, runs):
        x = 1.03 if cfg.restricted_ln and not cfg.zeroth_bias else 1.0
        fill = 0.5 if cfg.zeroth_bias else 0.0
        n = len(runs)
        return {"x_sq_per_d": [x] * n, "gamma_mean": [1.0] * n, "gamma_below1": [0.5] * n, "zb_fill": [fill] * n,
                "zb_at_clip": [0.05] * n, "dsigma_sq": [0.3] * n}

    monkeypatch.setattr(g10, "lm_runs", fake_lm_runs)
    monkeypatch.setattr(g10, "levers", fake_levers)
    ctx = Context(preset="quick", seeds=seeds)
    p = g10.CHECK.params("quick")
    f = g10.run(ctx, p)
    verdict, parts = judge(g10.CHECK.make_plan("quick"), f.parts, f.gates)
    assert parts["zeroth_bias_lowers"].verdict == "PASS"
    assert parts["db_mlp_lowers"].verdict == "PASS"
    assert parts["jsrelu_lowers"].verdict == "PASS"
    assert parts["restricted_ln_lowers"].verdict == "INCONCLUSIVE"
    assert "rln_x_raised" in parts["restricted_ln_lowers"].reason
    assert parts["db_mlp_quality_kept"].verdict == "PASS"
    assert verdict.verdict == "INCONCLUSIVE"  # the idle lever keeps one primary open
    assert len(f.per_seed["x_sq_ratio_restricted_ln"]) == 5
