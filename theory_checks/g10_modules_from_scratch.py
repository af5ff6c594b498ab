"""G10: each sparsity module lowers the density vs vanilla; all three together roughly halve it.

Trained from scratch on the baseline (``TrainConfig`` plug-ins, ``gradsparse.plugins.configure``):
zeroth bias (doubly-biased MLP, SPEC 4.1), restricted LayerNorm (4.2), J-SquaredReLU (4.3), and the
three together, each against the vanilla baseline with the same seed (paired). Density: held-out
density averaged over the last 10% of logs. Accuracy: test accuracy at the end. The paper's headline
(~50% fewer active units) is at ViT-B / T5 scale; this is a 2-block residual MLP on mnist1d.
"""

from __future__ import annotations

from typing import Any

from gradsparse.figures import plot_bars
from gradsparse.figures_spectra import FORMATS
from theory_checks.context import BASE, base_runs, Context, end_value
from theory_checks.protocol import Check, Finding
from theory_checks.verdicts import bound_verdict, combine, effect_verdict, mean_sd

MIN_LOWER = 0.01
HALF_OK, HALF_BAD = 0.65, 0.85          # density(all three) / density(vanilla)
ACC_OK, ACC_BAD = 0.03, 0.06            # accuracy drop

ARMS = {"zeroth_bias": dict(zeroth_bias=True), "restricted_ln": dict(restricted_ln=True),
        "jsrelu": dict(activation="jsrelu"), "all_three": dict(zeroth_bias=True, restricted_ln=True, activation="jsrelu")}


def run(ctx: Context, p: dict[str, Any]) -> Finding:
    van = base_runs(ctx)
    dens = {"vanilla": [end_value(r.history, "heldout/density/mean") for r in van]}
    acc = {"vanilla": [r.final["test_accuracy"] for r in van]}
    for arm, kw in ARMS.items():
        if arm not in p["arms"]:
            continue
        rs = base_runs(ctx, **kw)
        dens[arm] = [end_value(r.history, "heldout/density/mean") for r in rs]
        acc[arm] = [r.final["test_accuracy"] for r in rs]
    parts = {f"{arm}_lowers": effect_verdict([v - m for v, m in zip(dens["vanilla"], dens[arm])], MIN_LOWER,
                                             what=f"density(vanilla) - density({arm})")
             for arm in ("zeroth_bias", "restricted_ln", "jsrelu") if arm in dens}
    ratio = [m / v for v, m in zip(dens["vanilla"], dens["all_three"])]
    parts["all_three_halves"] = bound_verdict(ratio, passes=lambda v: v <= HALF_OK, fails=lambda v: v > HALF_BAD,
                                              what="density(all three)/density(vanilla)", bound=f"<= {HALF_OK}",
                                              fail_bound=f"> {HALF_BAD}")
    drop = [v - m for v, m in zip(acc["vanilla"], acc["all_three"])]
    parts["accuracy_kept"] = bound_verdict(drop, passes=lambda v: v <= ACC_OK, fails=lambda v: v > ACC_BAD,
                                           what="test accuracy drop (vanilla - all three)", bound=f"<= {ACC_OK}",
                                           fail_bound=f"> {ACC_BAD}")
    per_seed = {f"density_{a}": v for a, v in dens.items()}
    per_seed.update({f"test_acc_{a}": v for a, v in acc.items()})
    per_seed["ratio_all_three"] = ratio
    return Finding(
        combine(parts),
        measured="; ".join(f"{a}: density {mean_sd(dens[a])}, acc {mean_sd(acc[a])}" for a in dens)
        + f"; all-three/vanilla {mean_sd(ratio)}",
        per_seed=per_seed, parts=parts, series={"density": dens, "accuracy": acc, "seeds": list(ctx.seeds)},
        notes=["from scratch with the baseline optimiser; zeroth bias at the MLP input, clip c = 0.1 |gamma|; "
               "restricted LN: no shift, gamma >= 1"])


def _bars(ser: dict[str, Any], out, formats=None) -> list:
    groups = {a.replace("_", " "): {"held-out density": ser["density"][a], "test accuracy": ser["accuracy"][a]}
              for a in ser["density"]}
    return plot_bars(groups, out, ylabel="fraction", formats=formats or FORMATS,
                     title="Sparsity modules trained from scratch (residual MLP, mnist1d)")


def figures(ser: dict[str, Any], out_dir) -> list:
    return _bars(ser, out_dir / "g10_modules")


def readme_figure(ser: dict[str, Any], out, formats) -> list:
    return _bars(ser, out, formats)


CHECK = Check(
    name="G10",
    slug="g10_modules_from_scratch",
    title="Modules lower density (from scratch)",
    claim=("Trained from scratch, the zeroth bias, the restricted LayerNorm and J-SquaredReLU each lower the density "
           "vs vanilla, the three together roughly halve it, and test accuracy is about unchanged."),
    rule=(f"Per module: effect = density(vanilla) - density(module), PASS when > 0 in every seed with mean > "
          f"{MIN_LOWER}, FAIL when < 0 in a majority. All three: ratio to vanilla PASS <= {HALF_OK} in every seed, "
          f"FAIL > {HALF_BAD} in a majority. Accuracy: drop PASS <= {ACC_OK} in every seed, FAIL > {ACC_BAD} in a "
          f"majority. PASS needs all five parts."),
    # the smoke preset (test suite) trains only the all-three arm: compiling each arm dominates at smoke size
    presets={k: {"base": BASE[k], "arms": ("all_three",) if k == "smoke" else tuple(ARMS)}
             for k in ("smoke", "quick", "full")},
    run=run,
    figures=figures,
)
