"""Activations: sigma' against autodiff and finite differences, flat sets, parsing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gradsparse.activations import ACTIVATION_NAMES, JSReLU, Mixed, ReLU, TopK, get_activation, jsrelu

SPECS = ["relu", "gelu", "relu2", "jsrelu", "shifted_relu(0.5,-0.3)", "sshaped(1.5,1.6,-1.6)",
         "sshaped2(1.5,1.6,-1.6)", "mixed(0.3)"]
KINKS = {"relu": [0.0], "relu2": [0.0], "jsrelu": [0.0], "gelu": [], "shifted_relu(0.5,-0.3)": [0.5],
         "sshaped(1.5,1.6,-1.6)": [0.1, 3.1], "sshaped2(1.5,1.6,-1.6)": [0.1, 3.1], "mixed(0.3)": [0.0],
         "gelu_tanh": [], "silu": []}
#: smooth activations of other frameworks (no flat set on a N(0, 9) sample): derivative tests only
SMOOTH = ["gelu_tanh", "silu"]


def _grid(spec):
    z = np.linspace(-4, 4, 801).astype(np.float32)
    keep = np.ones_like(z, bool)
    for k in KINKS[spec]:
        keep &= np.abs(z - k) > 2e-2
    return jnp.asarray(z[keep])


@pytest.mark.parametrize("spec", SPECS + SMOOTH)
def test_deriv_matches_autodiff(spec):
    act = get_activation(spec)
    z = _grid(spec)
    auto = jax.vmap(jax.grad(lambda u: act(u[None])[0]))(z)
    np.testing.assert_allclose(act.deriv(z), auto, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("spec", SPECS + SMOOTH)
def test_deriv_matches_finite_differences(spec):
    act = get_activation(spec)
    with jax.enable_x64(True):
        z = jnp.asarray(_grid(spec), jnp.float64)
        h = 1e-5
        fd = (act(z + h) - act(z - h)) / (2 * h)
        np.testing.assert_allclose(np.asarray(act.deriv(z)), np.asarray(fd), rtol=1e-6, atol=1e-7)


def test_jsrelu_values_and_jump():
    z = jnp.array([-2.0, -1e-3, 0.0, 1.0, 2.0])
    np.testing.assert_array_equal(jsrelu(z), [0.0, 0.0, 0.0, 1.5, 4.0])
    g = jax.vmap(jax.grad(jsrelu))(z)
    np.testing.assert_array_equal(g, [0.0, 0.0, 1.0, 2.0, 3.0])  # f'(0) = 1: the jump 0 -> 1
    np.testing.assert_array_equal(JSReLU().deriv(z), g)


@pytest.mark.parametrize("spec", SPECS + ["topk(3)"])
def test_flat_set_is_zero_derivative_with_flat_output(spec):
    act = get_activation(spec)
    z = jax.random.normal(jax.random.key(1), (64, 16)) * 3
    m = act.flat_mask(z)
    assert bool(jnp.any(m)) and bool(jnp.any(~m))
    if spec != "gelu":
        np.testing.assert_array_equal(act.deriv(z)[m], 0.0)
        np.testing.assert_allclose(act(z)[m], act.flat_value, atol=1e-6)
        assert bool(jnp.all(act.deriv(z)[~m] != 0))
    else:
        assert bool(jnp.all(jnp.abs(act.deriv(z)[m]) <= 1e-6))


def test_shifted_flat_output_is_not_zero():
    act = get_activation("sshaped(1.5,1.6,-1.6)")
    assert act.flat_value == -1.6
    np.testing.assert_allclose(act(jnp.array([1.6, 0.2, 3.0])), [-1.6, -1.6, -1.6])
    np.testing.assert_allclose(act(jnp.array([4.1, -1.0])), [-1.6 + 1.0, -1.6 - 1.1], rtol=1e-6)


def test_mixed_endpoints_exact():
    z = jax.random.normal(jax.random.key(0), (100,)) * 2
    m0 = Mixed(jnp.asarray(0.0), ReLU(), JSReLU())
    m1 = Mixed(jnp.asarray(1.0), ReLU(), JSReLU())
    np.testing.assert_array_equal(m0(z), ReLU()(z))
    np.testing.assert_array_equal(m1(z), JSReLU()(z))
    np.testing.assert_array_equal(get_activation("mixed(0)")(z), ReLU()(z))


def test_topk_keeps_k_per_token():
    z = jax.random.normal(jax.random.key(2), (10, 32)) + 3.0  # all positive -> ReLU keeps all
    a = TopK(k=5)(z)
    np.testing.assert_array_equal(jnp.sum(a != 0, -1), 5)
    kept = a != 0
    # kept entries are the 5 largest of each row
    thresh = jnp.sort(z, -1)[:, -5][:, None]
    np.testing.assert_array_equal(kept, z >= thresh)
    np.testing.assert_array_equal(TopK(k=5).deriv(z), kept.astype(jnp.float32))


def test_sshaped2_closed_form():
    """relu(u - h)^2 - relu(-u - h)^2 + sy at hand-computed points; flat output sy on |u| <= h."""
    act = get_activation("sshaped2(1.5,1.6,-1.6)")
    z = jnp.asarray([1.6, 0.2, 3.0, 4.1, -0.9, -2.0])  # u = 0, -1.4, 1.4, 2.5, -2.5, -3.6
    want = [-1.6, -1.6, -1.6, 1.0 - 1.6, -1.0 - 1.6, -(2.1 ** 2) - 1.6]
    np.testing.assert_allclose(act(z), want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(act.deriv(z), [0, 0, 0, 2.0, 2.0, 4.2], rtol=1e-6, atol=1e-6)
    assert act.flat_value == -1.6 and np.asarray(act.flat_mask(z)).tolist() == [True, True, True, False, False, False]


@pytest.mark.parametrize("bad", ["swish", "relu(1)", "sshaped(1,2)", "sshaped(-1,0,0)", "mixed(2)", "topk(0)",
                                 "topk(a)", "shifted_relu(x,1)", "((", 3])
def test_bad_names_raise_value_error(bad):
    with pytest.raises(ValueError):
        get_activation(bad)


def test_names_listed():
    assert "jsrelu" in ACTIVATION_NAMES and "gelu" in ACTIVATION_NAMES
