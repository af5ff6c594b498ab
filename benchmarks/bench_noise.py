"""Step time of weight-noise training vs plain training on the same model and batch (SPEC 4.4).

For each model (residual MLP on mnist1d; a small pre-LN ViT on Fashion-MNIST when its files
are installed, else the byte LM) it times the jitted training step (no monitors) of
plain / synapse / exact-per-sample / exact-per-batch noise, interleaving the variants in
rounds and reporting the median of the rounds, printed as ratios to plain. Target: < 1.5x.

    python benchmarks/bench_noise.py [--rounds 7] [--steps 20]
"""

from __future__ import annotations

import argparse
import statistics
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from gradsparse.config import TrainConfig
from gradsparse.data import load_dataset
from gradsparse.data import Batcher, DataInfo
from gradsparse.factory import build, make_optimizer
from gradsparse.step import make_train_step

VARIANTS = (("plain", "none", "sample"), ("synapse", "synapse", "sample"), ("exact/sample", "exact", "sample"),
            ("exact/batch", "exact", "batch"))


def _setup(cfg: TrainConfig):
    ds = load_dataset(cfg.data, seed=0, n_train=cfg.n_train, n_test=cfg.n_test)
    info = DataInfo.of(ds)
    x, y = Batcher(ds, jax.random.key(1), cfg.batch_size, cfg.seq_len)(0)
    steps = {}
    for name, kind, per in VARIANTS:
        c = cfg.replace(weight_noise=kind, noise_per=per)
        built = build(c, info, jax.random.key(0))
        model, trainable = built.model, built.trainable
        opt = make_optimizer(c)
        fn = make_train_step(opt, trainable, built.projections, monitors=False)
        state = opt.init(eqx.filter(model, trainable))
        steps[name] = (fn, model, state)
    return steps, jnp.asarray(x), jnp.asarray(y)


def _time(fn, model, state, x, y, n: int) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) per step, over n steps."""
    t0, c0 = time.perf_counter(), time.process_time()
    for s in range(n):
        model, state, _, fin = fn(model, state, x, y, jax.random.key(s), jnp.asarray(s, jnp.int32))
    jax.block_until_ready(model)
    return (time.perf_counter() - t0) / n, (time.process_time() - c0) / n


def bench(label: str, cfg: TrainConfig, rounds: int, steps: int) -> dict[str, float]:
    variants, x, y = _setup(cfg)
    for fn, model, state in variants.values():  # compile + warm up
        _time(fn, model, state, x, y, 2)
    wall: dict[str, list[float]] = {k: [] for k in variants}
    cpu: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(rounds):
        for k, (fn, model, state) in variants.items():
            w, c = _time(fn, model, state, x, y, steps)
            wall[k].append(w)
            cpu[k].append(c)
    med = {k: statistics.median(v) for k, v in wall.items()}
    medc = {k: statistics.median(v) for k, v in cpu.items()}
    print(f"\n{label}: batch {cfg.batch_size}, width {cfg.width}, depth {cfg.depth}, "
          f"median of {rounds} rounds x {steps} steps")
    print(f"{'variant':<14}{'wall ms/step':>14}{'ratio':>8}{'cpu ms/step':>14}{'ratio':>8}")
    for k in med:
        print(f"{k:<14}{1e3 * med[k]:>14.2f}{med[k] / med['plain']:>8.2f}"
              f"{1e3 * medc[k]:>14.2f}{medc[k] / medc['plain']:>8.2f}")
    return med


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=20)
    a = ap.parse_args()
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; {np.__name__} {np.__version__}")
    bench("residual MLP, mnist1d", TrainConfig(model="mlp", data="mnist1d", width=128, depth=4, batch_size=64,
                                               n_train=512, n_test=64), a.rounds, a.steps)
    try:
        vit = TrainConfig(model="vit", data="fashion_mnist", width=64, depth=2, heads=4, patch=7, batch_size=64,
                          n_train=512, n_test=64)
        load_dataset("fashion_mnist", seed=0, n_train=64, n_test=64)
        bench("ViT (16 tokens of 7x7), Fashion-MNIST", vit, a.rounds, a.steps)
    except (FileNotFoundError, ValueError) as e:
        print(f"\nViT skipped ({e}); byte LM instead")
        bench("byte LM, seq 32", TrainConfig(model="lm", data="text", width=64, depth=2, heads=4, seq_len=32,
                                             batch_size=32), a.rounds, a.steps)


if __name__ == "__main__":
    main()
