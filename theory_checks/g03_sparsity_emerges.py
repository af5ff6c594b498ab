"""G3: activation sparsity emerges in a LayerNorm-ed residual MLP (Lazy Neuron phenomenon at small scale).

At initialisation about half of the ReLU units of a LN-ed MLP are active (density ~0.5). The claim
is that training drives the density well below that, on the training batches and on held-out data
alike (so it is not memorisation of the training set). Measured on the shared baseline (see
``theory_checks.context.BASE``): density = fraction of activations with |a| > 1e-6, averaged over
blocks, at the first log (before any update) and at the end.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gradsparse.figures import plot_bands, plot_curves
from theory_checks.context import BASE, base_config, base_runs, Context, series, start_end
from theory_checks.protocol import Check, Finding
from theory_checks.verdicts import combine, effect_verdict, fmt, mean_sd

#: "well below": the density must fall by at least this much (absolute; 0.5 -> <= 0.4)
MIN_DROP = 0.10


def run(ctx: Context, p: dict[str, Any]) -> Finding:
    runs = base_runs(ctx)
    tr = [start_end(r.history, "train/density/mean") for r in runs]
    ho = [start_end(r.history, "heldout/density/mean") for r in runs]
    acc = [r.final["test_accuracy"] for r in runs]
    parts = {
        "train": effect_verdict([a - b for a, b in tr], MIN_DROP, what="train density drop (start - end)"),
        "heldout": effect_verdict([a - b for a, b in ho], MIN_DROP, what="held-out density drop (start - end)"),
    }
    cfg = base_config(ctx.preset)
    ser = {"steps": series(runs[0].history, "train/density/mean")[0].tolist(),
           "train": [series(r.history, "train/density/mean")[1].tolist() for r in runs],
           "heldout": [series(r.history, "heldout/density/mean")[1].tolist() for r in runs],
           "seeds": list(ctx.seeds)}
    return Finding(
        combine(parts),
        measured=(f"density train {mean_sd([a for a, _ in tr])} -> {mean_sd([b for _, b in tr])}, held-out "
                  f"{mean_sd([a for a, _ in ho])} -> {mean_sd([b for _, b in ho])}; test acc {mean_sd(acc)}"),
        per_seed={"train_density_start": [a for a, _ in tr], "train_density_end": [b for _, b in tr],
                  "heldout_density_start": [a for a, _ in ho], "heldout_density_end": [b for _, b in ho],
                  "test_accuracy": acc},
        numbers={"train_density_end_mean": float(np.mean([b for _, b in tr])),
                 "heldout_density_end_mean": float(np.mean([b for _, b in ho]))},
        parts=parts, series=ser,
        notes=[f"baseline: {cfg.model} width {cfg.width} depth {cfg.depth} on {cfg.data}, {cfg.optimizer} lr "
               f"{fmt(cfg.lr)}, batch {cfg.batch_size}, {cfg.steps} steps"])


def figures(ser: dict[str, Any], out_dir) -> list:
    curves = {}
    for i, s in enumerate(ser["seeds"]):
        curves[f"train (seed {s})"] = (ser["steps"], ser["train"][i])
        curves[f"held-out (seed {s})"] = (ser["steps"], ser["heldout"][i])
    return plot_curves(curves, out_dir / "g03_density", ylabel="density (fraction of active units)",
                       title="G3: density over training (baseline residual MLP)")


CHECK = Check(
    name="G3",
    slug="g03_sparsity_emerges",
    title="Sparsity emerges",
    claim=("Training a LayerNorm-ed residual ReLU MLP drives the density of active units well below its ~50% at "
           "initialisation, on training batches and on held-out data."),
    rule=(f"For train and held-out density separately: PASS when density(start) - density(end) > 0 in every seed "
          f"and its mean exceeds {MIN_DROP}; FAIL when the density rises in a majority of seeds; else INCONCLUSIVE. "
          f"The claim passes when both parts pass."),
    presets={k: {"base": BASE[k]} for k in ("smoke", "quick", "full")},
    run=run,
    figures=figures,
)


def readme_figure(ser: dict[str, Any], out, formats) -> list:
    bands = {"train batches": (ser["steps"], ser["train"]), "held-out batch": (ser["steps"], ser["heldout"])}
    return plot_bands(bands, out, ylabel="density (fraction of active units)", formats=formats,
                      title="Sparsity emerges: LN-ed residual MLP on mnist1d (band: min-max over seeds)")
