"""Power-law fit of the tail of an eigenvalue spectrum (heavy-tailed self-regularisation, HT-SR).

The fit is WeightWatcher 0.7.7's default (``analyze()`` with ``fit='PL'``, ``pl_package='ww'``,
``fix_fingers`` off, ``xmax`` unset), read from its source (``WW_powerlaw.WWFit``,
``WeightWatcher.fit_powerlaw``, ``apply_norm_metrics``) and re-implemented in numpy with the xmin
scan vectorised. Conventions:

* Eigenvalues: ``lambda = s^2``, the squared singular values of ``W`` as stored (eigenvalues of
  ``W^T W``), **not** divided by ``N``. Eigenvalues ``<= 1e-5`` (:data:`EVALS_THRESH`, absolute, in
  these units) are dropped first; the ``n`` that remain, sorted ``x_0 <= ... <= x_{n-1}``, enter
  the fit.
* Every sorted eigenvalue except the largest is a candidate ``xmin = x_i`` (``i = 0 .. n-2``); the
  tail is ``x_i .. x_{n-1}``, ``n_i = n - i`` eigenvalues. Continuous power law
  ``p(x) = (alpha - 1) / xmin * (x / xmin)^(-alpha)`` on ``[xmin, inf)``:

      alpha_i = 1 + n_i / sum_{j >= i} ln(x_j / x_i)                  (maximum likelihood)
      D_i     = max_{j >= i} | 1 - (x_j / x_i)^(1 - alpha_i) - (j - i) / n_i |   (KS distance)

  (WeightWatcher's KS uses the empirical CDF's left limits ``(j - i)/n_i`` only.) The candidate
  with the smallest ``D_i`` wins (first one on ties); ``sigma = (alpha - 1) / sqrt(n_i)`` is the
  standard error of the MLE.
* Fewer than :data:`SMALL_N_CUTOFF` = 20 eigenvalues: WeightWatcher's small-n fitter. Only tails of
  at least 8 eigenvalues are candidates (the others keep ``D = 1``), with the bias-corrected
  ``alpha_i = 1 + (n_i - 1) / sum ln(x_j / x_i)``; no candidate: the whole spectrum is the tail.
  That fitter ranks candidates by ``J_i = D_i - 0.868 / sqrt(n_i)``, but ``WWFit.__init__`` then
  re-selects by the smallest ``D_i`` and reports that one, so the smallest ``D_i`` wins here too.
* Derived columns: ``alpha_weighted = alpha * log10 lambda_max`` and
  ``log_alpha_norm = log10 sum_j lambda_j^alpha`` over *all* eigenvalues (zeros included: they add
  nothing); ``num_pl_evals``: eigenvalues ``>= xmin`` (WeightWatcher's ``num_pl_spikes``).

**Cost.** The ``alpha_i`` of all candidates come from one suffix cumulative sum of ``ln x``; the
``D_i`` from one broadcast ``(x_j / x_i)^(1 - alpha_i)`` over the upper triangle, in row blocks of
at most ~2^21 entries: ``O(n^2)`` arithmetic, no Python loop per candidate (a few ms for n = 384).

**Acceptance** (``fit_ok``, gradsparse's, not WeightWatcher's): the fit ran, at least
:data:`MIN_EVALS` = 8 eigenvalues entered it (WeightWatcher skips smaller matrices), the tail holds
at least ``min_tail`` (default :data:`MIN_TAIL` = 10) eigenvalues, and
``alpha_range[0] <= alpha <= alpha_range[1]`` (default :data:`ALPHA_RANGE` = (1.5, 6)). Above 6
the "tail" is the steep edge of a Marchenko-Pastur bulk rather than a power law (Martin & Mahoney's
bound of the heavy-tailed regime; WeightWatcher warns "under-trained" there): iid Gaussian
matrices of 384 x 384 and larger fit alpha = 4.6-29 on tails of 3-23% of their eigenvalues,
mostly above 6; the MP-like pooler of all-MiniLM-L6-v2 fits 12.3. Below 1.5 the tail is too
heavy for the MLE to be stable at these sizes (Student-t entries with 1.5 degrees of freedom give
1.98). The flag is necessary, not sufficient: small iid matrices (fewer than ~300 eigenvalues)
often fit alpha in 2-6 on tails of 10-40 eigenvalues, so read alpha beside the MP fit (``fit_ok``
true means the MP law already explains the spectrum). WeightWatcher itself reports every fit and
only warns (``alpha < 2``: over-trained, ``alpha > 6``: under-trained, :func:`ww_warning`).

Deviations from WeightWatcher, all in degenerate cases: a tail whose eigenvalues are all equal
(``sum ln(x_j/x_i) = 0``) is no candidate (WeightWatcher divides by zero); the small-n fallback
(no tail of 8) reports ``sigma = (alpha - 1)/sqrt(n)`` (WeightWatcher reports ``-1/sqrt(n)``
there, an artefact of its order of assignment).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "EVALS_THRESH",
    "MIN_EVALS",
    "MIN_TAIL",
    "ALPHA_RANGE",
    "SMALL_N_CUTOFF",
    "PowerLawFit",
    "scan_xmin",
    "fit_powerlaw",
    "alpha_weighted",
    "log_alpha_norm",
    "ww_warning",
    "pareto_rvs",
]

#: eigenvalues at or below this (absolute, units of s^2) are dropped before the fit (WeightWatcher's EVALS_THRESH)
EVALS_THRESH = 1e-5
#: WeightWatcher's default min_evals: matrices with fewer eigenvalues are not analysed there
MIN_EVALS = 8
#: gradsparse's fit_ok needs at least this many tail eigenvalues
MIN_TAIL = 10
#: gradsparse's fit_ok needs alpha in this closed range
ALPHA_RANGE = (1.5, 6.0)
#: fewer eigenvalues than this: WeightWatcher's small-n fitter
SMALL_N_CUTOFF = 20
_SMALL_N_K_MIN = 8
_SMALL_N_J = 0.868
_BLOCK = 1 << 21

FIT_METHOD = ("WeightWatcher 0.7.7 default PL fit: eigenvalues s^2 > 1e-5, every eigenvalue but the largest "
              "tried as xmin, alpha by maximum likelihood, smallest KS distance wins (fewer than 20 "
              "eigenvalues: bias-corrected alpha, tails >= 8, smallest D - 0.868/sqrt(n_tail))")


@dataclass
class PowerLawFit:
    """Result of :func:`fit_powerlaw`; eigenvalue units are those of the input (``s^2``).

    ``alpha``, ``xmin``, ``xmax`` (largest eigenvalue), ``D`` (KS distance of the tail),
    ``sigma`` (standard error ``(alpha - 1)/sqrt(n_tail)``), ``n_tail`` (eigenvalues ``>= xmin``),
    ``n_fit`` (eigenvalues above ``thresh`` that entered the fit), ``method`` (``"standard"`` or
    ``"small_n"``), ``fit_ok`` and ``reason`` (why not ok; ``""`` when ok). ``xmins``, ``alphas``
    and ``Ds``: every candidate's values (for figures of alpha and D vs xmin).
    """

    alpha: float
    xmin: float
    xmax: float
    D: float
    sigma: float
    n_tail: int
    n_fit: int
    method: str
    fit_ok: bool
    reason: str = ""
    xmins: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)
    alphas: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)
    Ds: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready scalars (the candidate arrays left out; NaN -> None)."""
        out: dict[str, Any] = {}
        for k in ("alpha", "xmin", "xmax", "D", "sigma", "n_tail", "n_fit", "method", "fit_ok", "reason"):
            v = getattr(self, k)
            if isinstance(v, float) and not math.isfinite(v):
                v = None
            out[k] = v
        return out


def _as_eigs(eigs: Any) -> np.ndarray:
    try:
        lam = np.asarray(eigs, dtype=np.float64).ravel()
    except (TypeError, ValueError):
        raise ValueError(f"eigs: must be an array of numbers, got {type(eigs).__name__}") from None
    if not np.all(np.isfinite(lam)):
        raise ValueError("eigs: eigenvalues must be finite (got NaN or inf)")
    return lam


def scan_xmin(x: Any, *, small_n: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``(alphas, Ds)`` of every candidate ``xmin = x_i``, ``i = 0 .. n-2``, of sorted positive ``x``.

    ``alpha_i = 1 + m_i / s_i`` with ``s_i = sum_{j >= i} ln(x_j / x_i) = n_i d_i - sum_{j >= i} d_j``,
    ``d_j = ln x_{n-1} - ln x_j`` (one suffix cumulative sum; exactly 0 for an all-equal tail), and
    ``m_i = n_i`` (``small_n``: ``n_i - 1``);
    ``D_i = max_{j >= i} |1 - (x_j/x_i)^(1 - alpha_i) - (j - i)/n_i|`` computed by broadcasting over
    blocks of candidates. Candidates with ``S_i - n_i ln x_i <= 0`` (all-equal tail; small-n: ``<= 1e-12``)
    or ``alpha_i <= 1`` get ``alpha = NaN`` (small-n: 0 as WeightWatcher stores it) and ``D = 1``;
    with ``small_n`` tails shorter than 8 too. Raises ValueError unless ``x`` is sorted ascending,
    positive and finite.
    """
    x = _as_eigs(x)
    if x.size and (np.any(x <= 0) or np.any(np.diff(x) < 0)):
        raise ValueError("x: must be positive and sorted ascending (drop the zeros, then np.sort)")
    n = x.size
    if n < 2:
        return np.zeros(0), np.zeros(0)
    logx = np.log(x)
    # s_i = sum_{j >= i} ln(x_j / x_i) = n_i d_i - sum_{j >= i} d_j with d_j = ln x_max - ln x_j >= 0:
    # one suffix cumulative sum (accumulated from the largest); exactly 0 for an all-equal tail
    d = logx[-1] - logx
    suffix = np.cumsum(d[::-1])[::-1]
    n_i = (n - np.arange(n - 1)).astype(np.float64)
    s = n_i * d[:-1] - suffix[:-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        if small_n:
            valid = (n_i >= _SMALL_N_K_MIN) & (s > 1e-12)
            alphas = np.where(valid, 1.0 + (n_i - 1.0) / np.where(valid, s, 1.0), 0.0)
        else:
            valid = s > 0
            alphas = np.where(valid, 1.0 + n_i / np.where(valid, s, 1.0), np.nan)
    valid &= alphas > 1.0
    Ds = np.ones(n - 1)
    rows = max(1, _BLOCK // n)
    for a in range(0, n - 1, rows):  # blocks of candidates, not one iteration per candidate
        b = min(a + rows, n - 1)
        xi = x[a:b, None]
        tail = x[None, a:]
        j = np.arange(a, n)[None, :]
        i = np.arange(a, b)[:, None]
        ni = n_i[a:b, None]
        ex = np.where(valid[a:b], 1.0 - alphas[a:b], 0.0)[:, None]
        with np.errstate(over="ignore", invalid="ignore"):
            dev = np.abs(1.0 - (tail / xi) ** ex - (j - i) / ni)
        dev = np.where(j >= i, dev, -np.inf)
        Ds[a:b] = np.where(valid[a:b], np.max(dev, axis=1), 1.0)
    return alphas, Ds


def fit_powerlaw(
    eigs: Any,
    *,
    thresh: float = EVALS_THRESH,
    min_tail: int = MIN_TAIL,
    alpha_range: tuple[float, float] = ALPHA_RANGE,
) -> PowerLawFit:
    """Power-law fit of the tail of ``eigs`` (squared singular values ``s^2``, any order), as
    WeightWatcher 0.7.7's default ``analyze()`` does it (module docstring for every formula).

    ``thresh``: eigenvalues ``<= thresh`` are dropped first (absolute, units of ``eigs``);
    ``min_tail`` and ``alpha_range``: the acceptance rule of ``fit_ok``. With fewer than 2
    eigenvalues above ``thresh`` nothing can be fitted: ``alpha`` etc. are NaN, ``fit_ok`` False,
    ``reason`` says why. Raises ValueError for NaN/inf/negative-beyond-round-off input or bad
    settings.
    """
    lam = _as_eigs(eigs)
    if not (isinstance(thresh, (int, float)) and math.isfinite(thresh) and thresh >= 0):
        raise ValueError(f"thresh: must be a finite number >= 0, got {thresh!r}")
    if not (isinstance(min_tail, (int, np.integer)) and min_tail >= 2):
        raise ValueError(f"min_tail: must be an int >= 2, got {min_tail!r}")
    try:
        lo, hi = (float(alpha_range[0]), float(alpha_range[1]))
    except (TypeError, ValueError, IndexError):
        raise ValueError(f"alpha_range: must be a pair (lo, hi), got {alpha_range!r}") from None
    if not (1.0 <= lo < hi):
        raise ValueError(f"alpha_range: need 1 <= lo < hi, got {alpha_range!r}")
    top = float(np.max(np.abs(lam))) if lam.size else 0.0
    if lam.size and np.min(lam) < -1e-6 * max(top, 1e-300):
        raise ValueError(f"eigs: eigenvalues s^2 must be >= 0, got min {np.min(lam):.3g} (max {top:.3g})")
    x = np.sort(lam[lam > thresh])
    n = int(x.size)
    nan = math.nan
    if n < 2:
        return PowerLawFit(alpha=nan, xmin=nan, xmax=float(x[-1]) if n else nan, D=nan, sigma=nan, n_tail=0,
                           n_fit=n, method="none", fit_ok=False,
                           reason=f"{n} eigenvalue(s) above {thresh:g}: nothing to fit")
    small = n < SMALL_N_CUTOFF
    alphas, Ds = scan_xmin(x, small_n=small)
    if small and not np.any((alphas > 1.0) & (n - np.arange(n - 1) >= _SMALL_N_K_MIN)):
        # no tail of 8: WeightWatcher falls back to the whole spectrum as the tail
        s0 = float(np.sum(np.log(x)) - n * math.log(x[0]))
        if s0 <= 1e-12:
            return PowerLawFit(alpha=nan, xmin=float(x[0]), xmax=float(x[-1]), D=1.0, sigma=nan, n_tail=n,
                               n_fit=n, method="small_n", fit_ok=False, reason="all eigenvalues equal",
                               xmins=x[:-1], alphas=alphas, Ds=Ds)
        a0 = 1.0 + (n - 1.0) / s0
        alphas, Ds = alphas.copy(), Ds.copy()
        alphas[0] = a0
        Ds[0] = float(np.max(np.abs(np.arange(n) / n - (1.0 - (x / x[0]) ** (1.0 - a0)))))
    best = int(np.argmin(Ds))  # small n too: WWFit.__init__ re-selects by D after the small-n fitter
    alpha = float(alphas[best])
    xmin = float(x[best])
    n_tail = int(np.count_nonzero(lam >= xmin))
    D = float(Ds[best])
    sigma = (alpha - 1.0) / math.sqrt(n - best)
    reasons = []
    if n < MIN_EVALS:
        reasons.append(f"{n} eigenvalues above {thresh:g} (< {MIN_EVALS}, WeightWatcher's min_evals)")
    if n_tail < min_tail:
        reasons.append(f"tail of {n_tail} eigenvalues (< min_tail {min_tail})")
    if not (math.isfinite(alpha) and lo <= alpha <= hi):
        reasons.append(f"alpha {alpha:.3g} outside [{lo:g}, {hi:g}]")
    return PowerLawFit(alpha=alpha, xmin=xmin, xmax=float(x[-1]), D=D, sigma=float(sigma), n_tail=n_tail, n_fit=n,
                       method="small_n" if small else "standard", fit_ok=not reasons, reason="; ".join(reasons),
                       xmins=x[:-1], alphas=alphas, Ds=Ds)


def alpha_weighted(alpha: float, lambda_max: float) -> float:
    """``alpha * log10 lambda_max`` (WeightWatcher's alpha_weighted; ``lambda_max = s_max^2``)."""
    if not (lambda_max > 0):
        raise ValueError(f"lambda_max: must be > 0, got {lambda_max!r}")
    return float(alpha) * math.log10(float(lambda_max))


def log_alpha_norm(eigs: Any, alpha: float) -> float:
    """``log10 sum_j lambda_j^alpha`` over all given eigenvalues (WeightWatcher's log_alpha_norm),
    computed as ``alpha log10 lambda_max + log10 sum (lambda_j / lambda_max)^alpha`` (no overflow)."""
    lam = _as_eigs(eigs)
    lam = np.maximum(lam, 0.0)
    top = float(np.max(lam)) if lam.size else 0.0
    if top <= 0:
        raise ValueError("eigs: need at least one positive eigenvalue")
    return float(alpha) * math.log10(top) + math.log10(float(np.sum((lam / top) ** float(alpha))))


def ww_warning(alpha: float) -> str:
    """WeightWatcher's per-layer warning: ``"over-trained"`` (alpha < 2), ``"under-trained"``
    (alpha > 6), else ``""``."""
    if not math.isfinite(alpha):
        return ""
    return "over-trained" if alpha < 2.0 else "under-trained" if alpha > 6.0 else ""


def pareto_rvs(rng: Any, size: int, alpha: float, xmin: float = 1.0) -> np.ndarray:
    """``size`` draws of the continuous power law ``p(x) = (alpha-1)/xmin (x/xmin)^-alpha``, ``x >= xmin``:
    ``x = xmin u^(-1/(alpha-1))`` with ``u`` uniform on (0, 1]. ``rng``: a numpy Generator or int seed."""
    if not (alpha > 1):
        raise ValueError(f"alpha: must be > 1, got {alpha!r}")
    if not (xmin > 0):
        raise ValueError(f"xmin: must be > 0, got {xmin!r}")
    gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    u = 1.0 - gen.random(int(size))  # (0, 1]
    return float(xmin) * u ** (-1.0 / (float(alpha) - 1.0))
