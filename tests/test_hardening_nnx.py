"""The edges of finding MLP blocks in Flax NNX models: a stochastic layer inside a found block is
reported with the fix, a rejected gated (GLU) block is explained pair by pair, and weights held as
bare nnx.Param attributes are named with their module."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import pytest

pytest.importorskip("flax.nnx", reason="the optional extra 'flax' is not installed (pip install 'gradsparse[flax]')")

from flax import nnx  # noqa: E402

from gradsparse import nnx as gsnnx  # noqa: E402


class DropoutMLP(nnx.Module):
    """fc1 -> relu -> dropout -> fc2: found in eval mode, wrong while the dropout is on."""

    def __init__(self, d, n, rngs, rate=0.3):
        self.fc1 = nnx.Linear(d, n, rngs=rngs)
        self.drop = nnx.Dropout(rate, rngs=rngs)
        self.fc2 = nnx.Linear(n, d, rngs=rngs)

    def __call__(self, x):
        return self.fc2(self.drop(nnx.relu(self.fc1(x))))


class Net(nnx.Module):
    def __init__(self, block):
        self.mlp = block

    def __call__(self, x):
        return x + self.mlp(x)


class GLU(nnx.Module):
    def __init__(self, d, n, rngs):
        self.gate = nnx.Linear(d, n, rngs=rngs)
        self.up = nnx.Linear(d, n, rngs=rngs)
        self.down = nnx.Linear(n, d, rngs=rngs)

    def __call__(self, x):
        return self.down(nnx.silu(self.gate(x)) * self.up(x))


class BareParams(nnx.Module):
    def __init__(self, d, n, rngs):
        self.w1 = nnx.Param(jax.random.normal(rngs.params(), (d, n)))
        self.w2 = nnx.Param(jax.random.normal(rngs.params(), (n, d)))

    def __call__(self, x):
        return nnx.relu(x @ self.w1[...]) @ self.w2[...]


X = jax.random.normal(jax.random.key(1), (4, 8))


def test_dropout_inside_a_found_block_is_reported_with_the_fix():
    model = Net(DropoutMLP(8, 32, nnx.Rngs(0)))
    model.eval()
    with pytest.warns(gsnnx.StochasticLayerWarning, match=r"mlp holds a stochastic layer \(mlp.drop\).*model.eval"):
        (site,) = gsnnx.find_mlp_blocks(model, X)
    assert site.stochastic == ("mlp.drop",) and site.name == "mlp"
    # a dropout of rate 0 draws nothing: no warning
    quiet = Net(DropoutMLP(8, 32, nnx.Rngs(0), rate=0.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (site,) = gsnnx.find_mlp_blocks(quiet, X)
    assert site.stochastic == ()
    assert gsnnx.stochastic_layers(model.mlp, [("fc1",), ("fc2",)]) == ["drop"]
    with pytest.raises(ValueError, match="block: must be a flax.nnx.Module"):
        gsnnx.stochastic_layers("not a module")


def test_a_rejected_gated_block_keeps_the_reason_of_every_pair():
    model = Net(GLU(8, 32, nnx.Rngs(0)))
    with pytest.raises(ValueError) as e:
        gsnnx.find_mlp_blocks(model, X)
    msg = str(e.value)
    for pair in ("mlp.gate / mlp.down", "mlp.up / mlp.down", "mlp.down / mlp.gate", "mlp.down / mlp.up"):
        assert pair in msg, msg
    assert "looks gated (GLU" in msg
    with pytest.raises(ValueError, match="mlp.gate / mlp.down.*mlp.up / mlp.down"):
        gsnnx.find_mlp_blocks(model, X, select=["mlp"])


def test_bare_params_are_named_with_their_module():
    model = Net(BareParams(8, 32, nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"mlp holds bare 2-D nnx.Param w1, w2 \(used as x @ w\)"):
        gsnnx.find_mlp_blocks(model, X)
    assert jnp.all(jnp.isfinite(model(X)))


class TanhGeluMLP(nnx.Module):
    def __init__(self, d, n, rngs):
        self.fc1 = nnx.Linear(d, n, rngs=rngs)
        self.fc2 = nnx.Linear(n, d, rngs=rngs)
        self.act = lambda z: jax.nn.gelu(z, approximate=True)

    def __call__(self, x):
        return self.fc2(self.act(self.fc1(x)))


def test_an_activation_without_exact_zeros_reports_density_and_positive_fraction():
    model = Net(TanhGeluMLP(8, 32, nnx.Rngs(0)))
    sites = gsnnx.find_mlp_blocks(model, X)
    assert sites[0].act.name == "gelu_tanh"
    gsnnx.instrument(model, sites)
    _, _, met = gsnnx.value_and_grad(lambda m, x: jnp.mean(m(x) ** 2), sites)(model, X)
    z = model.mlp.fc1(X)
    assert float(met["density"][0]) == 1.0  # tanh-GELU is never exactly zero
    assert float(met["positive_fraction"][0]) == pytest.approx(float(jnp.mean(z > 0)))
    assert 0.2 < float(met["positive_fraction"][0]) < 0.8
