"""G13: derivative sparsity vs activation sparsity, per activation (ReLU, JSReLU, ReLU^2, GELU).

The theory's object is the zero-derivative set {sigma'(z) = 0}: flat minima push eta = g sigma'(z)
towards sparsity. For ReLU, JSReLU and ReLU^2 that set is exactly where the activation is 0, so the
two sparsities are the same number at every step and both should rise during training. GELU has no
extended zero-derivative region (sigma' vanishes only in the far negative tail, |sigma'| <= 1e-6 for
z < about -5.5), so exact sparsity is not expected there; the theory's prediction for it is that
E[sigma'(z)^2] falls (pre-activations drift to where sigma' is small). Measured on the baseline
with each activation (same seeds): ``train/act_sparsity``, ``train/deriv_sparsity``,
``train/dsigma_sq`` (per logged step, mean over blocks).

"The same number": the logged activation sparsity counts |a| <= 1e-6 (SPEC 2.1), which also
contains the sliver 0 < z <= sigma^-1(1e-6) (for ReLU^2 that is z <= 1e-3), so the logged
numbers differ by the mass of that sliver (reported). The identity itself is checked with exact
zeros on the held-out batch of each trained model: fraction(a == 0) against fraction(sigma'(z) == 0).
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from gradsparse.figures import draw_bars
from gradsparse.figures_spectra import FORMATS, save_figure
from gradsparse.models import zero_probes
from theory_checks.context import BASE, base_config, base_runs, Context, describe, end_value, heldout, series
from theory_checks.protocol import Check, Finding
from theory_checks.plan import CheckPlan, PartPlan, arm
from theory_checks.verdicts import bound_verdict, effect_verdict, mean_sd

RELU_LIKE = ("relu", "jsrelu", "relu2")
#: every delta is half the pilot effect on seeds 1000, 1001 (outside the test seeds; `python -m
#: theory_checks.pilot G13 --preset quick`): derivative-sparsity rise ReLU 0.263/0.257, JSReLU
#: 0.262/0.262, ReLU^2 0.201/0.208 (delta: half the smallest, 0.10); relative fall of GELU's
#: E[sigma'^2] 0.413/0.399 (0.20); JSReLU - ReLU^2 contrast 0.059/0.056 (0.028)
MIN_RISE = 0.10
#: the follow-up's contrast: ReLU^2 (sigma' -> 0 at 0) leaves tiny active units cheap for flatness, JSReLU
#: (sigma' jumps to 1) does not, so JSReLU ends more derivative-sparse
MIN_CONTRAST = 0.028
CONTRAST_SOURCE = "half the pilot contrast on seeds 1000-1001 (0.059, 0.056)"
MIN_FALL = 0.20
FALL_SOURCE = "half the pilot fall on seeds 1000-1001 (0.413, 0.399)"
RISE_SOURCE = "half the smallest pilot rise on seeds 1000-1001 (ReLU^2: 0.201, 0.208)"
WHY_RISE = ("the theory's object is the zero-derivative set: flat minima push eta = g sigma'(z) to sparsity, so the "
            "fraction of z with sigma'(z) = 0 rises during training")
WHY_FALL = "GELU has no extended zero-derivative set: the same pressure shows as a falling E[sigma'(z)^2]"
WHY_CONTRAST = ("the follow-up's mechanism: ReLU^2's sigma' -> 0 at 0 leaves tiny active units cheap for flatness, "
                "JSReLU's sigma' jumps to 1, so JSReLU ends more derivative-sparse")


def part_plans(activations) -> list[PartPlan]:
    parts = []
    for act in [a for a in (*RELU_LIKE, "gelu") if a in activations]:
        if act in RELU_LIKE:
            parts.append(PartPlan(f"{act}_same", "exact", "implementation",
                                  f"{act}: |frac(a == 0) - frac(sigma'(z) == 0)| (held-out, max over blocks; a unit "
                                  f"test: equal by construction)", source="exact zeros: equal by construction"))
            parts.append(PartPlan(f"{act}_rises", "effect", "primary", f"{act}: derivative sparsity rise", MIN_RISE,
                                  RISE_SOURCE, why=WHY_RISE))
        else:
            parts.append(PartPlan("gelu_dsigma_falls", "effect", "primary", "gelu: relative fall of E[sigma'(z)^2]",
                                  MIN_FALL, FALL_SOURCE, why=WHY_FALL))
    if "jsrelu" in activations and "relu2" in activations:
        parts.append(PartPlan("jsrelu_sparser_than_relu2", "effect", "primary",
                              "deriv sparsity(JSReLU) - deriv sparsity(ReLU^2), end", MIN_CONTRAST, CONTRAST_SOURCE,
                              why=WHY_CONTRAST))
    return parts


def plan(preset: str, p: dict[str, Any]) -> CheckPlan:
    arms = [arm(a, base_config(preset) if a == "relu" else base_config(preset, activation=a, flatness_every=0))
            for a in (*RELU_LIKE, "gelu") if a in p["activations"]]
    return CheckPlan(arms=arms, parts=part_plans(p["activations"]))


def exact_gap(model: Any, x: np.ndarray) -> float:
    """max over blocks of |fraction(a == 0) - fraction(sigma'(z) == 0)| on the batch x."""
    _, aux = model(jnp.asarray(x), zero_probes(model.mlp_blocks(), x.shape[0]))
    return float(max(abs(np.mean(np.asarray(a["a"]) == 0) - np.mean(np.asarray(b.act.deriv(a["z"])) == 0))
                     for a, b in zip(aux, model.mlp_blocks())))


def run(ctx: Context, p: dict[str, Any]) -> Finding:
    parts, per_seed, measured = {}, {}, []
    ser: dict[str, dict[str, list[float]]] = {k: {} for k in SERIES_KEYS}
    x, _ = heldout(ctx, base_config(ctx.preset))
    for act in [a for a in (*RELU_LIKE, "gelu") if a in p["activations"]]:
        runs = base_runs(ctx) if act == "relu" else base_runs(ctx, activation=act)
        tol_gap = [float(np.max(np.abs(series(r.history, "train/act_sparsity/mean")[1]
                                       - series(r.history, "train/deriv_sparsity/mean")[1]))) for r in runs]
        gap = [exact_gap(r.model, x) for r in runs]
        a_end = [end_value(r.history, "train/act_sparsity/mean") for r in runs]
        d0 = [series(r.history, "train/deriv_sparsity/mean")[1][0] for r in runs]
        d_end = [end_value(r.history, "train/deriv_sparsity/mean") for r in runs]
        s0 = [series(r.history, "train/dsigma_sq/mean")[1][0] for r in runs]
        s_end = [end_value(r.history, "train/dsigma_sq/mean") for r in runs]
        per_seed.update({f"{act}/exact_zero_gap_heldout": gap, f"{act}/logged_gap_1e-6_tolerance": tol_gap,
                         f"{act}/act_sparsity_end": a_end,
                         f"{act}/deriv_sparsity_start": d0, f"{act}/deriv_sparsity_end": d_end,
                         f"{act}/dsigma_sq_start": s0, f"{act}/dsigma_sq_end": s_end})
        for k, v in zip(SERIES_KEYS, (a_end, d0, d_end, s0, s_end)):
            ser[k][act] = [float(t) for t in v]
        if act in RELU_LIKE:
            parts[f"{act}_same"] = bound_verdict(gap, passes=lambda v: v == 0.0, fails=lambda v: v > 1e-3, kind="exact",
                                                 what=f"{act}: |frac(a == 0) - frac(sigma'(z) == 0)| (held-out, "
                                                      f"max over blocks; a unit test: equal by construction)",
                                                 bound="= 0", fail_bound="> 1e-3")
            parts[f"{act}_rises"] = effect_verdict([e - s for s, e in zip(d0, d_end)], MIN_RISE, source=RISE_SOURCE,
                                                   what=f"{act}: derivative sparsity rise")
        else:
            parts["gelu_dsigma_falls"] = effect_verdict([(s - e) / s for s, e in zip(s0, s_end)], MIN_FALL,
                                                        source=FALL_SOURCE, what="gelu: relative fall of E[sigma'(z)^2]")
        measured.append(f"{act}: act sp {mean_sd(a_end)}, deriv sp {mean_sd(d0)} -> {mean_sd(d_end)}, "
                        f"E[s'^2] {mean_sd(s0)} -> {mean_sd(s_end)}, exact-zero gap {mean_sd(gap)}")
    if "jsrelu" in ser["deriv_sparsity_end"] and "relu2" in ser["deriv_sparsity_end"]:
        parts["jsrelu_sparser_than_relu2"] = effect_verdict(
            [a - b for a, b in zip(ser["deriv_sparsity_end"]["jsrelu"], ser["deriv_sparsity_end"]["relu2"])],
            MIN_CONTRAST, source=CONTRAST_SOURCE, what="deriv sparsity(JSReLU) - deriv sparsity(ReLU^2), end")
    return Finding(None, "; ".join(measured), per_seed=per_seed, parts=parts, series=ser,
                   model=describe(base_config(ctx.preset)),
                   notes=["GELU's zero-derivative set uses |sigma'| <= 1e-6 (gradsparse.activations.DERIV_TOL)"])


#: what the G13 series holds, per activation and seed
SERIES_KEYS = ("act_sparsity_end", "deriv_sparsity_start", "deriv_sparsity_end", "dsigma_sq_start", "dsigma_sq_end")


def draw(ser: dict[str, Any]) -> Any:
    """The G13 figure as a matplotlib Figure, each panel the quantity a part tests (bars: mean over seeds,
    dots: seeds). Left, ReLU-like activations: derivative sparsity (fraction of z with sigma'(z) = 0) at the
    start and end of training (the rise part) beside the activation sparsity at the end (the identity).
    Right, GELU: E[sigma'(z)^2] at the start and end (the relative-fall part); a series saved before it
    was recorded says so in the panel."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    acts = list(ser.get("deriv_sparsity_end", {}))
    relu_like = [a for a in acts if a != "gelu"]
    fig = Figure(figsize=(9.6, 4.0), dpi=120)
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [max(len(relu_like), 1) + 1, 2]})
    start = ser.get("deriv_sparsity_start", {})
    groups = {a: {**({"derivative sparsity, start": start[a]} if a in start else {}),
                  "derivative sparsity, end": ser["deriv_sparsity_end"][a],
                  "activation sparsity, end": ser["act_sparsity_end"][a]} for a in relu_like}
    if groups:
        draw_bars(left, groups, ylabel="fraction of units (train batches)",
                  title=f"ReLU-like: sigma'(z) = 0 rises (delta {MIN_RISE})")
    else:
        left.set_axis_off()
    s0, s1 = ser.get("dsigma_sq_start", {}), ser.get("dsigma_sq_end", {})
    if "gelu" in s0 and "gelu" in s1:
        fall = [(a - b) / a for a, b in zip(s0["gelu"], s1["gelu"])]
        draw_bars(right, {"gelu": {"start": s0["gelu"], "end": s1["gelu"]}}, ylabel="E[sigma'(z)^2] (train batches)",
                  title=f"GELU: E[sigma'(z)^2] falls by {np.mean(fall):.2f} (delta {MIN_FALL})")
    elif "gelu" in acts:
        right.text(0.5, 0.5, "E[sigma'(z)^2] of GELU is not in this report's\nseries: rerun G13 to draw it",
                   ha="center", va="center", fontsize=8, transform=right.transAxes)
        right.set_axis_off()
    else:
        right.set_axis_off()
    fig.suptitle("G13: derivative vs activation sparsity (the quantities the parts test)", fontsize=10)
    fig.tight_layout()
    return fig


def figures(ser: dict[str, Any], out_dir) -> list:
    return save_figure(draw(ser), out_dir / "g13_sparsity_per_activation", FORMATS)


CHECK = Check(
    name="G13",
    slug="g13_derivative_vs_activation",
    title="Derivative vs activation sparsity",
    claim=("For ReLU, JSReLU and ReLU^2 the exact-zero activations are exactly the zero-derivative pre-activations "
           "and their fraction rises during training; GELU, with no extended zero-derivative set, instead shows a "
           "falling E[sigma'(z)^2]."),
    rule=(f"ReLU-like, per activation: part same PASS when |frac(a == 0) - frac(sigma'(z) == 0)| on the held-out "
          f"batch is exactly 0 (every block) in every seed, FAIL when > 1e-3 in a majority; part rises: effect = deriv sparsity end - start, delta {MIN_RISE}. GELU: effect = relative fall of "
          f"E[sigma'^2], PASS "
          f"with lower bound > 0 and mean > {MIN_FALL}. Contrast: deriv sparsity(JSReLU) - deriv sparsity(ReLU^2) > "
          f"{MIN_CONTRAST} by the same effect rule. Effect parts: PASS when the lower bound > 0 and the mean > delta, "
          f"FAIL when the upper bound < delta. PASS needs every part; FAIL when a part fails (effect parts after Holm)."),
    # the smoke preset (test suite) runs ReLU and GELU only: compiling each variant dominates at smoke size
    presets={k: {"base": BASE[k], "activations": ("relu", "gelu") if k == "smoke" else (*RELU_LIKE, "gelu")}
             for k in ("smoke", "quick", "full")},
    run=run,
    figures=figures,
    plan=plan,
)
