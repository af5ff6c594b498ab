"""Singular values of every 2-D weight of a model, one table row per matrix (SPEC 3.1).

For a weight ``W`` of shape ``(rows, cols)`` (equinox ``Dense.weight`` is ``(out, in)``, so the key
matrix K is ``n x d`` and ``W W^T`` is ``K K^T``, ``n x n``), with singular values
``s_1 >= ... >= s_k``, ``k = min(rows, cols)``:

* non-zero singular values: ``s > rtol * s_max``. Default ``rtol = max(rows, cols) * eps(dtype)``
  with ``eps`` of the weight's own floating dtype (float32: 1.19e-7, bfloat16: 7.8e-3, float64:
  2.2e-16; numpy's ``matrix_rank`` convention): singular values below it are indistinguishable
  from the rounding of the stored weights.
* ``rank``: number of non-zero singular values; ``s_min_nonzero``: the smallest of them.
* ``ratio = s_max / s_min_nonzero`` (singular ratio; ``eig_ratio = ratio^2`` for ``W W^T``).
* ``mass80_ratio = 10^w``, ``w`` the width of the narrowest interval of ``log10`` eigenvalues of
  ``W W^T`` (``lambda = s^2``) holding ``ceil(0.8 m)`` of its ``m = rank`` non-zero eigenvalues.
* ``near_zero_rate``: fraction of the ``rows`` eigenvalues of ``W W^T`` (``rows x rows``) that are
  ~0 (``lambda <= rtol^2 lambda_max``, i.e. the singular value is not non-zero, plus the
  ``rows - k`` structural zeros): ``(rows - rank) / rows``; it is ``>= 1 - min(rows, cols)/rows``.
* ``stable_rank = ||W||_F^2 / s_max^2``, ``frobenius = ||W||_F``.
* With ``fit=True``, a Marchenko-Pastur fit (:func:`gradsparse.rmt.fit_mp`) of the ``k``
  eigenvalues of ``W W^T / N`` (``N = max(rows, cols)``, smaller Gram, so the MP law has
  ``c = k/N <= 1`` for an iid matrix): ``num_spikes`` (TW1 test at level ``alpha``), ``sigma_mp``
  (sqrt of the fitted variance: the entry std of an iid matrix), ``bulk_max`` (upper MP edge, in
  units of eigenvalues of ``W W^T / N``, compare ``s_max^2 / N``), ``ks`` (KS distance of the bulk),
  ``mp_c`` (fitted aspect ratio, ``<= 1`` unless zero eigenvalues are present), ``fit_ok`` (fit
  converged and ``ks <= ks_threshold``; when false, the MP columns do not describe the spectrum),
  ``num_spikes_margin`` (WeightWatcher's margin rule on the same fit, beside the TW count),
  ``bulk_min`` and ``mp_softrank = bulk_max / (s_max^2 / N)``.
  **num_spikes is null where fit_ok is false** (the MP law does not describe the bulk, so
  eigenvalues beyond its edge are not spikes of an MP bulk); ``num_spikes_margin`` keeps
  WeightWatcher's margin-rule count on the same fit, and :func:`table_metadata` lists the withheld
  rows with their KS distance.
* Power-law (HT-SR) columns (with ``fit=True``, or ``power_law=True``), WeightWatcher 0.7.7's default
  fit of the ESD tail (:mod:`gradsparse.powerlaw`): eigenvalues ``lambda = s^2`` unscaled, those
  ``<= 1e-5`` dropped; every eigenvalue but the largest tried as ``xmin``; ``alpha = 1 + n / sum
  ln(lambda/xmin)`` (MLE over the ``n`` tail eigenvalues); the ``xmin`` with the smallest KS distance
  wins. ``alpha``, ``xmin`` (units of ``s^2``, as ``lambda_max``), ``pl_ks`` (the KS distance D),
  ``pl_sigma = (alpha - 1)/sqrt(n)`` (standard error), ``num_pl_evals`` (tail size ``n``: eigenvalues
  ``>= xmin``), ``alpha_weighted = alpha log10 lambda_max``, ``log_alpha_norm = log10 sum
  lambda^alpha`` and ``pl_fit_ok`` (at least 8 eigenvalues, a tail of at least 10, ``1.5 <= alpha
  <= 6``; :func:`gradsparse.powerlaw.fit_powerlaw`).
* Correlation traps (``randomize=True``, WeightWatcher's ``randomize=True``): the entries of ``W`` are
  permuted (:func:`shuffle_entries` with the row's jax key ``fold_in(key, crc32(name))``, so a
  matrix gets the same shuffle whatever else is analysed), the ESD of the shuffled matrix (an iid
  matrix with W's entry distribution) is fitted by MP with ``c = M/N`` fixed, and ``num_traps``
  counts its TW spikes (null when ``rand_fit_ok`` is false), ``num_traps_margin`` the margin-rule
  count; ``rand_distance`` is the Jensen-Shannon distance (natural log) between the sorted
  eigenvalues of ``W`` and of the shuffled ``W``, each normalised to sum 1 (WeightWatcher's
  ``jensen_shannon_distance(evals, rand_evals)``).
* WeightWatcher-compatible columns: ``N = max(rows, cols)``, ``M = min``, ``Q = N/M``,
  ``lambda_max = s_max^2``, ``log_norm = log10 ||W||_F^2``, ``log_spectral_norm = log10 s_max^2``
  (unscaled, the same numbers WeightWatcher reports), and ``stable_rank``, ``num_spikes``,
  ``sigma_mp``, ``bulk_max``, ``mp_softrank`` under WeightWatcher's names.

Column names follow WeightWatcher where the concept is the same; the units differ where stated
(:data:`COLUMN_DOCS`, :data:`UNITS`, and the ``metadata`` of ``gradsparse spectrum --json --meta``):
eigenvalues here are those of ``W W^T / N`` (WeightWatcher's are ``N`` times larger, so
``bulk_max_ww = N bulk_max``) and ``sigma_mp`` is an entry standard deviation (WeightWatcher's is for
the ESD rescaled to mean 1: ``sigma_mp_ww = sigma_mp sqrt(N M) / ||W||_F``). Every row also carries
its ``role`` and ``layer`` (:mod:`gradsparse.weights`). :func:`get_summary` gives the mean of each
column over all matrices and per role, :func:`to_dataframe` a pandas DataFrame (optional
dependency), :func:`rows_to_csv` CSV text.

Route: the eigenvalues of the Gram matrix are several times cheaper than any SVD (measured
timings per shape: ``docs/benchmarks.md``, "Spectra"), so the default route is the **Gram
route**: ``np.linalg.eigvalsh`` (LAPACK syevd) of the smaller Gram matrix ``B B^T`` (``B`` = W
or W^T, whichever has fewer rows) formed in float64, then ``s = sqrt(max(lambda, 0))``.
Conditioning caveat: squaring loses precision: eigenvalues carry an absolute error ~ ``k eps64 s_max^2``, so singular values below about ``10 sqrt(k eps64) s_max``
(~7e-6 s_max for k = 2048) are not resolved. For float32/bfloat16 weights the non-zero threshold
``rtol * s_max`` lies far above that floor, so the Gram route is as accurate as an SVD of the
stored weights. When ``rtol`` asks for smaller singular values AND the matrix has singular values
below the floor, ``route="auto"`` falls back to ``scipy.linalg.svdvals`` (gesdd, no U/V) in
float64 for that matrix; the ``route`` column says which one was used. Full SVDs,
``full_matrices=True`` and the gesvd driver are never used (far slower still).

Bad input never stops a table: a matrix with NaN/inf entries, an empty or an all-zero matrix, or a
complex one gives a row whose ``error`` column says what is wrong (numbers NaN). Non-array and
non-2-D leaves are skipped (biases, LayerNorm scales, activation functions); 3-D leaves
``(L, rows, cols)`` (stacked layers) are split into rows named ``name[i]``; leaves with 4 or more
axes are skipped. An input without any 2-D weight raises ``ValueError``.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import sys
import zlib
from dataclasses import dataclass, field, fields
from typing import Any, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg
from tqdm.auto import tqdm

from gradsparse import __version__, checkpoint, powerlaw, rmt, weights


try:  # optional: without it BLAS keeps its own thread count (see _blas_threads)
    from threadpoolctl import ThreadpoolController
except ImportError:  # pragma: no cover - depends on the environment
    ThreadpoolController = None

__all__ = [
    "SpectrumRow",
    "default_rtol",
    "singular_values",
    "mass_ratio",
    "collect_matrices",
    "spectrum_row",
    "analyze",
    "rows_to_dicts",
    "rows_to_json",
    "rows_to_csv",
    "to_dataframe",
    "get_summary",
    "table_metadata",
    "COLUMN_DOCS",
    "format_table",
    "matrix_key",
    "shuffle_entries",
    "jensen_shannon_distance",
    "PL_COLUMNS",
    "TRAP_COLUMNS",
]

ROUTES = ("auto", "gram", "svd")
_EPS64 = float(np.finfo(np.float64).eps)


@dataclass
class SpectrumRow:
    """One matrix of the table. Numbers are NaN (MP columns: NaN unless fitted) when ``error`` is set.

    ``sv`` (descending singular values, with ``keep_sv=True``), ``mp_fit`` (the full
    :class:`gradsparse.rmt.MPFit`, with ``fit=True``), ``pl_fit`` (the
    :class:`gradsparse.powerlaw.PowerLawFit`) and ``rand_fit`` (the MP fit of the shuffled matrix,
    with ``randomize=True``) are kept for figures and left out of the table and JSON (``sv`` is
    written with ``include_sv=True``).
    """

    name: str
    shape: tuple[int, int]
    dtype: str
    role: str = "other"
    layer: int | None = None
    route: str = ""
    rtol: float = math.nan
    rank: int = 0
    s_max: float = math.nan
    s_min_nonzero: float = math.nan
    ratio: float = math.nan
    eig_ratio: float = math.nan
    mass80_ratio: float = math.nan
    near_zero_rate: float = math.nan
    stable_rank: float = math.nan
    frobenius: float = math.nan
    num_spikes: float = math.nan
    sigma_mp: float = math.nan
    bulk_max: float = math.nan
    ks: float = math.nan
    mp_c: float = math.nan
    fit_ok: bool | None = None
    ks_threshold: float = math.nan
    num_spikes_margin: float = math.nan
    bulk_min: float = math.nan
    mp_softrank: float = math.nan
    N: int = 0
    M: int = 0
    Q: float = math.nan
    lambda_max: float = math.nan
    log_norm: float = math.nan
    log_spectral_norm: float = math.nan
    alpha: float = math.nan
    alpha_weighted: float = math.nan
    log_alpha_norm: float = math.nan
    xmin: float = math.nan
    pl_ks: float = math.nan
    pl_sigma: float = math.nan
    num_pl_evals: float = math.nan
    pl_fit_ok: bool | None = None
    rand_distance: float = math.nan
    num_traps: float = math.nan
    num_traps_margin: float = math.nan
    rand_fit_ok: bool | None = None
    error: str | None = None
    sv: np.ndarray | None = field(default=None, repr=False)
    mp_fit: rmt.MPFit | None = field(default=None, repr=False)
    pl_fit: powerlaw.PowerLawFit | None = field(default=None, repr=False)
    rand_fit: rmt.MPFit | None = field(default=None, repr=False)

    def to_dict(self, include_sv: bool = False) -> dict[str, Any]:
        """Plain JSON-ready dict; NaN/inf become None; ``sv`` only with ``include_sv``."""
        out: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name in ("mp_fit", "pl_fit", "rand_fit"):
                continue
            if f.name == "sv":
                if include_sv:
                    out["sv"] = None if v is None else [float(x) for x in v]
                continue
            if f.name == "shape":
                v = list(v)
            elif isinstance(v, (float, np.floating)):
                v = float(v) if math.isfinite(v) else None
            elif isinstance(v, np.integer):
                v = int(v)
            out[f.name] = v
        for k in ("num_spikes", "num_spikes_margin", "num_pl_evals", "num_traps", "num_traps_margin"):
            if out.get(k) is not None:
                out[k] = int(out[k])
        for k in ("fit_ok", "pl_fit_ok", "rand_fit_ok"):
            if out.get(k) is not None:
                out[k] = bool(out[k])
        return out


# --------------------------------------------------------------------------------------------
# numerics
# --------------------------------------------------------------------------------------------


def default_rtol(shape: Sequence[int], dtype: Any) -> float:
    """``max(shape) * eps(dtype)``: eps of the floating dtype (bfloat16/float8 via ml_dtypes), float64's
    eps for integer or unknown dtypes."""
    if len(shape) == 0 or min(int(d) for d in shape) < 0:
        raise ValueError(f"shape must be a non-empty sequence of sizes >= 0, got {shape!r}")
    eps = _EPS64
    try:
        dt = np.dtype(dtype)
        if np.issubdtype(dt, np.floating):
            eps = float(np.finfo(dt).eps)
        else:
            import ml_dtypes

            eps = float(ml_dtypes.finfo(dt).eps)
    except (TypeError, ValueError, ImportError):
        pass
    return float(max(int(d) for d in shape)) * eps


#: Gram sizes up to this run LAPACK/BLAS on one thread (when threadpoolctl is installed).
SINGLE_THREAD_MAX = 512
_controller: list[Any] = []


def _blas_threads(k: int) -> Any:
    """One BLAS thread for a ``k x k`` Gram with ``k <= SINGLE_THREAD_MAX``, else no change.

    Measured on this 2-core machine with other work running (load average ~7): the 40 matrices of
    all-MiniLM-L6-v2 (Grams of 2..384) took 5.8-14 s with OpenBLAS's default 2 threads and
    1.0-1.5 s on one (idle threads spin while the other core is busy); for Grams this small a
    second thread gains nothing measurable on an idle machine either. Larger Grams keep BLAS's
    threads. Needs threadpoolctl (no effect without it).
    """
    if ThreadpoolController is None or k > SINGLE_THREAD_MAX:
        return contextlib.nullcontext()
    if not _controller:
        _controller.append(ThreadpoolController())
    return _controller[0].limit(limits=1, user_api="blas")


def _gram_eigs(w64: np.ndarray) -> np.ndarray:
    """Eigenvalues (ascending) of the smaller Gram matrix of a float64 matrix."""
    b = w64 if w64.shape[0] <= w64.shape[1] else w64.T
    with _blas_threads(b.shape[0]):
        return np.linalg.eigvalsh(b @ b.T)


def singular_values(w: Any, route: str = "auto", rtol: float | None = None) -> tuple[np.ndarray, str]:
    """Singular values of a 2-D array, descending float64, and the route used (``"gram"``/``"svd"``).

    ``route="gram"``: eigvalsh of the smaller Gram in float64; ``"svd"``: ``scipy.linalg.svdvals``
    (gesdd) in float64; ``"auto"``: Gram, falling back to svdvals when singular values below
    ``10 sqrt(k eps64) s_max`` exist and ``rtol * s_max`` is below that floor (see module docstring).
    Raises ValueError for non-2-D, empty or non-finite input.
    """
    if route not in ROUTES:
        raise ValueError(f"route must be one of {ROUTES}, got {route!r}")
    a = np.asarray(w)
    if a.ndim != 2:
        raise ValueError(f"singular_values needs a 2-D array, got shape {a.shape}")
    if a.size == 0:
        raise ValueError(f"singular_values needs a non-empty matrix, got shape {a.shape}")
    if np.iscomplexobj(a):
        raise ValueError("complex matrices are not supported")
    a64 = a.astype(np.float64, copy=False)
    if not np.all(np.isfinite(a64)):
        raise ValueError("matrix has NaN or inf entries")
    if rtol is None:
        rtol = default_rtol(a.shape, a.dtype)
    return _sv(a64, route, float(rtol))


def _sv(a64: np.ndarray, route: str, rtol: float) -> tuple[np.ndarray, str]:
    """Unchecked core of :func:`singular_values` (finite float64 2-D input)."""
    if route == "svd":
        with _blas_threads(min(a64.shape)):
            return np.sort(scipy.linalg.svdvals(a64, check_finite=False))[::-1], "svd"
    lam = _gram_eigs(a64)
    s = np.sqrt(np.maximum(lam, 0.0))[::-1]
    if route == "auto" and s[0] > 0:
        floor = 10.0 * math.sqrt(min(a64.shape) * _EPS64) * s[0]
        if rtol * s[0] < floor and s[-1] < floor:
            with _blas_threads(min(a64.shape)):
                return np.sort(scipy.linalg.svdvals(a64, check_finite=False))[::-1], "svd"
    return s, "gram"


def mass_ratio(eigs: Any, mass: float = 0.8) -> float:
    """``10^w``, ``w`` the width of the narrowest interval of ``log10(eigs)`` holding ``ceil(mass m)``
    of the ``m`` given (positive) eigenvalues. 1.0 for a single eigenvalue."""
    if not (0.0 < float(mass) <= 1.0):
        raise ValueError(f"mass must lie in (0, 1], got {mass}")
    lam = np.asarray(eigs, dtype=np.float64).ravel()
    if lam.size == 0:
        raise ValueError("mass_ratio needs at least one eigenvalue")
    if not np.all(np.isfinite(lam)) or np.any(lam <= 0):
        raise ValueError("mass_ratio needs positive finite eigenvalues (drop the zero ones first)")
    logs = np.sort(np.log10(lam))
    m = logs.size
    k = max(1, math.ceil(float(mass) * m - 1e-12))
    widths = logs[k - 1 :] - logs[: m - k + 1]
    return float(10.0 ** np.min(widths))


# --------------------------------------------------------------------------------------------
# collecting matrices from a pytree
# --------------------------------------------------------------------------------------------


def _is_array(x: Any) -> bool:
    return isinstance(x, (np.ndarray, jax.Array))


def collect_matrices(tree: Any) -> tuple[list[tuple[str, Any]], list[tuple[str, str]]]:
    """Named 2-D arrays of a pytree and the skipped leaves.

    Names are ``jax.tree_util.keystr(path, simple=True, separator=".")`` (``layers.0.weight``,
    ``fc1``; a bare array is ``weight``). 3-D leaves ``(L, r, c)`` give ``name[0] ... name[L-1]``.
    Returns ``(matrices, skipped)`` with ``skipped = [(name, reason), ...]``; raises ValueError when
    the input holds no array at all.
    """
    try:
        leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    except Exception as e:  # pragma: no cover - jax accepts any object as a leaf
        raise ValueError(f"input is not a pytree of arrays: {e}") from None
    mats: list[tuple[str, Any]] = []
    skipped: list[tuple[str, str]] = []
    n_arrays = 0
    for path, leaf in leaves:
        name = jax.tree_util.keystr(path, simple=True, separator=".") or "weight"
        if not _is_array(leaf):
            skipped.append((name, f"not an array ({type(leaf).__name__})"))
            continue
        n_arrays += 1
        if leaf.ndim == 2:
            mats.append((name, leaf))
        elif leaf.ndim == 3:
            for i in range(leaf.shape[0]):
                mats.append((f"{name}[{i}]", leaf[i]))
        else:
            skipped.append((name, f"{leaf.ndim}-D array of shape {tuple(leaf.shape)}"))
    if n_arrays == 0:
        raise ValueError(
            "input holds no arrays: expected an equinox model, a dict/list of arrays or an array, "
            f"got {type(tree).__name__}"
        )
    return mats, skipped


# --------------------------------------------------------------------------------------------
# rows
# --------------------------------------------------------------------------------------------


def spectrum_row(
    name: str,
    w: Any,
    *,
    rtol: float | None = None,
    route: str = "auto",
    fit: bool = False,
    alpha: float = 0.05,
    keep_sv: bool = False,
    ks_max: float | None = None,
    role: str = "other",
    layer: int | None = None,
    power_law: bool | None = None,
    randomize: bool = False,
    key: Any = None,
) -> SpectrumRow:
    """Table row of one 2-D matrix (see the module docstring for every column).

    ``ks_max``: KS bound of ``fit_ok`` (default :func:`gradsparse.rmt.mp_ks_threshold` of the bulk
    size); ``role``/``layer``: labels copied into the row (see :mod:`gradsparse.weights`).
    ``power_law``: the power-law columns (default: when ``fit``); ``randomize``: the correlation-trap
    columns, with the entries shuffled by ``key`` (a ``jax.random`` key or an int seed; default 0)
    folded with ``crc32(name)``.
    Problems of the matrix itself (NaN/inf, empty, all zero, complex) give a row with ``error`` set;
    wrong arguments (non-2-D ``w``, bad ``rtol``/``route``/``alpha``) raise ValueError.
    """
    if not isinstance(name, str):
        raise ValueError(f"name must be a str, got {type(name).__name__}")
    if route not in ROUTES:
        raise ValueError(f"route must be one of {ROUTES}, got {route!r}")
    if rtol is not None and not (isinstance(rtol, (int, float)) and 0.0 <= rtol < 1.0):
        raise ValueError(f"rtol must be a number in [0, 1) or None, got {rtol!r}")
    if not (0.0 < float(alpha) < 1.0):
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    if not _is_array(w):
        w = np.asarray(w)
    if w.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D matrix, got shape {tuple(w.shape)}")
    if ks_max is not None and not (isinstance(ks_max, (int, float)) and 0.0 < ks_max <= 1.0):
        raise ValueError(f"ks_max: must be a number in (0, 1] or None, got {ks_max!r}")
    base_key = _base_key(key) if randomize else None
    do_pl = bool(fit) if power_law is None else bool(power_law)
    shape = (int(w.shape[0]), int(w.shape[1]))
    row = SpectrumRow(name=name, shape=shape, dtype=str(w.dtype), role=str(role), layer=layer)
    row.N, row.M = max(shape), min(shape)
    row.Q = row.N / row.M if row.M > 0 else math.nan
    a = np.asarray(w)
    if a.size == 0:
        row.error = "empty matrix"
        return row
    if np.iscomplexobj(a):
        row.error = "complex matrix (not supported)"
        return row
    try:
        a64 = a.astype(np.float64, copy=False)
    except (TypeError, ValueError):
        row.error = f"non-numeric dtype {a.dtype}"
        return row
    finite = np.isfinite(a64)
    if not finite.all():
        bad = int(a64.size - finite.sum())
        row.error = f"{bad} non-finite entries (NaN/inf)"
        return row
    rt = default_rtol(shape, a.dtype) if rtol is None else float(rtol)
    row.rtol = rt
    s, used = _sv(a64, route, rt)
    row.route = used
    smax = float(s[0])
    if smax <= 0.0:
        row.error = "all-zero matrix"
        row.rank, row.s_max, row.frobenius = 0, 0.0, 0.0
        row.near_zero_rate = 1.0
        return row
    nz = s[s > rt * smax]
    rank = int(nz.size)
    fro2 = float(np.sum(s * s))
    row.rank = rank
    row.s_max = smax
    row.s_min_nonzero = float(nz[-1])
    row.ratio = smax / float(nz[-1])
    row.eig_ratio = row.ratio**2
    row.mass80_ratio = mass_ratio(nz * nz, 0.8)
    row.near_zero_rate = (shape[0] - rank) / shape[0]
    row.stable_rank = fro2 / (smax * smax)
    row.frobenius = math.sqrt(fro2)
    row.lambda_max = smax * smax
    row.log_norm = math.log10(fro2)
    row.log_spectral_norm = math.log10(smax * smax)
    if keep_sv:
        row.sv = s
    if fit:
        n_big = max(shape)
        lam = np.where(s > rt * smax, s * s, 0.0) / n_big
        if lam.size >= 4:
            try:
                f = rmt.fit_mp(lam, alpha=alpha, ks_max=ks_max)
            except ValueError as e:  # e.g. fewer than 4 non-zero eigenvalues: leave MP columns NaN
                row.error = f"MP fit: {e}"
            else:
                # a failed fit has no bulk to be a spike of: num_spikes null (table_metadata says why)
                row.num_spikes = f.num_spikes if f.fit_ok else math.nan
                row.num_spikes_margin = f.num_spikes_margin
                row.sigma_mp = f.sigma_mp
                row.bulk_max = f.bulk_max
                row.bulk_min = f.bulk_min
                row.mp_softrank = f.bulk_max / (smax * smax / n_big)
                row.ks = f.ks
                row.ks_threshold = f.ks_threshold
                row.fit_ok = f.fit_ok
                row.mp_c = f.c
                row.mp_fit = f
    lam_ww = s * s  # WeightWatcher's eigenvalues: s^2, unscaled
    if do_pl:
        pf = powerlaw.fit_powerlaw(lam_ww)
        row.pl_fit = pf
        row.pl_fit_ok = pf.fit_ok
        if math.isfinite(pf.alpha):
            row.alpha = pf.alpha
            row.xmin = pf.xmin
            row.pl_ks = pf.D
            row.pl_sigma = pf.sigma
            row.num_pl_evals = pf.n_tail
            row.alpha_weighted = powerlaw.alpha_weighted(pf.alpha, smax * smax)
            row.log_alpha_norm = powerlaw.log_alpha_norm(lam_ww, pf.alpha)
    if base_key is not None:
        _randomized(row, a64, lam_ww, base_key, name, route, rt, alpha, ks_max)
    return row


def _base_key(key: Any) -> Any:
    """A ``jax.random`` key from ``key`` (None: seed 0; an int: that seed; a key: itself)."""
    if key is None:
        return jax.random.key(0)
    if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
        return jax.random.key(int(key))
    if isinstance(key, jax.Array) and (jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
                                       or (key.dtype == np.uint32 and key.shape == (2,))):
        return key
    raise ValueError(f"key: must be a jax.random key, an int seed or None, got {type(key).__name__}")


def matrix_key(key: Any, name: str) -> Any:
    """The key that shuffles matrix ``name``: ``fold_in(key, crc32(name) mod 2^31)``."""
    return jax.random.fold_in(_base_key(key), zlib.crc32(name.encode("utf-8")) & 0x7FFFFFFF)


def shuffle_entries(w: Any, key: Any) -> np.ndarray:
    """The entries of ``w`` (as float64) randomly permuted, same shape: 128 bits drawn from ``key``
    (``jax.random.bits``) seed numpy's PCG64, whose ``permutation`` shuffles the flattened entries.

    Reproducible: the same key gives the same shuffle on every backend. Not
    ``jax.random.permutation`` itself: on CPU it took 6 s for 4M entries and 74 ms for 384 x 384
    (numpy: ~0.1 s and ~2 ms), which would dominate the analysis.
    """
    a = np.asarray(w, dtype=np.float64)
    seed = [int(v) for v in np.asarray(jax.random.bits(_base_key(key), (4,), dtype=jnp.uint32))]
    idx = np.random.Generator(np.random.PCG64(seed)).permutation(a.size)
    return a.ravel()[idx].reshape(a.shape)


def jensen_shannon_distance(p: Any, q: Any) -> float:
    """``sqrt((KL(p||m) + KL(q||m)) / 2)``, ``m = (p + q)/2``, natural log, ``p`` and ``q`` normalised
    to sum 1 (WeightWatcher's ``jensen_shannon_distance``, scipy.stats.entropy semantics)."""
    p = np.asarray(p, dtype=np.float64).ravel()
    q = np.asarray(q, dtype=np.float64).ravel()
    if p.shape != q.shape or p.size == 0 or np.any(p < 0) or np.any(q < 0) or p.sum() <= 0 or q.sum() <= 0:
        raise ValueError("p, q: need two equally long non-negative vectors with positive sums")
    p, q = p / p.sum(), q / q.sum()
    m = 0.5 * (p + q)
    from scipy.special import rel_entr

    div = 0.5 * (float(np.sum(rel_entr(p, m))) + float(np.sum(rel_entr(q, m))))
    return math.sqrt(max(div, 0.0))


def _randomized(row: SpectrumRow, a64: np.ndarray, lam_ww: np.ndarray, key: Any, name: str, route: str, rt: float,
                alpha: float, ks_max: float | None) -> None:
    """Fill the correlation-trap columns of ``row`` from the shuffled matrix."""
    shuffled = shuffle_entries(a64, matrix_key(key, name))
    s_r, _ = _sv(shuffled, "svd" if route == "svd" else "gram", rt)
    lam_r = s_r * s_r
    row.rand_distance = jensen_shannon_distance(np.sort(lam_ww), np.sort(lam_r))
    n_big, k = max(a64.shape), min(a64.shape)
    if k < 4:
        return
    smax_r = float(s_r[0])
    lam_fit = np.where(s_r > rt * smax_r, lam_r, 0.0) / n_big
    try:
        f = rmt.fit_mp(lam_fit, c=k / n_big, alpha=alpha, ks_max=ks_max)
    except ValueError:
        return
    row.rand_fit = f
    row.rand_fit_ok = f.fit_ok
    row.num_traps = f.num_spikes if f.fit_ok else math.nan
    row.num_traps_margin = f.num_spikes_margin


def weight_set(path: str | os.PathLike, select: str | None = None, *, roles: Mapping[str, str] | None = None,
               layout: str = "auto") -> "weights.WeightSet":
    """:func:`gradsparse.weights.weight_matrices` for every format, gradsparse run folders and
    checkpoints included (their model is rebuilt by :func:`gradsparse.checkpoint.load_model`; 3-D
    stacked leaves are split per layer)."""
    if weights.detect_format(path) != "gradsparse":
        return weights.weight_matrices(path, select, roles=roles, layout=layout)
    model, header = checkpoint.load_model(path)
    wset = weights.from_tensors(model, select, roles=roles, layout=layout)
    step = header.get("step") if isinstance(header, dict) else None
    return wset._replace(conventions={**wset.conventions,
                                      "format": "gradsparse" if step is None else f"gradsparse (step {step})"})


def _is_nnx(tree: Any) -> bool:
    """An NNX model or state (only possible when flax.nnx is already imported)."""
    nnx = sys.modules.get("flax.nnx")
    return nnx is not None and isinstance(tree, (nnx.Module, nnx.State))


def analyze(
    source: Any,
    *,
    rtol: float | None = None,
    route: str = "auto",
    fit: bool = False,
    alpha: float = 0.05,
    keep_sv: bool = False,
    select: str | None = None,
    roles: Mapping[str, str] | None = None,
    layout: str = "auto",
    ks_max: float | None = None,
    progress: bool | None = None,
    power_law: bool | None = None,
    randomize: bool = False,
    key: Any = None,
) -> list[SpectrumRow]:
    """One :class:`SpectrumRow` per 2-D weight of ``source``, with its role and layer index.

    ``source``: a path (anything :func:`gradsparse.weights.weight_matrices` reads: run folder,
    checkpoint, .npz, .safetensors, sharded index, Hugging Face folder, PyTorch state dict), a
    :class:`gradsparse.weights.WeightSet`, or a pytree of arrays (equinox model, dict/list of arrays,
    an array; visited in pytree order, 3-D leaves split per layer, names as
    :func:`collect_matrices` gives them). ``select``, ``roles``, ``layout``: see
    :mod:`gradsparse.weights`; the other arguments (``power_law``, ``randomize`` and ``key``
    included): :func:`spectrum_row`. ``progress``: a tqdm bar
    on stderr (None: for 8 or more matrices when stderr is a terminal). A matrix that cannot be
    read gives a row with ``error`` set. Raises ValueError when the input holds no 2-D weight
    (empty dict, only biases, not a pytree of arrays). A Flax NNX model or ``nnx.State`` gives rows
    named by variable path (:func:`gradsparse.nnx.named_matrices`).
    """
    if isinstance(source, weights.WeightSet):
        wset = source
    elif isinstance(source, (str, os.PathLike)):
        if not os.path.exists(source):
            raise ValueError(f"source: no file or folder at {source!s}; allowed: a path to model weights, "
                             "a weights.WeightSet or a pytree of arrays")
        wset = weight_set(source, select, roles=roles, layout=layout)
    elif _is_nnx(source):
        from gradsparse.nnx import named_matrices  # here: flax is optional, and only NNX input needs it

        wset = weights.from_tensors(named_matrices(source), select, roles=roles, layout=layout)
    else:
        wset = weights.from_tensors(source, select, roles=roles, layout=layout)
    if randomize:
        key = _base_key(key)  # checked once, before any matrix is read
    mats, skipped = wset.matrices, wset.skipped
    if not mats:
        what = ", ".join(f"{n} ({r})" for n, r in skipped[:5]) or "nothing"
        raise ValueError(f"no 2-D weights found (skipped: {what})")
    disable = (None if len(mats) >= 8 else True) if progress is None else not progress
    rows = []
    for m in tqdm(mats, desc="spectra", unit="matrix", disable=disable, leave=False):
        try:
            w = m.array
        except ValueError as e:
            rows.append(SpectrumRow(name=m.name, shape=m.shape, dtype=m.dtype, role=m.role, layer=m.layer,
                                    error=f"cannot read: {e}"))
            continue
        rows.append(spectrum_row(m.name, w, rtol=rtol, route=route, fit=fit, alpha=alpha, keep_sv=keep_sv,
                                 ks_max=ks_max, role=m.role, layer=m.layer, power_law=power_law,
                                 randomize=randomize, key=key))
    return rows


# --------------------------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------------------------


COLUMN_DOCS: dict[str, str] = {
    "name": "tensor name (name[q]/[k]/[v]: a third of a fused q/k/v weight; name[i]: layer i of a stacked array)",
    "shape": "(rows, cols) = (out, in) after the layout conventions (see metadata.conventions)",
    "role": "key (first MLP matrix), value (second), attn_q/k/v/o, attn_qkv (fused), embedding, other",
    "layer": "layer index from the name (first all-digit component), null when there is none",
    "rtol": "non-zero singular values are s > rtol * s_max",
    "rank": "number of non-zero singular values (WeightWatcher: matrix_rank)",
    "s_max": "largest singular value of W (WeightWatcher: sv_max)",
    "s_min_nonzero": "smallest non-zero singular value",
    "ratio": "s_max / s_min_nonzero (singular ratio)",
    "eig_ratio": "ratio^2: the eigen ratio of W W^T over its non-zero eigenvalues",
    "mass80_ratio": "10^w, w the narrowest log10 window holding 80% of the non-zero eigenvalues of W W^T",
    "near_zero_rate": "fraction of the rows eigenvalues of W W^T (rows x rows) that are ~0: (rows - rank) / rows",
    "stable_rank": "||W||_F^2 / s_max^2, unit-free (WeightWatcher: stable_rank, the same number)",
    "frobenius": "||W||_F",
    "lambda_max": "s_max^2: the largest eigenvalue of W W^T, unscaled (WeightWatcher: lambda_max, same units)",
    "log_norm": "log10 ||W||_F^2 (WeightWatcher: log_norm)",
    "log_spectral_norm": "log10 s_max^2 (WeightWatcher: log_spectral_norm)",
    "N": "max(rows, cols) (WeightWatcher: N)",
    "M": "min(rows, cols) (WeightWatcher: M)",
    "Q": "N / M (WeightWatcher: Q; the MP aspect ratio of the shape is c = 1/Q = M/N)",
    "num_spikes": "eigenvalues above the MP bulk by a " + rmt.SPIKE_METHOD + "; null where fit_ok is false "
                  "(the MP law does not describe the bulk; metadata.num_spikes_withheld lists those rows)",
    "num_spikes_margin": "the same fit, counted by the " + rmt.MARGIN_METHOD + " (given whether or not fit_ok)",
    "sigma_mp": "sqrt of the fitted MP variance in units of W W^T / N: the entry standard deviation of an iid "
                "matrix with this bulk. WeightWatcher's sigma_mp is for the ESD rescaled to mean 1: "
                "sigma_mp_ww = sigma_mp * sqrt(N M) / frobenius",
    "bulk_max": "upper MP edge s2 (1 + sqrt c)^2 in units of eigenvalues of W W^T / N (compare s_max^2 / N); "
                "WeightWatcher's bulk_max is unscaled: bulk_max_ww = N * bulk_max",
    "bulk_min": "lower MP edge s2 (1 - sqrt c)^2, units as bulk_max",
    "mp_softrank": "bulk_max / (s_max^2 / N), unit-free (WeightWatcher: mp_softrank)",
    "ks": "Kolmogorov-Smirnov distance of the bulk (spikes removed) to the fitted MP law",
    "ks_threshold": "KS bound of fit_ok: max(0.05, 5 / bulk size) unless given (rmt.mp_ks_threshold)",
    "fit_ok": "MP fit converged and ks <= ks_threshold; when false the MP columns do not describe the spectrum",
    "mp_c": "fitted MP aspect ratio c; c <= 1 unless zero eigenvalues are present, then c <= 1/(1 - zero fraction)",
    "route": "gram (eigvalsh of the smaller float64 Gram) or svd (scipy gesdd svdvals)",
    "alpha": "power-law exponent of the ESD tail, p(lambda) ~ lambda^-alpha for lambda >= xmin, maximum likelihood "
             "(WeightWatcher: alpha, the same fit); unit-free",
    "alpha_weighted": "alpha * log10 lambda_max, lambda_max = s_max^2 unscaled (WeightWatcher: alpha_weighted)",
    "log_alpha_norm": "log10 sum_i lambda_i^alpha over all eigenvalues s_i^2, unscaled (WeightWatcher: log_alpha_norm)",
    "xmin": "start of the power-law tail, an eigenvalue s^2 of W as stored, unscaled (WeightWatcher: xmin, same "
            "units; N times the units of the MP columns)",
    "pl_ks": "KS distance D between the tail (eigenvalues >= xmin) and the fitted power law (WeightWatcher: D)",
    "pl_sigma": "standard error of alpha: (alpha - 1) / sqrt(num_pl_evals) (WeightWatcher: sigma)",
    "num_pl_evals": "tail size: eigenvalues >= xmin (WeightWatcher: num_pl_spikes)",
    "pl_fit_ok": "power-law fit usable: >= 8 eigenvalues above 1e-5, a tail of >= 10, 1.5 <= alpha <= 6 "
                 "(gradsparse's rule; WeightWatcher reports every fit and warns outside [2, 6])",
    "rand_distance": "Jensen-Shannon distance between the sorted eigenvalues of W and of W with its entries shuffled, "
                     "each normalised to sum 1 (WeightWatcher: rand_distance); 0 = no structure beyond the entries",
    "num_traps": "correlation traps: TW spikes of the shuffled W's ESD above its MP fit (c = M/N fixed); null where "
                 "rand_fit_ok is false (WeightWatcher: num_traps, counted by its margin rule)",
    "num_traps_margin": "the shuffled W's spikes by the " + rmt.MARGIN_METHOD,
    "rand_fit_ok": "the MP fit of the shuffled W's ESD passes its KS bound (as fit_ok)",
    "error": "why a matrix has no numbers (NaN/inf entries, all zero, unreadable, ...)",
}

UNITS = {
    "eigenvalues": "eigenvalues of W W^T / N with W as (out, in) and N = max(rows, cols), computed from the "
                   "smaller Gram (M = min(rows, cols) of them); an iid matrix with entry variance s2 then "
                   "follows MP(c = M/N, s2). WeightWatcher's eigenvalues are the unscaled s^2 = N x these.",
    "sigma": "sigma_mp is an entry standard deviation (the MP scale in units of W W^T / N), not the "
             "WeightWatcher sigma_mp of the mean-1 rescaled ESD",
    "power_law": "alpha, pl_ks, pl_sigma, num_pl_evals are unit-free; xmin and the eigenvalues of the power-law "
                 "fit are s^2 of W as stored (WeightWatcher's units, N times those of the MP columns); "
                 "eigenvalues <= 1e-5 in these units are dropped before the fit, as WeightWatcher does",
}


def table_metadata(
    wset: "weights.WeightSet | None" = None,
    *,
    source: str | None = None,
    fit: bool = True,
    alpha: float = 0.05,
    rtol: float | None = None,
    ks_max: float | None = None,
    rows: Sequence[SpectrumRow] | None = None,
    randomize: bool = False,
    seed: int | None = None,
) -> dict[str, Any]:
    """JSON-ready description of a table: units, column meanings, spike methods, the weight reader's
    conventions and skipped tensors (from ``wset``), and the settings used. With ``rows``:
    ``num_spikes_withheld``, the rows whose MP fit failed (``num_spikes`` null) with the reason."""
    if wset is not None and not isinstance(wset, weights.WeightSet):
        raise ValueError(f"wset: must be a weights.WeightSet or None, got {type(wset).__name__}")
    meta: dict[str, Any] = {
        "gradsparse": __version__,
        "source": source,
        "units": dict(UNITS),
        "columns": dict(COLUMN_DOCS),
        "settings": {
            "fit": bool(fit),
            "alpha": float(alpha),
            "rtol": "max(shape) * eps(dtype)" if rtol is None else float(rtol),
            "ks_max": "max(0.05, 5 / bulk size)" if ks_max is None else float(ks_max),
            "num_spikes": rmt.SPIKE_METHOD,
            "num_spikes_margin": rmt.MARGIN_METHOD,
            "num_spikes_null_when": "fit_ok is false: the MP fit did not converge or its KS distance exceeds "
                                    "ks_threshold, so the fitted edge is not the edge of the bulk and counts "
                                    "beyond it are not spikes; num_spikes_margin is still given",
            "power_law": powerlaw.FIT_METHOD,
            "pl_fit_ok": f"n >= {powerlaw.MIN_EVALS} eigenvalues above {powerlaw.EVALS_THRESH:g}, tail >= "
                         f"{powerlaw.MIN_TAIL}, {powerlaw.ALPHA_RANGE[0]:g} <= alpha <= {powerlaw.ALPHA_RANGE[1]:g}",
            "randomize": bool(randomize),
        },
    }
    if randomize:
        meta["settings"]["traps"] = ("entries permuted by numpy PCG64 seeded from "
                                     "jax.random.bits(fold_in(key(seed), crc32(name))); MP fit of the shuffled ESD with c = M/N; num_traps: TW spikes")
        meta["settings"]["seed"] = seed
    if rows is not None:
        withheld = []
        for r in rows:
            if not isinstance(r, SpectrumRow):
                raise ValueError(f"rows: expected SpectrumRow items, got {type(r).__name__}")
            if r.mp_fit is not None and not r.mp_fit.fit_ok:
                f = r.mp_fit
                why = (f"KS {f.ks:.3g} > threshold {f.ks_threshold:.3g}" if f.ks > f.ks_threshold
                       else "spike removal did not converge")
                withheld.append({"name": r.name, "reason": why, "ks": float(f.ks),
                                 "ks_threshold": float(f.ks_threshold), "converged": bool(f.converged),
                                 "tw_count_not_reported": int(f.num_spikes)})
        meta["num_spikes_withheld"] = withheld
    if wset is not None:
        meta["conventions"] = dict(wset.conventions)
        meta["skipped"] = [{"name": n, "reason": r} for n, r in wset.skipped]
    return meta


def rows_to_dicts(rows: Iterable[SpectrumRow], include_sv: bool = False) -> list[dict[str, Any]]:
    """Rows as JSON-ready dicts (NaN/inf -> None)."""
    out = []
    for r in rows:
        if not isinstance(r, SpectrumRow):
            raise ValueError(f"expected SpectrumRow items, got {type(r).__name__}")
        out.append(r.to_dict(include_sv=include_sv))
    return out


def rows_to_json(rows: Iterable[SpectrumRow], include_sv: bool = False, indent: int | None = 2,
                 metadata: Mapping[str, Any] | None = None) -> str:
    """Rows as a JSON array of objects (strict JSON: NaN/inf written as null); with ``metadata``
    (:func:`table_metadata`) the document ``{"metadata": ..., "summary": ..., "rows": [...]}``."""
    data: Any = rows_to_dicts(rows, include_sv=include_sv)
    if metadata is not None:
        if not isinstance(metadata, Mapping):
            raise ValueError(f"metadata: must be a dict, got {type(metadata).__name__}")
        rows = list(rows)
        data = {"metadata": dict(metadata), "summary": _json_safe(get_summary(rows)), "rows": data}
    return json.dumps(data, indent=indent, allow_nan=False)


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def rows_to_csv(rows: Iterable[SpectrumRow]) -> str:
    """Rows as CSV text (header = the JSON keys; shape as ``RxC``; empty cells for null)."""
    dicts = rows_to_dicts(rows)
    if not dicts:
        raise ValueError("rows_to_csv needs at least one row")
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(dicts[0]), lineterminator="\n")
    writer.writeheader()
    for d in dicts:
        d = dict(d)
        d["shape"] = "x".join(str(v) for v in d["shape"])
        writer.writerow({k: ("" if v is None else v) for k, v in d.items()})
    return buf.getvalue()


def to_dataframe(rows: Iterable[SpectrumRow]) -> Any:
    """Rows as a pandas DataFrame (one row per matrix, columns as in the JSON; needs pandas, an
    optional dependency: ``pip install pandas``). ``sv`` and ``mp_fit`` are left out."""
    try:
        import pandas as pd  # optional dependency, imported only here
    except ImportError:
        raise ImportError("to_dataframe needs pandas: pip install pandas (or gradsparse[pandas])") from None
    return pd.DataFrame(rows_to_dicts(rows))


SUMMARY_COLUMNS = ("stable_rank", "log_norm", "log_spectral_norm", "mp_softrank", "ratio", "mass80_ratio",
                   "near_zero_rate", "num_spikes", "num_spikes_margin", "sigma_mp", "ks", "mp_c", "fit_ok",
                   "alpha", "alpha_weighted", "log_alpha_norm", "pl_ks", "num_pl_evals", "pl_fit_ok",
                   "rand_distance", "num_traps", "num_traps_margin", "rand_fit_ok")


def get_summary(rows: Iterable[SpectrumRow], by_role: bool = True) -> dict[str, Any]:
    """Mean of each column over the matrices (like WeightWatcher's ``get_summary``), and per role.

    Returns ``{"all": {"count": n, column: mean, ...}, "<role>": {...}, ...}`` over
    :data:`SUMMARY_COLUMNS`; rows with ``error`` and non-finite values (an infinite ratio, an
    unfitted MP column, a withheld ``num_spikes``) are left out of a column's mean (NaN when nothing
    is left); ``fit_ok``, ``pl_fit_ok`` and ``rand_fit_ok`` give the fraction of fitted rows that
    passed. ``alpha`` (and ``alpha_weighted``, ``log_alpha_norm``) is the mean over every fitted row,
    as WeightWatcher's ``get_summary`` averages it; ``alpha_ok`` the mean over rows with
    ``pl_fit_ok``. Units as the columns' (:data:`COLUMN_DOCS`).
    """
    rows = list(rows)
    for r in rows:
        if not isinstance(r, SpectrumRow):
            raise ValueError(f"expected SpectrumRow items, got {type(r).__name__}")

    def means(group: list[SpectrumRow]) -> dict[str, float]:
        out: dict[str, Any] = {"count": len(group)}
        for col in SUMMARY_COLUMNS:
            vals = [float(getattr(r, col)) for r in group if r.error is None and getattr(r, col) is not None]
            vals = [v for v in vals if math.isfinite(v)]
            out[col] = float(np.mean(vals)) if vals else math.nan
        ok = [float(r.alpha) for r in group if r.error is None and r.pl_fit_ok and math.isfinite(r.alpha)]
        out["alpha_ok"] = float(np.mean(ok)) if ok else math.nan
        return out

    summary: dict[str, Any] = {"all": means(rows)}
    if by_role:
        order = {role: i for i, role in enumerate(weights.ROLES)}
        for role in sorted({r.role for r in rows}, key=lambda x: (order.get(x, len(order)), x)):
            summary[role] = means([r for r in rows if r.role == role])
    return summary


def _fmt(v: Any, spec: str) -> str:
    if v is None:
        return "-"
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    if isinstance(v, (float, np.floating)):
        if math.isnan(v):
            return "-"
        if math.isinf(v):
            return "inf"
    return format(v, spec)


_BASE_COLS = [
    ("s_max", ".4g"),
    ("s_min_nonzero", ".4g"),
    ("ratio", ".4g"),
    ("mass80_ratio", ".4g"),
    ("near_zero_rate", ".3f"),
    ("stable_rank", ".4g"),
    ("frobenius", ".4g"),
    ("rank", "d"),
]
_MP_COLS = [("num_spikes", ".0f"), ("num_spikes_margin", ".0f"), ("sigma_mp", ".4g"), ("bulk_max", ".4g"),
            ("ks", ".3f"), ("mp_c", ".4g"), ("fit_ok", "")]
#: power-law columns of the text table (JSON/CSV carry alpha_weighted, log_alpha_norm, pl_sigma too)
PL_COLUMNS = [("alpha", ".3f"), ("xmin", ".4g"), ("pl_ks", ".3f"), ("num_pl_evals", ".0f"), ("pl_fit_ok", "")]
#: correlation-trap columns of the text table
TRAP_COLUMNS = [("num_traps", ".0f"), ("num_traps_margin", ".0f"), ("rand_distance", ".3g")]


def format_table(rows: Sequence[SpectrumRow]) -> str:
    """Fixed-width text table, one line per row; ``role`` and ``layer`` columns appear when any row has
    one, MP columns when any row was fitted (``num_spikes`` empty, ``-``, where ``fit_ok`` is false),
    power-law columns (:data:`PL_COLUMNS`) when any row has a power-law fit, trap columns
    (:data:`TRAP_COLUMNS`) when any row was randomised, and an ``error`` column when any row is
    flagged."""
    rows = list(rows)
    if not rows:
        raise ValueError("format_table needs at least one row")
    for r in rows:
        if not isinstance(r, SpectrumRow):
            raise ValueError(f"expected SpectrumRow items, got {type(r).__name__}")
    cols = list(_BASE_COLS)
    if any(not math.isnan(r.sigma_mp) for r in rows):
        cols += _MP_COLS
    if any(r.pl_fit is not None for r in rows):
        cols += PL_COLUMNS
    if any(not math.isnan(r.rand_distance) for r in rows):
        cols += TRAP_COLUMNS
    labels = any(r.role != "other" or r.layer is not None for r in rows)
    head = ["name", "role", "layer", "shape"] if labels else ["name", "shape"]
    header = head + [c for c, _ in cols] + ["route"]
    has_err = any(r.error for r in rows)
    if has_err:
        header.append("error")
    table = []
    for r in rows:
        line = [r.name, r.role, "-" if r.layer is None else str(r.layer)] if labels else [r.name]
        line.append(f"{r.shape[0]}x{r.shape[1]}")
        for c, spec in cols:
            v = getattr(r, c)
            line.append(_fmt(v, spec) if not (r.error and c == "rank" and r.route == "") else "-")
        line.append(r.route or "-")
        if has_err:
            line.append(r.error or "")
        table.append(line)
    widths = [max(len(header[i]), *(len(t[i]) for t in table)) for i in range(len(header))]
    left = set(range(len(head))) - ({2} if labels else set())
    if has_err:
        left.add(len(header) - 1)

    def render(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    out = [render(header), render(["-" * w for w in widths])]
    out += [render(t) for t in table]
    return "\n".join(out)
