"""Flax NNX models (gradsparse.nnx): the same SPEC 2 metrics as the native models on copied weights,
plug-ins that are the identity at insertion with their projections, spectra rows by path."""

import functools
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

pytest.importorskip("flax.nnx", reason="the optional extra 'flax' is not installed (pip install 'gradsparse[flax]')")

from flax import nnx  # noqa: E402

from gradsparse import monitors, spectra  # noqa: E402
from gradsparse import nnx as gsnnx  # noqa: E402
from gradsparse.activations import GELU, JSReLU, Mixed, ReLU  # noqa: E402
from gradsparse.models import ByteLM, ResidualMLP, zero_probes  # noqa: E402


# ------------------------------------------------------------------ NNX models a user might write
def _ln(d, rngs):
    return nnx.LayerNorm(d, epsilon=1e-5, use_fast_variance=False, rngs=rngs)


class Block(nnx.Module):
    """LN -> fc1 -> act -> fc2, the activation held as an attribute."""

    def __init__(self, d, n, rngs, act=nnx.relu):
        self.ln = _ln(d, rngs)
        self.fc1 = nnx.Linear(d, n, rngs=rngs)
        self.fc2 = nnx.Linear(n, d, rngs=rngs)
        self.act = act

    def __call__(self, h):
        return self.fc2(self.act(self.fc1(self.ln(h))))


class NNXResidualMLP(nnx.Module):
    def __init__(self, d_in, d, depth, classes, rngs):
        self.inp = nnx.Linear(d_in, d, rngs=rngs)
        self.blocks = nnx.List([Block(d, 4 * d, rngs) for _ in range(depth)])
        self.final_ln = _ln(d, rngs)
        self.head = nnx.Linear(d, classes, rngs=rngs)

    def __call__(self, x):
        h = self.inp(x)
        for b in self.blocks:
            h = h + b(h)
        return self.head(self.final_ln(h))


class Attention(nnx.Module):
    def __init__(self, d, heads, rngs):
        self.qkv = nnx.Linear(d, 3 * d, rngs=rngs)
        self.out = nnx.Linear(d, d, rngs=rngs)
        self.heads = heads

    def __call__(self, h):  # (B, T, d), causal
        b, t, d = h.shape
        e = d // self.heads
        qkv = self.qkv(h).reshape(b, t, 3, self.heads, e).transpose(2, 0, 3, 1, 4)
        s = jnp.einsum("bhte,bhse->bhts", qkv[0], qkv[1]) / math.sqrt(e)
        s = jnp.where(jnp.tril(jnp.ones((t, t), bool)), s, jnp.finfo(s.dtype).min)
        o = jnp.einsum("bhts,bhse->bhte", jax.nn.softmax(s, axis=-1), qkv[2])
        return self.out(o.transpose(0, 2, 1, 3).reshape(b, t, d))


class MLP(nnx.Module):
    def __init__(self, d, n, rngs):
        self.fc1 = nnx.Linear(d, n, rngs=rngs)
        self.fc2 = nnx.Linear(n, d, rngs=rngs)
        self.act = functools.partial(jax.nn.gelu, approximate=False)

    def __call__(self, x):
        return self.fc2(self.act(self.fc1(x)))


class TBlock(nnx.Module):
    """Pre-LN: h + attn(ln1(h)), then h + mlp(ln2(h)); the MLP's LayerNorm lives in this block."""

    def __init__(self, d, heads, rngs):
        self.ln1, self.attn, self.ln2, self.mlp = _ln(d, rngs), Attention(d, heads, rngs), _ln(d, rngs), MLP(d, 4 * d, rngs)

    def __call__(self, h):
        h = h + self.attn(self.ln1(h))
        return h + self.mlp(self.ln2(h))


class NNXByteLM(nnx.Module):
    def __init__(self, seq, d, depth, heads, rngs):
        self.embed = nnx.Embed(256, d, rngs=rngs)
        self.pos = nnx.Param(jnp.zeros((seq, d)))
        self.blocks = nnx.List([TBlock(d, heads, rngs) for _ in range(depth)])
        self.final_ln = _ln(d, rngs)
        self.head = nnx.Linear(d, 256, rngs=rngs)

    def __call__(self, x):
        h = self.embed(x) + self.pos[...][None]
        for b in self.blocks:
            h = b(h)
        return self.head(self.final_ln(h))


# ------------------------------------------------------------------ copying the native weights
def _native(create, seed):
    """A native model with random weights, built without compiling anything: the structure from
    eqx.filter_eval_shape, the values from a numpy Generator (2-D: U(+-1/sqrt(in)), LayerNorm gamma:
    1 + N(0, 0.1^2), every other vector: N(0, 0.1^2), so biases and shifts are not 0)."""
    abstract = eqx.filter_eval_shape(create)
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        if not isinstance(leaf, jax.ShapeDtypeStruct):
            return leaf
        if len(leaf.shape) == 2:
            v = rng.uniform(-1, 1, leaf.shape) / math.sqrt(leaf.shape[1])
        else:
            v = 0.1 * rng.standard_normal(leaf.shape)
            if "ln" in jax.tree_util.keystr(path) and path[-1].name == "weight":
                v = 1.0 + v
        return jnp.asarray(v, leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, abstract)


def _abstract(create):
    """An NNX model's structure without running its initialisers (every value is set afterwards)."""
    return nnx.eval_shape(create)


def _set(var, value):
    var.set_value(jnp.asarray(value))


def _dense(dst, src):
    _set(dst.kernel, np.asarray(src.weight).T)
    _set(dst.bias, src.bias)


def _norm(dst, src):
    _set(dst.scale, src.weight)
    _set(dst.bias, src.bias)


@functools.cache
def _mlp_template(depth):
    native = _native(lambda: ResidualMLP.create(jax.random.key(0), 10, 5, width=16, depth=depth), 1)
    m = _abstract(lambda: NNXResidualMLP(10, 16, depth, 5, nnx.Rngs(0)))
    _dense(m.inp, native.inp), _dense(m.head, native.head), _norm(m.final_ln, native.final_ln)
    for b, nb in zip(m.blocks, native.blocks):
        _norm(b.ln, nb.ln), _dense(b.fc1, nb.key), _dense(b.fc2, nb.value)
    return native, m


def _mlp_pair(depth=2):
    """A native ResidualMLP (d_in 10, width 16, n 64, 5 classes, random biases) and a fresh NNX copy."""
    native, m = _mlp_template(depth)
    return native, nnx.clone(m)


def _lm_pair():
    native = _native(lambda: ByteLM.create(jax.random.key(0), seq_len=8, width=16, depth=1, heads=2, act=GELU()), 2)
    m = _abstract(lambda: NNXByteLM(8, 16, 1, 2, nnx.Rngs(0)))
    _set(m.embed.embedding, native.embed)
    _set(m.pos, native.pos)
    _dense(m.head, native.head), _norm(m.final_ln, native.final_ln)
    for b, nb in zip(m.blocks, native.blocks):
        _norm(b.ln1, nb.attn.ln), _dense(b.attn.qkv, nb.attn.qkv), _dense(b.attn.out, nb.attn.out)
        _norm(b.ln2, nb.mlp.ln), _dense(b.mlp.fc1, nb.mlp.key), _dense(b.mlp.fc2, nb.mlp.value)
    return native, m


def _ce(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


@eqx.filter_jit
def _native_step(model, x, y):
    """The native probes: value_and_grad over (params, zero probes), monitors.model_metrics."""
    probes = zero_probes(model.mlp_blocks(), x.shape[0] * model.tokens_per_sample)
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def f(p, pr):
        logits, aux = eqx.combine(p, static)(x, pr)
        return _ce(logits, y.reshape(-1)), aux

    (loss, aux), (g, gp) = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(params, probes)
    return loss, g, monitors.model_metrics(model.mlp_blocks(), aux, gp, x.shape[0])


def _loss(model, x, y):
    return _ce(model(x), y)


@functools.cache
def _nnx_step(sites):
    """The monitored step, jitted (one per tuple of sites)."""
    vg = gsnnx.value_and_grad(_loss, sites)
    return nnx.jit(lambda model, x, y: vg(model, x, y))


def _normal(seed, shape):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


X = _normal(3, (32, 10))
Y = jnp.arange(32) % 5
TOK = jnp.asarray(np.random.default_rng(4).integers(0, 256, (4, 9)), jnp.int32)


def _compare(nnx_metrics, native_metrics, label):
    """Max |difference| per metric (printed with -s), asserting |d| <= 1e-5 |ref| + 1e-6."""
    assert set(nnx_metrics) == set(native_metrics) | {"positive_fraction"}  # NNX also gives the share of z > 0
    print(f"\n{label}: max |NNX - native| per metric (max relative)")
    for k in sorted(native_metrics):
        a, b = np.asarray(nnx_metrics[k], np.float64), np.asarray(native_metrics[k], np.float64)
        assert a.shape == b.shape, k
        diff = float(np.max(np.abs(a - b)))
        rel = diff / max(float(np.max(np.abs(b))), 1e-30)
        print(f"  {k:20s} {diff:.3g}  ({rel:.3g})")
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=f"{label}: {k}")


# ------------------------------------------------------------------ detection
def test_finds_the_blocks_of_a_residual_mlp():
    _, m = _mlp_pair()
    sites = gsnnx.find_mlp_blocks(m, X[:4])
    assert [s.name for s in sites] == ["blocks.0", "blocks.1"]
    s = sites[1]
    assert (s.key, s.value, s.ln, s.act_path) == (("blocks", 1, "fc1"), ("blocks", 1, "fc2"), ("blocks", 1, "ln"),
                                                   ("blocks", 1, "act"))
    assert isinstance(s.act, ReLU) and (s.d, s.n, s.tokens) == (16, 64, 1)
    assert gsnnx.layer_names(sites) == ["blocks.0", "blocks.1"]
    # a user selector by path
    assert [s.name for s in gsnnx.find_mlp_blocks(m, X[:4], select=["blocks.1"])] == ["blocks.1"]
    assert [s.name for s in gsnnx.find_mlp_blocks(m, X[:4], select=lambda n: n != "blocks.0")] == ["blocks.1"]
    with pytest.raises(ValueError, match="select: not MLP blocks: blocks.7.*allowed: blocks.0, blocks.1"):
        gsnnx.find_mlp_blocks(m, X[:4], select=["blocks.7"])
    with pytest.raises(ValueError, match="sample: the forward"):
        gsnnx.find_mlp_blocks(m, X[:4, :3])
    with pytest.raises(ValueError, match="sample: pass example inputs"):
        gsnnx.find_mlp_blocks(m)
    with pytest.raises(ValueError, match="model: must be a flax.nnx.Module"):
        gsnnx.find_mlp_blocks(object(), X)


def test_attention_and_mismatched_activations_are_not_blocks():
    class Attn(nnx.Module):  # q, k, v, o are all d x d: shapes fit, data flow does not
        def __init__(self, rngs):
            self.q, self.k, self.v, self.o = (nnx.Linear(8, 8, rngs=rngs) for _ in range(4))

        def __call__(self, h):
            w = jax.nn.softmax(self.q(h) @ self.k(h).T, axis=-1)
            return self.o(w @ self.v(h))

    with pytest.raises(ValueError, match="no MLP block .*'s input is not sigma"):
        gsnnx.find_mlp_blocks(Attn(nnx.Rngs(0)), X[:4, :8])
    _, m = _mlp_pair()
    with pytest.raises(ValueError, match="not sigma.*for sigma in gelu"):
        gsnnx.find_mlp_blocks(m, X[:4], act="gelu")


def test_activation_identification_and_the_two_added_activations():
    z = jnp.linspace(-6.0, 6.0, 241)
    for act, fn in ((gsnnx.GELUTanh(), nnx.gelu), (gsnnx.SiLU(), nnx.silu)):
        np.testing.assert_array_equal(act(z), fn(z))
        np.testing.assert_allclose(act.deriv(z), jax.vmap(jax.grad(fn))(z), rtol=1e-5, atol=1e-6)
        m = nnx.Sequential(nnx.Linear(6, 12, rngs=nnx.Rngs(0)), fn, nnx.Linear(12, 6, rngs=nnx.Rngs(1)))
        (s,) = gsnnx.find_mlp_blocks(m, X[:4, :6])
        assert s.act.name == act.name and s.act_path == ("layers", 1) and s.name == "<model>"

    class Inline(nnx.Module):
        def __init__(self, rngs):
            self.fc1, self.fc2 = nnx.Linear(6, 12, rngs=rngs), nnx.Linear(12, 6, rngs=rngs)

        def __call__(self, x):
            return self.fc2(jax.nn.relu(self.fc1(x)) ** 2)

    inline = Inline(nnx.Rngs(0))
    (s,) = gsnnx.find_mlp_blocks(inline, X[:4, :6])
    assert s.act.name == "relu2" and s.act_path is None and s.ln is None
    with pytest.raises(ValueError, match="<model>: its activation is applied inline"):
        gsnnx.mix_activation(inline, [s])
    with pytest.raises(ValueError, match="no LayerNorm feeds its key layer"):
        gsnnx.restrict_layernorm(inline, [s])


# ------------------------------------------------------------------ equality with the native models
def test_metrics_equal_native_residual_mlp():
    native, m = _mlp_pair()
    sites = gsnnx.find_mlp_blocks(m, X[:4])
    gsnnx.instrument(m, sites)
    loss, grads, met = _nnx_step(tuple(sites))(m, X, Y)
    loss_n, g_n, met_n = _native_step(native, X, Y)
    np.testing.assert_allclose(loss, loss_n, rtol=1e-6)
    for b, nb in zip(grads["blocks"].values(), g_n.blocks):
        np.testing.assert_allclose(b["fc1"]["kernel"][...], nb.key.weight.T, rtol=1e-5, atol=1e-7)
    _compare(met, met_n, "residual LN-MLP (2 blocks, d 16, n 64, B 32)")


def test_metrics_equal_native_with_plugins():
    """Zeroth bias at the input (nonzero values), ReLU -> JSReLU mix at k = 0.5, on both sides."""
    native, m = _mlp_pair(depth=1)
    sites = gsnnx.find_mlp_blocks(m, X[:4])
    b0 = [_normal(10, (1, 16)) * 0.3]
    native = eqx.tree_at(lambda t: [b.zeroth_bias for b in t.blocks], native, b0, is_leaf=lambda v: v is None)
    native = eqx.tree_at(lambda t: [b.act for b in t.blocks], native,
                         [Mixed(k=jnp.asarray(0.5), first=ReLU(), second=JSReLU())])
    gsnnx.add_zeroth_bias(m, sites)
    gsnnx.mix_activation(m, sites, "jsrelu", k=0.5)
    assert [s.key for s in sites] == [("blocks", 0, "fc1")]
    for blk, v in zip(m.blocks, b0):
        blk.fc1.zeroth_bias[...] = v
    _, _, met = _nnx_step(tuple(sites))(m, X, Y)
    _, _, met_n = _native_step(native, X, Y)
    _compare(met, met_n, "residual LN-MLP (1 block) with zeroth bias + mixed(0.5)")


def test_metrics_equal_native_transformer():
    native, m = _lm_pair()
    x, y = TOK[:, :-1], TOK[:, 1:]
    sites = gsnnx.find_mlp_blocks(m, x[:2])
    assert [s.name for s in sites] == ["blocks.0.mlp"]
    assert sites[0].ln == ("blocks", 0, "ln2") and isinstance(sites[0].act, GELU) and sites[0].tokens == 8
    gsnnx.instrument(m, sites)
    loss, _, met = _nnx_step(tuple(sites))(m, x, y)
    loss_n, _, met_n = _native_step(native, x, y)
    np.testing.assert_allclose(loss, loss_n, rtol=1e-6)
    _compare(met, met_n, "pre-LN byte LM (1 block, d 16, n 64, 2 heads, B 4 x T 8, exact GELU)")


# ------------------------------------------------------------------ probes are invisible
def test_instrumented_model_is_unchanged_outside_the_monitored_step():
    _, m = _mlp_pair()
    before = m(X)
    state0 = {k: np.asarray(v.get_value()) for k, v in nnx.to_flat_state(nnx.state(m))}
    sites = gsnnx.find_mlp_blocks(m, X[:4])
    gsnnx.instrument(m, sites)
    gsnnx.instrument(m, sites)  # idempotent
    assert isinstance(m.blocks[0].fc1, nnx.Linear) and type(m.blocks[0].fc1) is not nnx.Linear
    np.testing.assert_array_equal(m(X), before)
    _nnx_step(tuple(sites))(m, X, Y)
    state1 = {k: np.asarray(v.get_value()) for k, v in nnx.to_flat_state(nnx.state(m))}
    assert state1.keys() == state0.keys()
    for k in state0:
        np.testing.assert_array_equal(state1[k], state0[k])
    np.testing.assert_array_equal(m(X), before)


def test_value_and_grad_errors():
    _, m = _mlp_pair()
    sites = gsnnx.find_mlp_blocks(m, X[:4])
    with pytest.raises(ValueError, match="blocks.0: blocks.0.fc1 has no probes"):
        gsnnx.value_and_grad(_loss, sites)(m, X, Y)
    gsnnx.instrument(m, sites)
    with pytest.raises(ValueError, match="has_aux=True it must return"):
        gsnnx.value_and_grad(_loss, sites, has_aux=True)(m, X, Y)
    twice = gsnnx.value_and_grad(lambda mm, x, y: _loss(mm, x, y) + _loss(mm, x, y), sites)
    with pytest.raises(ValueError, match="called the block 2 times"):
        twice(m, X, Y)
    with pytest.raises(ValueError, match="sites: must be a non-empty list"):
        gsnnx.value_and_grad(_loss, [])
    with pytest.raises(ValueError, match="num_samples: must be a positive int"):
        gsnnx.value_and_grad(_loss, sites, num_samples=0)
    with_aux = gsnnx.value_and_grad(lambda mm, x, y: (_loss(mm, x, y), x[:3]), sites, has_aux=True)
    (loss, aux), grads, met = nnx.eval_shape(with_aux, m, X, Y)  # traced, not compiled
    assert loss.shape == () and aux.shape == (3, 10) and met["density"].shape == (2,)
    assert grads["blocks"][0]["fc1"]["kernel"].get_value().shape == (16, 64)


# ------------------------------------------------------------------ plug-ins
def test_plugins_are_the_identity_at_insertion_and_their_projections_hold():
    _, m = _mlp_pair()
    sites = gsnnx.find_mlp_blocks(m, X[:4])
    gsnnx.instrument(m, sites)
    m.blocks[1].ln.scale[...] = -0.2 * jnp.ones(16)  # negative and small: the ramp must keep the sign
    out0 = m(X)
    _, _, met0 = _nnx_step(tuple(sites))(m, X, Y)
    shift0 = np.asarray(m.blocks[0].ln.bias[...])
    projections = gsnnx.sparsify(m, sites, activation="jsrelu", zeroth_bias=True, restricted_ln=True, t_mix=4,
                                 t_up=10, zeroth_bias_clip=0.1)
    assert [p.__name__ for p in projections] == ["gamma_ramp(T_up=10)", "mix_ramp(T_mix=4)", "clip_zeroth_bias(c=0.1)"]
    np.testing.assert_array_equal(m(X), out0)

    opt = nnx.Optimizer(m, optax.sgd(0.5), wrt=nnx.Param)  # made after sparsify: it sees the new Params
    vg = gsnnx.value_and_grad(_loss, sites)

    @nnx.jit
    def train_step(model, optimizer, x, y, step):
        loss, grads, metrics = vg(model, x, y)  # metrics of the model BEFORE this update
        optimizer.update(model, grads)
        for project in projections:
            project(model, step)
        return grads, metrics

    for s in range(3):
        grads, metrics = train_step(m, opt, X, Y, jnp.asarray(s))
        if s == 0:  # at insertion: the same metrics as without the plug-ins
            for k in met0:
                np.testing.assert_array_equal(metrics[k], met0[k], err_msg=k)
    flat = [k for k, _ in nnx.to_flat_state(grads)]
    assert ("blocks", 0, "fc1", "zeroth_bias") in flat
    assert not any(k[-1] == "k" or k[-2:] == ("ln", "bias") for k in flat)  # k and the frozen shift: not trained
    for b in m.blocks:
        assert isinstance(b.act, gsnnx.MixedActivation) and float(b.act.k[...]) == 0.75  # min(3/4, 1)
        assert isinstance(b.ln.bias, gsnnx.FrozenShift)
        g = np.asarray(b.ln.scale[...])
        assert np.all(np.abs(g) >= 0.3 - 1e-7)  # min(3/10, 1)
        b0 = np.asarray(b.fc1.zeroth_bias[...])
        assert np.any(b0 != 0) and np.all(np.abs(b0) <= 0.1 * np.abs(g) + 1e-7)
    assert np.all(np.asarray(m.blocks[1].ln.scale[...]) < 0)  # sign kept
    np.testing.assert_array_equal(m.blocks[0].ln.bias[...], shift0)
    # the monitors read the live mix
    act = gsnnx.site_activation(m, sites[0])
    assert isinstance(act, Mixed) and float(act.k) == 0.75
    # the sparsified, instrumented model gives the same sites again
    assert gsnnx.find_mlp_blocks(m, X[:4]) == sites


def test_restricted_ln_from_scratch_and_zeroth_bias_output():
    _, m = _mlp_pair()
    sites = gsnnx.find_mlp_blocks(m, X[:4])
    proj = gsnnx.sparsify(m, sites, restricted_ln=True, from_scratch=True, activation="relu", zeroth_bias=True,
                          zeroth_bias_placement="output")
    assert [p.__name__ for p in proj] == ["gamma_floor(1)", "clip_zeroth_bias(c=0.1)"]
    assert m.blocks[0].ln.bias is None and m.blocks[0].fc2.zeroth_bias[...].shape == (1, 16)
    gamma = np.linspace(-1.0, 2.0, 16, dtype=np.float32)
    m.blocks[0].ln.scale[...] = gamma
    m.blocks[0].fc2.zeroth_bias[...] = jnp.full((1, 16), 5.0)
    for p in proj:
        p(m, 0)
    np.testing.assert_array_equal(m.blocks[0].ln.scale[...], np.maximum(gamma, 1.0))
    np.testing.assert_allclose(m.blocks[0].fc2.zeroth_bias[...], 0.1 * np.maximum(gamma, 1.0)[None], rtol=1e-6)
    with pytest.raises(ValueError, match="other placement"):
        gsnnx.add_zeroth_bias(m, sites, placement="input")
    with pytest.raises(ValueError, match="a 2-D \\(B, d\\) input takes one bias row"):
        _, m2 = _mlp_pair()
        s2 = gsnnx.find_mlp_blocks(m2, X[:4])
        gsnnx.add_zeroth_bias(m2, s2, seq_len=2)
        m2(X)
    with pytest.raises(ValueError, match="zeroth_bias_clip: must be a finite number"):
        gsnnx.sparsify(m, sites, zeroth_bias=True, zeroth_bias_clip=-1.0)
    with pytest.raises(ValueError, match="t_mix: must be an integer.*allowed: >= 0"):
        gsnnx.mix_projection(sites, 1.5)


# ------------------------------------------------------------------ spectra
def test_spectra_rows_by_path_match_the_native_model():
    native, m = _mlp_pair()
    mats = gsnnx.named_matrices(m)
    assert list(mats)[:3] == ["blocks.0.fc1.kernel", "blocks.0.fc2.kernel", "blocks.1.fc1.kernel"]
    assert mats["blocks.0.fc1.kernel"].shape == (64, 16)  # K as n x d, like the native weight
    rows = {r.name: r for r in spectra.analyze(m)}
    assert list(rows) == list(mats)
    assert [r.name for r in spectra.analyze(nnx.state(m))] == list(rows)
    native_rows = {r.name: r for r in spectra.analyze(native)}
    for nnx_name, native_name in (("blocks.0.fc1.kernel", "blocks.0.key.weight"),
                                  ("blocks.1.fc2.kernel", "blocks.1.value.weight"), ("inp.kernel", "inp.weight")):
        a, b = rows[nnx_name], native_rows[native_name]
        assert a.shape == b.shape and a.rank == b.rank and a.near_zero_rate == b.near_zero_rate
        np.testing.assert_allclose([a.s_max, a.ratio, a.mass80_ratio], [b.s_max, b.ratio, b.mass80_ratio], rtol=1e-6)
    with pytest.raises(ValueError, match="no 2-D weights"):
        gsnnx.named_matrices(nnx.LayerNorm(4, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="expected a flax.nnx.Module or nnx.State"):
        gsnnx.named_matrices({"w": np.ones((2, 2))})


# ------------------------------------------------------------------ the package's names
def test_public_names_and_the_shared_plugin_definitions():
    """Every name of ``__all__`` resolves; the projection type and the zeroth-bias placements are
    the ones of gradsparse.plugins (one definition), and the placement check reads the same."""
    import gradsparse.plugins
    import gradsparse.plugins.zeroth_bias

    for name in gsnnx.__all__:
        assert getattr(gsnnx, name) is not None, name
    assert gsnnx.Projection is gradsparse.plugins.Projection
    assert gsnnx.PLACEMENTS is gradsparse.plugins.zeroth_bias.PLACEMENTS
    assert gsnnx.MATCH_RTOL == 1e-5
    _, m = _mlp_pair(depth=1)
    sites = gsnnx.find_mlp_blocks(m, X[:4])
    with pytest.raises(ValueError, match="zeroth_bias_placement: unknown value 'middle'; allowed: input, output"):
        gsnnx.add_zeroth_bias(m, sites, placement="middle")
    with pytest.raises(ValueError, match="zeroth_bias_placement: unknown value 'middle'; allowed: input, output"):
        gsnnx.sparsify(m, sites, zeroth_bias=True, zeroth_bias_placement="middle")
