"""Plug-in modules (SPEC 4): identity at insertion, projections after every step, noise laws, surgery."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gradsparse
from gradsparse.activations import JSReLU, Mixed, ReLU
from gradsparse.config import TrainConfig
from gradsparse.models import Dense, LayerNorm, ResidualMLP, ViT, zero_probes
from gradsparse.plugins import ExactWeightNoise, SynapseNoise, configure, replay_options
from gradsparse.plugins.restricted_ln import signed_floor
from gradsparse.plugins.schedules import ramp
from gradsparse.factory import make_optimizer
from gradsparse.models import default_trainable
from gradsparse.step import make_train_step


_make_mlp = eqx.filter_jit(lambda key: ResidualMLP.create(key, 6, 3, width=8, depth=2, mlp_ratio=2))


def _mlp(seed=0):
    """A tiny residual MLP (d_in 6, width 8, n 16, 2 blocks, 3 classes); one compiled constructor."""
    return _make_mlp(jax.random.key(seed))


@eqx.filter_jit
def _logits(model, x, key=None):
    return model(x, zero_probes(model.mlp_blocks(), x.shape[0] * model.tokens_per_sample), key=key)[0]


def _normal(seed, shape):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


X = _normal(1, (16, 6))
Y = jnp.arange(16) % 3


def _trained_like(model, seed=5):
    """Perturb every float leaf so LN gammas/shifts are not at their init values (negative gammas too)."""
    leaves, tree = jax.tree_util.tree_flatten(eqx.filter(model, eqx.is_inexact_array))
    rng = np.random.default_rng(seed)
    pert = [jnp.asarray(np.asarray(l) + 0.5 * rng.standard_normal(l.shape), jnp.float32) for l in leaves]
    return eqx.combine(jax.tree_util.tree_unflatten(tree, pert), model)


# ------------------------------------------------------------------------------------ identity at insertion
@pytest.mark.parametrize("kw", [dict(zeroth_bias=True), dict(zeroth_bias=True, zeroth_bias_placement="output"),
                                dict(jsrelu=True), dict(lora=True), dict(restricted_ln=True),
                                dict(noise="exact"), dict(zeroth_bias=True, restricted_ln=True, jsrelu=True,
                                                          lora=True, noise="synapse")])
def test_sparsify_is_identity_at_insertion(kw):
    model = _trained_like(_mlp())
    res = gradsparse.sparsify(model, **kw)
    np.testing.assert_array_equal(np.asarray(_logits(res.model, X)), np.asarray(_logits(model, X)))


def test_mixing_at_k0_is_relu_and_at_k1_is_jsrelu():
    z = jnp.linspace(-3, 3, 61)
    m0 = Mixed(k=jnp.zeros(()), first=ReLU(), second=JSReLU())
    np.testing.assert_array_equal(np.asarray(m0(z)), np.asarray(ReLU()(z)))
    m1 = Mixed(k=jnp.ones(()), first=ReLU(), second=JSReLU())
    np.testing.assert_array_equal(np.asarray(m1(z)), np.asarray(JSReLU()(z)))
    res = gradsparse.sparsify(_mlp(), jsrelu=True)
    assert all(isinstance(b.act, Mixed) and float(b.act.k) == 0.0 for b in res.model.blocks)


def test_zeroth_bias_shape_follows_seq_len():
    vit = eqx.filter_jit(lambda k: ViT.create(k, (8, 8), 3, patch=4, width=8, depth=1, heads=2, mlp_ratio=2))(
        jax.random.key(0))
    res = gradsparse.sparsify(vit, zeroth_bias=True)
    assert res.model.blocks[0].mlp.zeroth_bias.shape == (4, 8)
    assert res.options["seq_len"] == 4
    x = jnp.asarray(np.random.default_rng(2).standard_normal((3, 8, 8)), jnp.float32)
    np.testing.assert_array_equal(np.asarray(_logits(res.model, x)), np.asarray(_logits(vit, x)))
    # a nonzero bias at position 2 changes exactly that position's MLP input
    b0 = jnp.zeros((4, 8)).at[2].set(1.0)
    m = eqx.tree_at(lambda m: m.blocks[0].mlp.zeroth_bias, res.model, b0)
    first_x = eqx.filter_jit(lambda mm: mm(x, zero_probes(mm.mlp_blocks(), 12))[1][0]["x"])
    dx = first_x(m) - first_x(vit)
    expected = jnp.tile(b0, (3, 1))
    np.testing.assert_allclose(np.asarray(dx), np.asarray(expected), atol=1e-6)


# ------------------------------------------------------------------------------------ projections
def test_signed_floor_and_ramp():
    g = jnp.array([-0.2, 0.0, 0.5, -2.0, 0.7])
    np.testing.assert_allclose(np.asarray(signed_floor(g, 0.6)), [-0.6, 0.6, 0.6, -2.0, 0.7])
    assert float(ramp(0, 4)) == 0.25 and float(ramp(3, 4)) == 1.0 and float(ramp(10, 4)) == 1.0
    assert float(ramp(0, 0)) == 1.0


def _run_steps(model, trainable, projections, steps, lr=0.5):
    cfg = TrainConfig(lr=lr, steps=steps)
    opt = make_optimizer(cfg)
    step = make_train_step(opt, trainable, projections, monitors=False)
    opt_state = opt.init(eqx.filter(model, trainable))
    xs = np.random.default_rng(7).standard_normal((steps, 16, 6)).astype(np.float32)
    for s in range(steps):
        xb = xs[s]
        model, opt_state, _, finite = step(model, opt_state, xb, Y, jax.random.key(s), jnp.asarray(s, jnp.int32))
        assert bool(finite)
        yield s, model


def test_finetune_projections_hold_after_every_step():
    base = _trained_like(_mlp())
    t_up, t_mix, c = 4, 3, 0.02
    res = gradsparse.sparsify(base, zeroth_bias=True, restricted_ln=True, jsrelu=True, t_up=t_up, t_mix=t_mix,
                              zeroth_bias_clip=c)
    shifts = [np.asarray(b.ln.bias) for b in base.blocks]
    hit = False
    for s, m in _run_steps(res.model, res.trainable, res.projections, 6):
        lower = min((s + 1) / t_up, 1.0)
        for b, beta in zip(m.blocks, shifts):
            g = np.asarray(b.ln.weight)
            assert np.all(np.abs(g) >= lower - 1e-7)
            np.testing.assert_array_equal(np.asarray(b.ln.bias), beta)  # shift frozen
            b0 = np.asarray(b.zeroth_bias)
            bound = c * np.abs(g)
            assert np.all(np.abs(b0) <= bound + 1e-7)
            hit |= bool(np.any(np.isclose(np.abs(b0), bound, rtol=1e-6)))
            assert float(b.act.k) == pytest.approx(min((s + 1) / t_mix, 1.0))
    assert hit, "the zeroth-bias clip never became active; the test would not detect a missing clip"


def test_scratch_projections_hold_after_every_step():
    cfg = TrainConfig(zeroth_bias=True, restricted_ln=True, zeroth_bias_clip=0.01)
    model, projections = configure(_mlp(), cfg)
    model2, _ = configure(_mlp(), cfg)
    assert eqx.tree_equal(model, model2)  # deterministic
    assert all(b.ln.bias is None and b.zeroth_bias.shape == (1, 8) for b in model.blocks)
    # start below the floor to see the projection act
    model = eqx.tree_at(lambda m: [b.ln.weight for b in m.blocks], model, [jnp.full((8,), 0.3)] * 2)
    hit = False
    for s, m in _run_steps(model, default_trainable(model), projections, 5, lr=1.0):
        for b in m.blocks:
            g = np.asarray(b.ln.weight)
            assert np.all(g >= 1.0)
            b0 = np.asarray(b.zeroth_bias)
            assert np.all(np.abs(b0) <= 0.01 * g + 1e-8)
            hit |= bool(np.any(np.isclose(np.abs(b0), 0.01 * g, rtol=1e-6)))
    assert hit


def test_lora_trains_only_lora_and_zeroth_bias():
    base = _trained_like(_mlp())
    res = gradsparse.sparsify(base, lora=True, zeroth_bias=True, lora_rank=2)
    first = None
    for s, m in _run_steps(res.model, res.trainable, res.projections, 3):
        first = m
    frozen = [lambda m: m.inp.weight, lambda m: m.head.weight, lambda m: m.blocks[0].key.weight,
              lambda m: m.blocks[1].value.weight, lambda m: m.blocks[0].ln.weight, lambda m: m.blocks[1].key.bias]
    for f in frozen:
        np.testing.assert_array_equal(np.asarray(f(first)), np.asarray(f(res.model)))
    assert not np.array_equal(np.asarray(first.blocks[0].key.lora_b), np.zeros((16, 2)))
    assert float(jnp.abs(first.blocks[0].zeroth_bias).max()) > 0
    assert first.blocks[0].key.lora_scale == 1.0


# ------------------------------------------------------------------------------------ noise
@pytest.mark.parametrize("kind", ["synapse", "exact"])
def test_noise_off_at_eval_on_in_training(kind):
    base = _mlp()
    noisy = gradsparse.sparsify(base, noise=kind).model
    plain = _logits(base, X)
    np.testing.assert_array_equal(np.asarray(_logits(noisy, X)), np.asarray(plain))
    a, b = _logits(noisy, X, jax.random.key(0)), _logits(noisy, X, jax.random.key(1))
    assert float(jnp.max(jnp.abs(a - plain))) > 1e-3
    assert float(jnp.max(jnp.abs(a - b))) > 1e-3
    np.testing.assert_array_equal(np.asarray(a), np.asarray(_logits(noisy, X, jax.random.key(0))))


@pytest.mark.parametrize("kind,per", [("synapse", "sample"), ("exact", "sample"), ("exact", "batch")])
def test_rho_zero_is_bit_identical(kind, per):
    base = _mlp()
    m = gradsparse.sparsify(base, noise=kind, rho=0.0, noise_per=per).model
    np.testing.assert_array_equal(np.asarray(_logits(m, X, jax.random.key(3))), np.asarray(_logits(base, X)))


def _dense(n=64, d=16, seed=0):
    """Dense d -> n with U(-1/sqrt(d), 1/sqrt(d)) weights drawn by numpy (no per-shape compile)."""
    w = np.random.default_rng(seed).uniform(-1, 1, (n, d)) / np.sqrt(d)
    return Dense(jnp.asarray(w, jnp.float32), jnp.zeros((n,), jnp.float32))


def test_synapse_noise_variance_is_s2_x2():
    n, d, rho = 256, 16, 0.3
    dense = _dense(n, d)
    s = rho * float(jnp.sqrt(jnp.mean(dense.weight ** 2)))
    scales = jnp.repeat(jnp.array([0.5, 4.0]), 32)[:, None]
    x = scales * _normal(4, (64, d))
    eps = eqx.filter_jit(SynapseNoise(rho=rho))(jnp.zeros((64, n)), x, dense, jax.random.key(5))
    ratio = np.asarray(eps / (s * jnp.linalg.norm(x, axis=-1, keepdims=True)))  # should be iid N(0, 1)
    for grp in (ratio[:32], ratio[32:]):  # 8192 draws each: SE of the variance ~ 0.016
        assert abs(grp.var() - 1.0) < 0.08
        assert abs(grp.mean()) < 0.05
    c = np.corrcoef(ratio[0], ratio[1])[0, 1]  # fresh per token
    assert abs(c) < 0.3


def test_exact_noise_shares_E_within_a_sample():
    n, d, t = 32, 8, 4
    dense = _dense(n, d)
    u, v = _normal(6, (2, d))
    # sample 0: (u, v, 2u, u + v); sample 1: (u, v, v, u). Noise E_s x_t is linear in x_t with one E_s.
    x = jnp.stack([u, v, 2 * u, u + v, u, v, v, u])
    for per in ("sample", "batch"):
        eps = eqx.filter_jit(ExactWeightNoise(rho=0.2, per=per))(jnp.zeros((8, n)), x, dense, jax.random.key(7), t)
        e = np.asarray(eps)
        assert np.max(np.abs(e[0])) > 1e-2
        np.testing.assert_allclose(e[2], 2 * e[0], atol=1e-5)
        np.testing.assert_allclose(e[3], e[0] + e[1], atol=1e-5)
        np.testing.assert_allclose(e[6], e[5], atol=1e-5)
        np.testing.assert_allclose(e[7], e[4], atol=1e-5)
        if per == "sample":
            assert np.max(np.abs(e[4] - e[0])) > 1e-2                # other sample, other E
            assert np.max(np.abs(e[5] - e[1])) > 1e-2
        else:
            np.testing.assert_allclose(e[4], e[0], atol=1e-5)        # one E for the batch
            np.testing.assert_allclose(e[5], e[1], atol=1e-5)


def _noise_law_errors(noise, t, d, n=5, draws=6000):
    """Monte-Carlo check of the joint law of the noise E X^T and its input gradient H E (E iid N(0, s^2)).

    Returns the max errors, relative to the largest expected entry, of (over draws, divided by s^2)
    E[noise_ti noise_uj] = <x_t, x_u> 1[i=j], E[dX_ti dX_uj] = <h_t, h_u> 1[i=j], E[noise_ti dX_uj] = h_ui x_tj.
    """
    dense = _dense(n, d, seed=1)
    s = float(jnp.sqrt(jnp.mean(dense.weight ** 2))) * noise.rho
    x = _normal(8, (t, d))
    h = _normal(9, (t, n))

    def one(key):
        e, vjp = jax.vjp(lambda xx: noise(jnp.zeros((t, n)), xx, dense, key, t), x)
        return e, vjp(h)[0]

    e, g = jax.jit(jax.vmap(one))(jax.random.split(jax.random.key(10), draws))
    e, g = np.asarray(e, np.float64) / s, np.asarray(g, np.float64) / s
    xn, hn = np.asarray(x, np.float64), np.asarray(h, np.float64)
    got = [np.einsum("kti,kuj->tiuj", a, b) / draws for a, b in ((e, e), (g, g), (e, g))]
    want = [np.einsum("tu,ij->tiuj", xn @ xn.T, np.eye(n)), np.einsum("tu,ij->tiuj", hn @ hn.T, np.eye(d)),
            np.einsum("ui,tj->tiuj", hn, xn)]
    return [float(np.abs(a - b).max() / np.abs(b).max()) for a, b in zip(got, want)]


@pytest.mark.parametrize("t,d", [(1, 6), (3, 6), (4, 3)])  # rank-one route, QR route, materialised E
def test_exact_noise_has_the_law_of_a_materialised_E(t, d):
    """Forward noise and input gradient jointly distributed as with E iid N(0, s^2) per sample (MC error ~0.05)."""
    errs = _noise_law_errors(ExactWeightNoise(rho=1.0), t, d)
    assert max(errs) < 0.15, errs


def test_synapse_noise_gradient_is_not_weight_noise():
    """The same check fails for synapse noise: its input gradient is rank-one (this is what 'exact' adds)."""
    errs = _noise_law_errors(SynapseNoise(rho=1.0), 1, 6)
    assert errs[0] < 0.15 and errs[1] > 0.5, errs


def test_noise_validation():
    with pytest.raises(ValueError, match="allowed: none, synapse, exact"):
        gradsparse.sparsify(_mlp(), noise="gaussian")
    with pytest.raises(ValueError, match="rho"):
        gradsparse.sparsify(_mlp(), noise="synapse", rho=-1.0)
    with pytest.raises(ValueError, match="noise_per"):
        gradsparse.sparsify(_mlp(), noise="exact", noise_per="token")


# ------------------------------------------------------------------------------------ replay and user models
def test_replay_gives_same_structure_and_mask():
    kw = dict(zeroth_bias=True, restricted_ln=True, jsrelu=True, lora=True, noise="exact", lora_rank=2)
    res = gradsparse.sparsify(_trained_like(_mlp()), **kw)
    _r = replay_options(_mlp(seed=3), res.options)
    m2, mask2 = _r.model, _r.trainable
    assert jax.tree_util.tree_structure(m2) == jax.tree_util.tree_structure(res.model)
    assert jax.tree_util.tree_leaves(mask2) == jax.tree_util.tree_leaves(res.trainable)
    assert [l.shape for l in jax.tree_util.tree_leaves(m2)] == [l.shape for l in jax.tree_util.tree_leaves(res.model)]
    import json

    assert json.loads(json.dumps(res.options)) == res.options
    with pytest.raises(ValueError, match="unknown keys"):
        replay_options(_mlp(), {**res.options, "bogus": 1})


class UserBlock(eqx.Module):
    """A user's own MLP block meeting the contract of gradsparse.plugins.blocks."""

    ln: LayerNorm
    key: Dense
    value: Dense
    act: object
    zeroth_bias: jax.Array | None = None
    zeroth_bias_placement: str = eqx.field(static=True, default="input")
    noise: object = None

    def __call__(self, h, prng=None):
        x = self.ln(h)
        if self.zeroth_bias is not None and self.zeroth_bias_placement == "input":
            x = x + self.zeroth_bias[0]
        z = self.key(x)
        if self.noise is not None and prng is not None:
            z = self.noise(z, x, self.key, prng, 1)
        y = self.value(self.act(z))
        if self.zeroth_bias is not None and self.zeroth_bias_placement == "output":
            y = y + self.zeroth_bias[0]
        return y


class UserNet(eqx.Module):
    layers: list
    head: Dense

    def __call__(self, x, prng=None):
        for blk in self.layers:
            x = x + blk(x, prng)
        return self.head(x)


class NoBiasBlock(eqx.Module):
    ln: LayerNorm
    key: Dense
    value: Dense
    act: object


def _user_net():
    layers = [UserBlock(LayerNorm.create(6), _dense(12, 6, seed=i), _dense(6, 12, seed=10 + i), ReLU())
              for i in range(2)]
    return UserNet(layers, _dense(3, 6, seed=20))


def test_sparsify_user_model():
    net = _trained_like(_user_net())
    select = lambda m: m.layers  # noqa: E731
    res = gradsparse.sparsify(net, zeroth_bias=True, restricted_ln=True, jsrelu=True, lora=True, noise="synapse",
                              select=select, seq_len=1, t_mix=2, lora_rank=2, zeroth_bias_clip=0.05)
    fwd = eqx.filter_jit(lambda m, x, k=None: m(x, k))
    np.testing.assert_array_equal(np.asarray(fwd(res.model, X)), np.asarray(fwd(net, X)))
    assert not np.array_equal(np.asarray(fwd(res.model, X, jax.random.key(0))), np.asarray(fwd(net, X)))
    # a user training loop: partition by the mask, optax update, then the projections
    opt = optax.sgd(0.5)
    trainable = res.trainable

    @eqx.filter_jit
    def train_step(model, state, key, step):
        params, static = eqx.partition(model, trainable)

        def loss(p):
            logits = eqx.combine(p, static)(X, key)
            return optax.softmax_cross_entropy_with_integer_labels(logits, Y).mean()

        upd, state = opt.update(jax.grad(loss)(params), state, params)
        model = eqx.combine(optax.apply_updates(params, upd), static)
        for project in res.projections:
            model = project(model, step)
        return model, state

    model = res.model
    state = opt.init(eqx.filter(model, trainable))
    for s in range(3):
        model, state = train_step(model, state, jax.random.key(s), jnp.asarray(s))
        for b in model.layers:
            assert float(b.act.k) == pytest.approx(min((s + 1) / 2, 1.0))
            assert np.all(np.abs(np.asarray(b.zeroth_bias)) <= 0.05 * np.abs(np.asarray(b.ln.weight)) + 1e-7)
    np.testing.assert_array_equal(np.asarray(model.head.weight), np.asarray(net.head.weight))  # frozen by LoRA
    assert float(jnp.abs(model.layers[0].value.lora_b).max()) > 0
    # replay needs the same select
    with pytest.raises(ValueError, match="custom select"):
        replay_options(_user_net(), res.options)
    _r = replay_options(_user_net(), res.options, select=select)
    m2, _ = _r.model, _r.trainable
    assert jax.tree_util.tree_structure(m2) == jax.tree_util.tree_structure(res.model)


def test_user_model_contract_errors():
    net = _user_net()
    with pytest.raises(ValueError, match="mlp_blocks"):
        gradsparse.sparsify(net, jsrelu=True)
    with pytest.raises(ValueError, match="seq_len"):
        gradsparse.sparsify(net, zeroth_bias=True, select=lambda m: m.layers)
    bad = UserNet([NoBiasBlock(LayerNorm.create(6), _dense(12, 6), _dense(6, 12), ReLU())], _dense(3, 6))
    with pytest.raises(ValueError, match="no field 'zeroth_bias', which zeroth_bias needs"):
        gradsparse.sparsify(bad, zeroth_bias=True, select=lambda m: m.layers, seq_len=1)
    with pytest.raises(ValueError, match="no field 'noise'"):
        gradsparse.sparsify(bad, noise="synapse", select=lambda m: m.layers)
    res = gradsparse.sparsify(bad, jsrelu=True, lora=True, select=lambda m: m.layers)  # these need no more
    assert isinstance(res.model.layers[0].act, Mixed)
    with pytest.raises(ValueError, match="select must be a function"):
        gradsparse.sparsify(net, jsrelu=True, select="layers")


def test_configure_without_plugins_is_untouched_and_validates():
    m = _mlp()
    out, proj = configure(m, TrainConfig())
    assert out is m and proj == []
    noisy, proj = configure(m, TrainConfig(weight_noise="exact", rho=0.2, noise_per="batch"))
    assert proj == [] and all(b.noise == ExactWeightNoise(rho=0.2, per="batch") for b in noisy.blocks)
    np.testing.assert_array_equal(np.asarray(_logits(noisy, X)), np.asarray(_logits(m, X)))
    with pytest.raises(ValueError, match="TrainConfig"):
        configure(m, object())
    with pytest.raises(ValueError, match="zeroth_bias_placement"):
        gradsparse.sparsify(m, zeroth_bias=True, zeroth_bias_placement="middle")
    with pytest.raises(ValueError, match="t_up"):
        gradsparse.sparsify(m, restricted_ln=True, t_up=-1)
    with pytest.raises(ValueError, match="lora_rank"):
        gradsparse.sparsify(m, lora=True, lora_rank=0)
