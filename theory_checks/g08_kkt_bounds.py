"""G8: eta^T K K^T eta lies between lambda_min+ ||P eta||^2 and lambda_max ||eta||^2, tight when concentrated.

Reading used here. K is n x d (n > d), so K K^T (n x n) has rank <= d. With K = U S V^T (thin SVD,
U: n x r, r = rank, non-zero singular values s_i > rtol s_max) and lambda_i = s_i^2 the non-zero
eigenvalues of K K^T:

    q_t := eta_t^T K K^T eta_t = ||K^T eta_t||^2 = sum_i lambda_i (u_i . eta_t)^2,

so with P = U U^T the orthogonal projector onto range(K K^T) = the column space of K (the row space
of K^T) and rho_t := q_t / ||P eta_t||^2 (a weighted mean of the lambda_i):

    lambda_min+ ||P eta_t||^2 <= q_t <= lambda_max ||P eta_t||^2 <= lambda_max ||eta_t||^2.

"Tight when concentrated": when the spectrum is concentrated, the extreme eigenvalues can be
replaced by the edges [lambda_lo, lambda_hi] of the narrowest log-interval holding 80% of the
lambda_i (the interval behind the 80%-mass ratio) - i.e. rho_t falls inside that band for most
tokens, so q_t ~ lambda ||P eta_t||^2 to within the band ratio. eta_t (= dL/dz_t, per token) comes
from the activation probes of ``gradsparse.train._grads`` on the held-out batch of each trained
baseline model; tokens with eta_t = 0 are left out.
"""

from __future__ import annotations

import math
from typing import Any

import jax.numpy as jnp
import numpy as np

from gradsparse.models import default_trainable
from gradsparse.step import forward_backward
from theory_checks.context import SGD, Context, describe, heldout, init_model, sgd_config, sgd_runs
from theory_checks.protocol import Check, Finding
from theory_checks.verdicts import bound_verdict, combine, mean_sd

BAND_OK, BAND_BAD = 0.8, 0.5
#: rho/mean(lambda): 1 when eta spreads evenly over range(K); "aligns with small eigen-directions" means
#: well below 1 (the review's quick run: median rho near the band centre)
RHO_OK, RHO_BAD = 0.5, 0.25
REL_TOL = 1e-5


def band80(lam: np.ndarray, mass: float = 0.8) -> tuple[float, float]:
    """Edges of the narrowest interval of log10(lam) holding ceil(mass * m) of the m eigenvalues."""
    lam = np.asarray(lam, np.float64).ravel()
    if lam.size == 0 or not np.all(np.isfinite(lam)) or np.any(lam <= 0):
        raise ValueError("band80 needs a non-empty array of positive finite eigenvalues")
    if not 0 < mass <= 1:
        raise ValueError(f"mass must lie in (0, 1], got {mass}")
    logs = np.sort(np.log10(lam))
    m = logs.size
    k = max(1, math.ceil(mass * m - 1e-12))
    widths = logs[k - 1:] - logs[: m - k + 1]
    j = int(np.argmin(widths))
    return float(10 ** logs[j]), float(10 ** logs[j + k - 1])


def bound_stats(K: np.ndarray, eta: np.ndarray, rtol: float | None = None) -> dict[str, float]:
    """Sandwich and band statistics of q_t = ||K^T eta_t||^2 for eta (N, n), K (n, d)."""
    K = np.asarray(K, np.float64)
    eta = np.asarray(eta, np.float64)
    if K.ndim != 2 or eta.ndim != 2 or eta.shape[1] != K.shape[0]:
        raise ValueError(f"need K (n, d) and eta (N, n), got {K.shape} and {eta.shape}")
    U, s, _ = np.linalg.svd(K, full_matrices=False)
    tol = (max(K.shape) * np.finfo(np.float32).eps) if rtol is None else rtol
    keep = s > tol * s[0]
    U, lam = U[:, keep], s[keep] ** 2
    keep_t = np.sum(eta * eta, 1) > 0
    eta = eta[keep_t]
    proj = eta @ U                                   # (N, r): u_i . eta_t
    q = (proj ** 2) @ lam
    peta = np.sum(proj ** 2, 1)
    eta2 = np.sum(eta ** 2, 1)
    lower, upper = lam.min() * peta, lam.max() * eta2
    ok = (lower <= q * (1 + REL_TOL)) & (q <= upper * (1 + REL_TOL))
    rho = q / np.where(peta > 0, peta, 1.0)
    lo, hi = band80(lam)
    in_band = (rho >= lo * (1 - REL_TOL)) & (rho <= hi * (1 + REL_TOL))
    return {"tokens": float(eta.shape[0]), "sandwich_frac": float(np.mean(ok)) if ok.size else math.nan,
            "band_frac": float(np.mean(in_band)) if ok.size else math.nan, "band_ratio": hi / lo,
            "eig_ratio": float(lam.max() / lam.min()),
            "upper_slack_median": float(np.median(upper / q)) if ok.size else math.nan,
            "lower_slack_median": float(np.median(q / lower)) if ok.size else math.nan,
            "proj_frac_median": float(np.median(peta / eta2)) if ok.size else math.nan,
            "rho_over_mean_median": float(np.median(rho) / np.mean(lam)) if ok.size else math.nan,
            "null_share_iid": float(lam.size / K.shape[0])}


def model_stats(model: Any, x: np.ndarray, y: np.ndarray) -> list[dict[str, float]]:
    """:func:`bound_stats` for every MLP block of ``model`` on (x, y)."""
    _, _, aux, _, g_probes = forward_backward(model, default_trainable(model), jnp.asarray(x), jnp.asarray(y), None)
    out = []
    for blk, a, g in zip(model.mlp_blocks(), aux, g_probes):
        eta = np.asarray(g["a"]) * np.asarray(blk.act.deriv(a["z"]))
        out.append(bound_stats(np.asarray(blk.key.effective_weight()), eta))
    return out


def run(ctx: Context, p: dict[str, Any]) -> Finding:
    cfg = sgd_config(ctx.preset)
    ds = ctx.data(cfg.data, cfg.n_train, cfg.n_test)
    x, y = heldout(ctx, cfg, p["tokens"])
    sand, proj, proj0, rho, rho0, band, bratio = [], [], [], [], [], [], []
    share = None
    for s, r in zip(ctx.seeds, sgd_runs(ctx)):
        st = model_stats(r.model, x, y)
        st0 = model_stats(init_model(cfg.replace(seed=s), ds), x, y)
        share = st[0]["null_share_iid"]
        sand.append(min(b["sandwich_frac"] for b in st))
        proj.append(min(b["proj_frac_median"] for b in st))
        proj0.append(min(b["proj_frac_median"] for b in st0))
        rho.append(min(b["rho_over_mean_median"] for b in st))
        rho0.append(min(b["rho_over_mean_median"] for b in st0))
        band.append(min(b["band_frac"] for b in st))
        bratio.append(max(b["band_ratio"] for b in st))
    parts = {
        "null_space_route_closed": bound_verdict(
            proj, passes=lambda v: v >= share, fails=lambda v: v < 0.5 * share,
            what="median ||P eta||^2/||eta||^2 (min over blocks); a random direction has d/n",
            bound=f">= d/n = {share:g}", fail_bound=f"< d/(2n) = {0.5 * share:g}"),
        "small_eigen_route_closed": bound_verdict(
            rho, passes=lambda v: v >= RHO_OK, fails=lambda v: v < RHO_BAD,
            what="median rho_t / mean(lambda) (min over blocks); eta spread evenly over range(K) gives 1",
            bound=f">= {RHO_OK}", fail_bound=f"< {RHO_BAD}"),
        "sandwich": bound_verdict(sand, passes=lambda v: v >= 1.0, fails=lambda v: v < 0.99,
                                  what="fraction of tokens inside [lambda_min+ ||P eta||^2, lambda_max ||eta||^2] "
                                       "(min over blocks; a theorem: an implementation test)",
                                  bound="= 1", fail_bound="< 0.99"),
    }
    return Finding(
        combine(parts),
        measured=(f"median ||P eta||^2/||eta||^2 {mean_sd(proj)} (init {mean_sd(proj0)}; iid d/n {share:g}); median "
                  f"rho/mean(lambda) {mean_sd(rho)} (init {mean_sd(rho0)}); sandwich holds for {mean_sd(sand)} of tokens; "
                  f"rho in the 80% band for {mean_sd(band)}, band ratio {mean_sd(bratio)}"),
        per_seed={"proj_frac_median": proj, "proj_frac_median_init": proj0, "rho_over_mean_median": rho,
                  "rho_over_mean_median_init": rho0, "sandwich_frac": sand, "band_frac": band, "band_ratio": bratio},
        parts=parts, model=describe(cfg),
        notes=[f"held-out batch of {x.shape[0]} tokens; eta from the activation probes (batch-mean loss; the "
               f"statistics are scale-free); relative tolerance {REL_TOL}; rank threshold max(n,d)*eps32*s_max"])


CHECK = Check(
    name="G8",
    slug="g08_kkt_bounds",
    title="eta^T K K^T eta bounds",
    claim=("The routes the lower bound of eta^T K K^T eta ignores are closed after SGD training: eta does not hide in "
           "the null space of K^T (its share in range(K) is at least the d/n of a random direction) and does not align "
           "with the small eigen-directions of K K^T (rho = eta^T K K^T eta / ||P eta||^2 is not far below the mean "
           "eigenvalue); the sandwich lambda_min+ ||P eta||^2 <= eta^T K K^T eta <= lambda_max ||eta||^2 holds."),
    rule=(f"Bound parts per seed on the plain-SGD baseline (min over blocks): null-space route PASS when the median "
          f"share ||P eta||^2/||eta||^2 >= d/n in every seed, FAIL when < d/(2n) in a majority; small-eigen route PASS "
          f"when the median rho/mean(lambda) >= {RHO_OK}, FAIL when < {RHO_BAD} in a majority; sandwich (a theorem) "
          f"PASS when every token satisfies it. PASS needs all parts, FAIL any."),
    presets={"smoke": {"sgd": SGD["smoke"], "tokens": 64}, "quick": {"sgd": SGD["quick"], "tokens": 256},
             "full": {"sgd": SGD["full"], "tokens": 512}},
    run=run,
)
