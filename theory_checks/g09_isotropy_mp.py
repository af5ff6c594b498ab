"""G9: the accumulated input and gradient covariances are close to isotropic and fit MP(c) at the measured c.

SPEC 3.3: SGD with weight decay wd accumulates rank-one terms into K with decay r = 1 - lr*wd;
the decayed accumulations are C_x = sum_t r^(T-1-t) mean_b x x^T (MLP inputs, d x d) and
C_g = sum_t r^(T-1-t) mean_b g g^T (gradients at the activations, n x n), with
N = B min(T, T_eff) samples, c = p/N. The theory needs them close to isotropic (participation
ratio alpha = tr(C)^2/||C||_F^2 close to p), in which case the ESD of C / sum_t r^(T-1-t) is the
Marchenko-Pastur law MP(c, s2) at the measured c.

How the accumulation is measured here: the training loop does not hand out per-step inputs, so the
trajectory is replayed from the run's checkpoints (every ``checkpoint_every`` steps, plus the
initial model): the B-sample batches of the steps in [s_k, s_{k+1}) are drawn from the training
set (numpy Generator seeded by the run's seed) and evaluated at checkpoint s_k. This keeps N = B T
exactly and approximates each step's model by the checkpoint at the start of its interval.
g is the per-sample gradient dL_i/da_i (the probe gradient of the mean loss times the batch size).
"""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax.numpy as jnp
import numpy as np

from gradsparse.checkpoint import list_checkpoints, load_model
from gradsparse.models import default_trainable
from gradsparse.rmt import decay_rate, effective_samples, fit_mp, participation_ratio, relative_anisotropy
from gradsparse.step import forward_backward
from theory_checks.context import BASE, base_config, base_runs, Context, init_model
from theory_checks.protocol import Check, Finding, Unavailable
from theory_checks.verdicts import bound_verdict, combine, fmt, mean_sd

ISO_OK, ISO_BAD = 0.5, 0.2
KS_OK, KS_BAD = 0.1, 0.3
CHUNK = 2048


def accumulate(model_at: list[tuple[int, Any]], ds: Any, cfg: Any, rng: np.random.Generator) -> list[dict[str, np.ndarray]]:
    """Decayed C_x, C_g per block over T = cfg.steps steps of B = cfg.batch_size samples.

    ``model_at``: [(start step, model)] sorted, the first at step 0. Returns per block
    {'Cx': (d, d), 'Cg': (n, n), 'weight': sum_t r^(T-1-t)} normalised so that C / weight is the
    weighted mean of x x^T (resp. g g^T) over samples.
    """
    T, B = cfg.steps, cfg.batch_size
    r = decay_rate(cfg.lr, cfg.weight_decay)

    @eqx.filter_jit
    def part(model, xb, yb, w):
        m = xb.shape[0]
        _, _, aux, _, gp = forward_backward(model, default_trainable(model), xb, yb, None)
        out = []
        for a, g in zip(aux, gp):
            xs = a["x"] * jnp.sqrt(w)[:, None]
            gs = g["a"] * m * jnp.sqrt(w)[:, None]
            out.append((xs.T @ xs, gs.T @ gs))
        return out

    acc: list[list[np.ndarray]] | None = None
    bounds = [s for s, _ in model_at] + [T]
    per_chunk = max(1, CHUNK // B)
    for (s0, model), s1 in zip(model_at, bounds[1:]):
        for c0 in range(s0, s1, per_chunk):
            c1 = min(c0 + per_chunk, s1)
            steps = np.arange(c0, c1)
            idx = rng.integers(0, ds.x_train.shape[0], size=(steps.size, B)).reshape(-1)
            w = np.repeat(r ** (T - 1 - steps) / B, B).astype(np.float32)
            res = part(model, jnp.asarray(ds.x_train[idx]), jnp.asarray(ds.y_train[idx]), jnp.asarray(w))
            res = [(np.asarray(a, np.float64), np.asarray(b, np.float64)) for a, b in res]
            if acc is None:
                acc = [[a, b] for a, b in res]
            else:
                for slot, (a, b) in zip(acc, res):
                    slot[0] += a
                    slot[1] += b
    weight = float(sum(r ** (T - 1 - t) for t in range(T)))
    return [{"Cx": a, "Cg": b, "weight": weight} for a, b in (acc or [])]


def cov_stats(C: np.ndarray, N: float) -> dict[str, float]:
    """Isotropy and MP-fit statistics of a covariance accumulated over N samples."""
    C = np.asarray(C, np.float64)
    if C.ndim != 2 or C.shape[0] != C.shape[1] or C.shape[0] < 4:
        raise ValueError(f"C must be a square matrix of size >= 4, got shape {C.shape}")
    if not (N > 0 and np.isfinite(N)):
        raise ValueError(f"N must be a positive finite number of samples, got {N}")
    p = C.shape[0]
    eigs = np.clip(np.linalg.eigvalsh(C), 0.0, None)
    c = p / N
    fixed = fit_mp(eigs, c=min(c, 1e3))
    free = fit_mp(eigs)
    return {"alpha_over_p": float(participation_ratio(C)) / p, "anisotropy": float(relative_anisotropy(C)),
            "c": c, "ks_at_c": fixed.ks, "spikes_at_c": float(fixed.num_spikes), "c_fit": free.c, "ks_fit": free.ks,
            "eig_ratio": float(eigs.max() / max(eigs.min(), 1e-300))}


def run(ctx: Context, p: dict[str, Any]) -> Finding:
    cfg = base_config(ctx.preset)
    ds = ctx.data(cfg.data, cfg.n_train, cfg.n_test)
    iso, ks, c_meas, c_fit, ks_free = [], [], [], [], []
    detail: dict[str, list[float]] = {}
    for s, r in zip(ctx.seeds, base_runs(ctx)):
        if r.out_dir is None:
            raise Unavailable("G9 replays checkpoints; run it with an output folder (gradsparse check --out DIR)")
        cks = [(st, path) for st, path in list_checkpoints(r.out_dir) if st < cfg.steps]
        model_at = [(0, init_model(cfg.replace(seed=s), ds))] + [(st, load_model(path)[0]) for st, path in cks]
        accs = accumulate(model_at, ds, cfg, np.random.default_rng(s))
        N = effective_samples(cfg.batch_size, cfg.steps, cfg.lr, cfg.weight_decay)
        stats = []
        for li, a in enumerate(accs):
            for kind in ("Cx", "Cg"):
                st = cov_stats(a[kind] / a["weight"], N)
                stats.append(st)
                for k, v in st.items():
                    detail.setdefault(f"block{li}/{kind}/{k}", []).append(v)
        iso.append(min(st["alpha_over_p"] for st in stats))
        ks.append(max(st["ks_at_c"] for st in stats))
        ks_free.append(max(st["ks_fit"] for st in stats))
        c_meas.append(max(st["c"] for st in stats))
        c_fit.append(max(st["c_fit"] for st in stats))
    parts = {
        "isotropic": bound_verdict(iso, passes=lambda v: v >= ISO_OK, fails=lambda v: v < ISO_BAD,
                                   what="min over blocks and {C_x, C_g} of alpha/p", bound=f">= {ISO_OK}",
                                   fail_bound=f"< {ISO_BAD}"),
        "mp_fit": bound_verdict(ks, passes=lambda v: v <= KS_OK, fails=lambda v: v > KS_BAD,
                                what="max KS distance of the ESD to MP(c measured, s2 fitted)", bound=f"<= {KS_OK}",
                                fail_bound=f"> {KS_BAD}"),
    }
    return Finding(
        combine(parts),
        measured=(f"min alpha/p {mean_sd(iso)}; KS at measured c {mean_sd(ks)} (c up to {fmt(max(c_meas))}); "
                  f"free MP fit: c {mean_sd(c_fit)}, KS {mean_sd(ks_free)}"),
        per_seed={"min_alpha_over_p": iso, "max_ks_at_c": ks, "max_c_measured": c_meas, "max_c_fit": c_fit,
                  "max_ks_free_fit": ks_free, **detail},
        parts=parts,
        notes=[f"N = B min(T, T_eff) = {fmt(effective_samples(cfg.batch_size, cfg.steps, cfg.lr, cfg.weight_decay))} "
               f"(lr {fmt(cfg.lr)}, wd {fmt(cfg.weight_decay)}); trajectory replayed from checkpoints every "
               f"{cfg.checkpoint_every} steps; covariances are uncentred (SPEC 3.3)"])


CHECK = Check(
    name="G9",
    slug="g09_isotropy_mp",
    title="Isotropic accumulations, MP law",
    claim=("The decayed accumulations of MLP inputs (C_x) and activation gradients (C_g) are close to isotropic "
           "(participation ratio >= p/2) and their ESDs fit the Marchenko-Pastur law at the measured c = p/N."),
    rule=(f"Part isotropic: PASS when min alpha/p >= {ISO_OK} in every seed, FAIL when < {ISO_BAD} in a majority. "
          f"Part mp_fit: PASS when the max KS distance to MP(c measured) is <= {KS_OK} in every seed, FAIL when "
          f"> {KS_BAD} in a majority. PASS needs both."),
    presets={k: {"base": BASE[k]} for k in ("smoke", "quick", "full")},
    run=run,
)
