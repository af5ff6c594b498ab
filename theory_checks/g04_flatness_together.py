"""G4: late in training, flatness and (relaxed) gradient sparsity fall together.

The theory's "late" phase is SGD near a well-learned minimum, where the loss has stopped falling but
SGD noise keeps acting and drifts the weights toward flatter minima. Plain CE on a model that fits
its data never shows that phase (the trace falls only because the loss does, CHECKS_REVIEW Exp 3),
so the check runs it where it is known to exist: label-noise SGD (a fraction p of each batch's
labels resampled uniformly; the setting where SGD provably drifts to smaller tr(H) at constant
loss), started from the end of the plain-SGD baseline (``theory_checks.context.SGD``).

Over that phase, at every logged step: tr(H_K) by Hutchinson (``flat/trace_k``) and the
effective-gradient norm mean_t ||eta_t||^2 (``fixed/eta_l2sq``), both on the FIXED 512-example
training subset (SPEC 3.4: not the current batch, whose loss swings 2-4x and correlates the two
artificially); held-out density of blocks 2..L. Effects: minus the Spearman correlation of each
with the step (a fall gives a positive effect). Regime gate (on the same phase, not a tested
quantity): the fixed-subset loss has plateaued (relative change between the third and the last
quarter < 15%) at a value >= 0.05 (not interpolated).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.stats import spearmanr

from gradsparse.factory import finetune_start
from gradsparse.figures import plot_curves
from theory_checks.context import tail, SGD, Context, describe, sgd_config, sgd_runs, window_mean
from theory_checks.protocol import Check, Finding
from theory_checks.verdicts import Gate, combine, effect_verdict, mean_sd

#: minimal trend: |Spearman| 0.3 over ~10 logged points is a monotone tendency clearly above the
#: rank noise of a flat series (stated before the run; no pilot of this phase existed)
MIN_TREND = 0.3
SOURCE = "a monotone trend: |Spearman(step, .)| >= 0.3 over the phase's ~10 logged points"
PLATEAU = 0.15
LOSS_FLOOR = 0.05
KEYS = {"trace_k": "flat/trace_k", "eta_l2sq": "fixed/eta_l2sq/mean", "density": "heldout/density"}


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (average ranks for ties); NaN for fewer than 3 points."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if a.size < 3 or a.size != b.size:
        return float("nan")
    return float(spearmanr(a, b).statistic)


def _trend(history: list[dict], key: str) -> float:
    rows = [h for h in history if key in h]
    vals = [float(np.mean(tail(h[key]))) if isinstance(h[key], list) else float(h[key]) for h in rows]
    return -spearman(np.array([h["step"] for h in rows], float), np.array(vals))


def run(ctx: Context, p: dict[str, Any]) -> Finding:
    base = sgd_runs(ctx)
    cfg = sgd_config(ctx.preset, label_noise=p["label_noise"], steps=p["phase_steps"],
                     flatness_every=p["flatness_every"], log_every=p["flatness_every"])
    phases = []
    for s, r in zip(ctx.seeds, base):
        start, opts = finetune_start(r.model, cfg.replace(seed=s))
        phases.append(ctx.train(cfg.replace(seed=s, surgery=opts), f"g04-labelnoise-from-sgd{s}", start=start))
    trends = {k: [_trend(ph.history, key) for ph in phases] for k, key in KEYS.items()}
    parts = {f"{k}_falls": effect_verdict(v, MIN_TREND, source=SOURCE, what=f"-Spearman(step, {KEYS[k]})")
             for k, v in trends.items()}
    q3 = [window_mean(ph.history, "fixed/loss", 0.5, 0.75) for ph in phases]
    q4 = [window_mean(ph.history, "fixed/loss", 0.75, 1.0) for ph in phases]
    change = float(np.max([abs(b - a) / max(a, 1e-12) for a, b in zip(q3, q4)]))
    gates = [Gate("loss_plateau", change, "<", PLATEAU, "max over seeds of |loss(Q4) - loss(Q3)| / loss(Q3), "
                  "fixed subset, label-noise phase"),
             Gate("loss_floor", float(np.min(q4)), ">=", LOSS_FLOOR, "min over seeds of the fixed-subset loss in "
                  "the last quarter (not interpolated)")]
    ph0 = phases[0].history
    ser = {"steps": [h["step"] for h in ph0 if "flat/trace_k" in h],
           "trace_k": [h["flat/trace_k"] for h in ph0 if "flat/trace_k" in h],
           "eta_l2sq": [h["fixed/eta_l2sq/mean"] for h in ph0 if "flat/trace_k" in h],
           "density": [float(np.mean(tail(h["heldout/density"]))) for h in ph0 if "flat/trace_k" in h],
           "loss": [h["fixed/loss"] for h in ph0 if "flat/trace_k" in h], "seed": ctx.seeds[0]}
    t0 = [ph.history[0]["flat/trace_k"] for ph in phases]
    t1 = [ph.history[-1]["flat/trace_k"] for ph in phases]
    return Finding(
        combine(parts),
        measured=(f"label-noise phase (p {p['label_noise']}, {p['phase_steps']} steps): trace_k {mean_sd(t0)} -> "
                  f"{mean_sd(t1)}; -Spearman with step: trace {mean_sd(trends['trace_k'])}, ||eta||^2 "
                  f"{mean_sd(trends['eta_l2sq'])}, density {mean_sd(trends['density'])}; fixed-subset loss Q4 "
                  f"{mean_sd(q4)}"),
        per_seed={**{f"trend_{k}": v for k, v in trends.items()}, "trace_start": t0, "trace_end": t1,
                  "loss_q3": q3, "loss_q4": q4},
        parts=parts, series=ser, gates=gates,
        model=f"{describe(cfg)}, label noise {p['label_noise']}, from the end of the SGD baseline",
        notes=["traces, ||eta||^2 and the loss on the fixed 512-example training subset; density held-out, "
               "blocks 2..L"])


def figures(ser: dict[str, Any], out_dir) -> list:
    def norm(v):
        v = np.asarray(v, float)
        return (v / np.nanmax(np.abs(v))).tolist() if v.size and np.nanmax(np.abs(v)) > 0 else v.tolist()

    curves = {"tr(H_K) (fixed subset)": (ser["steps"], norm(ser["trace_k"])),
              "mean ||eta||^2 (fixed subset)": (ser["steps"], norm(ser["eta_l2sq"])),
              "density blocks 2..L (held-out)": (ser["steps"], ser["density"]),
              "loss (fixed subset) / max": (ser["steps"], norm(ser["loss"]))}
    return plot_curves(curves, out_dir / "g04_flatness", ylabel="value / max (density: raw)",
                       title=f"G4: label-noise SGD phase (seed {ser['seed']})")


PHASE = {"smoke": dict(label_noise=0.1, phase_steps=60, flatness_every=20),
         "quick": dict(label_noise=0.1, phase_steps=1000, flatness_every=100),
         "full": dict(label_noise=0.1, phase_steps=4000, flatness_every=250)}

CHECK = Check(
    name="G4",
    slug="g04_flatness_together",
    title="Flatness and gradient sparsity fall together",
    claim=("Late in training (loss plateaued, SGD noise still acting: label-noise SGD), the key-layer Hessian trace, "
           "the effective-gradient norm ||eta||^2 and the density fall together."),
    rule=(f"Three effect parts, each -Spearman(step, quantity) over the label-noise phase (trace_k and ||eta||^2 on "
          f"the fixed training subset, held-out density of blocks 2..L), delta = {MIN_TREND}: PASS when the lower "
          f"bound > 0 and the mean > delta, FAIL when the upper bound < delta; the claim passes when every part "
          f"passes and fails when a part's FAIL survives Holm's correction. Gates: the fixed-subset loss has "
          f"plateaued (relative change Q3 -> Q4 < {PLATEAU}) at >= {LOSS_FLOOR}; else INCONCLUSIVE."),
    presets={k: {"sgd": SGD[k], **PHASE[k]} for k in ("smoke", "quick", "full")},
    run=run,
    figures=figures,
)
