"""Power-law (HT-SR) fit of ESD tails, correlation traps, spike counts only where the MP fit holds.

Known answers: the xmin scan equals a brute-force loop (one fit per candidate, WeightWatcher's
WWFit written out); a Pareto tail of known alpha is recovered within its standard error; an iid
matrix has no power-law tail (large alpha, pl_fit_ok false); a planted rank-k signal gives k spikes
and no trap; planted large entries survive the shuffle and show up as traps.
"""

from __future__ import annotations

import csv
import io
import json
import math

import jax
import numpy as np
import pytest
from scipy.spatial.distance import jensenshannon

from gradsparse import cli, powerlaw, spectra


def _brute_force(x: np.ndarray, small_n: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """One fit per candidate, as WeightWatcher 0.7.7's WWFit loops (fit_power_law_standard / smallN)."""
    n = x.size
    logx = np.log(x)
    alphas = np.zeros(n - 1) if small_n else np.full(n - 1, np.nan)
    Ds = np.ones(n - 1)
    for i in range(n - 1):
        m = n - i
        s = np.sum(logx[i:]) - m * logx[i]
        if small_n and (m < 8 or s <= 1e-12):
            continue
        if not small_n and s <= 0:
            continue
        a = 1 + (m - 1) / s if small_n else 1 + m / s
        alphas[i] = a
        if a > 1:
            Ds[i] = np.max(np.abs(1 - (x[i:] / x[i]) ** (1 - a) - np.arange(m) / m))
    return alphas, Ds


def _matrix_with_eigenvalues(lam: np.ndarray, cols: int, seed: int) -> np.ndarray:
    """len(lam) x cols matrix whose W W^T has eigenvalues lam (random orthogonal factors)."""
    rng = np.random.default_rng(seed)
    k = lam.size
    u, _ = np.linalg.qr(rng.standard_normal((k, k)))
    v, _ = np.linalg.qr(rng.standard_normal((cols, k)))
    return (u * np.sqrt(lam)) @ v.T


@pytest.mark.parametrize("n", [2, 9, 19, 20, 57, 400])
def test_xmin_scan_equals_brute_force_loop(n):
    rng = np.random.default_rng(n)
    x = np.sort(np.concatenate([rng.uniform(0.1, 1, n - n // 3), powerlaw.pareto_rvs(rng, n // 3, 2.5)]))
    small = n < powerlaw.SMALL_N_CUTOFF
    alphas, Ds = powerlaw.scan_xmin(x, small_n=small)
    ref_a, ref_d = _brute_force(x, small)
    np.testing.assert_allclose(alphas, ref_a, rtol=1e-10, equal_nan=True)
    np.testing.assert_allclose(Ds, ref_d, rtol=1e-10, atol=1e-13)
    f = powerlaw.fit_powerlaw(x)
    if np.any(ref_d < 1):
        assert f.xmin == x[int(np.argmin(ref_d))]
        assert f.n_tail == n - int(np.argmin(ref_d))
        assert f.sigma == pytest.approx((f.alpha - 1) / math.sqrt(f.n_tail), rel=1e-12)


def test_scan_blocks_and_ties():
    rng = np.random.default_rng(3)
    x = np.sort(np.round(rng.uniform(1, 5, 3000), 1))  # many ties, several row blocks
    alphas, Ds = powerlaw.scan_xmin(x)
    ref_a, ref_d = _brute_force(x)
    top = x[:-1] == x[-1]  # all-equal tails: no candidate (the loop divides by a rounding residue)
    assert np.all(np.isnan(alphas[top])) and np.all(Ds[top] == 1.0)
    np.testing.assert_allclose(alphas[~top], ref_a[~top], rtol=1e-9)
    np.testing.assert_allclose(Ds[~top], ref_d[~top], rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="sorted"):
        powerlaw.scan_xmin(x[::-1])


def test_agrees_with_weightwatcher_wwfit_when_installed():
    ww_pl = pytest.importorskip("weightwatcher.WW_powerlaw", reason="weightwatcher not installed (bench extra)")
    rng = np.random.default_rng(5)
    for t in range(20):
        lam = np.linalg.svd(rng.standard_t(3, (int(rng.integers(8, 150)), 160)), compute_uv=False) ** 2
        with io.StringIO() as buf:
            import contextlib

            with contextlib.redirect_stdout(buf):  # its small-n fitter prints
                ref = ww_pl.WWFit(lam[lam > 1e-5])
        f = powerlaw.fit_powerlaw(lam)
        assert f.xmin == ref.xmin and f.alpha == pytest.approx(ref.alpha, rel=1e-10)
        assert f.D == pytest.approx(ref.D, rel=1e-10)


def test_pareto_tail_recovered_within_its_standard_error():
    rng = np.random.default_rng(0)
    lam = np.concatenate([rng.uniform(0.05, 1.0, 200), powerlaw.pareto_rvs(rng, 100, 3.0, 1.0)])
    w = _matrix_with_eigenvalues(lam, 600, seed=1)
    row = spectra.spectrum_row("pareto", w, fit=True)
    f = powerlaw.fit_powerlaw(lam)
    assert row.xmin == pytest.approx(f.xmin, rel=1e-9) and row.num_pl_evals == f.n_tail
    assert row.alpha == pytest.approx(f.alpha, rel=1e-8)
    assert abs(row.alpha - 3.0) <= row.pl_sigma  # 2.858 +- 0.149
    assert row.pl_fit_ok and row.num_pl_evals >= 40
    assert row.alpha_weighted == pytest.approx(row.alpha * math.log10(row.lambda_max), rel=1e-12)
    assert row.log_alpha_norm == pytest.approx(math.log10(np.sum(lam ** row.alpha)), rel=1e-9)
    # coverage over seeds: xmin is chosen from the data, so the MLE's nominal error is a bit optimistic
    z = []
    for seed in range(40):
        g = np.random.default_rng(seed)
        fit = powerlaw.fit_powerlaw(np.concatenate([g.uniform(0.05, 1.0, 200), powerlaw.pareto_rvs(g, 100, 3.0)]))
        z.append(abs(fit.alpha - 3.0) / fit.sigma)
    z = np.array(z)
    assert np.mean(z <= 1) >= 0.55 and np.mean(z <= 2) >= 0.8


def test_iid_matrix_has_no_power_law_tail():
    rng = np.random.default_rng(7)
    row = spectra.spectrum_row("iid", rng.standard_normal((384, 1536)), fit=True)
    # what the fit reports: the steep MP edge fitted as a "tail": alpha far above 6
    assert row.alpha > 6 and not row.pl_fit_ok
    assert "outside [1.5, 6]" in row.pl_fit.reason
    assert row.fit_ok and row.num_spikes == 0  # the MP law describes it
    # a small iid matrix: too few tail eigenvalues to call anything a power law
    small = spectra.spectrum_row("small", rng.standard_normal((12, 40)), fit=True)
    assert small.num_pl_evals < powerlaw.MIN_TAIL and not small.pl_fit_ok
    assert "tail of" in small.pl_fit.reason
    few = powerlaw.fit_powerlaw(rng.uniform(1, 2, 5))
    assert not few.fit_ok and "min_evals" in few.reason
    none = powerlaw.fit_powerlaw(np.full(4, 1e-7))
    assert math.isnan(none.alpha) and not none.fit_ok and "nothing to fit" in none.reason


def test_rank_k_spikes_and_no_trap():
    rng = np.random.default_rng(11)
    rows_, cols_, k = 200, 400, 3
    w = rng.standard_normal((rows_, cols_))
    for strength in (6.0, 5.0, 4.0):  # singular values well above the bulk edge sqrt(200) + sqrt(400)
        u, v = rng.standard_normal(rows_), rng.standard_normal(cols_)
        w += strength * math.sqrt(cols_) * np.outer(u / np.linalg.norm(u), v / np.linalg.norm(v))
    row = spectra.spectrum_row("spiked", w, fit=True, randomize=True, key=jax.random.key(0))
    assert row.fit_ok and row.num_spikes == k
    assert row.rand_fit_ok and row.num_traps == 0  # shuffling destroys the low-rank structure
    assert row.rand_distance > 0.05


def test_planted_large_entries_are_traps():
    rng = np.random.default_rng(12)
    w = rng.standard_normal((200, 400))
    for i, j in ((3, 7), (50, 300), (120, 21)):
        w[i, j] = 100.0  # bulk edge of the singular values ~ sqrt(200) + sqrt(400) = 34
    row = spectra.spectrum_row("entries", w, fit=True, randomize=True, key=3)
    assert row.rand_fit_ok and row.num_traps == 3
    assert row.num_traps_margin == 3
    iid = spectra.spectrum_row("iid", rng.standard_normal((200, 400)), fit=True, randomize=True, key=3)
    assert iid.num_traps == 0 and iid.rand_distance < 0.05


def test_shuffle_is_reproducible_and_a_permutation():
    w = np.arange(60, dtype=np.float64).reshape(6, 10)
    a = spectra.shuffle_entries(w, jax.random.key(1))
    assert np.array_equal(a, spectra.shuffle_entries(w, 1))  # an int seed is key(seed)
    assert not np.array_equal(a, spectra.shuffle_entries(w, 2))
    assert np.array_equal(np.sort(a.ravel()), w.ravel()) and a.shape == w.shape
    k1, k2 = spectra.matrix_key(0, "a"), spectra.matrix_key(0, "b")
    assert not np.array_equal(jax.random.key_data(k1), jax.random.key_data(k2))
    r1 = spectra.analyze({"a": np.random.default_rng(0).standard_normal((30, 50))}, fit=True, randomize=True, key=4)
    r2 = spectra.analyze({"a": np.random.default_rng(0).standard_normal((30, 50)), "b": np.eye(9)}, fit=True,
                         randomize=True, key=4)
    assert r1[0].rand_distance == r2[0].rand_distance  # per-matrix keys: others do not shift the shuffle
    with pytest.raises(ValueError, match="key"):
        spectra.spectrum_row("a", np.eye(5), randomize=True, key="seed")


def test_jensen_shannon_distance_matches_scipy():
    rng = np.random.default_rng(0)
    p, q = rng.random(50), rng.random(50)
    assert spectra.jensen_shannon_distance(p, q) == pytest.approx(jensenshannon(p, q), rel=1e-12)
    assert spectra.jensen_shannon_distance(p, p) == 0.0
    with pytest.raises(ValueError):
        spectra.jensen_shannon_distance(p, q[:3])


def test_num_spikes_null_where_mp_fit_fails(tmp_path, capsys):
    rng = np.random.default_rng(2)
    heavy = rng.standard_t(1.5, (200, 400))
    rows = spectra.analyze({"heavy": heavy, "iid": rng.standard_normal((100, 300))}, fit=True)
    h, i = rows
    assert h.fit_ok is False and math.isnan(h.num_spikes) and h.num_spikes_margin >= 0
    assert h.mp_fit.num_spikes >= 0  # the TW count of the failed fit is kept on the fit object only
    assert i.fit_ok and i.num_spikes == 0
    d = spectra.rows_to_dicts(rows)
    assert d[0]["num_spikes"] is None and isinstance(d[0]["num_spikes_margin"], int) and d[1]["num_spikes"] == 0
    table = list(csv.DictReader(io.StringIO(spectra.rows_to_csv(rows))))
    assert table[0]["num_spikes"] == "" and table[1]["num_spikes"] == "0"
    lines = spectra.format_table(rows).splitlines()
    col = lines[0].split().index("num_spikes")
    assert lines[2].split()[col] == "-" and lines[3].split()[col] == "0"  # heavy row empty, iid row 0
    meta = spectra.table_metadata(fit=True, rows=rows)
    (withheld,) = meta["num_spikes_withheld"]
    assert withheld["name"] == "heavy" and "KS" in withheld["reason"]
    assert "fit_ok is false" in meta["settings"]["num_spikes_null_when"]
    summary = spectra.get_summary(rows)["all"]
    assert summary["num_spikes"] == 0.0  # only the row whose fit holds
    assert summary["pl_fit_ok"] == pytest.approx(np.mean([r.pl_fit_ok for r in rows]))
    assert summary["alpha"] == pytest.approx(np.mean([r.alpha for r in rows]))
    # the command: empty cell, reason printed, null in JSON
    path = tmp_path / "w.npz"
    np.savez(path, heavy=heavy.astype(np.float32))
    assert cli.main(["spectrum", str(path), "--no-figures", "--randomize"]) == 0
    out = capsys.readouterr().out
    assert "num_spikes left empty for 1 matrices" in out and "num_traps" in out and "alpha" in out
    assert cli.main(["spectrum", str(path), "--no-figures", "--json", "--meta"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["rows"][0]["num_spikes"] is None and doc["metadata"]["num_spikes_withheld"][0]["name"] == "heavy"
    assert doc["rows"][0]["alpha"] is not None and "xmin" in doc["metadata"]["columns"]


def test_power_law_columns_follow_fit_and_bad_input():
    w = np.random.default_rng(0).standard_normal((20, 30))
    assert math.isnan(spectra.spectrum_row("w", w).alpha)  # fit=False: no power-law columns
    r = spectra.spectrum_row("w", w, power_law=True)
    assert math.isfinite(r.alpha) and math.isnan(r.sigma_mp)
    assert "alpha" in spectra.format_table([r]) and "num_traps" not in spectra.format_table([r])
    with pytest.raises(ValueError):
        powerlaw.fit_powerlaw([1.0, np.nan])
    with pytest.raises(ValueError):
        powerlaw.fit_powerlaw([1.0, -2.0, 3.0])
    with pytest.raises(ValueError):
        powerlaw.fit_powerlaw([1.0, 2.0], min_tail=1)
    with pytest.raises(ValueError):
        powerlaw.fit_powerlaw([1.0, 2.0], alpha_range=(6, 2))
    with pytest.raises(ValueError):
        powerlaw.pareto_rvs(0, 5, alpha=1.0)
    with pytest.raises(ValueError):
        powerlaw.log_alpha_norm([0.0, 0.0], 2.0)
    assert powerlaw.ww_warning(1.9) == "over-trained" and powerlaw.ww_warning(6.1) == "under-trained"
    assert powerlaw.ww_warning(3.0) == ""
