"""G4: late in training, flatness and (relaxed) gradient sparsity fall together.

Flatness: the Hutchinson estimate of tr(H_K), the Hessian of the loss w.r.t. the key matrices
(logged as ``flat/trace_k`` every ``flatness_every`` steps), and the augmented flatness AF_K
(``train/af_k/mean``). Gradient sparsity, relaxed: mean_t ||eta_t||^2 (``train/eta_l2sq/mean``),
whose fall is what the theory turns into sparsity of eta. "Late" = the second half of training:
each quantity's mean over the last quarter of the steps is compared with its mean over the second
quarter (relative fall = 1 - late/mid). "Together": the Spearman rank correlation between tr(H_K)
and ||eta||^2 at the logged steps of the second half.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.stats import spearmanr

from gradsparse.figures import plot_curves
from theory_checks.context import BASE, base_runs, Context, series, window_mean
from theory_checks.protocol import Check, Finding
from theory_checks.verdicts import combine, effect_verdict, mean_sd

MIN_FALL = 0.10
MIN_RHO = 0.3
KEYS = {"trace_k": "flat/trace_k", "af_k": "train/af_k/mean", "eta_l2sq": "train/eta_l2sq/mean"}


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (average ranks for ties); NaN for fewer than 3 points."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if a.size < 3 or a.size != b.size:
        return float("nan")
    return float(spearmanr(a, b).statistic)


def run(ctx: Context, p: dict[str, Any]) -> Finding:
    runs = base_runs(ctx)
    falls: dict[str, list[float]] = {k: [] for k in KEYS}
    rho = []
    for r in runs:
        for k, key in KEYS.items():
            mid = window_mean(r.history, key, 0.25, 0.5)
            late = window_mean(r.history, key, 0.75, 1.0)
            falls[k].append(1.0 - late / mid if mid > 0 else float("nan"))
        flat = [h for h in r.history if "flat/trace_k" in h and h["step"] >= 0.5 * r.history[-1]["step"]]
        rho.append(spearman(np.array([h["flat/trace_k"] for h in flat]), np.array([h[KEYS["eta_l2sq"]] for h in flat])))
    parts = {f"{k}_falls": effect_verdict(v, MIN_FALL, what=f"relative late fall of {KEYS[k]}")
             for k, v in falls.items()}
    parts["together"] = effect_verdict(rho, MIN_RHO, what="Spearman(trace_k, ||eta||^2) over the second half")
    r0 = runs[0]
    st, tk = series(r0.history, "flat/trace_k")
    s2, af = series(r0.history, KEYS["af_k"])
    _, eta = series(r0.history, KEYS["eta_l2sq"])
    _, dens = series(r0.history, "train/density/mean")
    ser = {"trace_steps": st.tolist(), "trace_k": tk.tolist(), "steps": s2.tolist(), "af_k": af.tolist(),
           "eta_l2sq": eta.tolist(), "density": dens.tolist(), "seed": ctx.seeds[0]}
    return Finding(
        combine(parts),
        measured=(f"late relative fall: trace_k {mean_sd(falls['trace_k'])}, AF_K {mean_sd(falls['af_k'])}, "
                  f"||eta||^2 {mean_sd(falls['eta_l2sq'])}; Spearman(trace, ||eta||^2) {mean_sd(rho)}"),
        per_seed={**{f"fall_{k}": v for k, v in falls.items()}, "spearman_trace_eta": rho},
        parts=parts, series=ser,
        notes=["windows: second quarter vs last quarter of the logged steps; Hutchinson probes per estimate: "
               f"{BASE[ctx.preset]['flatness_probes']}, every {BASE[ctx.preset]['flatness_every']} steps"])


def figures(ser: dict[str, Any], out_dir) -> list:
    def norm(v):
        v = np.asarray(v, float)
        return (v / np.nanmax(np.abs(v))).tolist() if np.nanmax(np.abs(v)) > 0 else v.tolist()

    curves = {"tr(H_K) (Hutchinson)": (ser["trace_steps"], norm(ser["trace_k"])),
              "AF_K": (ser["steps"], norm(ser["af_k"])), "mean ||eta||^2": (ser["steps"], norm(ser["eta_l2sq"])),
              "density": (ser["steps"], ser["density"])}
    return plot_curves(curves, out_dir / "g04_flatness", ylabel="value / max (density: raw)", logy=False,
                       title=f"G4: flatness and gradient norm over training (seed {ser['seed']})")


CHECK = Check(
    name="G4",
    slug="g04_flatness_together",
    title="Flatness and gradient sparsity fall together",
    claim=("In the second half of training the key-layer Hessian trace, the augmented flatness AF_K and the "
           "effective-gradient norm ||eta||^2 all fall, and the trace and ||eta||^2 move together."),
    rule=(f"Parts trace_k/af_k/eta_l2sq: effect = 1 - mean(last quarter)/mean(second quarter); PASS when > 0 in "
          f"every seed with mean > {MIN_FALL}, FAIL when < 0 (a rise) in a majority. Part together: Spearman "
          f"correlation of trace_k and ||eta||^2 over the second half; PASS when > 0 in every seed with mean > "
          f"{MIN_RHO}, FAIL when < 0 in a majority. PASS needs every part."),
    presets={k: {"base": BASE[k]} for k in ("smoke", "quick", "full")},
    run=run,
    figures=figures,
)
