"""Marchenko-Pastur law, Tracy-Widom test, MP fit, covariance accumulation (SPEC 3.2, 3.3)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate

from gradsparse import rmt

# ------------------------------------------------------------------ Marchenko-Pastur law


@pytest.mark.parametrize("c", [0.25, 0.7, 1.0, 2.5])
def test_mp_pdf_integrates_to_one_with_atom(c):
    s2 = 1.7
    lo, hi = rmt.mp_edges(c, s2)
    mass, _ = integrate.quad(lambda x: rmt.mp_pdf(x, c, s2), lo, hi, limit=200)
    assert mass == pytest.approx(min(1.0, 1.0 / c), abs=1e-8)
    assert mass + rmt.mp_atom(c) == pytest.approx(1.0, abs=1e-8)


@pytest.mark.parametrize("c", [0.1, 0.25, 0.7, 1.5, 4.0])
def test_mp_cdf_closed_form_matches_integrated_pdf(c):
    s2 = 0.6
    lo, hi = rmt.mp_edges(c, s2)
    atom = rmt.mp_atom(c)
    for x in np.linspace(lo, hi, 9)[1:-1]:
        num, _ = integrate.quad(lambda t: rmt.mp_pdf(t, c, s2), lo, x, limit=200)
        assert rmt.mp_cdf(x, c, s2) == pytest.approx(atom + num, abs=1e-9)
    assert rmt.mp_cdf(-1e-3, c, s2) == 0.0
    assert rmt.mp_cdf(0.0, c, s2) == pytest.approx(atom)
    assert rmt.mp_cdf(hi * 1.0001, c, s2) == 1.0


def test_mp_edges_atom_and_ratio_anchors():
    assert rmt.mp_edges(0.25, 2.0) == pytest.approx((0.5, 4.5))
    assert rmt.mp_atom(0.5) == 0.0 and rmt.mp_atom(4.0) == pytest.approx(0.75)
    assert rmt.mp_eigen_ratio(0.25) == pytest.approx(9.0)
    assert rmt.mp_singular_ratio(0.25) == pytest.approx(3.0)
    assert rmt.mp_eigen_ratio(0.1) == pytest.approx(3.70, abs=0.01)
    assert rmt.mp_eigen_ratio(1e-3) == pytest.approx(1.135, abs=0.001)
    assert rmt.mp_eigen_ratio(1.0) == math.inf


@pytest.mark.parametrize("c", [0.3, 2.0])
def test_mp_quantile_inverts_cdf(c):
    u = np.array([0.05, 0.3, 0.6, 0.9, 0.999])
    q = rmt.mp_quantile(u, c, 1.3)
    above_atom = u > rmt.mp_atom(c)
    np.testing.assert_allclose(rmt.mp_cdf(q[above_atom], c, 1.3), u[above_atom], atol=1e-9)
    assert np.all(q[~above_atom] == 0.0)
    with pytest.raises(ValueError):
        rmt.mp_quantile([1.5], c)


def test_mp_sampling_is_seeded_and_follows_the_law():
    a = rmt.mp_rvs(7, 4000, 0.3, 1.5)
    b = rmt.mp_rvs(np.random.default_rng(7), 4000, 0.3, 1.5)
    np.testing.assert_array_equal(a, b)
    assert rmt.ks_distance(a, 0.3, 1.5) < 0.03
    assert rmt.ks_distance(a, 0.6, 1.5) > 0.05  # the wrong law is told apart
    k = rmt.mp_rvs(jax.random.key(0), 3000, 2.0, 1.0)
    assert np.mean(k == 0.0) == pytest.approx(0.5, abs=0.03)
    assert rmt.ks_distance(k, 2.0, 1.0) < 0.03
    with pytest.raises(ValueError):
        rmt.mp_rvs("seed", 10, 0.5)


def test_bad_parameters_raise():
    for bad in (-1.0, 0.0, math.nan, "x"):
        with pytest.raises(ValueError):
            rmt.mp_pdf(1.0, bad)
    with pytest.raises(ValueError):
        rmt.mp_cdf(1.0, 0.5, s2=-2.0)


# ------------------------------------------------------------------ Tracy-Widom


def test_tw1_constants():
    assert rmt.tw1_cdf(0.0) == pytest.approx(0.8319, abs=1e-3)
    assert rmt.tw1_quantile(0.95) == pytest.approx(0.979, abs=2e-3)
    assert rmt.tw1_quantile(0.99) == pytest.approx(2.0234, abs=2e-3)  # Bejan's table
    f = rmt.tw1_cdf(np.array([-4.0, -2.0, 0.0, 2.0, 4.0]))
    assert np.all(np.diff(f) > 0) and f[0] < 0.02 and f[-1] > 0.999


def test_tw_edge_test_false_positive_rate_on_white_wishart():
    # known s2: the rate of >= 1 declared spike must be near alpha = 0.05
    rng = np.random.default_rng(123)
    hits = sum(
        rmt.tw_spike_count(rmt.wishart_eigenvalues(rng, 60, 240), 60, 240, 1.0, alpha=0.05) > 0
        for _ in range(300)
    )
    assert 0.01 <= hits / 300 <= 0.10


# ------------------------------------------------------------------ fit


@pytest.mark.parametrize("seed,s2", [(0, 1.0), (1, 0.37)])
def test_fit_recovers_s2_and_c_on_gaussian_400x1600(seed, s2):
    ev = rmt.wishart_eigenvalues(seed, 400, 1600, s2=s2)
    f = rmt.fit_mp(ev)
    assert f.s2 == pytest.approx(s2, rel=0.05)
    assert f.c == pytest.approx(0.25, rel=0.05)
    assert f.num_spikes == 0
    assert f.ks < 0.03


def test_fit_with_c_above_one_uses_the_atom():
    ev = rmt.wishart_eigenvalues(2, 500, 250, s2=2.0)
    f = rmt.fit_mp(ev)
    assert f.c == pytest.approx(2.0, rel=0.05)
    assert f.s2 == pytest.approx(2.0, rel=0.05)
    assert f.ks < 0.03


def test_fit_finds_exactly_the_planted_spikes():
    planted = [20.0, 10.0, 6.0, 4.0]  # BBP threshold 1 + sqrt(0.25) = 1.5
    c = 0.25
    for seed in range(3):
        ev = rmt.wishart_eigenvalues(seed, 400, 1600, spikes=planted)
        f = rmt.fit_mp(ev)
        assert f.num_spikes == 4
        predicted = [ell * (1 + c / (ell - 1)) for ell in planted]  # BBP sample-eigenvalue location
        np.testing.assert_allclose(f.spikes, predicted, rtol=0.15)
        assert f.c == pytest.approx(c, rel=0.05) and f.s2 == pytest.approx(1.0, rel=0.05)
        assert f.bulk_max < min(f.spikes)


def test_fit_with_fixed_c_and_bad_input():
    ev = rmt.wishart_eigenvalues(3, 200, 800, s2=3.0)
    f = rmt.fit_mp(ev, c=0.25)
    assert f.c == 0.25 and f.s2 == pytest.approx(3.0, rel=0.05)
    with pytest.raises(ValueError):
        rmt.fit_mp([1.0, 2.0])
    with pytest.raises(ValueError):
        rmt.fit_mp([1.0, np.nan, 2.0, 3.0, 4.0])
    with pytest.raises(ValueError):
        rmt.fit_mp(np.zeros(10))
    with pytest.raises(ValueError):
        rmt.fit_mp([-1.0, 1.0, 2.0, 3.0])


def test_eigen_ratio_of_iid_256x1024_matrix_near_prediction():
    x = np.random.default_rng(5).standard_normal((256, 1024))
    ev = np.linalg.eigvalsh(x @ x.T / 1024)
    assert ev[-1] / ev[0] == pytest.approx(rmt.mp_eigen_ratio(256 / 1024), rel=0.15)


# ------------------------------------------------------------------ accumulation (SPEC 3.3)


def test_effective_steps_formula():
    assert rmt.effective_steps(0.1, 0.1) == 1145.0  # ceil(ln(1e-5)/ln(0.99) - 1)
    assert rmt.effective_steps(0.1, 0.0) == math.inf
    for lr, wd in [(0.05, 5e-4), (1.0, 0.3), (0.01, 0.01)]:
        t = rmt.effective_steps(lr, wd)
        r = 1 - lr * wd
        assert r ** (t + 1) <= 1e-3 * (1 - r) < r**t  # the smallest such integer
    assert rmt.effective_samples(32, 100, 0.1, 0.1) == 3200.0
    assert rmt.effective_samples(32, 10**6, 0.1, 0.1) == 32 * 1145.0
    assert rmt.effective_samples(32, 10**6, 0.1, 0.0) == 32e6
    assert rmt.aspect_ratio(64, 32, 100, 0.1, 0.1) == pytest.approx(64 / 3200)
    with pytest.raises(ValueError):
        rmt.decay_rate(2.0, 0.6)
    with pytest.raises(ValueError):
        rmt.effective_samples(0, 10, 0.1, 0.1)


def test_cov_update_matches_explicit_decayed_sum():
    key = jax.random.key(0)
    xs = jax.random.normal(key, (5, 8, 6))  # 5 steps, batch 8, p 6
    r = 0.9
    upd = jax.jit(rmt.cov_update)
    c = rmt.cov_init(6)
    for t in range(5):
        c = upd(c, xs[t], r)
    x = np.asarray(xs, np.float64)
    want = sum(r ** (4 - t) * x[t].T @ x[t] / 8 for t in range(5))
    np.testing.assert_allclose(np.asarray(c), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError):
        rmt.cov_update(c, jnp.ones((3, 5)), r)


def test_participation_ratio_and_anisotropy():
    p = 16
    eye = jnp.eye(p)
    assert float(rmt.participation_ratio(eye)) == pytest.approx(p)
    assert float(rmt.participation_ratio(3.0 * eye)) == pytest.approx(p)
    assert float(rmt.relative_anisotropy(eye)) == pytest.approx(0.0, abs=1e-6)
    assert float(rmt.relative_anisotropy(2.5 * eye)) == pytest.approx(0.0, abs=1e-6)
    e1 = jnp.zeros((p, p)).at[0, 0].set(1.0)  # rank one: alpha = 1, ||C - I||_F = sqrt(p - 1)
    assert float(rmt.participation_ratio(e1)) == pytest.approx(1.0)
    assert float(rmt.relative_anisotropy(e1)) == pytest.approx(math.sqrt(p) * math.sqrt(p - 1) / p, rel=1e-6)


def test_bounds_and_jitted_metrics():
    p, n_samples, c = 32, 400.0, 32 / 400.0
    key = jax.random.key(1)
    x = jax.random.normal(key, (64, p)) * jnp.linspace(0.5, 1.5, p)
    cov = rmt.cov_update(rmt.cov_init(p), x, 1.0)
    m = jax.jit(rmt.covariance_metrics, static_argnums=1)(cov, p, n_samples)
    alpha = float(rmt.participation_ratio(cov))
    aniso = float(rmt.relative_anisotropy(cov))
    v = 1e-2
    at, big_at = alpha / p, aniso  # At = A/p, A = sqrt(p) ||aC - I||_F = p x relative anisotropy (SPEC 3.3)
    common = math.sqrt(c + (2 * math.sqrt(2) + 3) * c * at / v + c * big_at / v + c / (v * p))
    assert float(m["c"]) == pytest.approx(c, rel=1e-6)
    assert float(m["participation_ratio"]) == pytest.approx(alpha, rel=1e-5)
    assert float(m["bound_re"]) == pytest.approx(math.sqrt(2) * at * common / (c * math.sqrt(v)), rel=1e-5)
    assert float(m["bound_im"]) == pytest.approx(math.sqrt(2) * at**2 * common / (c * v**1.5), rel=1e-5)
    assert 0 < alpha < p and 0 < aniso < 1
    with pytest.raises(ValueError):
        rmt.covariance_metrics(cov, p + 1, n_samples)


def test_accumulated_esd_without_decay_matches_mp_at_p_over_n():
    p, batch, steps = 50, 20, 20
    xs = np.asarray(jax.random.normal(jax.random.key(3), (steps, batch, p)))
    cov = rmt.cov_init(p)
    for t in range(steps):
        cov = rmt.cov_update(cov, xs[t], 1.0)  # r = 1 (wd = 0): plain sum of batch covariances
    n_samples = rmt.effective_samples(batch, steps, 0.1, 0.0)
    eigs, at_c, free = rmt.accumulated_esd(cov, n_samples)
    assert n_samples == 400.0 and eigs.shape == (p,)
    assert free.c == pytest.approx(p / n_samples, rel=0.15)
    assert at_c.c == p / n_samples and at_c.ks < 0.1
    assert at_c.s2 == pytest.approx(steps, rel=0.1)  # C = steps * sample covariance of unit data
    with pytest.raises(ValueError):
        rmt.accumulated_esd(np.ones((3, 4)), 10.0)


# ------------------------------------------------------------------ what the shape allows (c <= 1 without zeros)


@pytest.mark.parametrize("seed", [0, 1])
def test_square_iid_matrix_fits_c_near_one_not_above(seed):
    ev = rmt.wishart_eigenvalues(seed, 384, 384, s2=0.7)
    f = rmt.fit_mp(ev)
    assert f.c_max == 1.0 and f.zero_rate == 0.0
    assert f.c <= 1.0 and f.c == pytest.approx(1.0, rel=0.05)
    assert f.s2 == pytest.approx(0.7, rel=0.05)
    assert f.ks < 0.02 and f.fit_ok and f.num_spikes == 0


def test_heavy_tailed_square_spectrum_no_longer_invents_an_atom():
    # singular values exp(1.5 N(0, 1)) with random orthogonal factors: no zero eigenvalue at all
    rng = np.random.default_rng(0)
    n = 200
    u, _ = np.linalg.qr(rng.standard_normal((n, n)))
    v, _ = np.linalg.qr(rng.standard_normal((n, n)))
    w = (u * np.exp(1.5 * rng.standard_normal(n))) @ v.T
    ev = np.linalg.eigvalsh(w @ w.T / n)
    free = rmt.fit_mp(ev, c_max=20.0)  # the former unconstrained search over [1e-4, 20]
    assert free.c > 1.2 and rmt.mp_atom(free.c) > 0.15 and free.ks > 0.2  # a zero atom that is not there
    f = rmt.fit_mp(ev)
    assert f.c <= 1.0 and f.ks < free.ks
    assert not f.fit_ok and f.ks > f.ks_threshold == 0.05  # and it is not MP-shaped: flagged


def test_zeros_allow_c_above_one_up_to_their_atom():
    ev = rmt.wishart_eigenvalues(4, 300, 200)  # 100 exact zeros: atom 1/3, c = 1.5
    f = rmt.fit_mp(ev)
    assert f.zero_rate == pytest.approx(100 / 300) and f.c_max == pytest.approx(1.5)
    assert f.c == pytest.approx(1.5, rel=0.02) and f.fit_ok
    with pytest.raises(ValueError, match="c_max"):
        rmt.fit_mp(ev, c_max=1e-5)


def test_ks_threshold_admits_iid_fits_at_every_size():
    assert rmt.mp_ks_threshold(20) == 0.25 and rmt.mp_ks_threshold(100) == 0.05 and rmt.mp_ks_threshold(4000) == 0.05
    rng = np.random.default_rng(11)
    worst = 0.0
    for p in (16, 40, 100):
        for c in (0.25, 1.0):
            for _ in range(6):
                f = rmt.fit_mp(rmt.wishart_eigenvalues(rng, p, int(p / c)))
                assert f.fit_ok, (p, c, f.ks)
                worst = max(worst, f.ks / f.ks_threshold)
    assert worst < 0.85
    with pytest.raises(ValueError):
        rmt.mp_ks_threshold(0)
    with pytest.raises(ValueError, match="ks_max"):
        rmt.fit_mp(rmt.wishart_eigenvalues(0, 20, 40), ks_max=0.0)
    f = rmt.fit_mp(rmt.wishart_eigenvalues(0, 50, 200), ks_max=1e-4)  # a stated bound is used as given
    assert f.ks_threshold == 1e-4 and not f.fit_ok


def test_margin_rule_by_hand_and_beside_the_tw_count():
    # p = 4 eigenvalues [1, 1, 1, 9]: mean 3, so WeightWatcher's units divide by 3 -> [1/3, 1/3, 1/3, 3]
    # with c = 1/4, s2 = 0.6 (s2' = 0.2): bulk_max' = 0.2 * 2.25 = 0.45,
    # TW = 0.5 * 0.45^(2/3) * 4^(-2/3) = 0.1165, threshold 0.45 + 0.3413 = 0.791: one spike
    assert rmt.margin_spike_count([1.0, 1.0, 1.0, 9.0], 0.25, 0.6) == 1
    # [1, 1, 1, 2]: scale 4/5, bulk_max' = 1.08, threshold 1.08 + sqrt(0.5 * 1.08^(2/3) * 4^(-2/3)) = 1.537;
    # the top one, 1.6, is above it
    assert rmt.margin_spike_count([1.0, 1.0, 1.0, 2.0], 0.25, 0.6) == 1
    # [1, 1, 1, 1]: scale 1, bulk_max' = 1.35, threshold 1.842: none
    assert rmt.margin_spike_count([1.0, 1.0, 1.0, 1.0], 0.25, 0.6) == 0
    # the rule is stated in mean-1 units, so it does not depend on the units of the input
    assert rmt.margin_spike_count([10.0, 10.0, 10.0, 20.0], 0.25, 6.0) == 1
    planted = [20.0, 10.0, 6.0, 4.0]
    ev = rmt.wishart_eigenvalues(0, 400, 1600, spikes=planted)
    f = rmt.fit_mp(ev)
    assert f.num_spikes == 4 and f.num_spikes_margin == 4
    assert f.spike_method.startswith("sequential Tracy-Widom")
    white = rmt.fit_mp(rmt.wishart_eigenvalues(1, 400, 1600))
    assert white.num_spikes == 0 and white.num_spikes_margin == 0
