"""Sparsity, gradient and flatness monitors (SPEC 2.1-2.6) as pure, jittable reductions.

Inputs for one MLP block (token-flattened, N = tokens in the batch, B = samples):

- x  (N, d): the input of the key matrix (LN output, plus the zeroth bias when placed at the input)
- z  (N, n): pre-activations;  a (N, n): activations
- g  (N, n): dL/da;  gV (N, d): dL/dy, from the probes, where L is the MEAN loss over the batch
- K  (n, d): the key matrix actually applied;  act: the block's :class:`Activation`

Everything is reduced to scalars on device inside the jitted step; the host only sees a small
dict. Gradient statistics scale with the loss normalisation, so the batch size is logged with
them (``batch_size``) and all gradient thresholds are relative to the layer's RMS.

Token mask: every monitor takes an optional ``mask`` (N,) of token weights (1 = a real token, 0 =
padding, as a sentence encoder's attention mask flattened). With it, every mean over tokens is
the mean over the real tokens (sum_t m_t v_t / sum_t m_t, per unit where a quantity is per unit)
and every sum over tokens leaves padding out; without it (None) the plain means are computed, as
they always were. :func:`token_counts` gives the raw per-layer counts over real tokens that a
caller pools over several batches (relufication's held-out densities, ``gradsparse measure``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gradsparse.activations import Activation

Array = jax.Array

#: |a - flat_value| <= ACT_TOL counts as an inactive ("zero") activation (SPEC 2.1)
ACT_TOL = 1e-6
#: relative thresholds tau for gradient sparsity: |eta| < tau * RMS(eta) (SPEC 2.3)
GRAD_TAUS = (1e-6, 1e-3)


def _mean(v: Array, mask: Array | None) -> Array:
    """Mean of ``v`` ((N,) or (N, k)) over its entries; with ``mask`` (N,), over the real tokens' entries."""
    if mask is None:
        return jnp.mean(v)
    m = mask.reshape((-1,) + (1,) * (v.ndim - 1)).astype(jnp.float32)
    per_token = v.size // v.shape[0]
    return jnp.sum(v * m) / (jnp.maximum(jnp.sum(m), 1.0) * per_token)


def activation_sparsity(a: Array, flat_value: float = 0.0, mask: Array | None = None) -> Array:
    """Fraction of entries with |a - flat_value| <= 1e-6 (SPEC 2.1). Density = 1 - this."""
    return _mean(jnp.abs(a - flat_value) <= ACT_TOL, mask)


def derivative_stats(z: Array, act: Activation, mask: Array | None = None) -> dict[str, Array]:
    """Fraction of z in the zero-derivative set, and E[sigma'(z)^2] (SPEC 2.2)."""
    d = act.deriv(z)
    return {"deriv_sparsity": _mean(act.flat_mask(z), mask), "dsigma_sq": _mean(d * d, mask)}


#: what :func:`token_counts` can count per layer (sums over real tokens and units)
COUNTS = ("active", "positive", "flat", "dsigma_sq")


def token_counts(blocks, aux: list[dict[str, Array]], mask: Array | None = None,
                 stats: tuple[str, ...] = ("active", "positive")) -> dict[str, Array]:
    """Per-layer sums over the real tokens (``mask`` (N,) or (B, T); None: all N tokens), each (L,),
    plus ``tokens`` (the number of real tokens), for pooling over batches on the host:

    ``active`` = #{|a - a_flat| > 1e-6} (exact density = active / (tokens n), SPEC 2.1),
    ``positive`` = #{z > 0} (for GELU, whose outputs are never exactly flat, the share that counts),
    ``flat`` = #{z in the zero-derivative set}, ``dsigma_sq`` = sum sigma'(z)^2 (SPEC 2.2).
    """
    bad = [k for k in stats if k not in COUNTS]
    if bad:
        raise ValueError(f"stats: unknown {bad}; allowed: {', '.join(COUNTS)}")
    n = aux[0]["a"].shape[0]
    m = jnp.ones((n,), jnp.float32) if mask is None else mask.reshape(-1).astype(jnp.float32)
    w = m[:, None]
    per = {"active": lambda b, ax: jnp.sum((jnp.abs(ax["a"] - b.act.flat_value) > ACT_TOL).astype(jnp.float32) * w),
           "positive": lambda b, ax: jnp.sum((ax["z"] > 0).astype(jnp.float32) * w),
           "flat": lambda b, ax: jnp.sum(b.act.flat_mask(ax["z"]).astype(jnp.float32) * w),
           "dsigma_sq": lambda b, ax: jnp.sum(jnp.square(b.act.deriv(ax["z"])) * w)}
    out = {k: jnp.stack([per[k](b, ax) for b, ax in zip(blocks, aux)]) for k in stats}
    out["tokens"] = jnp.sum(m)
    return out


def gradient_sparsity(v: Array, prefix: str, mask: Array | None = None) -> dict[str, Array]:
    """Relative sparsity of a per-token gradient v (N, n) (SPEC 2.3).

    ``{prefix}_sparse_{tau}`` = mean(|v| < tau RMS(v)) for tau in GRAD_TAUS (1 if v is all zero),
    ``{prefix}_zero`` = mean(v == 0), ``{prefix}_l1`` = mean_t ||v_t||_1,
    ``{prefix}_l2sq`` = mean_t ||v_t||_2^2.
    """
    av = jnp.abs(v)
    rms = jnp.sqrt(_mean(v * v, mask))
    out = {}
    for tau in GRAD_TAUS:
        out[f"{prefix}_sparse_{tau:g}"] = jnp.where(rms > 0, _mean(av < tau * rms, mask), 1.0)
    out[f"{prefix}_zero"] = _mean(v == 0, mask)
    out[f"{prefix}_l1"] = _mean(jnp.sum(av, axis=-1), mask)
    out[f"{prefix}_l2sq"] = _mean(jnp.sum(v * v, axis=-1), mask)
    return out


def augmented_flatness(left: Array, right: Array, num_samples: int, mask: Array | None = None) -> Array:
    """AF = (1/B) sum_t ||left_t||^2 ||right_t||^2 (SPEC 2.4).

    For the key layer left = eta (N, n), right = x (N, d): ||eta_t x_t^T||_F^2 is the squared norm
    of token t's share of dL/dK; summed over tokens, averaged over the B samples.
    """
    per_token = jnp.sum(left * left, -1) * jnp.sum(right * right, -1)
    if mask is not None:
        per_token = per_token * mask.reshape(-1).astype(per_token.dtype)
    return jnp.sum(per_token) / num_samples


def sparsity_identity(z: Array, x: Array, g: Array, act: Activation, mask: Array | None = None
                      ) -> dict[str, Array]:
    """Both sides of the sparsity identity (SPEC 2.5), per token, averaged over tokens.

    With weights w_i = sigma'(z_i)^2 (= 1[active] for ReLU-like sigma):
    lhs_t = sum_i w_i (the number of active units for ReLU), and
    rhs_t = AF_K,t / (||x_t||^2 * mean_w g^2), with AF_K,t = ||eta_t||^2 ||x_t||^2 and
    mean_w g^2 = sum_i w_i g_i^2 / sum_i w_i. Tokens with no active unit or zero gradient are
    left out. Returns the means of both sides and the largest relative gap.
    """
    d = act.deriv(z)
    w = d * d
    eta = g * d
    lhs = jnp.sum(w, -1)
    xsq = jnp.sum(x * x, -1)
    af_t = jnp.sum(eta * eta, -1) * xsq
    wg = jnp.sum(w * g * g, -1)
    valid = (lhs > 0) & (wg > 0) & (xsq > 0)
    if mask is not None:
        valid = valid & (mask.reshape(-1) > 0)
    safe = lambda v: jnp.where(valid, v, 1.0)  # noqa: E731
    rhs = af_t / (safe(xsq) * safe(wg) / safe(lhs))
    cnt = jnp.maximum(jnp.sum(valid), 1)
    rel = jnp.where(valid, jnp.abs(lhs - rhs) / safe(lhs), 0.0)
    return {
        "identity_lhs": jnp.sum(jnp.where(valid, lhs, 0.0)) / cnt,
        "identity_rhs": jnp.sum(jnp.where(valid, rhs, 0.0)) / cnt,
        "identity_relerr": jnp.max(rel),
    }


def layer_metrics(x: Array, z: Array, a: Array, g: Array, gV: Array, K: Array, act: Activation,
                  num_samples: int, mask: Array | None = None) -> dict[str, Array]:
    """All SPEC 2.1-2.6 scalars for one MLP block (shapes in the module docstring; ``mask``: the
    token mask, see there)."""
    sp = activation_sparsity(a, act.flat_value, mask)
    eta = g * act.deriv(z)
    out = {"act_sparsity": sp, "density": 1.0 - sp}
    out.update(derivative_stats(z, act, mask))
    out.update(gradient_sparsity(eta, "eta", mask))
    out.update(gradient_sparsity(g, "g", mask))
    out["af_k"] = augmented_flatness(eta, x, num_samples, mask)
    out["af_v"] = augmented_flatness(gV, a, num_samples, mask)
    out.update(sparsity_identity(z, x, g, act, mask))
    out["gv_norm"] = _mean(jnp.sqrt(jnp.sum(gV * gV, -1)), mask)
    out["k_fro2"] = jnp.sum(K * K)
    out["x_sq"] = _mean(jnp.sum(x * x, -1), mask)
    return out


def model_metrics(blocks, aux: list[dict[str, Array]], probe_grads: list[dict[str, Array]],
                  num_samples: int, mask: Array | None = None) -> dict[str, Array]:
    """Stack :func:`layer_metrics` over the MLP blocks: each key maps to an (L,) array.

    ``blocks``: ``model.mlp_blocks()``; ``aux``: the model's per-block {'x','z','a'};
    ``probe_grads``: per-block {'a': g, 'y': gV}; ``mask``: the token mask (N,) or None.
    """
    if not (len(blocks) == len(aux) == len(probe_grads)):
        raise ValueError(f"blocks ({len(blocks)}), aux ({len(aux)}) and probe grads ({len(probe_grads)}) differ")
    per = [layer_metrics(ax["x"], ax["z"], ax["a"], pg["a"], pg["y"], b.key.effective_weight(), b.act, num_samples,
                         mask) for b, ax, pg in zip(blocks, aux, probe_grads)]
    return {k: jnp.stack([p[k] for p in per]) for k in per[0]}


def summarize(metrics: dict, prefix: str) -> dict[str, object]:
    """Host-side: {prefix/key: [per-layer floats], prefix/key/mean: float} for the JSONL log."""
    out: dict[str, object] = {}
    for k, v in metrics.items():
        vals = [float(u) for u in jax.device_get(v).reshape(-1)]
        out[f"{prefix}/{k}"] = vals
        out[f"{prefix}/{k}/mean"] = sum(vals) / len(vals)
    return out
