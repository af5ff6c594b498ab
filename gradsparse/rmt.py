"""Random-matrix theory: Marchenko-Pastur law, Tracy-Widom edge test, MP fit, covariance accumulation.

Conventions (SPEC 3.2, 3.3)
---------------------------
* ``X`` is ``p x N`` with iid entries of mean 0 and variance ``s2``; ``p`` is the dimension, ``N`` the
  number of samples, ``c = p / N`` the aspect ratio. The eigenvalues of ``S = (1/N) X X^T`` follow,
  as ``p, N -> inf``, the Marchenko-Pastur law MP(c, s2):

      lambda_-/+ = s2 (1 -/+ sqrt c)^2,
      pdf(x)     = sqrt((lambda_+ - x)(x - lambda_-)) / (2 pi s2 c x)   on [lambda_-, lambda_+],

  plus an atom at 0 of mass ``1 - 1/c`` when ``c > 1`` (the continuous part then has mass ``1/c``).
  Mean ``s2``, variance ``s2^2 c``.
* Predicted eigen ratio ``((1 + sqrt c) / (1 - sqrt c))^2`` (c < 1), singular ratio its square root.
* Tracy-Widom (beta = 1): ``F1(s) = det(I - K_s)`` on ``L^2(0, inf)`` with kernel
  ``K_s(x, y) = Ai((x + y)/2 + s) / 2``, evaluated by Gauss-Legendre quadrature of the Fredholm
  determinant (Bornemann 2010). ``F1(0) = 0.8319``, 95% quantile ``0.9793``.
  Johnstone (2001): the largest eigenvalue ``l1`` of ``X X^T`` for a white Wishart (unit variance)
  satisfies ``(l1 - mu_np) / sigma_np -> TW1`` with
  ``mu_np = (sqrt(N - 1) + sqrt p)^2`` and
  ``sigma_np = (sqrt(N - 1) + sqrt p) (1/sqrt(N - 1) + 1/sqrt p)^(1/3)``.
* Covariance accumulation (SPEC 3.3): decay ``r = 1 - lr * wd``,
  ``T_eff = ceil(ln(tau (1 - r)) / ln r - 1)`` with ``tau = 1e-3`` (infinite when ``wd = 0``),
  ``N = B * min(t, T_eff)``, ``c = p / N``. ``C <- r C + mean_rows x x^T``.
  In a training step: keep ``cov_init(p)`` accumulators in the state, call the jittable
  ``cov_update(C, x, r)`` and ``covariance_metrics(C, p, N)`` inside the jitted step (``p`` static,
  ``N = effective_samples(B, t, lr, wd)`` may be traced), and compare the ESD on the host with
  ``accumulated_esd(C, N)`` (see ``cov_update``'s docstring for a sketch).

Randomness only through explicit generators: a ``jax.random`` key, a ``numpy.random.Generator`` or an
int seed (turned into ``numpy.random.default_rng(seed)``). Nothing here touches a global RNG.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Union

import jax
import jax.numpy as jnp
import numpy as np
from scipy import special

__all__ = [
    "mp_edges",
    "mp_atom",
    "mp_pdf",
    "mp_cdf",
    "mp_quantile",
    "mp_rvs",
    "wishart_eigenvalues",
    "mp_eigen_ratio",
    "mp_singular_ratio",
    "tw1_cdf",
    "tw1_quantile",
    "johnstone_center_scale",
    "tw_statistic",
    "tw_spike_count",
    "ks_distance",
    "mp_ks_threshold",
    "margin_spike_count",
    "SPIKE_METHOD",
    "MARGIN_METHOD",
    "MPFit",
    "fit_mp",
    "decay_rate",
    "effective_steps",
    "effective_samples",
    "aspect_ratio",
    "cov_init",
    "cov_update",
    "participation_ratio",
    "relative_anisotropy",
    "mp_bounds",
    "covariance_metrics",
    "accumulated_esd",
]

RngLike = Union[int, np.random.Generator, jax.Array]


# --------------------------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------------------------


def _check_c(c: Any) -> float:
    try:
        c = float(c)
    except (TypeError, ValueError):
        raise ValueError(f"aspect ratio c must be a positive finite number, got {c!r}") from None
    if not (math.isfinite(c) and c > 0):
        raise ValueError(f"aspect ratio c must be a positive finite number, got {c}")
    return c


def _check_s2(s2: Any) -> float:
    try:
        s2 = float(s2)
    except (TypeError, ValueError):
        raise ValueError(f"variance s2 must be a positive finite number, got {s2!r}") from None
    if not (math.isfinite(s2) and s2 > 0):
        raise ValueError(f"variance s2 must be a positive finite number, got {s2}")
    return s2


def _as_float_array(x: Any, what: str) -> np.ndarray:
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be real numbers, got {type(x).__name__}") from None
    return arr


def _as_generator(rng: RngLike) -> np.random.Generator | jax.Array:
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, (bool, np.bool_)):
        raise ValueError("rng must be an int seed, a numpy Generator or a jax PRNG key, got a bool")
    if isinstance(rng, (int, np.integer)):
        if int(rng) < 0:
            raise ValueError(f"seed must be >= 0, got {rng}")
        return np.random.default_rng(int(rng))
    if isinstance(rng, jax.Array):
        if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) or (rng.dtype == jnp.uint32 and rng.shape == (2,)):
            return rng
    raise ValueError(
        "rng must be an int seed, a numpy.random.Generator or a jax PRNG key "
        f"(jax.random.key / PRNGKey), got {type(rng).__name__}"
    )


# --------------------------------------------------------------------------------------------
# Marchenko-Pastur law
# --------------------------------------------------------------------------------------------


def mp_edges(c: float, s2: float = 1.0) -> tuple[float, float]:
    """Bulk edges ``(s2 (1 - sqrt c)^2, s2 (1 + sqrt c)^2)`` of MP(c, s2)."""
    c, s2 = _check_c(c), _check_s2(s2)
    rc = math.sqrt(c)
    return s2 * (1.0 - rc) ** 2, s2 * (1.0 + rc) ** 2


def mp_atom(c: float) -> float:
    """Mass of the atom at 0: ``max(0, 1 - 1/c)``."""
    c = _check_c(c)
    return max(0.0, 1.0 - 1.0 / c)


def mp_pdf(x: Any, c: float, s2: float = 1.0) -> np.ndarray:
    """Density of the continuous part of MP(c, s2) at ``x`` (any shape; the atom is not included).

    ``pdf(x) = sqrt((l+ - x)(x - l-)) / (2 pi s2 c x)`` on ``[l-, l+]``, 0 elsewhere. It integrates
    to ``min(1, 1/c)``.
    """
    c, s2 = _check_c(c), _check_s2(s2)
    x = _as_float_array(x, "x")
    lo, hi = mp_edges(c, s2)
    inside = (x > lo) & (x < hi) & (x > 0)
    xs = np.where(inside, x, 0.5 * (lo + hi))
    val = np.sqrt(np.maximum((hi - xs) * (xs - lo), 0.0)) / (2.0 * np.pi * s2 * c * xs)
    return np.where(inside, val, 0.0)


def _mp_cdf_unit(y: np.ndarray, c: float) -> np.ndarray:
    """Closed-form CDF of MP(c, 1) (atom included) at ``y``.

    With ``a, b`` the edges, ``m = (a+b)/2``, ``h = (b-a)/2``, ``R = sqrt((b-y)(y-a))``, an
    antiderivative of ``R / y`` is ``G(y) = R + m asin((y-m)/h) - sqrt(ab) asin((m y - ab)/(h y))``,
    and ``CDF(y) = atom + (G(y) - G(a)) / (2 pi c)`` on ``[a, b]``.
    """
    a, b = mp_edges(c, 1.0)
    m, h = 0.5 * (a + b), 0.5 * (b - a)
    sab = abs(1.0 - c)  # sqrt(a b)
    atom = max(0.0, 1.0 - 1.0 / c)
    y = np.asarray(y, dtype=np.float64)
    inside = (y > a) & (y < b)
    ys = np.clip(np.where(inside, y, m), max(a, 1e-300), b)
    r = np.sqrt(np.maximum((b - ys) * (ys - a), 0.0))
    t1 = np.arcsin(np.clip((ys - m) / h, -1.0, 1.0))
    t2 = np.arcsin(np.clip((m * ys - a * b) / (h * ys), -1.0, 1.0))
    g = r + m * t1 - sab * t2
    g_a = -m * np.pi / 2 + sab * np.pi / 2
    val = atom + (g - g_a) / (2.0 * np.pi * c)
    val = np.clip(val, atom, 1.0)
    out = np.where(y >= b, 1.0, np.where(y >= 0, atom, 0.0))
    return np.where(inside, val, out)


def mp_cdf(x: Any, c: float, s2: float = 1.0) -> np.ndarray:
    """Closed-form CDF of MP(c, s2) at ``x`` (any shape), including the atom ``max(0, 1 - 1/c)`` at 0.

    ``CDF(x; c, s2) = CDF(x / s2; c, 1)``; see ``_mp_cdf_unit`` for the antiderivative used.
    """
    c, s2 = _check_c(c), _check_s2(s2)
    x = _as_float_array(x, "x")
    return _mp_cdf_unit(x / s2, c)


def _unit_grid(c: float, m: int = 1025) -> tuple[np.ndarray, np.ndarray]:
    """Chebyshev-clustered grid on the MP(c, 1) support and the CDF on it (monotone)."""
    a, b = mp_edges(c, 1.0)
    t = np.linspace(0.0, 1.0, m)
    x = a + (b - a) * 0.5 * (1.0 - np.cos(np.pi * t))
    f = _mp_cdf_unit(x, c)
    f[0], f[-1] = max(0.0, 1.0 - 1.0 / c), 1.0
    f = np.maximum.accumulate(f)
    return x, f


def _unit_quantile_fast(u: np.ndarray, c: float, m: int = 1025) -> np.ndarray:
    """Interpolated quantile of MP(c, 1) (accuracy ~1e-6 of the support width; used inside fits)."""
    x, f = _unit_grid(c, m)
    atom = max(0.0, 1.0 - 1.0 / c)
    q = np.interp(u, f, x)
    return np.where(u <= atom, 0.0, q)


def mp_quantile(u: Any, c: float, s2: float = 1.0) -> np.ndarray:
    """Quantile function of MP(c, s2): smallest ``x`` with ``CDF(x) >= u``, for ``u`` in [0, 1].

    Numerical inversion of the closed-form CDF: a grid bracket, then 40 bisection steps
    (absolute accuracy ~1e-12 * s2 * (l+ - l-)). Values ``u <= 1 - 1/c`` (the atom) map to 0.
    """
    c, s2 = _check_c(c), _check_s2(s2)
    u = _as_float_array(u, "u")
    if np.any(~np.isfinite(u)) or np.any((u < 0) | (u > 1)):
        raise ValueError("quantile levels u must lie in [0, 1]")
    x, f = _unit_grid(c)
    atom = max(0.0, 1.0 - 1.0 / c)
    idx = np.clip(np.searchsorted(f, u, side="left"), 1, len(x) - 1)
    lo, hi = x[idx - 1].copy(), x[idx].copy()
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        below = _mp_cdf_unit(mid, c) < u
        lo = np.where(below, mid, lo)
        hi = np.where(below, hi, mid)
    q = 0.5 * (lo + hi)
    q = np.where(u <= atom, 0.0, q)
    return s2 * q


def mp_rvs(rng: RngLike, size: int | tuple[int, ...], c: float, s2: float = 1.0) -> np.ndarray:
    """iid draws from the limiting MP(c, s2) law (inverse-CDF sampling), as a float64 numpy array.

    ``rng``: int seed, ``numpy.random.Generator`` or jax PRNG key.
    """
    c, s2 = _check_c(c), _check_s2(s2)
    shape = (size,) if isinstance(size, (int, np.integer)) else tuple(size)
    if any(int(d) < 0 for d in shape):
        raise ValueError(f"size must be non-negative, got {size}")
    g = _as_generator(rng)
    if isinstance(g, np.random.Generator):
        u = g.random(shape)
    else:
        u = np.asarray(jax.random.uniform(g, shape, dtype=jnp.float32), dtype=np.float64)
    return mp_quantile(u, c, s2)


def wishart_eigenvalues(
    rng: RngLike, p: int, N: int, s2: float = 1.0, spikes: Any = None
) -> np.ndarray:
    """Eigenvalues (ascending, float64) of ``S = (1/N) X X^T``, ``X`` p x N Gaussian.

    Columns of ``X`` are iid ``N(0, s2 * Sigma)`` with ``Sigma = diag(spikes..., 1, ..., 1)``: the
    optional ``spikes`` are population eigenvalues (in units of s2) planted on the first coordinates
    (spiked covariance model). Without spikes the spectrum follows MP(p/N, s2) for large p, N.
    """
    if not (isinstance(p, (int, np.integer)) and isinstance(N, (int, np.integer)) and p > 0 and N > 0):
        raise ValueError(f"p and N must be positive ints, got p={p!r}, N={N!r}")
    s2 = _check_s2(s2)
    scale = np.ones(p)
    if spikes is not None:
        sp = _as_float_array(spikes, "spikes").ravel()
        if sp.size > p or np.any(~np.isfinite(sp)) or np.any(sp <= 0):
            raise ValueError(f"spikes must be at most p={p} positive finite values, got {spikes!r}")
        scale[: sp.size] = sp
    g = _as_generator(rng)
    if isinstance(g, np.random.Generator):
        x = g.standard_normal((p, N))
    else:
        x = np.asarray(jax.random.normal(g, (p, N), dtype=jnp.float32), dtype=np.float64)
    x *= np.sqrt(s2 * scale)[:, None]
    if p <= N:
        ev = np.linalg.eigvalsh(x @ x.T) / N
    else:  # nonzero part from the smaller Gram, zeros for the rest
        ev = np.concatenate([np.zeros(p - N), np.linalg.eigvalsh(x.T @ x) / N])
    return np.sort(np.maximum(ev, 0.0))


def mp_eigen_ratio(c: float) -> float:
    """Predicted ``lambda_+ / lambda_-`` = ``((1 + sqrt c)/(1 - sqrt c))^2`` (inf at c = 1; for c > 1
    the ratio of the non-zero edges, ``((sqrt c + 1)/(sqrt c - 1))^2``)."""
    c = _check_c(c)
    rc = math.sqrt(c)
    if rc == 1.0:
        return math.inf
    return ((1.0 + rc) / (1.0 - rc)) ** 2


def mp_singular_ratio(c: float) -> float:
    """Predicted ``s_max / s_min`` = ``sqrt(mp_eigen_ratio(c))``; c = 1/4 -> 3."""
    return math.sqrt(mp_eigen_ratio(c))


# --------------------------------------------------------------------------------------------
# Tracy-Widom beta = 1
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _gauss_legendre(m: int) -> tuple[np.ndarray, np.ndarray]:
    return np.polynomial.legendre.leggauss(m)


def _tw1_cdf_scalar(s: float) -> float:
    if s >= 12.0:  # 1 - F1(12) < 1e-19
        return 1.0
    if s <= -14.0:  # F1(-14) < 1e-40
        return 0.0
    # Ai(z) < 1e-16 for z > 12.5: truncate (0, inf) to (0, L) with (x + y)/2 + s <= 12.5 covered
    length = max(2.0 * (12.5 - s), 4.0)
    m = 48 + 16 * math.ceil(max(0.0, -s) / 4.0)  # few distinct sizes (cached nodes); ~1e-14 error
    t, w = _gauss_legendre(m)
    x = 0.5 * length * (t + 1.0)
    w = 0.5 * length * w
    sw = np.sqrt(w)
    k = 0.5 * special.airy(0.5 * (x[:, None] + x[None, :]) + s)[0]
    a = np.eye(m) - sw[:, None] * k * sw[None, :]
    sign, logdet = np.linalg.slogdet(a)
    if sign <= 0:
        return 0.0
    return float(min(1.0, math.exp(logdet)))


def tw1_cdf(s: Any) -> np.ndarray | float:
    """Tracy-Widom beta=1 CDF ``F1(s) = det(I - K_s)``, ``K_s(x,y) = Ai((x+y)/2 + s)/2`` on (0, inf).

    Gauss-Legendre quadrature (48 + 16 ceil(max(0, -s)/4) nodes) of the Fredholm determinant on a truncated
    interval; absolute error ~1e-13 for s in [-10, 10] (checked against 300 nodes). Scalar in, float out; array in, array out.
    """
    arr = _as_float_array(s, "s")
    if np.any(np.isnan(arr)):
        raise ValueError("tw1_cdf: s must not be NaN")
    out = np.vectorize(_tw1_cdf_scalar, otypes=[np.float64])(arr)
    return float(out) if out.ndim == 0 else out


@functools.lru_cache(maxsize=64)
def _tw1_quantile_cached(q: float) -> float:
    from scipy.optimize import brentq

    return float(brentq(lambda s: _tw1_cdf_scalar(s) - q, -9.0, 9.0, xtol=1e-10))


def tw1_quantile(q: float) -> float:
    """Quantile of TW1: ``s`` with ``F1(s) = q``, q in (1e-12, 1 - 1e-12). ``tw1_quantile(0.95) = 0.979``."""
    try:
        q = float(q)
    except (TypeError, ValueError):
        raise ValueError(f"q must be a probability, got {q!r}") from None
    if not (1e-12 < q < 1 - 1e-12):
        raise ValueError(f"q must lie strictly between 0 and 1 (1e-12 margins), got {q}")
    return _tw1_quantile_cached(q)


def johnstone_center_scale(p: float, N: float) -> tuple[float, float]:
    """Johnstone's ``(mu_np, sigma_np)`` for the largest eigenvalue of ``X X^T``, X p x N, unit variance.

    ``mu = (sqrt(N-1) + sqrt p)^2``, ``sigma = (sqrt(N-1) + sqrt p)(1/sqrt(N-1) + 1/sqrt p)^(1/3)``.
    ``p`` and ``N`` may be non-integer (e.g. ``N = p / c`` from a fit); ``N > 1``, ``p > 0`` required.
    """
    p, N = float(p), float(N)
    if not (math.isfinite(p) and math.isfinite(N) and p > 0 and N > 1):
        raise ValueError(f"need p > 0 and N > 1 (finite), got p={p}, N={N}")
    a, b = math.sqrt(N - 1.0), math.sqrt(p)
    return (a + b) ** 2, (a + b) * (1.0 / a + 1.0 / b) ** (1.0 / 3.0)


def tw_statistic(lam: float, p: float, N: float, s2: float) -> float:
    """TW1-scaled statistic of an eigenvalue ``lam`` of ``(1/N) X X^T``: ``(N lam / s2 - mu) / sigma``."""
    mu, sig = johnstone_center_scale(p, N)
    return (N * float(lam) / _check_s2(s2) - mu) / sig


def tw_spike_count(eigs: Any, p: float, N: float, s2: float, alpha: float = 0.05) -> int:
    """Number of spikes by a sequential Tracy-Widom edge test.

    Eigenvalues ``eigs`` of ``(1/N) X X^T`` (any order). Test the largest against TW1 with
    ``(p, N, s2)``; if ``tw_statistic > tw1_quantile(1 - alpha)`` it is a spike: remove it and test the
    next largest with dimension ``p - 1``, and so on. False-positive rate: for a white Wishart matrix
    with known ``s2`` the probability of reporting one or more spikes is ``alpha`` (asymptotically in
    p, N; Johnstone 2001; measured 5.5% at alpha = 0.05 for 100 x 400, also with s2 and c fitted by
    :func:`fit_mp`). Testing the next eigenvalue after true spikes were removed treats it as the top
    of a ``(p - k)``-dimensional white Wishart; a finite-rank signal pushes the bulk edge up by
    O(1/N), so that step is slightly liberal (an extra borderline spike now and then).
    """
    if not (0.0 < float(alpha) < 1.0):
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    lam = np.sort(_as_float_array(eigs, "eigs").ravel())[::-1]
    if lam.size == 0:
        return 0
    thr = tw1_quantile(1.0 - float(alpha))
    k = 0
    for j, value in enumerate(lam):
        pj = float(p) - j
        if pj <= 1:
            break
        if tw_statistic(value, pj, N, s2) > thr:
            k += 1
        else:
            break
    return k


# --------------------------------------------------------------------------------------------
# fit
# --------------------------------------------------------------------------------------------


def ks_distance(eigs: Any, c: float, s2: float, zero_tol: float = 1e-9) -> float:
    """Kolmogorov-Smirnov distance ``sup_x |F_emp(x) - CDF_MP(x; c, s2)|`` of the given eigenvalues.

    Handles ties and the atom at 0: both CDFs are compared at every distinct value and just left of
    it. Eigenvalues ``<= zero_tol * max(eigs)`` count as exact zeros (round-off of a rank-deficient
    spectrum), so that for c > 1 they match the atom ``1 - 1/c``.
    """
    lam = np.sort(_as_float_array(eigs, "eigs").ravel())
    n = lam.size
    if n == 0:
        raise ValueError("ks_distance needs at least one eigenvalue")
    if not np.all(np.isfinite(lam)):
        raise ValueError("ks_distance: eigenvalues must be finite")
    top = float(np.max(np.abs(lam)))
    lam = np.where(lam <= zero_tol * top, 0.0, lam)
    vals, first = np.unique(lam, return_index=True)
    last = np.append(first[1:], n)  # empirical CDF: left limit first/n, value last/n
    f = mp_cdf(vals, c, s2)
    f_left = np.where(vals == 0.0, 0.0, f)  # only the atom at 0 makes the law discontinuous
    return float(max(np.max(np.abs(last / n - f)), np.max(np.abs(first / n - f_left))))


#: How ``num_spikes`` is counted (stated in every :class:`MPFit` and in the spectrum tables).
SPIKE_METHOD = "sequential Tracy-Widom (TW1) edge test at level alpha"
#: How ``num_spikes_margin`` is counted: WeightWatcher's margin rule (see :func:`margin_spike_count`).
MARGIN_METHOD = "WeightWatcher margin rule: eigenvalues above bulk_max + sqrt(sqrt(c) bulk_max^(2/3) p^(-2/3)), mean-1 units"


def mp_ks_threshold(n: int) -> float:
    """KS distance below which an MP fit of ``n`` bulk eigenvalues counts as acceptable (``fit_ok``).

    ``max(0.05, 5 / n)``. Eigenvalues are far more rigid than iid draws: fits of iid Gaussian
    matrices (s2 and c fitted) have KS distances of about ``1.5/n`` to ``3.7/n`` (measured for
    p = 16 ... 1024, c = 0.1 ... 1; largest of 1768 fits: 0.73 of this threshold), so ``5/n`` admits
    them at every size, and the floor 0.05 says that a fitted CDF more than 5 points away from the
    empirical one is a misfit whatever the size. The classical KS critical value ``1.36/sqrt(n)``
    of iid samples would admit spectra that are visibly not MP-shaped.
    """
    if not (isinstance(n, (int, np.integer)) and n > 0):
        raise ValueError(f"n: must be a positive int; allowed: the number of bulk eigenvalues, got {n!r}")
    return max(0.05, 5.0 / int(n))


def margin_spike_count(eigs: Any, c: float, s2: float) -> int:
    """Spikes by WeightWatcher's margin rule, for comparison with the TW test of :func:`fit_mp`.

    In WeightWatcher's units (eigenvalues rescaled to mean 1 over all ``p`` given eigenvalues,
    ``lam' = p lam / sum(lam)``): ``bulk_max' = s2' (1 + sqrt c)^2`` with ``s2'`` the fitted variance
    in those units, ``TW = sqrt(c) bulk_max'^(2/3) p^(-2/3)`` (WeightWatcher writes ``1/sqrt(Q)``,
    ``Q = 1/c``), and the count of ``lam' > bulk_max' + sqrt(TW)``. The margin is not a quantile of
    a distribution (no stated false-positive rate) and is not scale-covariant, hence the fixed units.
    """
    c, s2 = _check_c(c), _check_s2(s2)
    lam = _as_float_array(eigs, "eigs").ravel()
    if lam.size == 0 or not np.all(np.isfinite(lam)):
        raise ValueError("eigs: must be a non-empty array of finite eigenvalues")
    total = float(np.sum(lam))
    if total <= 0:
        raise ValueError("eigs: all eigenvalues are zero; allowed: a spectrum with a positive sum")
    scale = lam.size / total
    bulk_max = scale * s2 * (1.0 + math.sqrt(c)) ** 2
    tw = math.sqrt(c) * bulk_max ** (2.0 / 3.0) * lam.size ** (-2.0 / 3.0)
    return int(np.count_nonzero(scale * lam > bulk_max + math.sqrt(tw)))


@dataclass
class MPFit:
    """Result of :func:`fit_mp`. Eigenvalue units are those of the input spectrum.

    ``s2``: fitted variance; ``c``: fitted (or fixed) aspect ratio; ``sigma_mp = sqrt(s2)``;
    ``bulk_min``/``bulk_max``: MP edges of the fit; ``num_spikes`` and ``spikes`` (descending): the
    eigenvalues removed as outliers above the edge by the sequential TW1 test at level ``alpha``
    (``spike_method``); ``num_spikes_margin``: WeightWatcher's margin rule applied to the same fit
    (:func:`margin_spike_count`); ``ks``: KS distance of the bulk (spikes removed) to the fitted
    law; ``p``: eigenvalues given; ``N_eff``: ``n_bulk / c``, the sample count the fit implies;
    ``converged``: False if the spike removal hit its cap (half the spectrum) or the iteration limit;
    ``c_max``: the upper bound the fit allowed for ``c`` (NaN when ``c`` was fixed); ``zero_rate``:
    fraction of exact zeros in the bulk; ``ks_threshold``: the KS bound of ``fit_ok``;
    ``fit_ok = converged and ks <= ks_threshold``.
    """

    s2: float
    c: float
    sigma_mp: float
    bulk_min: float
    bulk_max: float
    num_spikes: int
    ks: float
    p: int
    n_bulk: int
    N_eff: float
    alpha: float
    converged: bool
    spikes: np.ndarray = field(default_factory=lambda: np.zeros(0))
    num_spikes_margin: int = 0
    c_max: float = math.nan
    zero_rate: float = 0.0
    ks_threshold: float = math.nan
    fit_ok: bool = False
    spike_method: str = SPIKE_METHOD

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["spikes"] = [float(v) for v in self.spikes]
        return d


_C_MIN = 1e-4
_GRID_STEP = (math.log(20.0) - math.log(_C_MIN)) / 40  # log-c grid spacing of the search


def _profile_fit(
    y: np.ndarray, u: np.ndarray, c_fixed: float | None, c_init: float | None = None, c_hi: float = 20.0
) -> tuple[float, float]:
    """Least-squares quantile matching: ``y_i ~ s2 * Q(u_i; c, 1)``, s2 profiled out in closed form.

    ``c`` is searched on a log grid (step ``ln(2e5)/40``) over ``[1e-4, c_hi]`` and refined by
    bounded scalar minimisation; with ``c_init`` (a previous round's estimate) only the bracket
    ``c_init * exp(+-0.5)`` (clipped to ``c_hi``) is searched, falling back to the full grid if the
    optimum lands on a boundary of the bracket that is not ``c_hi`` itself.
    """

    def s2_and_loss(c: float) -> tuple[float, float]:
        q = _unit_quantile_fast(u, c, 513)
        qq = float(q @ q)
        if qq <= 0:
            return 1.0, math.inf
        s2 = max(float(y @ q) / qq, 1e-300)
        r = y - s2 * q
        return s2, float(r @ r)

    if c_fixed is not None:
        return s2_and_loss(c_fixed)[0], c_fixed
    from scipy.optimize import minimize_scalar

    g_lo, g_hi = math.log(_C_MIN), math.log(c_hi)

    def refine(lo: float, hi: float) -> float:
        res = minimize_scalar(lambda g: s2_and_loss(math.exp(g))[1], bounds=(lo, hi), method="bounded",
                              options={"xatol": 1e-4})
        g = float(res.x)
        # the bounded method never evaluates a bound itself: an optimum at the c_hi constraint is
        # approached only to ~xatol, so compare with the bound and keep the better one
        if hi == g_hi and s2_and_loss(math.exp(g_hi))[1] <= s2_and_loss(math.exp(g))[1]:
            return g_hi
        return g

    if c_init is not None:
        g0 = math.log(min(c_init, c_hi))
        lo, hi = g0 - 0.5, min(g0 + 0.5, g_hi)
        g = refine(lo, hi)
        at_lo = abs(g - lo) <= 1e-3
        at_hi = abs(g - hi) <= 1e-3 and hi < g_hi
        if not (at_lo or at_hi):
            c = math.exp(g)
            return s2_and_loss(c)[0], c
    n = max(2, int(math.ceil((g_hi - g_lo) / _GRID_STEP)) + 1)
    grid = np.linspace(g_lo, g_hi, n)
    losses = [s2_and_loss(math.exp(g))[1] for g in grid]
    i = int(np.argmin(losses))
    g = refine(grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)])
    c = math.exp(g)
    return s2_and_loss(c)[0], c


def fit_mp(
    eigs: Any,
    *,
    c: float | None = None,
    alpha: float = 0.05,
    trim: tuple[float, float] = (0.01, 0.95),
    max_iter: int = 25,
    c_max: float | None = None,
    ks_max: float | None = None,
) -> MPFit:
    """Fit MP(c, s2) to an empirical eigenvalue spectrum after removing spikes.

    ``eigs``: the p eigenvalues of ``(1/N) X X^T`` (any order; for c > 1 include the zeros, they make
    the atom). Procedure:

    1. Bulk = all eigenvalues. Fit ``(s2, c)`` by least squares between the sorted bulk and the MP
       quantiles at plotting positions ``(i + 1/2)/n`` restricted to ``trim`` (the top 5% of levels
       are left out, so a few spikes cannot drag the fit); ``s2`` is profiled out in closed form and
       ``c`` found on a log grid then refined by bounded scalar minimisation. With ``c`` given, only
       ``s2`` is fitted.
    2. Sequential TW1 edge test (:func:`tw_spike_count`) on the bulk with ``p = n_bulk``,
       ``N = n_bulk / c``: eigenvalues above the edge at level ``alpha`` are spikes and leave the bulk.
    3. Repeat 1-2 until no new spike (at most ``max_iter`` rounds, at most half the spectrum removed).

    **What the shape allows.** MP(c) with ``c > 1`` has an atom of mass ``1 - 1/c`` at 0, so a free
    ``c`` is bounded by the zeros actually present: with ``z`` the fraction of exact zeros in the
    bulk (eigenvalues ``<= 1e-9 max``), ``c <= 1/(1 - z)`` (``c <= 1`` when there are none). Without
    this bound a heavy-tailed spectrum of a square matrix is "explained" by an atom that is not
    there (``c`` of 1.3-1.8 with 24-43% predicted zeros where none exist). ``c_max`` overrides the
    bound (e.g. ``c_max=20`` for the unconstrained search over ``[1e-4, 20]``).

    **Acceptance.** ``fit_ok = converged and ks <= ks_threshold`` with ``ks_threshold = ks_max`` or,
    by default, :func:`mp_ks_threshold` of the bulk size. A fit that is not ok still reports its
    numbers; callers must not read them as an MP description of the spectrum.

    Returns :class:`MPFit` with the KS distance of the bulk to the fitted law, the TW spike count
    and, beside it, WeightWatcher's margin-rule count (:func:`margin_spike_count`).
    """
    lam = _as_float_array(eigs, "eigs").ravel()
    if lam.size < 4:
        raise ValueError(f"fit_mp needs at least 4 eigenvalues, got {lam.size}")
    if not np.all(np.isfinite(lam)):
        raise ValueError("fit_mp: eigenvalues must be finite (got NaN or inf)")
    top = float(np.max(np.abs(lam)))
    if top <= 0:
        raise ValueError("fit_mp: all eigenvalues are zero; nothing to fit")
    if np.min(lam) < -1e-6 * top:
        raise ValueError(
            f"fit_mp: eigenvalues of a covariance must be >= 0, got min {np.min(lam):.3g} (max {top:.3g})"
        )
    if c is not None:
        c = _check_c(c)
    if c_max is not None:
        c_max = _check_c(c_max)
        if c_max <= _C_MIN:
            raise ValueError(f"c_max: must exceed {_C_MIN} (the lower end of the search), got {c_max}")
    if ks_max is not None:
        try:
            ks_max = float(ks_max)
        except (TypeError, ValueError):
            raise ValueError(f"ks_max: must be a number; allowed: (0, 1] or None, got {ks_max!r}") from None
        if not (0.0 < ks_max <= 1.0):
            raise ValueError(f"ks_max: must lie in (0, 1]; allowed: (0, 1] or None, got {ks_max}")
    if not (0.0 < float(alpha) < 1.0):
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    lo_t, hi_t = float(trim[0]), float(trim[1])
    if not (0.0 <= lo_t < hi_t <= 1.0):
        raise ValueError(f"trim must satisfy 0 <= lo < hi <= 1, got {trim}")
    lam = np.sort(np.where(lam <= 1e-9 * top, 0.0, lam))  # round-off zeros -> exact zeros
    p = lam.size
    n_zero = int(np.count_nonzero(lam == 0.0))
    n_bulk = p
    converged = False
    s2_hat, c_hat = 1.0, 1.0
    c_prev: float | None = None
    c_hi = math.nan
    for _ in range(max_iter):
        y = lam[:n_bulk]
        u = (np.arange(n_bulk) + 0.5) / n_bulk
        keep = (u >= lo_t) & (u <= hi_t)
        z = n_zero / n_bulk
        c_hi = c_max if c_max is not None else (1.0 if n_zero == 0 else 1.0 / (1.0 - z))
        s2_hat, c_hat = _profile_fit(y[keep], u[keep], c, c_prev, c_hi)
        c_prev = c_hat
        N_eff = n_bulk / c_hat
        k = tw_spike_count(y, n_bulk, max(N_eff, 1.0 + 1e-9), s2_hat, alpha) if N_eff > 1 else 0
        if k == 0:
            converged = True
            break
        if n_bulk - k < max(4, p // 2):
            n_bulk = max(4, p // 2)
            break
        n_bulk -= k
    bulk = lam[:n_bulk]
    spikes = lam[n_bulk:][::-1].copy()
    lo, hi = mp_edges(c_hat, s2_hat)
    ks = ks_distance(bulk, c_hat, s2_hat)
    ks_thr = ks_max if ks_max is not None else mp_ks_threshold(int(n_bulk))
    return MPFit(
        s2=float(s2_hat),
        c=float(c_hat),
        sigma_mp=math.sqrt(s2_hat),
        bulk_min=lo,
        bulk_max=hi,
        num_spikes=int(p - n_bulk),
        ks=ks,
        p=int(p),
        n_bulk=int(n_bulk),
        N_eff=float(n_bulk / c_hat),
        alpha=float(alpha),
        converged=converged,
        spikes=spikes,
        num_spikes_margin=margin_spike_count(lam, c_hat, s2_hat),
        c_max=math.nan if c is not None else float(c_hi),
        zero_rate=n_zero / n_bulk,
        ks_threshold=float(ks_thr),
        fit_ok=bool(converged and ks <= ks_thr),
    )


# --------------------------------------------------------------------------------------------
# covariance accumulation (SPEC 3.3)
# --------------------------------------------------------------------------------------------


def decay_rate(lr: float, wd: float) -> float:
    """``r = 1 - lr * wd``; requires ``lr >= 0``, ``wd >= 0`` and ``lr * wd < 1``."""
    lr, wd = float(lr), float(wd)
    if not (math.isfinite(lr) and math.isfinite(wd) and lr >= 0 and wd >= 0):
        raise ValueError(f"lr and wd must be finite and >= 0, got lr={lr}, wd={wd}")
    if lr * wd >= 1.0:
        raise ValueError(f"lr * wd must be < 1 (decay r = 1 - lr*wd in (0, 1]), got {lr * wd}")
    return 1.0 - lr * wd


def effective_steps(lr: float, wd: float, tau: float = 1e-3) -> float:
    """``T_eff = ceil(ln(tau (1 - r)) / ln r - 1)`` with ``r = 1 - lr*wd``; ``inf`` when ``r == 1``.

    Steps older than ``T_eff`` carry less than a fraction ``tau`` of the accumulated weight.
    Example: lr = 0.1, wd = 0.1 -> r = 0.99, T_eff = 1145.
    """
    tau = float(tau)
    if not (0.0 < tau < 1.0):
        raise ValueError(f"tau must lie in (0, 1), got {tau}")
    r = decay_rate(lr, wd)
    if r >= 1.0:
        return math.inf
    return float(math.ceil(math.log(tau * (1.0 - r)) / math.log(r) - 1.0))


def effective_samples(batch_size: int, step: int, lr: float, wd: float, tau: float = 1e-3) -> float:
    """``N = B * min(t, T_eff)``: samples in the decayed accumulation after ``step = t >= 1`` steps."""
    if not (isinstance(batch_size, (int, np.integer)) and batch_size > 0):
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not (isinstance(step, (int, np.integer)) and step > 0):
        raise ValueError(f"step must be a positive int, got {step!r}")
    return float(batch_size) * min(float(step), effective_steps(lr, wd, tau))


def aspect_ratio(p: int, batch_size: int, step: int, lr: float, wd: float, tau: float = 1e-3) -> float:
    """``c = p / N`` with ``N = effective_samples(batch_size, step, lr, wd, tau)``."""
    if not (isinstance(p, (int, np.integer)) and p > 0):
        raise ValueError(f"p must be a positive int, got {p!r}")
    return p / effective_samples(batch_size, step, lr, wd, tau)


def cov_init(p: int, dtype: Any = jnp.float32) -> jax.Array:
    """Zero ``p x p`` accumulator for :func:`cov_update`."""
    if not (isinstance(p, (int, np.integer)) and p > 0):
        raise ValueError(f"p must be a positive int, got {p!r}")
    return jnp.zeros((int(p), int(p)), dtype=dtype)


def cov_update(C: jax.Array, X: jax.Array, r: Any) -> jax.Array:
    """``C <- r C + (1/M) sum_rows x x^T`` for rows ``x`` of ``X`` (shape ``(..., p)``, M rows in all).

    Pure and jittable (``r`` may be traced). Shapes are checked at trace time: ``C`` is ``(p, p)``
    and ``X`` ends in ``p``. Accumulates in ``C.dtype``.

    Inside a training step (per layer, x = MLP inputs, g = gradients at the activations)::

        r = rmt.decay_rate(lr, wd)                # host, once
        Cx, Cg = rmt.cov_init(d), rmt.cov_init(n)   # carried in the train state
        # in the jitted step:
        Cx = rmt.cov_update(Cx, x, r); Cg = rmt.cov_update(Cg, g, r)
        metrics |= rmt.covariance_metrics(Cx, d, N)   # N = rmt.effective_samples(B, t, lr, wd)

    Note: ``g`` should be per-sample gradients; with the mean loss over a batch of B they carry a
    1/B factor that only rescales ``C`` (every metric here is scale-invariant).
    """
    C = jnp.asarray(C)
    X = jnp.asarray(X)
    if C.ndim != 2 or C.shape[0] != C.shape[1]:
        raise ValueError(f"C must be a square (p, p) matrix, got shape {C.shape}")
    if X.ndim < 1 or X.shape[-1] != C.shape[0]:
        raise ValueError(f"X must have shape (..., p) with p = {C.shape[0]}, got {X.shape}")
    Xf = X.reshape(-1, X.shape[-1]).astype(C.dtype)
    m = Xf.shape[0]
    if m == 0:
        raise ValueError("X has no rows")
    return jnp.asarray(r, C.dtype) * C + (Xf.T @ Xf) / m


def participation_ratio(C: jax.Array) -> jax.Array:
    """``alpha = tr(C)^2 / ||C||_F^2`` (= p for a multiple of the identity, 1 for rank one). Jittable."""
    C = jnp.asarray(C)
    if C.ndim != 2 or C.shape[0] != C.shape[1]:
        raise ValueError(f"C must be a square matrix, got shape {C.shape}")
    tr = jnp.trace(C)
    return tr**2 / jnp.sum(C * C)


def relative_anisotropy(C: jax.Array) -> jax.Array:
    """``sqrt(p) ||a C - I||_F / p`` with ``a = tr(C)/||C||_F^2`` (0 for a multiple of I). Jittable.

    Equals ``sqrt((p - alpha) / p)`` in exact arithmetic; computed from ``aC - I`` directly, which
    keeps its precision when C is nearly isotropic (no cancellation of two numbers close to p).
    """
    C = jnp.asarray(C)
    if C.ndim != 2 or C.shape[0] != C.shape[1]:
        raise ValueError(f"C must be a square matrix, got shape {C.shape}")
    p = C.shape[0]
    a = jnp.trace(C) / jnp.sum(C * C)
    d = a * C - jnp.eye(p, dtype=C.dtype)
    return jnp.sqrt(p) * jnp.sqrt(jnp.sum(d * d)) / p


def mp_bounds(c: Any, alpha: Any, anisotropy: Any, p: int, v: float = 1e-2) -> tuple[jax.Array, jax.Array]:
    """The two bounds of SPEC 3.3 (Theorem 8 of v4), exactly as written there. Jittable.

    ``at = alpha/p``, ``At = anisotropy/p``,
    ``common = sqrt(c + (2 sqrt2 + 3) c at / v + c At / v + c / (v p))``,
    ``bound_Re = sqrt2 at common / (c sqrt v)``, ``bound_Im = sqrt2 at^2 common / (c v^1.5)``.
    """
    if not (isinstance(p, (int, np.integer)) and p > 0):
        raise ValueError(f"p must be a positive int, got {p!r}")
    if not (isinstance(v, (int, float)) and v > 0):
        raise ValueError(f"v must be a positive number, got {v!r}")
    c = jnp.asarray(c, jnp.float32)
    at = jnp.asarray(alpha, jnp.float32) / p
    At = jnp.asarray(anisotropy, jnp.float32) / p
    s2 = math.sqrt(2.0)
    common = jnp.sqrt(c + (2 * s2 + 3) * c * at / v + c * At / v + c / (v * p))
    bound_re = s2 * at * common / (c * math.sqrt(v))
    bound_im = s2 * at**2 * common / (c * v**1.5)
    return bound_re, bound_im


def covariance_metrics(C: jax.Array, p: int, N: Any, v: float = 1e-2) -> dict[str, jax.Array]:
    """Metrics of an accumulated covariance, jittable (``N`` may be traced; ``p`` must be static).

    Returns ``{"trace", "participation_ratio", "anisotropy", "c", "bound_re", "bound_im"}`` with
    ``c = p / N`` and the bounds of :func:`mp_bounds`. ``C`` must be ``(p, p)``.
    """
    C = jnp.asarray(C)
    if not (isinstance(p, (int, np.integer)) and p > 0):
        raise ValueError(f"p must be a positive int, got {p!r}")
    if C.shape != (p, p):
        raise ValueError(f"C must have shape ({p}, {p}), got {C.shape}")
    alpha = participation_ratio(C)
    aniso = relative_anisotropy(C)
    c = p / jnp.asarray(N, jnp.float32)
    bre, bim = mp_bounds(c, alpha, aniso * p, p, v)  # mp_bounds takes the absolute A = p x (A/p)
    return {
        "trace": jnp.trace(C),
        "participation_ratio": alpha,
        "anisotropy": aniso,
        "c": c,
        "bound_re": bre,
        "bound_im": bim,
    }


def accumulated_esd(C: Any, N: float, alpha: float = 0.05) -> tuple[np.ndarray, MPFit, MPFit]:
    """ESD of an accumulated covariance against MP(c), ``c = p / N`` (SPEC 3.3, claim G9). Host-side.

    Returns ``(eigs, fit_at_c, fit_free)``: the eigenvalues of ``C`` (ascending, float64), the MP fit
    with ``c`` fixed at ``p / N`` (only the scale s2 fitted; its ``ks`` measures the agreement) and
    the fit with ``c`` free (compare its ``c`` with ``p / N``). Draw them with
    ``figures_spectra.plot_esd(eigs, out, fit=fit_free, c_pred=p / N, s2_pred=fit_at_c.s2)``.
    """
    a = np.asarray(C, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] != a.shape[1] or a.shape[0] < 4:
        raise ValueError(f"C must be a square (p, p) matrix with p >= 4, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError("C has NaN or inf entries")
    N = float(N)
    if not (math.isfinite(N) and N > 0):
        raise ValueError(f"N must be a positive finite number of samples, got {N}")
    eigs = np.linalg.eigvalsh(0.5 * (a + a.T))
    p = a.shape[0]
    return eigs, fit_mp(eigs, c=p / N, alpha=alpha), fit_mp(eigs, alpha=alpha)
