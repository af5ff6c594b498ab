"""Training-curve, sparsity and module-effect figures (spectrum figures: ``gradsparse.figures_spectra``).

Every function takes plain data (the JSON-ready ``series`` the theory checks save, or values read
from run logs), draws on a fresh matplotlib Figure (Agg canvas, no pyplot state), and writes one
file per format (PNG, plus PDF by default) atomically via :func:`gradsparse.figures_spectra.save_figure`
(which uses :func:`gradsparse.io.atomic_write_with`). ``out`` is a path stem (``figs/x`` ->
``figs/x.png``, ``figs/x.pdf``). Returns the written paths.

- :func:`plot_curves`: ``{label: (steps, values)}`` line plot (one line per label).
- :func:`plot_bands`: ``{label: (steps, [values per seed])}``: mean line with a min-max band.
- :func:`plot_bars`: grouped bars ``{group: {label: [values per seed]}}``: bar = mean, dots = seeds
  (:func:`draw_bars` draws them on a given matplotlib Axes, for figures of several panels).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from gradsparse.figures_spectra import FORMATS, save_figure

__all__ = ["plot_curves", "plot_bands", "plot_bars", "draw_bars"]


def _new_figure(figsize: tuple[float, float] = (6.4, 4.0)) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=120)
    FigureCanvasAgg(fig)
    return fig


def _xy(label: str, pair: Any) -> tuple[np.ndarray, np.ndarray]:
    try:
        x, y = pair
    except (TypeError, ValueError):
        raise ValueError(f"series {label!r} must be a pair (steps, values)") from None
    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64)
    if y.shape[-1:] != x.shape:
        raise ValueError(f"series {label!r}: {x.size} steps but values of shape {y.shape}")
    return x, y


def _finish(ax: Any, xlabel: str, ylabel: str, title: str | None, logy: bool) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def plot_curves(curves: Mapping[str, Any], out: str | os.PathLike, *, xlabel: str = "step", ylabel: str = "",
                title: str | None = None, logy: bool = False, formats: Sequence[str] = FORMATS) -> list[Path]:
    """One line per ``{label: (steps, values)}`` entry (NaN values are not drawn)."""
    if not isinstance(curves, Mapping) or not curves:
        raise ValueError("plot_curves needs a non-empty dict {label: (steps, values)}")
    fig = _new_figure()
    ax = fig.add_subplot(1, 1, 1)
    for label, pair in curves.items():
        x, y = _xy(str(label), pair)
        if y.ndim != 1:
            raise ValueError(f"series {label!r}: values must be 1-D, got shape {y.shape}")
        ax.plot(x, y, label=str(label), lw=1.4)
    _finish(ax, xlabel, ylabel, title, logy)
    return save_figure(fig, out, formats)


def plot_bands(bands: Mapping[str, Any], out: str | os.PathLike, *, xlabel: str = "step", ylabel: str = "",
               title: str | None = None, logy: bool = False, formats: Sequence[str] = FORMATS) -> list[Path]:
    """``{label: (steps, values (seeds, steps))}``: mean over seeds as a line, min-max over seeds as a band."""
    if not isinstance(bands, Mapping) or not bands:
        raise ValueError("plot_bands needs a non-empty dict {label: (steps, per-seed values)}")
    fig = _new_figure()
    ax = fig.add_subplot(1, 1, 1)
    for i, (label, pair) in enumerate(bands.items()):
        x, y = _xy(str(label), pair)
        y = np.atleast_2d(y)
        color = f"C{i % 10}"
        ax.plot(x, np.nanmean(y, 0), color=color, lw=1.6, label=f"{label} (mean of {y.shape[0]})")
        if y.shape[0] > 1:
            ax.fill_between(x, np.nanmin(y, 0), np.nanmax(y, 0), color=color, alpha=0.2, lw=0)
    _finish(ax, xlabel, ylabel, title, logy)
    return save_figure(fig, out, formats)


def _check_groups(groups: Any, what: str) -> list[str]:
    if not isinstance(groups, Mapping) or not groups:
        raise ValueError(f"{what} needs a non-empty dict {{group: {{label: [values]}}}}")
    labels = list(next(iter(groups.values())).keys())
    if not labels:
        raise ValueError(f"{what}: groups need at least one label")
    for g, d in groups.items():
        if list(d.keys()) != labels:
            raise ValueError(f"{what}: group {g!r} has labels {list(d.keys())}, expected {labels}")
    return labels


def draw_bars(ax: Any, groups: Mapping[str, Mapping[str, Sequence[float]]], *, ylabel: str = "",
              title: str | None = None, fontsize: float = 7) -> None:
    """Grouped bars on ``ax`` (linear y): ``{group: {label: [per-seed values]}}``; bar height = mean
    over seeds, black dots = the seeds. Every group must have the same labels, in the same order."""
    labels = _check_groups(groups, "draw_bars")
    width = 0.8 / len(labels)
    xs = np.arange(len(groups))
    for j, label in enumerate(labels):
        means, pts = [], []
        for g in groups:
            v = np.asarray(groups[g][label], dtype=np.float64).ravel()
            means.append(float(np.nanmean(v)) if v.size else math.nan)
            pts.append(v)
        pos = xs - 0.4 + width * (j + 0.5)
        ax.bar(pos, means, width=width * 0.92, color=f"C{j % 10}", alpha=0.75, label=str(label))
        for p, v in zip(pos, pts):
            ax.plot(np.full(v.size, p), v, "k.", ms=4)
    ax.set_xticks(xs)
    ax.set_xticklabels([str(g) for g in groups], fontsize=fontsize + 1)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=fontsize + 3)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=fontsize)


def plot_bars(groups: Mapping[str, Mapping[str, Sequence[float]]], out: str | os.PathLike, *, ylabel: str = "",
              title: str | None = None, logy: bool = False, formats: Sequence[str] = FORMATS) -> list[Path]:
    """Grouped bars: ``{group: {label: [per-seed values]}}``; bar height = mean, dots = seeds
    (:func:`draw_bars`). Every group must have the same labels (in the same order); groups sit along
    the x axis."""
    labels = _check_groups(groups, "plot_bars")
    fig = _new_figure((max(6.4, 1.2 * len(groups) * max(1, len(labels)) * 0.6 + 2), 4.0))
    ax = fig.add_subplot(1, 1, 1)
    draw_bars(ax, groups, ylabel=ylabel, title=title)
    if logy:
        ax.set_yscale("log")
    return save_figure(fig, out, formats)
