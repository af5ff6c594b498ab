"""Weight noise on the key matrix during training (SPEC 4.4).

Both modules are called by the MLP block as ``noise(z, x, dense_K, prng_key, tokens_per_sample)``
ONLY when the training step passes a PRNG key (``fold_in(noise_key, step)``); evaluation passes
none, so noise is off there. Shapes: x (N, d) the input of K, z = K x + b_K (N, n), N = B * T
tokens (T = ``tokens_per_sample``, consecutive tokens belong to one sample). The noise scale is

    s = rho * RMS(K) = rho * sqrt(mean_ij K_ij^2)

with K the applied key matrix (LoRA included), under ``stop_gradient`` (s is a fixed fraction
of the weights' size, not something the optimizer can shrink). ``rho = 0`` returns z untouched.

(a) :class:`SynapseNoise` (token-wise synapse noise):  z_t <- z_t + eps_t,
    eps_t ~ N(0, s^2 ||x_t||^2 I_n), fresh per token and step. Cost: N n normals.
    Gradients flow through ||x_t|| (d eps_t / d x_t = s xi_t u_t^T, u_t = x_t / ||x_t||).

(b) :class:`ExactWeightNoise`: the layer applies K + E, E iid N(0, s^2) (n x d),
    one E per sample (``per='sample'``, shared by the T tokens of that sample) or one E per
    batch (``per='batch'``). The noise term is E x_t; its gradient w.r.t. x_t is E^T eta_t.

    * per='batch': E is drawn once (n d normals) and applied as x E^T: exact, cheap.
    * per='sample', T < d (every MLP and small-context Transformer here): with the reduced QR
      X_s^T = Q R of the sample's tokens X_s (T, d), E Q = s Z with Z (n, T) iid N(0, 1), so
      E X_s^T = s Z R exactly — n T normals per sample, the same count as synapse noise. The
      backward pass is a custom VJP that draws the rest of E from its conditional law:
      E = s Z Q^T + E' (I - Q Q^T) with E' iid and independent of Z, so for the cotangent
      H (T, n) of the noise, dL/dX_s = s H Z Q^T + s S^T W (I - Q Q^T), where H^T = P S is a
      reduced QR and W (T, d) is iid N(0, 1). Forward values AND input gradients therefore
      have exactly the joint law of a materialised E, at O(T^2 (n + d)) cost per sample and
      n T + d T normals. For T = 1 (the MLP) this reduces to: noise s ||x|| xi (the same law
      as synapse noise), gradient s (xi . eta) u + s ||eta|| (I - u u^T) w.
    * per='sample', T >= d: E is materialised, (B, n, d) normals and a batched matmul
      (B n d T multiply-adds); autodiff gives E^T eta directly.
"""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp

from gradsparse._validate import check_float
from gradsparse.plugins.blocks import Select, resolve_select, selected_blocks

Array = jax.Array
NOISE_KINDS = ("none", "synapse", "exact")
NOISE_PER = ("sample", "batch")


def noise_scale(weight: Array, rho: float) -> Array:
    """s = rho * RMS(weight) = rho * sqrt(mean(weight^2)), without gradient."""
    w = jax.lax.stop_gradient(weight)
    return rho * jnp.sqrt(jnp.mean(w * w))


def _safe_norm(x: Array) -> Array:
    """||x|| over the last axis (keepdims) with gradient 0 instead of NaN at x = 0."""
    sq = jnp.sum(x * x, axis=-1, keepdims=True)
    pos = sq > 0
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, sq, 1.0)), 0.0)


def _check_call(z: Array, x: Array, tokens_per_sample: int) -> None:
    if z.ndim != 2 or x.ndim != 2 or z.shape[0] != x.shape[0]:
        raise ValueError(f"noise expects z (N, n) and x (N, d) with the same N, got {z.shape} and {x.shape}")
    if tokens_per_sample < 1 or x.shape[0] % tokens_per_sample:
        raise ValueError(f"tokens_per_sample {tokens_per_sample} must be >= 1 and divide N = {x.shape[0]}")


class SynapseNoise(eqx.Module):
    """Token-wise synapse noise (SPEC 4.4a): z_t + s ||x_t|| xi_t, xi_t ~ N(0, I_n), s = rho RMS(K)."""

    rho: float = eqx.field(static=True, default=0.1)

    def __call__(self, z: Array, x: Array, dense: Any, key: Array, tokens_per_sample: int = 1) -> Array:
        _check_call(z, x, tokens_per_sample)
        if self.rho == 0:
            return z
        s = noise_scale(dense.effective_weight(), self.rho)
        xi = jax.random.normal(key, z.shape, z.dtype)
        return z + s * _safe_norm(x) * xi


# ------------------------------------------------------------------ exact weight noise, low-rank route
@jax.custom_vjp
def _lowrank_noise(xs: Array, z_std: Array, w_std: Array, s: Array) -> Array:
    """E X^T for one E per sample, through the QR of X^T. xs (B, T, d); z_std (B, n, T); w_std (B, T, d).

    Returns (B, T, n) = s (Z R)^T with X^T = Q R. ``w_std`` is only used by the backward pass.
    """
    return _lowrank_fwd(xs, z_std, w_std, s)[0]


def _lowrank_fwd(xs, z_std, w_std, s):
    t = xs.shape[1]
    if t == 1:
        nrm = _safe_norm(xs)                                   # (B, 1, 1)
        q = jnp.where(nrm > 0, xs / jnp.where(nrm > 0, nrm, 1.0), 0.0)  # (B, 1, d): u^T
        out = s * nrm * jnp.swapaxes(z_std, 1, 2)              # (B, 1, n)
        return out, (q, z_std, w_std, s)
    q, r = jnp.linalg.qr(jnp.swapaxes(xs, 1, 2))               # q (B, d, T), r (B, T, T)
    out = s * jnp.einsum("bnt,bts->bsn", z_std, r)            # (Z R)^T: (B, T, n)
    return out, (jnp.swapaxes(q, 1, 2), z_std, w_std, s)      # keep Q^T (B, T, d)


def _lowrank_bwd(res, h):
    qt, z_std, w_std, s = res                                  # qt: Q^T (B, T, d); h: (B, T, n)
    along = s * jnp.einsum("btn,bnk,bkd->btd", h, z_std, qt)   # s H Z Q^T
    if h.shape[1] == 1:
        hs = _safe_norm(h)                                     # S = ||h|| for T = 1
        wh = s * hs * w_std                                    # s S^T W
    else:
        _, sh = jnp.linalg.qr(jnp.swapaxes(h, 1, 2))           # H^T = P S, S (B, T, T)
        wh = s * jnp.einsum("bkt,bkd->btd", sh, w_std)         # s S^T W
    ortho = wh - jnp.einsum("btk,bke->bte", jnp.einsum("btd,bkd->btk", wh, qt), qt)  # (.)(I - Q Q^T)
    return along + ortho, jnp.zeros_like(z_std), jnp.zeros_like(w_std), jnp.zeros_like(s)


_lowrank_noise.defvjp(_lowrank_fwd, _lowrank_bwd)


class ExactWeightNoise(eqx.Module):
    """Exact weight noise (SPEC 4.4b): K + E, E iid N(0, s^2), one E per sample or per batch.

    See the module docstring for how each case is computed and what it costs.
    ``per``: 'sample' (default) or 'batch'.
    """

    rho: float = eqx.field(static=True, default=0.1)
    per: str = eqx.field(static=True, default="sample")

    def __call__(self, z: Array, x: Array, dense: Any, key: Array, tokens_per_sample: int = 1) -> Array:
        _check_call(z, x, tokens_per_sample)
        if self.rho == 0:
            return z
        n, (num, d) = z.shape[-1], x.shape
        s = noise_scale(dense.effective_weight(), self.rho).astype(z.dtype)
        if self.per == "batch":
            e = s * jax.random.normal(key, (n, d), z.dtype)
            return z + x @ e.T
        t = tokens_per_sample
        b = num // t
        xs = x.reshape(b, t, d)
        if t < d:
            k1, k2 = jax.random.split(key)
            z_std = jax.random.normal(k1, (b, n, t), z.dtype)
            w_std = jax.random.normal(k2, (b, t, d), z.dtype)
            return z + _lowrank_noise(xs, z_std, w_std, s).reshape(num, n)
        e = s * jax.random.normal(key, (b, n, d), z.dtype)
        return z + jnp.einsum("btd,bnd->btn", xs, e).reshape(num, n)


def make_noise(kind: str, rho: float = 0.1, per: str = "sample") -> Any:
    """A noise module for ``kind`` ('synapse' | 'exact'), or None for 'none'."""
    if kind not in NOISE_KINDS:
        raise ValueError(f"noise: unknown kind {kind!r}; allowed: {', '.join(NOISE_KINDS)}")
    if per not in NOISE_PER:
        raise ValueError(f"noise_per: unknown value {per!r}; allowed: {', '.join(NOISE_PER)}")
    rho = check_float("rho", rho, 0)
    if kind == "none":
        return None
    if kind == "synapse":
        return SynapseNoise(rho=rho)
    return ExactWeightNoise(rho=rho, per=per)


def add_noise(model: Any, kind: str, rho: float = 0.1, per: str = "sample", select: Select | None = None) -> Any:
    """Set the noise module of every selected block (replacing any it had; 'none' removes it)."""
    module = make_noise(kind, rho, per)
    select = resolve_select(model, select)
    blocks = selected_blocks(model, select, ["noise"])
    return eqx.tree_at(lambda m: [b.noise for b in select(m)], model, [module] * len(blocks),
                       is_leaf=lambda x: x is None)
