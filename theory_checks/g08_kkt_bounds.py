"""G8: eta^T K K^T eta lies between lambda_min+ ||P eta||^2 and lambda_max ||eta||^2, and training does not
open the routes the lower bound ignores.

Reading used here. K is n x d (n > d), so K K^T (n x n) has rank <= d. With K = U S V^T (thin SVD,
U: n x r, r = rank, non-zero singular values s_i > rtol s_max) and lambda_i = s_i^2 the non-zero
eigenvalues of K K^T:

    q_t := eta_t^T K K^T eta_t = ||K^T eta_t||^2 = sum_i lambda_i (u_i . eta_t)^2,

so with P = U U^T the orthogonal projector onto range(K K^T) = the column space of K and
rho_t := q_t / ||P eta_t||^2 (a weighted mean of the lambda_i):

    lambda_min+ ||P eta_t||^2 <= q_t <= lambda_max ||P eta_t||^2 <= lambda_max ||eta_t||^2.

The sandwich is a theorem: it is an IMPLEMENTATION part (kind exact, float tolerance REL_TOL),
reported apart from the theory evidence. The theory's content is that the two routes by which q_t
could be small while eta_t is not are closed: (a) the null-space route, eta hiding in null(K^T)
(share ||P eta||^2/||eta||^2 small) and (b) the small-eigen route, eta aligning with the small
eigen-directions of K K^T (rho_t well below the mean eigenvalue). eta_t (= dL/dz_t per token) comes
from the activation probes of ``gradsparse.train._grads`` on one held-out batch (the same tokens for
every arm and for the initial models); tokens with eta_t = 0 are left out.

Why the old design could not answer (CHECKS_REVIEW_T3, P-K): it compared the trained model with the
random-direction levels (share >= d/n, rho/mean(lambda) >= 0.5), which an UNTRAINED model already
meets (share 0.246-0.251 against d/n = 0.25, rho/mean 0.98-1.01), and at wd 0 the trained K is ~90%
its initialisation. So the test is now what training did, where training carries K.

The prediction's sign, from the mechanism. SGD writes K from the effective gradients: the terms
-lr eta x^T put range(K - r^T K0) inside span{eta_s} of past tokens, and the largest singular
directions of that sum are the directions eta used most. So training moves range(K) toward the eta's
and weights them by how often eta lies there: it cannot push eta into null(K^T) or onto the small
eigen-directions; the prediction is "training does not open the routes" (share and rho/mean(lambda)
do not fall below their initial values), a non-inferiority statement: margin parts, harm =
ln(initial / trained), where "initial" is the same statistic of the same seed's initial model on the
same tokens.

Plan (pre-registered, :func:`plan`). Arms and gates are G7's (:mod:`theory_checks.g07_spectral_concentration`):
``sgd`` (the shared wd-0 baseline) and ``sgd_wd`` (weight decay with lr wd T = 6, LayerNorm without
affine parameters: the arm where training, not the initialisation, carries K), the same configs and
so the same cached runs as G7. Blocks 2..L for the routes (as in G7; block 1's inputs span the 40
mnist1d features); the sandwich on every block, trained and initial models of both arms.

- primary ``wd_null_route_closed`` (margin ln 2): harm = max over blocks 2..L of
  ln(median share at init / median share trained) on the wd arm;
- primary ``wd_small_eigen_route_closed`` (margin ln 2): the same for the median rho/mean(lambda);
  both gated on ``wd_init_forgotten`` and ``wd_learned`` (G7's thresholds). Margin ln 2: training
  may not halve the statistic, which would double the lower bound's slack; the relative form of the
  former check's share FAIL bound (d/(2n), half the random-direction level) and rho PASS bound (0.5,
  half the even-spread level), stated before the pilots;
- context: the same two on the wd-0 arm, gated on ``sgd_init_forgotten`` (regime not reached: shown
  with its numbers); the fraction of tokens whose rho falls inside the 80% eigenvalue band ("tight
  when concentrated") is reported in the measured line;
- implementation ``sandwich`` (exact): every token of every block satisfies the sandwich.

Pilots (seed 1000, quick config, 256 held-out tokens, blocks 2..4; the wd-0 arm and the wd-0.03
arm without LN affine of G7's pilots (an exploratory script, not part of the package)):
- wd 0: share 0.31-0.35 (init 0.243-0.248), rho/mean 1.12-1.23 (init 0.99-1.00): harm about -0.3
  and -0.2 (both routes closed, by a small amount: K is mostly its initialisation);
- wd 0.03, LN without affine (the wd arm): share 0.79-0.81 (init 0.24-0.25), rho/mean 10.5-11.4
  (init ~1.0): harm about -1.2 and -2.4; rho lies OUTSIDE the 80% band for every token (band
  fraction 0.0): eta sits on K's largest directions, so the lower bound is loose on the safe side.
"""

from __future__ import annotations

import math
from typing import Any

import jax.numpy as jnp
import numpy as np

from gradsparse.models import default_trainable
from gradsparse.step import forward_backward
from theory_checks import g07_spectral_concentration as g07
from theory_checks.context import SGD, Context, describe, heldout, init_model, sgd_config, sgd_runs, tail
from theory_checks.plan import CheckPlan, PartPlan
from theory_checks.protocol import Check, Finding
from theory_checks.verdicts import bound_verdict, margin_verdict, mean_sd

REL_TOL = 1e-5
#: floor of a trained statistic in the log-ratio harms (a route opened completely gives ln(init / FLOOR))
FLOOR = 1e-12
ROUTE_MARGIN = math.log(2.0)
ROUTE_SOURCE = ("training may not halve the statistic (the lower bound's slack would double): the relative form of "
                "the former bounds share >= d/(2n) and rho/mean >= 0.5, stated before the pilots")
WHY_NULL = ("SGD writes K from eta x^T terms, so range(K) moves toward the eta's: where training carries K "
            "(gates), the theory predicts that eta's share in range(K) does not fall below its initial value; a "
            "halving would mean eta hides in null(K^T), the route the lower bound ignores")
WHY_SMALL = ("the largest directions of the SGD sum are those eta used most, so rho_t (the eta-weighted mean of "
             "the eigenvalues) does not fall below its initial level relative to the mean eigenvalue; a halving "
             "would mean eta aligns with the small eigen-directions, the other ignored route")
WD_GATES = ("wd_init_forgotten", "wd_learned")
PARTS = [
    PartPlan("wd_null_route_closed", "margin", "primary",
             "sgd_wd: ln(median ||P eta||^2/||eta||^2 at init / trained), max over blocks 2..L", ROUTE_MARGIN,
             ROUTE_SOURCE, gates=WD_GATES, why=WHY_NULL),
    PartPlan("wd_small_eigen_route_closed", "margin", "primary",
             "sgd_wd: ln(median rho/mean(lambda) at init / trained), max over blocks 2..L", ROUTE_MARGIN, ROUTE_SOURCE,
             gates=WD_GATES, why=WHY_SMALL),
    PartPlan("sgd_null_route_closed", "margin", "context",
             "sgd (wd 0): ln(median share at init / trained), max over blocks 2..L", ROUTE_MARGIN, ROUTE_SOURCE,
             gates=("sgd_init_forgotten",), why="at wd 0 K is ~90% its initialisation (gate): reported, not deciding"),
    PartPlan("sgd_small_eigen_route_closed", "margin", "context",
             "sgd (wd 0): ln(median rho/mean(lambda) at init / trained), max over blocks 2..L", ROUTE_MARGIN,
             ROUTE_SOURCE, gates=("sgd_init_forgotten",),
             why="at wd 0 K is ~90% its initialisation (gate): reported, not deciding"),
    PartPlan("sandwich", "exact", "implementation",
             "fraction of tokens inside [lambda_min+ ||P eta||^2, lambda_max ||eta||^2], min over blocks, arms and "
             "the initial models (a theorem)", gates=()),
]
#: the gates G8 measures (G7's, by name)
GATES = ("wd_init_forgotten", "wd_learned", "sgd_init_forgotten")


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




def route_harms(trained: list[dict[str, float]], initial: list[dict[str, float]]) -> tuple[float, float]:
    """(null-space harm, small-eigen harm) of one seed: max over blocks 2..L of ln(initial / trained)
    of the median share ||P eta||^2/||eta||^2 and of the median rho/mean(lambda) (> 0: training lowered
    the statistic, i.e. opened the route)."""
    if len(trained) != len(initial) or not trained:
        raise ValueError(f"need per-block statistics of equal length, got {len(trained)} and {len(initial)}")
    t, i = tail(trained), tail(initial)

    def harm(key: str) -> float:
        # a statistic that fell to 0 (eta wholly in null(K^T)) is floored at FLOOR: a large finite harm
        return max(g07.log_ratio(b0[key], max(b[key], FLOOR)) for b, b0 in zip(t, i))

    return harm("proj_frac_median"), harm("rho_over_mean_median")


def plan(preset: str, p: dict[str, Any]) -> CheckPlan:
    return CheckPlan(arms=g07.arms(preset, p), parts=list(PARTS),
                     gates=[g for g in g07.gate_plans() if g.name in GATES],
                     notes=["arms and gates are G7's (same configs: the runs are shared)",
                           f"held-out batch of {p['tokens']} tokens, the same for every arm and initial model"])


def _arm(ctx: Context, runs, cfg, ds, x, y) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {k: [] for k in ("share_h", "rho_h", "share", "share0", "rho", "rho0", "sand", "band",
                                                 "band_ratio")}
    for s, r in zip(ctx.seeds, runs):
        st = model_stats(r.model, x, y)
        st0 = model_stats(init_model(cfg.replace(seed=s), ds), x, y)
        sh, rh = route_harms(st, st0)
        out["share_h"].append(sh)
        out["rho_h"].append(rh)
        out["share"].append(min(b["proj_frac_median"] for b in tail(st)))
        out["share0"].append(min(b["proj_frac_median"] for b in tail(st0)))
        out["rho"].append(min(b["rho_over_mean_median"] for b in tail(st)))
        out["rho0"].append(min(b["rho_over_mean_median"] for b in tail(st0)))
        out["sand"].append(min(b["sandwich_frac"] for b in st + st0))
        out["band"].append(min(b["band_frac"] for b in tail(st)))
        out["band_ratio"].append(max(b["band_ratio"] for b in tail(st)))
    return out


def run(ctx: Context, p: dict[str, Any]) -> Finding:
    cfg = sgd_config(ctx.preset)
    wcfg = g07.wd_arm_config(ctx.preset, p["wd"])
    ds = ctx.data(cfg.data, cfg.n_train, cfg.n_test)
    x, y = heldout(ctx, cfg, p["tokens"])
    sruns, wruns = sgd_runs(ctx), g07.wd_arm_runs(ctx, p["wd"])
    sgd, wd = _arm(ctx, sruns, cfg, ds, x, y), _arm(ctx, wruns, wcfg, ds, x, y)
    gates = g07.measure_gates(g07.gate_stats(sruns, cfg, ds, ctx.seeds), g07.gate_stats(wruns, wcfg, ds, ctx.seeds),
                              GATES)
    pp = {q.name: q for q in PARTS}

    def mv(name: str, harms: list[float]):
        return margin_verdict(harms, ROUTE_MARGIN, what=pp[name].what, source=ROUTE_SOURCE)

    sand = [min(a, b) for a, b in zip(sgd["sand"], wd["sand"])]
    parts = {
        "wd_null_route_closed": mv("wd_null_route_closed", wd["share_h"]),
        "wd_small_eigen_route_closed": mv("wd_small_eigen_route_closed", wd["rho_h"]),
        "sgd_null_route_closed": mv("sgd_null_route_closed", sgd["share_h"]),
        "sgd_small_eigen_route_closed": mv("sgd_small_eigen_route_closed", sgd["rho_h"]),
        "sandwich": bound_verdict(sand, passes=lambda v: v >= 1.0, fails=lambda v: v < 0.99, what=pp["sandwich"].what,
                                  bound="= 1", fail_bound="< 0.99", kind="exact"),
    }
    per_seed = {f"{a}_{k}": [float(v) for v in vals] for a, st in (("sgd", sgd), ("wd", wd)) for k, vals in st.items()}
    per_seed["sandwich_frac"] = sand
    return Finding(
        None,
        measured=(f"wd arm (wd {p['wd']:g}), min over blocks 2..L: median share ||P eta||^2/||eta||^2 "
                  f"{mean_sd(wd['share'])} (init {mean_sd(wd['share0'])}), median rho/mean(lambda) {mean_sd(wd['rho'])} "
                  f"(init {mean_sd(wd['rho0'])}), rho in the 80% band for {mean_sd(wd['band'])} of tokens (band ratio "
                  f"{mean_sd(wd['band_ratio'])}). wd 0: share {mean_sd(sgd['share'])} (init {mean_sd(sgd['share0'])}), "
                  f"rho/mean {mean_sd(sgd['rho'])} (init {mean_sd(sgd['rho0'])}), band {mean_sd(sgd['band'])}. "
                  f"Sandwich holds for {mean_sd(sand)} of tokens (min over blocks, arms, initial models)"),
        per_seed=per_seed, parts=parts, gates=gates,
        model=f"sgd: {describe(cfg)}; sgd_wd: {describe(wcfg)}, wd {p['wd']:g}, LN without affine",
        notes=[f"held-out batch of {x.shape[0]} tokens, the same for both arms and their initial models; eta from the "
               f"activation probes (batch-mean loss; the statistics are scale-free); relative tolerance {REL_TOL}; "
               f"rank threshold max(n,d)*eps32*s_max; d/n (a random direction's share) = "
               f"{1.0 / cfg.mlp_ratio:g}"])


CHECK = Check(
    name="G8",
    slug="g08_kkt_bounds",
    title="eta^T K K^T eta bounds",
    claim=("Where SGD training (not the initialisation) carries K, training does not open the routes the lower bound "
           "of eta^T K K^T eta ignores: eta's share ||P eta||^2/||eta||^2 in range(K) and rho = eta^T K K^T eta / "
           "||P eta||^2 relative to the mean eigenvalue do not fall below their values at initialisation "
           "(implementation: lambda_min+ ||P eta||^2 <= eta^T K K^T eta <= lambda_max ||eta||^2 for every token)."),
    rule=(f"Primary margin parts on the weight-decay arm (G7's arm and gates: decayed init share of ||K||^2 <= "
          f"{g07.INIT_SHARE_MAX}, test accuracy >= {g07.LEARNED_MIN}): harm = max over blocks 2..L of ln(initial / "
          f"trained) of the median share and of the median rho/mean(lambda), same held-out tokens; PASS when the "
          f"one-sided 95% upper bound < ln 2, FAIL when the lower bound > ln 2 (a FAIL must survive Holm). Context: "
          f"the same on the wd-0 baseline (gated: init share <= {g07.INIT_SHARE_MAX}). Implementation (exact): the "
          f"sandwich holds for every token."),
    presets={"smoke": {"sgd": SGD["smoke"], "wd": g07.wd_for(SGD["smoke"]), "tokens": 64},
             "quick": {"sgd": SGD["quick"], "wd": g07.wd_for(SGD["quick"]), "tokens": 256},
             "full": {"sgd": SGD["full"], "wd": g07.wd_for(SGD["full"]), "tokens": 512}},
    run=run,
    plan=plan,
)
