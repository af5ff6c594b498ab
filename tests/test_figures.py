"""Figures as a reader sees them (values and labels read back from the matplotlib Figure), the
`gradsparse figures` defaults and first line, and the README figures' record of the report they
were drawn from."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gradsparse import figures_spectra as fs
from gradsparse import rmt
from theory_checks import report

ROOT = Path(__file__).resolve().parents[1]


def _new_ax():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure()
    FigureCanvasAgg(fig)
    return fig.add_subplot(1, 1, 1)


def _data_lines(ax):
    return [ln for ln in ax.get_lines() if len(ln.get_xdata())]


# ------------------------------------------------------------------------------------------ G4
def _g4_series():
    steps = [0, 150, 300, 450, 600, 750, 900, 1050, 1200]
    return {"steps": steps, "trace_k": [220.0, 190, 180, 170, 160, 150, 150, 140, 130],
            "eta_l2sq": [1.3e-6, 5e-7, 5e-7, 4e-7, 4e-7, 3e-7, 3e-7, 3e-7, 2.5e-7],
            "density": [0.34, 0.33, 0.32, 0.32, 0.31, 0.31, 0.30, 0.30, 0.29],
            "loss": [0.26, 0.38, 0.30, 0.25, 0.22, 0.2, 0.19, 0.18, 0.18], "seed": 0, "window_start": 600.0}


def test_g4_figure_draws_each_quantity_raw_on_its_own_axis():
    """G4 used to put three quantities divided by their max beside the raw density on one axis."""
    from theory_checks.g04_flatness_together import PANELS, draw

    ser = _g4_series()
    fig = draw(ser)
    axes = fig.get_axes()
    assert len(axes) == 4
    for ax, (key, label) in zip(axes, PANELS):
        (line,) = _data_lines(ax)
        np.testing.assert_array_equal(line.get_xdata(), ser["steps"])
        np.testing.assert_array_equal(line.get_ydata(), ser[key])  # the raw values: nothing rescaled
        assert ax.get_ylabel() == label and "max" not in ax.get_ylabel()
        assert ax.get_yscale() == "linear"
        lo, hi = ax.get_ylim()
        assert lo <= min(ser[key]) and hi >= max(ser[key])
    assert all(axes[0].get_shared_x_axes().joined(axes[0], ax) for ax in axes)
    assert [ax.get_ylabel().split("\n")[0] for ax in axes] == ["tr(H_K)", "mean ||eta||^2", "density, blocks 2..L",
                                                                "loss"]
    # the judged plateau window is shaded from window_start to the last step
    span = [p for p in axes[0].patches if p.get_label().startswith("plateau window")]
    assert len(span) == 1
    x0, x1 = span[0].get_x(), span[0].get_x() + span[0].get_width()  # a Rectangle (x: data, y: axes)
    assert (x0, x1) == pytest.approx((600.0, 1200.0))
    # the plateau figure draws only the window's steps
    (line,) = _data_lines(draw(ser, ser["window_start"]).get_axes()[0])
    assert list(line.get_xdata()) == [600, 750, 900, 1050, 1200]


# ------------------------------------------------------------------------------------------ G13
def _bar_heights(ax):
    return sorted(round(float(p.get_height()), 9) for p in ax.patches)


def test_g13_figure_shows_the_gelu_quantity_the_check_tests():
    """The GELU part tests the relative fall of E[sigma'(z)^2]: the figure must show that quantity."""
    from theory_checks.g13_derivative_vs_activation import MIN_FALL, draw

    ser = {"act_sparsity_end": {"relu": [0.76, 0.74, 0.75], "gelu": [0.0, 0.0, 0.0]},
           "deriv_sparsity_start": {"relu": [0.50, 0.49, 0.51], "gelu": [0.0, 0.0, 0.0]},
           "deriv_sparsity_end": {"relu": [0.76, 0.74, 0.75], "gelu": [0.0, 0.0, 0.0]},
           "dsigma_sq_start": {"relu": [0.5, 0.5, 0.5], "gelu": [0.40, 0.42, 0.41]},
           "dsigma_sq_end": {"relu": [0.25, 0.26, 0.24], "gelu": [0.24, 0.23, 0.25]}}
    left, right = draw(ser).get_axes()
    assert "E[sigma'(z)^2]" in right.get_ylabel()
    assert _bar_heights(right) == pytest.approx(sorted([0.24, 0.41]))  # means of end and start
    fall = np.mean([(a - b) / a for a, b in zip(ser["dsigma_sq_start"]["gelu"], ser["dsigma_sq_end"]["gelu"])])
    assert f"falls by {fall:.2f}" in right.get_title() and f"delta {MIN_FALL}" in right.get_title()
    # the ReLU-like panel: derivative sparsity at start and end (the rise), activation sparsity at the end
    assert [t.get_text() for t in left.get_xticklabels()] == ["relu"]
    assert _bar_heights(left) == pytest.approx(sorted([0.5, 0.75, 0.75]))
    assert [t.get_text() for t in left.get_legend().get_texts()] == [
        "derivative sparsity, start", "derivative sparsity, end", "activation sparsity, end"]
    # a series saved before E[sigma'^2] was recorded: the panel says so instead of drawing nothing silently
    old = {k: ser[k] for k in ("act_sparsity_end", "deriv_sparsity_end")}
    _, right = draw(old).get_axes()
    assert any("not in this report's" in t.get_text() for t in right.texts)


# ------------------------------------------------------------------------------------------ spectrum spikes
def _planted(seed, spikes):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((200, 800))
    x[: len(spikes)] *= np.sqrt(np.asarray(spikes))[:, None]
    return np.linalg.eigvalsh(x @ x.T / 800)


def _spike_line(ax):
    lines = [ln for ln in ax.get_lines() if ln.get_label().startswith("spikes (TW test)")]
    return lines[0] if lines else None


def _legend(ax):
    return [t.get_text() for t in ax.get_legend().get_texts()]


def test_spike_marks_are_the_spikes_the_table_reports():
    lam = _planted(0, (3.0, 4.0, 30.0))  # two spikes near the bulk, one far beyond it
    fit = rmt.fit_mp(lam)
    assert fit.fit_ok and fit.num_spikes >= 3
    ax = _new_ax()
    fs._draw_esd(ax, lam, fit=fit)
    line = _spike_line(ax)
    xmax = ax.get_xlim()[1]
    shown = np.sort(np.asarray(fit.spikes))
    shown = shown[shown <= xmax]
    assert 2 <= shown.size < fit.num_spikes
    np.testing.assert_allclose(np.sort(line.get_xdata()), shown)  # one tick per reported spike, at its value
    assert line.get_label() == fs.SPIKE_LABEL.format(n=fit.num_spikes)
    beyond = int(np.sum(np.asarray(fit.spikes) > xmax))
    assert beyond >= 1 and f"{beyond} beyond the axis, max {np.max(fit.spikes):.3g}" in _legend(ax)
    # the ticks are a rug at the foot of the axis (x in data, y in axes units), not bars over the histogram
    assert set(line.get_ydata()) == {0.04} and line.get_marker() == "|"
    # the same from the JSON form a check's series saves
    ax = _new_ax()
    fs._draw_esd(ax, lam, fit=json.loads(json.dumps(fit.to_dict())))
    np.testing.assert_allclose(np.sort(_spike_line(ax).get_xdata()), shown)


def test_no_spike_marks_where_the_fit_is_not_ok():
    """Where the MP fit fails the table withholds num_spikes: the figure marks none and says why."""
    rng = np.random.default_rng(1)
    w = rng.standard_t(2.5, (200, 800))
    lam = np.linalg.svd(w, compute_uv=False) ** 2 / 800
    fit = rmt.fit_mp(lam, ks_max=1e-4)
    assert not fit.fit_ok and fit.spikes.size > 0
    assert fs.reported_spikes(fit) is None
    ax = _new_ax()
    fs._draw_esd(ax, lam, fit=fit)
    assert _spike_line(ax) is None
    assert fs.WITHHELD_LABEL.format(n=fit.spikes.size) in _legend(ax)


# ------------------------------------------------------------------------------------------ figures command
def test_figures_command_defaults_to_a_folder_of_the_users():
    from gradsparse import cli
    from gradsparse.commands import figures

    args = cli.build_parser({"figures"}).parse_args(["figures"])
    assert args.out == Path("runs/figures") and args.work == Path("runs/figures/check")
    assert not args.out.resolve().is_relative_to((ROOT / "figures").resolve())
    # the checks it trains are exactly those whose series the README figures draw
    slugs = {slug for slug, _ in report.README_FIGURES.values()}
    assert {f"G{int(s[1:3])}" for s in slugs} == set(figures.NEEDED)


def _first_stderr_line(argv, cwd, marker):
    """Start ``python -X importtime -m gradsparse.cli ARGV``, read stderr up to the first line that
    starts with ``marker`` and stop the process. Returns (that line, the modules imported before it)."""
    proc = subprocess.Popen([sys.executable, "-X", "importtime", "-m", "gradsparse.cli", *argv], cwd=cwd,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    imported = []
    try:
        for line in proc.stderr:
            if line.startswith("import time:"):
                imported.append(line.rsplit("|", 1)[-1].strip())
            elif line.startswith(marker):
                return line.rstrip("\n"), imported
        raise AssertionError(f"no line starting with {marker!r}; exit {proc.wait()}")
    finally:
        proc.kill()
        proc.wait()


def test_figures_says_what_it_trains_before_it_starts(tmp_path):
    line, imported = _first_stderr_line(["figures", "--preset", "quick", "--work", str(tmp_path / "w"),
                                         "--out", str(tmp_path / "o")], tmp_path, "gradsparse figures:")
    for bit in ("G3, G7, G10, G12", "preset quick", "3 seeds", str(tmp_path / "w"), str(tmp_path / "o"), "min",
                "--from"):
        assert bit in line, (bit, line)
    # one line, printed before the checks (and the models they train) are imported
    assert not any(m.startswith(("theory_checks", "equinox", "optax")) for m in imported)
    assert not (tmp_path / "w").exists()


# ------------------------------------------------------------------------------------------ report digest
def _fake_report(folder: Path, elapsed=1.0, value=0.5, series_value=1.0):
    folder.mkdir(parents=True, exist_ok=True)
    res = {"name": "G3", "verdict": "PASS", "per_seed": {"x": [value, 0.4, 0.3]}, "elapsed_s": elapsed}
    (folder / "report.json").write_text(json.dumps({"preset": "quick", "seeds": [0, 1, 2], "wall_s": elapsed,
                                                    "plan_sha256": "ab", "results": [res]}))
    (folder / "series").mkdir(exist_ok=True)
    (folder / "series" / "g03_sparsity_emerges.json").write_text(json.dumps(
        {"steps": [0, 10, 20], "train": [[0.5, 0.4, series_value * 0.3]] * 3,
         "heldout": [[0.5, 0.41, 0.31]] * 3}))
    return folder


def test_report_digest_covers_the_evidence_not_the_timings(tmp_path):
    a = report.report_digest(_fake_report(tmp_path / "a"))
    assert re.fullmatch(r"[0-9a-f]{64}", a)
    assert report.report_digest(_fake_report(tmp_path / "b", elapsed=99.0)) == a
    assert report.report_digest(_fake_report(tmp_path / "c", value=0.50001)) != a
    assert report.report_digest(_fake_report(tmp_path / "d", series_value=1.001)) != a
    with pytest.raises(ValueError, match="no readable report"):
        report.report_digest(tmp_path / "none")


def test_readme_figures_record_their_report(tmp_path):
    src = _fake_report(tmp_path / "rep")
    done = report.readme_figures(src, tmp_path / "out", ("png",))
    assert isinstance(done["density_emergence"], list) and isinstance(done["esd_key_mp"], str)
    rec = json.loads((tmp_path / "out" / report.FIGURES_RECORD).read_text())
    assert rec["report_digest"] == report.report_digest(src) and rec["preset"] == "quick"
    entry = rec["figures"]["density_emergence"]
    assert entry["series_sha256"] == report.file_sha256(src / "series" / "g03_sparsity_emerges.json")
    assert entry["files"] == {"density_emergence.png": report.file_sha256(tmp_path / "out" / "density_emergence.png")}
    assert set(rec["figures"]) == {"density_emergence"}


def test_the_readme_figures_are_those_drawn_from_the_readme_report():
    """Every image the README shows is the file drawn from the report named in figures/figures.json,
    and the README's table names the same report."""
    rec = json.loads((ROOT / "figures" / report.FIGURES_RECORD).read_text())
    assert re.fullmatch(r"[0-9a-f]{64}", rec["report_digest"])
    files = {name: sha for entry in rec["figures"].values() for name, sha in entry["files"].items()}
    readme = (ROOT / "README.md").read_text()
    shown = re.findall(r"!\[[^\]]*\]\(figures/([^)]+)\)", readme)
    assert shown and set(shown) <= set(files), sorted(set(shown) - set(files))
    for name in shown:
        assert report.file_sha256(ROOT / "figures" / name) == files[name], f"figures/{name} was not drawn from " \
            "the recorded report: regenerate with `gradsparse figures --from REPORT --out figures`"
    m = re.search(r"report digest `([0-9a-f]{12,64})`", readme)
    if m is None:
        pytest.skip("the README does not state its report's digest yet")
    assert rec["report_digest"].startswith(m.group(1)), "the README's table and figures come from different reports"
