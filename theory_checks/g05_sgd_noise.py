"""G5: more SGD noise (larger lr / smaller batch) -> flatter and sparser; full-batch GD is less sparse.

Plain SGD (no momentum) on the baseline architecture, all on the same 512-example training subset so
that full-batch gradient descent is affordable. The SGD noise scale is lr/B. Four settings, same
steps, paired by seed (same initialisation):

- ref:   lr = lr_hi, B = 64           (the noisiest)
- lowlr: lr = lr_lo, B = 64           ("larger lr" comparison: ref vs lowlr)
- bigB:  lr = lr_hi, B = 256          ("smaller batch" comparison: ref vs bigB)
- gd:    lr = lr_hi, B = 512 = all    ("GD vs SGD" comparison: ref vs gd)

Sparser: final density (mean over the last 10% of logged train batches). Flatter: tr(H_K)
(Hutchinson, mean over the last quarter of its estimates). Effects are oriented so the prediction
is > 0: density(less noise) - density(ref), and ln(trace(less noise) / trace(ref)).
"""

from __future__ import annotations

import math
from typing import Any

from gradsparse.figures import plot_bars
from theory_checks.context import BASE, base_config, Context, end_value, window_mean
from theory_checks.protocol import Check, Finding
from theory_checks.verdicts import combine, effect_verdict, fmt, mean_sd

MIN_DENSITY = 0.02
MIN_LOG_TRACE = 0.1


def _cfg(ctx: Context, p: dict[str, Any], **kw: Any):
    return base_config(ctx.preset, optimizer="sgd", momentum=0.0, n_train=p["n_train"], steps=p["steps"],
                       checkpoint_every=0, **kw)


def run(ctx: Context, p: dict[str, Any]) -> Finding:
    arms = {"ref": dict(lr=p["lr_hi"], batch_size=64), "lowlr": dict(lr=p["lr_lo"], batch_size=64),
            "bigB": dict(lr=p["lr_hi"], batch_size=p["big_batch"]),
            "gd": dict(lr=p["lr_hi"], batch_size=p["n_train"])}
    arms = {a: kw for a, kw in arms.items() if a in p["arms"]}
    runs = {a: ctx.seed_runs(_cfg(ctx, p, **kw), f"g05-{a}") for a, kw in arms.items()}
    dens = {a: [end_value(r.history, "train/density/mean") for r in rs] for a, rs in runs.items()}
    trace = {a: [window_mean(r.history, "flat/trace_k", 0.75, 1.0) for r in rs] for a, rs in runs.items()}
    acc = {a: [r.final["test_accuracy"] for r in rs] for a, rs in runs.items()}

    def logratio(a, b):
        return [math.log(x / y) if x > 0 and y > 0 else float("nan") for x, y in zip(a, b)]

    parts = {}
    for arm, what in (("lowlr", "larger_lr"), ("bigB", "smaller_batch"), ("gd", "gd")):
        if arm not in arms:
            continue
        parts[f"{what}_sparser" if arm != "gd" else "gd_less_sparse"] = effect_verdict(
            [l - r for l, r in zip(dens[arm], dens["ref"])], MIN_DENSITY, what=f"density({arm}) - density(ref)")
        if arm != "gd":
            parts[f"{what}_flatter"] = effect_verdict(logratio(trace[arm], trace["ref"]), MIN_LOG_TRACE,
                                                      what=f"ln trace_k({arm})/trace_k(ref)")
    per_seed = {f"density_{a}": v for a, v in dens.items()}
    per_seed.update({f"trace_k_{a}": v for a, v in trace.items()})
    per_seed.update({f"test_acc_{a}": v for a, v in acc.items()})
    measured = "; ".join(f"{a} (lr {fmt(arms[a]['lr'])}, B {arms[a]['batch_size']}): density {mean_sd(dens[a])}, "
                         f"trace_k {mean_sd(trace[a])}, acc {mean_sd(acc[a])}" for a in arms)
    ser = {"arms": {a: {"lr": arms[a]["lr"], "batch_size": arms[a]["batch_size"], "density": dens[a],
                        "trace_k": trace[a], "test_accuracy": acc[a]} for a in arms}}
    return Finding(combine(parts), measured, per_seed=per_seed, parts=parts, series=ser,
                   notes=[f"plain SGD, {p['steps']} steps, n_train {p['n_train']}; noise scale lr/B: " +
                          ", ".join(f"{a} {fmt(kw['lr'] / kw['batch_size'])}" for a, kw in arms.items())])


def figures(ser: dict[str, Any], out_dir) -> list:
    arms = ser["arms"]
    groups = {f"{a}\nlr {fmt(v['lr'])} B {v['batch_size']}": {"density": v["density"]} for a, v in arms.items()}
    paths = plot_bars(groups, out_dir / "g05_density", ylabel="final density", title="G5: SGD noise vs density")
    groups = {f"{a}\nlr {fmt(v['lr'])} B {v['batch_size']}": {"tr(H_K)": v["trace_k"]} for a, v in arms.items()}
    return paths + plot_bars(groups, out_dir / "g05_trace", ylabel="Hutchinson tr(H_K)", logy=True,
                             title="G5: SGD noise vs flatness")


_ALL = ("ref", "lowlr", "bigB", "gd")
#: the smoke preset (for the test suite) runs two of the four settings: compiling a setting costs more
#: than training it at smoke size, and the code path of every comparison is the same
_P = {"smoke": dict(steps=80, n_train=256, lr_hi=0.1, lr_lo=0.025, big_batch=128, arms=("ref", "lowlr")),
      "quick": dict(steps=1000, n_train=512, lr_hi=0.1, lr_lo=0.025, big_batch=256, arms=_ALL),
      "full": dict(steps=6000, n_train=1024, lr_hi=0.1, lr_lo=0.025, big_batch=256, arms=_ALL)}

CHECK = Check(
    name="G5",
    slug="g05_sgd_noise",
    title="SGD noise -> flatter and sparser",
    claim=("With plain SGD at equal steps, more gradient noise (4x larger learning rate, or 4x smaller batch) gives "
           "a flatter (smaller tr(H_K)) and sparser model, and full-batch GD ends less sparse than SGD."),
    rule=(f"Per comparison, effects oriented so the prediction is > 0 (density difference, threshold {MIN_DENSITY}; "
          f"log trace ratio, threshold {MIN_LOG_TRACE}): PASS when > 0 in every seed and the mean exceeds the "
          f"threshold, FAIL when < 0 in a majority of seeds, else INCONCLUSIVE. PASS needs all five parts."),
    presets={k: {"base": BASE[k], **v} for k, v in _P.items()},
    run=run,
    figures=figures,
)
