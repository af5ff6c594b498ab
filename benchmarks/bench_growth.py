"""How the training step's cost grows with the model and the batch, measured against the machine's limit.

Sweeps (plain step = no monitors; monitored = the SPEC 2.1-2.6 monitors in the step; plain SGD,
lr 0.05, unless a preset says otherwise):

- width 64..1024 of the residual LN-MLP (depth 4, batch 64, mlp_ratio 4, 40 inputs, 10 classes);
- depth 1..8 (width 256, batch 64); the sizes fixed in one sweep are the same in the others;
- batch 16..512 (width 256, depth 4);
- sequence length 16..128 of the byte Transformer (``ByteLM``: width 128, depth 4, 4 heads, batch 16);
- the theory checks' presets (theory_checks/context.py: BASE quick/full, SGD quick/full, LM quick/full)
  with their own optimizer, width, depth, batch and sequence length.

Every row times the plain step, the monitored step and one jitted f32 2048^2 matmul INTERLEAVED
(``common.interleaved_medians``), so the achieved GFLOP/s of the step (FLOPs of
``common.step_flops``: 6 x dense weights x tokens plus 12 B T^2 d per attention layer) and the
matmul's GFLOP/s ("peak") are measured at the same moment, under the same load. The ratio
achieved / peak rises while fixed per-step costs (dispatch, per-kernel launch, small elementwise
kernels) dominate and levels off once the matmuls do: the "overhead regime" ends at the first size
of a sweep whose ratio reaches 90% of the sweep's largest ratio (``growth_overhead_end_{sweep}``).

Printed: a markdown table (one row per size, load beside each row) and ``BENCH`` rows
``growth_{sweep}_{size}`` (value: achieved / peak of the plain step; note: both step times, GFLOP/s).
GRADSPARSE_BENCH_QUICK=1: tiny sizes, a 256^2 matmul and 2 repeats (a smoke test, not a measurement).
"""

from __future__ import annotations

import common  # noqa: F401  (puts the checkout on sys.path)

import os
from dataclasses import dataclass
from typing import Any

from common import header, interleaved_medians, load_average, peak_matmul, quick, report, step_flops

#: fraction of a sweep's largest achieved/peak that marks the end of the overhead regime
LEVEL = 0.9


@dataclass(frozen=True)
class Row:
    """One measured configuration."""

    sweep: str
    size: int
    label: str
    cfg: dict[str, Any]


def label(c: dict[str, Any]) -> str:
    """Short name of a configuration, e.g. ``mlp w256 d4 B64 sgd`` or ``lm w128 d4 T64 B16 adam``."""
    seq = f" T{c['seq_len']}" if c["model"] == "lm" else ""
    return f"{c['model']} w{c['width']} d{c['depth']}{seq} B{c['batch_size']} {c['optimizer']}"


def sweeps(is_quick: bool) -> list[Row]:
    """The configurations to time, grouped by sweep (sizes ascending within a sweep)."""
    mlp = dict(model="mlp", data="mnist1d", mlp_ratio=4, optimizer="sgd", lr=0.05)
    if is_quick:  # a smoke test of the script: tiny sizes, one block
        widths, depths, batches, seqs = (16, 32), (1, 2), (8, 16), (8, 16)
        w_fix, d_fix, b_fix, lm = 16, 1, 8, dict(width=16, depth=1, heads=2, batch_size=4)
    else:
        widths, depths, batches, seqs = (64, 128, 256, 512, 1024), (1, 2, 4, 8), (16, 32, 64, 128, 256, 512), \
            (16, 32, 64, 128)
        w_fix, d_fix, b_fix, lm = 256, 4, 64, dict(width=128, depth=4, heads=4, batch_size=16)
    cfgs = [("width", w, {**mlp, "width": w, "depth": d_fix, "batch_size": b_fix}) for w in widths]
    cfgs += [("depth", d, {**mlp, "width": w_fix, "depth": d, "batch_size": b_fix}) for d in depths]
    cfgs += [("batch", b, {**mlp, "width": w_fix, "depth": d_fix, "batch_size": b}) for b in batches]
    cfgs += [("seq", t, dict(model="lm", data="text", mlp_ratio=4, optimizer="sgd", lr=0.05, seq_len=t, **lm))
             for t in seqs]
    rows = [Row(sw, size, label(c), c) for sw, size, c in cfgs]
    if not is_quick:
        rows += preset_rows()
    return rows


def preset_rows() -> list[Row]:
    """The theory checks' baselines (sizes and optimizers of theory_checks/context.py)."""
    from theory_checks.context import BASE, LM, SGD

    keep = ("model", "data", "width", "depth", "heads", "seq_len", "mlp_ratio", "optimizer", "lr", "batch_size")
    out = []
    for family, table in (("BASE", BASE), ("SGD", SGD), ("LM", LM)):
        for preset in ("quick", "full"):
            c = {k: v for k, v in table[preset].items() if k in keep}
            out.append(Row("preset", len(out), f"{family} {preset}: {label(c)}", c))
    return out


def _inputs(cfg: Any, rng: Any) -> tuple[Any, Any, Any]:
    """(DataInfo, x, y) of random inputs shaped like the run's data (no dataset is loaded)."""
    import jax.numpy as jnp
    import numpy as np

    from gradsparse.data import DataInfo

    b = cfg.batch_size
    if cfg.model == "lm":
        info = DataInfo("text", (cfg.seq_len,), 256)
        x = rng.integers(0, 256, (b, cfg.seq_len)).astype(np.int32)
        y = rng.integers(0, 256, (b, cfg.seq_len)).astype(np.int32)
    else:
        info = DataInfo("vector", (40,), 10)
        x = rng.standard_normal((b, 40)).astype(np.float32)
        y = rng.integers(0, 10, (b,)).astype(np.int32)
    return info, jnp.asarray(x), jnp.asarray(y)


def time_row(row: Row, repeats: int, mm_n: int) -> dict[str, Any]:
    """Interleaved medians of the plain step, the monitored step and the reference matmul."""
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import numpy as np

    from gradsparse.config import TrainConfig
    from gradsparse.factory import build, init_state, make_optimizer
    from gradsparse.step import make_train_step

    cfg = TrainConfig(**row.cfg).validate()
    info, x, y = _inputs(cfg, np.random.default_rng(0))
    built = build(cfg, info, jax.random.key(0))
    opt = make_optimizer(cfg)
    key, s = jax.random.key(1), jnp.asarray(0, jnp.int32)
    fns: dict[str, Any] = {}
    for name, mon in (("plain", False), ("monitored", True)):
        step = make_train_step(opt, built.trainable, built.projections, monitors=mon)
        st = [built.model, init_state(cfg, built, opt)]

        def run(step=step, st=st):
            m, o, met, fin = step(st[0], st[1], x, y, key, s)
            st[0], st[1] = m, o
            return met, fin
        fns[name] = run
    fns["matmul"], mm_flops = peak_matmul(mm_n)
    flops = step_flops(built.model, cfg.batch_size)
    big = flops > 2e9
    t = interleaved_medians(fns, repeats=repeats, warmup=2, number=1 if big else 3)
    peak = mm_flops / t["matmul"]["median"] / 1e9
    n_params = sum(int(a.size) for a in jax.tree_util.tree_leaves(eqx.filter(built.model, eqx.is_array)))
    out = {"row": row, "params": n_params, "flops": flops, "peak": peak, "load": load_average()}
    for k in ("plain", "monitored"):
        out[f"{k}_ms"] = t[k]["median"] * 1e3
        out[f"{k}_gflops"] = flops / t[k]["median"] / 1e9
        out[f"{k}_ratio"] = out[f"{k}_gflops"] / peak
    return out


def overhead_end(results: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The first result of a sweep whose plain achieved/peak reaches LEVEL x the sweep's largest."""
    if not results:
        return None
    top = max(r["plain_ratio"] for r in results)
    return next(r for r in results if r["plain_ratio"] >= LEVEL * top)


def markdown(results: list[dict[str, Any]]) -> str:
    """The table: one row per configuration."""
    lines = ["| configuration | params | GFLOP/step | plain ms | monitored ms | mon/plain | plain GFLOP/s | "
             "peak GFLOP/s | plain / peak | monitored / peak | load |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        lines.append(f"| {r['row'].label} | {r['params']:,} | {r['flops'] / 1e9:.3f} | {r['plain_ms']:.2f} | "
                     f"{r['monitored_ms']:.2f} | {r['monitored_ms'] / r['plain_ms']:.2f} | {r['plain_gflops']:.1f} | "
                     f"{r['peak']:.1f} | {r['plain_ratio']:.2f} | {r['monitored_ratio']:.2f} | {r['load']} |")
    return "\n".join(lines)


def main() -> None:
    header("bench_growth: step time and achieved/peak GFLOP/s vs width, depth, batch, sequence length")
    is_quick = quick()
    repeats, mm_n = (2, 256) if is_quick else (int(os.environ.get("GRADSPARSE_BENCH_GROWTH_REPEATS", "7")), 2048)
    only = os.environ.get("GRADSPARSE_BENCH_GROWTH_SWEEPS")  # e.g. "width,preset": a subset of the sweeps
    rows = [r for r in sweeps(is_quick) if not only or r.sweep in only.split(",")]
    print(f"  FLOPs: 6 x dense weights x tokens + 12 B T^2 d per attention layer; peak: jitted f32 {mm_n}^2 "
          f"matmul in the same interleaved run; {repeats} repeats", flush=True)
    results = []
    for row in rows:
        r = time_row(row, repeats, mm_n)
        results.append(r)
        print(f"  {row.label}: plain {r['plain_ms']:.2f} ms, monitored {r['monitored_ms']:.2f} ms, "
              f"plain/peak {r['plain_ratio']:.2f} (peak {r['peak']:.1f} GFLOP/s, load {r['load']})", flush=True)
        report(f"growth_{row.sweep}_{row.size}" if row.sweep != "preset" else f"growth_preset_{row.size}",
               r["plain_ratio"], unit="",
               note=f"{row.label}: plain {r['plain_ms']:.2f} ms ({r['plain_gflops']:.1f} GFLOP/s), monitored "
                    f"{r['monitored_ms']:.2f} ms ({r['monitored_ratio']:.2f} of peak); peak {r['peak']:.1f} GFLOP/s")
    print()
    print(markdown(results))
    print()
    for sweep in ("width", "depth", "batch", "seq"):
        got = [r for r in results if r["row"].sweep == sweep]
        end = overhead_end(got)
        if end is None:
            continue
        report(f"growth_overhead_end_{sweep}", end["row"].size, unit="",
               note=f"first {sweep} whose plain achieved/peak ({end['plain_ratio']:.2f}) reaches {LEVEL:g} x the "
                    f"sweep's largest ({max(r['plain_ratio'] for r in got):.2f}): {end['row'].label}")


if __name__ == "__main__":
    main()
