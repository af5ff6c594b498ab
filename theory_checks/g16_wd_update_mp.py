"""G16: the random-matrix premise where weight decay has made training forget the initialisation.

The paper's MP argument (arXiv 2309.03004; SPEC 3.3) treats what SGD accumulates into the key
matrix as a sum of many near-iid rank-one terms eta x^T, decayed by r = 1 - lr wd per step over
N = B min(t, T_eff) samples. Its MP sweep runs wd in {0, 1e-3, 1e-2, 0.1, 0.3}. The checks so far
ask the MP question at wd = 0 (G9), where the trained K is ~90% its iid initialisation and the
update K - K0 also holds the whole fitting phase, or judge only the 80%-mass ratio (G7). This check
asks it where the premise's regime holds: on G7's weight-decay arm (lr wd T = 6, LayerNorm without
affine parameters, as in the paper's MP runs), whose initialisation is decayed to r^T K0 with a
share <= 0.1 of ||K||^2 (G7's gate).

Statistic (blocks 2..L, per seed the mean over blocks): the update U = K_T - r^T K_0 (exactly the
decayed sum of the SGD terms: with coupled L2 decay and plain SGD, K_T = r^T K_0 - lr sum_t r^(T-1-t)
grad_t); the eigenvalues of U^T U; :func:`gradsparse.rmt.fit_mp` (c free) removes k Tracy-Widom
spikes (level 0.05, the signal) and gives the KS distance of the d - k bulk to its fitted MP law.
Reference: G9's null (:func:`theory_checks.g09_isotropy_mp.update_null`): the measured spikes
planted into iid-factor noise with the arm's n, d, B, min(t, T_eff) and decay weights r^(T-1-t),
:data:`~theory_checks.g09_isotropy_mp.NULL_DRAWS` draws through the same fit; z = (KS - null median)
/ (null q95 - null median) (1 at the null's 95% quantile).

Plan (pre-registered):

- primary ``wd_update_bulk_mp`` (margin 1.0 on z: the null's own 95% quantile, G9's margin): the
  bulk of what SGD accumulates, where training carries K, is as MP-shaped as iid-factor noise of its
  size and sample count. Gates: G7's ``wd_init_forgotten`` (r^(2T)||K0||^2/||K_T||^2 <= 0.1) and
  ``wd_learned`` (test accuracy >= 0.3), and ``wd_many_samples``: c_eta = n / (B min(t, T_eff))
  <= 0.5 (G9's premise: many samples per dimension).
- context ``sgd_update_bulk_mp``: the same statistic on the wd-0 baseline's K_T - K_0 (the shared
  affine-LN run; G9 asks it on its own non-affine arms), where the update holds the fitting phase.
- context ``wd_update_mass80`` and ``sgd_update_mass80`` (margin ln 2, G7's): ln(mass80(U U^T) /
  mass80 of MP at c = d/n), max over blocks 2..L: the update's 80%-mass ratio (the P-K review: 138-825
  at wd 0) against MP at the aspect ratio at which an iid accumulation of N >> n terms converges
  (4.20 at d/n = 1/4; G7's simulated finite-N null: 4.28-4.29). The paper's literal c = p / (B
  min(t, T_eff)) (c_x = d/N, c_eta = n/N, both ~1e-3-1e-2, MP mass80 ~1.1-1.2) is reported beside
  it in ``numbers``, not used: SPEC 3.3 (the update is a product of two factors) says why.

Design notes: (1) At wd > 0, K_T - K_0 is ~99% -K_0 (||K_T||^2 is 0.5-1.4% of ||K_0||^2 in G7's
pilot), so the update judged is K_T - r^T K_0, the decayed accumulation itself; at wd 0 it is
K_T - K_0. (2) No new training: both arms are G7's (same configs, same cache). (3) The margin is
the null quantile (G9's), fixed before any G16 run; no pilot number sets it.

Pilot (seeds 1000-1002, quick, outside the test seeds: this module's own ``run`` on
``Context(preset="quick", seeds=[1000, 1001, 1002])``, i.e.
``python -m theory_checks.pilot G16 --preset quick --seeds 1000 1001 1002``; 61 s for the
analysis with the runs trained): wd arm: TW spikes 54 of 128, bulk KS 0.162 against a null median
0.026 (q95 0.032), z 26.3 +- 6.1; mass80(U) (max block) 1404 +- 269 against MP(d/n) 4.20; wd 0:
spikes 49, KS 0.125, z 17.1 +- 2.3, mass80(K - K0) 172 (the review's 138-825). Gates: init share
0.0012 (<= 0.1), test accuracy 0.45 (>= 0.3), c_eta 0.008 (<= 0.5). The paper's literal c at the wd
arm: c_x = 0.002, c_eta = 0.008, MP mass80 1.13 and 1.28.

What this means for G7 (reported, not judged here): on the same arm mass80(K) is 6.8-7.7 while
mass80(K - r^T K0) is ~1100-2000, although the decayed initialisation holds only 0.04-0.12% of
||K||^2. By COUNT, ~80% of K's singular values (pilot seed 1000, block 3: 0.80; 0.0015-0.004, the
range of r^T K0's 0.0015-0.0042) are the initialisation's remnant; what SGD accumulated is ~10-20
large directions over a bulk 10x below the remnant. The 80%-mass ratio counts eigenvalues, so G7's
energy-share gate does not certify that its concentration is the trained part's: ``init_range`` in
``per_seed`` gives that share per seed. (The float32 rounding of the decay over 2000 steps is
~5e-9 in singular value, pilot; the remnant is exact.)
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
from threadpoolctl import threadpool_limits

from gradsparse.figures import plot_bars
from theory_checks.context import SGD, Context, describe, init_model, sgd_config, sgd_runs, tail
from theory_checks.g07_spectral_concentration import (GATES_WD, MASS_MARGIN, MASS_SOURCE, decay_factor, gate_plans as
                                                      g07_gate_plans, gate_stats, keys, log_ratio, mass80, mp_mass80,
                                                      null_window, wd_arm_config, wd_arm_runs, wd_for)
from theory_checks.g09_isotropy_mp import (C_MAX, MARGIN, MARGIN_SOURCE, NULL_DRAWS, Q_KS, ks_z, update_bulk,
                                           update_null)
from theory_checks.plan import CheckPlan, GatePlan, PartPlan, arm
from theory_checks.protocol import Check, Finding
from theory_checks.verdicts import Gate, fmt, margin_verdict, mean_sd

PILOT = ("pilot seeds 1000-1002: wd arm z 26.3 +- 6.1 (KS 0.162, null median 0.026, q95 0.032), mass80(U) 1404; "
         "wd 0 z 17.1, mass80 172")
#: the null's generator tag (independent of G9's draws)
NULL_TAG = 0x6916

WHY = ("where weight decay has made training forget the initialisation, K is the decayed sum of the SGD terms "
       "eta x^T; the RMT argument's premise (near-isotropic independent noise) makes that sum's bulk, once the few "
       "signal spikes are removed, an MP bulk like iid-factor noise with the same sizes, sample count and decay")


def arm_configs(preset: str, wd: float) -> dict[str, Any]:
    return {"sgd": sgd_config(preset), "sgd_wd": wd_arm_config(preset, wd)}


PARTS = [
    PartPlan("wd_update_bulk_mp", "margin", "primary",
             "sgd_wd: K_T - r^T K_0 bulk (TW spikes removed): KS to its MP fit, z vs the iid-factor null with the "
             "arm's decay weights, mean over blocks 2..L", MARGIN, MARGIN_SOURCE,
             gates=GATES_WD + ("wd_many_samples",), why=WHY),
    PartPlan("sgd_update_bulk_mp", "margin", "context",
             "sgd (wd 0): K_T - K_0 bulk: KS to its MP fit, z vs the iid-factor null, mean over blocks 2..L", MARGIN,
             MARGIN_SOURCE, gates=(),
             why="at wd 0 the update sums the whole run, fitting phase included: not the stationary noise the premise "
                 "is about"),
    PartPlan("wd_update_mass80", "margin", "context",
             "sgd_wd: ln(mass80 of U U^T / mass80 of MP at c = d/n), U = K_T - r^T K_0, max over blocks 2..L",
             MASS_MARGIN, MASS_SOURCE, gates=GATES_WD,
             why="the update's 80%-mass ratio against MP (reported as the review asked; G7 judges K's on this arm)"),
    PartPlan("sgd_update_mass80", "margin", "context",
             "sgd (wd 0): ln(mass80 of (K_T - K_0)(K_T - K_0)^T / mass80 of MP at c = d/n), max over blocks 2..L",
             MASS_MARGIN, MASS_SOURCE, gates=(),
             why="what SGD adds without decay (fitting phase included); G7 reports it against its simulated null"),
]


def gate_plans() -> list[GatePlan]:
    g7 = {g.name: g for g in g07_gate_plans()}
    return [g7[n] for n in GATES_WD] + [
        GatePlan("wd_many_samples", "<=", C_MAX, "sgd_wd: c_eta = n / (B min(t, T_eff)), the largest aspect ratio of "
                 "the accumulation (G9's premise: many samples per dimension)", arms=("sgd_wd",))]


def plan(preset: str, p: dict[str, Any]) -> CheckPlan:
    cfgs = arm_configs(preset, p["wd"])
    return CheckPlan(arms=[arm("sgd", cfgs["sgd"], note="the shared plain-SGD baseline (wd 0)"),
                           arm("sgd_wd", cfgs["sgd_wd"], note=f"G7's arm: wd {p['wd']:g}, LN without affine")],
                     parts=list(PARTS), gates=gate_plans(),
                     notes=[f"{p.get('null_draws', NULL_DRAWS)} null draws per block and seed (G9's null, decay "
                            "weights of the arm); no new training: the arms are G7's"])


def decay_weights(cfg: Any) -> tuple[int, np.ndarray]:
    """(steps the null accumulates = min(t, T_eff), their weights r^(steps-1-t), oldest first)."""
    steps = null_window(cfg.steps, cfg.lr, cfg.weight_decay)
    r = 1.0 - cfg.lr * cfg.weight_decay
    return steps, r ** (steps - 1 - np.arange(steps, dtype=np.float64))


def init_range_share(K: np.ndarray, K0_decayed: np.ndarray) -> float:
    """Fraction of K's singular values at or below the largest singular value of the decayed
    initialisation r^T K0: how much of K's spectrum, counted by eigenvalue (what the 80%-mass ratio
    counts), sits where the initialisation's remnant lives."""
    sK = np.linalg.svd(np.asarray(K, np.float64), compute_uv=False)
    s0 = np.linalg.svd(np.asarray(K0_decayed, np.float64), compute_uv=False)
    return float(np.mean(sK <= s0[0]))


def update_stats(U: np.ndarray, steps: int, batch: int, weights: np.ndarray, rng: np.random.Generator,
                 draws: int = NULL_DRAWS) -> dict[str, float]:
    """One block's update statistics: TW spikes, bulk KS, its null median / q95 and z, mass80 of U U^T."""
    U = np.asarray(U, np.float64)
    n, d = U.shape
    k, ks, spikes = update_bulk(np.linalg.eigvalsh(U.T @ U))
    null = update_null(n, d, steps, batch, weights, spikes, rng, draws)
    return {"spikes": float(k), "ks": ks, "null_median": float(np.median(null)),
            "null_q": float(np.quantile(null, Q_KS)), "z": ks_z(ks, null), "mass80": mass80(U)}


def arm_updates(ctx: Context, runs: Sequence[Any], cfg: Any, tag: int, draws: int = NULL_DRAWS
                ) -> list[list[dict[str, float]]]:
    """Per seed, per block (2..L), :func:`update_stats` of U = K_T - r^T K_0."""
    ds = ctx.data(cfg.data, cfg.n_train, cfg.n_test)
    decay = decay_factor(cfg.lr, cfg.weight_decay, cfg.steps)
    steps, w = decay_weights(cfg)
    out = []
    for s, r in zip(ctx.seeds, runs):
        Ks, K0s = keys(r.model), keys(init_model(cfg.replace(seed=s), ds))
        first = 1 if len(Ks) > 1 else 0
        rows = []
        with threadpool_limits(limits=1, user_api="blas"):  # many small eigenproblems (G9's ONE_THREAD)
            for i, (k, k0) in enumerate(zip(Ks, K0s)):
                if i < first:
                    continue
                rng = np.random.default_rng([NULL_TAG, int(s), int(tag), i])
                row = update_stats(k - decay * k0, steps, cfg.batch_size, w, rng, draws)
                row["init_range"] = init_range_share(k, decay * k0)
                rows.append(row)
        out.append(rows)
    return out


def run(ctx: Context, p: dict[str, Any]) -> Finding:
    cfgs = arm_configs(ctx.preset, p["wd"])
    runs = {"sgd": sgd_runs(ctx), "sgd_wd": wd_arm_runs(ctx, p["wd"])}
    draws = int(p.get("null_draws", NULL_DRAWS))
    stats = {a: arm_updates(ctx, runs[a], cfgs[a], j, draws) for j, a in enumerate(cfgs)}
    d, n = cfgs["sgd"].width, cfgs["sgd"].width * cfgs["sgd"].mlp_ratio
    mp_ref = mp_mass80(d / n)
    per_seed: dict[str, list[float]] = {}
    for a, rows in stats.items():
        for k in ("spikes", "ks", "null_median", "null_q", "z", "init_range"):
            per_seed[f"{a}_update_{k}"] = [float(np.mean([b[k] for b in seed])) for seed in rows]
        per_seed[f"{a}_update_mass80_max"] = [float(max(b["mass80"] for b in seed)) for seed in rows]
    mass_harm = {a: [log_ratio(m, mp_ref) for m in per_seed[f"{a}_update_mass80_max"]] for a in cfgs}
    pp = {q.name: q for q in PARTS}
    parts = {
        "wd_update_bulk_mp": margin_verdict(per_seed["sgd_wd_update_z"], MARGIN, source=MARGIN_SOURCE,
                                            what=pp["wd_update_bulk_mp"].what),
        "sgd_update_bulk_mp": margin_verdict(per_seed["sgd_update_z"], MARGIN, source=MARGIN_SOURCE,
                                             what=pp["sgd_update_bulk_mp"].what),
        "wd_update_mass80": margin_verdict(mass_harm["sgd_wd"], MASS_MARGIN, source=MASS_SOURCE,
                                           what=pp["wd_update_mass80"].what),
        "sgd_update_mass80": margin_verdict(mass_harm["sgd"], MASS_MARGIN, source=MASS_SOURCE,
                                            what=pp["sgd_update_mass80"].what),
    }
    wcfg = cfgs["sgd_wd"]
    ds = ctx.data(wcfg.data, wcfg.n_train, wcfg.n_test)
    gs = gate_stats(runs["sgd_wd"], wcfg, ds, ctx.seeds)
    steps_w, _ = decay_weights(wcfg)
    N = wcfg.batch_size * steps_w
    by = {g.name: g for g in gate_plans()}
    value = {"wd_init_forgotten": max(gs["init_share"]), "wd_learned": min(gs["acc"]), "wd_many_samples": n / N}
    gates = [Gate(k, float(v), by[k].op, by[k].threshold, by[k].what) for k, v in value.items()]
    per_seed.update({"wd_init_share": gs["init_share"], "wd_test_acc": gs["acc"]})
    numbers = {"mp_mass80_d_over_n": mp_ref, "N_wd": float(N), "c_x_wd": d / N, "c_eta_wd": n / N,
               "mp_mass80_c_x_wd": mp_mass80(d / N), "mp_mass80_c_eta_wd": mp_mass80(n / N),
               "N_sgd": float(cfgs["sgd"].batch_size * cfgs["sgd"].steps)}
    g = lambda a, k: mean_sd(per_seed[f"{a}_update_{k}"])  # noqa: E731
    measured = "; ".join(
        f"{a} ({'wd ' + fmt(p['wd']) + ', U = K - r^T K0' if a == 'sgd_wd' else 'wd 0, U = K - K0'}): TW spikes "
        f"{g(a, 'spikes')}, bulk KS {g(a, 'ks')} (null median {g(a, 'null_median')}, q95 {g(a, 'null_q')}), z "
        f"{g(a, 'z')}; mass80(U) max block {g(a, 'mass80_max')} vs MP(d/n) {fmt(mp_ref)}" for a in ("sgd_wd", "sgd"))
    measured += (f"; share of K's singular values inside the decayed init's range (wd arm) "
                 f"{mean_sd(per_seed['sgd_wd_update_init_range'])}")
    measured += (f"; paper's c at the wd arm: c_x {fmt(d / N)}, c_eta {fmt(n / N)} (MP mass80 {fmt(mp_mass80(d / N))}, "
                 f"{fmt(mp_mass80(n / N))}); init share {mean_sd(gs['init_share'])}, test acc {mean_sd(gs['acc'])}")
    ser = {a: {"bulk z": per_seed[f"{a}_update_z"], "TW spikes / 10": [x / 10 for x in per_seed[f"{a}_update_spikes"]]}
           for a in cfgs}
    return Finding(None, measured, per_seed=per_seed, numbers=numbers, parts=parts, gates=gates, series=ser,
                   model=f"sgd: {describe(cfgs['sgd'])}; sgd_wd: {describe(wcfg)}, wd {p['wd']:g}, LN without affine",
                   notes=[f"blocks 2..L; null: {draws} draws per block and seed of planted spikes + iid factors with "
                          f"B {wcfg.batch_size}, min(t, T_eff) = {steps_w} steps and decay r = "
                          f"{1 - wcfg.lr * wcfg.weight_decay:.6g} (wd arm) / {cfgs['sgd'].steps} equal steps (wd 0)",
                          "at wd > 0 the judged update is K - r^T K0 (K - K0 is ~99% -K0 there)"])


def figures(ser: dict[str, Any], out_dir) -> list:
    groups = {a: v for a, v in ser.items() if all(len(x) for x in v.values())}
    if not groups:
        return []
    return plot_bars(groups, out_dir / "g16_update_bulk", ylabel="z (1 = null's 95% quantile); spikes / 10",
                     title="G16: the update's bulk against the iid-factor null, with and without weight decay")


CHECK = Check(
    name="G16",
    slug="g16_wd_update_mp",
    title="MP premise where the init is forgotten",
    claim=("With weight decay strong enough that training, not the initialisation, carries K, the bulk of what SGD "
           "accumulated into K (after removing its Tracy-Widom spikes) is as Marchenko-Pastur shaped as iid-factor "
           "noise of the same sizes, sample count and decay."),
    rule=(f"Margin part on z = (KS - null median) / (null q95 - null median), the KS distance of the update's bulk to "
          f"its MP fit against {NULL_DRAWS} draws of G9's planted-spike iid-factor null, mean over blocks 2..L; PASS "
          f"when the one-sided 95% upper bound of the mean z < {MARGIN:g}, FAIL when the lower bound > {MARGIN:g}. "
          f"Primary on G7's weight-decay arm, gated on G7's init share <= 0.1 and test accuracy >= 0.3 and on "
          f"c_eta <= {C_MAX}. Context: the wd-0 update, and both updates' 80%-mass ratios against MP at d/n."),
    presets={k: {"sgd": SGD[k], "wd": wd_for(SGD[k]), **({"null_draws": 5} if k == "smoke" else {})}
             for k in ("smoke", "quick", "standard", "full")},
    run=run,
    figures=figures,
    plan=plan,
)
