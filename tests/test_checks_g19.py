"""G19 (per-sample vs per-token gradients): the cancellation ratio's closed forms, the vmapped per-sample
gradient against jax.grad of one sample's loss, C = 1 exactly for the one-token MLP, and the plan."""

from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gradsparse.data import DataInfo
from gradsparse.factory import build
from gradsparse.models.common import zero_probes
from gradsparse.step import loss_fn
from theory_checks import g10_modules_from_scratch as g10
from theory_checks import g12_weight_noise_transformer as g12
from theory_checks import g19_token_cancellation as g19
from theory_checks.context import lm_config, sgd_config
from theory_checks.protocol import PRESETS


def _rng(seed=0):
    return np.random.default_rng(seed)


# ------------------------------------------------------------------------------------------ closed forms
def test_one_token_per_sample_gives_c_one_exactly():
    eta, x = _rng().normal(size=(7, 1, 5)), _rng(1).normal(size=(7, 1, 3))
    P, T = g19.cancellation_terms(eta, x)
    np.testing.assert_allclose(P, T, rtol=1e-12)
    assert g19.cancellation_ratio(P, T) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("S", [2, 5, 32])
def test_identical_tokens_give_c_equal_to_the_token_count(S):
    e1, x1 = _rng().normal(size=(4, 1, 6)), _rng(1).normal(size=(4, 1, 3))
    P, T = g19.cancellation_terms(np.repeat(e1, S, axis=1), np.repeat(x1, S, axis=1))
    assert g19.cancellation_ratio(P, T) == pytest.approx(S, rel=1e-12)
    assert g19.token_noise(g19.cancellation_ratio(P, T), S) == pytest.approx(0.0, abs=1e-10)


def test_opposite_etas_on_the_same_x_cancel_exactly():
    e1, x1 = _rng().normal(size=(3, 1, 6)), _rng(1).normal(size=(3, 1, 4))
    P, T = g19.cancellation_terms(np.concatenate([e1, -e1], 1), np.concatenate([x1, x1], 1))
    assert np.max(np.abs(P)) < 1e-20 and np.all(T > 0)
    assert g19.cancellation_ratio(P, T) == pytest.approx(0.0, abs=1e-12)


def test_two_tokens_closed_form_and_unrelated_tokens_near_one():
    # P = T + 2 (eta1.eta2)(x1.x2) for two tokens
    rng = _rng(3)
    eta, x = rng.normal(size=(5, 2, 4)), rng.normal(size=(5, 2, 3))
    P, T = g19.cancellation_terms(eta, x)
    cross = 2 * np.sum(eta[:, 0] * eta[:, 1], 1) * np.sum(x[:, 0] * x[:, 1], 1)
    np.testing.assert_allclose(P, T + cross, rtol=1e-12)
    # independent zero-mean tokens: E[cross] = 0, so C -> 1 over many samples
    eta, x = rng.normal(size=(4000, 8, 16)), rng.normal(size=(4000, 8, 16))
    assert g19.cancellation_ratio(*g19.cancellation_terms(eta, x)) == pytest.approx(1.0, abs=0.03)


def test_token_noise_is_the_relative_token_variance():
    rng = _rng(4)
    eta, x = rng.normal(size=(6, 5, 3)), rng.normal(size=(6, 5, 2)) + 1.0
    M = np.einsum("stn,std->stnd", eta, x)
    Mbar = M.mean(axis=1, keepdims=True)
    R = np.sum((M - Mbar) ** 2) / np.sum(5 * Mbar ** 2)
    P, T = g19.cancellation_terms(eta, x)
    assert g19.token_noise(g19.cancellation_ratio(P, T), 5) == pytest.approx(R, rel=1e-10)


def test_shuffled_pairing_permutes_tokens_within_each_sample():
    x = np.arange(2 * 6 * 3, dtype=float).reshape(2, 6, 3)
    xs = g19.shuffled_pairing(x, _rng(5))
    assert xs.shape == x.shape and not np.array_equal(xs, x)
    for s in range(2):
        assert sorted(map(tuple, xs[s])) == sorted(map(tuple, x[s]))


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="agree"):
        g19.cancellation_terms(np.zeros((2, 3, 4)), np.zeros((2, 4, 4)))
    with pytest.raises(ValueError, match="> 0"):
        g19.cancellation_ratio([0.0], [0.0])
    with pytest.raises(ValueError):
        g19.token_noise(0.0, 4)


# ------------------------------------------------------------------------------------------ on models
def _tiny_lm(**changes):
    cfg = lm_config("smoke", **changes)
    info = DataInfo("text", (cfg.seq_len,), 256)
    return build(cfg, info, jax.random.PRNGKey(3)).model, cfg


def _perturb(model, key):
    """Random (non-zero) values for every floating array, so gradients do not vanish by symmetry."""
    leaves, tree = jax.tree_util.tree_flatten(eqx.filter(model, eqx.is_inexact_array))
    keys = jax.random.split(key, len(leaves))
    new = [l + 0.3 * jax.random.normal(k, l.shape) for l, k in zip(leaves, keys)]
    return eqx.combine(jax.tree_util.tree_unflatten(tree, new), model)


@pytest.mark.parametrize("zeroth_bias", [False, True])
def test_vmapped_per_sample_gradient_equals_grad_of_one_sample_loss(zeroth_bias):
    model, cfg = _tiny_lm(zeroth_bias=zeroth_bias)
    model = _perturb(model, jax.random.PRNGKey(0))
    rng = _rng(6)
    x = rng.integers(0, 256, size=(3, cfg.seq_len)).astype(np.int32)
    y = rng.integers(0, 256, size=(3, cfg.seq_len)).astype(np.int32)
    loss, etas, xs = g19.per_sample_gradients(model, x, y)
    for s in range(3):
        def f(K, s=s):
            m = eqx.tree_at(lambda mm: mm.blocks[0].mlp.key.weight, model, K)
            probes = zero_probes(m.mlp_blocks(), cfg.seq_len)
            return loss_fn(m, probes, jnp.asarray(x[s:s + 1]), jnp.asarray(y[s:s + 1]), None)[0]

        K = model.blocks[0].mlp.key.weight
        ls, g = jax.value_and_grad(f)(K)
        G = etas[0][s].T @ xs[0][s]
        assert float(loss[s]) == pytest.approx(float(ls), rel=1e-5)
        np.testing.assert_allclose(G, np.asarray(g), rtol=1e-4, atol=1e-6 * float(np.max(np.abs(g))))
        assert float(np.max(np.abs(g))) > 0


def test_one_token_mlp_has_c_one_exactly():
    cfg = sgd_config("smoke")
    info = DataInfo("vector", (40,), 10)
    model = _perturb(build(cfg, info, jax.random.PRNGKey(1)).model, jax.random.PRNGKey(2))
    rng = _rng(7)
    x, y = rng.normal(size=(16, 40)).astype(np.float32), rng.integers(0, 10, size=16).astype(np.int32)
    rows = g19.block_numbers(model, x, y)
    assert len(rows) == cfg.depth
    for r in rows:
        assert r["tokens"] == 1 and r["T"] > 0
        assert r["C"] == pytest.approx(1.0, abs=1e-6)


def test_lm_cancellation_is_between_zero_and_the_token_count():
    model, cfg = _tiny_lm()
    model = _perturb(model, jax.random.PRNGKey(4))
    rng = _rng(8)
    x = rng.integers(0, 256, size=(8, cfg.seq_len)).astype(np.int32)
    rows = g19.block_numbers(model, x, x, rng)
    for r in rows:
        assert 0 < r["C"] < cfg.seq_len and 0 < r["C_shuffled"] < cfg.seq_len and r["tokens"] == cfg.seq_len


# ------------------------------------------------------------------------------------------ the plan
def _arms(mod, preset="quick"):
    return {a.name: a.config for a in mod.CHECK.make_plan(preset).arms}


def test_arms_are_g10_and_g12_runs_and_primaries_are_gated():
    for preset in PRESETS:
        a19, a10, a12 = _arms(g19, preset), _arms(g10, preset), _arms(g12, preset)
        assert a19["vanilla"] == a10["vanilla"] == a12["rho0"]
        assert a19["noise"] == a12[f"rho{g19.RHO:g}"]
        if "zeroth_bias" in a10:
            assert a19["zeroth_bias"] == a10["zeroth_bias"]
        plan = g19.CHECK.make_plan(preset)
        gates = {g.name: g for g in plan.gates}
        for part in plan.parts:
            assert part.delta is None or part.delta > 0
            if part.role == "primary":
                assert part.gates and {a for g in part.gates for a in gates[g].arms}, part.name


def _row(C, T, P=None, k=4.0, tokens=32, shuffled=None):
    r = {"C": C, "T": T, "P": C * T if P is None else P, "k_fro2": k, "entries": 2.0, "tokens": float(tokens)}
    if shuffled is not None:
        r["C_shuffled"] = shuffled
    return r


def test_seed_numbers_on_synthetic_rows():
    blocks = {"init": [_row(4.0, 1.0), _row(2.0, 1.0)],
              "vanilla": [_row(1.0, 2.0, shuffled=1.1), _row(0.5, 2.0, shuffled=0.5)],
              "noise": [_row(2.0, 0.5, k=8.0), _row(0.5, 0.5, k=8.0)],
              "zeroth_bias": [_row(0.5, 2.0), _row(0.5, 2.0)]}
    n = g19.seed_numbers(blocks)
    assert n["noise_less_cancellation"] == pytest.approx(math.log(2.0) / 2)
    assert n["training_created_cancellation"] == pytest.approx((math.log(4.0) + math.log(4.0)) / 2)
    assert n["vanilla_cancels"] == pytest.approx((0.0 + math.log(2.0)) / 2)
    assert n["vanilla_below_shuffled"] == pytest.approx(math.log(1.1) / 2)
    # R = 32 / C - 1: vanilla 31 and 63, zeroth bias 63 and 63
    assert n["zeroth_bias_more_token_noise"] == pytest.approx(math.log(63 / 31) / 2)
    # T_norm = T k / entries: vanilla 2*4/2 = 4, noise 0.5*8/2 = 2 -> ln 2 in both blocks
    assert n["noise_lowers_per_token"] == pytest.approx(math.log(2.0))
    # the identity: ln(C_n / C_v) = ln(T_v / T_n) - ln(P_v / P_n)
    assert n["noise_less_cancellation"] == pytest.approx(n["noise_lowers_per_token"] - n["noise_lowers_per_sample"])
    assert n["C_vanilla"] == pytest.approx(0.75) and n["C_vanilla_block2"] == pytest.approx(0.5)
