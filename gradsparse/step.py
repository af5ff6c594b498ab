"""The jitted functions of training and evaluation (public: the checks and benchmarks use them).

- :func:`loss_fn`: mean cross-entropy and accuracy of a model on (x, y) with probes.
- :func:`forward_backward`: one ``value_and_grad`` over (trainable params, probes): loss,
  accuracy, per-block aux {x, z, a}, parameter gradients and probe gradients {a: dL/da, y: dL/dy}.
- :func:`make_train_step`: ``step(model, state, x, y, key, step) -> (model, state, metrics, finite)``:
  forward/backward, optax update, post-update projections, the SPEC 2 monitors (on logged steps)
  and the covariance accumulators (when tracked), all in ONE jit region. The step always
  receives a PRNG key; a model uses it only where it holds noise modules.
- :func:`make_train_chunk`: ``chunk(model, state, xs, ys, noise_key, first_step) -> (model,
  state, bad_step)``: ``n = xs.shape[0]`` plain (unmonitored) steps in one ``lax.scan``, each the
  very step :func:`make_train_step` jits (bit-equal parameters, tested), with no host sync
  between them; ``bad_step`` is the first step whose loss or gradient was not finite (-1 if none).
- :func:`make_eval_fn`, :func:`flatness_fn`, :func:`final_eval`, :func:`locate_nonfinite`.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from gradsparse.covariance import Accumulator
from gradsparse.data import Dataset, heldout_batch
from gradsparse.flatness import hutchinson_trace
from gradsparse.models import zero_probes
from gradsparse.monitors import model_metrics
from gradsparse.plugins import Projection

Array = jax.Array


def loss_fn(model: Any, probes: list[dict[str, Array]], x: Array, y: Array, key: Array | None
            ) -> tuple[Array, tuple[list[dict[str, Array]], Array]]:
    """Mean cross-entropy of ``model`` on (x, y); aux = (per-block aux, accuracy)."""
    logits, aux = model(x, probes, key=key)
    labels = y.reshape(-1)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    acc = jnp.mean(jnp.argmax(logits, -1) == labels)
    return loss, (aux, acc)


def forward_backward(model: Any, trainable: Any, x: Array, y: Array, key: Array | None, *,
                     probe_grads: bool = True):
    """(loss, accuracy, aux, grads of the trainable params, grads of the probes) in one pass.

    ``aux[i]`` = {'x': (N, d), 'z': (N, n), 'a': (N, n)} of block i; ``g_probes[i]`` =
    {'a': dL/da (N, n), 'y': dL/dy (N, d)} of the MEAN loss over the batch (N = B x tokens).
    With ``probe_grads=False`` the probes stay zero inputs of the forward pass but are not
    differentiated: ``g_probes`` is None and the parameter gradients are the same numbers (the
    probes add 0 to a and y, so dL/dparams does not depend on whether dL/dprobes is asked for).
    """
    if not isinstance(probe_grads, bool):
        raise ValueError(f"probe_grads: must be True or False, got {probe_grads!r}")
    params, static = eqx.partition(model, trainable)
    probes = zero_probes(model.mlp_blocks(), x.shape[0] * model.tokens_per_sample)

    def f(p, pr):
        return loss_fn(eqx.combine(p, static), pr, x, y, key)

    if not probe_grads:
        (loss, (aux, acc)), g_params = jax.value_and_grad(f, has_aux=True)(params, probes)
        return loss, acc, aux, g_params, None
    (loss, (aux, acc)), (g_params, g_probes) = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(params, probes)
    return loss, acc, aux, g_params, g_probes


def make_train_step(optimizer: optax.GradientTransformation, trainable: Any, projections: Sequence[Projection] = (),
                    *, monitors: bool = True, accumulator: Accumulator | None = None) -> Callable:
    """Jitted ``step(model, state, x, y, key, step) -> (model, state, metrics, finite)``.

    ``state`` is the optimizer state, or ``(optimizer state, covariance state)`` with an
    ``accumulator`` (:func:`gradsparse.factory.init_state` builds it). ``metrics`` holds loss,
    accuracy, grad_norm and (with ``monitors``) the per-layer SPEC 2.1-2.6 arrays of this batch,
    computed from the forward/backward pass BEFORE the update. ``key`` (pass
    ``fold_in(noise_key, step)``) drives the noise modules a model holds and is ignored otherwise.
    ``finite`` is False when the loss or the gradient norm is NaN/inf; the caller then keeps the
    old model and state. The step without monitors and accumulator differentiates the parameters
    only (``forward_backward(..., probe_grads=False)``); its new parameters equal the monitored
    step's (tests/test_step_plain.py).
    """
    projections = tuple(projections)
    # the plain step without accumulator never reads dL/da, dL/dy: it does not ask for them
    probe_grads = monitors or accumulator is not None

    @eqx.filter_jit
    def step(model, state, x, y, key, step_idx):
        opt_state, acc_state = state if accumulator is not None else (state, None)
        loss, acc, aux, g_params, g_probes = forward_backward(model, trainable, x, y, key, probe_grads=probe_grads)
        params, static = eqx.partition(model, trainable)
        updates, new_opt = optimizer.update(g_params, opt_state, params)
        new_model = eqx.combine(optax.apply_updates(params, updates), static)
        for proj in projections:
            new_model = proj(new_model, step_idx)
        gnorm = optax.tree.norm(g_params)
        finite = jnp.isfinite(loss) & jnp.isfinite(gnorm)
        metrics = {"loss": loss, "accuracy": acc, "grad_norm": gnorm}
        if monitors:
            metrics["layers"] = model_metrics(model.mlp_blocks(), aux, g_probes, x.shape[0])
        if accumulator is None:
            return new_model, new_opt, metrics, finite
        etas = [pg["a"] * blk.act.deriv(ax["z"]) for blk, ax, pg in zip(model.mlp_blocks(), aux, g_probes)]
        new_acc = accumulator.update(acc_state, [ax["x"] for ax in aux], etas, x.shape[0])
        return new_model, (new_opt, new_acc), metrics, finite

    return step


def make_train_chunk(optimizer: optax.GradientTransformation, trainable: Any, projections: Sequence[Projection] = (),
                     *, accumulator: Accumulator | None = None) -> Callable:
    """Jitted ``chunk(model, state, xs, ys, noise_key, first_step) -> (model, state, bad_step)``.

    Runs ``n = xs.shape[0]`` plain steps (``monitors=False``) in one ``lax.scan``: step
    ``s = first_step + i`` trains on ``(xs[i], ys[i])`` (xs: (n, B, ...), ys: (n, B, ...)) with the
    noise key ``fold_in(noise_key, s)`` and projection step ``s``, exactly as ``n`` calls of
    :func:`make_train_step`'s step would (the scan body IS that step, so the parameters are
    bit-equal to single steps: ``tests/test_fused.py``). Nothing is synchronised with the host
    inside the chunk; ``bad_step`` (int32) is the first ``s`` whose loss or gradient norm was not
    finite, or -1. Past a bad step the carried model is not meaningful: the caller replays the
    chunk with single steps from its start (:func:`locate_nonfinite`) and discards it.
    """
    single = make_train_step(optimizer, trainable, projections, monitors=False, accumulator=accumulator)

    @eqx.filter_jit
    def chunk(model, state, xs, ys, noise_key, first_step):
        if xs.shape[0] != ys.shape[0] or xs.shape[0] < 1:
            raise ValueError(f"chunk: xs {tuple(xs.shape)} and ys {tuple(ys.shape)} must share a leading axis n >= 1")
        dyn, static = eqx.partition(model, eqx.is_array)
        first = jnp.asarray(first_step, jnp.int32)

        def body(carry, inp):
            d, st, bad = carry
            x, y, i = inp
            s = first + i
            new_model, new_st, _, finite = single(eqx.combine(d, static), st, x, y, jax.random.fold_in(noise_key, s), s)
            bad = jnp.where((bad < 0) & ~finite, s, bad)
            return (eqx.filter(new_model, eqx.is_array), new_st, bad), None

        steps = jnp.arange(xs.shape[0], dtype=jnp.int32)
        (dyn, state, bad), _ = jax.lax.scan(body, (dyn, state, jnp.asarray(-1, jnp.int32)), (xs, ys, steps))
        return eqx.combine(dyn, static), state, bad

    return chunk


def make_eval_fn(trainable: Any) -> Callable:
    """Jitted ``evaluate(model, x, y) -> metrics`` on held-out data: no noise, no update."""

    @eqx.filter_jit
    def evaluate(model, x, y):
        loss, acc, aux, _, g_probes = forward_backward(model, trainable, x, y, None)
        return {"loss": loss, "accuracy": acc, "layers": model_metrics(model.mlp_blocks(), aux, g_probes, x.shape[0])}

    return evaluate


def locate_nonfinite(model: Any, trainable: Any, x: Array, y: Array, key: Array | None) -> str:
    """Name the first MLP block whose activations or probe gradients are not finite."""
    loss, _, aux, g_params, g_probes = eqx.filter_jit(forward_backward)(model, trainable, x, y, key)
    for i, (ax, pg) in enumerate(zip(aux, g_probes)):
        for name, v in (("z", ax["z"]), ("a", ax["a"]), ("dL/da", pg["a"]), ("dL/dy", pg["y"])):
            if not bool(jnp.all(jnp.isfinite(v))):
                return f"MLP block {i}, {name}"
    if not bool(jnp.isfinite(loss)):
        return "loss (head)"
    for path, g in jax.tree_util.tree_flatten_with_path(g_params)[0]:
        if g is not None and not bool(jnp.all(jnp.isfinite(g))):
            return f"gradient of {jax.tree_util.keystr(path)}"
    return "unknown place"


def flatness_fn(trainable: Any, num_probes: int) -> Callable:
    """Jitted ``flat(model, x, y, key) -> {trace_k, trace_k_se, trace_all, trace_all_se}`` (SPEC 2.7)."""

    @eqx.filter_jit
    def flat(model, x, y, key):
        params, static = eqx.partition(model, trainable)
        probes = zero_probes(model.mlp_blocks(), x.shape[0] * model.tokens_per_sample)

        def f(p):
            return loss_fn(eqx.combine(p, static), probes, x, y, None)[0]

        is_k = jax.tree_util.tree_map(lambda _: False, params)
        is_k = eqx.tree_at(lambda m: [b.key.weight for b in m.mlp_blocks()], is_k,
                           replace=[True] * len(model.mlp_blocks()))
        k1, k2 = jax.random.split(key)
        tk, tk_se = hutchinson_trace(f, params, k1, num_probes, mask=is_k)
        ta, ta_se = hutchinson_trace(f, params, k2, num_probes)
        return {"trace_k": tk, "trace_k_se": tk_se, "trace_all": ta, "trace_all_se": ta_se}

    return flat


@eqx.filter_jit
def _eval_plain(model: Any, x: Array, y: Array) -> tuple[Array, Array]:
    probes = zero_probes(model.mlp_blocks(), x.shape[0] * model.tokens_per_sample)
    loss, (_, acc) = loss_fn(model, probes, x, y, None)
    return loss, acc


def final_eval(model: Any, ds: Dataset, seq_len: int, key: Array) -> dict[str, Any]:
    """Held-out loss/accuracy over (up to 4096 examples of) the whole test split; for text, over
    256 windows of the held-out text drawn with the run's held-out ``key``."""
    if ds.kind == "text":
        x, y = heldout_batch(ds, 256, seq_len, key)
    else:
        x, y = ds.x_test[:4096], ds.y_test[:4096]
    tot_loss = tot_acc = 0.0
    for i in range(0, x.shape[0], 512):
        xb, yb = x[i:i + 512], y[i:i + 512]
        loss, acc = _eval_plain(model, jnp.asarray(xb), jnp.asarray(yb))
        tot_loss += float(loss) * xb.shape[0]
        tot_acc += float(acc) * xb.shape[0]
    n = int(np.shape(x)[0])
    return {"test_loss": tot_loss / n, "test_accuracy": tot_acc / n, "test_examples": n}
