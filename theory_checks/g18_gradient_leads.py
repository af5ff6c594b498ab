"""G18: does gradient sparsity rise before (or with) the fall of activation density?

Claim (arXiv 2309.03004 and its follow-up 2605.25612; SPEC 2.3-2.5): along plain-SGD training the
effective gradient eta_t = g_t * sigma'(z_t) = dL/dz_t becomes sparse (in the relaxed forms mean_t
||eta_t||_1 and mean_t ||eta_t||_2^2: its norms shrink), and this gradient sparsity is the SOURCE of
activation sparsity, so it rises before or together with the fall of activation density. (b) The
follow-up's ratio AF_K / (||x||^2 mean_{i active} g_i^2) decreases during training.

The tautology, and the quantities that avoid it. For ReLU, eta_{t,i} = 0 exactly wherever unit i is
inactive on token t. Hence (1) "fraction of |eta| < tau RMS(eta)" (``eta_sparse_0.001``) CONTAINS the
inactive fraction (= 1 - density): it rises mechanically as density falls, and a lead-lag between
the two tests nothing; (2) the relaxed norms are partly the mask too: ||eta_t||_2^2 = #active_t *
mean_{i active} g_{t,i}^2 and ||eta_t||_1 = #active_t * mean_{i active} |g_{t,i}|, so if g did nothing
at all their normalised trajectories would still follow the density (lag ~0: a "PASS with" made by
the count); (3) the ratio in (b) equals #active_t exactly (SPEC 2.5, G1): "the ratio decreases" IS
"the density falls". What is not a restatement is the factor the mask does not contain: the
gradient on the ACTIVE units,

    G2 = mean over active (token, unit) entries of g^2 = ||eta||_2^2 summed / #active entries
       = ``eta_l2sq`` / (n * ``density``) per block (n units; pooled over the tokens of the batch),

(G1 likewise with |g| and ``eta_l1``). ln ||eta||_2^2 = ln #active + ln G2 exactly (pooled), and
AF_K = ||x||^2 ||eta||^2 per token, with ||x||^2 pinned by LayerNorm (``x_sq`` ~ d), so AF_K's change
splits into ln x_sq + ln #active + ln G2 (+ a token-covariance residual): (b)'s content that is not a
restatement is which factor carries AF_K's change; G2 is the "gradient" factor, #active the "sparsity"
factor. The theory's chain (small gradients -> sparse activations) needs G2 to fall, and the claim
(a) says it falls before or with the density. Scale-free forms are reported as context: g's own
sparsity before the mask (``g_sparse_0.001``) and the small-gradient share among ACTIVE entries,
(``eta_sparse_0.001`` - act_sparsity) / density. Caveat on both, visible in the pilot: RMS is taken
over all tokens of the batch, and one token here is one example (S = 1), so these fractions count
mostly the EXAMPLES whose gradient has become tiny (well-fitted examples; the RMS is carried by the
few misfit ones): sparsity across tokens, which tracks the fit, not sparsity across units.

Data: no new training; the shared plain-SGD baseline (:func:`theory_checks.context.sgd_runs`; quick:
lr 0.1, B 32, 2000 steps, log every 100 = 21 logs). Every series is read from the ``fixed/`` monitors:
the gradient of the MEAN loss over the fixed 512-example TRAINING subset (SPEC 3.4: constant batch,
so the 1/B scale is constant along training), logged at every log; density on the same tokens.
Blocks 2..L (per block, then the mean over blocks). Held-out gradients (``heldout/``) are not the
training gradient the theory is about (they grow ~10x as the held-out loss plateaus, pilot).

Statistics (per seed, fixed before the test seeds):

- change: start = the first log (step 0), end = the mean over the last 10% of logs; for norms
  (G2, G1, ||eta||^2, ||eta||_1, AF_K, loss) on the ln scale (a multiplicative quantity's half-way
  point is then independent of the loss normalisation), for fractions (density, sparsities) linear.
  Oriented so that the prediction is > 0: norms fall (ln start - ln end), sparsities rise, density falls.
- onset t50 of a series: its normalised trajectory u(t) = (T(v_t) - T(v_0)) / (T(v_end) - T(v_0))
  (T = ln or identity; 0 at the start, 1 at the end level); t50 = the first step where u >= 1/2,
  linearly interpolated between that log and the one before; undefined (NaN) when the series
  did not move in its predicted direction.
- lag = t50(gradient quantity) - t50(density fall), in steps. Prediction "before or with": lag <=
  delta, delta = 100 steps = one log interval (the log's resolution: a quantity whose half-way point
  lies within one log of the density's moved "with" it).

Plan (pre-registered):

- primary ``g2_active_falls`` (effect, delta ln 1.25 = 0.223: a 20% fall, stated; the pilot's log-to-log
  sd of ln G2 is 0.3-0.6, ~0.2-0.4 for the 3-log end mean, so smaller falls are not distinguishable
  from noise): ln G2(start) - ln G2(end) > 0. The first half of (a) in its non-tautological form: the
  gradient on the active units shrinks. Deviation from a gate, written down: the direction of the
  gradient quantity is the claim itself, not its premise, so it is tested with error control (a gate
  would turn "the gradient grew" into INCONCLUSIVE, which hides a result).
- primary ``g2_active_leads`` (margin 100 steps on the lag): margin_verdict: PASS when the one-sided
  95% upper bound of the mean lag < 100, FAIL when the lower bound > 100. Gated on ``g2_active_moved``
  (G2 fell by >= ln 1.25 in every seed: without a fall it has no t50).
- context lags (same margin), each gated on its own ``*_moved`` gate: G1 (mean active |g|); the raw
  relaxed norms ||eta||_2^2 and ||eta||_1 (contain the mask's count, see above); ``eta_sparse_0.001``
  (the tautological one, shown so the reader sees it "pass"); the active small-gradient share; g's own
  sparsity; AF_K; the fixed-subset loss (what the gradient magnitude follows).
- context effects: ``g1_active_falls`` (ln G1 start - end > ln 1.25: the L1 relaxation of the same
  factor; G1 and G2 can move apart when the active gradients become heavy-tailed), ``af_k_falls``
  (ln AF_K start - end > ln 1.25: the flatness side of (b)), ``g_sparse_rises`` and
  ``active_small_rises`` (rise >= 0.01: ten times the ~1e-3 share a Gaussian-like gradient has below
  1e-3 RMS). (b)'s factor split (ln changes of AF_K, x_sq, #active, G2 and the
  residual) is in ``per_seed`` and ``measured``; no verdict on the ratio itself (a restatement).
- gates: ``density_fell`` (fixed-subset density fall >= 0.03 in every seed, G5's delta) and
  ``not_interpolated`` (end fixed-subset loss >= 0.05, G5's floor) on every part; ``*_moved`` per lag.

Why G2 and not G1 is the primary: AF_K, the quantity flatness bounds (SPEC 2.4-2.5), is built from
||eta||^2, so G2 is the gradient factor of the mechanism; the L1 form is a relaxation of the count of
non-zeros and is reported as context with its own verdicts. This choice was made with the pilot's
first printout in view (which already showed the L2 form rising): weigh the G1 context beside it.

Resolution: 21 logs suffice when the lags are several log intervals (the pilot's); a lag within one
interval of 0 is resolved only to the seeds' spread of the interpolated t50. A finer-logged arm
(``log_every`` 20; a new config, ~30 s per seed) would be the next step if a verdict sat there; it is
not part of this plan.

Pilot (seeds 1000-1002, quick, outside the test seeds; the runs (the shared baseline through
``sgd_runs``, 30-33 s per seed at load 3-7) and the numbers by this module's ``run`` on
``Context(preset="quick", seeds=[1000, 1001, 1002])``:
``python -m theory_checks.pilot G18 --preset quick --seeds 1000 1001 1002``; see ``PILOT``): density
(fixed, 2..L) fall 0.160 +- 0.005 (0.50 -> 0.34), t50 493 / 578 / 498. G2 falls in the first 100-200
steps (the loss leaves chance) and then rises ~5-10x, ending ABOVE its init value: ln fall -1.08 /
-1.04 / -1.27 (g2_active_falls would FAIL; g2_active_leads has no t50: gate). G1 falls a little (ln
0.26 / 0.24 / 0.12; its t50 leads by ~500 steps): the active gradients become heavy-tailed (fitted
examples' gradients shrink, the misfit ones' grow). ||eta||^2 and AF_K also end above their start
(ln -0.71 and -0.70); (b)'s split of ln AF_K's change +0.70 = x_sq -0.004 + #active -0.386 + G2
+1.13 + residual -0.037: AF_K rises, carried by G2, while the count falls. Lags (steps): g_sparse
+536 +- 221 and the active small share +534 +- 236 (t50 ~ 790-1210, AFTER the density's); the
tautological eta_sparse +137 +- 25; ||eta||_1 -467 (before: its count factor and G1 both fall); ln
loss +369. Analysis 1.7 s with the runs trained (load ~8). 21 logs resolve these lags (3-7 log
intervals); no finer arm is needed for them.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

from theory_checks.context import SGD, Context, describe, sgd_config, sgd_runs, tail
from theory_checks.g05_sgd_noise import DENSITY_SOURCE, LOSS_FLOOR, MIN_DENSITY
from theory_checks.plan import CheckPlan, GatePlan, PartPlan, arm
from theory_checks.protocol import Check, Finding
from theory_checks.verdicts import Gate, Verdict, effect_verdict, margin_verdict, mean_sd

#: the monitors read: the fixed training subset (SPEC 3.4)
PREFIX = "fixed"
#: lag margin in log intervals (delta = LAG_LOGS * log_every steps)
LAG_LOGS = 1
LAG_SOURCE = "one log interval: the log's resolution (a half-way point within one log of the density's is 'with' it)"
#: minimal ln fall of a norm (a 20% fall)
MIN_LN_FALL = math.log(1.25)
LN_SOURCE = ("ln 1.25 (a 20% fall), stated: the pilot's log-to-log sd of ln G2 is 0.3-0.6 (~0.2-0.4 for the "
             "3-log end mean)")
#: minimal rise of a small-gradient share (10x the ~1e-3 share of a Gaussian-like gradient below 1e-3 RMS)
MIN_SHARE_RISE = 0.01
SHARE_SOURCE = "0.01 = 10x the ~1e-3 share of a Gaussian-like gradient below 1e-3 RMS"
#: fraction of the run whose logs make the end level
END_FRAC = 0.1
TAU = "0.001"
PILOT = ("pilot seeds 1000-1002 (fixed subset, blocks 2..L): density 0.50 -> 0.34; ln G2 fall -1.08 / -1.04 / -1.27 "
         "(G2 ends above its init value); g_sparse and the active small share rise ~6e-4 -> ~0.1, lag +536 / +534 "
         "steps")

#: the series: name -> (scale "ln" or "lin", predicted direction "fall" or "rise", description)
QUANTITIES: dict[str, tuple[str, str, str]] = {
    "density": ("lin", "fall", "activation density"),
    "g2_active": ("ln", "fall", "G2 = mean over active entries of g^2 = eta_l2sq / (n density)"),
    "g1_active": ("ln", "fall", "G1 = mean over active entries of |g| = eta_l1 / (n density)"),
    "eta_l2sq": ("ln", "fall", "mean_t ||eta_t||_2^2 (contains the count of active units)"),
    "eta_l1": ("ln", "fall", "mean_t ||eta_t||_1 (contains the count of active units)"),
    "eta_sparse": ("lin", "rise", "fraction |eta| < 1e-3 RMS(eta) (contains the inactive fraction: tautological)"),
    "active_small": ("lin", "rise", "(eta_sparse - act_sparsity) / density: small-gradient share among active "
                                    "entries"),
    "g_sparse": ("lin", "rise", "fraction |g| < 1e-3 RMS(g): g's own sparsity, before the derivative mask"),
    "af_k": ("ln", "fall", "AF_K = mean_t ||eta_t||^2 ||x_t||^2"),
    "loss": ("ln", "fall", "fixed-subset loss"),
}
#: the gradient quantities whose lag is judged (primary first)
LAGGED = ("g2_active", "g1_active", "eta_l2sq", "eta_l1", "eta_sparse", "active_small", "g_sparse", "af_k", "loss")

WHY_FALL = ("the theory's chain needs the gradient to become small (relaxed gradient sparsity) for activations to "
            "become sparse; G2 is the relaxed norm with the mask's count divided out, so its fall is gradient "
            "sparsity that is not the density restated")
WHY_LEAD = ("if gradient sparsity is the SOURCE of activation sparsity it cannot come after it: G2's half-way point "
            "lies before, or within one log of, the density fall's")


def moved_gate(q: str) -> str:
    return f"{q}_moved"


def _min_move(q: str) -> float:
    scale, _, _ = QUANTITIES[q]
    if scale == "ln":
        return MIN_LN_FALL
    return MIN_DENSITY if q == "eta_sparse" else MIN_SHARE_RISE


def lag_delta(preset: str) -> float:
    """The lag margin in steps: LAG_LOGS log intervals of the preset's baseline."""
    return float(LAG_LOGS * SGD[preset]["log_every"])


def parts_for(preset: str) -> list[PartPlan]:
    d = lag_delta(preset)
    base = ("not_interpolated", "density_fell")
    out = [
        PartPlan("g2_active_falls", "effect", "primary",
                 "ln G2(start) - ln G2(end), G2 = mean over active entries of g^2 on the fixed training subset, "
                 "blocks 2..L", MIN_LN_FALL, LN_SOURCE, gates=base, why=WHY_FALL),
        PartPlan("g2_active_leads", "margin", "primary",
                 "t50(G2 fall) - t50(density fall) in steps (fixed subset, blocks 2..L)", d, LAG_SOURCE,
                 gates=base + (moved_gate("g2_active"),), why=WHY_LEAD),
    ]
    for q in LAGGED[1:]:
        out.append(PartPlan(f"{q}_leads", "margin", "context",
                            f"t50({q}) - t50(density fall) in steps: {QUANTITIES[q][2]}", d, LAG_SOURCE,
                            gates=base + (moved_gate(q),),
                            why="tautological or scale-carrying form, or what the gradient follows (docstring)"))
    out += [
        PartPlan("g1_active_falls", "effect", "context",
                 "ln G1(start) - ln G1(end), G1 = mean over active entries of |g| (fixed subset, blocks 2..L)",
                 MIN_LN_FALL, LN_SOURCE, gates=base, why="the L1 relaxation of the same factor (docstring)"),
        PartPlan("af_k_falls", "effect", "context", "ln AF_K(start) - ln AF_K(end) (fixed subset, blocks 2..L)",
                 MIN_LN_FALL, LN_SOURCE, gates=base, why="the flatness side of (b): AF_K = ||x||^2 #active G2"),
        PartPlan("g_sparse_rises", "effect", "context", "g_sparse(end) - g_sparse(start), g's own sparsity at 1e-3 RMS",
                 MIN_SHARE_RISE, SHARE_SOURCE, gates=base,
                 why="scale-free, before the mask; counts tokens (docstring)"),
        PartPlan("active_small_rises", "effect", "context",
                 "active small-gradient share (end - start), (eta_sparse - act_sparsity) / density", MIN_SHARE_RISE,
                 SHARE_SOURCE, gates=base, why="scale-free, among active entries; counts tokens (docstring)"),
    ]
    return out


PARTS = parts_for("quick")


def gate_plans() -> list[GatePlan]:
    out = [
        GatePlan("not_interpolated", ">=", LOSS_FLOOR, "sgd: min over seeds of the fixed-subset loss over the last "
                 "10% of logs (G5's floor)", arms=("sgd",)),
        GatePlan("density_fell", ">=", MIN_DENSITY, "sgd: min over seeds of the fixed-subset density fall (blocks "
                 "2..L, start - end; G5's delta: " + DENSITY_SOURCE + ")", arms=("sgd",)),
    ]
    for q in LAGGED:
        scale, direction, what = QUANTITIES[q]
        unit = "ln " if scale == "ln" else ""
        out.append(GatePlan(moved_gate(q), ">=", _min_move(q), f"sgd: min over seeds of the {unit}{direction} of "
                            f"{what} (it moved in the predicted direction: it has a t50)", arms=("sgd",)))
    return out


def plan(preset: str, p: dict[str, Any]) -> CheckPlan:
    return CheckPlan(arms=[arm("sgd", sgd_config(preset), note="the shared plain-SGD baseline")],
                     parts=parts_for(preset), gates=gate_plans(),
                     notes=[f"no new training; series from the {PREFIX}/ monitors (fixed 512-example training subset, "
                            f"every log), blocks 2..L; lag margin {lag_delta(preset):g} steps = {LAG_LOGS} log "
                            "interval; t50 = first crossing of half the start-to-end change (end = mean of the last "
                            "10% of logs), norms on the ln scale"])


# ---------------------------------------------------------------- pure functions of the logs

def block_series(history: Sequence[Mapping[str, Any]], n_units: int, prefix: str = PREFIX
                 ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(steps (T,), {quantity: values (T,)}) from a training log: per block, then the mean over blocks
    2..L (:func:`~theory_checks.context.tail`). ``n_units``: hidden units per block (n = mlp_ratio d)."""
    if n_units <= 0:
        raise ValueError(f"n_units: must be > 0, got {n_units!r}")
    rows = [h for h in history if f"{prefix}/density" in h]
    if len(rows) < 3:
        raise ValueError(f"need >= 3 logs carrying {prefix}/density, got {len(rows)}")
    steps = np.asarray([h["step"] for h in rows], np.float64)
    if np.any(np.diff(steps) <= 0):
        raise ValueError("log steps must be strictly ascending")

    def blk(h: Mapping[str, Any], k: str) -> np.ndarray:
        return np.asarray(tail(h[f"{prefix}/{k}"]), np.float64)

    out: dict[str, list[float]] = {q: [] for q in QUANTITIES}
    for h in rows:
        d = blk(h, "density")
        sp = blk(h, f"eta_sparse_{TAU}")
        vals = {
            "density": d,
            "g2_active": blk(h, "eta_l2sq") / (n_units * d),
            "g1_active": blk(h, "eta_l1") / (n_units * d),
            "eta_l2sq": blk(h, "eta_l2sq"),
            "eta_l1": blk(h, "eta_l1"),
            "eta_sparse": sp,
            "active_small": (sp - blk(h, "act_sparsity")) / d,
            "g_sparse": blk(h, f"g_sparse_{TAU}"),
            "af_k": blk(h, "af_k"),
            "x_sq": blk(h, "x_sq"),
        }
        for q, v in vals.items():
            out.setdefault(q, []).append(float(np.mean(v)))
        out["loss"].append(float(h[f"{prefix}/loss"]) if f"{prefix}/loss" in h else float(h["loss"]))
    return steps, {q: np.asarray(v, np.float64) for q, v in out.items()}


def _transform(values: np.ndarray, scale: str) -> np.ndarray:
    v = np.asarray(values, np.float64)
    if scale == "ln":
        return np.log(np.where(v > 0, v, np.nan))
    return v


def end_mask(steps: np.ndarray, frac: float = END_FRAC) -> np.ndarray:
    """The logs in the last ``frac`` of the run (at least the last one)."""
    s = np.asarray(steps, np.float64)
    t = (s - s[0]) / max(s[-1] - s[0], 1.0)
    m = t >= 1.0 - frac - 1e-9
    m[-1] = True
    return m


def change(steps: Sequence[float], values: Sequence[float], scale: str, direction: str) -> float:
    """The start-to-end change oriented so that the prediction is > 0: start = first log, end = mean of
    T(values) over the last 10% of logs (T = ln for scale "ln", identity for "lin"); "fall": T(start) -
    T(end), "rise": T(end) - T(start)."""
    if direction not in ("fall", "rise") or scale not in ("ln", "lin"):
        raise ValueError(f"scale {scale!r} / direction {direction!r}; allowed: ln|lin, fall|rise")
    s = np.asarray(steps, np.float64)
    y = _transform(np.asarray(values, np.float64), scale)
    end = float(np.mean(y[end_mask(s)]))
    d = end - float(y[0])
    return -d if direction == "fall" else d


def normalised(steps: Sequence[float], values: Sequence[float], scale: str) -> np.ndarray:
    """u_t = (T(v_t) - T(v_0)) / (T(v_end) - T(v_0)): 0 at the start, 1 at the end level (NaN when flat)."""
    s = np.asarray(steps, np.float64)
    y = _transform(np.asarray(values, np.float64), scale)
    span = float(np.mean(y[end_mask(s)])) - float(y[0])
    if not math.isfinite(span) or span == 0:
        return np.full_like(y, np.nan)
    return (y - y[0]) / span


def t50(steps: Sequence[float], values: Sequence[float], scale: str, direction: str) -> float:
    """The onset step: the first step where the normalised trajectory reaches 1/2, linearly interpolated
    between that log and the previous one. NaN when the series did not move in ``direction``."""
    s = np.asarray(steps, np.float64)
    if s.ndim != 1 or s.size != np.asarray(values).size or s.size < 2:
        raise ValueError("steps and values must be 1-D of equal length >= 2")
    if not change(s, values, scale, direction) > 0:
        return math.nan
    u = normalised(s, values, scale)
    hit = np.flatnonzero(u >= 0.5)
    if hit.size == 0:
        return math.nan
    i = int(hit[0])
    if i == 0:
        return float(s[0])
    u0, u1 = float(u[i - 1]), float(u[i])
    return float(s[i - 1] + (0.5 - u0) / (u1 - u0) * (s[i] - s[i - 1]))


def seed_numbers(history: Sequence[Mapping[str, Any]], n_units: int, prefix: str = PREFIX) -> dict[str, float]:
    """One seed's numbers: per quantity its oriented change and t50, the lags to the density's t50,
    the end loss, and (b)'s split of ln AF_K's change (end - start) into ln x_sq, ln #active (= ln n
    density), ln G2 and the residual."""
    steps, ser = block_series(history, n_units, prefix)
    out: dict[str, float] = {}
    for q, (scale, direction, _) in QUANTITIES.items():
        out[f"{q}_change"] = change(steps, ser[q], scale, direction)
        out[f"{q}_t50"] = t50(steps, ser[q], scale, direction)
    for q in LAGGED:
        out[f"{q}_lag"] = out[f"{q}_t50"] - out["density_t50"]
    m = end_mask(steps)
    out["loss_end"] = float(np.mean(ser["loss"][m]))

    def dln(v: np.ndarray) -> float:
        return float(np.mean(np.log(v[m])) - math.log(v[0]))

    out["dln_af_k"] = dln(ser["af_k"])
    out["dln_x_sq"] = dln(ser["x_sq"])
    out["dln_active"] = dln(ser["density"])
    out["dln_g2_active"] = dln(ser["g2_active"])
    out["dln_residual"] = out["dln_af_k"] - out["dln_x_sq"] - out["dln_active"] - out["dln_g2_active"]
    return out


def measure(per_seed: Sequence[Mapping[str, float]], preset: str = "quick") -> tuple[dict[str, Verdict], list[Gate]]:
    """The parts (by the plan's deltas) and the gates from the seeds' :func:`seed_numbers`."""
    pp = {p.name: p for p in parts_for(preset)}
    col = lambda k: [float(s[k]) for s in per_seed]  # noqa: E731
    parts: dict[str, Verdict] = {
        "g2_active_falls": effect_verdict(col("g2_active_change"), MIN_LN_FALL, source=LN_SOURCE,
                                          what=pp["g2_active_falls"].what),
        "g1_active_falls": effect_verdict(col("g1_active_change"), MIN_LN_FALL, source=LN_SOURCE,
                                          what=pp["g1_active_falls"].what),
        "af_k_falls": effect_verdict(col("af_k_change"), MIN_LN_FALL, source=LN_SOURCE, what=pp["af_k_falls"].what),
        "g_sparse_rises": effect_verdict(col("g_sparse_change"), MIN_SHARE_RISE, source=SHARE_SOURCE,
                                         what=pp["g_sparse_rises"].what),
        "active_small_rises": effect_verdict(col("active_small_change"), MIN_SHARE_RISE, source=SHARE_SOURCE,
                                             what=pp["active_small_rises"].what),
    }
    for q in LAGGED:
        name = f"{q}_leads"
        parts[name] = margin_verdict(col(f"{q}_lag"), float(pp[name].delta), source=LAG_SOURCE, what=pp[name].what)
    by = {g.name: g for g in gate_plans()}
    value = {"not_interpolated": min(col("loss_end")), "density_fell": min(col("density_change"))}
    for q in LAGGED:
        v = col(f"{q}_change")
        value[moved_gate(q)] = min(v) if all(math.isfinite(x) for x in v) else math.nan
    gates = [Gate(k, float(value[k]), by[k].op, by[k].threshold, by[k].what) for k in by]
    return parts, gates


def run(ctx: Context, p: dict[str, Any]) -> Finding:
    cfg = sgd_config(ctx.preset)
    runs = sgd_runs(ctx)
    n = cfg.width * cfg.mlp_ratio
    nums = [seed_numbers(r.history, n) for r in runs]
    parts, gates = measure(nums, ctx.preset)
    every = {k: [float(s[k]) for s in nums] for k in nums[0]}
    g = lambda k: mean_sd(every[k])  # noqa: E731
    # a lag without an onset (the series did not move) is undefined: it stays in ``measured`` as nan and
    # its part is INCONCLUSIVE by its gate; per_seed keeps the numbers defined for every seed
    per_seed = {k: v for k, v in every.items() if all(math.isfinite(x) for x in v)}
    measured = (f"fixed subset, blocks 2..L: density fall {g('density_change')} (t50 {g('density_t50')}); ln G2 fall "
                f"{g('g2_active_change')} (t50 {g('g2_active_t50')}, lag {g('g2_active_lag')}); ln ||eta||^2 fall "
                f"{g('eta_l2sq_change')}; ln AF_K fall {g('af_k_change')}; g_sparse rise {g('g_sparse_change')} (lag "
                f"{g('g_sparse_lag')}); active small share rise {g('active_small_change')} (lag "
                f"{g('active_small_lag')}); eta_sparse lag {g('eta_sparse_lag')} (tautological); loss lag "
                f"{g('loss_lag')}; (b) ln AF_K change {g('dln_af_k')} = x_sq {g('dln_x_sq')} + #active "
                f"{g('dln_active')} + G2 {g('dln_g2_active')} + residual {g('dln_residual')}")
    ser: dict[str, Any] = {"seeds": list(ctx.seeds), "runs": []}
    for r in runs:
        steps, s = block_series(r.history, n)
        ser["runs"].append({"steps": steps.tolist(), **{q: s[q].tolist() for q in FIG_QUANTITIES}})
    return Finding(None, measured, per_seed=per_seed, parts=parts, gates=gates, series=ser,
                   model=describe(cfg),
                   notes=[f"series from the {PREFIX}/ monitors: gradient of the mean loss over the fixed 512-example "
                          "training subset, logged at every log; blocks 2..L",
                          "eta_sparse contains the inactive fraction and ||eta||^2, ||eta||_1 contain the count of "
                          "active units (ReLU): their lags are context; G2 = ||eta||^2 / #active is the primary",
                          "(b): AF_K / (||x||^2 mean_active g^2) = #active exactly (SPEC 2.5): reported as the split "
                          "of ln AF_K's change, not judged"])


#: the series drawn (density fall and the gradient quantities)
FIG_QUANTITIES = ("density", "g2_active", "eta_l2sq", "g_sparse", "active_small", "loss")


def figures(ser: dict[str, Any], out_dir) -> list:
    rs = ser.get("runs") or []
    if not rs:
        return []
    from gradsparse.figures import _finish, _new_figure
    from gradsparse.figures_spectra import save_figure

    fig = _new_figure((7.2, 4.4))
    ax = fig.add_subplot(1, 1, 1)
    for i, q in enumerate(FIG_QUANTITIES):
        scale, direction, _ = QUANTITIES[q]
        color = f"C{i % 10}"
        for j, r in enumerate(rs):
            u = normalised(r["steps"], r[q], scale)
            moved = change(r["steps"], r[q], scale, direction) > 0
            ax.plot(r["steps"], u, color=color, lw=1.3, alpha=0.9 if j == 0 else 0.45,
                    label=(f"{q} ({'ln; ' if scale == 'ln' else ''}predicted {direction}; "
                           f"{'moved so' if moved else 'moved the other way'})" if j == 0 else None))
            t = t50(r["steps"], r[q], scale, direction)
            if math.isfinite(t):
                ax.axvline(t, color=color, lw=0.8, ls=":", alpha=0.7)
    ax.axhline(0.5, color="0.5", lw=0.6)
    ax.set_ylim(-2.5, 2.5)
    ax.legend(fontsize=7, loc="lower right")
    _finish(ax, "step", "normalised trajectory (0 start, 1 end level)",
            f"G18: gradient quantities vs density fall, seeds {ser.get('seeds')} (dotted: t50)", False)
    return save_figure(fig, out_dir / "g18_trajectories")


CHECK = Check(
    name="G18",
    slug="g18_gradient_leads",
    title="Gradient sparsity leads activation sparsity",
    claim=("Along plain-SGD training the gradient on the active units (G2 = ||eta||^2 / #active: the relaxed gradient "
           "sparsity with the mask's count divided out) falls, and its half-way point comes before or within one log "
           "of the density fall's."),
    rule=(f"Two primaries on the shared SGD baseline's fixed-subset logs (blocks 2..L): effect ln G2(start) - ln "
          f"G2(end), delta ln 1.25 (PASS: lower bound > 0 and mean > delta; FAIL: upper bound < delta); margin on the "
          f"lag t50(G2) - t50(density), margin one log interval (PASS: upper bound < margin; FAIL: lower bound > "
          f"margin), gated on G2 having fallen >= ln 1.25 in every seed. Gates: density fall >= {MIN_DENSITY}, end "
          f"loss >= {LOSS_FLOOR}. Context: the tautological and scale-carrying forms, g's own sparsity, AF_K, loss."),
    presets={k: {"sgd": SGD[k]} for k in ("smoke", "quick", "standard", "full")},
    run=run,
    figures=figures,
    plan=plan,
)
