"""G10: each sparsity module lowers the density vs vanilla, accuracy about unchanged (from scratch).

On the ONE pinned small Transformer (``theory_checks.context.LM``: the causal byte LM on the
embedded text, 32 tokens per sample; the zeroth bias is a per-position bias there, while in an MLP
on one vector per sample it would only be a clipped copy of the key bias). Arms, paired by seed
with the vanilla LM: zeroth bias (SPEC 4.1), restricted LayerNorm (4.2), J-SquaredReLU (4.3), and
(standard and full presets) the three together. Density: held-out, all MLP blocks, mean over the
last 10% of training. Quality: held-out next-byte loss (the LM's own objective).

The paper's headline (the three together: ~50% fewer active units at ViT-B / T5 scale) is reported
beside the measurement; it is a verdict only in the full preset. The lever of the JSReLU arm,
E[sigma'(z)^2] on the held-out batch, is reported so that a null result can be read.
"""

from __future__ import annotations

from typing import Any


from gradsparse.figures import plot_bars
from gradsparse.figures_spectra import FORMATS
from theory_checks.context import LM, Context, describe, end_value, lm_config, lm_runs, window_mean
from theory_checks.protocol import Check, Finding
from theory_checks.verdicts import Gate, bound_verdict, combine, effect_verdict, mean_sd

MIN_LOWER = 0.01
SOURCE = ("one point of density: about 2x the seed-to-seed spread of the Transformer density in the quick logs "
          "(+-0.002 to +-0.005, CHECKS_REVIEW G12)")
LOSS_OK, LOSS_BAD = 0.05, 0.15          # held-out loss increase (nats per byte)
HALF_OK, HALF_BAD = 0.65, 0.85          # density(all three) / density(vanilla): the paper's headline, full only
MIN_LEARNED = 0.1                       # gate: the vanilla LM's held-out loss fell by >= 10%

ARMS = {"zeroth_bias": dict(zeroth_bias=True), "restricted_ln": dict(restricted_ln=True),
        "jsrelu": dict(activation="jsrelu"), "all_three": dict(zeroth_bias=True, restricted_ln=True, activation="jsrelu")}


def density(r) -> float:
    return end_value(r.history, "heldout/density/mean")


def heldout_loss(r) -> float:
    return window_mean(r.history, "heldout/loss", 0.9, 1.0)


def learned_gate(van) -> Gate:
    fall = min(1.0 - heldout_loss(r) / r.history[0]["heldout/loss"] for r in van)
    return Gate("vanilla_loss_fall", fall, ">=", MIN_LEARNED,
                "min over seeds of 1 - held-out loss (end) / (start) of the vanilla LM: it learned")


def run(ctx: Context, p: dict[str, Any]) -> Finding:
    van = lm_runs(ctx)
    dens = {"vanilla": [density(r) for r in van]}
    loss = {"vanilla": [heldout_loss(r) for r in van]}
    lever = {"vanilla": [end_value(r.history, "heldout/dsigma_sq/mean") for r in van]}
    for arm in p["arms"]:
        rs = lm_runs(ctx, **ARMS[arm], flatness_every=0)  # the arms need no trace (compiling it dominates)
        dens[arm] = [density(r) for r in rs]
        loss[arm] = [heldout_loss(r) for r in rs]
        lever[arm] = [end_value(r.history, "heldout/dsigma_sq/mean") for r in rs]
    parts = {f"{arm}_lowers": effect_verdict([v - m for v, m in zip(dens["vanilla"], dens[arm])], MIN_LOWER,
                                             source=SOURCE, what=f"density(vanilla) - density({arm})")
             for arm in p["arms"] if arm != "all_three"}
    for arm in p["arms"]:
        parts[f"{arm}_quality_kept"] = bound_verdict(
            [m - v for v, m in zip(loss["vanilla"], loss[arm])], passes=lambda v: v <= LOSS_OK,
            fails=lambda v: v > LOSS_BAD, what=f"held-out loss({arm}) - loss(vanilla)", bound=f"<= {LOSS_OK}",
            fail_bound=f"> {LOSS_BAD}")
    notes = []
    if "all_three" in dens:
        ratio = [m / v for v, m in zip(dens["vanilla"], dens["all_three"])]
        if p.get("headline_verdict"):
            parts["all_three_halves"] = bound_verdict(ratio, passes=lambda v: v <= HALF_OK, fails=lambda v: v > HALF_BAD,
                                                      what="density(all three)/density(vanilla)", bound=f"<= {HALF_OK}",
                                                      fail_bound=f"> {HALF_BAD}")
        notes.append(f"paper's headline (ViT-B/T5 scale): the three together ~0.5x vanilla; measured here "
                     f"{mean_sd(ratio)}x")
    per_seed = {f"density_{a}": v for a, v in dens.items()}
    per_seed.update({f"heldout_loss_{a}": v for a, v in loss.items()})
    per_seed.update({f"dsigma_sq_{a}": v for a, v in lever.items()})
    cfg = lm_config(ctx.preset)
    return Finding(
        combine(parts),
        measured="; ".join(f"{a}: density {mean_sd(dens[a])}, held-out loss {mean_sd(loss[a])}" for a in dens),
        per_seed=per_seed, parts=parts, gates=[learned_gate(van)], model=describe(cfg),
        series={"density": dens, "loss": loss, "seeds": list(ctx.seeds)},
        notes=notes + ["zeroth bias at the MLP input, per position (S = seq_len), clip c = 0.1 |gamma|; restricted LN: "
                       "no shift, gamma >= 1; quick cut: the all-three arm runs in the standard and full presets"])


def _bars(ser: dict[str, Any], out, formats=None) -> list:
    groups = {a.replace("_", " "): {"held-out density": ser["density"][a]} for a in ser["density"]}
    return plot_bars(groups, out, ylabel="held-out density (active MLP units)", formats=formats or FORMATS,
                     title="Sparsity modules trained from scratch (byte LM, 32 tokens per sample)")


def figures(ser: dict[str, Any], out_dir) -> list:
    return _bars(ser, out_dir / "g10_modules")


def readme_figure(ser: dict[str, Any], out, formats) -> list:
    return _bars(ser, out, formats)


_ONE = ("zeroth_bias", "restricted_ln", "jsrelu")
CHECK = Check(
    name="G10",
    slug="g10_modules_from_scratch",
    title="Modules lower density (from scratch)",
    claim=("Trained from scratch on a small Transformer with many tokens per sample, the zeroth bias, the restricted "
           "LayerNorm and J-SquaredReLU each lower the MLP density vs vanilla, with the held-out loss about unchanged."),
    rule=(f"Per module: effect = density(vanilla) - density(module), delta {MIN_LOWER}; PASS when the lower bound > 0 "
          f"and the mean > delta, FAIL when the upper bound < delta. Quality (bound): held-out loss increase PASS "
          f"<= {LOSS_OK} in every seed, FAIL > {LOSS_BAD} in a majority. PASS needs every part; FAIL when a part fails "
          f"(effect parts after Holm). The all-three halving is a verdict only in the full preset (<= {HALF_OK}x). "
          f"Gate: the vanilla LM learned (held-out loss fell >= {MIN_LEARNED:.0%})."),
    presets={"smoke": {"lm": LM["smoke"], "arms": ("zeroth_bias",)},
             "quick": {"lm": LM["quick"], "arms": _ONE},
             "standard": {"lm": LM["standard"], "arms": _ONE + ("all_three",)},
             "full": {"lm": LM["full"], "arms": _ONE + ("all_three",), "headline_verdict": True}},
    run=run,
    figures=figures,
)
