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
from gradsparse.spectra import spectrum_row
from theory_checks.context import BASE, base_config, base_runs, Context, end_value, init_model, series
from theory_checks.protocol import Check, Finding
from theory_checks.verdicts import bound_verdict, combine, mean_sd

MASS_OK, MASS_BAD = 10.0, 100.0      # one decade / two decades
FRO_OK, FRO_BAD = 0.9, 0.5           # ||K||_F^2 end / start
GV_OK, GV_BAD = 0.1, 0.01            # ||g^V|| end / start


def key_rows(model: Any, fit: bool = False, keep_sv: bool = False) -> list[Any]:
    return [spectrum_row(f"blocks.{i}.key", np.asarray(b.key.effective_weight()), fit=fit, keep_sv=keep_sv)
            for i, b in enumerate(model.mlp_blocks())]


def run(ctx: Context, p: dict[str, Any]) -> Finding:
    cfg = base_config(ctx.preset)
    ds = ctx.data(cfg.data, cfg.n_train, cfg.n_test)
    runs = base_runs(ctx)
    mass_end, mass_init, fro, gv, ks, spikes = [], [], [], [], [], []
    ser: dict[str, Any] = {}
    for i, r in enumerate(runs):
        rows = key_rows(r.model, fit=True, keep_sv=(i == 0))
        rows0 = key_rows(init_model(cfg.replace(seed=ctx.seeds[i]), ds))
        mass_end.append(max(row.mass80_ratio for row in rows))
        mass_init.append(max(row.mass80_ratio for row in rows0))
        ks.append(max(row.ks for row in rows))
        spikes.append(float(sum(row.num_spikes for row in rows)))
        f0, f1 = series(r.history, "train/k_fro2/mean")[1][0], end_value(r.history, "train/k_fro2/mean")
        g0, g1 = series(r.history, "train/gv_norm/mean")[1][0], end_value(r.history, "train/gv_norm/mean")
        fro.append(f1 / f0)
        gv.append(g1 / g0)
        if i == 0:
            row = rows[0]
            n_big = max(row.shape)
            eigs = (row.sv ** 2) / n_big
            ser = {"eigs": eigs.tolist(), "fit": row.mp_fit.to_dict() if row.mp_fit is not None else None,
                   "c_iid": min(row.shape) / max(row.shape), "shape": list(row.shape), "seed": ctx.seeds[0],
                   "name": row.name, "mass80_ratio": row.mass80_ratio, "steps": cfg.steps}
    parts = {
        "mass80_small": bound_verdict(mass_end, passes=lambda v: v <= MASS_OK, fails=lambda v: v > MASS_BAD,
                                      what="max over blocks of the 80%-mass ratio of K K^T (end)",
                                      bound=f"<= {MASS_OK}", fail_bound=f"> {MASS_BAD}"),
        "fro_not_shrinking": bound_verdict(fro, passes=lambda v: v >= FRO_OK, fails=lambda v: v < FRO_BAD,
                                           what="tr(K K^T) end/start", bound=f">= {FRO_OK}", fail_bound=f"< {FRO_BAD}"),
        "gv_not_vanishing": bound_verdict(gv, passes=lambda v: v >= GV_OK, fails=lambda v: v < GV_BAD,
                                          what="||g^V|| end/start", bound=f">= {GV_OK}", fail_bound=f"< {GV_BAD}"),
    }
    return Finding(
        combine(parts),
        measured=(f"80%-mass ratio {mean_sd(mass_init)} (init) -> {mean_sd(mass_end)} (end); tr(KK^T) end/start "
                  f"{mean_sd(fro)}; ||g^V|| end/start {mean_sd(gv)}; MP fit KS {mean_sd(ks)}, spikes {mean_sd(spikes)}"),
        per_seed={"mass80_end": mass_end, "mass80_init": mass_init, "k_fro2_ratio": fro, "gv_norm_ratio": gv,
                  "mp_ks": ks, "mp_spikes": spikes},
        parts=parts, series=ser,
        notes=["mass ratio: max over blocks; eigenvalues of K K^T from the Gram route of gradsparse.spectra; "
               "end values of logged quantities are means over the last 10% of training"])


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
    claim=("After training, the non-zero eigenvalues of every K K^T stay concentrated (80% of them within one "
           "decade), while tr(K K^T) does not shrink and ||g^V|| does not vanish."),
    rule=(f"Parts (per seed): 80%-mass ratio (max over blocks) PASS <= {MASS_OK} in every seed, FAIL > {MASS_BAD} in a "
          f"majority; tr(KK^T) end/start PASS >= {FRO_OK}, FAIL < {FRO_BAD}; ||g^V|| end/start PASS >= {GV_OK}, "
          f"FAIL < {GV_BAD}. PASS needs all three parts."),
    presets={k: {"base": BASE[k]} for k in ("smoke", "quick", "full")},
    run=run,
    figures=figures,
)
