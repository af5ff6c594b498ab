"""G12: a small Transformer trained with weight noise is flatter and sparser than without.

The theory needs weight noise for Transformers (SPEC 4.4): token-wise synapse noise
z_t <- K x_t + eps_t, eps_t ~ N(0, s^2 ||x_t||^2 I), s = rho RMS(K), during training only
(``TrainConfig.weight_noise='synapse'``, rho = 0.1 by default). Model: a pre-LN ViT on
Fashion-MNIST (7x7 patches, 16 tokens) when its IDX files are present, else the causal byte LM on
text. Paired by seed: noise vs no noise, same initialisation and data order. Sparser: held-out
density (mean over the last 10% of logs). Flatter: Hutchinson tr(H_K) at the end (mean over the
last quarter of its estimates; evaluated without noise).
"""

from __future__ import annotations

import math
from typing import Any

from gradsparse.config import TrainConfig
from gradsparse.data import FASHION_DIR
from gradsparse.figures import plot_bands
from gradsparse.figures_spectra import FORMATS
from theory_checks.context import Context, end_value, series, window_mean
from theory_checks.protocol import Check, Finding, Unavailable
from theory_checks.verdicts import combine, effect_verdict, fmt, mean_sd

MIN_DENSITY = 0.01
MIN_LOG_TRACE = 0.05


def _config(ctx: Context, p: dict[str, Any], **kw: Any):
    t = dict(p["train"])
    if (FASHION_DIR / "train-images-idx3-ubyte").exists() or (FASHION_DIR / "train-images-idx3-ubyte.gz").exists():
        t.update(model="vit", data="fashion_mnist")
    else:
        try:
            ctx.data("fashion_mnist")
            t.update(model="vit", data="fashion_mnist")
        except Unavailable:
            t.update(model="lm", data="text", n_train=None, n_test=None)
    return TrainConfig.from_dict({**t, **kw})


def run(ctx: Context, p: dict[str, Any]) -> Finding:
    cfg = _config(ctx, p)
    try:
        ctx.data(cfg.data, cfg.n_train, cfg.n_test)
    except Unavailable:
        raise
    except (ValueError, OSError) as e:
        raise Unavailable(f"no data for the Transformer check ({e})") from None
    plain = ctx.seed_runs(cfg, f"g12-{cfg.model}-plain")
    noisy = ctx.seed_runs(cfg.replace(weight_noise="synapse", rho=p["rho"]), f"g12-{cfg.model}-noise")
    dp = [end_value(r.history, "heldout/density/mean") for r in plain]
    dn = [end_value(r.history, "heldout/density/mean") for r in noisy]
    tp = [window_mean(r.history, "flat/trace_k", 0.75, 1.0) for r in plain]
    tn = [window_mean(r.history, "flat/trace_k", 0.75, 1.0) for r in noisy]
    ap = [r.final["test_accuracy"] for r in plain]
    an = [r.final["test_accuracy"] for r in noisy]
    lr_ = [math.log(a / b) if a > 0 and b > 0 else float("nan") for a, b in zip(tp, tn)]
    parts = {"sparser": effect_verdict([a - b for a, b in zip(dp, dn)], MIN_DENSITY,
                                       what="density(no noise) - density(noise)"),
             "flatter": effect_verdict(lr_, MIN_LOG_TRACE, what="ln trace_k(no noise)/trace_k(noise)")}
    steps = series(plain[0].history, "heldout/density/mean")[0].tolist()
    ser = {"steps": steps, "model": cfg.model, "data": cfg.data, "rho": p["rho"],
           "plain": [series(r.history, "heldout/density/mean")[1].tolist() for r in plain],
           "noise": [series(r.history, "heldout/density/mean")[1].tolist() for r in noisy], "seeds": list(ctx.seeds)}
    return Finding(
        combine(parts),
        measured=(f"{cfg.model} on {cfg.data}: density no-noise {mean_sd(dp)} vs noise {mean_sd(dn)}; trace_k "
                  f"{mean_sd(tp)} vs {mean_sd(tn)}; accuracy {mean_sd(ap)} vs {mean_sd(an)}"),
        per_seed={"density_plain": dp, "density_noise": dn, "trace_k_plain": tp, "trace_k_noise": tn,
                  "test_acc_plain": ap, "test_acc_noise": an},
        parts=parts, series=ser,
        notes=[f"{cfg.model} width {cfg.width}, depth {cfg.depth}, heads {cfg.heads}, {cfg.optimizer} lr {fmt(cfg.lr)}, "
               f"batch {cfg.batch_size}, {cfg.steps} steps, n_train {cfg.n_train}; synapse noise rho {p['rho']}"])


def _curves(ser: dict[str, Any], out, formats=None) -> list:
    bands = {"no noise": (ser["steps"], ser["plain"]), f"synapse noise (rho={ser['rho']})": (ser["steps"], ser["noise"])}
    return plot_bands(bands, out, ylabel="held-out density (active MLP units)", formats=formats or FORMATS,
                      title=f"Weight noise and sparsity: {ser['model']} on {ser['data']} (band: min-max over seeds)")


def figures(ser: dict[str, Any], out_dir) -> list:
    return _curves(ser, out_dir / "g12_weight_noise")


def readme_figure(ser: dict[str, Any], out, formats) -> list:
    return _curves(ser, out, formats)


_TRAIN = dict(width=64, depth=2, heads=4, patch=7, mlp_ratio=4, optimizer="adam", lr=1e-3, batch_size=32,
              eval_batch=128, checkpoint_every=0, flatness_probes=4)
_P = {"smoke": {"train": {**_TRAIN, "width": 16, "depth": 1, "heads": 2, "steps": 40, "log_every": 10,
                          "flatness_every": 20, "flatness_probes": 2, "n_train": 512, "n_test": 128,
                          "eval_batch": 64, "seq_len": 16}, "rho": 0.1},
      "quick": {"train": {**_TRAIN, "steps": 600, "log_every": 50, "flatness_every": 100, "n_train": 10000,
                          "n_test": 1000}, "rho": 0.1},
      "full": {"train": {**_TRAIN, "width": 128, "depth": 4, "steps": 5000, "log_every": 100, "flatness_every": 250,
                         "batch_size": 64, "flatness_probes": 8, "eval_batch": 256}, "rho": 0.1}}

CHECK = Check(
    name="G12",
    slug="g12_weight_noise_transformer",
    title="Weight noise: flatter and sparser Transformer",
    claim=("A small Transformer trained with token-wise synapse weight noise (rho = 0.1) ends flatter (smaller "
           "tr(H_K)) and sparser (lower MLP density) than the same model trained without noise."),
    rule=(f"Part sparser: effect = density(no noise) - density(noise), PASS when > 0 in every seed with mean > "
          f"{MIN_DENSITY}, FAIL when < 0 in a majority. Part flatter: effect = ln(trace_k(no noise)/trace_k(noise)), "
          f"PASS when > 0 in every seed with mean > {MIN_LOG_TRACE}, FAIL when < 0 in a majority. PASS needs both. "
          f"INCONCLUSIVE with the reason when no image or text data is available."),
    presets=_P,
    run=run,
    figures=figures,
)
