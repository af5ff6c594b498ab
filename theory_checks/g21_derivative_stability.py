"""G21: is derivative sparsity more stable than activation sparsity?

Claim (arXiv 2605.25612): derivative sparsity (the fraction of pre-activations in the zero-derivative
set of sigma, SPEC 2.2) is "more stable" than activation sparsity (SPEC 2.1). For ReLU the two sets
are the same set (sigma'(z) = 0 exactly where a = 0; G13's identity, a unit test here), so the
claim can only live where they differ:

- ``gelu`` (G13's GELU arm): GELU has no extended flat region (|sigma'| <= 1e-6 only in the far
  tail), so both sets are relaxed with one stated tolerance TAU = 0.1:
  D = {|sigma'(z)| <= TAU} (a band around sigma's minimum z ~ -0.75 and the negative tail) and
  A = {|a| <= TAU RMS(a)} (a band around z = 0 and the negative tail), RMS over the block's
  (example, unit) activations on the batch;
- ``same_sign`` (G6's discriminating arm, sshaped2(1.5, 1.6, 1.6)): D = the exact flat region
  |z - 1.6| <= 1.5 (sigma' = 0, output 1.6). SPEC 2.1's activation sparsity there counts
  |a - 1.6| <= 1e-6, i.e. the same set (a restatement: reported as ``J_spec21_D``); the definition
  that differs is Lazy Neuron's "near-zero output": literally |a| <= 1e-6 (empty: a crosses 0 at a
  single point, z ~ -1.165; reported), relaxed as A = {|a| <= TAU RMS(a)}.

Stability, defined before measuring. On the fixed held-out batch the training loop monitors,
blocks 2..L, the (example, unit) sets at the checkpoints of the last 20% of training (every
:data:`CKPT` steps: 800, 850, ..., 1000 at quick):

- churn I_S = mean over consecutive checkpoints of the Jaccard distance 1 - |S_t & S_t'| / |S_t | S_t'|;
- its geometric null N_S: the same Jaccard distance when each unit's observed displacements
  z_t' - z_t are permuted across the examples (within the unit) before being added to z_t: the
  churn that the region's shape, the mass near its boundary and the size of the motion give when
  where a pre-activation sits does not change how it moves;
- excess churn I_S / N_S.

Why the excess and not the raw churn decides (design change after the pilot, written down): the raw
ratio I_A / I_D is set by the regions' geometry, not by training. In the pilot it flips sign with
the tolerance (GELU ln(I_A/I_D) -0.21 / -0.08 / +0.92 at TAU 0.05 / 0.1 / 0.2: at 0.2 the
derivative set becomes the whole half-line z < -0.4) and with the normalisation (same-sign: +1.38 by
Jaccard, -0.73 by the unnormalised flip rate |S_t ^ S_t'| / N, because A is a thin band around
z = -1.165 holding 3.6% of the pairs and D a thick region holding 49%), while the geometric null
reproduces every raw churn to 0.2-3%. The theory's mechanism for a stable derivative set is that a
pre-activation inside it sends no gradient through its unit (eta = g sigma'(z) = 0), so it should
move out of the set less than its region's geometry predicts; that is the excess-churn ratio.

Plan (pre-registered):

- primary ``gelu_excess_churn``, ``same_sign_excess_churn`` (effect, per seed
  ln((I_A / N_A) / (I_D / N_D)) > 0, delta ln 1.1 = 0.095): the derivative set's churn, beyond its
  geometric null, is at least 10% below the activation set's. The delta is a stated minimal effect
  (10% less excess churn), not the pilot's: the pilot effect is -0.008 (GELU) and -0.001
  (same-sign), so half of it would be <= 0; the pilot's MDE (0.01-0.02) is below the delta.
- context ``*_jaccard_churn``: ln(I_A / I_D), the naive set comparison (geometry included);
  ``*_flip_churn``: ln(flips_A / flips_D), flips = |S_t ^ S_t'| / (pairs) (unnormalised: favours the
  smaller set); ``*_fraction_variation``: ln(R_A / R_D), R = mean |f_t' - f_t| / mean f over the
  window (the logged-fraction reading of "step-to-step"); all with the same delta.
- seed-to-seed (numbers only, not judged): the coefficient of variation over seeds of each end
  fraction. Units are not aligned across seeds, so only fractions compare; with 3 seeds the 95%
  interval of a variance ratio spans a factor F(0.975; 2, 2) = 39 either way (5 seeds: 9.6), so no
  verdict can come from it at this scale.
- gates, per arm (both sets of a part come from one arm): ``*_learned``: min over seeds of test
  accuracy >= 0.3 (3x chance, G7/G16's gate); ``*_sets_differ``: max over seeds of the Jaccard
  similarity J(A, D) at the last checkpoint <= 0.8 (at least 20% of the union lies in one set only;
  otherwise the comparison restates one set); ``*_sets_nonempty``: min over seeds and window
  checkpoints of min(frac A, frac D) >= 0.005 (>= ~330 of 65536 pairs at quick).

Pilot (seeds 1000-1002, quick, outside the test seeds): this module's ``run`` on
``Context(preset="quick", seeds=[1000, 1001, 1002])``
(``python -m theory_checks.pilot G21 --preset quick --seeds 1000 1001 1002``; 113 s with the 6 runs
trained, at load ~6-10), with scans of the same runs at tolerances 0.05 / 0.1 / 0.2 (literal sets)
and of the null at each tolerance (an exploratory script, not part of the package). Test accuracy
GELU 0.686 +- 0.019, same-sign 0.701 +- 0.016. GELU: end frac D 0.441, A 0.372, J(A, D)
0.620 +- 0.017; churn I_D 0.439 (null 0.433), I_A 0.407 (null 0.405); excess ratio -0.013 / -0.007
/ -0.004, raw Jaccard ratio -0.077, flip ratio -0.305, fraction-variation ratio +0.15 / +0.12 /
+0.39. Same-sign: end frac D 0.490, A 0.037, J(A, D) 0; I_D 0.233 (null 0.230), I_A 0.925 (null
0.915); excess ratio -0.007 / +0.001 / +0.003, raw Jaccard ratio +1.379, flip ratio -0.731,
fraction-variation ratio +0.57 / +0.77 / +0.92. Seed CV of end fractions: GELU D 0.024, A 0.006;
same-sign D 0.020, A 0.024. The excess ratio stays within 0.03 of 0 at TAU 0.05 and 0.2 as well
(pilot_null.py). Displacements between checkpoints are mostly example-specific (the per-unit mean
holds 7-16% of their variance, seed 1000), so the within-unit permutation does change the motion
(the null is not the observed step by construction). Literal definitions: GELU |sigma'| <= 1e-6
holds 0.3% of pairs; SPEC 2.1's same-sign set equals the flat set (up to a 0.03% sliver); Lazy
Neuron's |a| <= 1e-6 is empty on the same-sign arm.

Design notes: (1) new training: the two arms are G13's and G6's configs with ``checkpoint_every``
set (the runs are otherwise the same), since the shared runs keep only their final model: 6 quick
runs, ~55 s at load ~2-3 (pilot). (2) Blocks 2..L only (block 1 sees raw features; G6's
convention); at quick that is block 2: 256 held-out examples x 256 units. (3) One permutation per
checkpoint pair and seed (65536 pairs each: the null's own noise is below 1% of the churn).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax.numpy as jnp
import numpy as np

from gradsparse.checkpoint import checkpoint_path, load_model
from gradsparse.figures import plot_bars
from gradsparse.models import zero_probes
from theory_checks.context import BASE, Context, base_config, base_runs, describe, heldout, tail
from theory_checks.g06_flat_region import CONDITIONS, act_name
from theory_checks.plan import CheckPlan, GatePlan, PartPlan, arm
from theory_checks.protocol import Check, Finding
from theory_checks.verdicts import Gate, effect_verdict, fmt, mean_sd

#: the relaxed tolerance of both GELU sets and of the relaxed near-zero-output set (stated, fixed)
TAU = 0.1
#: steps between checkpoints (the step-to-step gap) per preset; the window is the last WINDOW of training
CKPT = {"smoke": 12, "quick": 50, "standard": 50, "full": 300}
WINDOW = 0.2
DELTA = math.log(1.1)
DELTA_SOURCE = ("stated minimal effect: 10% less churn (ln 1.1); not the pilot's (seeds 1000-1002 gave -0.008 "
                "(gelu) and -0.001 (same_sign) for the primary, so half of it would be <= 0); pilot MDE 0.01-0.02")
LEARNED_MIN = 0.3
DIFFER_MAX = 0.8
NONEMPTY_MIN = 0.005
#: the permutation null's generator tag
NULL_TAG = 0x6921
#: arm -> (activation name, tolerance of the derivative set: 0 = the exact flat set sigma'(z) = 0)
ARMS: dict[str, tuple[str, float]] = {"gelu": ("gelu", TAU),
                                      "same_sign": (act_name(1.5, *CONDITIONS["same_sign"]), 0.0)}
PILOT = ("pilot seeds 1000-1002: excess-churn ratio gelu -0.013 / -0.007 / -0.004, same_sign -0.007 / +0.001 / "
         "+0.003; raw Jaccard ratio gelu -0.077, same_sign +1.379")

WHY = ("a pre-activation inside the zero-derivative set sends no gradient through its unit (eta = g sigma'(z) = 0), "
       "so if derivative sparsity is the stable one, the derivative set loses and gains members less than its "
       "region's geometry and the size of the motion predict, and less so than the activation set")

STATS = ("I_D", "I_A", "N_D", "N_A", "flips_D", "flips_A", "R_D", "R_A")


def arm_changes(preset: str) -> dict[str, dict[str, Any]]:
    """{arm: changes to the BASE config}: G13's GELU / G6's same-sign arm with checkpoints every CKPT steps."""
    return {a: dict(activation=act, flatness_every=0, checkpoint_every=CKPT[preset]) for a, (act, _) in ARMS.items()}


def _parts() -> list[PartPlan]:
    out = []
    for a in ARMS:
        g = (f"{a}_learned", f"{a}_sets_differ", f"{a}_sets_nonempty")
        out.append(PartPlan(f"{a}_excess_churn", "effect", "primary",
                            f"{a}: ln((I_A / N_A) / (I_D / N_D)), I = mean Jaccard distance between consecutive late "
                            f"checkpoints' sets, N = its within-unit permuted-displacement null", DELTA, DELTA_SOURCE,
                            gates=g, why=WHY))
    for a in ARMS:
        g = (f"{a}_learned", f"{a}_sets_differ", f"{a}_sets_nonempty")
        out.append(PartPlan(f"{a}_jaccard_churn", "effect", "context", f"{a}: ln(I_A / I_D) (raw Jaccard churn)",
                            DELTA, DELTA_SOURCE, gates=g,
                            why="geometry included: a thin band churns more than a thick region under any motion"))
        out.append(PartPlan(f"{a}_flip_churn", "effect", "context",
                            f"{a}: ln(flips_A / flips_D), flips = |S_t ^ S_t'| / pairs", DELTA, DELTA_SOURCE, gates=g,
                            why="unnormalised: favours the smaller set"))
        out.append(PartPlan(f"{a}_fraction_variation", "effect", "context",
                            f"{a}: ln(R_A / R_D), R = mean |f_t' - f_t| / mean f over the window", DELTA, DELTA_SOURCE,
                            gates=g, why="fractions only: a set can churn at a constant fraction"))
    return out


PARTS = _parts()


def gate_plans() -> list[GatePlan]:
    out = []
    for a in ARMS:
        out += [GatePlan(f"{a}_learned", ">=", LEARNED_MIN, f"{a}: min over seeds of test accuracy (3x chance)",
                         arms=(a,)),
                GatePlan(f"{a}_sets_differ", "<=", DIFFER_MAX, f"{a}: max over seeds of J(A, D) at the last "
                         "checkpoint (the two sets are not one set)", arms=(a,)),
                GatePlan(f"{a}_sets_nonempty", ">=", NONEMPTY_MIN, f"{a}: min over seeds and window checkpoints of "
                         "min(frac A, frac D)", arms=(a,))]
    return out


def plan(preset: str, p: dict[str, Any]) -> CheckPlan:
    return CheckPlan(arms=[arm(a, base_config(preset, **kw), note=f"{'G13' if a == 'gelu' else 'G6'}'s arm with "
                               f"checkpoints every {CKPT[preset]} steps") for a, kw in arm_changes(preset).items()],
                     parts=list(PARTS), gates=gate_plans(),
                     notes=[f"TAU {TAU}; window: the last {WINDOW:.0%} of training; blocks 2..L on the held-out batch",
                            PILOT])


# ---------------------------------------------------------------- pure functions (tests feed them)

def deriv_set(act: Any, z: np.ndarray, tau: float) -> np.ndarray:
    """Boolean mask of the zero-derivative set: ``act.flat_mask(z)`` when tau == 0, else |sigma'(z)| <= tau."""
    if tau < 0:
        raise ValueError(f"tau: got {tau}; allowed: >= 0")
    zz = jnp.asarray(z)
    return np.asarray(act.flat_mask(zz) if tau == 0 else jnp.abs(act.deriv(zz)) <= tau)


def act_set(act: Any, z: np.ndarray, tau: float) -> np.ndarray:
    """Boolean mask of the near-zero-output set |a| <= tau RMS(a), a = sigma(z), RMS over all of z's
    entries (tau = 0: a == 0 exactly)."""
    if tau < 0:
        raise ValueError(f"tau: got {tau}; allowed: >= 0")
    a = np.asarray(act(jnp.asarray(z)), dtype=np.float64)
    return np.abs(a) <= tau * math.sqrt(float(np.mean(a * a)))


def jaccard_distance(s: np.ndarray, t: np.ndarray) -> float:
    """1 - |s & t| / |s | t| of two boolean masks of one shape (0 when both are empty)."""
    s, t = np.asarray(s, bool), np.asarray(t, bool)
    if s.shape != t.shape:
        raise ValueError(f"masks: shapes {s.shape} and {t.shape} differ")
    union = int(np.sum(s | t))
    return 0.0 if union == 0 else 1.0 - float(np.sum(s & t)) / union


def permuted_step(z0: np.ndarray, z1: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """z0 + (z1 - z0) with each unit's (column's) displacements permuted across the examples (rows);
    z0, z1: (examples, units)."""
    z0, z1 = np.asarray(z0), np.asarray(z1)
    if z0.shape != z1.shape or z0.ndim != 2:
        raise ValueError(f"z0, z1: need equal (examples, units) shapes, got {z0.shape} and {z1.shape}")
    perm = np.argsort(rng.random(z0.shape), axis=0)
    return z0 + np.take_along_axis(z1 - z0, perm, axis=0)


def _sets(act: Any, zs: Sequence[np.ndarray], deriv_tau: float, act_tau: float) -> tuple[np.ndarray, np.ndarray]:
    """(D, A) over blocks: per block (examples, units), concatenated along units."""
    return (np.concatenate([deriv_set(act, z, deriv_tau) for z in zs], axis=1),
            np.concatenate([act_set(act, z, act_tau) for z in zs], axis=1))


def churn(act: Any, snaps: Sequence[Sequence[np.ndarray]], deriv_tau: float, act_tau: float,
          rng: np.random.Generator) -> dict[str, Any]:
    """Stability statistics of D and A over checkpoints.

    ``snaps``: per checkpoint (in step order, >= 2), per block, z of shape (examples, units).
    Returns I_S (mean Jaccard distance between consecutive checkpoints), N_S (the same against
    :func:`permuted_step`), flips_S (mean |S_t ^ S_t'| / pairs), R_S (mean |f_t' - f_t| / mean f),
    frac_S (per checkpoint), for S in D, A.
    """
    if len(snaps) < 2:
        raise ValueError(f"snaps: need >= 2 checkpoints, got {len(snaps)}")
    sets = [_sets(act, zs, deriv_tau, act_tau) for zs in snaps]
    out: dict[str, Any] = {k: [] for k in ("I_D", "I_A", "N_D", "N_A", "flips_D", "flips_A")}
    for (d0, a0), (d1, a1), z0s, z1s in zip(sets[:-1], sets[1:], snaps[:-1], snaps[1:]):
        dn, an = _sets(act, [permuted_step(z0, z1, rng) for z0, z1 in zip(z0s, z1s)], deriv_tau, act_tau)
        out["I_D"].append(jaccard_distance(d0, d1))
        out["I_A"].append(jaccard_distance(a0, a1))
        out["N_D"].append(jaccard_distance(d0, dn))
        out["N_A"].append(jaccard_distance(a0, an))
        out["flips_D"].append(float(np.mean(d0 ^ d1)))
        out["flips_A"].append(float(np.mean(a0 ^ a1)))
    res: dict[str, Any] = {k: float(np.mean(v)) for k, v in out.items()}
    for k, i in (("D", 0), ("A", 1)):
        f = np.asarray([float(np.mean(s[i])) for s in sets])
        res[f"frac_{k}"] = f.tolist()
        res[f"R_{k}"] = relative_variation(f)
    res["J_AD_end"] = 1.0 - jaccard_distance(sets[-1][1], sets[-1][0])
    return res


def relative_variation(f: Sequence[float]) -> float:
    """mean |f_{k+1} - f_k| / mean f of a series of fractions (nan when the mean is 0)."""
    f = np.asarray(f, dtype=np.float64)
    if f.size < 2:
        raise ValueError(f"f: need >= 2 values, got {f.size}")
    m = float(np.mean(f))
    return float(np.mean(np.abs(np.diff(f)))) / m if m > 0 else math.nan


def log_ratio(num: float, den: float) -> float:
    """ln(num / den) (nan unless both are > 0)."""
    return math.log(num / den) if num > 0 and den > 0 else math.nan


def seed_effects(st: Mapping[str, Any]) -> dict[str, float]:
    """One seed's effects (each ln(activation-set variation / derivative-set variation)) from :func:`churn`."""
    return {"excess_churn": log_ratio(st["I_A"] / st["N_A"], st["I_D"] / st["N_D"])
            if st["N_A"] > 0 and st["N_D"] > 0 else math.nan,
            "jaccard_churn": log_ratio(st["I_A"], st["I_D"]),
            "flip_churn": log_ratio(st["flips_A"], st["flips_D"]),
            "fraction_variation": log_ratio(st["R_A"], st["R_D"])}


def cv(values: Sequence[float]) -> float:
    """Coefficient of variation sd / mean (ddof 1) of per-seed values."""
    v = np.asarray(values, dtype=np.float64)
    return float(np.std(v, ddof=1) / np.mean(v)) if v.size > 1 and np.mean(v) > 0 else math.nan


# ---------------------------------------------------------------- the check

def window_steps(steps: int, every: int) -> list[int]:
    """The checkpoint steps in the last WINDOW of training (multiples of ``every``, and ``steps``)."""
    if every <= 0 or steps <= 0:
        raise ValueError(f"steps, every: got {steps}, {every}; allowed: > 0")
    first = (1.0 - WINDOW) * steps - 1e-9
    out = sorted({s for s in range(every, steps + 1, every) if s >= first} | {steps})
    if len(out) < 2:
        raise ValueError(f"window: fewer than 2 checkpoints in the last {WINDOW:.0%} of {steps} steps every {every}")
    return out


def block_z(model: Any, x: np.ndarray) -> list[np.ndarray]:
    """Per block 2..L: the pre-activations z on inputs x, as (examples * tokens, units)."""
    _, aux = model(jnp.asarray(x), zero_probes(model.mlp_blocks(), x.shape[0] * model.tokens_per_sample))
    return [np.asarray(a["z"]).reshape(-1, np.asarray(a["z"]).shape[-1]) for a in tail(aux)]


def literal_sets(model: Any, x: np.ndarray) -> dict[str, float]:
    """At one model: the literal definitions (SPEC 2.1 |a - flat| <= 1e-6, Lazy Neuron |a| <= 1e-6, the
    logged zero-derivative set) as fractions over blocks 2..L, and J(SPEC 2.1 set, logged D set)."""
    _, aux = model(jnp.asarray(x), zero_probes(model.mlp_blocks(), x.shape[0] * model.tokens_per_sample))
    blocks = tail(list(zip(model.mlp_blocks(), aux)))
    spec = np.concatenate([np.ravel(np.abs(np.asarray(a["a"]) - b.act.flat_value) <= 1e-6) for b, a in blocks])
    lazy = np.concatenate([np.ravel(np.abs(np.asarray(a["a"])) <= 1e-6) for b, a in blocks])
    flat = np.concatenate([np.ravel(np.asarray(b.act.flat_mask(a["z"]))) for b, a in blocks])
    return {"frac_spec21": float(spec.mean()), "frac_lazy_1e-6": float(lazy.mean()), "frac_flat_logged":
            float(flat.mean()), "J_spec21_D": 1.0 - jaccard_distance(spec, flat)}


def arm_stats(ctx: Context, arm_name: str, runs: Sequence[Any], cfg: Any) -> list[dict[str, Any]]:
    """Per seed: :func:`churn` over the window's checkpoints and :func:`literal_sets` at the end."""
    act_label, deriv_tau = ARMS[arm_name]
    x, _ = heldout(ctx, cfg)
    steps = window_steps(cfg.steps, cfg.checkpoint_every)
    out = []
    for s, r in zip(ctx.seeds, runs):
        if r.out_dir is None:
            raise ValueError("G21 reads the runs' checkpoints: the context needs an out_dir")
        models = [load_model(checkpoint_path(r.out_dir, t))[0] for t in steps]
        snaps = [block_z(m, x) for m in models]
        act = tail(models[-1].mlp_blocks())[0].act
        rng = np.random.default_rng([NULL_TAG, int(s), list(ARMS).index(arm_name)])
        st = churn(act, snaps, deriv_tau, TAU, rng)
        st.update(literal_sets(models[-1], x))
        st["test_acc"] = float(r.final["test_accuracy"])
        out.append(st)
    return out


def run(ctx: Context, p: dict[str, Any]) -> Finding:
    per_seed: dict[str, list[float]] = {}
    parts, gates, numbers, measured = {}, [], {"tau": TAU}, []
    pp = {q.name: q for q in PARTS}
    by = {g.name: g for g in gate_plans()}
    ser: dict[str, Any] = {}
    for a, kw in arm_changes(ctx.preset).items():
        cfg = base_config(ctx.preset, **kw)
        sts = arm_stats(ctx, a, base_runs(ctx, **kw), cfg)
        eff = [seed_effects(st) for st in sts]
        for k in ("excess_churn", "jaccard_churn", "flip_churn", "fraction_variation"):
            per_seed[f"{a}/{k}"] = [e[k] for e in eff]
            parts[f"{a}_{k}"] = effect_verdict(per_seed[f"{a}/{k}"], DELTA, source=DELTA_SOURCE,
                                               what=pp[f"{a}_{k}"].what)
        for k in (*STATS, "J_AD_end", "test_acc", "frac_spec21", "frac_lazy_1e-6", "frac_flat_logged", "J_spec21_D"):
            per_seed[f"{a}/{k}"] = [float(st[k]) for st in sts]
        for k in ("D", "A"):
            per_seed[f"{a}/frac_{k}_end"] = [float(st[f"frac_{k}"][-1]) for st in sts]
            numbers[f"{a}/seed_cv_frac_{k}_end"] = cv(per_seed[f"{a}/frac_{k}_end"])
        value = {f"{a}_learned": min(per_seed[f"{a}/test_acc"]), f"{a}_sets_differ": max(per_seed[f"{a}/J_AD_end"]),
                 f"{a}_sets_nonempty": min(min(min(st["frac_D"]), min(st["frac_A"])) for st in sts)}
        gates += [Gate(k, float(v), by[k].op, by[k].threshold, by[k].what) for k, v in value.items()]
        g = lambda k: mean_sd(per_seed[f"{a}/{k}"])  # noqa: E731
        measured.append(f"{a} ({ARMS[a][0]}): frac D {g('frac_D_end')}, A {g('frac_A_end')}, J(A, D) {g('J_AD_end')}; "
                        f"churn I_D {g('I_D')} (null {g('N_D')}), I_A {g('I_A')} (null {g('N_A')}); excess ratio "
                        f"{g('excess_churn')}, raw Jaccard ratio {g('jaccard_churn')}, flip ratio {g('flip_churn')}; "
                        f"seed CV of end fractions D {fmt(numbers[f'{a}/seed_cv_frac_D_end'])}, A "
                        f"{fmt(numbers[f'{a}/seed_cv_frac_A_end'])}; test acc {g('test_acc')}")
        ser[a] = {"churn D": per_seed[f"{a}/I_D"], "null D": per_seed[f"{a}/N_D"], "churn A": per_seed[f"{a}/I_A"],
                  "null A": per_seed[f"{a}/N_A"]}
    c0 = base_config(ctx.preset, **arm_changes(ctx.preset)["gelu"])
    return Finding(None, "; ".join(measured), per_seed=per_seed, numbers=numbers, parts=parts, gates=gates,
                   series=ser, model=f"{describe(c0)}; same_sign: {ARMS['same_sign'][0]}",
                   notes=[f"D: gelu |sigma'| <= {TAU}, same_sign the exact flat set; A: |a| <= {TAU} RMS(a); "
                          f"checkpoints {window_steps(c0.steps, c0.checkpoint_every)}, held-out batch, blocks 2..L",
                          "seed-to-seed variation is reported as the CV of end fractions, not judged: with 3 seeds "
                          "a variance ratio's 95% interval spans a factor 39 either way",
                          "literal definitions (per_seed frac_spec21, frac_lazy_1e-6, J_spec21_D): SPEC 2.1's set "
                          "on the same-sign arm is the flat set (a restatement); Lazy Neuron's |a| <= 1e-6 is empty "
                          "there"])


def figures(ser: dict[str, Any], out_dir) -> list:
    groups = {a: v for a, v in ser.items() if all(len(x) for x in v.values())}
    if not groups:
        return []
    return plot_bars(groups, out_dir / "g21_set_churn", ylabel="Jaccard distance between consecutive checkpoints",
                     title="G21: churn of the derivative (D) and activation (A) sets and their geometric nulls")


CHECK = Check(
    name="G21",
    slug="g21_derivative_stability",
    title="Derivative sparsity more stable than activation sparsity",
    claim=("Where the zero-derivative set and the near-zero-output set differ (GELU with tolerance 0.1; the paper's "
           "same-sign shifted squared S-shape), the derivative set changes less between late checkpoints, beyond "
           "what its region's geometry and the motion of the pre-activations give, than the activation set."),
    rule=(f"Per arm and seed, on the held-out batch (blocks 2..L) at the checkpoints of the last {WINDOW:.0%} of "
          f"training: I = mean Jaccard distance of consecutive checkpoints' (example, unit) sets, N = the same with "
          f"each unit's displacements permuted across examples; effect ln((I_A / N_A) / (I_D / N_D)), delta "
          f"ln 1.1 (stated). PASS when every primary's one-sided 95% lower bound > 0 and mean > delta; FAIL when an "
          f"upper bound < delta survives Holm. Gates per arm: test acc >= {LEARNED_MIN}, J(A, D) <= {DIFFER_MAX}, "
          f"both sets >= {NONEMPTY_MIN}. Context: raw Jaccard, flip-rate and fraction-variation ratios."),
    presets={k: {"base": BASE[k], "tau": TAU, "ckpt": CKPT[k]} for k in ("smoke", "quick", "standard", "full")},
    run=run,
    figures=figures,
    plan=plan,
)
