"""G1: the sparsity identity (SPEC 2.5) holds exactly, checked against independent per-sample gradients.

For token t of a ReLU MLP block (active set A_t = {i : z_{t,i} > 0}):

    |A_t| = AF_K,t / (||x_t||^2 * mean_{i in A_t} g_{t,i}^2),   AF_K,t = ||dL_t/dK||_F^2,

where dL_t/dK = eta_t x_t^T is token t's own gradient of the key matrix. The monitor computes the
right side from eta = g * sigma'(z) inside the training step. Here the right side is computed
independently: dL_t/dK and g_t = dL_t/da_t come from ``jax.vmap(jax.grad(per-sample loss))`` with
respect to every block's K and activation probe, on a held-out batch of a trained tiny MLP.
(The identity is invariant to the loss normalisation, so per-sample and batch-mean gradients give
the same ratio.)
"""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from gradsparse.models import default_trainable
from gradsparse.step import make_eval_fn
from theory_checks.context import BASE, base_config, base_runs, Context, describe, heldout
from theory_checks.protocol import Check, Finding
from theory_checks.plan import CheckPlan, PartPlan, arm
from theory_checks.verdicts import bound_verdict, fmt, mean_sd

#: an implementation check: the identity is algebra, its tolerance float32 rounding (no effect size)
PARTS = [PartPlan("identity", "exact", "implementation",
                  "largest relative error (per-token identity, monitor vs vmap(grad))",
                  why="", source="float32 summation of n terms: n * eps32")]


def plan(preset: str, p: dict[str, Any]) -> CheckPlan:
    return CheckPlan(arms=[arm("relu" if a == "relu" else a,
                               base_config(preset) if a == "relu" else base_config(preset, activation=a,
                                                                                    flatness_every=0))
                           for a in p["activations"]], parts=list(PARTS),
                     notes=["implementation check: a unit test of the monitors and probes on trained models, not "
                            "evidence for the theory"])

EPS32 = float(np.finfo(np.float32).eps)


def independent_identity(model: Any, x: np.ndarray, y: np.ndarray) -> list[dict[str, np.ndarray]]:
    """Per block: the (sigma'^2-weighted) active counts and the right side from per-sample gradients
    (SPEC 2.5: count_t = sum_i sigma'(z_ti)^2, |A_t| for ReLU-like sigma).

    Returns a list (one per MLP block) of {'count': (B,), 'rhs': (B,), 'valid': (B,) bool}; a token
    is valid when it has an active unit and a non-zero gradient on it.
    """
    blocks = model.mlp_blocks()
    if model.tokens_per_sample != 1:
        raise ValueError("independent_identity expects one token per sample (an MLP)")
    ks = [b.key.weight for b in blocks]
    pa = [jnp.zeros((b.n,), jnp.float32) for b in blocks]

    def loss1(ks, pa, xi, yi):
        m = eqx.tree_at(lambda mm: [b.key.weight for b in mm.mlp_blocks()], model, ks)
        probes = [{"a": p[None], "y": jnp.zeros((1, b.d), jnp.float32)} for p, b in zip(pa, blocks)]
        logits, aux = m(xi[None], probes)
        return optax.softmax_cross_entropy_with_integer_labels(logits, yi[None]).mean(), aux

    per_sample = jax.jit(jax.vmap(jax.grad(loss1, argnums=(0, 1), has_aux=True), in_axes=(None, None, 0, 0)))
    (gk, ga), aux = per_sample(ks, pa, jnp.asarray(x), jnp.asarray(y))
    out = []
    for l in range(len(blocks)):
        z = np.asarray(aux[l]["z"])[:, 0, :]          # (B, n)
        xt = np.asarray(aux[l]["x"])[:, 0, :]          # (B, d)
        g = np.asarray(ga[l], dtype=np.float64)        # (B, n)
        G = np.asarray(gk[l], dtype=np.float64)        # (B, n, d): dL_t/dK
        w = np.asarray(blocks[l].act.deriv(jnp.asarray(z)), dtype=np.float64) ** 2  # sigma'(z)^2: 1[z > 0] for ReLU
        count = w.sum(-1)
        af = np.sum(G * G, axis=(1, 2))
        xsq = np.sum(xt.astype(np.float64) ** 2, -1)
        g2 = (w * g * g).sum(-1)
        valid = (count > 0) & (g2 > 0) & (xsq > 0)
        rhs = np.where(valid, af / np.where(valid, xsq * g2 / np.maximum(count, 1), 1.0), np.nan)
        out.append({"count": count, "rhs": rhs, "valid": valid})
    return out


def run(ctx: Context, p: dict[str, Any]) -> Finding:
    cfg0 = base_config(ctx.preset)
    max_err, mon_err, mean_gap, n_tokens = [], [], [], []
    per_act: dict[str, list[float]] = {}
    runs = [(act, r) for act in p["activations"]
            for r in (base_runs(ctx) if act == "relu" else base_runs(ctx, activation=act))]
    for act, run_ in runs:
        model = run_.model
        x, y = heldout(ctx, cfg0, p["tokens"])
        ind = independent_identity(model, x, y)
        mon = make_eval_fn(default_trainable(model))(model, x, y)["layers"]
        errs, gaps, cnt = [], [], 0
        for l, blk in enumerate(ind):
            v = blk["valid"]
            cnt += int(v.sum())
            errs.append(float(np.max(np.abs(blk["count"][v] - blk["rhs"][v]) / blk["count"][v])) if v.any() else np.nan)
            # the monitor's token means against the independent ones
            lhs_m, rhs_m = float(mon["identity_lhs"][l]), float(mon["identity_rhs"][l])
            gaps.append(max(abs(lhs_m - blk["count"][v].mean()) / blk["count"][v].mean(),
                            abs(rhs_m - blk["rhs"][v].mean()) / blk["rhs"][v].mean()))
        max_err.append(max(errs))
        mean_gap.append(max(gaps))
        mon_err.append(float(np.max(np.asarray(mon["identity_relerr"]))))
        n_tokens.append(cnt)
        per_act.setdefault(f"{act}/worst_relerr", []).append(max(max_err[-1], mon_err[-1], mean_gap[-1]))
    tol = cfg0.width * cfg0.mlp_ratio * EPS32
    # per seed: the worst error over every activation's model of that seed
    worst_all = [max(a, b, c) for a, b, c in zip(max_err, mon_err, mean_gap)]
    def by_seed(v: list[float]) -> list[float]:
        return [max(v[i::len(ctx.seeds)]) for i in range(len(ctx.seeds))]

    worst = by_seed(worst_all)
    verdict = bound_verdict(worst, passes=lambda v: v <= tol, fails=lambda v: v > 1e-3, kind="exact",
                            what=PARTS[0].what, bound=f"<= n*eps32 = {fmt(tol)}", fail_bound="> 1e-3")
    return Finding(
        None,
        parts={"identity": verdict},
        measured=(f"max per-token |count - rhs|/count {fmt(max(max_err))} (vmap(grad)); monitor relerr "
                  f"{fmt(max(mon_err))}; monitor vs independent means {fmt(max(mean_gap))}; tolerance {fmt(tol)} "
                  f"({len(ctx.seeds)} seeds x activations {list(p['activations'])}, {sum(n_tokens)} tokens)"),
        per_seed={"worst_relerr": worst, "identity_relerr_vmap": by_seed(max_err),
                  "identity_relerr_monitor": by_seed(mon_err), "monitor_vs_independent": by_seed(mean_gap), **per_act},
        numbers={"tolerance": tol, "worst": max(worst)},
        model=f"{describe(cfg0)}; activations {list(p['activations'])}",
        notes=[f"held-out batch of {p['tokens']}; errors over all blocks and valid tokens; count weighted by "
               f"sigma'(z)^2 (SPEC 2.5 general form); mean worst {mean_sd(worst)}"],
    )


CHECK = Check(
    name="G1",
    slug="g01_identity",
    title="Sparsity identity (exact)",
    claim=("For every token of a trained MLP block (ReLU, JSReLU, GELU), the sigma'^2-weighted number of active "
           "units equals AF_K,t / (||x_t||^2 mean_w g^2), to float precision, and the in-step monitor agrees "
           "with per-sample gradients computed independently by vmap(grad)."),
    rule=("PASS when, in every seed, the largest relative error (per token, per block; and monitor vs "
          "independent means) is <= n * eps32 (n = hidden units: float32 summation of n terms); FAIL when "
          "it exceeds 1e-3 in a majority of seeds; else INCONCLUSIVE."),
    presets={
        "smoke": {"base": BASE["smoke"], "tokens": 32, "activations": ("relu",)},
        "quick": {"base": BASE["quick"], "tokens": 256, "activations": ("relu", "jsrelu", "gelu")},
        "full": {"base": BASE["full"], "tokens": 512, "activations": ("relu", "jsrelu", "gelu")},
    },
    run=run,
    plan=plan,
)
