"""G5: more SGD noise (smaller batch, larger lr) -> flatter and sparser; full-batch GD is less sparse.

Arms on the plain-SGD baseline (``theory_checks.context.SGD``: width 128, 4 blocks, all 4000
training examples, 2000 steps), paired by seed (same initialisation and data order):

- ref:   lr 0.1,  B 32   (the noisiest)
- lowlr: lr 0.01, B 32   ("larger lr": ref vs lowlr)
- bigB:  lr 0.1,  B 128  ("smaller batch": ref vs bigB)
- gd:    lr 0.1,  B = all 4000 training examples (``full`` preset only: 125x the cost of a B-32 step)

Quantities: held-out density of blocks 2..L (sparser); tr(H_K) on the fixed 512-example training
subset (Hutchinson, every ``flatness_every`` steps; flatter). "End" = mean over the last 10% of
training (density, fixed-subset loss) or the last quarter of the trace estimates (trace).

Three ways to compare two arms, all oriented so that the prediction is > 0:

- matched loss: the faster arm at the step where its fixed-subset loss first reaches the slower
  arm's end loss (:func:`matched_step`: linear interpolation of the loss between logs), its density
  and trace interpolated at that step (:func:`interp_at`), against the slower arm at its end;
- equal samples (batch arm only): for every logged step s of ref's end window, bigB at step
  s * 32/128 (the step at which it has seen as many examples), interpolated between its logs /
  trace estimates; averaged over the window (:func:`equal_samples_mean`). The window is matched
  point by point so that neither arm is compared later in its data than the other (a single point
  ref_steps * 32/128 against ref's window mean would take bigB at more samples than ref's window);
- equal steps: both arms at their end.

Plan (pre-registered, :func:`plan`), and why. For cross-entropy the Gauss-Newton factor of the
Hessian, J^T (diag p - p p^T) J, has trace weight 1 - ||p||^2 ~ 2 loss once predictions are
confident, so after an arm interpolates its tr(H_K) shrinks with its loss whatever basin it is in,
and its density freezes (no gradient noise left). An equal-steps comparison between an
interpolated arm and a non-interpolated one therefore ranks the arms by how far they fitted, not by
flatness (CHECKS_REVIEW_T3 2a, pilot P-G5: bigB's trace 343 -> 15 while its loss fell 0.17 ->
8e-4; confirmed with exact traces in its section 5.6). Before interpolation the trace RISES while
the loss falls (ref: 16 -> ~230 over its run; exact traces: -2.5 -> 187, section 5.6) and the
density falls. So tr(H_K) and density depend on the fitting level in both regimes, and only a
comparison at the same fitting level isolates the noise. Hence:

- primary: the BATCH comparisons at matched fixed-subset loss, for trace and for density. The batch
  arm at fixed lr is the clean noise manipulation (lr/B changes through B alone; the stability bound
  2/lr is the same); at matched loss the CE loss factor is the same in both arms. What remains is
  that bigB reaches the loss in fewer (less noisy) steps: that difference in noise-driven drift is
  the claim itself, not a confound.
- context, equal samples (bigB at 32/128 of ref's steps): equal data seen, but the fitting level is
  left free, and it differs by seed (P-G5 seed 0: bigB loss 0.33 vs ref 0.37; pilot seed 1000:
  0.46 vs 0.19), so the trace comparison's sign can be set by the fitting level (a less-fitted bigB
  is still on its rising trace) and the density comparison is biased toward the prediction (a
  less-fitted arm is denser). DESIGN NOTE: the issue (21, point 2) and the brief name the
  equal-samples parts as primary; they are demoted for this mechanism, found when the seed-1000
  pilot showed the loss mismatch at equal samples (its ln trace ratio there was -0.35, the density
  difference +0.082). Flip ``EQUAL_SAMPLES_ROLE`` to restore them. The equal-samples parts are
  gated on bigB not being interpolated at those steps.
- context: the lr comparisons (lowlr vs ref: lr sets both the noise scale lr/B and the stability
  bound lambda_max <~ 2/lr that GD also obeys, so flatness and sparsity there cannot be attributed
  to noise); the equal-steps comparisons, each under the per-arm gates of BOTH arms it compares;
  ``smaller_batch_sparser_any_step`` (bigB's sparsest logged density at any step vs ref's end: no
  choice of step makes bigB sparser than that); gd (full preset).
- gates, one per arm (mechanical, symmetric, the same floor for every arm): ``<arm>_not_interpolated``
  = min over seeds of the arm's last-10% fixed-subset loss >= LOSS_FLOOR 0.05; and
  ``bigB_not_interpolated_at_equal_samples``: bigB's fixed-subset loss at the equal-samples steps.
  A part whose gate fails is INCONCLUSIVE "regime not reached: ... arm bigB interpolated ...".
  The matched-loss parts need ref's gate (their target loss is ref's end loss, so bigB is then at
  that same loss).

Float32 floor (CHECKS_REVIEW_T3 5.4-5.5): from loss ~1e-7 the logged fixed-subset loss is exactly
0, and tr(H_K) is negative near initialisation. A target loss <= 0, a loss never reached, a trace
<= 0 or any non-finite value gives NaN for that seed with the reason, and the part is INCONCLUSIVE
with that reason (never -inf, never a silent match).

Deltas (what changed: the sources no longer rest on test seed 0): density 0.03, log-trace 0.1
(see the constants). Pilot on seed 1000 (outside the test seeds; the check's own arms through
``sgd_runs`` on a Context with seeds [1000], quick (an exploratory script, not part of the package)):
ref end loss 0.21, trace ~220, density 0.33; bigB interpolated by step 800 (loss 0.0064; end
7e-4, trace 16); lowlr end loss 0.33. Batch effects on that seed are in PILOT below.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

from gradsparse.figures import plot_curves
from gradsparse.figures_spectra import FORMATS, save_figure
from theory_checks.context import tail, SGD, Context, describe, sgd_config, sgd_runs, window_rows
from theory_checks.plan import CheckPlan, GatePlan, PartPlan, arm
from theory_checks.protocol import Check, Finding
from theory_checks.verdicts import Gate, Verdict, effect_verdict, fmt, mean_sd

MIN_DENSITY = 0.03
MIN_LOG_TRACE = 0.1
LOSS_FLOOR = 0.05
#: pilot seed 1000 (outside the test seeds), the check's own helpers on its quick arms
PILOT = ("pilot seed 1000 (outside the test seeds, the check's quick arms and helpers): bigB vs ref at matched loss "
         "density +0.074, ln trace ratio +0.27; at equal samples +0.082, -0.35 (bigB loss 0.46 vs ref 0.19 there)")
#: role of the equal-samples parts (module docstring: demoted to context, with the reason)
EQUAL_SAMPLES_ROLE = "context"
DENSITY_SOURCE = ("0.03 = 6% of the ~0.5 initial density and 3x the per-seed spread (<= 0.01) of end densities; "
                  + PILOT)
TRACE_SOURCE = ("a 10% change of tr(H_K): above the Hutchinson standard error of one 8-probe estimate (3.5-7%, "
                "CHECKS_REVIEW_T3 5.3); " + PILOT)
FLOOR_SOURCE = ("fixed-subset loss >= 0.05: above it the CE Gauss-Newton factor (~2 loss) has not collapsed; "
                "P-G5: the interpolated bigB arm sits at 9e-4, the ref arm at 0.29-0.57")

WHY_MATCHED = ("batch size at fixed lr is the clean noise manipulation (lr/B changes, the 2/lr stability bound does "
               "not); at matched fixed-subset loss the CE Gauss-Newton factor 1 - ||p||^2 ~ 2 loss is the same in "
               "both arms, so a trace or density difference is not 'how far it fitted' (taking bigB earlier biases "
               "the trace against the prediction, the density toward it; see smaller_batch_sparser_any_step)")
WHY_SAMPLES = ("context: equal samples seen (bigB at 32/128 of ref's steps, point by point over ref's end window) "
               "leaves the fitting level free (seed 0: bigB loss 0.33 vs ref 0.37; pilot seed 1000: 0.46 vs 0.19); "
               "the trace rises and the density falls while an arm fits, so the fitting level, not the noise, can "
               "set the sign; gated on bigB not interpolated there")
WHY_LR = ("context: lr sets both the noise scale lr/B and the stability bound lambda_max <~ 2/lr (GD obeys it too), "
          "so an lr effect mixes noise with the stability bound")
WHY_STEPS = ("context: at equal steps an interpolated arm's trace shrinks with its loss and its density freezes, so "
             "the comparison ranks arms by how far they fitted; gated on BOTH arms not interpolated")


def _gate(a: str) -> str:
    return f"{a}_not_interpolated"


SAMPLES_GATE = "bigB_not_interpolated_at_equal_samples"


def _parts(gd: bool) -> list[PartPlan]:
    ref, big, low = _gate("ref"), _gate("bigB"), _gate("lowlr")
    d, t = (MIN_DENSITY, DENSITY_SOURCE), (MIN_LOG_TRACE, TRACE_SOURCE)
    out = [
        PartPlan("smaller_batch_flatter_at_matched_loss", "effect", "primary",
                 "ln trace_k(bigB at ref's end loss) / trace_k(ref, end)", *t, gates=(ref,), why=WHY_MATCHED),
        PartPlan("smaller_batch_sparser_at_matched_loss", "effect", "primary",
                 "density(bigB at ref's end loss) - density(ref, end)", *d, gates=(ref,), why=WHY_MATCHED),
        PartPlan("smaller_batch_flatter_at_equal_samples", "effect", EQUAL_SAMPLES_ROLE,
                 "ln trace_k(bigB at equal samples) / trace_k(ref, end)", *t, gates=(ref, SAMPLES_GATE),
                 why=WHY_SAMPLES),
        PartPlan("smaller_batch_sparser_at_equal_samples", "effect", EQUAL_SAMPLES_ROLE,
                 "density(bigB at equal samples) - density(ref, end)", *d, gates=(ref, SAMPLES_GATE),
                 why=WHY_SAMPLES),
        PartPlan("smaller_batch_sparser_any_step", "effect", "context",
                 "min over bigB's logs of its density - density(ref, end)", *d, gates=(ref,),
                 why="context: the conservative density comparison (bigB at its sparsest logged point, any step)"),
        PartPlan("smaller_batch_flatter", "effect", "context", "ln trace_k(bigB, end) / trace_k(ref, end), equal steps",
                 *t, gates=(ref, big), why=WHY_STEPS),
        PartPlan("smaller_batch_sparser", "effect", "context", "density(bigB) - density(ref), equal steps", *d,
                 gates=(ref, big), why=WHY_STEPS),
        PartPlan("larger_lr_flatter", "effect", "context", "ln trace_k(lowlr, end) / trace_k(ref, end), equal steps",
                 *t, gates=(ref, low), why=WHY_LR + "; " + WHY_STEPS),
        PartPlan("larger_lr_sparser", "effect", "context", "density(lowlr) - density(ref), equal steps", *d,
                 gates=(ref, low), why=WHY_LR + "; " + WHY_STEPS),
        PartPlan("larger_lr_flatter_at_matched_loss", "effect", "context",
                 "ln trace_k(lowlr, end) / trace_k(ref at lowlr's end loss)", *t, gates=(low,), why=WHY_LR),
        PartPlan("larger_lr_sparser_at_matched_loss", "effect", "context",
                 "density(lowlr, end) - density(ref at lowlr's end loss)", *d, gates=(low,), why=WHY_LR),
    ]
    if gd:
        out.append(PartPlan("gd_less_sparse", "effect", "context", "density(gd) - density(ref), equal steps", *d,
                            gates=(ref, _gate("gd")), why="context: full preset only; " + WHY_STEPS))
    return out


def arm_changes(p: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """{arm: changes to the SGD baseline} (the same dict builds the plan's arms and run()'s runs)."""
    arms: dict[str, dict[str, Any]] = {"ref": {}, "lowlr": dict(lr=p["lr_lo"]), "bigB": dict(batch_size=p["big_batch"])}
    if p.get("gd"):
        arms["gd"] = dict(batch_size=4000)
    return arms


def _gates(arms: Sequence[str]) -> list[GatePlan]:
    out = [GatePlan(_gate(a), ">=", LOSS_FLOOR, f"min over seeds of arm {a}'s fixed-subset loss, last 10% of "
                    f"training: below it arm {a} interpolated ({FLOOR_SOURCE})", (a,)) for a in arms]
    out.append(GatePlan(SAMPLES_GATE, ">=", LOSS_FLOOR, "min over seeds of bigB's fixed-subset loss at the "
                        "equal-samples steps of ref's last-10% window: below it arm bigB interpolated there",
                        ("bigB",)))
    return out


def plan(preset: str, p: dict[str, Any]) -> CheckPlan:
    ch = arm_changes(p)
    notes = ["primaries: the batch comparisons at matched loss (density and trace); equal samples: "
             f"{EQUAL_SAMPLES_ROLE} (the fitting level is free there); the lr "
             "comparisons mix noise with the stability bound 2/lr and are context; equal-steps comparisons are "
             "context under the per-arm interpolation gates of both arms"]
    if "gd" not in ch:
        notes.append("full-batch GD runs in the full preset only (a GD step over 4000 examples costs ~125 B-32 steps)")
    return CheckPlan(arms=[arm(a, sgd_config(preset, **kw)) for a, kw in ch.items()], parts=_parts("gd" in ch),
                     gates=_gates(list(ch)), notes=notes)


# ---------------------------------------------------------------- pure helpers (histories -> numbers)

def density_of(row: Mapping[str, Any]) -> float:
    """Held-out density of blocks 2..L of one log row (mean over those blocks)."""
    return float(np.mean(tail(row["heldout/density"])))


def column(history: Sequence[Mapping[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of the rows carrying ``key`` ('density': held-out density of blocks 2..L);
    ValueError when no row has it."""
    src = "heldout/density" if key == "density" else key
    rows = [h for h in history if src in h]
    if not rows:
        raise ValueError(f"key {src!r} not in the training log")
    vals = [density_of(h) if key == "density" else float(h[key]) for h in rows]
    return np.asarray([h["step"] for h in rows], np.float64), np.asarray(vals, np.float64)


def interp_at(steps: Sequence[float], values: Sequence[float], step: float) -> float:
    """``values`` linearly interpolated at ``step`` (steps ascending, shape (n,)); NaN when ``step``
    lies outside [steps[0], steps[-1]] or is not finite (no extrapolation)."""
    s, v = np.asarray(steps, np.float64), np.asarray(values, np.float64)
    if s.shape != v.shape or s.ndim != 1 or s.size == 0:
        raise ValueError(f"steps and values must be 1-D of equal length, got {s.shape} and {v.shape}")
    if np.any(np.diff(s) <= 0):
        raise ValueError("steps must be strictly ascending")
    if not math.isfinite(step) or step < s[0] - 1e-9 or step > s[-1] + 1e-9:
        return math.nan
    return float(np.interp(step, s, v))


def matched_step(steps: Sequence[float], losses: Sequence[float], target: float) -> tuple[float, str | None]:
    """(step, problem): the first step at which ``losses`` reaches ``target`` (<=), linearly
    interpolated between the two logs around the crossing; (NaN, reason) when the target is not a
    positive finite loss (a float32 floor of exactly 0 cannot be matched) or is never reached."""
    s, l = np.asarray(steps, np.float64), np.asarray(losses, np.float64)
    if not math.isfinite(target) or target <= 0:
        return math.nan, f"target loss {fmt(target)} is not > 0 (float32 floor): no matched point"
    for i in range(s.size):
        if math.isfinite(l[i]) and l[i] <= target:
            if i == 0:
                return float(s[0]), None
            l0, l1 = l[i - 1], l[i]
            w = 0.0 if l0 == l1 else float(np.clip((l0 - target) / (l0 - l1), 0.0, 1.0))
            return float(s[i - 1] + w * (s[i] - s[i - 1])), None
    return math.nan, f"loss never reached {fmt(target)} (min {fmt(float(np.nanmin(l)) if l.size else math.nan)})"


def end_mean(steps: Sequence[float], values: Sequence[float], lo: float) -> float:
    """Mean of ``values`` over the last fraction 1 - ``lo`` of training (at least the last log)."""
    m = window_rows(steps, lo)
    v = np.asarray(values, np.float64)
    return float(np.mean(v[m])) if m.any() else float(v[-1])


def equal_samples_mean(ref_steps: Sequence[float], lo: float, ratio: float, steps: Sequence[float],
                       values: Sequence[float]) -> float:
    """An arm's value at equal samples seen: for every step s of ref's window (fraction [lo, 1] of
    ``ref_steps``), the arm's ``values`` interpolated at s * ``ratio`` (ratio = B_ref / B_arm),
    averaged; NaN when a point lies outside the arm's logs."""
    if not ratio > 0:
        raise ValueError(f"ratio: got {ratio!r}; allowed: > 0 (B_ref / B_arm)")
    rs = np.asarray(ref_steps, np.float64)
    pts = rs[window_rows(rs, lo)] if window_rows(rs, lo).any() else rs[-1:]
    return float(np.mean([interp_at(steps, values, float(s) * ratio) for s in pts]))


def log_ratio(a: float, b: float) -> tuple[float, str | None]:
    """(ln a/b, problem): NaN with the reason when a trace is <= 0 (H_K is indefinite near
    initialisation) or not finite."""
    if not (math.isfinite(a) and math.isfinite(b)):
        return math.nan, f"trace not finite ({fmt(a)}, {fmt(b)})"
    if a <= 0 or b <= 0:
        return math.nan, f"trace <= 0 ({fmt(a)}, {fmt(b)}): ln ratio undefined"
    return math.log(a / b), None


def decide(values: Sequence[float], problems: Sequence[str | None], pp: PartPlan) -> Verdict:
    """:func:`effect_verdict` of ``values`` with the plan's delta; when a seed is NaN its reason
    (``problems``) leads the verdict's reason (the part is then INCONCLUSIVE)."""
    v = effect_verdict(values, float(pp.delta), source=pp.source, what=pp.what)
    bad = [f"seed #{i}: {p}" for i, p in enumerate(problems) if p]
    bad += [f"seed #{i}: not finite" for i, x in enumerate(values) if not math.isfinite(x) and not problems[i]]
    if bad:
        v.reason = "undefined for " + "; ".join(bad) + f" -> {v.reason}"
    return v


# ---------------------------------------------------------------- the run

def arm_numbers(history: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """End values of one run: loss (last 10%), density (last 10%), trace (last quarter of its
    estimates), and the columns the comparisons interpolate."""
    cols = {k: column(history, k) for k in ("fixed/loss", "density", "flat/trace_k")}
    return {"cols": cols, "loss": end_mean(*cols["fixed/loss"], 0.9), "density": end_mean(*cols["density"], 0.9),
            "trace": end_mean(*cols["flat/trace_k"], 0.75)}


def compare_matched(slow: Mapping[str, Any], fast: Mapping[str, Any]) -> dict[str, Any]:
    """The fast arm at the slow arm's end loss: {'step', 'density', 'trace', 'problem'}."""
    step, prob = matched_step(*fast["cols"]["fixed/loss"], slow["loss"])
    return {"step": step, "problem": prob, "density": interp_at(*fast["cols"]["density"], step),
            "trace": interp_at(*fast["cols"]["flat/trace_k"], step)}


def compare_samples(ref: Mapping[str, Any], big: Mapping[str, Any], ratio: float) -> dict[str, float]:
    """bigB at equal samples over ref's end windows (density, loss: last 10%; trace: last quarter)."""
    out = {k: equal_samples_mean(ref["cols"][c][0], lo, ratio, *big["cols"][c])
           for k, c, lo in (("density", "density", 0.9), ("loss", "fixed/loss", 0.9), ("trace", "flat/trace_k", 0.75))}
    out["step"] = float(ref["cols"]["fixed/loss"][0][-1]) * ratio
    return out


def measure(nums: Mapping[str, list[dict[str, Any]]], ratio: float, gd: bool = False
            ) -> tuple[dict[str, list[float]], dict[str, list[str | None]], list[Gate], dict[str, list[float]]]:
    """Per-part per-seed values and problems, the gates, and extra per-seed numbers, from
    ``nums`` = {arm: [arm_numbers per seed]} (pure: the unit tests feed synthetic histories)."""
    ref, big, low = nums["ref"], nums["bigB"], nums["lowlr"]
    n = len(ref)
    vals: dict[str, list[float]] = {}
    probs: dict[str, list[str | None]] = {}

    def put(name: str, pairs: list[tuple[float, str | None]]) -> None:
        vals[name] = [v for v, _ in pairs]
        probs[name] = [p for _, p in pairs]

    def dens(a: float, b: float, pr: str | None = None) -> tuple[float, str | None]:
        d = a - b
        return (d, pr) if math.isfinite(d) else (math.nan, pr or "density not finite")

    def trace(a: float, b: float, pr: str | None = None) -> tuple[float, str | None]:
        v, p2 = log_ratio(a, b)
        return v, pr or p2

    mb = [compare_matched(ref[i], big[i]) for i in range(n)]
    ml = [compare_matched(low[i], ref[i]) for i in range(n)]
    es = [compare_samples(ref[i], big[i], ratio) for i in range(n)]
    put("smaller_batch_flatter_at_matched_loss", [trace(mb[i]["trace"], ref[i]["trace"], mb[i]["problem"])
                                                  for i in range(n)])
    put("smaller_batch_sparser_at_matched_loss", [dens(mb[i]["density"], ref[i]["density"], mb[i]["problem"])
                                                  for i in range(n)])
    put("smaller_batch_flatter_at_equal_samples", [trace(es[i]["trace"], ref[i]["trace"]) for i in range(n)])
    put("smaller_batch_sparser_at_equal_samples", [dens(es[i]["density"], ref[i]["density"]) for i in range(n)])
    put("smaller_batch_sparser_any_step", [dens(float(np.min(big[i]["cols"]["density"][1])), ref[i]["density"])
                                           for i in range(n)])
    put("smaller_batch_flatter", [trace(big[i]["trace"], ref[i]["trace"]) for i in range(n)])
    put("smaller_batch_sparser", [dens(big[i]["density"], ref[i]["density"]) for i in range(n)])
    put("larger_lr_flatter", [trace(low[i]["trace"], ref[i]["trace"]) for i in range(n)])
    put("larger_lr_sparser", [dens(low[i]["density"], ref[i]["density"]) for i in range(n)])
    put("larger_lr_flatter_at_matched_loss", [trace(low[i]["trace"], ml[i]["trace"], ml[i]["problem"])
                                              for i in range(n)])
    put("larger_lr_sparser_at_matched_loss", [dens(low[i]["density"], ml[i]["density"], ml[i]["problem"])
                                              for i in range(n)])
    if gd:
        put("gd_less_sparse", [dens(nums["gd"][i]["density"], ref[i]["density"]) for i in range(n)])
    gates = []
    for a in nums:
        v = float(np.min([x["loss"] for x in nums[a]]))
        ok = math.isfinite(v) and v >= LOSS_FLOOR
        gates.append(Gate(_gate(a), v, ">=", LOSS_FLOOR,
                          (f"arm {a} not interpolated" if ok else f"arm {a} interpolated") +
                          f": min over seeds of its fixed-subset loss, last 10% of training (floor {fmt(LOSS_FLOOR)})"))
    v = float(np.min([e["loss"] for e in es]))
    ok = math.isfinite(v) and v >= LOSS_FLOOR
    gates.append(Gate(SAMPLES_GATE, v, ">=", LOSS_FLOOR,
                      ("arm bigB not interpolated" if ok else "arm bigB interpolated") +
                      f" at the equal-samples steps (~{fmt(es[0]['step'])}): min over seeds of its fixed-subset loss"))
    extra = {"bigB_matched_step": [m["step"] for m in mb], "ref_matched_step_to_lowlr": [m["step"] for m in ml],
             "density_bigB_at_ref_loss": [m["density"] for m in mb],
             "trace_k_bigB_at_ref_loss": [m["trace"] for m in mb],
             "density_bigB_equal_samples": [e["density"] for e in es],
             "trace_k_bigB_equal_samples": [e["trace"] for e in es],
             "fixed_loss_bigB_equal_samples": [e["loss"] for e in es],
             "density_ref_at_lowlr_loss": [m["density"] for m in ml],
             "trace_k_ref_at_lowlr_loss": [m["trace"] for m in ml]}
    for a in nums:
        for k, label in (("density", "density"), ("loss", "fixed_loss"), ("trace", "trace_k")):
            extra[f"{label}_{a}"] = [x[k] for x in nums[a]]
    return vals, probs, gates, extra


def run(ctx: Context, p: dict[str, Any]) -> Finding:
    ch = arm_changes(p)
    runs = {a: sgd_runs(ctx, **kw) for a, kw in ch.items()}
    cfgs = {a: sgd_config(ctx.preset, **kw) for a, kw in ch.items()}
    nums = {a: [arm_numbers(r.history) for r in rs] for a, rs in runs.items()}
    ratio = cfgs["ref"].batch_size / cfgs["bigB"].batch_size
    vals, probs, gates, extra = measure(nums, ratio, gd="gd" in ch)
    parts = {pp.name: decide(vals[pp.name], probs[pp.name], pp) for pp in _parts("gd" in ch)}
    acc = {f"test_acc_{a}": [r.final["test_accuracy"] for r in rs] for a, rs in runs.items()}
    allp = {**extra, **acc}
    per_seed = {k: [float(x) for x in v] for k, v in allp.items() if all(math.isfinite(float(x)) for x in v)}
    dropped = sorted(k for k in allp if k not in per_seed)
    measured = "; ".join(f"{a} (lr {fmt(cfgs[a].lr)}, B {cfgs[a].batch_size}): density 2..L "
                         f"{mean_sd(extra[f'density_{a}'])}, "
                         f"loss {mean_sd(extra[f'fixed_loss_{a}'])}, trace_k {mean_sd(extra[f'trace_k_{a}'])}"
                         for a in ch)
    measured += (f"; bigB at ref's end loss (step {mean_sd(extra['bigB_matched_step'])}): density "
                 f"{mean_sd(extra['density_bigB_at_ref_loss'])}, trace_k {mean_sd(extra['trace_k_bigB_at_ref_loss'])}; "
                 f"bigB at equal samples (step ~{fmt(cfgs['ref'].steps * ratio)}): loss "
                 f"{mean_sd(extra['fixed_loss_bigB_equal_samples'])}, density "
                 f"{mean_sd(extra['density_bigB_equal_samples'])}, "
                 f"trace_k {mean_sd(extra['trace_k_bigB_equal_samples'])}")
    ser = {"arms": {a: {"lr": cfgs[a].lr, "batch_size": cfgs[a].batch_size} for a in ch},
           "points": {k: [float(x) for x in v] for k, v in vals.items()}, "seeds": list(ctx.seeds),
           "curves": {a: {"steps": nums[a][0]["cols"]["flat/trace_k"][0].tolist(),
                          "trace": nums[a][0]["cols"]["flat/trace_k"][1].tolist(),
                          "loss_steps": nums[a][0]["cols"]["fixed/loss"][0].tolist(),
                          "loss": nums[a][0]["cols"]["fixed/loss"][1].tolist(),
                          "density_steps": nums[a][0]["cols"]["density"][0].tolist(),
                          "density": nums[a][0]["cols"]["density"][1].tolist()} for a in ch}}
    notes = ["noise scale lr/B: " + ", ".join(f"{a} {fmt(c.lr / c.batch_size)}" for a, c in cfgs.items()),
             f"equal samples: bigB at {fmt(ratio)} x each step of ref's end window (interpolated between its logs; "
             f"its trace estimates come every {cfgs['bigB'].flatness_every} steps)",
             "the lr comparisons mix the noise scale with the stability bound 2/lr: context only"]
    if dropped:
        notes.append(f"not finite in some seed (left out of per_seed; see the parts' reasons): {', '.join(dropped)}")
    if "gd" not in ch:
        notes.append("full-batch GD runs in the full preset only (a GD step over 4000 examples costs ~125 B-32 steps)")
    return Finding(None, measured, per_seed=per_seed, parts=parts, series=ser, gates=gates,
                   model=describe(cfgs["ref"]), notes=notes)


def _points_figure(ser: dict[str, Any], out) -> list:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    groups = [("equal steps", "smaller_batch"), ("equal samples", "smaller_batch_{}_at_equal_samples"),
              ("matched loss", "smaller_batch_{}_at_matched_loss"), ("lr, equal steps", "larger_lr"),
              ("lr, matched loss", "larger_lr_{}_at_matched_loss")]
    fig = Figure(figsize=(9.0, 3.8), dpi=120)
    FigureCanvasAgg(fig)
    marks = "os^Dv<>p"
    for j, (q, ylabel, delta) in enumerate((("sparser", "density difference (prediction > 0)", MIN_DENSITY),
                                             ("flatter", "ln trace ratio (prediction > 0)", MIN_LOG_TRACE))):
        ax = fig.add_subplot(1, 2, j + 1)
        for i, (label, pat) in enumerate(groups):
            name = pat.format(q) if "{}" in pat else f"{pat}_{q}"
            v = np.asarray(ser["points"].get(name, []), np.float64)
            for k, x in enumerate(v):
                if math.isfinite(x):
                    ax.plot(i + 0.08 * (k - (v.size - 1) / 2), x, marks[k % len(marks)], color=f"C{i}", ms=5,
                            label=f"seed {ser['seeds'][k]}" if i == 0 else None)
            if np.isfinite(v).any():
                ax.hlines(np.nanmean(v), i - 0.25, i + 0.25, color=f"C{i}", lw=2)
        ax.axhline(0, color="k", lw=0.8)
        ax.axhline(delta, color="k", lw=0.8, ls="--")
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels([g for g, _ in groups], fontsize=7, rotation=20)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.grid(alpha=0.3)
        if j == 0:
            ax.legend(fontsize=7)
    fig.suptitle("G5: per-seed effects (line: mean; dashed: delta); the batch comparison at matched loss decides; "
                 "equal steps is gated (interpolated arm)",
                 fontsize=9)
    fig.tight_layout()
    return save_figure(fig, out, FORMATS)


def figures(ser: dict[str, Any], out_dir) -> list:
    paths = _points_figure(ser, out_dir / "g05_effects")
    cur = ser["curves"]
    bs = {a: ser["arms"][a]["batch_size"] for a in cur}
    tr = {f"{a} tr(H_K)": ((np.asarray(c["steps"]) * bs[a]).tolist(), np.log(np.clip(c["trace"], 1e-12, None)).tolist())
          for a, c in cur.items()}
    paths += plot_curves(tr, out_dir / "g05_trace_vs_samples", xlabel="examples seen (step x batch)",
                         ylabel="ln tr(H_K), fixed subset (values <= 0 clipped)",
                         title=f"G5: flatness vs samples seen (seed {ser['seeds'][0]})")
    ls = {f"{a} loss": ((np.asarray(c["loss_steps"]) * bs[a]).tolist(),
                        np.log10(np.clip(c["loss"], 1e-8, None)).tolist()) for a, c in cur.items()}
    ls.update({f"{a} density": ((np.asarray(c["density_steps"]) * bs[a]).tolist(), c["density"])
               for a, c in cur.items()})
    paths += plot_curves(ls, out_dir / "g05_loss_density_vs_samples", xlabel="examples seen (step x batch)",
                         ylabel="log10 fixed-subset loss; density 2..L",
                         title=f"G5: loss and density vs samples seen (seed {ser['seeds'][0]})")
    return paths


_P = {"smoke": dict(lr_lo=0.01, big_batch=128, gd=False), "quick": dict(lr_lo=0.01, big_batch=128, gd=False),
      "full": dict(lr_lo=0.01, big_batch=128, gd=True)}

CHECK = Check(
    name="G5",
    slug="g05_sgd_noise",
    title="SGD noise -> flatter and sparser",
    claim=("With plain SGD, more gradient noise (4x smaller batch at the same lr; also 10x larger lr) gives a flatter "
           "(smaller tr(H_K)) and sparser model, compared at matched training loss; "
           "full-batch GD ends less sparse than SGD."),
    rule=(f"Effect parts oriented so the prediction is > 0: held-out density differences of blocks 2..L (delta "
          f"{MIN_DENSITY}), ln trace ratios (delta {MIN_LOG_TRACE}); PASS when the lower bound > 0 and the mean > "
          f"delta, FAIL when the upper bound < delta. Primary (decide): bigB vs ref at matched fixed-subset loss, "
          f"density and trace; the claim passes when both pass, fails when a FAIL survives Holm. Context: bigB at "
          f"equal samples (fitting level free), the lr parts (noise + stability bound 2/lr), the equal-steps parts. "
          f"Per-arm gates: each "
          f"compared arm's last-10% fixed-subset loss >= {LOSS_FLOOR} (not interpolated), bigB's also at the "
          f"equal-samples steps; a part whose arm interpolated is INCONCLUSIVE."),
    presets={k: {"sgd": SGD[k], **v} for k, v in _P.items()},
    run=run,
    figures=figures,
    plan=plan,
)
