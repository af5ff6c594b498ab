"""Covariance tracking (SPEC 3.3, ``--track-covariance``): step with the accumulators vs the plain step.

The accumulators are updated INSIDE the jitted step from the same forward/backward pass as the
optimizer update (no second pass). Their floor is the outer products: per block and step,
C_x += X^T X costs 2 B d^2 flops and C_g += G^T G costs 2 B n^2 (B = batch x tokens); a symmetric
rank-B update (syrk) would halve that. The step itself costs about 6 x params x B flops. Reported:
the measured ratio (step with accumulators / plain step, both without monitors, interleaved in
one run) beside the floor ratio 1 + (accumulator flops) / (step flops): with n = 4d the n x n
outer products alone cost about 2/3 of a training step, so the floor is about 1.7x.

    python benchmarks/bench_covariance.py
"""

from __future__ import annotations

import common  # noqa: F401  (puts the checkout on sys.path)

import equinox as eqx
import jax
import jax.numpy as jnp

from common import header, interleaved_medians, mnist1d_batch, quick, report
from gradsparse.config import TrainConfig
from gradsparse.data import DataInfo
from gradsparse.factory import build, init_state, make_accumulator, make_optimizer
from gradsparse.step import make_train_step


def bench(width: int, depth: int, batch: int, ds, repeats: int) -> None:
    cfg = TrainConfig(width=width, depth=depth, batch_size=batch, optimizer="sgd", lr=0.1, weight_decay=1e-3)
    built = build(cfg, DataInfo.of(ds), jax.random.key(0))
    opt = make_optimizer(cfg)
    acc = make_accumulator(cfg.replace(track_covariance=True), built.model)
    states = {"plain": init_state(cfg, built, opt), "covariance": init_state(cfg, built, opt, acc)}
    steps = {"plain": make_train_step(opt, built.trainable, built.projections, monitors=False),
             "covariance": make_train_step(opt, built.trainable, built.projections, monitors=False, accumulator=acc)}
    x, y = jnp.asarray(ds.x_train[:batch]), jnp.asarray(ds.y_train[:batch])
    key, s = jax.random.key(1), jnp.asarray(0, jnp.int32)
    cur = {k: [built.model, states[k]] for k in steps}

    def runner(k):
        def f():
            m, st, metrics, finite = steps[k](cur[k][0], cur[k][1], x, y, key, s)
            cur[k][0], cur[k][1] = m, st
            return st, finite
        return f

    t = interleaved_medians({k: runner(k) for k in steps}, repeats=repeats, warmup=3, number=5)
    plain, cov = t["plain"]["median"], t["covariance"]["median"]
    n_params = sum(int(a.size) for a in jax.tree_util.tree_leaves(eqx.filter(built.model, eqx.is_array)))
    n = cfg.mlp_ratio * width
    acc_flops = depth * 2 * batch * (width**2 + n**2)
    step_flops = 6 * n_params * batch
    floor = 1 + acc_flops / step_flops
    print(f"  width {width} depth {depth} batch {batch}: plain {plain * 1e3:.3f} ms, with accumulators "
          f"{cov * 1e3:.3f} ms; accumulator flops {acc_flops / 1e6:.1f} M vs step {step_flops / 1e6:.1f} M "
          f"(floor {floor:.3f}x; symmetric rank-B update: {1 + acc_flops / 2 / step_flops:.3f}x)")
    report(f"covariance_tracking_w{width}", cov / plain,
           note=f"FLOP floor {floor:.3f}x (syrk {1 + acc_flops / 2 / step_flops:.3f}x), measured/floor "
                f"{cov / plain / floor:.2f}; {cov * 1e3:.2f} ms vs {plain * 1e3:.2f} ms per step", floor=round(floor, 4))


def main() -> None:
    header("bench_covariance: training step with the SPEC 3.3 accumulators vs without")
    _, _, ds = mnist1d_batch(64)
    repeats = 7 if quick() else 25
    for width in (128, 512):
        bench(width, 4, 64, ds, repeats)


if __name__ == "__main__":
    main()
