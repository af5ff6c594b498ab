"""Do the sparsity modules lower activation density? (SPEC G10, G11; the paper's ~50% claim)

Residual LN-MLP (width 128, 4 blocks) on mnist1d, AdamW (lr 1e-3, weight decay 0.1), batch 64,
for each seed:

  scratch/vanilla    ReLU, plain LayerNorm
  scratch/modules    zeroth bias + restricted LN (no shift, gamma >= 1) + J-SquaredReLU, from scratch
  finetune/control   the scratch/vanilla model trained ``--ft-steps`` more steps, no modules
  finetune/modules   the same parent with zeroth bias + restricted LN + ReLU->JSReLU mixing plugged in
                     (``gradsparse.sparsify``), trained the same ``--ft-steps`` steps

Density = fraction of activations with |a| > 1e-6 (JSReLU's zero set is counted exactly like
ReLU's), on the fixed held-out batch at the end of training (train-batch density alongside);
test accuracy over the test split. Prints one row per condition and seed, then the mean and
the relative density reduction 1 - d(modules) / d(vanilla or control) per seed.

    python benchmarks/modules_effect.py [--seeds 0 1 2] [--steps 1500] [--ft-steps 750] [--lr 1e-3] [--wd 0.1]
"""

from __future__ import annotations

import argparse
import statistics
import time

from gradsparse.config import TrainConfig
from gradsparse.data import load_dataset
from gradsparse.factory import finetune_start
from gradsparse.runtime import enable_compilation_cache
from gradsparse.train import train


def _row(name: str, seed: int, res, t: float) -> dict:
    last = res.history[-1]
    return {"condition": name, "seed": seed, "density": last["heldout/density/mean"],
            "train_density": last["train/density/mean"], "test_accuracy": res.final["test_accuracy"],
            "seconds": t}


def run(seeds: list[int], steps: int, ft_steps: int, lr: float, wd: float, width: int, depth: int) -> list[dict]:
    ds = load_dataset("mnist1d", seed=0)
    base = dict(model="mlp", data="mnist1d", width=width, depth=depth, lr=lr, optimizer="adamw", weight_decay=wd,
                batch_size=64, log_every=max(steps, ft_steps), checkpoint_every=0)
    rows = []
    for seed in seeds:
        cfg = TrainConfig(steps=steps, seed=seed, **base)
        t = time.time()
        vanilla = train(cfg, None, dataset=ds, progress=False)
        rows.append(_row("scratch/vanilla", seed, vanilla, time.time() - t))
        t = time.time()
        mods = train(cfg.replace(zeroth_bias=True, restricted_ln=True, activation="jsrelu"), None, dataset=ds,
                     progress=False)
        rows.append(_row("scratch/modules", seed, mods, time.time() - t))
        ft_cfg = cfg.replace(steps=ft_steps)
        t = time.time()
        start, opts = finetune_start(vanilla.model, ft_cfg)
        control = train(ft_cfg.replace(surgery=opts), None, dataset=ds, start=start, progress=False)
        rows.append(_row("finetune/control", seed, control, time.time() - t))
        start, opts = finetune_start(vanilla.model, ft_cfg, zeroth_bias=True, restricted_ln=True, jsrelu=True,
                                     t_up=ft_steps // 2, t_mix=ft_steps // 2)
        t = time.time()
        ft = train(ft_cfg.replace(surgery=opts), None, dataset=ds, start=start, progress=False)
        rows.append(_row("finetune/modules", seed, ft, time.time() - t))
        for r in rows[-4:]:
            print(f"  seed {r['seed']} {r['condition']:<17} density {r['density']:.3f} "
                  f"(train {r['train_density']:.3f})  test acc {r['test_accuracy']:.3f}  [{r['seconds']:.0f}s]",
                  flush=True)
    return rows


def report(rows: list[dict]) -> None:
    conds = ["scratch/vanilla", "scratch/modules", "finetune/control", "finetune/modules"]
    seeds = sorted({r["seed"] for r in rows})
    get = {(r["condition"], r["seed"]): r for r in rows}
    print(f"\n{'condition':<18}" + "".join(f"{'seed ' + str(s):>16}" for s in seeds) + f"{'mean':>16}")
    print(f"{'':<18}" + "".join(f"{'dens / acc':>16}" for _ in seeds) + f"{'dens / acc':>16}")
    for c in conds:
        ds_ = [get[c, s]["density"] for s in seeds]
        ac = [get[c, s]["test_accuracy"] for s in seeds]
        cells = "".join(f"{d:>9.3f} /{a:>5.3f}" for d, a in zip(ds_, ac))
        print(f"{c:<18}{cells}{statistics.mean(ds_):>9.3f} /{statistics.mean(ac):>5.3f}")
    for mod, ref in (("scratch/modules", "scratch/vanilla"), ("finetune/modules", "finetune/control")):
        red = [1 - get[mod, s]["density"] / get[ref, s]["density"] for s in seeds]
        dacc = [get[mod, s]["test_accuracy"] - get[ref, s]["test_accuracy"] for s in seeds]
        lower = sum(r > 0 for r in red)
        print(f"relative density reduction {mod} vs {ref}: "
              + ", ".join(f"{r:+.1%}" for r in red)
              + f" (mean {statistics.mean(red):+.1%}; lower in {lower}/{len(seeds)} seeds); "
              + f"accuracy change {statistics.mean(dacc):+.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--ft-steps", type=int, default=750)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--wd", type=float, default=0.1, help="AdamW (decoupled) weight decay")
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--depth", type=int, default=4)
    a = ap.parse_args()
    enable_compilation_cache()
    t0 = time.time()
    print(f"residual LN-MLP width {a.width} depth {a.depth} on mnist1d, AdamW lr {a.lr} wd {a.wd}, batch 64; "
          f"{a.steps} steps from scratch, {a.ft_steps} finetuning steps; seeds {a.seeds}")
    rows = run(a.seeds, a.steps, a.ft_steps, a.lr, a.wd, a.width, a.depth)
    report(rows)
    print(f"total {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
