"""G12 (weight noise): the scale-normalised trace's invariance on a toy quadratic, the trace series
from a log, the dose plan against the paper's default."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from theory_checks import g12_weight_noise_transformer as g12


def _trace_and_norm(K: jnp.ndarray, gamma: jnp.ndarray, u: jnp.ndarray, y: jnp.ndarray) -> tuple[float, float, float]:
    """Loss 1/2 ||K (gamma * u) - y||^2 summed over tokens; exact tr(d2L/dK2) via jax.hessian."""

    def loss(k):
        return 0.5 * jnp.sum(((u * gamma) @ k.T - y) ** 2)

    h = jax.hessian(loss)(K).reshape(K.size, K.size)
    return float(loss(K)), float(jnp.trace(h)), float(jnp.sum(K * K))


def test_normalised_trace_is_invariant_to_rescaling_K_against_gamma():
    k0, k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 4)
    K = jax.random.normal(k0, (6, 4))
    gamma = 1.0 + jax.random.uniform(k1, (4,))
    u = jax.random.normal(k2, (10, 4))
    y = jax.random.normal(k3, (10, 6))
    l1, t1, f1 = _trace_and_norm(K, gamma, u, y)
    s = 3.0
    l2, t2, f2 = _trace_and_norm(s * K, gamma / s, u, y)
    assert l2 == pytest.approx(l1, rel=1e-5)  # the same function
    assert t2 == pytest.approx(t1 / s ** 2, rel=1e-4)  # the raw trace falls by the rescaling alone
    n1 = g12.normalised_trace(t1, [f1], K.size)
    n2 = g12.normalised_trace(t2, [f2], K.size)
    assert n2 == pytest.approx(n1, rel=1e-4)
    # a real flattening (smaller inputs at the same K) does move it
    _, t3, f3 = _trace_and_norm(K, gamma / s, u, y)
    assert g12.normalised_trace(t3, [f3], K.size) == pytest.approx(n1 / s ** 2, rel=1e-4)
    with pytest.raises(ValueError):
        g12.normalised_trace(1.0, [1.0], 0)


def test_trace_series_and_late_mean():
    hist = [{"step": s, "heldout/k_fro2": [2.0, 3.0]} for s in range(0, 800, 100)]
    for h in hist:
        if h["step"] % 200 == 0:
            h["flat/trace_k"] = 10.0 + h["step"] / 100
    hist.append({"step": 799, "heldout/k_fro2": [4.0, 6.0], "flat/trace_k": 20.0})
    s, raw, norm = g12.trace_series(hist, n_entries=10)
    assert s.tolist() == [0, 200, 400, 600, 799]
    np.testing.assert_allclose(norm, raw * np.array([0.5, 0.5, 0.5, 0.5, 1.0]))
    assert g12.late_mean(s, raw) == pytest.approx((16.0 + 20.0) / 2)  # steps 600 and 799
    with pytest.raises(ValueError, match="flat/trace_k"):
        g12.trace_series([{"step": 0}], 10)


def test_plan_names_the_dose_against_the_paper():
    quick = g12.CHECK.make_plan("quick")
    assert {q.name: q.role for q in quick.parts}["flatter"] == "primary" and "sparser_at_default" not in \
        {q.name for q in quick.parts}
    for preset in ("smoke", "standard", "full"):
        p = g12.CHECK.params(preset)
        pl = g12.CHECK.make_plan(preset)
        assert g12.PAPER_RHO in g12.doses(p) and p["main_rho"] == 0.5
        assert {a.name for a in pl.arms} >= {"rho0", "rho0.1", "rho0.5"}
        roles = {q.name: q.role for q in pl.parts}
        assert roles["sparser"] == roles["flatter"] == "primary"
        assert roles["flatter_raw"] == roles["quality_kept"] == roles["sparser_at_default"] == "context"
        assert pl.part("quality_kept").kind == "margin"
        assert "5x the paper's default" in " ".join(pl.notes)
        assert pl.seeds == (None if preset == "smoke" else 5)
