"""G7: spectral concentration of the key matrices, and nothing collapses.

For each block's key matrix K (n x d), the non-zero eigenvalues of K K^T (= squared singular values
of K, via ``gradsparse.spectra.spectrum_row``) should stay concentrated: a small "80%-mass ratio"
(10^w, w the width of the narrowest interval of log10 eigenvalues holding 80% of them). At the same
time the sparsity must not come from a collapse: tr(K K^T) = ||K||_F^2 (``train/k_fro2``) does not
shrink and ||g^V|| (``train/gv_norm``, the gradient reaching the MLP output) does not vanish.
Context: the 80%-mass ratio of the same matrices at initialisation (an iid n x d matrix: MP with
c = d/n), and an MP fit of the trained spectrum (KS distance, spikes).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gradsparse.figures_spectra import FORMATS, plot_esd
from gradsparse.rmt import mp_quantile
from gradsparse.spectra import mass_ratio, spectrum_row
from theory_checks.context import (BASE, SGD, base_config, base_runs, Context, describe, end_value, init_model, series,
                                   sgd_config, sgd_runs)
from theory_checks.protocol import Check, Finding
from theory_checks.verdicts import bound_verdict, combine, mean_sd

#: relative to the MP value at c = d/n (CHECKS_REVIEW G7: SGD-trained K measured 1.0-1.2x, Adam 3.5x)
MASS_OK, MASS_BAD = 2.0, 5.0
FRO_OK, FRO_BAD = 0.9, 0.5           # ||K||_F^2 end / start
GV_OK, GV_BAD = 0.1, 0.01            # ||g^V|| end / start


def key_rows(model: Any, fit: bool = False, keep_sv: bool = False) -> list[Any]:
    return [spectrum_row(f"blocks.{i}.key", np.asarray(b.key.effective_weight()), fit=fit, keep_sv=keep_sv)
            for i, b in enumerate(model.mlp_blocks())]


def mp_mass80(c: float, m: int = 4000) -> float:
    """The 80%-mass ratio of the Marchenko-Pastur law at aspect ratio c (< 1): the narrowest decade
    window holding 80% of its mass, from m evenly spaced quantiles (MP(1/4): 4.2)."""
    u = (np.arange(m) + 0.5) / m
    return mass_ratio(mp_quantile(u, c))


def _measure(runs, cfg, ds, seeds):
    mass_end, mass_init, fro, gv, moved = [], [], [], [], []
    for s, r in zip(seeds, runs):
        rows = key_rows(r.model)
        m0 = init_model(cfg.replace(seed=s), ds)
        rows0 = key_rows(m0)
        mass_end.append(max(row.mass80_ratio for row in rows))
        mass_init.append(max(row.mass80_ratio for row in rows0))
        f0, f1 = series(r.history, "train/k_fro2/mean")[1][0], end_value(r.history, "train/k_fro2/mean")
        g0, g1 = series(r.history, "train/gv_norm/mean")[1][0], end_value(r.history, "train/gv_norm/mean")
        fro.append(f1 / f0)
        gv.append(g1 / g0)
        moved.append(max(float(np.linalg.norm(np.asarray(b.key.weight) - np.asarray(b0.key.weight))
                               / np.linalg.norm(np.asarray(b0.key.weight)))
                         for b, b0 in zip(r.model.mlp_blocks(), m0.mlp_blocks())))
    return mass_end, mass_init, fro, gv, moved


def run(ctx: Context, p: dict[str, Any]) -> Finding:
    cfg = sgd_config(ctx.preset)
    ds = ctx.data(cfg.data, cfg.n_train, cfg.n_test)
    runs = sgd_runs(ctx)
    mass_end, mass_init, fro, gv, moved = _measure(runs, cfg, ds, ctx.seeds)
    acfg = base_config(ctx.preset)
    a_end, a_init, _, _, a_moved = _measure(base_runs(ctx), acfg, ctx.data(acfg.data, acfg.n_train, acfg.n_test),
                                            ctx.seeds)
    c = 1.0 / cfg.mlp_ratio
    ref = mp_mass80(c)
    rel = [v / ref for v in mass_end]
    rows = key_rows(runs[0].model, fit=True, keep_sv=True)
    row = rows[-1]
    eigs = (row.sv ** 2) / max(row.shape)
    ser = {"eigs": eigs.tolist(), "fit": row.mp_fit.to_dict() if row.mp_fit is not None else None,
           "c_iid": min(row.shape) / max(row.shape), "shape": list(row.shape), "seed": ctx.seeds[0],
           "name": row.name, "mass80_ratio": row.mass80_ratio, "steps": cfg.steps}
    parts = {
        "mass80_vs_mp": bound_verdict(rel, passes=lambda v: v <= MASS_OK, fails=lambda v: v > MASS_BAD,
                                      what=f"SGD: max over blocks of the 80%-mass ratio of K K^T / MP(c = d/n = {c:g}) "
                                           f"value {ref:.3g}", bound=f"<= {MASS_OK}x MP", fail_bound=f"> {MASS_BAD}x MP"),
        "fro_not_shrinking": bound_verdict(fro, passes=lambda v: v >= FRO_OK, fails=lambda v: v < FRO_BAD,
                                           what="SGD: tr(K K^T) end/start", bound=f">= {FRO_OK}",
                                           fail_bound=f"< {FRO_BAD}"),
        "gv_not_vanishing": bound_verdict(gv, passes=lambda v: v >= GV_OK, fails=lambda v: v < GV_BAD,
                                          what="SGD: ||g^V|| end/start", bound=f">= {GV_OK}", fail_bound=f"< {GV_BAD}"),
    }
    return Finding(
        combine(parts),
        measured=(f"SGD: 80%-mass ratio {mean_sd(mass_init)} (init) -> {mean_sd(mass_end)} (end) = {mean_sd(rel)} x "
                  f"MP(c={c:g}) {ref:.3g}; ||K-K0||/||K0|| {mean_sd(moved)}; tr(KK^T) end/start {mean_sd(fro)}; "
                  f"||g^V|| end/start {mean_sd(gv)}. Adam (context): {mean_sd(a_init)} -> {mean_sd(a_end)} = "
                  f"{mean_sd([v / ref for v in a_end])} x MP, ||K-K0||/||K0|| {mean_sd(a_moved)}"),
        per_seed={"sgd_mass80_end": mass_end, "sgd_mass80_init": mass_init, "sgd_mass80_over_mp": rel,
                  "sgd_k_fro2_ratio": fro, "sgd_gv_norm_ratio": gv, "sgd_k_moved": moved,
                  "adam_mass80_end": a_end, "adam_mass80_over_mp": [v / ref for v in a_end], "adam_k_moved": a_moved},
        parts=parts, series=ser, model=f"SGD: {describe(cfg)}; Adam (context): {describe(acfg)}",
        notes=[f"thresholds relative to MP at the measured c = d/n = {c:g} (80%-mass ratio {ref:.3g}); with wd = 0 the "
               "concentration may be inherited from K0: ||K - K0|| / ||K0|| says how far K moved"])


def _esd(ser: dict[str, Any], out, formats=None) -> list:
    return plot_esd(np.asarray(ser["eigs"]), out, fit=ser["fit"], c_pred=ser["c_iid"],
                    title=(f"Trained key matrix {ser['name']} ({ser['shape'][0]}x{ser['shape'][1]}, "
                           f"{ser['steps']} steps, seed {ser['seed']}): ESD of K^T K / n vs MP"),
                    formats=formats or FORMATS)


def figures(ser: dict[str, Any], out_dir) -> list:
    return _esd(ser, out_dir / "g07_esd_key")


def readme_figure(ser: dict[str, Any], out, formats) -> list:
    return _esd(ser, out, formats)


CHECK = Check(
    name="G7",
    slug="g07_spectral_concentration",
    title="Spectral concentration, no collapse",
    claim=("After SGD training, the non-zero eigenvalues of every K K^T stay concentrated like the Marchenko-Pastur "
           "law at c = d/n (80%-mass ratio within 2x of MP's), while tr(K K^T) does not shrink and ||g^V|| does not "
           "vanish."),
    rule=(f"Bound parts on the plain-SGD baseline (per seed): 80%-mass ratio of K K^T (max over blocks) relative to "
          f"MP at c = d/n: PASS <= {MASS_OK}x in every seed, FAIL > {MASS_BAD}x in a majority; tr(KK^T) end/start PASS "
          f">= {FRO_OK}, FAIL < {FRO_BAD}; ||g^V|| end/start PASS >= {GV_OK}, FAIL < {GV_BAD}. PASS needs all three "
          f"parts, FAIL any. The Adam baseline is reported as context."),
    presets={k: {"base": BASE[k], "sgd": SGD[k]} for k in ("smoke", "quick", "full")},
    run=run,
    figures=figures,
)
