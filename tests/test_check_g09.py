"""G9 (spiked-covariance reading): the null machinery, the spike removal and the plan, on planted answers."""

from __future__ import annotations

import numpy as np
import pytest

from theory_checks import g09_isotropy_mp as g9
from theory_checks.plan import CheckPlan
from theory_checks.verdicts import margin_verdict


def _spiked_sample(p: int, N: int, scale: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    x = rng.standard_normal((p, N)) * np.sqrt(scale)[:, None]
    return np.linalg.eigvalsh(x @ x.T / N)


def test_white_wishart_matches_direct_draws():
    """The bidiagonal model has the law of eig(X X^T / N): mean top, bottom eigenvalue and R agree with
    direct Gaussian draws within 3 standard errors (300 draws each)."""
    rng = np.random.default_rng(0)
    p, N, m = 48, 300, 300
    a = np.array([g9.white_wishart_eigs(p, N, rng) for _ in range(m)])
    b = np.array([np.linalg.eigvalsh((x := rng.standard_normal((p, N))) @ x.T / N) for _ in range(m)])
    for stat in (lambda e: e[:, -1], lambda e: e[:, 0], lambda e: np.array([g9.bulk_ratio(r) for r in e])):
        sa, sb = stat(a), stat(b)
        se = np.sqrt(sa.var() / m + sb.var() / m)
        assert abs(sa.mean() - sb.mean()) < 3 * se
    assert np.mean([g9.bulk_ratio(r) for r in a]) == pytest.approx(1 / (1 + p / N), abs=0.01)
    with pytest.raises(ValueError):
        g9.white_wishart_eigs(10, 5, rng)


def test_spiked_reduction_matches_direct_draws():
    """spiked_wishart_eigs (O(p^3)) has the law of the direct spiked sample: each spike and the bulk's R."""
    rng = np.random.default_rng(1)
    p, N, sp, m = 40, 300, [8.0, 5.0, 3.0], 600
    scale = np.ones(p)
    scale[:3] = sp
    a = np.array([g9.spiked_wishart_eigs(p, N, sp, rng) for _ in range(m)])
    b = np.array([_spiked_sample(p, N, scale, rng) for _ in range(m)])
    for j in (-1, -2, -3, -4, 0):
        se = np.sqrt(a[:, j].var() / m + b[:, j].var() / m)
        assert abs(a[:, j].mean() - b[:, j].mean()) < 3.5 * se
    ra = np.array([g9.bulk_ratio(r[:-3]) for r in a])
    rb = np.array([g9.bulk_ratio(r[:-3]) for r in b])
    assert abs(ra.mean() - rb.mean()) < 3.5 * np.sqrt(ra.var() / m + rb.var() / m)


def test_planted_spikes_are_found_and_the_bulk_matches_its_null():
    """k planted spikes over an isotropic bulk: the TW removal finds k, and the bulk's z against the
    spiked null lies within the null's own spread (|z| < 3; z = 1 is the null's 5% quantile)."""
    rng = np.random.default_rng(2)
    p, N, k = 128, 4000, 6
    scale = np.ones(p)
    scale[:k] = np.geomspace(4.0, 60.0, k)
    zs = []
    for _ in range(3):
        kk, R, spikes = g9.bulk_isotropy(_spiked_sample(p, N, scale, rng))
        assert kk == k and spikes.shape == (k,)
        zs.append(g9.iso_z(R, g9.iso_null(p, N, spikes, rng)))
    assert max(abs(z) for z in zs) < 3.0
    assert margin_verdict(zs, g9.MARGIN).verdict != "FAIL"


def test_anisotropic_bulk_is_detected():
    """A bulk whose population variances spread over [0.5, 1.5] (no spikes) is far below its null:
    z >> 1 and the margin part FAILs over three samples."""
    rng = np.random.default_rng(3)
    p, N = 128, 4000
    scale = np.linspace(0.5, 1.5, p)
    zs = []
    for _ in range(3):
        kk, R, spikes = g9.bulk_isotropy(_spiked_sample(p, N, scale, rng))
        zs.append(g9.iso_z(R, g9.iso_null(p, N, spikes, rng)))
    assert min(zs) > 10
    assert margin_verdict(zs, g9.MARGIN).verdict == "FAIL"


def test_update_null_planted_signal_and_heavy_bulk():
    """An update = planted rank-k signal + iid Gaussian noise: TW finds k and its KS z is within the
    null's spread; an update whose noise columns have very unequal scales (non-MP bulk) is detected."""
    rng = np.random.default_rng(4)
    n, d, steps, batch, k = 256, 64, 100, 16, 4
    w = np.ones(steps)
    u, _ = np.linalg.qr(rng.standard_normal((n, k)))
    v, _ = np.linalg.qr(rng.standard_normal((d, k)))
    signal = u @ np.diag(np.sqrt(n * np.geomspace(4.0, 40.0, k))) @ v.T
    zs = []
    for _ in range(3):
        dk = rng.standard_normal((n, d)) + signal
        kk, ks, spikes = g9.update_bulk(np.linalg.eigvalsh(dk.T @ dk))
        assert kk == k
        zs.append(g9.ks_z(ks, g9.update_null(n, d, steps, batch, w, spikes, rng)))
    assert max(abs(z) for z in zs) < 3.0
    heavy = rng.standard_normal((n, d)) * np.geomspace(0.2, 3.0, d)[None, :]
    kk, ks, spikes = g9.update_bulk(np.linalg.eigvalsh(heavy.T @ heavy))
    assert g9.ks_z(ks, g9.update_null(n, d, steps, batch, w, spikes, rng)) > 3.0


def test_null_update_eigs_shape_weights_and_validation():
    rng = np.random.default_rng(5)
    e = g9.null_update_eigs(64, 16, 20, 8, np.ones(20), rng)
    assert e.shape == (16,) and e.mean() == pytest.approx(1.0)
    e2 = g9.null_update_eigs(64, 16, 20, 8, 0.9 ** np.arange(20)[::-1], rng)  # decay weights: X drawn
    assert e2.shape == (16,) and np.all(e2 > 0)
    with pytest.raises(ValueError):
        g9.null_update_eigs(64, 16, 20, 8, np.ones(19), rng)
    with pytest.raises(ValueError):
        g9.null_update_eigs(64, 16, 20, 8, np.ones(20), rng, signal=np.ones(17))


def test_null_quantiles_are_reproducible_with_a_fixed_key():
    """The null's generator is derived from (seed, width, block, statistic): same key, same quantiles;
    another seed, other draws."""
    spikes = np.array([20.0, 5.0])
    a = g9.iso_null(64, 2000, spikes, g9.null_rng(0, 16, 1, 0))
    b = g9.iso_null(64, 2000, spikes, g9.null_rng(0, 16, 1, 0))
    c = g9.iso_null(64, 2000, spikes, g9.null_rng(1, 16, 1, 0))
    assert a.shape == (g9.NULL_DRAWS,) and g9.NULL_DRAWS >= 20
    np.testing.assert_array_equal(a, b)
    assert np.quantile(a, g9.Q_ISO) == np.quantile(b, g9.Q_ISO)
    assert not np.array_equal(a, c)


def test_z_scales_and_degenerate_nulls():
    null = np.linspace(0.9, 1.0, 21)
    assert g9.iso_z(float(np.median(null)), null) == pytest.approx(0.0)
    assert g9.iso_z(float(np.quantile(null, g9.Q_ISO)), null) == pytest.approx(1.0)
    assert g9.ks_z(float(np.quantile(null, g9.Q_KS)), null) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        g9.iso_z(0.5, np.ones(20))
    with pytest.raises(ValueError):
        g9.bulk_ratio(np.zeros(3))


@pytest.mark.parametrize("preset", ["smoke", "quick", "full"])
def test_plan_validates_and_matches_run_names(preset):
    """The plan is a valid CheckPlan whose parts and gates are the ones run() builds (same names, kinds,
    margins, ops and thresholds; the arms are the configs run() trains)."""
    params = g9.CHECK.params(preset)
    plan = g9.CHECK.make_plan(preset)
    assert isinstance(plan, CheckPlan)
    widest = params["widths"][-1]
    assert [p.name for p in plan.parts] == [p.name for p in g9._parts(widest)]
    assert plan.deciding == ["bulk_isotropic_x", "bulk_isotropic_eta", "update_bulk_mp"]
    assert all(p.kind == "margin" and p.delta == g9.MARGIN and p.why for p in plan.parts)
    assert {(g.name, g.op, g.threshold) for g in plan.gates} == {("accumulation_c", "<=", g9.C_MAX),
                                                                   ("sgd_trained", "<=", g9.LOSS_RATIO_MAX)}
    cfgs = {a.name: a.config for a in plan.arms}
    for w in params["widths"]:
        d = g9._config(preset, params, w).to_dict()
        d.pop("seed")
        assert cfgs[f"w{w}"] == d and d["ln_affine"] is False and d["track_covariance"] is True
