"""Building blocks shared by every model: LayerNorm, Dense (with optional LoRA), the MLP block.

All blocks act on token-flattened arrays ``(N, features)`` (N = batch x tokens): on CPU this is
1.7-1.8x faster than batched ``(B, T, D) @ (D, F)`` in the backward pass (DESIGN.md).

The MLP block is the object of study (SPEC 1)::

    x_t = LN(h_t) (+ b0[pos_t] with the zeroth bias at the input)   (N, d)
          (the MLP's ``norm`` ablation: x_t = h_t, or s LN(h_t) with a learnable scalar s)
    z_t = K x_t + b_K (+ weight / synapse noise during training)    (N, n)
    a_t = sigma(z_t) + probe_a                                       (N, n)
    y_t = V a_t + b_V + probe_y (+ b0[pos_t] at the output)          (N, d)

The probes are zero arrays; differentiating the loss with respect to them in the same
``value_and_grad`` as the parameters gives g_t = dL/da_t and g^V_t = dL/dy_t per token.
"""

from __future__ import annotations

import math
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp

from gradsparse.activations import Activation

Array = jax.Array


#: what precedes the key layer of an MLP block (``TrainConfig.norm``): a LayerNorm, nothing, or a
#: LayerNorm without affine part times one learnable scalar
NORMS = ("layernorm", "none", "scale")


def normalize(h: Array, eps: float) -> Array:
    """(h - mean) / sqrt(var + eps) over the last axis (the LayerNorm without its affine part)."""
    mu = jnp.mean(h, axis=-1, keepdims=True)
    c = h - mu
    var = jnp.mean(c * c, axis=-1, keepdims=True)
    return c * jax.lax.rsqrt(var + eps)


class LayerNorm(eqx.Module):
    """LayerNorm over the last axis: (h - mean) / sqrt(var + eps) * gamma + beta.

    ``weight`` (gamma) and ``bias`` (beta) are (d,) arrays or None (no affine part). Without the
    affine part ||LN(h)||^2 = d var/(var + eps) ~ d (SPEC G2).
    """

    weight: Array | None
    bias: Array | None
    eps: float = eqx.field(static=True, default=1e-5)

    @staticmethod
    def create(d: int, affine: bool = True, eps: float = 1e-5) -> "LayerNorm":
        if d < 1:
            raise ValueError(f"LayerNorm width must be >= 1, got {d}")
        w = jnp.ones((d,), jnp.float32) if affine else None
        b = jnp.zeros((d,), jnp.float32) if affine else None
        return LayerNorm(w, b, eps)

    def __call__(self, h: Array) -> Array:
        x = normalize(h, self.eps)
        if self.weight is not None:
            x = x * self.weight
        if self.bias is not None:
            x = x + self.bias
        return x


class NoNorm(eqx.Module):
    """The identity where a block's LayerNorm would be (``norm="none"``): x = h, so ||x_t||^2 is
    the residual stream's own norm, free to grow or shrink."""

    def __call__(self, h: Array) -> Array:
        return h


class ScaledLayerNorm(eqx.Module):
    """s * LN(h), LN without affine part, ``scale`` s one learnable scalar (shape ()), init 1
    (``norm="scale"``): ||x_t||^2 = s^2 d var_t/(var_t + eps), so the block can shrink its input norm
    with one parameter while its direction stays normalised."""

    scale: Array
    eps: float = eqx.field(static=True, default=1e-5)

    @staticmethod
    def create(eps: float = 1e-5) -> "ScaledLayerNorm":
        return ScaledLayerNorm(jnp.ones((), jnp.float32), eps)

    def __call__(self, h: Array) -> Array:
        return normalize(h, self.eps) * self.scale


def make_norm(d: int, norm: str = "layernorm", ln_affine: bool = True) -> Any:
    """The module before a block's key layer: ``LayerNorm(d, ln_affine)`` ("layernorm"),
    :class:`NoNorm` ("none") or :class:`ScaledLayerNorm` ("scale"; ``ln_affine`` does not apply)."""
    if norm == "layernorm":
        return LayerNorm.create(d, ln_affine)
    if norm == "none":
        return NoNorm()
    if norm == "scale":
        return ScaledLayerNorm.create()
    raise ValueError(f"norm: got {norm!r}; allowed: {', '.join(NORMS)}")


class Dense(eqx.Module):
    """y = x W^T + b (+ scale * (x A^T) B^T with LoRA). W: (out, in), b: (out,), A: (r, in), B: (out, r).

    Weights are initialised U(-1/sqrt(in), 1/sqrt(in)), biases at zero.
    """

    weight: Array
    bias: Array | None
    lora_a: Array | None = None
    lora_b: Array | None = None
    lora_scale: float = eqx.field(static=True, default=1.0)

    @staticmethod
    def create(key: Array, d_in: int, d_out: int, bias: bool = True) -> "Dense":
        if d_in < 1 or d_out < 1:
            raise ValueError(f"Dense sizes must be >= 1, got in={d_in}, out={d_out}")
        lim = 1.0 / math.sqrt(d_in)
        w = jax.random.uniform(key, (d_out, d_in), jnp.float32, -lim, lim)
        return Dense(w, jnp.zeros((d_out,), jnp.float32) if bias else None)

    def effective_weight(self) -> Array:
        """W + scale * B A (the matrix the layer applies)."""
        if self.lora_a is None:
            return self.weight
        return self.weight + self.lora_scale * (self.lora_b @ self.lora_a)

    def __call__(self, x: Array) -> Array:
        y = x @ self.weight.T
        if self.lora_a is not None:
            y = y + self.lora_scale * ((x @ self.lora_a.T) @ self.lora_b.T)
        if self.bias is not None:
            y = y + self.bias
        return y


class MLPBlock(eqx.Module):
    """The LayerNorm-ed MLP of SPEC 1 with probe inputs; see the module docstring.

    Fields: ``ln`` (the preceding LayerNorm; with ``norm`` "none" / "scale" a :class:`NoNorm` /
    :class:`ScaledLayerNorm`), ``key`` (K: Dense d -> n), ``value`` (V: Dense n -> d),
    ``act`` (activation), ``zeroth_bias`` ((S, d) array or None, SPEC 4.1), ``noise`` (a weight /
    synapse noise module or None, SPEC 4.4; applied only when a PRNG key is passed).
    """

    ln: LayerNorm | NoNorm | ScaledLayerNorm
    key: Dense
    value: Dense
    act: Activation
    zeroth_bias: Array | None = None
    zeroth_bias_placement: str = eqx.field(static=True, default="input")
    noise: Any = None

    @staticmethod
    def create(key: Array, d: int, n: int, act: Activation, ln_affine: bool = True,
               norm: str = "layernorm") -> "MLPBlock":
        k1, k2 = jax.random.split(key)
        return MLPBlock(make_norm(d, norm, ln_affine), Dense.create(k1, d, n), Dense.create(k2, n, d), act)

    @property
    def d(self) -> int:
        return int(self.key.weight.shape[1])

    @property
    def n(self) -> int:
        return int(self.key.weight.shape[0])

    def __call__(self, h: Array, probe: dict[str, Array], positions: Array, *,
                 key: Array | None = None, tokens_per_sample: int = 1) -> tuple[Array, dict[str, Array]]:
        """h: (N, d); probe: {'a': (N, n), 'y': (N, d)}; positions: (N,) int token positions.

        Returns y (N, d) and aux {'x': input to K (N, d), 'z': (N, n), 'a': (N, n)}.
        ``key`` switches on the noise module (training only); ``tokens_per_sample`` tells the
        exact weight noise which tokens share a sample.
        """
        x = self.ln(h)
        if self.zeroth_bias is not None and self.zeroth_bias_placement == "input":
            x = x + self.zeroth_bias[positions]
        z = self.key(x)
        if self.noise is not None and key is not None:
            z = self.noise(z, x, self.key, key, tokens_per_sample)
        a = self.act(z) + probe["a"]
        y = self.value(a) + probe["y"]
        if self.zeroth_bias is not None and self.zeroth_bias_placement == "output":
            y = y + self.zeroth_bias[positions]
        return y, {"x": x, "z": z, "a": a}


def zero_probes(blocks: list[MLPBlock], num_tokens: int) -> list[dict[str, Array]]:
    """One probe dict {'a': zeros (N, n), 'y': zeros (N, d)} per MLP block."""
    return [{"a": jnp.zeros((num_tokens, b.n), jnp.float32), "y": jnp.zeros((num_tokens, b.d), jnp.float32)}
            for b in blocks]


def default_trainable(model: Any) -> Any:
    """Pytree of bools shaped like ``model``: every floating array is trained except the
    parameters of activations (e.g. the mixing k of ``Mixed``, driven by a schedule)."""
    mask = jax.tree_util.tree_map(eqx.is_inexact_array, model, is_leaf=lambda x: isinstance(x, Activation))
    return jax.tree_util.tree_map(
        lambda m: jax.tree_util.tree_map(lambda _: False, m) if isinstance(m, Activation) else m,
        mask, is_leaf=lambda x: isinstance(x, Activation))
