"""Monitors: closed forms on constructed arrays, and the sparsity identity on a trained MLP."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gradsparse.activations import ReLU, get_activation
from gradsparse.config import TrainConfig
from gradsparse.data import load_dataset
from gradsparse.models import zero_probes
from gradsparse.monitors import (activation_sparsity, augmented_flatness, gradient_sparsity, layer_metrics,
                                 sparsity_identity)
from gradsparse.models import default_trainable
from gradsparse.step import forward_backward, loss_fn
from gradsparse.train import train


def test_activation_sparsity_counts_near_zero_and_flat_value():
    a = jnp.array([0.0, 1e-7, -1e-7, 2e-6, 1.0, 0.5])
    assert float(activation_sparsity(a)) == pytest.approx(3 / 6)
    assert float(activation_sparsity(a - 1.6, flat_value=-1.6)) == pytest.approx(3 / 6, abs=1e-6)


def test_gradient_sparsity_closed_form():
    v = jnp.array([[3.0, 0.0, 1e-4, -4.0], [0.0, 1e-8, 2.0, 0.0]])
    rms = float(jnp.sqrt(jnp.mean(v * v)))  # sqrt(29/8) ~ 1.904
    out = gradient_sparsity(v, "eta")
    small3 = np.mean(np.abs(np.asarray(v)) < 1e-3 * rms)
    assert float(out["eta_sparse_0.001"]) == pytest.approx(small3) == pytest.approx(5 / 8)
    assert float(out["eta_sparse_1e-06"]) == pytest.approx(4 / 8)
    assert float(out["eta_zero"]) == pytest.approx(3 / 8)
    assert float(out["eta_l1"]) == pytest.approx((7.0001 + 2.00000001) / 2, rel=1e-6)
    assert float(out["eta_l2sq"]) == pytest.approx((9 + 1e-8 + 16 + 4 + 1e-16) / 2, rel=1e-6)
    assert float(gradient_sparsity(jnp.zeros((2, 3)), "g")["g_sparse_0.001"]) == 1.0


def test_augmented_flatness_closed_form():
    eta = jnp.array([[1.0, 2.0], [0.0, 3.0]])
    x = jnp.array([[1.0, 1.0, 1.0], [2.0, 0.0, 0.0]])
    # (1/B) sum_t ||eta_t||^2 ||x_t||^2 = (5*3 + 9*4)/2
    assert float(augmented_flatness(eta, x, 2)) == pytest.approx((15 + 36) / 2)


def test_identity_counts_active_units_for_relu():
    z = jnp.array([[1.0, -1.0, 2.0, 0.5], [-1.0, -2.0, 0.3, -0.1]])
    g = jnp.array([[0.1, 5.0, -0.2, 0.3], [1.0, 1.0, 0.4, 2.0]])
    x = jnp.array([[1.0, 2.0], [3.0, 0.0]])
    out = sparsity_identity(z, x, g, ReLU())
    assert float(out["identity_lhs"]) == pytest.approx((3 + 1) / 2)
    assert float(out["identity_rhs"]) == pytest.approx(2.0, rel=1e-6)


@pytest.fixture(scope="module")
def trained_mlp():
    cfg = TrainConfig(steps=300, width=32, depth=2, batch_size=32, log_every=100, checkpoint_every=0, seed=1)
    ds = load_dataset("mnist1d", seed=1)
    res = train(cfg, None, dataset=ds, progress=False)
    return res.model, ds


def test_sparsity_identity_on_trained_mlp_and_af_from_per_sample_gradients(trained_mlp):
    """SPEC 2.5 to float precision; AF_K equals the per-sample dL/dK norms computed independently."""
    model, ds = trained_mlp
    x, y = jnp.asarray(ds.x_test[:64]), jnp.asarray(ds.y_test[:64])
    B = x.shape[0]
    loss, acc, aux, gpar, gprobe = forward_backward(model, default_trainable(model), x, y, None)
    for i, (blk, ax, pg) in enumerate(zip(model.mlp_blocks(), aux, gprobe)):
        m = layer_metrics(ax["x"], ax["z"], ax["a"], pg["a"], pg["y"], blk.key.weight, blk.act, B)
        assert float(m["identity_relerr"]) < 1e-5
        active = jnp.sum(ax["z"] > 0, -1)
        valid = (active > 0) & (jnp.sum((pg["a"] * (ax["z"] > 0)) ** 2, -1) > 0)
        assert float(m["identity_lhs"]) == pytest.approx(float(jnp.mean(active[valid])), rel=1e-6)

        # per-sample gradient of the MEAN loss w.r.t. K of block i: d(l_s / B)/dK, via vmap(grad)
        def sample_loss(K, xs, ys):
            mm = jax.tree_util.tree_map(lambda a: a, model)
            import equinox as eqx
            mm = eqx.tree_at(lambda q: q.mlp_blocks()[i].key.weight, mm, K)
            pr = zero_probes(mm.mlp_blocks(), 1)
            return loss_fn(mm, pr, xs[None], ys[None], None)[0] / B

        per = jax.vmap(jax.grad(sample_loss), in_axes=(None, 0, 0))(blk.key.weight, x, y)
        af_direct = float(jnp.sum(per ** 2)) / B
        assert float(m["af_k"]) == pytest.approx(af_direct, rel=1e-4)
        # and the per-sample gradients sum to the batch gradient
        np.testing.assert_allclose(jnp.sum(per, 0), gpar.mlp_blocks()[i].key.weight, rtol=1e-4, atol=1e-7)


def test_derivative_vs_activation_sparsity():
    z = jax.random.normal(jax.random.key(0), (256, 64))
    g = jax.random.normal(jax.random.key(1), (256, 64))
    x = jnp.ones((256, 8))
    for name in ("relu", "jsrelu", "relu2"):
        act = get_activation(name)
        m = layer_metrics(x, z, act(z), g, jnp.ones((256, 8)), jnp.ones((64, 8)), act, 256)
        assert float(m["act_sparsity"]) == pytest.approx(float(m["deriv_sparsity"]), abs=1e-3)
        assert float(m["act_sparsity"]) == pytest.approx(0.5, abs=0.02)
    gelu = get_activation("gelu")
    m = layer_metrics(x, z, gelu(z), g, jnp.ones((256, 8)), jnp.ones((64, 8)), gelu, 256)
    assert float(m["act_sparsity"]) < 0.01 and float(m["deriv_sparsity"]) < 0.01
    # E[gelu'(z)^2] for z ~ N(0,1) (numerical quadrature)
    t = np.linspace(-10, 10, 200001)
    d = np.asarray(gelu.deriv(jnp.asarray(t)), dtype=np.float64)
    expect = np.trapezoid(d * d * np.exp(-t * t / 2) / np.sqrt(2 * np.pi), t)
    assert float(m["dsigma_sq"]) == pytest.approx(expect, rel=0.03)
