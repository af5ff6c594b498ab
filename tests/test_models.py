"""Models: LayerNorm norms, probe gradients against hand derivations and parameter gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gradsparse.activations import ReLU
from gradsparse.models import ByteLM, LayerNorm, MLPBlock, ResidualMLP, ViT, zero_probes
from gradsparse.step import loss_fn


def test_layernorm_norm_without_affine_is_d():
    d = 48
    h = jax.random.normal(jax.random.key(0), (20, d)) * 3 + 1
    ln = LayerNorm.create(d, affine=False, eps=1e-5)
    var = jnp.var(h, -1)
    expected = d * var / (var + 1e-5)
    np.testing.assert_allclose(jnp.sum(ln(h) ** 2, -1), expected, rtol=1e-5)
    np.testing.assert_allclose(jnp.sum(ln(h) ** 2, -1), d, rtol=1e-4)


def test_probe_gradients_match_hand_derivation_two_layer():
    """y = V relu(K LN(h) + bK) + bV, L = 1/(2N) sum_t ||y_t - r_t||^2: dL/dy = (y - r)/N, dL/da = V^T dL/dy."""
    N, d, n = 7, 6, 24
    k1, k2, k3 = jax.random.split(jax.random.key(3), 3)
    blk = MLPBlock.create(k1, d, n, ReLU(), ln_affine=True)
    h = jax.random.normal(k2, (N, d))
    r = jax.random.normal(k3, (N, d))
    pos = jnp.zeros((N,), jnp.int32)

    def L(probe):
        y, _ = blk(h, probe, pos)
        return 0.5 * jnp.mean(jnp.sum((y - r) ** 2, -1))

    probe = zero_probes([blk], N)[0]
    g = jax.grad(L)(probe)
    # hand derivation in numpy
    x = np.asarray(blk.ln(h))
    K, bK = np.asarray(blk.key.weight), np.asarray(blk.key.bias)
    V, bV = np.asarray(blk.value.weight), np.asarray(blk.value.bias)
    a = np.maximum(x @ K.T + bK, 0)
    y = a @ V.T + bV
    gy = (y - np.asarray(r)) / N
    ga = gy @ V
    np.testing.assert_allclose(g["y"], gy, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(g["a"], ga, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kind", ["mlp", "vit", "lm"])
def test_probe_gradients_sum_to_bias_and_weight_gradients(kind):
    """sum_t eta_t = dL/db_K, sum_t eta_t x_t^T = dL/dK, sum_t gV_t = dL/db_V, for every block."""
    key = jax.random.key(4)
    if kind == "mlp":
        m = ResidualMLP.create(key, 10, 5, width=16, depth=2)
        x = jax.random.normal(key, (8, 10))
        y = jnp.arange(8) % 5
    elif kind == "vit":
        m = ViT.create(key, (8, 8), 5, patch=4, width=16, depth=2, heads=2)
        x = jax.random.normal(key, (3, 8, 8))
        y = jnp.arange(3) % 5
    else:
        m = ByteLM.create(key, seq_len=6, width=16, depth=2, heads=2)
        x = jax.random.randint(key, (3, 6), 0, 256)
        y = jax.random.randint(jax.random.key(5), (3, 6), 0, 256)
    probes = zero_probes(m.mlp_blocks(), x.shape[0] * m.tokens_per_sample)
    (_, (aux, _)), (gm, gp) = jax.value_and_grad(
        lambda mm, pr: loss_fn(mm, pr, x, y, None), argnums=(0, 1), has_aux=True)(m, probes)
    for blk, gblk, ax, pg in zip(m.mlp_blocks(), gm.mlp_blocks(), aux, gp):
        eta = pg["a"] * blk.act.deriv(ax["z"])
        np.testing.assert_allclose(jnp.sum(eta, 0), gblk.key.bias, rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(eta.T @ ax["x"], gblk.key.weight, rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(jnp.sum(pg["y"], 0), gblk.value.bias, rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(pg["y"].T @ ax["a"], gblk.value.weight, rtol=1e-4, atol=1e-7)


def test_lm_is_causal():
    m = ByteLM.create(jax.random.key(0), seq_len=8, width=16, depth=2, heads=2)
    x = jax.random.randint(jax.random.key(1), (1, 8), 0, 256)
    x2 = x.at[0, 5].set((x[0, 5] + 1) % 256)
    pr = zero_probes(m.mlp_blocks(), 8)
    l1, _ = m(x, pr)
    l2, _ = m(x2, pr)
    np.testing.assert_array_equal(l1[:5], l2[:5])
    assert not np.allclose(l1[5:], l2[5:])


def test_bad_sizes_raise():
    with pytest.raises(ValueError, match="heads"):
        ViT.create(jax.random.key(0), (8, 8), 3, patch=4, width=10, heads=3)
    with pytest.raises(ValueError, match="patch"):
        ViT.create(jax.random.key(0), (8, 8), 3, patch=3, width=12, heads=3)
    with pytest.raises(ValueError, match="depth"):
        ResidualMLP.create(jax.random.key(0), 4, 3, depth=0)
    with pytest.raises(ValueError, match="seq_len"):
        ByteLM.create(jax.random.key(0), seq_len=-1)
