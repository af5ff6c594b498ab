"""G14: Lazy Neuron controls - sparsity also emerges with random labels and random inputs; deeper/wider is sparser.

Li et al. (arXiv 2210.06313) found activation sparsity with random labels and with random inputs
(so it is not about the data's structure), and more of it in larger models. Measured on the
baseline architecture: (a) mnist1d inputs with random labels ('random_labels'), (b) iid Gaussian
inputs with random labels ('random_inputs'): density falls from init as in G3; (c) twice the depth
and (d) twice the width vs the baseline: lower final density. Density: training batches, first log
vs mean over the last 10% of logs (held-out labels are random too, so train is the natural split).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gradsparse.figures import plot_bars
from theory_checks.context import tail, BASE, base_config, base_runs, Context, describe, late_blocks, per_block_end
from theory_checks.protocol import Check, Finding
from theory_checks.verdicts import combine, effect_verdict, mean_sd

MIN_DROP = 0.10      # as G3
DROP_SOURCE = "as G3: 'well below 0.5' read as <= 0.4"
MIN_SIZE = 0.01
SIZE_SOURCE = "one point of density: ~2x the seed spread (+-0.005) of the quick logs"


def run(ctx: Context, p: dict[str, Any]) -> Finding:
    base = BASE[ctx.preset]
    arms = {"random_labels": dict(data="random_labels"), "random_inputs": dict(data="random_inputs"),
            "deeper": dict(depth=2 * base["depth"]), "wider": dict(width=2 * base["width"])}
    arms = {a: kw for a, kw in arms.items() if a in p["arms"]}
    ref = base_runs(ctx)
    d_ref = [late_blocks(r.history, "heldout/density") for r in ref]
    parts, per_seed, measured = {}, {"density_baseline": d_ref}, [f"baseline density end {mean_sd(d_ref)}"]
    numbers: dict[str, float] = {}
    ser = {"baseline": d_ref}
    for arm, kw in arms.items():
        rs = base_runs(ctx, **kw)
        d0 = [float(np.mean(tail(r.history[0]["heldout/density"]))) for r in rs]
        d1 = [late_blocks(r.history, "heldout/density") for r in rs]
        for i, v in enumerate(np.mean([per_block_end(r.history, "heldout/density") for r in rs], axis=0)):
            numbers[f"{arm}/block{i + 1}_density_end"] = float(v)
        per_seed[f"density_start_{arm}"] = d0
        per_seed[f"density_end_{arm}"] = d1
        ser[arm] = d1
        if arm.startswith("random"):
            parts[f"{arm}_sparsify"] = effect_verdict([a - b for a, b in zip(d0, d1)], MIN_DROP, source=DROP_SOURCE,
                                                      what=f"{arm}: held-out density drop, blocks 2..L (start - end)")
            measured.append(f"{arm}: density {mean_sd(d0)} -> {mean_sd(d1)}")
        else:
            parts[f"{arm}_sparser"] = effect_verdict([a - b for a, b in zip(d_ref, d1)], MIN_SIZE, source=SIZE_SOURCE,
                                                     what=f"density(baseline) - density({arm}), held-out, blocks 2..L")
            measured.append(f"{arm} ({', '.join(f'{k} {v}' for k, v in kw.items())}): density end {mean_sd(d1)}")
    return Finding(combine(parts), "; ".join(measured), per_seed=per_seed, parts=parts, series=ser, numbers=numbers,
                   model=describe(base_config(ctx.preset)),
                   notes=["density: held-out, blocks 2..L (the deeper arm's blocks 2..4 against the baseline's block 2); "
                          "per-block values in the table"])


def figures(ser: dict[str, Any], out_dir) -> list:
    groups = {k.replace("_", " "): {"final density": v} for k, v in ser.items()}
    return plot_bars(groups, out_dir / "g14_controls", ylabel="final density (train)",
                     title="G14: Lazy Neuron controls")


CHECK = Check(
    name="G14",
    slug="g14_lazy_neuron_controls",
    title="Lazy Neuron controls",
    claim=("Density falls well below its initial ~50% also with random labels and with random inputs, and a deeper "
           "or a wider model ends sparser than the baseline."),
    rule=(f"Held-out density of blocks 2..L. Random labels / random inputs: effect = density start - end, delta "
          f"{MIN_DROP}. Deeper / wider: effect = density(baseline) - density(bigger), delta {MIN_SIZE}. Each part: PASS "
          f"when the lower bound > 0 and the mean > delta, FAIL when the upper bound < delta. PASS needs all parts; "
          f"FAIL when a part's FAIL survives Holm's correction."),
    # the smoke preset (test suite) runs one control of each kind: compiling each arm dominates at smoke size
    presets={k: {"base": BASE[k], "arms": ("random_labels", "deeper") if k == "smoke" else
                 ("random_labels", "random_inputs", "deeper", "wider")} for k in ("smoke", "quick", "full")},
    run=run,
    figures=figures,
)
