"""Shared helpers for the benchmark scripts: timing, machine description, result lines.

Every benchmark measures the things it compares in ONE process run, interleaved
(A, B, A, B, ...) so that drift in machine load hits both sides alike, with warm-up calls
(compilation) excluded and every timed call ended by ``jax.block_until_ready``. A value is the
MEDIAN over the timed repeats. Results are printed as ratios, one per line::

    BENCH {"name": "monitor_overhead_w128", "value": 1.04, "unit": "x", "target": "< 1.10", ...}

``gradsparse bench`` collects those lines into a markdown table. ``skip(name, reason)`` prints a
row that says why a benchmark could not run (a missing optional dependency) and exits 0.
Set GRADSPARSE_BENCH_QUICK=1 (``gradsparse bench --quick``) for fewer repeats and sizes.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python benchmarks/bench_x.py` from a source checkout
    sys.path.insert(0, str(ROOT))

#: prefix of the machine-readable result lines
PREFIX = "BENCH "


def quick() -> bool:
    """True when GRADSPARSE_BENCH_QUICK is set to something other than '' or '0'."""
    return os.environ.get("GRADSPARSE_BENCH_QUICK", "") not in ("", "0")


def cpu_count() -> int:
    """Cores this process may run on (what XLA's CPU thread pool is sized to)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def block(out: Any) -> Any:
    """Wait for every jax array in ``out`` (a pytree); other leaves pass through."""
    import jax

    return jax.block_until_ready(out)


def interleaved_medians(fns: dict[str, Callable[[], Any]], *, repeats: int = 20, warmup: int = 3,
                        number: int = 1, sync: Callable[[Any], Any] = block) -> dict[str, dict[str, float]]:
    """Time each zero-argument ``fn`` in ``fns``: median seconds per call over ``repeats``.

    Each repeat calls every fn ``number`` times in a row (then ``sync`` on the last output) and
    divides by ``number``; the fns take turns within each repeat, in an order that alternates
    between repeats. ``warmup`` untimed rounds first (compilation, caches).
    Returns {name: {"median": s, "min": s, "iqr": s, "repeats": n}}.
    """
    if repeats < 1 or warmup < 0 or number < 1:
        raise ValueError(f"need repeats >= 1, warmup >= 0, number >= 1; got {repeats}, {warmup}, {number}")
    if not fns:
        raise ValueError("nothing to time")
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            sync(fns[n]())
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        order = names if r % 2 == 0 else names[::-1]
        for n in order:
            f = fns[n]
            t0 = time.perf_counter()
            out = None
            for _ in range(number):
                out = f()
            sync(out)
            times[n].append((time.perf_counter() - t0) / number)
    res = {}
    for n, ts in times.items():
        q = statistics.quantiles(ts, n=4) if len(ts) >= 2 else [ts[0]] * 3
        res[n] = {"median": statistics.median(ts), "min": min(ts), "iqr": q[2] - q[0], "repeats": len(ts)}
    return res


def report(name: str, value: float, *, unit: str = "x", target: str | None = None, note: str = "",
           **extra: Any) -> dict[str, Any]:
    """Print one result line (machine-readable, then a readable echo) and return the record.

    ``target`` is a condition on ``value`` such as ``"< 1.10"`` or ``">= 2"``; ``met`` says
    whether the measured value satisfies it.
    """
    rec: dict[str, Any] = {"name": name, "value": float(value), "unit": unit, "load": load_average()}
    if target:
        rec["target"] = target
        rec["met"] = _meets(float(value), target)
    if note:
        rec["note"] = note
    rec.update(extra)
    print(PREFIX + json.dumps(rec), flush=True)
    tgt = f"  (target {target}: {'met' if rec['met'] else 'NOT met'})" if target else ""
    print(f"  {name} = {value:.4g}{unit}{tgt}{'  ' + note if note else ''}", flush=True)
    return rec


def load_average() -> float | None:
    """1-minute load average of the machine (None where unknown): other processes slow timings down."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def skipped(name: str, reason: str) -> None:
    """Print a 'skipped' row for ``name`` saying why."""
    print(PREFIX + json.dumps({"name": name, "skipped": reason}), flush=True)
    print(f"  {name}: skipped ({reason})", flush=True)


def skip(name: str, reason: str) -> None:
    """Print a 'skipped' row for ``name`` with ``reason`` and exit 0."""
    skipped(name, reason)
    raise SystemExit(0)


def _meets(v: float, target: str) -> bool:
    op, _, num = target.strip().partition(" ")
    x = float(num)
    return {"<": v < x, "<=": v <= x, ">": v > x, ">=": v >= x}[op]


def machine() -> dict[str, str]:
    """CPU model, cores, OS, library versions and jax devices (the header of a benchmark table)."""
    from gradsparse.commands.bench import machine_info

    return machine_info()


def header(title: str) -> None:
    """Print the benchmark's title and the machine it runs on."""
    print(f"# {title}", flush=True)
    m = machine()
    print("  machine: " + "; ".join(f"{k}={v}" for k, v in m.items()), flush=True)
    print(f"  load average (1 min) at start: {load_average()} on {cpu_count()} cores", flush=True)
    if quick():
        print("  (quick mode: fewer repeats)", flush=True)


def mnist1d_batch(batch: int, seed: int = 0):
    """(x (batch, 40) float32, y (batch,) int32): the first ``batch`` mnist1d training examples."""
    from gradsparse.data import load_dataset

    ds = load_dataset("mnist1d", seed=seed)
    return ds.x_train[:batch], ds.y_train[:batch], ds


def monitor_step_times(width: int, depth: int, batch: int, ds: Any, *, repeats: int, warmup: int,
                       number: int) -> tuple[dict[str, dict[str, float]], int]:
    """Interleaved medians of the jitted training step with ("on") and without ("off") the monitors.

    Residual LN-MLP of the given size on ``ds`` (mnist1d), both steps from
    ``gradsparse.step.make_train_step`` on the same batch, each advancing its own copy of the training state.
    Returns (``interleaved_medians`` result, number of parameters).
    """
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    from gradsparse.config import TrainConfig
    from gradsparse.data import DataInfo
    from gradsparse.factory import build, make_optimizer
    from gradsparse.step import make_train_step

    cfg = TrainConfig(width=width, depth=depth, batch_size=batch)
    built = build(cfg, DataInfo.of(ds), jax.random.key(0))
    model, trainable = built.model, built.trainable
    n_params = sum(int(a.size) for a in jax.tree_util.tree_leaves(eqx.filter(model, eqx.is_array)))
    opt = make_optimizer(cfg)
    opt_state = opt.init(eqx.filter(model, trainable))
    x, y = jnp.asarray(ds.x_train[:batch]), jnp.asarray(ds.y_train[:batch])
    key, s = jax.random.key(1), jnp.asarray(0, jnp.int32)
    steps = {"on": make_train_step(opt, trainable, monitors=True),
             "off": make_train_step(opt, trainable, monitors=False)}
    state = {k: [model, opt_state] for k in steps}

    def runner(k: str) -> Callable[[], Any]:
        def f() -> Any:
            m, o, metrics, finite = steps[k](state[k][0], state[k][1], x, y, key, s)
            state[k][0], state[k][1] = m, o
            return metrics, finite
        return f

    t = interleaved_medians({k: runner(k) for k in steps}, repeats=repeats, warmup=warmup, number=number)
    return t, n_params


# ---------------------------------------------------------------------------- FLOPs and the machine's limit
def step_flops(model: Any, batch: int) -> int:
    """FLOPs of one training step (forward + backward) of ``model`` on ``batch`` samples, counted
    as the matmuls only:

    - every Dense layer (weight W: out x in) on N = batch x tokens_per_sample tokens:
      6 * in * out * N (forward 2 in out N; backward dL/dx and dL/dW, 2 in out N each). The first
      layer's dL/dx is not needed but is counted anyway (< 0.3% of the MLP's total at width >= 64);
    - every attention layer (model width d, T tokens per sample): scores Q K^T and the weighted sum
      of V, 2 * 2 * batch * T^2 * d forward, twice that backward: 12 * batch * T^2 * d (the causal
      mask is not discounted).

    LayerNorm, activations, softmax, the loss and the optimizer update (O(params + N d)) are left out.
    """
    import jax

    from gradsparse.models.common import Dense
    from gradsparse.models.transformer import Attention

    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    tps = int(getattr(model, "tokens_per_sample", 1))
    n_tok = batch * tps
    total = 0
    for leaf in jax.tree_util.tree_leaves(model, is_leaf=lambda m: isinstance(m, (Dense, Attention))):
        if isinstance(leaf, Attention):
            d = int(leaf.qkv.weight.shape[1])
            total += 12 * batch * tps * tps * d
            leaf_dense = [leaf.qkv, leaf.out]
        elif isinstance(leaf, Dense):
            leaf_dense = [leaf]
        else:
            continue
        for dn in leaf_dense:
            out_f, in_f = (int(s) for s in dn.weight.shape)
            total += 6 * in_f * out_f * n_tok
    return total


def peak_matmul(n: int = 2048) -> tuple[Callable[[], Any], int]:
    """(zero-argument fn, FLOPs) of one jitted f32 (n, n) @ (n, n) matmul: 2 n^3 FLOPs. Timed in
    the same ``interleaved_medians`` call as the steps, it gives the machine's large-matmul GFLOP/s
    at the same moment (same load, same thread setting) as the achieved GFLOP/s it is compared with."""
    import jax

    if n < 1:
        raise ValueError(f"matmul size must be >= 1, got {n}")
    a = jax.random.normal(jax.random.key(0), (n, n), dtype="float32")
    b = jax.random.normal(jax.random.key(1), (n, n), dtype="float32")
    mm = jax.jit(lambda u, v: u @ v)
    return (lambda: mm(a, b)), 2 * n ** 3


def block_matmuls(width: int, depth: int, batch: int, ratio: int = 4) -> Callable[[], Any]:
    """Zero-argument fn running ONLY the matmuls of a training step of ``depth`` MLP blocks
    (d = width, n = ratio x width, N = batch tokens), in the layouts autodiff gives them: per block
    forward z = x K^T, y = a V^T; backward dL/da = gy V, dL/dV = gy^T a, dL/dx = gz K, dL/dK = gz^T x,
    all outputs kept. Its time is what the step's matmuls cost on their own, the floor under the step."""
    import jax
    import jax.numpy as jnp

    if min(width, depth, batch, ratio) < 1:
        raise ValueError(f"sizes must be >= 1, got width={width}, depth={depth}, batch={batch}, ratio={ratio}")
    d, n = width, ratio * width
    ks = jax.random.split(jax.random.key(0), 6)
    x, a, gz = (jax.random.normal(ks[0], (batch, d)), jax.random.normal(ks[1], (batch, n)),
                jax.random.normal(ks[2], (batch, n)))
    gy = jax.random.normal(ks[3], (batch, d))
    K = [jax.random.normal(jax.random.fold_in(ks[4], i), (n, d)) for i in range(depth)]
    V = [jax.random.normal(jax.random.fold_in(ks[5], i), (d, n)) for i in range(depth)]

    @jax.jit
    def run(x, a, gz, gy, K, V):
        out = []
        for k, v in zip(K, V):
            out += [x @ k.T, a @ v.T, gy @ v, gy.T @ a, gz @ k, gz.T @ x]
        return out

    return lambda: run(x, a, gz, gy, K, V)
