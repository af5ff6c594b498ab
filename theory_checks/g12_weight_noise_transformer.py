"""G12: a small Transformer trained with weight noise is flatter and sparser than without.

On the ONE pinned Transformer of the module checks (``theory_checks.context.LM``: the causal byte LM
on the embedded text, 32 tokens per sample; every machine has it, so the experiment does not depend
on which datasets are installed). Token-wise synapse noise (SPEC 4.4a): z_t <- K x_t + eps_t,
eps_t ~ N(0, s^2 ||x_t||^2), s = rho RMS(K). To second order the noise adds (rho^2/6) sum_t
tr(d^2 L/dz_t^2) to the loss (CHECKS_REVIEW G12): a coefficient of 0.0017 at rho 0.1, 0.04 at
rho 0.5, so the quick preset compares rho = 0 with rho = 0.5 and the standard/full presets add a
dose-response rho in {0, 0.3, 0.5, 1.0} (density and trace falling with rho).

Sparser: held-out density, all MLP blocks, mean over the last 10% of training. Flatter: tr(H_K) by
Hutchinson on a FIXED subset of training windows (SPEC 3.4), mean over the last quarter.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from gradsparse.figures import plot_bands
from gradsparse.figures_spectra import FORMATS
from theory_checks.context import LM, Context, describe, end_value, lm_config, lm_runs, series, window_mean
from theory_checks.g04_flatness_together import spearman
from theory_checks.g10_modules_from_scratch import learned_gate
from theory_checks.protocol import Check, Finding
from theory_checks.verdicts import combine, effect_verdict, mean_sd

MIN_DENSITY = 0.01
D_SOURCE = "one point of density, about 2x the seed spread of the quick logs (+-0.002 to +-0.005)"
MIN_LOG_TRACE = 0.05
T_SOURCE = "a 5% change of tr(H_K), above the Hutchinson standard error on a fixed subset (1-3%)"
MIN_TREND = 0.5


def run(ctx: Context, p: dict[str, Any]) -> Finding:
    plain = lm_runs(ctx)
    doses = [r for r in p["rhos"] if r > 0]
    noisy = {rho: lm_runs(ctx, weight_noise="synapse", rho=rho) for rho in doses}
    dens = {0.0: [end_value(r.history, "heldout/density/mean") for r in plain]}
    trace = {0.0: [window_mean(r.history, "flat/trace_k", 0.75, 1.0) for r in plain]}
    loss = {0.0: [window_mean(r.history, "heldout/loss", 0.9, 1.0) for r in plain]}
    for rho, rs in noisy.items():
        dens[rho] = [end_value(r.history, "heldout/density/mean") for r in rs]
        trace[rho] = [window_mean(r.history, "flat/trace_k", 0.75, 1.0) for r in rs]
        loss[rho] = [window_mean(r.history, "heldout/loss", 0.9, 1.0) for r in rs]
    main = p["main_rho"]
    lr_ = [math.log(a / b) if a > 0 and b > 0 else float("nan") for a, b in zip(trace[0.0], trace[main])]
    parts = {"sparser": effect_verdict([a - b for a, b in zip(dens[0.0], dens[main])], MIN_DENSITY, source=D_SOURCE,
                                       what=f"density(rho 0) - density(rho {main})"),
             "flatter": effect_verdict(lr_, MIN_LOG_TRACE, source=T_SOURCE,
                                       what=f"ln trace_k(rho 0)/trace_k(rho {main})")}
    if len(doses) > 1:  # dose-response: minus the Spearman correlation of rho with density / trace, per seed
        rhos = [0.0] + doses
        for name, vals in (("density", dens), ("trace", trace)):
            trend = [-spearman(np.array(rhos), np.array([vals[r][i] for r in rhos])) for i in range(len(ctx.seeds))]
            parts[f"{name}_falls_with_dose"] = effect_verdict(trend, MIN_TREND, source="a monotone dose trend",
                                                              what=f"-Spearman(rho, {name}) over rho {rhos}")
    steps = series(plain[0].history, "heldout/density/mean")[0].tolist()
    cfg = lm_config(ctx.preset)
    ser = {"steps": steps, "model": cfg.model, "data": cfg.data, "rho": main,
           "plain": [series(r.history, "heldout/density/mean")[1].tolist() for r in plain],
           "noise": [series(r.history, "heldout/density/mean")[1].tolist() for r in noisy[main]],
           "seeds": list(ctx.seeds)}
    per_seed = {f"density_rho{r}": v for r, v in dens.items()}
    per_seed.update({f"trace_k_rho{r}": v for r, v in trace.items()})
    per_seed.update({f"heldout_loss_rho{r}": v for r, v in loss.items()})
    return Finding(
        combine(parts),
        measured="; ".join(f"rho {r}: density {mean_sd(dens[r])}, trace_k {mean_sd(trace[r])}, held-out loss "
                           f"{mean_sd(loss[r])}" for r in dens),
        per_seed=per_seed, parts=parts, series=ser, gates=[learned_gate(plain)], model=describe(cfg),
        notes=[f"synapse noise, s = rho RMS(K), fresh per token and step; rho in {[0.0] + doses}; trace on a fixed "
               f"subset of {cfg.flatness_subset} training windows"])


def _curves(ser: dict[str, Any], out, formats=None) -> list:
    bands = {"no noise": (ser["steps"], ser["plain"]), f"synapse noise (rho={ser['rho']})": (ser["steps"], ser["noise"])}
    return plot_bands(bands, out, ylabel="held-out density (active MLP units)", formats=formats or FORMATS,
                      title=f"Weight noise and sparsity: {ser['model']} on {ser['data']} (band: min-max over seeds)")


def figures(ser: dict[str, Any], out_dir) -> list:
    return _curves(ser, out_dir / "g12_weight_noise")


def readme_figure(ser: dict[str, Any], out, formats) -> list:
    return _curves(ser, out, formats)


_P = {"smoke": {"lm": LM["smoke"], "rhos": (0.0, 0.5), "main_rho": 0.5},
      "quick": {"lm": LM["quick"], "rhos": (0.0, 0.5), "main_rho": 0.5},
      "standard": {"lm": LM["standard"], "rhos": (0.0, 0.3, 0.5, 1.0), "main_rho": 0.5},
      "full": {"lm": LM["full"], "rhos": (0.0, 0.3, 0.5, 1.0), "main_rho": 0.5}}

CHECK = Check(
    name="G12",
    slug="g12_weight_noise_transformer",
    title="Weight noise: flatter and sparser Transformer",
    claim=("A small Transformer (byte LM, 32 tokens per sample) trained with token-wise synapse weight noise "
           "(rho = 0.5) ends flatter (smaller tr(H_K)) and sparser (lower MLP density) than without noise; with "
           "several doses, density and trace fall with rho."),
    rule=(f"Part sparser: effect = density(rho 0) - density(rho 0.5), delta {MIN_DENSITY}; part flatter: effect = "
          f"ln(trace_k(rho 0)/trace_k(rho 0.5)), delta {MIN_LOG_TRACE}; PASS when the lower bound > 0 and the mean > "
          f"delta, FAIL when the upper bound < delta. Standard/full add dose-response parts (-Spearman(rho, .), delta "
          f"{MIN_TREND}). PASS needs every part, FAIL when a part's FAIL survives Holm's correction. Gate: the "
          f"noise-free LM learned."),
    presets=_P,
    run=run,
    figures=figures,
)
