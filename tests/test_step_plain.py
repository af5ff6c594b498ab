"""The plain training step (no monitors, no accumulator) skips the probe gradients: it must give the
same new parameters, optimizer state, loss, accuracy and gradient norm as the monitored step.

The probes add exact zeros to a and y, so dL/dparams is the same function of the inputs whether or
not dL/dprobes is also asked for; XLA on CPU evaluates the same matmuls in both programs, so the
results are compared BIT FOR BIT. (Should a backend ever fuse the two programs differently, the
difference would be float rounding; the test would then need rtol ~ 1e-6, not a looser bound.)
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gradsparse.config import TrainConfig
from gradsparse.data import DataInfo, load_dataset
from gradsparse.factory import build, init_state, make_accumulator, make_optimizer
from gradsparse.step import forward_backward, make_train_step


@pytest.fixture(scope="module")
def mnist():
    return load_dataset("mnist1d", seed=0)


def _leaves(tree):
    return [np.asarray(a) for a in jax.tree_util.tree_leaves(eqx.filter(tree, eqx.is_array))]


def _run_both(cfg: TrainConfig, info: DataInfo, x, y, steps: int = 3):
    built = build(cfg, info, jax.random.key(cfg.seed))
    opt = make_optimizer(cfg)
    plain = make_train_step(opt, built.trainable, built.projections, monitors=False)
    mon = make_train_step(opt, built.trainable, built.projections, monitors=True)
    out = {}
    for name, fn in (("plain", plain), ("mon", mon)):
        model, state = built.model, init_state(cfg, built, opt)
        mets = []
        for s in range(steps):
            key = jax.random.fold_in(jax.random.key(7), s)
            model, state, met, fin = fn(model, state, x, y, key, jnp.asarray(s, jnp.int32))
            assert bool(fin)
            mets.append({k: float(met[k]) for k in ("loss", "accuracy", "grad_norm")})
        out[name] = (model, state, mets)
    return out


def _assert_same(out):
    (mp, sp, metp), (mm, sm, metm) = out["plain"], out["mon"]
    assert metp == metm
    for a, b in zip(_leaves(mp), _leaves(mm), strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(_leaves(sp), _leaves(sm), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("optimizer,extra", [("adam", {"weight_decay": 1e-2, "grad_clip": 1.0, "depth": 1,
                                                       "weight_noise": "synapse"}),
                                             ("sgd", {"zeroth_bias": True, "restricted_ln": True, "depth": 1,
                                                      "activation": "jsrelu"})])
def test_plain_step_equals_monitored_step_mlp(mnist, optimizer, extra):
    """Adam with weight decay, clipping and token-wise synapse noise (the PRNG key drives the same
    noise in both steps); SGD with the zeroth bias and restricted LN projections and JSReLU."""
    cfg = TrainConfig(model="mlp", data="mnist1d", width=32, batch_size=16, optimizer=optimizer,
                      lr=0.05 if optimizer == "sgd" else 3e-3, **extra).validate()
    x, y = jnp.asarray(mnist.x_train[:16]), jnp.asarray(mnist.y_train[:16])
    out = _run_both(cfg, DataInfo.of(mnist), x, y, steps=2)
    _assert_same(out)
    # and training moved the parameters (the comparison is not between two untouched models)
    m0 = build(cfg, DataInfo.of(mnist), jax.random.key(cfg.seed)).model
    assert any(not np.array_equal(a, b) for a, b in zip(_leaves(m0), _leaves(out["plain"][0])))


def test_forward_backward_without_probe_grads(mnist):
    """Same loss, accuracy, aux and parameter gradients; no probe gradients."""
    cfg = TrainConfig(width=16, depth=1, batch_size=8).validate()
    built = build(cfg, DataInfo.of(mnist), jax.random.key(0))
    x, y = jnp.asarray(mnist.x_train[:8]), jnp.asarray(mnist.y_train[:8])
    fb = eqx.filter_jit(forward_backward)
    full = fb(built.model, built.trainable, x, y, None)
    part = fb(built.model, built.trainable, x, y, None, probe_grads=False)
    assert part[4] is None and full[4] is not None
    with pytest.raises(ValueError, match="probe_grads: must be True or False"):
        forward_backward(built.model, built.trainable, x, y, None, probe_grads="no")
    assert float(part[0]) == float(full[0]) and float(part[1]) == float(full[1])
    for a, b in zip(jax.tree_util.tree_leaves((part[2], part[3])), jax.tree_util.tree_leaves((full[2], full[3])),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_step_with_accumulator_still_gets_probe_grads(mnist):
    """Without monitors but with the covariance accumulator the step needs eta = dL/da * sigma'(z):
    the accumulated C_eta must move from zero and match between the plain and monitored steps."""
    cfg = TrainConfig(width=16, depth=1, batch_size=8, optimizer="sgd", lr=0.05, weight_decay=1e-3,
                      track_covariance=True).validate()
    built = build(cfg, DataInfo.of(mnist), jax.random.key(0))
    opt = make_optimizer(cfg)
    acc = make_accumulator(cfg, built.model)
    x, y = jnp.asarray(mnist.x_train[:8]), jnp.asarray(mnist.y_train[:8])
    states = []
    for mon in (False, True):
        step = make_train_step(opt, built.trainable, monitors=mon, accumulator=acc)
        _, state, _, _ = step(built.model, init_state(cfg, built, opt, acc), x, y, jax.random.key(1),
                              jnp.asarray(0, jnp.int32))
        states.append(_leaves(state[1]))
    assert any(np.abs(a).max() > 0 for a in states[0])
    for a, b in zip(*states, strict=True):
        np.testing.assert_array_equal(a, b)
