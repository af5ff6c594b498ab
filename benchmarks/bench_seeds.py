"""Whole training runs: a seed group trained together (``train_seeds``, one vmap) vs one seed after
the other (``train``), at the configs the checks train.

Configs: the quick baseline MLP (``theory_checks.context.BASE['quick']``: width 64, depth 2, Adam,
1000 steps, traces every 100) and the LM checks' byte LM (``LM['quick']``: width 32, 2 blocks,
seq 32, 800 steps, traces every 200), 3 seeds each, no run folders.

Printed ratios (medians over interleaved repeats, the order alternating; jitted functions dropped
before each repeat, so every repeat pays what a check pays: tracing plus the persistent
compilation cache):
- ``seed_group_vs_one_at_a_time_{tag}`` = t(3 ``train`` calls) / t(one ``train_seeds`` call).
  :func:`gradsparse.train_seeds.worth_vmapping` picks the group for both configs on a CPU; the
  target says a group must never lose there.
- ``seed_group_max_density_diff_{tag}``: the largest |held-out density at the end| difference
  between a seed trained in the group and alone (float rounding, amplified by training), beside
  the seed-to-seed spread of the same number.
"""

from __future__ import annotations

import common  # noqa: F401  (puts the checkout on sys.path)

import statistics
import time

import jax
import numpy as np

from common import header, quick, report
from gradsparse.runtime import enable_compilation_cache
from gradsparse.train import train
from gradsparse.train_seeds import train_seeds
from theory_checks.context import base_config, lm_config, load_data

SEEDS = 3


def bench(tag: str, cfg, repeats: int) -> None:
    ds = load_data(cfg.data, n_train=cfg.n_train, n_test=cfg.n_test)
    cfgs = [cfg.replace(seed=s) for s in range(SEEDS)]
    times: dict[str, list[float]] = {"alone": [], "group": []}
    out: dict[str, list] = {}
    for rep in range(repeats):
        for mode in (("alone", "group") if rep % 2 == 0 else ("group", "alone")):
            jax.clear_caches()
            t0 = time.perf_counter()
            res = ([train(c, None, dataset=ds, progress=False) for c in cfgs] if mode == "alone"
                   else train_seeds(cfgs, None, dataset=ds))
            times[mode].append(time.perf_counter() - t0)
            out[mode] = res
    alone, group = statistics.median(times["alone"]), statistics.median(times["group"])
    print(f"  {tag}: {SEEDS} seeds one at a time {alone:.1f} s, together {group:.1f} s (medians of {repeats})")
    report(f"seed_group_vs_one_at_a_time_{tag}", alone / group, target=">= 1",
           note=f"{SEEDS} whole runs of {cfg.steps} steps; {alone:.1f} vs {group:.1f} s")
    d_alone = [r.final["heldout_density_end"] for r in out["alone"]]
    d_group = [r.final["heldout_density_end"] for r in out["group"]]
    diff = max(abs(a - b) for a, b in zip(d_alone, d_group))
    report(f"seed_group_max_density_diff_{tag}", diff, unit="",
           note=f"end held-out density, group vs alone; seed spread (sd) {float(np.std(d_alone, ddof=1)):.4f}")


def main() -> None:
    header("bench_seeds: seed groups trained together (vmap) vs one seed after the other, whole runs")
    enable_compilation_cache()
    repeats = 1 if quick() else 3
    steps = {"steps": 100} if quick() else {}
    bench("base_mlp_w64", base_config("quick", **steps), repeats)
    bench("lm_w32", lm_config("quick", **steps), repeats)


if __name__ == "__main__":
    main()
