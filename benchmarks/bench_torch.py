"""gradsparse (JAX, probes inside one jitted step) vs PyTorch eager with forward/backward hooks.

The PyTorch side gathers the same statistics the way hook-based reference code does: forward
hooks on each MLP block's activation module keep z (its input) and a (its output), a forward hook
on the key layer keeps x, full backward hooks on the activation (grad_output = g = dL/da,
grad_input = eta = dL/dz) and on the value layer (grad_output = g^V = dL/dy) keep the
gradients; after ``loss.backward()`` the SPEC 2.1-2.6 metrics are computed from them with torch
ops, then ``optimizer.step()``. Same residual LN-MLP (LayerNorm eps 1e-5, ReLU, Linear weights
(out, in)), same batch, same optimizer on both sides: plain SGD (lr 0.05, no momentum; the JAX
side sets ``optimizer="sgd"`` explicitly, TrainConfig's default is Adam);
torch.set_num_threads(cores jax uses).

Printed (medians of interleaved repeats, warm-up excluded, one run):
- ``torch_hooks_vs_gradsparse_{W}``: t(torch step with hooks+metrics) / t(gradsparse step with
  monitors); target >= 2.
- ``torch_plain_vs_jax_plain_{W}``: the same without any monitoring on either side (context).
- ``torch_hooks_vs_gradsparse_1thread_{W}``: the first ratio again with ONE thread on both sides
  (a subprocess with XLA's thread pool off and torch.set_num_threads(1)).
- ``roofline_{plain,monitored}_w{W}_b64``: the JAX step's achieved GFLOP/s (FLOPs of
  ``common.step_flops``: 6 x dense weights x batch, matmuls only) / the GFLOP/s of one jitted f32
  2048^2 matmul timed in the SAME interleaved run (same load and threads); target >= 0.6 at w512.
- ``matmul_share_w{W}_b64``: t(the blocks' matmuls alone, ``common.block_matmuls``) / t(JAX step
  with monitors); t(torch with hooks) / t(matmuls alone) in its note is the largest speed-up any
  JAX step built on the same matmul kernels could reach.
- ``torch_metric_max_rel_diff``: both implementations on the SAME weights (copied from the
  equinox model) and batch: the largest relative difference over every continuous metric, and
  ``torch_fraction_max_abs_diff`` over the fraction metrics (sparsities), to a stated tolerance.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import common  # noqa: F401  (puts the checkout on sys.path)

try:
    import torch
    from torch import nn
except ModuleNotFoundError:
    torch = None

from common import (block_matmuls, cpu_count, header, interleaved_medians, mnist1d_batch, peak_matmul, quick, report,
                    skip, step_flops)

NAME = "torch_hooks_vs_gradsparse"
#: set in the child process that repeats the timing with one thread on both sides
ONE_THREAD_ENV = "GRADSPARSE_BENCH_ONE_THREAD"
ONE_THREAD_XLA = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
ACT_TOL = 1e-6
#: plain steps per fused chunk in the fused row (TrainConfig.fuse_steps' default)
FUSED = 16
TAUS = (1e-6, 1e-3)
#: agreement tolerances for the value check
REL_TOL, FRAC_TOL = 1e-4, 1e-3


# ---------------------------------------------------------------------------- the torch model
def _torch_classes():
    class Block(nn.Module):
        def __init__(self, d: int, n: int):
            super().__init__()
            self.ln = nn.LayerNorm(d, eps=1e-5)
            self.key = nn.Linear(d, n)
            self.act = nn.ReLU()
            self.value = nn.Linear(n, d)

        def forward(self, h):
            return self.value(self.act(self.key(self.ln(h))))

    class ResMLP(nn.Module):
        def __init__(self, d_in: int, width: int, depth: int, ratio: int, classes: int):
            super().__init__()
            self.inp = nn.Linear(d_in, width)
            self.blocks = nn.ModuleList([Block(width, ratio * width) for _ in range(depth)])
            self.final_ln = nn.LayerNorm(width, eps=1e-5)
            self.head = nn.Linear(width, classes)

        def forward(self, x):
            h = self.inp(x.reshape(x.shape[0], -1))
            for b in self.blocks:
                h = h + b(h)
            return self.head(self.final_ln(h))

    return ResMLP


class Recorder:
    """Hooks on every block: x (key input), z, a (activation in/out), g, eta, gV (backward)."""

    def __init__(self, model):
        self.store = [dict() for _ in model.blocks]
        for s, b in zip(self.store, model.blocks):
            b.key.register_forward_hook(self._fwd_key(s))
            b.act.register_forward_hook(self._fwd_act(s))
            b.act.register_full_backward_hook(self._bwd_act(s))
            b.value.register_full_backward_hook(self._bwd_value(s))

    @staticmethod
    def _fwd_key(s):
        def hook(mod, inp, out):
            s["x"] = inp[0].detach()
        return hook

    @staticmethod
    def _fwd_act(s):
        def hook(mod, inp, out):
            s["z"], s["a"] = inp[0].detach(), out.detach()
        return hook

    @staticmethod
    def _bwd_act(s):
        def hook(mod, grad_in, grad_out):
            s["g"], s["eta"] = grad_out[0].detach(), grad_in[0].detach()
        return hook

    @staticmethod
    def _bwd_value(s):
        def hook(mod, grad_in, grad_out):
            s["gV"] = grad_out[0].detach()
        return hook


def _grad_sparsity(v, prefix):
    av = v.abs()
    rms = torch.sqrt(torch.mean(v * v))
    out = {}
    for tau in TAUS:
        frac = torch.mean((av < tau * rms).float())
        out[f"{prefix}_sparse_{tau:g}"] = torch.where(rms > 0, frac, torch.ones_like(frac))
    out[f"{prefix}_zero"] = torch.mean((v == 0).float())
    out[f"{prefix}_l1"] = torch.mean(av.sum(-1))
    out[f"{prefix}_l2sq"] = torch.mean((v * v).sum(-1))
    return out


def torch_layer_metrics(s, K, num_samples):
    """SPEC 2.1-2.6 for one block from the hooked tensors (ReLU: sigma' = 1[z > 0])."""
    x, z, a, g, eta, gV = s["x"], s["z"], s["a"], s["g"], s["eta"], s["gV"]
    sp = torch.mean((a.abs() <= ACT_TOL).float())
    d = (z > 0).float()
    out = {"act_sparsity": sp, "density": 1.0 - sp, "deriv_sparsity": torch.mean((z <= 0).float()),
           "dsigma_sq": torch.mean(d * d)}
    out.update(_grad_sparsity(eta, "eta"))
    out.update(_grad_sparsity(g, "g"))
    xsq = (x * x).sum(-1)
    out["af_k"] = torch.sum((eta * eta).sum(-1) * xsq) / num_samples
    out["af_v"] = torch.sum((gV * gV).sum(-1) * (a * a).sum(-1)) / num_samples
    w = d * d
    lhs = w.sum(-1)
    wg = (w * g * g).sum(-1)
    valid = (lhs > 0) & (wg > 0) & (xsq > 0)
    one = torch.ones_like(lhs)
    sl, sx, sw = torch.where(valid, lhs, one), torch.where(valid, xsq, one), torch.where(valid, wg, one)
    rhs = (eta * eta).sum(-1) * xsq / (sx * sw / sl)
    cnt = valid.sum().clamp(min=1)
    out["identity_lhs"] = torch.where(valid, lhs, 0 * lhs).sum() / cnt
    out["identity_rhs"] = torch.where(valid, rhs, 0 * rhs).sum() / cnt
    out["identity_relerr"] = torch.where(valid, (lhs - rhs).abs() / sl, 0 * lhs).max()
    out["gv_norm"] = torch.mean(torch.sqrt((gV * gV).sum(-1)))
    out["k_fro2"] = torch.sum(K * K)
    out["x_sq"] = torch.mean(xsq)
    return out


def make_torch_step(model, rec, opt, xt, yt, monitors: bool):
    def step():
        opt.zero_grad(set_to_none=True)
        logits = model(xt)
        loss = nn.functional.cross_entropy(logits, yt)
        loss.backward()
        with torch.no_grad():
            metrics = {"loss": loss.detach(), "accuracy": (logits.argmax(-1) == yt).float().mean(),
                       "grad_norm": torch.sqrt(sum((p.grad * p.grad).sum() for p in model.parameters()))}
            if monitors:
                per = [torch_layer_metrics(s, b.key.weight, xt.shape[0]) for s, b in zip(rec.store, model.blocks)]
                metrics["layers"] = {k: torch.stack([p[k] for p in per]) for k in per[0]}
        opt.step()
        return metrics
    return step


def copy_weights(eqx_model, tmodel) -> None:
    """Equinox Dense (out, in) weights and LayerNorm affine -> torch, exactly."""
    import numpy as np

    def put(tparam, arr):
        tparam.data.copy_(torch.from_numpy(np.array(arr, dtype=np.float32)))

    with torch.no_grad():
        put(tmodel.inp.weight, eqx_model.inp.weight)
        put(tmodel.inp.bias, eqx_model.inp.bias)
        for tb, eb in zip(tmodel.blocks, eqx_model.blocks):
            put(tb.ln.weight, eb.ln.weight)
            put(tb.ln.bias, eb.ln.bias)
            put(tb.key.weight, eb.key.weight)
            put(tb.key.bias, eb.key.bias)
            put(tb.value.weight, eb.value.weight)
            put(tb.value.bias, eb.value.bias)
        put(tmodel.final_ln.weight, eqx_model.final_ln.weight)
        put(tmodel.final_ln.bias, eqx_model.final_ln.bias)
        put(tmodel.head.weight, eqx_model.head.weight)
        put(tmodel.head.bias, eqx_model.head.bias)


# ---------------------------------------------------------------------------- the comparison
def main() -> None:
    one = os.environ.get(ONE_THREAD_ENV) == "1"
    if not one:
        header("bench_torch: gradsparse (jitted step with monitors) vs PyTorch eager with hooks")
    if torch is None:
        skip(NAME, "optional dependency 'torch' is not installed (pip install torch==2.13.0, CPU)")
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import numpy as np

    from gradsparse.config import TrainConfig
    from gradsparse.data import DataInfo
    from gradsparse.factory import build, make_optimizer
    from gradsparse.step import make_train_chunk, make_train_step

    cores = 1 if one else cpu_count()
    torch.set_num_threads(cores)
    print(f"  threads: torch {torch.get_num_threads()}, XLA CPU {'1 thread' if one else f'pool of {cores} cores'}; "
          f"torch {torch.__version__}", flush=True)
    batch, depth = 64, 4
    _, _, ds = mnist1d_batch(batch)
    x_np, y_np = ds.x_train[:batch], ds.y_train[:batch]
    ResMLP = _torch_classes()
    repeats = 7 if quick() else 25
    for width in (128, 512):
        cfg = TrainConfig(width=width, depth=depth, batch_size=batch, lr=0.05, optimizer="sgd")
        built = build(cfg, DataInfo.of(ds), jax.random.key(0))
        model, trainable = built.model, built.trainable
        opt = make_optimizer(cfg)
        opt_state = opt.init(eqx.filter(model, trainable))
        x, y = jnp.asarray(x_np), jnp.asarray(y_np)
        key, s = jax.random.key(1), jnp.asarray(0, jnp.int32)
        j_steps = {"jax_mon": make_train_step(opt, trainable, monitors=True)}
        kinds = ("torch_mon",)
        if not one:
            j_steps["jax_plain"] = make_train_step(opt, trainable, monitors=False)
            kinds = ("torch_mon", "torch_plain")
        t_models = {}
        for kind in kinds:
            tm = ResMLP(int(np.prod(ds.x_train.shape[1:])), width, depth, cfg.mlp_ratio, ds.num_classes)
            copy_weights(model, tm)
            rec = Recorder(tm) if kind == "torch_mon" else None
            t_models[kind] = (tm, rec, torch.optim.SGD(tm.parameters(), lr=cfg.lr))
        xt, yt = torch.from_numpy(np.array(x_np)), torch.from_numpy(np.array(y_np)).long()

        if width == 128 and not one:  # same weights, same batch: metrics before the first update
            jm = j_steps["jax_mon"](model, opt_state, x, y, key, s)[2]
            tm, rec, topt = t_models["torch_mon"]
            ref = copy.deepcopy(tm.state_dict())
            tmet = make_torch_step(tm, rec, topt, xt, yt, True)()
            tm.load_state_dict(ref)  # undo the update for the timing runs
            compare(jm, tmet, batch * cfg.mlp_ratio * width)

        state = {k: [model, opt_state] for k in j_steps}

        def jrun(k):
            def f():
                m, o, met, fin = j_steps[k](state[k][0], state[k][1], x, y, key, s)
                state[k][0], state[k][1] = m, o
                return met, fin
            return f

        fns = {k: jrun(k) for k in j_steps}
        chunk = make_train_chunk(opt, trainable)
        xs, ys = jnp.stack([x] * FUSED), jnp.stack([y] * FUSED)
        fstate = [model, opt_state]

        def fused():  # what training runs between log points (TrainConfig.fuse_steps)
            m, o, bad = chunk(fstate[0], fstate[1], xs, ys, key, s)
            fstate[0], fstate[1] = m, o
            return bad

        if not one:
            fns["jax_fused"] = fused
        for kind, (tm, rec, topt) in t_models.items():
            fns[kind] = make_torch_step(tm, rec, topt, xt, yt, kind == "torch_mon")
        fns["matmul_2048"], mm_flops = peak_matmul(2048)
        fns["block_matmuls"] = block_matmuls(width, depth, batch, cfg.mlp_ratio)
        reps, number = (repeats, 3) if width <= 128 else (max(3, repeats // 3), 1)
        t = interleaved_medians(fns, repeats=reps, warmup=2, number=number, sync=_sync)
        ms = {k: v["median"] * 1e3 for k, v in t.items()}
        print(f"  width {width} depth {depth} batch {batch}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in ms.items()))
        flops = step_flops(model, batch)
        peak = mm_flops / t["matmul_2048"]["median"] / 1e9
        for k in j_steps:
            got = flops / t[k]["median"] / 1e9
            kind = "monitored" if k == "jax_mon" else "plain"
            report(f"roofline_{kind}_w{width}_b{batch}" + ("_1thread" if one else ""), got / peak, unit="",
                   target=">= 0.6" if width >= 512 else None,
                   note=f"achieved {got:.1f} GFLOP/s ({flops / 1e9:.3f} GFLOP per step: 6 x dense weights x batch) / "
                        f"jitted f32 2048^2 matmul {peak:.1f} GFLOP/s, same run, "
                        f"{'1 thread' if one else f'{cores} threads'}")
        tag = "_1thread" if one else ""
        report(f"matmul_share_w{width}_b{batch}{tag}", t["block_matmuls"]["median"] / t["jax_mon"]["median"], unit="",
               note=f"the blocks' {6 * depth} matmuls alone ({ms['block_matmuls']:.2f} ms, same layouts) / the "
                    f"monitored step ({ms['jax_mon']:.2f} ms): the rest is LayerNorm, activations, loss, update, "
                    f"monitors and per-kernel overhead; torch with hooks / matmuls alone = "
                    f"{t['torch_mon']['median'] / t['block_matmuls']['median']:.2f}x bounds the speed-up")
        if one:
            report(f"{NAME}_1thread_w{width}", t["torch_mon"]["median"] / t["jax_mon"]["median"], target=">= 2",
                   note=f"both on ONE thread: torch {ms['torch_mon']:.2f} ms, gradsparse {ms['jax_mon']:.2f} ms")
            continue
        report(f"{NAME}_w{width}", t["torch_mon"]["median"] / t["jax_mon"]["median"], target=">= 2",
               note=f"per step with monitors, {cores} threads each: torch {ms['torch_mon']:.2f} ms, "
                    f"gradsparse {ms['jax_mon']:.2f} ms")
        report(f"torch_plain_vs_jax_plain_w{width}", t["torch_plain"]["median"] / t["jax_plain"]["median"],
               target=">= 1", note=f"no monitors: torch {ms['torch_plain']:.2f} ms, jax {ms['jax_plain']:.2f} ms")
        fused_ms = ms["jax_fused"] / FUSED
        report(f"torch_plain_vs_jax_fused_w{width}", t["torch_plain"]["median"] / (t["jax_fused"]["median"] / FUSED),
               target=">= 1", note=f"per plain step as training runs them ({FUSED} fused in one lax.scan): torch "
                                   f"{ms['torch_plain']:.2f} ms, jax {fused_ms:.2f} ms; roofline "
                                   f"{flops / (t['jax_fused']['median'] / FUSED) / 1e9 / peak:.2f}")
        report(f"torch_hook_overhead_w{width}", t["torch_mon"]["median"] / t["torch_plain"]["median"],
               note="torch step with hooks + metrics / torch step without")
    if not one and cores > 1:
        # torch's thread barriers suffer most on a busy machine: also compare both on one thread
        print("  -- both implementations on one thread (subprocess) --", flush=True)
        env = {**os.environ, ONE_THREAD_ENV: "1"}
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + ONE_THREAD_XLA).strip()
        proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True)
        sys.stdout.write(proc.stdout)
        if proc.returncode != 0:
            print(f"  one-thread comparison failed: {proc.stderr.strip().splitlines()[-1:]}")


def _sync(out):
    import jax

    if torch is not None and isinstance(out, dict) and "loss" in out and isinstance(out["loss"], torch.Tensor):
        return out  # eager CPU torch: values are computed when the call returns
    return jax.block_until_ready(out)


def compare(jm, tmet, entries_per_layer: int) -> None:
    """Print per-metric differences between the two implementations and the two summary rows."""
    import numpy as np

    rel_worst, frac_worst = (0.0, ""), (0.0, "")
    keys = ["loss", "accuracy", "grad_norm"] + sorted(jm["layers"])
    for k in keys:
        a = np.asarray(jm[k] if k in jm else jm["layers"][k], dtype=np.float64)
        b = (tmet[k] if k in tmet else tmet["layers"][k]).double().numpy()
        if k == "identity_relerr":  # a rounding-error gauge (~1e-7): compared in absolute terms below
            frac_like = True
        else:
            frac_like = any(f in k for f in ("sparsity", "density", "_sparse_", "_zero", "accuracy"))
        diff = np.abs(a - b)
        if frac_like:
            m = float(diff.max())
            if m > frac_worst[0] or not frac_worst[1]:
                frac_worst = (m, k)
        else:
            m = float((diff / np.maximum(np.abs(b), 1e-30)).max())
            if m > rel_worst[0] or not rel_worst[1]:
                rel_worst = (m, k)
        print(f"    {k:22s} jax {np.array2string(a, precision=6, max_line_width=200)}  max diff {m:.2e}")
    print(f"  one entry of a layer's fraction = {1 / entries_per_layer:.1e}")
    report("torch_metric_max_rel_diff", rel_worst[0], unit="", target=f"<= {REL_TOL:g}",
           note=f"largest relative difference over continuous metrics ({rel_worst[1]}), same weights and batch")
    report("torch_fraction_max_abs_diff", frac_worst[0], unit="", target=f"<= {FRAC_TOL:g}",
           note=f"largest absolute difference over fraction metrics ({frac_worst[1]})")


if __name__ == "__main__":
    main()
