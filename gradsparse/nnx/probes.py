"""The probes of an NNX model (the NNX mirror of :class:`gradsparse.models.MLPBlock`'s) and the
``value_and_grad`` that turns them into the SPEC 2 monitors.

:func:`instrument` gives K and V, in place, a ``__call__`` that, under ``nnx.capture``, does::

    K:  self.sow(ProbeValue, 'x', x); z = K(x); self.sow(ProbeValue, 'z', z)
    V:  self.sow(ProbeValue, 'a', a); a = self.perturb('a', a, ProbeGrad)
        y = V(a); y = self.perturb('y', y, ProbeGrad)

and behaves exactly as before outside it (same outputs, same state; the parameter paths do not
change, so an optimizer state stays valid). The same call adds a zeroth bias b0 (SPEC 4.1) when
the plug-in gave K or V one: ``x + b0[t]`` before K, ``y + b0[t]`` after V, for token t of a
(..., T, d) array (b0[0] for a 2-D (B, d) array, S = 1).

:func:`value_and_grad` runs the user's own loss under ``nnx.capture(ProbeValue, init=zero
probes)`` and differentiates with respect to the parameters and the zero probes in ONE
``nnx.value_and_grad``, so ``g = dL/da`` and ``gV = dL/dy`` per token, and reduces
(x, z, a, g, gV, K, sigma) with :func:`gradsparse.monitors.model_metrics`: the same SPEC 2.1-2.6
arrays, one entry per block, as the native models give. Gradients are of the loss the user
returns (SPEC 1 wants the MEAN over the batch); ``num_samples`` B (the AF normalisation of
SPEC 2.4) defaults to the leading size of the first array argument. K enters the metrics only
through ||K||_F^2, the same for K and K^T, so the stored (d, n) kernel is passed as is.

Limits: each block must be called once per forward; the first argument of the loss is the model.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from gradsparse import monitors
from gradsparse.activations import Activation
from gradsparse.nnx._modules import capturing, get_at, is_linear, kernel, path_name, retype, role_of
from gradsparse.nnx.discover import MLPSite, check_sites, site_activation

Array = jax.Array


class ProbeValue(nnx.Intermediate):
    """What the probes sow: x and z on K, a on V (a subclass, so a model's own sows never mix in)."""


class ProbeGrad(nnx.Perturbation):
    """The zero probes added at a and y; their gradients are g = dL/da and gV = dL/dy."""


# --------------------------------------------------------------------------------------------
# the probed calls of K and V
# --------------------------------------------------------------------------------------------


def _zb_rows(b0: Array, v: Array) -> Array:
    """The zeroth-bias rows for ``v``: b0[:T] for (..., T, d) arrays, b0[0] for (B, d) ones (S = 1)."""
    s = b0.shape[0]
    if v.ndim >= 3:
        t = v.shape[-2]
        if t > s:
            raise ValueError(f"zeroth bias: the input has {t} tokens but the bias has {s} rows; "
                             f"allowed: at most {s} tokens (add the bias with seq_len >= {t})")
        return b0[:t]
    if s != 1:
        raise ValueError(f"zeroth bias: a 2-D (B, d) input takes one bias row, got {s}; allowed: seq_len=1, "
                         "or (B, T, d) inputs")
    return b0[0]


def _key_call(self, base, x, *args, **kwargs):
    b0 = getattr(self, "zeroth_bias", None)
    if b0 is not None:
        x = x + _zb_rows(b0[...], x)
    cap = capturing(self)
    if cap:
        self.sow(ProbeValue, "x", x)
    z = base.__call__(self, x, *args, **kwargs)
    if cap:
        self.sow(ProbeValue, "z", z)
    return z


def _value_call(self, base, a, *args, **kwargs):
    cap = capturing(self)
    if cap:
        self.sow(ProbeValue, "a", a)
        a = self.perturb("a", a, ProbeGrad)
    y = base.__call__(self, a, *args, **kwargs)
    if cap:
        y = self.perturb("y", y, ProbeGrad)
    b0 = getattr(self, "zeroth_bias", None)
    if b0 is not None:
        y = y + _zb_rows(b0[...], y)
    return y


_CALLS = {"key": _key_call, "value": _value_call}


def instrument(model: Any, sites: Sequence[MLPSite]) -> Any:
    """Give the K and V modules of every site the probes (in place; idempotent); returns ``model``.

    Outside ``nnx.capture`` the model computes exactly what it did (same outputs, same state and
    parameter paths): only the class of K and V changes, to a subclass of theirs.
    """
    sites = check_sites(sites)
    targets = []
    for s in sites:
        for path, role in ((s.key, "key"), (s.value, "value")):
            try:
                m = get_at(model, path)
            except (AttributeError, IndexError, KeyError, TypeError):
                raise ValueError(f"{s.name}: the model has no module at {path_name(path)}; allowed: sites found "
                                 "on this model") from None
            if not is_linear(m):
                raise ValueError(f"{s.name}: {path_name(path)} is not a Linear-like module; allowed: sites found "
                                 "on this model")
            if role_of(m) not in (None, role):
                raise ValueError(f"{s.name}: {path_name(path)} is already probed as {role_of(m)!r}")
            targets.append((m, role))
    for m, role in targets:
        if role_of(m) is None:
            retype(m, role, _CALLS[role])
    return model


# --------------------------------------------------------------------------------------------
# the monitored value_and_grad
# --------------------------------------------------------------------------------------------


class _Weight:
    def __init__(self, w: Array):
        self._w = w

    def effective_weight(self) -> Array:
        return self._w


class _BlockView:
    """What monitors.model_metrics reads of a block: ``key.effective_weight()`` and ``act``."""

    def __init__(self, k: Array, act: Activation):
        self.key = _Weight(k)
        self.act = act


def _num_samples(num_samples: int | None, args: tuple) -> int:
    if num_samples is not None:
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples: must be a positive int, got {num_samples!r}")
        return num_samples
    for a in args:
        if hasattr(a, "shape") and len(a.shape) >= 1:
            return int(a.shape[0])
    raise ValueError("num_samples: no array argument to take the batch size from; allowed: pass num_samples=B")


def _probe_metrics(model: Any, sites: tuple[MLPSite, ...], values: Any, grads: Any, b: int) -> dict[str, Array]:
    sown = {tuple(p): v.get_value() for p, v in nnx.to_flat_state(values)}
    pg = {tuple(p): v.get_value() for p, v in nnx.to_flat_state(grads)}
    views, aux, probe_grads = [], [], []
    for s in sites:
        got = {}
        for what, path, src in (("x", s.key, sown), ("z", s.key, sown), ("a", s.value, sown)):
            v = src.get(path + (what,))
            if v is None or len(v) != 1:
                n_calls = 0 if v is None else len(v)
                raise ValueError(f"{s.name}: the loss called the block {n_calls} times; allowed: once per forward")
            got[what] = v[0]
        got["g"], got["gV"] = pg[s.value + ("a",)], pg[s.value + ("y",)]
        f32 = {k: v.astype(jnp.float32) for k, v in got.items()}
        d, n = f32["x"].shape[-1], f32["z"].shape[-1]
        aux.append({"x": f32["x"].reshape(-1, d), "z": f32["z"].reshape(-1, n), "a": f32["a"].reshape(-1, n)})
        probe_grads.append({"a": f32["g"].reshape(-1, n), "y": f32["gV"].reshape(-1, d)})
        # ||K||_F^2 is the same for K and K^T: the stored (d, n) kernel as is, no transposed copy
        # (docs/nnx_measurements.md: what that copy cost)
        k = kernel(get_at(model, s.key))[...].astype(jnp.float32)
        views.append(_BlockView(k, site_activation(model, s)))
    metrics = monitors.model_metrics(views, aux, probe_grads, b)
    # density counts |a - a_flat| > 1e-6, which is 1 for activations without exact zeros (GELU, tanh-GELU,
    # SiLU): the share of positive pre-activations is the number that counts there, so both are given
    metrics["positive_fraction"] = jnp.stack([jnp.mean((ax["z"] > 0).astype(jnp.float32)) for ax in aux])
    return metrics


def value_and_grad(loss_fn: Callable[..., Any], sites: Sequence[MLPSite], *, has_aux: bool = False,
                   wrt: Any = nnx.Param, num_samples: int | None = None) -> Callable[..., tuple[Any, Any, dict]]:
    """``fn(model, *args) -> (value, grads, metrics)``: the user's loss, its gradients and the monitors.

    ``loss_fn(model, *args)`` returns the (mean) loss, or ``(loss, aux)`` with ``has_aux``;
    ``value`` is that; ``grads`` is the ``nnx.State`` of gradients w.r.t. the ``wrt`` variables
    (``nnx.Param``), as ``nnx.value_and_grad`` gives; ``metrics`` maps each SPEC 2.1-2.6 name of
    :func:`gradsparse.monitors.layer_metrics` to an (L,) array over the sites (order of
    :func:`~gradsparse.nnx.discover.layer_names`), plus ``positive_fraction`` (the share of z > 0:
    ``density`` counts |a| > 1e-6, which is 1.0 for GELU, tanh-GELU and SiLU, whose outputs are
    never exactly zero). Call it inside your jitted step; the model must
    be instrumented (:func:`instrument`). The zero probes are shaped by ``nnx.eval_shape`` (no
    run-time cost, no change of the model's state); ``num_samples`` B defaults to the leading size
    of the first array argument.
    """
    if not callable(loss_fn):
        raise ValueError(f"loss_fn: must be a function (model, *args) -> loss, got {type(loss_fn).__name__}")
    sites = check_sites(sites)
    if not isinstance(has_aux, bool):
        raise ValueError(f"has_aux: must be True or False, got {has_aux!r}")
    if num_samples is not None:
        _num_samples(num_samples, ())

    def shapes(m, *a):
        return nnx.capture(loss_fn, ProbeGrad)(m, *a)[1]

    def f(m, probes, *a):
        out, values = nnx.capture(loss_fn, ProbeValue, init=probes)(m, *a)
        if has_aux:
            if not (isinstance(out, tuple) and len(out) == 2):
                raise ValueError(f"loss_fn: with has_aux=True it must return (loss, aux), got {type(out).__name__}")
            return out[0], (out[1], values)
        return out, (None, values)

    grad_fn = nnx.value_and_grad(f, argnums=(nnx.DiffState(0, wrt), 1), has_aux=True)

    def fn(model: Any, *args: Any) -> tuple[Any, Any, dict]:
        for s in sites:
            for path, role in ((s.key, "key"), (s.value, "value")):
                if role_of(get_at(model, path)) != role:
                    raise ValueError(f"{s.name}: {path_name(path)} has no probes; allowed: an instrumented model "
                                     "(call gradsparse.nnx.instrument(model, sites) once, outside the step)")
        b = _num_samples(num_samples, args)
        abstract = nnx.eval_shape(shapes, model, *args)
        probes = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), abstract)
        (loss, (aux, values)), (grads, pgrads) = grad_fn(model, probes, *args)
        metrics = _probe_metrics(model, sites, values, pgrads, b)
        return ((loss, aux) if has_aux else loss), grads, metrics

    return fn
