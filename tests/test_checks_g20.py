"""G20 (flatness implies robustness): the closed forms of its measurements on quadratics and on a
tiny model (finite differences), the scale invariances it relies on, the statistic and gates on
synthetic numbers, and the plan."""

from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from theory_checks import g05_sgd_noise as g05
from theory_checks import g12_weight_noise_transformer as g12
from theory_checks import g20_flatness_robustness as g20
from theory_checks.protocol import PRESETS

from gradsparse.models.mlp import ResidualMLP


def _quadratic(p: int, seed: int, top: float | None = None):
    """f(w) = 1/2 w^T H w + c^T w with H PSD (eigenvalues spread, the top one ``top`` if given)."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(p, p)))
    lam = np.linspace(0.1, 1.0, p)
    if top is not None:
        lam[-1] = top
    h = (q * lam) @ q.T
    c = rng.normal(size=p)
    H, C = jnp.asarray(h, jnp.float32), jnp.asarray(c, jnp.float32)
    return (lambda w: 0.5 * w["a"] @ (H @ w["a"]) + C @ w["a"]), h, lam


def test_random_increase_of_a_quadratic_is_eps2_over_2p_trace():
    p, eps = 8, 0.3
    f, h, _ = _quadratic(p, 0)
    w = {"a": jnp.asarray(np.random.default_rng(1).normal(size=p), jnp.float32)}
    mean, vals = jax.jit(lambda k: g20.random_increase(f, w, eps, k, 4000))(jax.random.key(3))
    # per draw: the antithetic increase is exactly eps^2/2 u^T H u (linear term cancels), so
    # 2 vals / eps^2 lies in the spectrum's range; over the sphere its mean is tr(H)/p
    lam_u = 2 * np.asarray(vals) / eps ** 2
    assert lam_u.min() >= 0.1 - 1e-3 and lam_u.max() <= 1.0 + 1e-3
    cf = g20.random_closed_form(eps, float(np.trace(h)), p)
    se = float(np.std(vals) / math.sqrt(vals.size))
    assert abs(float(mean) - cf) < 4 * se and abs(float(mean) / cf - 1) < 0.03
    # one fixed direction u: the increase equals eps^2/2 u^T H u to rounding
    u = np.random.default_rng(5).normal(size=p)
    u /= np.linalg.norm(u)
    fw = lambda s: float(f({"a": w["a"] + s * jnp.asarray(u, jnp.float32)}))  # noqa: E731
    inc = 0.5 * (fw(eps) + fw(-eps)) - fw(0.0)
    assert inc == pytest.approx(0.5 * eps ** 2 * u @ h @ u, rel=1e-4)


def test_worst_direction_of_a_quadratic_finds_the_top_eigenvalue():
    p, eps = 12, 0.05
    f, h, lam = _quadratic(p, 2, top=3.0)
    q = lambda w: 0.5 * w["a"] @ (jnp.asarray(h, jnp.float32) @ w["a"])  # noqa: E731  (minimum at 0: no gradient)
    w = {"a": jnp.zeros(p, jnp.float32)}
    out = jax.jit(lambda k: g20.worst_increase(q, w, eps, k, 40))(jax.random.key(0))
    assert float(out["grad_norm"]) == 0.0
    assert float(out["lambda_u"]) == pytest.approx(3.0, rel=1e-3)
    assert float(out["increase"]) == pytest.approx(0.5 * eps ** 2 * 3.0, rel=1e-3)
    # with a linear term the ascent beats the plain gradient step and any random direction
    w1 = {"a": jnp.asarray(np.random.default_rng(4).normal(size=p), jnp.float32)}
    out1 = jax.jit(lambda k: g20.worst_increase(f, w1, eps, k, 20))(jax.random.key(0))
    g = np.asarray(jax.grad(f)(w1)["a"])
    step = float(f({"a": w1["a"] + eps * jnp.asarray(g / np.linalg.norm(g))})) - float(f(w1))
    assert float(out1["increase"]) >= step - 1e-6
    lam = jax.jit(lambda k: g20.top_curvature(q, w, k, 60))(jax.random.key(1))
    assert float(lam) == pytest.approx(3.0, rel=1e-3)
    with pytest.raises(ValueError):
        g20.worst_increase(q, w, eps, jax.random.key(0), -1)
    with pytest.raises(ValueError):
        g20.random_increase(q, w, eps, jax.random.key(0), 0)


def _tiny(seed=0, depth=2):
    return ResidualMLP.create(jax.random.key(seed), 6, 3, width=8, depth=depth, mlp_ratio=2)


def _data(b, seed=1):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.normal(size=(b, 6)), jnp.float32), jnp.asarray(rng.integers(0, 3, b), jnp.int32)


def _shift_beta(model, l, delta):
    return eqx.tree_at(lambda m: m.blocks[l].ln.bias, model, model.blocks[l].ln.bias + delta)


def test_rx_matches_a_finite_difference_on_a_tiny_model():
    """Shifting the LN bias beta of block l by delta shifts x_l by delta (one token per sample), so
    d loss / d beta_l = dl/dx_l; along u = dl/dx / ||dl/dx|| the central difference is ||dl/dx||."""
    model = _tiny()
    x, y = _data(1)
    fs = g20.feature_sensitivity(model, x, y)
    for l in range(2):
        gb = jax.grad(lambda m: g20.mean_loss(m, x, y))(model).blocks[l].ln.bias
        assert float(fs["rx"][l]) == pytest.approx(float(jnp.sum(gb * gb)), rel=1e-4)
        u = gb / jnp.linalg.norm(gb)
        h = 1e-2
        fd = (float(g20.mean_loss(_shift_beta(model, l, h * u), x, y))
              - float(g20.mean_loss(_shift_beta(model, l, -h * u), x, y))) / (2 * h)
        assert fd ** 2 == pytest.approx(float(fs["rx"][l]), rel=2e-2)
    # a batch: R_x is the mean over samples of each sample's own ||dl/dx||^2 (per-sample loss)
    xb, yb = _data(5, seed=3)
    one = [g20.feature_sensitivity(model, xb[i:i + 1], yb[i:i + 1]) for i in range(5)]
    fb = g20.feature_sensitivity(model, xb, yb)
    np.testing.assert_allclose(np.asarray(fb["rx"]), np.mean([np.asarray(o["rx"]) for o in one], 0), rtol=1e-4)
    np.testing.assert_allclose(float(fb["g_out"]), np.mean([float(o["g_out"]) for o in one]), rtol=1e-4)
    p = jax.nn.softmax(model(xb, g20.zero_probes(model.mlp_blocks(), 5))[0])
    go = np.asarray(p) - np.eye(3)[np.asarray(yb)]
    assert float(fb["g_out"]) == pytest.approx(float(np.mean(np.sum(go * go, -1))), rel=1e-5)


def _rescale(model, s):
    """K_l -> s K_l, the LN's gamma, beta -> /s in every block: the same function."""
    for l in range(len(model.blocks)):
        b = model.blocks[l]
        model = eqx.tree_at(lambda m: (m.blocks[l].key.weight, m.blocks[l].ln.weight, m.blocks[l].ln.bias), model,
                            (b.key.weight * s, b.ln.weight / s, b.ln.bias / s))
    return model


def test_normalised_rx_and_relative_weight_perturbations_are_invariant_to_rescaling():
    model = _tiny(depth=3)
    model = eqx.tree_at(lambda m: m.blocks[0].ln.bias, model, 0.3 * jnp.ones(8))  # a nonzero beta
    x, y = _data(16)
    s = 2.0
    m2 = _rescale(model, s)
    assert float(g20.mean_loss(m2, x, y)) == pytest.approx(float(g20.mean_loss(model, x, y)), rel=1e-5)
    a, b = g20.feature_sensitivity(model, x, y), g20.feature_sensitivity(m2, x, y)
    np.testing.assert_allclose(np.asarray(b["rx"]), s ** 2 * np.asarray(a["rx"]), rtol=1e-3)
    ra = g20.normalised_rx(np.asarray(a["rx"]), np.asarray(a["x_sq"]), 8)
    rb = g20.normalised_rx(np.asarray(b["rx"]), np.asarray(b["x_sq"]), 8)
    assert rb == pytest.approx(ra, rel=1e-3)
    wa = g20.weight_robustness(model, x, y, jax.random.key(0), 1e-2, 1e-2, 3, 3)
    wb = g20.weight_robustness(m2, x, y, jax.random.key(0), 1e-2, 1e-2, 3, 3)
    assert float(wb["k_norm"]) == pytest.approx(s * float(wa["k_norm"]), rel=1e-5)
    assert float(wb["worst_increase"]) == pytest.approx(float(wa["worst_increase"]), rel=2e-2)
    assert float(wb["worst_increase"]) > 0 and float(wb["rand_increase"]) != 0
    with pytest.raises(ValueError):
        g20.normalised_rx([1.0, 2.0], [1.0], 8)


def _nums(loss, tn, rx, worst, amp=None, af=None, ratio=1.0):
    n = len(loss)
    return [{"loss": loss[i], "trace_norm": tn[i], "rx_norm": rx[i], "worst": worst[i],
             "rx_amp": (amp or rx)[i], "worst2": worst[i], "af_norm": (af or tn)[i], "rand_ratio": ratio}
            for i in range(n)]


def _synthetic(flip_lm=False):
    # lowlr sharper (trace 4x) and less robust (R 2x); the LM pair: rho0 sharper, robust in R_x iff not flip_lm;
    # bigB interpolated
    ref = _nums([0.2, 0.3, 0.25], [100, 110, 90], [1.0, 1.1, 0.9], [0.01, 0.012, 0.011])
    low = _nums([0.35, 0.4, 0.3], [400, 420, 390], [2.0, 2.3, 1.8], [0.03, 0.03, 0.02])
    big = _nums([1e-3, 2e-3, 1e-3], [10, 12, 9], [0.01, 0.02, 0.01], [1e-4, 1e-4, 1e-4])
    rx0 = [0.5, 0.6, 0.55] if flip_lm else [3.0, 3.2, 3.1]
    lm0 = _nums([2.0, 2.1, 2.0], [40, 41, 39], rx0, [0.2, 0.2, 0.2], ratio=1.2)
    lm5 = _nums([2.1, 2.2, 2.1], [10, 10, 11], [1.0, 1.0, 1.0], [0.1, 0.1, 0.1], ratio=0.8)
    return {"ref": ref, "lowlr": low, "bigB": big, "lm_rho0": lm0, "lm_rho0.5": lm5}


def test_measure_orients_by_the_trace_and_gates_each_arm():
    vals, gates = g20.measure(_synthetic())
    np.testing.assert_allclose(vals["sgd_lr_robust_x"], np.log([2.0, 2.3 / 1.1, 2.0]))
    np.testing.assert_allclose(vals["lm_noise_robust_w"], [math.log(2)] * 3)
    np.testing.assert_allclose(vals["random_matches_trace"], [(math.log(1.2) - math.log(0.8)) / 5] * 3)
    # the orientation comes from the trace: swap the traces of one pair and the sign flips
    syn = _synthetic()
    for i in range(3):
        syn["ref"][i]["trace_norm"], syn["lowlr"][i]["trace_norm"] = syn["lowlr"][i]["trace_norm"], \
            syn["ref"][i]["trace_norm"]
    np.testing.assert_allclose(g20.measure(syn)[0]["sgd_lr_robust_x"], -np.asarray(vals["sgd_lr_robust_x"]))
    g = {x.name: x for x in gates}
    assert g["ref_not_interpolated"].ok and g["lowlr_learned"].ok and g["sgd_lr_separated"].ok
    assert not g["bigB_not_interpolated"].ok and g["bigB_not_interpolated"].value == pytest.approx(1e-3)
    assert g["lm_rho0_learned"].threshold == pytest.approx(math.log(256) / 2)
    assert g["sgd_lr_separated"].value == pytest.approx(math.log(420 / 110))
    # a robustness that goes against the trace gives a negative effect: a FAIL of that part
    v2, _ = g20.measure(_synthetic(flip_lm=True))
    pp = {q.name: q for q in g20.PARTS}
    assert g20.decide(v2["lm_noise_robust_x"], pp["lm_noise_robust_x"]).verdict == "FAIL"
    assert g20.decide(vals["sgd_lr_robust_x"], pp["sgd_lr_robust_x"]).verdict == "PASS"
    assert math.isnan(g20.oriented(1.0, 0.0, 2.0, 1.0))


def test_log_numbers_on_a_synthetic_history():
    hist = []
    for s in range(0, 2001, 100):
        row = {"step": s, "fixed/loss": 1.0 - s / 4000}
        if s % 200 == 0:
            row.update({"flat/trace_k": 10.0 + s / 100, "heldout/k_fro2": [2.0, 2.0], "fixed/af_k": [1.0, s / 1000]})
        hist.append(row)
    out = g20.log_numbers(hist, p_entries=8)
    late = [10.0 + s / 100 for s in (1600, 1800, 2000)]
    assert out["trace"] == pytest.approx(np.mean(late))
    assert out["trace_norm"] == pytest.approx(np.mean(late) * 4 / 8)
    assert out["trace_last"] == 30.0
    assert out["loss"] == pytest.approx(np.mean([1.0 - s / 4000 for s in (1800, 1900, 2000)]))
    assert out["af_trace_spearman_late"] == pytest.approx(1.0)
    with pytest.raises(ValueError):
        g20.log_numbers([{"step": 0, "fixed/loss": 1.0}], 8)


def test_plan_reuses_g5_and_g12_arms_and_gates_every_primary():
    g5 = {a.name: a.config for a in g05.CHECK.make_plan("quick").arms}
    g12a = {a.name: a.config for a in g12.CHECK.make_plan("quick").arms}
    for preset in PRESETS:
        plan = g20.CHECK.make_plan(preset)
        assert plan.section == "theory"
        gates = {g.name: g for g in plan.gates}
        for part in plan.parts:
            if part.role == "primary":
                arms = {a for gn in part.gates for a in gates[gn].arms}
                assert len(arms) == 2, part.name
                for a in arms:  # every compared arm is gated on interpolation and learning
                    assert {f"{a}_not_interpolated", f"{a}_learned"} <= set(part.gates)
    arms = {a.name: a.config for a in g20.CHECK.make_plan("quick").arms}
    assert arms["ref"] == g5["ref"] and arms["lowlr"] == g5["lowlr"] and arms["bigB"] == g5["bigB"]
    assert arms["lm_rho0"] == g12a["rho0"] and arms["lm_rho0.5"] == g12a["rho0.5"]
    assert g20.CHECK.make_plan("quick").deciding == ["sgd_lr_robust_x", "sgd_lr_robust_w", "lm_noise_robust_x",
                                                     "lm_noise_robust_w"]


def test_random_increase_on_a_smooth_tiny_model_matches_the_exact_hessian():
    """GELU (smooth): per draw, the antithetic increase of all key matrices at a small eps is
    eps^2/2 u^T H_K u with the exact Hessian (the same directions, regenerated from the same keys),
    so its mean over the sphere is eps^2/(2p) tr(H_K). (With ReLU the kinks, which the Hessian does
    not see, add a term of the same order: the check's consistency part reads its ratio so.)"""
    from gradsparse.activations import GELU

    model = ResidualMLP.create(jax.random.key(0), 6, 3, width=4, depth=2, mlp_ratio=2, act=GELU())
    x, y = _data(32)
    ks = g20.key_weights(model)
    f = lambda k: g20.mean_loss(g20.with_keys(model, k), x, y)  # noqa: E731
    hess = jax.jit(jax.hessian(f))(ks)  # blocks H[i][j] of shape K_i.shape + K_j.shape
    sizes = [k.size for k in ks]
    H = np.block([[np.asarray(hess[i][j]).reshape(sizes[i], sizes[j]) for j in range(len(ks))]
                  for i in range(len(ks))]).astype(np.float64)
    p = int(sum(sizes))
    eps = 0.02 * float(g20._norm(ks))
    key, draws = jax.random.key(2), 64
    mean, vals = jax.jit(lambda k: g20.random_increase(f, ks, eps, k, draws))(key)
    quad = []
    for k in jax.random.split(key, draws):  # the directions random_increase drew
        u = g20._normal_like(k, ks)
        v = np.concatenate([np.asarray(a).reshape(-1) for a in u]).astype(np.float64)
        v /= np.linalg.norm(v)
        quad.append(0.5 * eps ** 2 * v @ H @ v)
    quad = np.asarray(quad)
    np.testing.assert_allclose(np.asarray(vals), quad, rtol=0.03, atol=0.03 * np.abs(quad).mean())
    # over an orthonormal basis the mean of u^T H u is tr(H)/p exactly: the closed form's mean
    basis = np.linalg.qr(np.random.default_rng(0).normal(size=(p, p)))[0]
    assert np.mean([0.5 * eps ** 2 * b @ H @ b for b in basis.T]) == pytest.approx(
        g20.random_closed_form(eps, float(np.trace(H)), p), rel=1e-9)
