"""G14: Lazy Neuron controls - sparsity also emerges with random labels and random inputs; deeper/wider is sparser.

Li et al. (arXiv 2210.06313) found activation sparsity with random labels and with random inputs
(so it is not about the data's structure), and more of it in larger models. Measured on the
baseline architecture: (a) mnist1d inputs with random labels ('random_labels'), (b) iid Gaussian
inputs with random labels ('random_inputs'): density falls from init as in G3; (c) twice the depth
and (d) twice the width vs the baseline: lower final density. Density: the held-out batch, blocks
2..L, first log vs mean over the last 10% of logs (density needs no labels, so the held-out inputs
serve for the random-label arm too). Every part is primary: each is one of Lazy Neuron's controls.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gradsparse.figures import plot_bars
from theory_checks.context import tail, BASE, base_config, base_runs, Context, describe, late_blocks, per_block_end
from theory_checks.protocol import Check, Finding
from theory_checks.plan import CheckPlan, PartPlan, arm
from theory_checks.verdicts import effect_verdict, mean_sd

MIN_DROP = 0.10      # as G3
DROP_SOURCE = "as G3: 'well below 0.5' read as <= 0.4"
MIN_SIZE = 0.01
SIZE_SOURCE = "one point of density: ~2x the seed spread (+-0.005) of the quick logs"
WHY = {"random_labels": "Lazy Neuron: sparsity without the data's label structure (it is not about the labels)",
       "random_inputs": "Lazy Neuron: sparsity without the data's input structure",
       "deeper": "Lazy Neuron: larger (deeper) models are sparser", "wider": "Lazy Neuron: larger (wider) models are "
                                                                          "sparser"}


def _arms(preset: str) -> dict[str, dict[str, Any]]:
    base = BASE[preset]
    return {"random_labels": dict(data="random_labels"), "random_inputs": dict(data="random_inputs"),
            "deeper": dict(depth=2 * base["depth"]), "wider": dict(width=2 * base["width"])}


def part_plan(name: str) -> PartPlan:
    if name.startswith("random"):
        return PartPlan(f"{name}_sparsify", "effect", "primary",
                        f"{name}: held-out density drop, blocks 2..L (start - end)", MIN_DROP, DROP_SOURCE,
                        why=WHY[name])
    return PartPlan(f"{name}_sparser", "effect", "primary", f"density(baseline) - density({name}), held-out, blocks 2..L",
                    MIN_SIZE, SIZE_SOURCE, why=WHY[name])


def plan(preset: str, p: dict[str, Any]) -> CheckPlan:
    arms = [arm("baseline", base_config(preset))]
    arms += [arm(a, base_config(preset, flatness_every=0, **kw)) for a, kw in _arms(preset).items() if a in p["arms"]]
    return CheckPlan(arms=arms, parts=[part_plan(a) for a in _arms(preset) if a in p["arms"]])


def run(ctx: Context, p: dict[str, Any]) -> Finding:
    arms = {a: kw for a, kw in _arms(ctx.preset).items() if a in p["arms"]}
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
                                                      what=part_plan(arm).what)
            measured.append(f"{arm}: density {mean_sd(d0)} -> {mean_sd(d1)}")
        else:
            parts[f"{arm}_sparser"] = effect_verdict([a - b for a, b in zip(d_ref, d1)], MIN_SIZE, source=SIZE_SOURCE,
                                                     what=part_plan(arm).what)
            measured.append(f"{arm} ({', '.join(f'{k} {v}' for k, v in kw.items())}): density end {mean_sd(d1)}")
    return Finding(None, "; ".join(measured), per_seed=per_seed, parts=parts, series=ser, numbers=numbers,
                   model=describe(base_config(ctx.preset)),
                   notes=["density: held-out, blocks 2..L (the deeper arm's blocks 2..4 against the baseline's block 2); "
                          "per-block values in the table"])


def figures(ser: dict[str, Any], out_dir) -> list:
    groups = {k.replace("_", " "): {"final density": v} for k, v in ser.items()}
    return plot_bars(groups, out_dir / "g14_controls", ylabel="final held-out density, blocks 2..L",
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
    plan=plan,
)
