"""SPEC 3.3 accumulators as an init/update pair, carried in the training step's state.

Per MLP block, with r = 1 - lr * wd (:func:`gradsparse.rmt.decay_rate`)::

    C_x <- r C_x + mean_t x_t x_t^T     (d x d; x = the input of K)
    C_eta <- r C_eta + mean_t eta_t eta_t^T   (n x n; eta = B dL/dz = B g * sigma'(z), per-sample scale)

eta, not g = dL/da: the rank-one term of dL/dK is eta x^T, and g = V^T g^V has rank <= d, so C_g
could never be isotropic in R^n. The update reads the values of the SAME forward/backward pass as
the optimizer update (``x`` and ``z`` from the block's aux, ``dL/da`` from the probe gradients,
eta = dL/da * sigma'(z)), so tracking costs only the outer
products: about 2 B (d^2 + n^2) flops per block and step (half that with a symmetric rank-B update).
The state is a plain pytree (a list of ``{"x": (d, d), "eta": (n, n)}``), checkpointed with the
optimizer state, so a run that tracks the covariances resumes bit-identically.

At step t the accumulation holds N = B min(t, T_eff) samples (:func:`gradsparse.rmt.effective_samples`),
c = p / N; :func:`log_metrics` gives the logged ``cov/{x,eta}_{trace, participation_ratio,
anisotropy, c, bound_re, bound_im}`` (:func:`gradsparse.rmt.covariance_metrics`).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gradsparse.io import atomic_write_bytes
from gradsparse.rmt import cov_init, cov_update, covariance_metrics, decay_rate, effective_samples

Array = jax.Array
State = list  # [{"x": (d, d), "eta": (n, n)} per block]
KINDS = ("x", "eta")


@dataclass(frozen=True)
class Accumulator:
    """``init() -> state`` and ``update(state, xs, etas, batch_size) -> state`` (jittable), with
    ``xs[i]`` (N, d) the inputs of block i's K and ``etas[i]`` (N, n) its dL/dz of the mean loss
    (multiplied by ``batch_size`` inside, to per-sample scale)."""

    dims: tuple[tuple[int, int], ...]  # (d, n) per block
    lr: float
    weight_decay: float
    init: Callable[[], State]
    update: Callable[[State, Sequence[Array], Sequence[Array], int], State]


def accumulator(dims: Sequence[tuple[int, int]], lr: float, weight_decay: float) -> Accumulator:
    """The accumulator pair for blocks of sizes ``dims`` = [(d, n), ...] under SGD-style decay
    r = 1 - lr * weight_decay."""
    dims = tuple((int(d), int(n)) for d, n in dims)
    if not dims:
        raise ValueError("dims: got no blocks; allowed: one (d, n) pair per MLP block")
    r = decay_rate(lr, weight_decay)

    def init() -> State:
        return [{"x": cov_init(d), "eta": cov_init(n)} for d, n in dims]

    def update(state: State, xs: Sequence[Array], etas: Sequence[Array], batch_size: int) -> State:
        return [{"x": cov_update(st["x"], x, r), "eta": cov_update(st["eta"], e * batch_size, r)}
                for st, x, e in zip(state, xs, etas)]

    return Accumulator(dims, float(lr), float(weight_decay), init, update)


def samples(acc: Accumulator, batch_size: int, step: int) -> float:
    """N after ``step`` updates (at least one): B min(step, T_eff)."""
    return float(effective_samples(batch_size, max(step, 1), acc.lr, acc.weight_decay))


@jax.jit
def _metrics(state: State, n: Array) -> list:
    return [{k: covariance_metrics(st[k], st[k].shape[0], n) for k in KINDS} for st in state]


def log_metrics(acc: Accumulator, state: State, batch_size: int, step: int) -> dict[str, Any]:
    """Per-layer lists under ``cov/x_*`` and ``cov/eta_*`` after ``step`` updates, and ``cov/N``."""
    n = samples(acc, batch_size, step)
    per = jax.device_get(_metrics(state, jnp.asarray(n, jnp.float32)))
    out: dict[str, Any] = {"cov/N": n}
    for kind in KINDS:
        for name in per[0][kind]:
            out[f"cov/{kind}_{name}"] = [float(layer[kind][name]) for layer in per]
    return out


def save(path: str | Path, acc: Accumulator, state: State, batch_size: int, step: int) -> Path:
    """The accumulated matrices (``Cx_i``, ``Ceta_i`` per block i) and ``N``, written atomically as .npz."""
    arrays = {f"C{k}_{i}": np.asarray(st[k]) for i, st in enumerate(state) for k in KINDS}
    arrays["N"] = np.asarray(samples(acc, batch_size, step))
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return atomic_write_bytes(path, buf.getvalue())
