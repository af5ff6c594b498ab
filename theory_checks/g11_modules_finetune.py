"""G11: finetuning a trained vanilla model with the sparsity modules lowers its density below a control.

Start: the trained vanilla baseline of each seed. Treatment: ``gradsparse.sparsify(model,
zeroth_bias=True, restricted_ln=True, jsrelu=True)`` (finetuning variants: zeroth bias clipped to
0.1 |gamma|, LN shift frozen with |gamma| ramped up to >= 1 over T_up steps, ReLU -> JSReLU mix over
T_mix steps; identity at insertion), finetuned for F steps. Control: the same model finetuned for
the same F steps with the same optimiser, without modules. Both through ``gradsparse.train.train``.
Density: held-out, mean over the last 10% of logs.
"""

from __future__ import annotations

from typing import Any

from gradsparse.factory import finetune_start
from theory_checks.context import BASE, base_config, base_runs, Context, end_value
from theory_checks.protocol import Check, Finding
from theory_checks.verdicts import bound_verdict, combine, effect_verdict, mean_sd

MIN_LOWER = 0.02
ACC_OK, ACC_BAD = 0.03, 0.06


def run(ctx: Context, p: dict[str, Any]) -> Finding:
    steps = p["finetune_steps"]
    ramp = max(1, int(steps * p["ramp_frac"]))
    dens_c, dens_t, acc_c, acc_t, start = [], [], [], [], []
    for s, r in zip(ctx.seeds, base_runs(ctx)):
        cfg = base_config(ctx.preset, seed=s, steps=steps, lr=p["lr"], checkpoint_every=0, flatness_every=0)
        ctrl_start, ctrl_opts = finetune_start(r.model, cfg)
        ctrl = ctx.train(cfg.replace(surgery=ctrl_opts), f"g11-control-from-base{s}", start=ctrl_start)
        treat_start, treat_opts = finetune_start(r.model, cfg, zeroth_bias=True, restricted_ln=True, jsrelu=True,
                                                 t_up=ramp, t_mix=ramp)
        treat = ctx.train(cfg.replace(surgery=treat_opts), f"g11-modules-from-base{s}", start=treat_start)
        start.append(end_value(r.history, "heldout/density/mean"))
        dens_c.append(end_value(ctrl.history, "heldout/density/mean"))
        dens_t.append(end_value(treat.history, "heldout/density/mean"))
        acc_c.append(ctrl.final["test_accuracy"])
        acc_t.append(treat.final["test_accuracy"])
    parts = {
        "lower_than_control": effect_verdict([c - t for c, t in zip(dens_c, dens_t)], MIN_LOWER,
                                             what="density(control) - density(modules)"),
        "accuracy_kept": bound_verdict([c - t for c, t in zip(acc_c, acc_t)], passes=lambda v: v <= ACC_OK,
                                       fails=lambda v: v > ACC_BAD, what="accuracy drop (control - modules)",
                                       bound=f"<= {ACC_OK}", fail_bound=f"> {ACC_BAD}"),
    }
    return Finding(
        combine(parts),
        measured=(f"density before finetuning {mean_sd(start)}; after {steps} steps: control {mean_sd(dens_c)}, "
                  f"modules {mean_sd(dens_t)}; accuracy control {mean_sd(acc_c)}, modules {mean_sd(acc_t)}"),
        per_seed={"density_pretrained": start, "density_control": dens_c, "density_modules": dens_t,
                  "test_acc_control": acc_c, "test_acc_modules": acc_t},
        parts=parts, series={"pretrained": start, "control": dens_c, "modules": dens_t},
        notes=[f"finetuning: {steps} steps at lr {p['lr']} ({BASE[ctx.preset]['optimizer']}), T_up = T_mix = {ramp}"])


_P = {"smoke": dict(finetune_steps=40, lr=1e-3, ramp_frac=0.5), "quick": dict(finetune_steps=500, lr=1e-3, ramp_frac=0.5),
      "full": dict(finetune_steps=3000, lr=1e-3, ramp_frac=0.5)}

CHECK = Check(
    name="G11",
    slug="g11_modules_finetune",
    title="Modules lower density (finetuning)",
    claim=("Finetuning a trained vanilla model with the zeroth bias, restricted LayerNorm and J-SquaredReLU mix "
           "ends with a lower density than the same model finetuned as long without them, at about equal accuracy."),
    rule=(f"Part lower_than_control: effect = density(control) - density(modules), PASS when > 0 in every seed with "
          f"mean > {MIN_LOWER}, FAIL when < 0 in a majority. Part accuracy_kept: drop PASS <= {ACC_OK} in every "
          f"seed, FAIL > {ACC_BAD} in a majority. PASS needs both."),
    presets={k: {"base": BASE[k], **v} for k, v in _P.items()},
    run=run,
)
