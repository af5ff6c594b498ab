"""Cost of the monitors on a Flax NNX model: the user's own NNX training step with
``gradsparse.nnx.value_and_grad`` (probes + SPEC 2.1-2.6 metrics) vs the same step with plain
``nnx.value_and_grad``.

Models (written as an NNX user would, nothing from gradsparse inside): a residual LN-MLP on
mnist1d (width 512, depth 4, batch 64, as bench_monitors) and a pre-LN causal byte Transformer
(width 128, 2 blocks, 4 heads, seq 32, batch 16). SGD; both steps run on their own copy of the
model and optimizer, interleaved, in two jit styles:

- ``nnx.jit``: what the NNX guides write (``@nnx.jit def train_step(model, optimizer, x, y)``);
  it pays the same Python graph traversal per call on both sides.
- ``jax.jit`` over ``nnx.split`` state (the NNX "functional" style): almost no per-call Python
  work, so the ratio is the device-side cost of the probes and metrics.

Printed ratios (medians, warm-up excluded): ``nnx_monitor_overhead_{model}_{style}`` =
t(step with monitors) / t(plain step); target <= 1.15. The note adds the ratio of the fastest
repeats (``min_ratio``). ``nnx_monitor_cpu_time_{model}_{style}``: the same ratio of the CPU time
the process spends per step (``time.process_time``), which other processes on a shared machine
disturb much less than wall time.
"""

from __future__ import annotations

import math
import statistics
import time

import common  # noqa: F401  (puts the checkout on sys.path)

from common import header, interleaved_medians, mnist1d_batch, quick, report, skip

try:
    import optax
    from flax import nnx
except ModuleNotFoundError as e:  # the optional extra
    skip("nnx_monitor_overhead", f"optional dependency {e.name} is not installed (pip install 'gradsparse[flax]')")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from gradsparse import nnx as gsnnx  # noqa: E402

TARGET = "<= 1.15"


class MLP(nnx.Module):
    def __init__(self, d, n, rngs):
        self.fc1 = nnx.Linear(d, n, rngs=rngs)
        self.fc2 = nnx.Linear(n, d, rngs=rngs)

    def __call__(self, x):
        return self.fc2(nnx.relu(self.fc1(x)))


class Block(nnx.Module):
    def __init__(self, d, n, rngs):
        self.ln = nnx.LayerNorm(d, rngs=rngs)
        self.mlp = MLP(d, n, rngs)

    def __call__(self, h):
        return self.mlp(self.ln(h))


class ResidualMLP(nnx.Module):
    def __init__(self, d_in, d, depth, classes, rngs):
        self.inp = nnx.Linear(d_in, d, rngs=rngs)
        self.blocks = nnx.List([Block(d, 4 * d, rngs) for _ in range(depth)])
        self.ln = nnx.LayerNorm(d, rngs=rngs)
        self.head = nnx.Linear(d, classes, rngs=rngs)

    def __call__(self, x):
        h = self.inp(x)
        for b in self.blocks:
            h = h + b(h)
        return self.head(self.ln(h))


class Attention(nnx.Module):
    def __init__(self, d, heads, rngs):
        self.qkv = nnx.Linear(d, 3 * d, rngs=rngs)
        self.out = nnx.Linear(d, d, rngs=rngs)
        self.heads = heads

    def __call__(self, h):
        b, t, d = h.shape
        e = d // self.heads
        q, k, v = self.qkv(h).reshape(b, t, 3, self.heads, e).transpose(2, 0, 3, 1, 4)
        s = jnp.einsum("bhte,bhse->bhts", q, k) / math.sqrt(e)
        s = jnp.where(jnp.tril(jnp.ones((t, t), bool)), s, jnp.finfo(s.dtype).min)
        o = jnp.einsum("bhts,bhse->bhte", jax.nn.softmax(s, axis=-1), v)
        return self.out(o.transpose(0, 2, 1, 3).reshape(b, t, d))


class TBlock(nnx.Module):
    def __init__(self, d, heads, rngs):
        self.ln1, self.attn = nnx.LayerNorm(d, rngs=rngs), Attention(d, heads, rngs)
        self.ln2, self.mlp = nnx.LayerNorm(d, rngs=rngs), MLP(d, 4 * d, rngs)

    def __call__(self, h):
        h = h + self.attn(self.ln1(h))
        return h + self.mlp(self.ln2(h))


class ByteLM(nnx.Module):
    def __init__(self, seq, d, depth, heads, rngs):
        self.embed = nnx.Embed(256, d, rngs=rngs)
        self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (seq, d)))
        self.blocks = nnx.List([TBlock(d, heads, rngs) for _ in range(depth)])
        self.ln = nnx.LayerNorm(d, rngs=rngs)
        self.head = nnx.Linear(d, 256, rngs=rngs)

    def __call__(self, x):
        h = self.embed(x) + self.pos[...][None]
        for b in self.blocks:
            h = b(h)
        return self.head(self.ln(h))


def loss_fn(model, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


def steps(sites, style):
    """(plain step, monitored step) with signature (state, x, y) -> state: each advances its own copy."""
    vg = gsnnx.value_and_grad(loss_fn, sites)

    def plain(model, opt, x, y):
        loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
        opt.update(model, grads)
        return loss

    def monitored(model, opt, x, y):
        loss, grads, metrics = vg(model, x, y)
        opt.update(model, grads)
        return loss, metrics

    if style == "nnx_jit":
        return nnx.jit(plain), nnx.jit(monitored)

    def functional(body):
        def run(graphdef, state, x, y):
            model, opt = nnx.merge(graphdef, state)
            out = body(model, opt, x, y)
            return nnx.state((model, opt)), out
        return jax.jit(run, static_argnums=0)

    return functional(plain), functional(monitored)


def cpu_time_medians(fns, repeats, number=5):
    """Median CPU seconds (this process, all threads: time.process_time) per call, interleaved like
    common.interleaved_medians (which the wall-clock ratios use; 2 warm-up rounds here). Other
    processes on a shared machine slow wall time down but hardly change the CPU time a step needs."""
    names = list(fns)
    for _ in range(2):
        for n in names:
            jax.block_until_ready(fns[n]())
    times = {n: [] for n in names}
    for r in range(repeats):
        for n in (names if r % 2 == 0 else names[::-1]):
            t0 = time.process_time()
            for _ in range(number):
                out = fns[n]()
            jax.block_until_ready(out)
            times[n].append((time.process_time() - t0) / number)
    return {n: statistics.median(v) for n, v in times.items()}


def bench(tag, make_model, x, y, repeats):
    model = make_model()
    sites = gsnnx.find_mlp_blocks(model, x[:2])
    plain_model, mon_model = nnx.clone(model), gsnnx.instrument(nnx.clone(model), sites)
    tx = optax.sgd(1e-2)
    for style in ("nnx_jit", "jax_jit"):
        f_plain, f_mon = steps(sites, style)
        pair = {"plain": (nnx.clone(plain_model), f_plain), "monitors": (nnx.clone(mon_model), f_mon)}
        fns = {}
        for k, (m, f) in pair.items():
            opt = nnx.Optimizer(m, tx, wrt=nnx.Param)
            if style == "nnx_jit":
                fns[k] = (lambda m=m, opt=opt, f=f: f(m, opt, x, y))
            else:
                gd, st = nnx.split((m, opt))
                box = {"state": st}

                def run(gd=gd, box=box, f=f):
                    box["state"], out = f(gd, box["state"], x, y)
                    return out
                fns[k] = run
        t = interleaved_medians(fns, repeats=repeats, warmup=3, number=5)
        on, off = t["monitors"]["median"], t["plain"]["median"]
        best = t["monitors"]["min"] / t["plain"]["min"]
        report(f"nnx_monitor_overhead_{tag}_{style}", on / off, target=TARGET,
               note=f"{on * 1e3:.2f} ms vs {off * 1e3:.2f} ms per step ({len(sites)} blocks, median of "
                    f"{t['plain']['repeats']}); ratio of the fastest repeats {best:.3f}", min_ratio=best)
        c = cpu_time_medians(fns, repeats)
        report(f"nnx_monitor_cpu_time_{tag}_{style}", c["monitors"] / c["plain"], target=TARGET,
               note=f"CPU time {c['monitors'] * 1e3:.2f} ms vs {c['plain'] * 1e3:.2f} ms per step")


def main() -> None:
    header("bench_nnx: a Flax NNX training step with gradsparse's monitors vs without")
    repeats = 7 if quick() else 25
    xb, yb, _ = mnist1d_batch(64)
    bench("mlp_w512_d4_b64", lambda: ResidualMLP(40, 512, 4, 10, nnx.Rngs(0)), jnp.asarray(xb), jnp.asarray(yb),
          repeats)
    tok = np.random.default_rng(0).integers(0, 256, (16, 33))
    bench("lm_w128_d2_b16_t32", lambda: ByteLM(32, 128, 2, 4, nnx.Rngs(0)), jnp.asarray(tok[:, :-1], jnp.int32),
          jnp.asarray(tok[:, 1:], jnp.int32), repeats)


if __name__ == "__main__":
    main()
