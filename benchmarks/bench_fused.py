"""Fused plain steps (one ``lax.scan``) vs single jitted steps, and seeds trained together (vmap).

Models: the residual LN-MLP on mnist1d at the check presets' sizes and at width 512, and the byte
LM of the LM checks (width 32 x 2 blocks, seq 32), each as ``gradsparse.factory.build`` makes it.

Printed ratios (medians of interleaved repeats, per model-step, warm-up excluded, one run):
- ``fused_vs_single_{tag}`` = t(k single steps, each ``make_train_step``'s jitted call with a host
  sync on its finiteness flag, as training did before fusion) / t(one ``make_train_chunk`` call of k
  steps); the training loop fuses by default (``TrainConfig.fuse_steps``). Target >= 1 (fusing
  must never lose).
- ``vmap_seeds_vs_sequential_{tag}`` = t(S fused chunks, one seed after the other) / t(one
  fused chunk vmapped over S seeds), S = 3 (the quick preset's seeds); with ``vmap_max_diff_{tag}``,
  the largest parameter difference between the vmapped and the sequential seed 0. This ratio is
  what :func:`gradsparse.train_seeds.worth_vmapping` encodes: the checks' context trains a config's
  seeds together (``gradsparse check --vmap-seeds auto``) at the sizes where it was clearly above 1
  on a 2-core CPU (the MLP at width 64, the byte LM at width 32), and on any accelerator.
"""

from __future__ import annotations

import common  # noqa: F401  (puts the checkout on sys.path)

import jax
import jax.numpy as jnp
import numpy as np
import equinox as eqx

from common import block, header, interleaved_medians, quick, report
from gradsparse.config import TrainConfig
from gradsparse.data import Batcher, DataInfo, load_dataset
from gradsparse.factory import RunKeys, build, init_state, make_optimizer
from gradsparse.step import make_train_chunk, make_train_step

K, SEEDS = 16, 3

CASES = {
    "mlp_w64_d2_b64": dict(model="mlp", data="mnist1d", width=64, depth=2, batch_size=64),  # BASE quick
    "mlp_w128_d4_b32_sgd": dict(model="mlp", data="mnist1d", width=128, depth=4, batch_size=32, optimizer="sgd",
                                lr=0.1),  # SGD quick
    "mlp_w512_d4_b64": dict(model="mlp", data="mnist1d", width=512, depth=4, batch_size=64),
    "lm_w32_d2_s32_b32": dict(model="lm", data="text", width=32, depth=2, heads=2, seq_len=32, batch_size=32),  # LM quick
}


def _leaves(tree):
    return jax.tree_util.tree_leaves(eqx.filter(tree, eqx.is_array))


def bench(tag: str, kw: dict, repeats: int) -> None:
    cfg = TrainConfig(steps=1000, **kw)
    ds = load_dataset(cfg.data, seed=0)
    info = DataInfo.of(ds)
    opt = make_optimizer(cfg)
    runs = []
    for seed in range(SEEDS):
        keys = RunKeys.of(seed)
        built = build(cfg, info, keys.model)
        xs, ys = Batcher(ds, keys.data, cfg.batch_size, cfg.seq_len).chunk(0, K)
        runs.append((keys, built, init_state(cfg, built, opt), jnp.asarray(xs), jnp.asarray(ys)))
    keys, built, state, xs, ys = runs[0]
    single = make_train_step(opt, built.trainable, built.projections, monitors=False)
    chunk = make_train_chunk(opt, built.trainable, built.projections)
    zero = jnp.asarray(0, jnp.int32)

    def singles():
        m, st = built.model, state
        for s in range(K):
            m, st, _, finite = single(m, st, xs[s], ys[s], jax.random.fold_in(keys.noise, s), jnp.asarray(s, jnp.int32))
            bool(finite)
        return m

    def fused():
        return chunk(built.model, state, xs, ys, keys.noise, zero)[0]

    def sequential():
        return [chunk(r[1].model, r[2], r[3], r[4], r[0].noise, zero)[0] for r in runs]

    static = eqx.partition(built.model, eqx.is_array)[1]
    stack = lambda *a: jnp.stack(a)  # noqa: E731
    models = jax.tree_util.tree_map(stack, *[eqx.filter(r[1].model, eqx.is_array) for r in runs])
    states = jax.tree_util.tree_map(stack, *[r[2] for r in runs])
    xs_all, ys_all = jnp.stack([r[3] for r in runs]), jnp.stack([r[4] for r in runs])
    noise = jnp.stack([r[0].noise for r in runs])

    @jax.jit
    def vmapped(models, states, xs_all, ys_all, noise):
        def one(m, st, x, y, k):
            return eqx.filter(chunk(eqx.combine(m, static), st, x, y, k, zero)[0], eqx.is_array)
        return jax.vmap(one)(models, states, xs_all, ys_all, noise)

    t = interleaved_medians({"singles": singles, "fused": fused, "sequential": sequential,
                             "vmapped": lambda: vmapped(models, states, xs_all, ys_all, noise)},
                            repeats=repeats, warmup=2, sync=lambda out: block(_leaves(out)))
    per = {n: v["median"] / (K * (SEEDS if n in ("sequential", "vmapped") else 1)) for n, v in t.items()}
    print(f"  {tag}: ms per model-step: single {per['singles'] * 1e3:.3f}, fused {per['fused'] * 1e3:.3f}, "
          f"{SEEDS} seeds sequential {per['sequential'] * 1e3:.3f}, vmapped {per['vmapped'] * 1e3:.3f}")
    report(f"fused_vs_single_{tag}", per["singles"] / per["fused"], target=">= 1",
           note=f"{K} steps per chunk; {per['singles'] * 1e3:.2f} vs {per['fused'] * 1e3:.2f} ms per step")
    report(f"vmap_seeds_vs_sequential_{tag}", per["sequential"] / per["vmapped"],
           note=f"{SEEDS} seeds; {per['sequential'] * 1e3:.2f} vs {per['vmapped'] * 1e3:.2f} ms per model-step")
    vm = vmapped(models, states, xs_all, ys_all, noise)
    diff = max(float(np.max(np.abs(np.asarray(a)[0] - np.asarray(b)))) for a, b in
               zip(jax.tree_util.tree_leaves(vm), _leaves(fused())))
    report(f"vmap_max_diff_{tag}", diff, unit="", note="largest |parameter difference|, vmapped seed 0 vs alone")


def main() -> None:
    header("bench_fused: fused plain steps vs single steps; seeds vmapped vs one after the other")
    repeats = 5 if quick() else 15
    for tag, kw in CASES.items():
        if quick() and "w512" in tag:
            continue
        bench(tag, kw, repeats)


if __name__ == "__main__":
    main()
