"""G6: sparsity follows the zero-DERIVATIVE region, not the zero output.

Shifted S-shaped activation sigma(z) = sy + dead-zone(z - sx) with a flat middle of half-width
h = 1.5 (sigma' = 0 for |z - sx| <= h) whose output there is sy = +-1.6, not 0. Four runs move the
flat region left/right and its output up/down: (sx, sy) in {(+1.6, +1.6), (-1.6, +1.6),
(+1.6, -1.6), (-1.6, -1.6)}. The theory predicts that pre-activations migrate INTO the flat region
(derivative sparsity rises) although sitting there does not give a zero activation. Measured:
derivative sparsity ``train/deriv_sparsity/mean`` (fraction of z with sigma'(z) = 0) at the first
log and over the last 10% of training; for contrast the fraction of exact-zero activations
(|a| <= 1e-6) on the held-out batch at the end (the flat output is +-1.6, so this stays ~0).
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from gradsparse.figures import plot_bands
from gradsparse.models import zero_probes
from theory_checks.context import BASE, base_config, base_runs, Context, end_value, heldout, series
from theory_checks.protocol import Check, Finding
from theory_checks.verdicts import combine, effect_verdict, mean_sd

MIN_RISE = 0.05
SHIFTS = ((1.6, 1.6), (-1.6, 1.6), (1.6, -1.6), (-1.6, -1.6))


def act_name(h: float, sx: float, sy: float) -> str:
    return f"sshaped({h:g},{sx:g},{sy:g})"


def run(ctx: Context, p: dict[str, Any]) -> Finding:
    parts, per_seed, ser = {}, {}, {"steps": None, "curves": {}}
    measured = []
    for sx, sy in SHIFTS[: p["shifts"]]:
        name = act_name(p["half_width"], sx, sy)
        runs = base_runs(ctx, activation=name)
        start = [series(r.history, "train/deriv_sparsity/mean")[1][0] for r in runs]
        end = [end_value(r.history, "train/deriv_sparsity/mean") for r in runs]
        x, _ = heldout(ctx, base_config(ctx.preset))
        zeros = []
        for r in runs:
            _, aux = r.model(jnp.asarray(x), zero_probes(r.model.mlp_blocks(), x.shape[0]))
            zeros.append(float(np.mean([np.mean(np.abs(np.asarray(a["a"])) <= 1e-6) for a in aux])))
        label = f"sx={sx:+g},sy={sy:+g}"
        parts[label] = effect_verdict([e - s for s, e in zip(start, end)], MIN_RISE,
                                      what=f"derivative-sparsity rise ({name})")
        per_seed.update({f"{label}/deriv_sparsity_start": start, f"{label}/deriv_sparsity_end": end,
                         f"{label}/exact_zero_fraction_end": zeros})
        measured.append(f"{label}: deriv sparsity {mean_sd(start)} -> {mean_sd(end)} (exact zeros {mean_sd(zeros)})")
        st, _ = series(runs[0].history, "train/deriv_sparsity/mean")
        ser["steps"] = st.tolist()
        ser["curves"][label] = [series(r.history, "train/deriv_sparsity/mean")[1].tolist() for r in runs]
    return Finding(combine(parts), "; ".join(measured), per_seed=per_seed, parts=parts, series=ser,
                   notes=[f"activation sshaped(h={p['half_width']}, sx, sy) in the baseline MLP "
                          f"({BASE[ctx.preset]['optimizer']}, {BASE[ctx.preset]['steps']} steps)"])


def figures(ser: dict[str, Any], out_dir) -> list:
    bands = {k: (ser["steps"], v) for k, v in ser["curves"].items()}
    return plot_bands(bands, out_dir / "g06_deriv_sparsity", ylabel="fraction of z in the flat region",
                      title="G6: S-shaped activation, flat region (sigma' = 0) occupancy")


CHECK = Check(
    name="G6",
    slug="g06_flat_region",
    title="Sparsity follows the zero-derivative region",
    claim=("With a shifted S-shaped activation whose flat region (half-width 1.5, shifted by +-1.6) outputs +-1.6 "
           "instead of 0, training moves pre-activations into the flat region: derivative sparsity rises in all "
           "four shift combinations."),
    rule=(f"Per shift: effect = derivative sparsity (mean of last 10% of logs) - derivative sparsity at the first "
          f"log; PASS when > 0 in every seed with mean > {MIN_RISE}, FAIL when < 0 in a majority; the claim "
          f"passes when all four shifts pass and fails when any fails."),
    presets={k: {"base": BASE[k], "half_width": 1.5, "shifts": 2 if k == "smoke" else 4}
             for k in ("smoke", "quick", "full")},
    run=run,
    figures=figures,
)
