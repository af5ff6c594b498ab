"""G2: ||LN(h)||^2 = d without the affine part, and >= d with the restricted LayerNorm (SPEC 4.2).

Without affine parameters LN(h) = (h - mean h) / sqrt(var h + eps), so
||LN(h)||^2 = d var/(var + eps): d up to the eps correction. The restricted LN has no shift and
gamma >= 1 (projected after every step), so ||gamma * LN(h)||^2 >= ||LN(h)||^2 = d var/(var + eps).

Measured on real residual streams: h_l of every block of a trained model (recomputed from the
block outputs the model returns: h_0 = W_in x, h_{l+1} = h_l + V a_l + b_V), for (a) the shared
baseline with its LN replaced by the non-affine LN, and (b) models trained from scratch with the
restricted LN (``TrainConfig.restricted_ln``), whose MLP inputs x_t are returned by the model.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from gradsparse.models import LayerNorm, ResidualMLP, zero_probes
from theory_checks.context import BASE, base_config, base_runs, Context, heldout, describe
from theory_checks.protocol import Check, Finding, Unavailable
from theory_checks.plan import CheckPlan, PartPlan, arm
from theory_checks.verdicts import bound_verdict, fmt, Verdict

#: an implementation check: both parts are algebra with float tolerances
PARTS = [PartPlan("no_affine_equals_d", "exact", "implementation",
                  "max | ||LN(h)||^2 - d var/(var+eps) | / d (non-affine LN, trained residual streams)",
                  source="algebra; float32 tolerance 1e-5"),
         PartPlan("restricted_at_least_d", "exact", "implementation",
                  "min over tokens of ||x_t||^2 / (d var/(var+eps)) (restricted LN)",
                  source="algebra; float32 tolerance 1e-5")]


def plan(preset: str, p: dict[str, Any]) -> CheckPlan:
    return CheckPlan(arms=[arm("vanilla", base_config(preset)),
                           arm("restricted_ln", base_config(preset, restricted_ln=True, flatness_every=0))],
                     parts=list(PARTS),
                     notes=["implementation check: the LayerNorm algebra the theory's ||x||^2 lever rests on"])


def residual_streams(model: Any, x: np.ndarray) -> list[np.ndarray]:
    """The residual stream h_l (B, d) entering each block of a :class:`ResidualMLP`."""
    if not isinstance(model, ResidualMLP) or not model.residual:
        raise ValueError("residual_streams needs a residual ResidualMLP")
    xx = jnp.asarray(x).reshape(x.shape[0], -1)
    _, aux = model(xx, zero_probes(model.mlp_blocks(), x.shape[0]))
    h = model.inp(xx)
    out = []
    for blk, a in zip(model.mlp_blocks(), aux):
        out.append(np.asarray(h))
        y = blk.value(a["a"])
        if blk.zeroth_bias is not None and blk.zeroth_bias_placement == "output":
            y = y + blk.zeroth_bias[0]
        h = h + y
    return out


def run(ctx: Context, p: dict[str, Any]) -> Finding:
    cfg = base_config(ctx.preset)
    x, _ = heldout(ctx, cfg, p["tokens"])
    # (a) non-affine LN on the residual streams of the trained baseline
    dev_a, ratio_a = [], []
    for r in base_runs(ctx):
        devs, ratios = [], []
        for h in residual_streams(r.model, x):
            ln = LayerNorm(None, None, r.model.mlp_blocks()[0].ln.eps)
            u = np.asarray(ln(jnp.asarray(h)), dtype=np.float64)
            d = h.shape[-1]
            var = np.var(h.astype(np.float64), axis=-1)
            nsq = np.sum(u * u, -1)
            devs.append(np.max(np.abs(nsq - d * var / (var + ln.eps)) / d))
            ratios.append(nsq / d)
        dev_a.append(float(max(devs)))
        ratio_a.append(float(np.min(np.concatenate(ratios))))
    part_a = bound_verdict(dev_a, passes=lambda v: v <= 1e-5, fails=lambda v: v > 1e-3, kind="exact",
                           what="max | ||LN(h)||^2 - d var/(var+eps) | / d (non-affine LN, trained residual streams)",
                           bound="<= 1e-5", fail_bound="> 1e-3")
    parts = {"no_affine_equals_d": part_a}
    per_seed: dict[str, list[float]] = {"no_affine_max_dev": dev_a, "no_affine_min_norm2_over_d": ratio_a}
    measured = f"non-affine: max dev {fmt(max(dev_a))}, min ||LN||^2/d {fmt(min(ratio_a))}"
    # (b) restricted LN trained from scratch
    try:
        runs_b = base_runs(ctx, restricted_ln=True)
    except Unavailable as e:  # report it, keep part (a)
        parts["restricted_at_least_d"] = Verdict("INCONCLUSIVE", 0, len(ctx.seeds), str(e), kind="exact")
        measured += f"; restricted LN not measured ({e})"
    else:
        min_b, gmin_b, mean_b, shift_b = [], [], [], []
        for r in runs_b:
            m = r.model
            _, aux = m(jnp.asarray(x), zero_probes(m.mlp_blocks(), x.shape[0]))
            ratios = [np.sum(np.asarray(a["x"], np.float64) ** 2, -1) / a["x"].shape[-1] for a in aux]
            # the exact floor: d var/(var+eps), from the stream itself
            floors = []
            for h, blk in zip(residual_streams(m, x), m.mlp_blocks()):
                var = np.var(h.astype(np.float64), axis=-1)
                floors.append(var / (var + blk.ln.eps))
            rel = [rt / fl for rt, fl in zip(ratios, floors)]
            min_b.append(float(np.min(np.concatenate(rel))))
            mean_b.append(float(np.mean(np.concatenate(ratios))))
            gmin_b.append(float(min(np.min(np.asarray(b.ln.weight)) for b in m.mlp_blocks())))
            shift_b.append(float(max((0.0 if b.ln.bias is None else float(np.max(np.abs(np.asarray(b.ln.bias)))))
                                     for b in m.mlp_blocks())))
        parts["restricted_at_least_d"] = bound_verdict(
            min_b, passes=lambda v: v >= 1 - 1e-5, fails=lambda v: v < 1 - 1e-3, kind="exact",
            what="min over tokens of ||x_t||^2 / (d var/(var+eps)) (restricted LN)", bound=">= 1 - 1e-5",
            fail_bound="< 1 - 1e-3")
        per_seed.update({"restricted_min_ratio": min_b, "restricted_mean_norm2_over_d": mean_b,
                         "restricted_min_gamma": gmin_b, "restricted_max_abs_shift": shift_b})
        measured += (f"; restricted: min ||x||^2/floor {fmt(min(min_b))}, mean ||x||^2/d {fmt(np.mean(mean_b))}, "
                     f"min gamma {fmt(min(gmin_b))}")
    # contrast: the ordinary affine LN of the baseline (no prediction; context only)
    aff = []
    for r in base_runs(ctx):
        m = r.model
        _, aux = m(jnp.asarray(x), zero_probes(m.mlp_blocks(), x.shape[0]))
        aff.append(float(min(np.min(np.sum(np.asarray(a["x"]) ** 2, -1) / a["x"].shape[-1]) for a in aux)))
    per_seed["affine_min_norm2_over_d"] = aff
    return Finding(None, measured, per_seed=per_seed, parts=parts, model=describe(base_config(ctx.preset)),
                   numbers={"affine_min_norm2_over_d": min(aff)},
                   notes=[f"held-out batch of {x.shape[0]}; the ordinary affine LN of the baseline reaches "
                          f"min ||x||^2/d = {fmt(min(aff))} (no bound predicted there)"])


CHECK = Check(
    name="G2",
    slug="g02_layernorm_norm",
    title="LayerNorm output norm",
    claim=("Without affine parameters ||LN(h)||^2 = d var/(var+eps) ~ d for every token, and with the restricted "
           "LayerNorm (no shift, gamma >= 1) ||x_t||^2 >= that value for every token."),
    rule=("Part no_affine: PASS when, in every seed, max_t | ||LN(h_t)||^2 - d var/(var+eps) | / d <= 1e-5 on the "
          "trained residual streams, FAIL when > 1e-3 in a majority. Part restricted: PASS when, in every seed, "
          "min_t ||x_t||^2 / (d var/(var+eps)) >= 1 - 1e-5, FAIL when < 1 - 1e-3 in a majority. Combined: "
          "PASS if both pass, FAIL if either fails."),
    presets={"smoke": {"base": BASE["smoke"], "tokens": 64}, "quick": {"base": BASE["quick"], "tokens": 512},
             "full": {"base": BASE["full"], "tokens": 1000}},
    run=run,
    plan=plan,
)
