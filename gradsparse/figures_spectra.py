"""Spectrum figures: ESD with Marchenko-Pastur overlays, log-log ESD with the fitted power law,
ratios / near-zero rate / bounds / alpha vs step and vs depth, anisotropy vs width.

Every function takes plain data (arrays, dicts of series, rows), draws on a fresh
``matplotlib.figure.Figure`` (Agg canvas, no pyplot state), writes one file per format (PNG and PDF
by default) atomically through :func:`gradsparse.io.atomic_write_with`, and returns the written
paths. ``out`` is a path stem: ``figs/esd`` gives ``figs/esd.png`` and ``figs/esd.pdf`` (a suffix
that names one of the formats is dropped first).

A *series* is ``{label: (steps, values)}`` with equally long 1-D sequences; NaN values are not drawn.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from gradsparse import powerlaw, rmt
from gradsparse.io import atomic_write_with

__all__ = [
    "save_figure",
    "plot_esd",
    "reported_spikes",
    "plot_ratio_vs_step",
    "plot_near_zero_vs_step",
    "plot_bounds_vs_step",
    "series_from_rows",
    "plot_esd_grid",
    "plot_vs_depth",
    "series_by_layer",
    "plot_model_spectra",
    "plot_powerlaw_esd",
    "plot_powerlaw_grid",
    "plot_alpha_vs_depth",
    "plot_alpha_vs_step",
]

FORMATS = ("png", "pdf")
_ALLOWED_FORMATS = ("png", "pdf", "svg")


def _new_figure(figsize: tuple[float, float] = (6.0, 4.0)) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=120)
    FigureCanvasAgg(fig)
    return fig


def _stem(out: str | os.PathLike) -> Path:
    p = Path(out)
    if str(out) == "" or p.name == "":
        raise ValueError(f"out must name a file stem, got {out!r}")
    if p.suffix.lstrip(".").lower() in _ALLOWED_FORMATS:
        p = p.with_suffix("")
    return p


def save_figure(fig: Any, out: str | os.PathLike, formats: Sequence[str] = FORMATS, *, tight: bool = True) -> list[Path]:
    """Write ``fig`` to ``out.<fmt>`` for each format, atomically; return the paths. ``tight``: crop to the
    drawn content (``bbox_inches="tight"``, one extra layout pass per file); a figure laid out with
    ``tight_layout`` already fits its canvas and skips it."""
    fmts = [str(f).lower().lstrip(".") for f in formats]
    if not fmts or any(f not in _ALLOWED_FORMATS for f in fmts):
        raise ValueError(f"formats must be a non-empty subset of {_ALLOWED_FORMATS}, got {list(formats)}")
    stem = _stem(out)
    paths = []
    for f in fmts:
        target = stem.with_name(stem.name + "." + f)
        paths.append(atomic_write_with(target, lambda tmp, f=f: fig.savefig(tmp, format=f,
                                                                              bbox_inches="tight" if tight else None)))
    return paths


def _check_series(series: Mapping[str, Any], what: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    if not isinstance(series, Mapping) or not series:
        raise ValueError(f"{what}: expected a non-empty dict {{label: (steps, values)}}, got {type(series).__name__}")
    out = {}
    for label, sv in series.items():
        try:
            x, y = sv
        except (TypeError, ValueError):
            raise ValueError(f"{what}: series {label!r} must be a pair (steps, values)") from None
        x = np.asarray(x, dtype=np.float64).ravel()
        y = np.asarray(y, dtype=np.float64).ravel()
        if x.shape != y.shape:
            raise ValueError(f"{what}: series {label!r} has {x.size} steps but {y.size} values")
        out[str(label)] = (x, y)
    return out


def _fit_params(fit: Any) -> tuple[float, float, np.ndarray, float, bool]:
    """(s2, c, eigenvalues the fit removed above its edge, KS, fit_ok) of an MP fit (a dict without
    ``fit_ok`` counts as ok)."""
    if isinstance(fit, rmt.MPFit):
        return fit.s2, fit.c, np.asarray(fit.spikes, dtype=np.float64), fit.ks, bool(fit.fit_ok)
    if isinstance(fit, Mapping) and "s2" in fit and "c" in fit:
        return (float(fit["s2"]), float(fit["c"]), np.asarray(fit.get("spikes", []), np.float64),
                float(fit.get("ks", math.nan)), bool(fit.get("fit_ok", True)))
    raise ValueError("fit must be an rmt.MPFit or a dict with keys 's2' and 'c' (optionally 'spikes', 'ks', 'fit_ok')")


def reported_spikes(fit: Any) -> np.ndarray | None:
    """The spikes a spectrum table reports for an MP fit (descending): the eigenvalues the TW test
    removed above the fitted edge when ``fit_ok``; None where ``fit_ok`` is false (``num_spikes`` is
    withheld there: the MP law does not describe the bulk, so nothing beyond its edge is a spike of it)."""
    if fit is None:
        return np.zeros(0)
    _, _, spk, _, ok = _fit_params(fit)
    return np.sort(spk)[::-1] if ok else None


#: label of the spike marks (rug ticks at the foot of an ESD panel), of the note where they are withheld
SPIKE_LABEL = "spikes (TW test): {n}"
WITHHELD_LABEL = "MP fit not ok: spikes withheld ({n} past the edge)"


def plot_esd(
    eigs: Any,
    out: str | os.PathLike,
    *,
    fit: Any = None,
    c_pred: float | None = None,
    s2_pred: float | None = None,
    spikes: Any = None,
    title: str | None = None,
    bins: int | None = None,
    formats: Sequence[str] = FORMATS,
) -> list[Path]:
    """Histogram of an eigenvalue spectrum with MP densities.

    ``eigs``: eigenvalues (e.g. of ``W W^T / N`` or of an accumulated covariance). The histogram is
    normalised by the total count, so it compares with the MP continuous density (mass
    ``min(1, 1/c)``); zeros (the atom) are left out of the bins. ``fit``: an :class:`rmt.MPFit` (or
    dict with ``s2``, ``c``, ``spikes``, ``fit_ok``) drawn as a solid line with its bulk edge;
    ``c_pred`` (with ``s2_pred``, default: the fitted s2 or the mean eigenvalue) drawn dashed.

    Spike marks: a red rug tick at the foot of the axis at each spike the spectrum table reports
    (:func:`reported_spikes`: the fit's TW spikes when ``fit_ok``; none when it is not, which the
    legend says), or at each of ``spikes`` when given; spikes far beyond the bulk are counted in the
    legend instead of stretching the axis.
    """
    lam = np.asarray(eigs, dtype=np.float64).ravel()
    if lam.size == 0 or not np.all(np.isfinite(lam)):
        raise ValueError("plot_esd needs a non-empty array of finite eigenvalues")
    fig = _new_figure()
    ax = fig.add_subplot(1, 1, 1)
    _draw_esd(ax, lam, fit=fit, c_pred=c_pred, s2_pred=s2_pred, spikes=spikes, title=title, bins=bins)
    return save_figure(fig, out, formats)


def _draw_esd(
    ax: Any,
    lam: np.ndarray,
    *,
    fit: Any = None,
    c_pred: float | None = None,
    s2_pred: float | None = None,
    spikes: Any = None,
    title: str | None = None,
    bins: int | None = None,
    fontsize: float = 7,
) -> None:
    """Draw the ESD of ``lam`` (finite, non-empty) with its MP overlays on ``ax`` (see :func:`plot_esd`)."""
    top = float(np.max(np.abs(lam)))
    pos = lam[lam > 1e-9 * top] if top > 0 else lam[:0]
    fit_s2 = fit_c = None
    spk = np.zeros(0)  # eigenvalues outside the bulk: they set the axis range
    marks: np.ndarray | None = np.zeros(0)  # the spikes marked (None: withheld, the fit is not ok)
    ks = math.nan
    if fit is not None:
        fit_s2, fit_c, spk, ks, _ = _fit_params(fit)
        marks = reported_spikes(fit)
    if spikes is not None:
        spk = marks = np.asarray(spikes, dtype=np.float64).ravel()
    if c_pred is not None:
        c_pred = float(c_pred)
        if not (math.isfinite(c_pred) and c_pred > 0):
            raise ValueError(f"c_pred must be a positive number, got {c_pred}")
        if s2_pred is None:
            s2_pred = fit_s2 if fit_s2 is not None else float(np.mean(lam))
    bulk = pos[pos < np.min(spk)] if spk.size else pos
    edges = [float(np.max(bulk)) if bulk.size else top]
    if fit_s2 is not None:
        edges.append(rmt.mp_edges(fit_c, fit_s2)[1])
    if c_pred is not None and s2_pred is not None and s2_pred > 0:
        edges.append(rmt.mp_edges(c_pred, s2_pred)[1])
    xmax = 1.08 * max(edges)
    close = spk[spk <= 2.5 * xmax]
    if close.size:
        xmax = max(xmax, 1.05 * float(np.max(close)))
    far = spk[spk > xmax]

    nb = bins if bins is not None else int(min(120, max(10, pos.size // 6)))
    if pos.size:
        in_range = pos[pos <= xmax]
        ax.hist(in_range, bins=nb, range=(0.0, xmax), weights=np.full(in_range.size, nb / (xmax * lam.size)),
                histtype="stepfilled", color="0.75", edgecolor="0.55",  # one polygon, not a patch per bin
                label=f"ESD ({lam.size} eigenvalues)")
    xs = np.linspace(0.0, xmax, 800)[1:]
    if fit_s2 is not None:
        ax.plot(xs, rmt.mp_pdf(xs, fit_c, fit_s2), color="C0", lw=2,
                label=f"MP fit: c={fit_c:.3g}, s2={fit_s2:.3g}" + (f", KS={ks:.3f}" if math.isfinite(ks) else ""))
        ax.axvline(rmt.mp_edges(fit_c, fit_s2)[1], color="C0", ls=":", lw=1)
    if c_pred is not None and s2_pred is not None and s2_pred > 0:
        ax.plot(xs, rmt.mp_pdf(xs, c_pred, s2_pred), color="C1", lw=1.5, ls="--",
                label=f"MP predicted: c={c_pred:.3g}")
    if marks is None:
        ax.plot([], [], " ", label=WITHHELD_LABEL.format(n=spk.size))
        if far.size:
            ax.plot([], [], " ", label=f"{far.size} beyond the axis, max {np.max(far):.3g}")
    elif marks.size:
        near = marks[marks <= xmax]
        # a rug at the foot of the axis (x: data, y: axes fraction): thin ticks stay apart where
        # spikes crowd the edge, and hide neither the histogram nor the MP curve
        ax.plot(near, np.full(near.size, 0.04), ls="none", marker="|", ms=9, mew=0.9, color="C3", alpha=0.9,
                transform=ax.get_xaxis_transform(), label=SPIKE_LABEL.format(n=marks.size))
        beyond = marks[marks > xmax]
        if beyond.size:
            ax.plot([], [], " ", label=f"{beyond.size} beyond the axis, max {np.max(beyond):.3g}")
    n_zero = lam.size - pos.size
    if n_zero:
        ax.plot([], [], " ", label=f"{n_zero} zero eigenvalues not binned")
    ax.set_xlim(0.0, xmax)
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density")
    if title:
        ax.set_title(title, fontsize=fontsize + 2 if fontsize < 7 else None)
    ax.legend(fontsize=fontsize)


def _series_plot(
    series: Mapping[str, Any],
    out: str | os.PathLike,
    *,
    xlabel: str,
    ylabel: str,
    what: str,
    logy: bool = False,
    logx: bool = False,
    hlines: Mapping[str, float] | None = None,
    title: str | None = None,
    formats: Sequence[str] = FORMATS,
    marker: str = "o",
    flags: Mapping[str, Any] | None = None,
    flag_label: str = "fit not ok",
) -> list[Path]:
    data = _check_series(series, what)
    fig = _new_figure()
    ax = fig.add_subplot(1, 1, 1)
    flagged_any = False
    for i, (label, (x, y)) in enumerate(data.items()):
        ok = np.isfinite(x) & np.isfinite(y)
        if logy:
            ok &= y > 0
        ax.plot(x[ok], y[ok], marker=marker, ms=3, lw=1.2, color=f"C{i % 10}", label=label)
        if flags is not None and label in flags:
            try:
                _, fv = flags[label]  # a series of its own: (steps or layers, 1/0 flags)
            except (TypeError, ValueError):
                raise ValueError(f"{what}: flags of {label!r} must be a pair (x, flags)") from None
            f = np.asarray(fv, dtype=np.float64).ravel()
            if f.shape != y.shape:
                raise ValueError(f"{what}: flags of {label!r} have {f.size} values, the series {y.size}")
            bad = ok & (f == 0.0)
            if bad.any():
                ax.plot(x[bad], y[bad], ls="none", marker="x", ms=7, color="C3",
                        label=None if flagged_any else flag_label)
                flagged_any = True
    for label, v in (hlines or {}).items():
        if v is not None and math.isfinite(float(v)):
            ax.axhline(float(v), color="0.3", ls="--", lw=1)
            ax.text(ax.get_xlim()[0], float(v), f" {label}", va="bottom", fontsize=7, color="0.3")
    if logy:
        ax.set_yscale("log")
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    if len(data) <= 16:
        ax.legend(fontsize=7)
    return save_figure(fig, out, formats)


def plot_ratio_vs_step(
    series: Mapping[str, Any],
    out: str | os.PathLike,
    *,
    ylabel: str = "s_max / s_min (non-zero)",
    predicted: float | None = None,
    title: str | None = None,
    formats: Sequence[str] = FORMATS,
) -> list[Path]:
    """Ratio (singular or 80%-mass) vs training step, one line per layer, log y; ``predicted``
    (e.g. :func:`rmt.mp_singular_ratio` of the layer's aspect ratio) drawn as a dashed line."""
    return _series_plot(series, out, xlabel="step", ylabel=ylabel, what="plot_ratio_vs_step", logy=True,
                        hlines=None if predicted is None else {"MP prediction": predicted}, title=title,
                        formats=formats)


def plot_near_zero_vs_step(
    series: Mapping[str, Any],
    out: str | os.PathLike,
    *,
    floor: float | None = None,
    title: str | None = None,
    formats: Sequence[str] = FORMATS,
) -> list[Path]:
    """Near-zero eigenvalue rate of ``W W^T`` vs step per layer; ``floor`` (``1 - min/rows``, the rank
    bound) as a dashed line."""
    return _series_plot(series, out, xlabel="step", ylabel="near-zero rate of W W^T", what="plot_near_zero_vs_step",
                        hlines=None if floor is None else {"rank bound 1 - min/rows": floor}, title=title,
                        formats=formats)


def plot_bounds_vs_step(
    steps: Any,
    bound_re: Any,
    bound_im: Any,
    out: str | os.PathLike,
    *,
    title: str | None = None,
    formats: Sequence[str] = FORMATS,
) -> list[Path]:
    """The two bounds of SPEC 3.3 (``bound_Re``, ``bound_Im``) vs step, log y. ``bound_re`` and
    ``bound_im`` are sequences aligned with ``steps`` or ``{layer: sequence}`` dicts."""
    st = np.asarray(steps, dtype=np.float64).ravel()
    series: dict[str, Any] = {}
    for tag, b in (("Re", bound_re), ("Im", bound_im)):
        if isinstance(b, Mapping):
            for k, v in b.items():
                series[f"{k} bound_{tag}"] = (st, v)
        else:
            series[f"bound_{tag}"] = (st, b)
    return _series_plot(series, out, xlabel="step", ylabel="bound", what="plot_bounds_vs_step", logy=True,
                        title=title, formats=formats)


def series_from_rows(rows_by_step: Sequence[tuple[int, Sequence[Any]]], column: str) -> dict[str, tuple[list, list]]:
    """``[(step, rows), ...]`` (rows: :class:`gradsparse.spectra.SpectrumRow` or dicts) ->
    ``{name: (steps, values)}`` for one column, steps ascending; flagged rows give NaN."""
    out: dict[str, tuple[list, list]] = {}
    for step, rows in sorted(rows_by_step, key=lambda t: t[0]):
        for r in rows:
            d = r if isinstance(r, Mapping) else r.to_dict()
            if column not in d:
                raise ValueError(f"unknown column {column!r}; available: {sorted(d)}")
            v = d[column]
            xs, ys = out.setdefault(d["name"], ([], []))
            xs.append(step)
            ys.append(math.nan if v is None else float(v))
    return out


def _panel_grid(panels: Sequence[tuple[str, Any, Any]], out: str | os.PathLike, draw: Any, what: str, *,
                title: str | None, ncols: int, formats: Sequence[str]) -> list[Path]:
    """Small multiples: one panel per ``(label, eigs, fit)``, each drawn by ``draw(ax, eigs, fit,
    title=label, fontsize=...)``; ``what`` names the public function in error messages."""
    panels = list(panels)
    if not panels:
        raise ValueError(f"{what} needs at least one panel")
    if not (isinstance(ncols, int) and ncols >= 1):
        raise ValueError(f"ncols: must be an int >= 1, got {ncols!r}")
    cols = min(ncols, len(panels))
    nrows = math.ceil(len(panels) / cols)
    fig = _new_figure((3.4 * cols, 2.7 * nrows))
    for i, panel in enumerate(panels):
        try:
            label, eigs, fit = panel
        except (TypeError, ValueError):
            raise ValueError(f"panel {i}: must be (label, eigs, fit)") from None
        lam = np.asarray(eigs, dtype=np.float64).ravel()
        if lam.size == 0 or not np.all(np.isfinite(lam)):
            raise ValueError(f"panel {label!r}: needs a non-empty array of finite eigenvalues")
        ax = fig.add_subplot(nrows, cols, i + 1)
        draw(ax, lam, fit, title=str(label), fontsize=5.5)
        ax.xaxis.label.set_size(7)
        ax.yaxis.label.set_size(7)
        ax.tick_params(labelsize=6)
    if title:
        fig.suptitle(title)
    fig.tight_layout()  # fits the panels and the title to the canvas: no second (bbox_inches="tight") pass
    return save_figure(fig, out, formats, tight=False)


def plot_esd_grid(
    panels: Sequence[tuple[str, Any, Any]],
    out: str | os.PathLike,
    *,
    title: str | None = None,
    ncols: int = 4,
    formats: Sequence[str] = FORMATS,
) -> list[Path]:
    """Small multiples of ESDs: ``panels`` is ``[(label, eigs, fit), ...]`` (``fit``: an
    :class:`rmt.MPFit`, a dict as in :func:`plot_esd`, or None), one panel each, drawn as
    :func:`plot_esd` draws one (MP fit as a solid line with its edge, spikes as red ticks)."""
    return _panel_grid(panels, out, lambda ax, lam, fit, **kw: _draw_esd(ax, lam, fit=fit, **kw), "plot_esd_grid",
                       title=title, ncols=ncols, formats=formats)


def plot_vs_depth(
    series: Mapping[str, Any],
    out: str | os.PathLike,
    *,
    ylabel: str,
    logy: bool = True,
    title: str | None = None,
    formats: Sequence[str] = FORMATS,
) -> list[Path]:
    """A column (ratio, 80%-mass ratio, stable rank, ...) vs layer index, one line per series
    (``{label: (layers, values)}``, e.g. from :func:`series_by_layer`)."""
    return _series_plot(series, out, xlabel="layer", ylabel=ylabel, what="plot_vs_depth", logy=logy,
                        title=title, formats=formats)


def _row_dict(r: Any) -> Mapping[str, Any]:
    return r if isinstance(r, Mapping) else r.to_dict()


def series_by_layer(rows: Sequence[Any], column: str) -> dict[str, tuple[list, list]]:
    """Rows (:class:`gradsparse.spectra.SpectrumRow` or dicts with ``role`` and ``layer``) ->
    ``{label: (layers, values)}`` for one column, layers ascending. Rows without a layer index are
    left out; the label is the role, or ``role: name pattern`` (the name with its layer index as
    ``*``) when a role has matrices of several names per layer (LLaMA's gate and up projections)."""
    groups: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for r in rows:
        d = _row_dict(r)
        if column not in d:
            raise ValueError(f"unknown column {column!r}; available: {sorted(d)}")
        if d.get("layer") is None:
            continue
        pattern = re.sub(rf"(^|[./]){int(d['layer'])}([./]|$)", r"\1*\2", str(d["name"]), count=1)
        v = d[column]
        groups.setdefault((str(d.get("role", "other")), pattern), []).append(
            (int(d["layer"]), math.nan if v is None else float(v)))
    per_role: dict[str, int] = {}
    for role, _ in groups:
        per_role[role] = per_role.get(role, 0) + 1
    out: dict[str, tuple[list, list]] = {}
    for (role, pattern), pts in groups.items():
        pts.sort()
        label = role if per_role[role] == 1 else f"{role}: {pattern}"
        out[label] = ([p[0] for p in pts], [p[1] for p in pts])
    return out


def plot_model_spectra(
    rows: Sequence[Any],
    out_dir: str | os.PathLike,
    *,
    max_panels: int = 12,
    formats: Sequence[str] = FORMATS,
) -> list[Path]:
    """Figures of a whole model from its spectrum rows (kept with ``keep_sv=True`` and ``fit=True``).

    * ``esd_role_<role>``: per role, the ESD of ``W W^T / N`` (``N = max(rows, cols)``) of each of its
      matrices (at most ``max_panels``, evenly spread over depth) against the fitted MP law, spikes
      marked; the panel title says the layer, the fitted ``c`` and KS, and whether ``fit_ok``.
    * ``esd_pl_role_<role>`` (rows with a power-law fit): the same matrices' log-log ESD of ``s^2``
      with the fitted power law and ``xmin`` (:func:`plot_powerlaw_grid`).
    * ``ratio_vs_depth``, ``mass80_ratio_vs_depth``, ``stable_rank_vs_depth`` and (with power-law
      fits) ``alpha_vs_depth``: per role vs layer index (only when rows carry at least two layer
      indices).

    Rows with ``error`` or without singular values are left out. Returns the written paths.
    """
    if not (isinstance(max_panels, int) and max_panels >= 1):
        raise ValueError(f"max_panels: must be an int >= 1, got {max_panels!r}")
    out_dir = Path(out_dir)
    for r in rows:
        if not all(hasattr(r, a) for a in ("name", "shape", "role", "layer", "sv", "mp_fit", "error")):
            raise ValueError(f"rows: expected gradsparse.spectra.SpectrumRow items, got {type(r).__name__}")
    good = [r for r in rows if r.error is None and r.sv is not None]
    written: list[Path] = []
    roles: dict[str, list[Any]] = {}
    for r in good:
        roles.setdefault(r.role, []).append(r)
    for role, group in roles.items():
        group.sort(key=lambda r: (-1 if r.layer is None else r.layer, r.name))
        if len(group) > max_panels:
            idx = np.unique(np.round(np.linspace(0, len(group) - 1, max_panels)).astype(int))
            group = [group[i] for i in idx]
        panels = []
        for r in group:
            n_big = max(r.shape)
            eigs = r.sv * r.sv / n_big
            where = f"layer {r.layer}" if r.layer is not None else r.name.split(".")[-2] if "." in r.name else r.name
            label = f"{where} {r.shape[0]}x{r.shape[1]}"
            if r.mp_fit is not None:
                label += (f"\nc={r.mp_fit.c:.3g} KS={r.mp_fit.ks:.3f} "
                          + (f"ok, {r.mp_fit.num_spikes} spikes" if r.mp_fit.fit_ok else "NOT ok: no spikes"))
            panels.append((label, eigs, r.mp_fit))
        written += plot_esd_grid(panels, out_dir / f"esd_role_{role}", formats=formats,
                                 title=f"{role}: ESD of W W^T / N vs fitted MP (red ticks: the TW spikes the "
                                       "table reports; none where the fit is not ok)")
        pl_panels = []
        for r in group:
            if getattr(r, "pl_fit", None) is None:
                continue
            where = f"layer {r.layer}" if r.layer is not None else r.name.split(".")[-2] if "." in r.name else r.name
            f = r.pl_fit
            label = (f"{where} {r.shape[0]}x{r.shape[1]}\nalpha={f.alpha:.3g} D={f.D:.3f} "
                     f"{'ok' if f.fit_ok else 'NOT ok'}")
            pl_panels.append((label, r.sv * r.sv, f))
        if pl_panels:
            written += plot_powerlaw_grid(pl_panels, out_dir / f"esd_pl_role_{role}", formats=formats,
                                          title=f"{role}: log-log ESD of W W^T (s^2) with the fitted power law "
                                                "(red dotted: xmin)")
    layers = {r.layer for r in good if r.layer is not None}
    if len(layers) >= 2:
        for col, ylabel in (("ratio", "s_max / s_min (non-zero)"), ("mass80_ratio", "80%-mass ratio of W W^T"),
                            ("stable_rank", "stable rank ||W||_F^2 / s_max^2")):
            series = series_by_layer(good, col)
            if series:
                written += plot_vs_depth(series, out_dir / f"{col}_vs_depth", ylabel=ylabel, formats=formats)
        fitted = [r for r in good if getattr(r, "pl_fit", None) is not None]
        if fitted:
            series = series_by_layer(fitted, "alpha")
            if any(np.isfinite(np.asarray(v[1], dtype=np.float64)).any() for v in series.values()):
                written += plot_alpha_vs_depth(series, out_dir / "alpha_vs_depth",
                                               flags=series_by_layer(fitted, "pl_fit_ok"), formats=formats)
    return written


# --------------------------------------------------------------------------------------------
# power law (HT-SR)
# --------------------------------------------------------------------------------------------


def _pl_params(fit: Any) -> tuple[float, float, int, float]:
    if isinstance(fit, powerlaw.PowerLawFit):
        return fit.alpha, fit.xmin, fit.n_tail, fit.D
    if isinstance(fit, Mapping) and "alpha" in fit and "xmin" in fit:
        return (float(fit["alpha"]), float(fit["xmin"]), int(fit.get("n_tail", 0)),
                float(fit.get("D", math.nan)))
    raise ValueError("fit must be a powerlaw.PowerLawFit or a dict with keys 'alpha', 'xmin' "
                     "(optionally 'n_tail', 'D')")


def _draw_pl_esd(ax: Any, lam: np.ndarray, fit: Any = None, *, title: str | None = None, fontsize: float = 7,
                 thresh: float = powerlaw.EVALS_THRESH) -> None:
    """Log-log ESD (density per unit eigenvalue, log-spaced bins) of the eigenvalues ``> thresh`` with
    the fitted power law drawn from ``xmin`` on and ``xmin`` marked."""
    pos = np.sort(lam[lam > thresh])
    if pos.size == 0:
        ax.text(0.5, 0.5, f"no eigenvalue > {thresh:g}", ha="center", va="center", transform=ax.transAxes)
        return
    lo, hi = float(pos[0]), float(pos[-1])
    nb = int(min(60, max(8, pos.size // 5)))
    edges = np.logspace(math.log10(lo), math.log10(hi) + 1e-9, nb + 1) if hi > lo else np.array([lo * 0.9, hi * 1.1])
    counts, edges = np.histogram(pos, bins=edges)
    dens = counts / (np.diff(edges) * pos.size)
    centres = np.sqrt(edges[:-1] * edges[1:])
    good = dens > 0
    ax.step(centres[good], dens[good], where="mid", color="0.45", lw=1.2, label=f"ESD ({pos.size} eigenvalues)")
    ax.plot(centres[good], dens[good], ls="none", marker=".", ms=3, color="0.3")
    if fit is not None:
        alpha, xmin, n_tail, D = _pl_params(fit)
        if math.isfinite(alpha) and math.isfinite(xmin) and xmin > 0 and alpha > 1:
            frac = (n_tail if n_tail > 0 else int(np.count_nonzero(pos >= xmin))) / pos.size
            xs = np.logspace(math.log10(xmin), math.log10(hi), 100)
            ys = frac * (alpha - 1.0) / xmin * (xs / xmin) ** (-alpha)
            lab = f"power law: alpha={alpha:.3g}" + (f", D={D:.3f}" if math.isfinite(D) else "")
            ax.plot(xs, ys, color="C3", lw=2, ls="--", label=lab)
            ax.axvline(xmin, color="C3", lw=1, ls=":", label=f"xmin={xmin:.3g} ({n_tail} in tail)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    if fontsize < 7:  # a small panel: decade labels only (minor-tick labels crowd it and cost most of its drawing)
        from matplotlib.ticker import NullFormatter

        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("eigenvalue s^2")
    ax.set_ylabel("density")
    if title:
        ax.set_title(title, fontsize=fontsize + 2 if fontsize < 7 else None)
    ax.legend(fontsize=fontsize)


def plot_powerlaw_esd(
    eigs: Any,
    out: str | os.PathLike,
    *,
    fit: Any = None,
    title: str | None = None,
    formats: Sequence[str] = FORMATS,
) -> list[Path]:
    """Log-log ESD of ``eigs`` (squared singular values ``s^2``, WeightWatcher's units) with the fitted
    power law ``p(x) = f (alpha - 1)/xmin (x/xmin)^-alpha`` (``f`` = tail fraction, so the line sits on
    the ESD) from ``xmin`` to the largest eigenvalue, and ``xmin`` as a dotted line. ``fit``: a
    :class:`gradsparse.powerlaw.PowerLawFit` or a dict with ``alpha``, ``xmin`` (``n_tail``, ``D``).
    Eigenvalues ``<= 1e-5`` (left out of the fit) are not drawn."""
    lam = np.asarray(eigs, dtype=np.float64).ravel()
    if lam.size == 0 or not np.all(np.isfinite(lam)):
        raise ValueError("plot_powerlaw_esd needs a non-empty array of finite eigenvalues")
    fig = _new_figure()
    ax = fig.add_subplot(1, 1, 1)
    _draw_pl_esd(ax, lam, fit, title=title)
    return save_figure(fig, out, formats)


def plot_powerlaw_grid(
    panels: Sequence[tuple[str, Any, Any]],
    out: str | os.PathLike,
    *,
    title: str | None = None,
    ncols: int = 4,
    formats: Sequence[str] = FORMATS,
) -> list[Path]:
    """Small multiples of :func:`plot_powerlaw_esd`: ``panels`` is ``[(label, eigs, fit), ...]``."""
    return _panel_grid(panels, out, _draw_pl_esd, "plot_powerlaw_grid", title=title, ncols=ncols, formats=formats)


_ALPHA_LINES = {"alpha = 2 (WeightWatcher: below, over-trained)": 2.0, "alpha = 6 (above: under-trained)": 6.0}


def plot_alpha_vs_depth(
    series: Mapping[str, Any],
    out: str | os.PathLike,
    *,
    flags: Mapping[str, Any] | None = None,
    title: str | None = None,
    formats: Sequence[str] = FORMATS,
) -> list[Path]:
    """Power-law alpha vs layer index, one line per series (``{label: (layers, alphas)}``, e.g.
    :func:`series_by_layer` of ``"alpha"``), dashed lines at 2 and 6; ``flags`` (the same labels, e.g.
    :func:`series_by_layer` of ``"pl_fit_ok"``, ``{label: (layers, 1/0)}``): points whose flag is 0 are
    crossed out."""
    return _series_plot(series, out, xlabel="layer", ylabel="power-law alpha of the ESD tail",
                        what="plot_alpha_vs_depth",
                        hlines=_ALPHA_LINES, title=title, formats=formats, flags=flags,
                        flag_label="pl_fit_ok false")


def plot_alpha_vs_step(
    series: Mapping[str, Any],
    out: str | os.PathLike,
    *,
    flags: Mapping[str, Any] | None = None,
    title: str | None = None,
    formats: Sequence[str] = FORMATS,
) -> list[Path]:
    """Power-law alpha vs training step, one line per matrix (``{name: (steps, alphas)}``, e.g.
    :func:`series_from_rows` of ``"alpha"``), dashed lines at 2 and 6, ``flags`` as in
    :func:`plot_alpha_vs_depth`."""
    return _series_plot(series, out, xlabel="step", ylabel="power-law alpha of the ESD tail",
                        what="plot_alpha_vs_step",
                        hlines=_ALPHA_LINES, title=title, formats=formats, flags=flags,
                        flag_label="pl_fit_ok false")
