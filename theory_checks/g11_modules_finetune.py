"""G11: finetuning a trained vanilla model with the sparsity modules lowers its density below a control.

Start: the trained vanilla LM of each seed (the pinned byte LM of ``theory_checks.context.LM``, 32
tokens per sample, shared with G10 and G12). Treatment: ``gradsparse.factory.finetune_start(model,
zeroth_bias=True, restricted_ln=True, jsrelu=True)`` (finetuning variants: zeroth bias clipped to
0.1 |gamma|, LN shift frozen with |gamma| ramped up to >= 1 over T_up steps, ReLU -> JSReLU mix over
T_mix steps; identity at insertion), finetuned for F steps. Control: the same model finetuned for the
same F steps with the same optimiser, without modules. Density: held-out, all MLP blocks, mean over
the last 10% of logs; quality: held-out next-byte loss.
"""

from __future__ import annotations

from typing import Any

from gradsparse.factory import finetune_start
from theory_checks.context import LM, Context, describe, end_value, lm_config, lm_runs, window_mean
from theory_checks.g10_modules_from_scratch import SOURCE, learned_gate
from theory_checks.protocol import Check, Finding
from theory_checks.verdicts import bound_verdict, combine, effect_verdict, mean_sd

MIN_LOWER = 0.01
LOSS_OK, LOSS_BAD = 0.05, 0.15


def run(ctx: Context, p: dict[str, Any]) -> Finding:
    steps = p["finetune_steps"]
    ramp = max(1, int(steps * p["ramp_frac"]))
    dens_c, dens_t, loss_c, loss_t, start = [], [], [], [], []
    van = lm_runs(ctx)
    for s, r in zip(ctx.seeds, van):
        cfg = lm_config(ctx.preset, seed=s, steps=steps, lr=p["lr"], flatness_every=0, flatness_subset=0)
        ctrl_start, ctrl_opts = finetune_start(r.model, cfg)
        ctrl = ctx.train(cfg.replace(surgery=ctrl_opts), f"g11-control-from-lm{s}", start=ctrl_start)
        treat_start, treat_opts = finetune_start(r.model, cfg, zeroth_bias=True, restricted_ln=True, jsrelu=True,
                                                 t_up=ramp, t_mix=ramp)
        treat = ctx.train(cfg.replace(surgery=treat_opts), f"g11-modules-from-lm{s}", start=treat_start)
        start.append(end_value(r.history, "heldout/density/mean"))
        dens_c.append(end_value(ctrl.history, "heldout/density/mean"))
        dens_t.append(end_value(treat.history, "heldout/density/mean"))
        loss_c.append(window_mean(ctrl.history, "heldout/loss", 0.9, 1.0))
        loss_t.append(window_mean(treat.history, "heldout/loss", 0.9, 1.0))
    parts = {
        "lower_than_control": effect_verdict([c - t for c, t in zip(dens_c, dens_t)], MIN_LOWER, source=SOURCE,
                                             what="density(control) - density(modules)"),
        "quality_kept": bound_verdict([t - c for c, t in zip(loss_c, loss_t)], passes=lambda v: v <= LOSS_OK,
                                      fails=lambda v: v > LOSS_BAD, what="held-out loss(modules) - loss(control)",
                                      bound=f"<= {LOSS_OK}", fail_bound=f"> {LOSS_BAD}"),
    }
    cfg = lm_config(ctx.preset, steps=steps, lr=p["lr"])
    return Finding(
        combine(parts),
        measured=(f"density before finetuning {mean_sd(start)}; after {steps} steps: control {mean_sd(dens_c)}, "
                  f"modules {mean_sd(dens_t)}; held-out loss control {mean_sd(loss_c)}, modules {mean_sd(loss_t)}"),
        per_seed={"density_pretrained": start, "density_control": dens_c, "density_modules": dens_t,
                  "heldout_loss_control": loss_c, "heldout_loss_modules": loss_t},
        parts=parts, series={"pretrained": start, "control": dens_c, "modules": dens_t}, gates=[learned_gate(van)],
        model=f"finetuning {describe(cfg)} from the vanilla LM of G10",
        notes=[f"finetuning: {steps} steps at lr {p['lr']} (adam), T_up = T_mix = {ramp}"])


_P = {"smoke": dict(finetune_steps=20, lr=1e-3, ramp_frac=0.5), "quick": dict(finetune_steps=400, lr=1e-3, ramp_frac=0.3),
      "full": dict(finetune_steps=3000, lr=1e-3, ramp_frac=0.3)}

CHECK = Check(
    name="G11",
    slug="g11_modules_finetune",
    title="Modules lower density (finetuning)",
    claim=("Finetuning a trained vanilla Transformer with the zeroth bias, restricted LayerNorm and J-SquaredReLU mix "
           "ends with a lower density than the same model finetuned as long without them, at about equal quality."),
    rule=(f"Part lower_than_control: effect = density(control) - density(modules), delta {MIN_LOWER}; PASS when the "
          f"lower bound > 0 and the mean > delta, FAIL when the upper bound < delta. Part quality_kept (bound): "
          f"held-out loss increase PASS <= {LOSS_OK} in every seed, FAIL > {LOSS_BAD} in a majority. PASS needs both. "
          f"Gate: the vanilla LM learned."),
    presets={k: {"lm": LM[k], **v} for k, v in _P.items()},
    run=run,
)
