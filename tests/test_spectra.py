"""Per-layer singular-value table, bad input, figures and the `spectrum` command (SPEC 3.1)."""

from __future__ import annotations

import json
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gradsparse import cli, figures_spectra, rmt, spectra


def _known_matrix(rows: int = 14, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """rows x k matrix with singular values 2^(i/2), i = 0..k-1 (random orthogonal factors)."""
    rng = np.random.default_rng(0)
    u, _ = np.linalg.qr(rng.standard_normal((rows, k)))
    v, _ = np.linalg.qr(rng.standard_normal((k, k)))
    s = 2.0 ** (np.arange(k) / 2.0)
    return (u * s) @ v.T, s


def test_columns_against_closed_forms():
    w, s = _known_matrix()
    row = spectra.spectrum_row("w", w)
    assert row.error is None and row.rank == 10
    assert row.s_max == pytest.approx(s.max(), rel=1e-10)
    assert row.s_min_nonzero == pytest.approx(1.0, rel=1e-10)
    assert row.ratio == pytest.approx(2.0**4.5, rel=1e-10)
    assert row.eig_ratio == pytest.approx(2.0**9, rel=1e-10)
    # eigenvalues 2^0..2^9: the narrowest window holding ceil(0.8 * 10) = 8 spans 7 octaves
    assert row.mass80_ratio == pytest.approx(2.0**7, rel=1e-9)
    assert row.near_zero_rate == pytest.approx((14 - 10) / 14)
    assert row.stable_rank == pytest.approx(np.sum(s**2) / s.max() ** 2, rel=1e-10)
    assert row.frobenius == pytest.approx(np.linalg.norm(w), rel=1e-10)
    # the same matrix transposed: W W^T is now 10 x 10 and full rank
    assert spectra.spectrum_row("wt", w.T).near_zero_rate == 0.0


@pytest.mark.parametrize("route", ["gram", "svd", "auto"])
def test_routes_agree_with_lapack_svd(route):
    w = np.random.default_rng(1).standard_normal((40, 90)).astype(np.float32)
    s, used = spectra.singular_values(w, route=route)
    ref = np.linalg.svd(w.astype(np.float64), compute_uv=False)
    np.testing.assert_allclose(s, ref, rtol=1e-9)
    assert used == ("svd" if route == "svd" else "gram")


def test_auto_route_falls_back_for_ill_conditioned_float64():
    rng = np.random.default_rng(2)
    u, _ = np.linalg.qr(rng.standard_normal((30, 30)))
    s_true = np.logspace(0, -12, 30)
    w = (u * s_true) @ u.T
    s, used = spectra.singular_values(w)  # rtol = 30 * eps64: needs s down to 1e-12
    assert used == "svd"
    assert s[-1] == pytest.approx(1e-12, rel=1e-2)
    s_gram, _ = spectra.singular_values(w, route="gram")
    assert not (0.5e-12 < s_gram[-1] < 2e-12)  # the Gram route alone cannot resolve it
    # float32 storage: its own rtol (30 * eps32) is far above the Gram floor -> Gram route
    assert spectra.singular_values(w.astype(np.float32))[1] == "gram"


def test_rank_deficient_float32_matrix():
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((64, 5)) @ rng.standard_normal((5, 32))).astype(np.float32)
    row = spectra.spectrum_row("low", w)
    assert row.rank == 5
    assert row.near_zero_rate == pytest.approx((64 - 5) / 64)
    assert row.route == "gram"


def test_pytree_names_stacking_and_skipping():
    model = eqx.nn.MLP(4, 3, 8, 2, key=jax.random.key(0))
    rows = spectra.analyze(model)
    assert [r.name for r in rows] == ["layers.0.weight", "layers.1.weight", "layers.2.weight"]
    assert rows[0].shape == (8, 4)
    tree = {"stack": jnp.ones((3, 4, 2)) + jnp.eye(4, 2), "bias": jnp.zeros(4), "w": np.eye(3), "t4": np.ones((2, 2, 2, 2))}
    names = [r.name for r in spectra.analyze(tree)]
    assert names == ["stack[0]", "stack[1]", "stack[2]", "w"]
    assert spectra.analyze(np.eye(3))[0].name == "weight"


def test_bad_matrices_give_flagged_rows_not_crashes():
    w = np.random.default_rng(4).standard_normal((6, 4))
    inf = w.copy()
    inf[0, 0] = np.inf
    tree = {"a_nan": np.full((4, 4), np.nan), "b_zero": np.zeros((5, 3)), "c_empty": np.zeros((0, 3)),
            "d_inf": inf, "e_ok": w}
    rows = {r.name: r for r in spectra.analyze(tree, fit=True)}
    assert "non-finite" in rows["a_nan"].error and math.isnan(rows["a_nan"].s_max)
    assert rows["b_zero"].error == "all-zero matrix" and rows["b_zero"].near_zero_rate == 1.0
    assert rows["c_empty"].error == "empty matrix"
    assert "non-finite" in rows["d_inf"].error
    assert rows["e_ok"].error is None and rows["e_ok"].rank == 4
    table = spectra.format_table(list(rows.values()))
    assert "all-zero matrix" in table and "e_ok" in table
    data = json.loads(spectra.rows_to_json(list(rows.values())))
    assert data[0]["s_max"] is None and data[-1]["rank"] == 4


@pytest.mark.parametrize("bad", [{}, None, "not a model", 3, {"bias": np.ones(5)}, [np.ones(3), np.ones(2)]])
def test_inputs_without_matrices_raise(bad):
    with pytest.raises(ValueError):
        spectra.analyze(bad)


def test_bad_arguments_raise():
    with pytest.raises(ValueError):
        spectra.spectrum_row("v", np.ones(4))
    with pytest.raises(ValueError):
        spectra.spectrum_row("m", np.eye(3), rtol=2.0)
    with pytest.raises(ValueError):
        spectra.singular_values(np.eye(3), route="gesvd")
    with pytest.raises(ValueError):
        spectra.format_table([])


def test_mp_columns_on_iid_matrix():
    w = (0.05 * np.random.default_rng(6).standard_normal((800, 200))).astype(np.float32)
    row = spectra.spectrum_row("k", w, fit=True)
    assert row.mp_c == pytest.approx(0.25, rel=0.05)
    assert row.sigma_mp == pytest.approx(0.05, rel=0.05)
    assert row.num_spikes == 0
    assert row.bulk_max == pytest.approx(0.05**2 * 2.25, rel=0.1)
    assert row.ks < 0.05
    # eigen ratio of an iid matrix near the MP prediction ((1 + sqrt c)/(1 - sqrt c))^2 = 9
    assert row.eig_ratio == pytest.approx(rmt.mp_eigen_ratio(0.25), rel=0.15)


def test_mp_columns_count_a_planted_spike():
    rng = np.random.default_rng(7)
    w = rng.standard_normal((800, 200))
    u = rng.standard_normal(800)
    v = rng.standard_normal(200)
    w += 6.0 * np.outer(u / np.linalg.norm(u), v / np.linalg.norm(v)) * math.sqrt(800)
    row = spectra.spectrum_row("spiked", w, fit=True)
    assert row.num_spikes == 1
    assert row.mp_c == pytest.approx(0.25, rel=0.05)


def test_figures_written_atomically(tmp_path):
    ev = rmt.wishart_eigenvalues(0, 100, 400, spikes=[8.0])
    paths = figures_spectra.plot_esd(ev, tmp_path / "esd.png", fit=rmt.fit_mp(ev), c_pred=0.25)
    assert sorted(p.name for p in paths) == ["esd.pdf", "esd.png"]
    assert all(p.stat().st_size > 1000 for p in paths)
    series = {"k": ([1, 2, 3], [3.0, 3.1, math.nan])}
    figures_spectra.plot_ratio_vs_step(series, tmp_path / "ratio", predicted=3.0, formats=("png",))
    figures_spectra.plot_bounds_vs_step([1, 2], [1.0, 2.0], [0.1, 0.2], tmp_path / "bounds", formats=("png",))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bounds.png", "esd.pdf", "esd.png", "ratio.png"]
    with pytest.raises(ValueError):
        figures_spectra.plot_ratio_vs_step({"k": ([1, 2], [1.0])}, tmp_path / "x")


@pytest.fixture
def npz_file(tmp_path):
    rng = np.random.default_rng(8)
    path = tmp_path / "weights.npz"
    np.savez(path, key=rng.standard_normal((64, 16)).astype(np.float32),
             value=rng.standard_normal((16, 64)).astype(np.float32), bias=np.zeros(16))
    return path


def test_cli_table_and_json(npz_file, capsys):
    assert cli.main(["spectrum", str(npz_file), "--no-figures"]) == 0
    out = capsys.readouterr().out
    assert "key" in out and "value" in out and "s_max" in out
    assert cli.main(["spectrum", str(npz_file), "--json", "--no-figures"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == ["key", "value"]
    assert rows[0]["shape"] == [64, 16] and rows[0]["near_zero_rate"] == pytest.approx(0.75)


def test_cli_writes_figures(npz_file, tmp_path, capsys):
    out = tmp_path / "figs"
    assert cli.main(["spectrum", str(npz_file), "--out", str(out), "--json"]) == 0
    json.loads(capsys.readouterr().out)  # stdout stays pure JSON
    names = sorted(p.name for p in out.iterdir())
    assert names == ["esd_key.pdf", "esd_key.png", "esd_pl_key.pdf", "esd_pl_key.png", "esd_pl_value.pdf",
                     "esd_pl_value.png", "esd_value.pdf", "esd_value.png", "spectrum.json"]


def test_cli_user_errors_exit_2(tmp_path, capsys):
    assert cli.main(["spectrum", str(tmp_path / "missing.npz")]) == 2
    only_bias = tmp_path / "b.npz"
    np.savez(only_bias, bias=np.zeros(3))
    assert cli.main(["spectrum", str(only_bias), "--no-figures"]) == 2
    assert cli.main(["spectrum", str(only_bias), "--rtol", "-1"]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 3


def test_cli_refuses_a_file_as_out_before_printing_and_names_pickled_npz(npz_file, tmp_path, capsys):
    target = tmp_path / "a_file"
    target.write_text("x")
    assert cli.main(["spectrum", str(npz_file), "--out", str(target)]) == 2
    cap = capsys.readouterr()
    assert cap.out == "" and "exists and is not a folder" in cap.err
    pickled = tmp_path / "objects.npz"
    np.savez(pickled, w=np.array([{"a": 1}], dtype=object))
    assert cli.main(["spectrum", str(pickled), "--no-figures"]) == 2
    err = capsys.readouterr().err
    assert "Python objects (pickles)" in err and "allow_pickle" not in err


# ------------------------------------------------------------------ WeightWatcher-named columns, roles, outputs


def test_weightwatcher_columns_against_closed_forms():
    w, s = _known_matrix()  # 14 x 10, singular values 2^(i/2)
    row = spectra.spectrum_row("w", w, role="key", layer=3)
    assert (row.role, row.layer, row.N, row.M) == ("key", 3, 14, 10)
    assert row.Q == pytest.approx(1.4)
    assert row.lambda_max == pytest.approx(2.0**9, rel=1e-10)
    assert row.log_norm == pytest.approx(math.log10(np.sum(s**2)), rel=1e-12)
    assert row.log_spectral_norm == pytest.approx(9 * math.log10(2.0), rel=1e-12)
    assert row.stable_rank == pytest.approx(10.0 ** (row.log_norm - row.log_spectral_norm), rel=1e-12)
    assert row.fit_ok is None and math.isnan(row.mp_softrank)  # not fitted
    iid = (0.05 * np.random.default_rng(6).standard_normal((800, 200))).astype(np.float32)
    f = spectra.spectrum_row("k", iid, fit=True)
    assert f.fit_ok is True and f.ks <= f.ks_threshold == 0.05
    assert f.num_spikes == f.num_spikes_margin == 0
    assert f.mp_softrank == pytest.approx(f.bulk_max / (f.s_max**2 / 800), rel=1e-12)
    assert f.bulk_min == pytest.approx(0.05**2 * 0.25, rel=0.1)  # s2 (1 - sqrt(1/4))^2
    assert f.mp_softrank == pytest.approx(1.0, abs=0.05)  # an iid matrix: its top eigenvalue sits at the edge


def test_roles_layers_csv_summary_and_metadata(tmp_path):
    rng = np.random.default_rng(9)
    tree = {"blocks": [{"mlp": {"key": {"weight": rng.standard_normal((32, 8))},
                                "value": {"weight": rng.standard_normal((8, 32))}}} for _ in range(2)],
            "head": {"weight": rng.standard_normal((3, 8))}}
    rows = spectra.analyze(tree, fit=True)
    assert [(r.name, r.role, r.layer) for r in rows] == [
        ("blocks.0.mlp.key.weight", "key", 0), ("blocks.0.mlp.value.weight", "value", 0),
        ("blocks.1.mlp.key.weight", "key", 1), ("blocks.1.mlp.value.weight", "value", 1),
        ("head.weight", "other", None)]
    table = spectra.format_table(rows)
    assert table.splitlines()[0].split()[:4] == ["name", "role", "layer", "shape"]
    summary = spectra.get_summary(rows)
    assert list(summary) == ["all", "key", "value", "other"] and summary["key"]["count"] == 2
    assert summary["key"]["stable_rank"] == pytest.approx((rows[0].stable_rank + rows[2].stable_rank) / 2)
    assert summary["all"]["near_zero_rate"] == pytest.approx(np.mean([r.near_zero_rate for r in rows]))
    assert math.isnan(summary["other"]["ks"])  # 3 eigenvalues: too few to fit
    text = spectra.rows_to_csv(rows)
    import csv
    import io

    back = list(csv.DictReader(io.StringIO(text)))
    assert [b["name"] for b in back] == [r.name for r in rows]
    assert back[0]["shape"] == "32x8" and float(back[0]["s_max"]) == pytest.approx(rows[0].s_max, rel=1e-12)
    assert back[4]["layer"] == "" and back[4]["mp_c"] == ""  # null -> empty cell
    doc = json.loads(spectra.rows_to_json(rows, metadata=spectra.table_metadata(source="tree")))
    assert set(doc) == {"metadata", "summary", "rows"}
    assert doc["metadata"]["columns"]["stable_rank"].startswith("||W||_F^2 / s_max^2")
    assert doc["summary"]["other"]["ks"] is None and doc["rows"][1]["role"] == "value"
    pd = pytest.importorskip("pandas", reason="pandas not installed (optional)")
    df = spectra.to_dataframe(rows)
    assert list(df["role"]) == ["key", "value", "key", "value", "other"] and isinstance(df, pd.DataFrame)


def test_to_dataframe_without_pandas_names_the_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(ImportError, match="pip install pandas"):
        spectra.to_dataframe(spectra.analyze(np.eye(3)))


def test_model_figures_from_rows(tmp_path):
    rng = np.random.default_rng(10)
    tree = {f"layers.{i}.mlp.fc1.weight": rng.standard_normal((48, 12)) for i in range(3)}
    tree |= {f"layers.{i}.attn.q_proj.weight": rng.standard_normal((12, 12)) for i in range(3)}
    rows = spectra.analyze(tree, fit=True, keep_sv=True)
    series = figures_spectra.series_by_layer(rows, "stable_rank")
    assert set(series) == {"key", "attn_q"} and series["key"][0] == [0, 1, 2]
    assert series["key"][1] == pytest.approx([r.stable_rank for r in rows if r.role == "key"])
    paths = figures_spectra.plot_model_spectra(rows, tmp_path, formats=("png",))
    assert sorted(p.name for p in paths) == ["alpha_vs_depth.png", "esd_pl_role_attn_q.png", "esd_pl_role_key.png",
                                            "esd_role_attn_q.png", "esd_role_key.png", "mass80_ratio_vs_depth.png",
                                            "ratio_vs_depth.png", "stable_rank_vs_depth.png"]
    assert all(p.stat().st_size > 1000 for p in paths)
    no_pl = spectra.analyze(tree, keep_sv=True)  # no fit: no power-law figures
    assert "alpha_vs_depth.png" not in {p.name for p in figures_spectra.plot_model_spectra(no_pl, tmp_path / "n",
                                                                                            formats=("png",))}
    with pytest.raises(ValueError):
        figures_spectra.plot_esd_grid([], tmp_path / "x")
    with pytest.raises(ValueError):
        figures_spectra.series_by_layer(rows, "no_such_column")


def test_powerlaw_figures(tmp_path):
    from gradsparse import powerlaw

    rng = np.random.default_rng(0)
    lam = np.concatenate([rng.uniform(0.05, 1.0, 200), powerlaw.pareto_rvs(rng, 100, 3.0)])
    fit = powerlaw.fit_powerlaw(lam)
    paths = figures_spectra.plot_powerlaw_esd(lam, tmp_path / "pl", fit=fit, title="pareto", formats=("png",))
    assert [p.name for p in paths] == ["pl.png"] and paths[0].stat().st_size > 1000
    figures_spectra.plot_powerlaw_esd(lam, tmp_path / "pl_dict", fit={"alpha": 3.0, "xmin": 1.0}, formats=("png",))
    series = {"a": ([100, 200, 300], [8.0, 4.0, 3.0])}
    flags = {"a": ([100, 200, 300], [0.0, 1.0, 1.0])}
    figures_spectra.plot_alpha_vs_step(series, tmp_path / "alpha_step", flags=flags, formats=("png",))
    figures_spectra.plot_alpha_vs_depth(series, tmp_path / "alpha_depth", formats=("png",))
    assert (tmp_path / "alpha_step.png").stat().st_size > 1000
    with pytest.raises(ValueError):
        figures_spectra.plot_alpha_vs_step(series, tmp_path / "bad", flags={"a": ([1], [1.0])})
    with pytest.raises(ValueError):
        figures_spectra.plot_powerlaw_esd(lam, tmp_path / "bad", fit={"beta": 1})
    with pytest.raises(ValueError):
        figures_spectra.plot_powerlaw_grid([], tmp_path / "bad")


def test_cli_alpha_vs_step_for_a_run_with_checkpoints(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli.main(["train", "--model", "mlp", "--data", "mnist1d", "--steps", "20", "--checkpoint-every", "10",
                     "--width", "16", "--depth", "1", "--n-train", "256", "--n-test", "128", "--out", str(run),
                     "--quiet"]) == 0
    capsys.readouterr()
    assert cli.main(["spectrum", str(run), "--formats", "png", "--max-esd", "0"]) == 0
    out = capsys.readouterr().out
    assert "alpha" in out and "pl_fit_ok" in out
    names = {p.name for p in (run / "spectrum").iterdir()}
    assert {"alpha_vs_step.png", "ratio_vs_step.png", "spectrum.json"} <= names


def test_cli_reports_the_whole_commands_time(npz_file, tmp_path, capsys):
    """The command says how long it took in all (start-up included) and where the time went."""
    import re

    out = tmp_path / "figs"
    assert cli.main(["spectrum", str(npz_file), "--out", str(out), "--formats", "png"]) == 0
    err = capsys.readouterr().err
    (line,) = [ln for ln in err.splitlines() if ln.startswith("spectrum: ")]
    m = re.fullmatch(r"spectrum: ([\d.]+) s in all: start-up ([\d.]+) s, opening ([\d.]+) s, reading and analysis "
                     r"([\d.]+) s, output ([\d.]+) s, figures ([\d.]+) s \((\d+) files; .*\)", line)
    assert m, line
    total, *parts, files = m.groups()
    # each figure is rounded to 0.1 s: the rounded parts sum to the rounded total within 0.05 per number
    assert float(total) == pytest.approx(sum(float(p) for p in parts), abs=0.05 * (len(parts) + 1) + 1e-9)
    assert float(parts[0]) > 0  # the start-up before run(): Python and the imports
    assert int(files) == len(list(out.iterdir()))
    assert cli.main(["spectrum", str(npz_file), "--no-figures"]) == 0
    assert "figures" not in [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("spectrum: ")][0]


def test_esd_grid_marks_the_table_spikes_per_panel(tmp_path, monkeypatch):
    """In a grid, each panel marks the TW spikes its fit reports, and none where the fit is not ok."""
    from matplotlib.figure import Figure

    rng = np.random.default_rng(3)
    x = rng.standard_normal((100, 400))
    x[:2] *= np.sqrt([4.0, 6.0])[:, None]
    ok = np.linalg.eigvalsh(x @ x.T / 400)
    heavy = np.linalg.svd(rng.standard_t(2.5, (100, 400)), compute_uv=False) ** 2 / 400
    fits = [rmt.fit_mp(ok), rmt.fit_mp(heavy, ks_max=1e-4)]
    assert fits[0].fit_ok and not fits[1].fit_ok
    drawn = {}
    real_save = figures_spectra.save_figure

    def keep(fig, out, formats=figures_spectra.FORMATS, **kw):
        drawn["fig"] = fig
        return real_save(fig, out, formats, **kw)

    monkeypatch.setattr(figures_spectra, "save_figure", keep)
    figures_spectra.plot_esd_grid([("ok", ok, fits[0]), ("heavy", heavy, fits[1])], tmp_path / "g", formats=("png",))
    a, b = drawn["fig"].get_axes()
    assert isinstance(drawn["fig"], Figure)
    (ticks,) = [ln for ln in a.get_lines() if ln.get_label().startswith("spikes (TW test)")]
    xmax = a.get_xlim()[1]
    assert ticks.get_xdata().size >= 1
    np.testing.assert_allclose(np.sort(ticks.get_xdata()), np.sort(fits[0].spikes[fits[0].spikes <= xmax]))
    assert not [ln for ln in b.get_lines() if ln.get_label().startswith("spikes")]
    assert any(t.get_text().startswith("MP fit not ok: spikes withheld") for t in b.get_legend().get_texts())
