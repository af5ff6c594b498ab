"""The jitted functions of training and evaluation: one step over an objective, the fused chunk.

An **objective** is ``objective(model, batch, key) -> (loss, aux)``: ``batch`` any pytree of arrays
with the examples on the leading axis, ``key`` the step's PRNG key (for the noise modules a model
holds; ignored otherwise), ``aux`` a dict of arrays. Objectives that feed the monitors also
accept ``probes=`` (one {'a': (N, n), 'y': (N, d)} zero array pair per MLP block, the inputs
dL/da and dL/dy are read from) and say how many token rows N a batch has (``tokens(model,
batch)``); their aux holds ``blocks`` (per-block {x, z, a}) and, for padded token batches,
``mask`` (N,). Every other aux entry (accuracy, the distillation terms) is reported as a metric.
Two objectives: :class:`CrossEntropy` (classification and next-byte prediction, with probes) and
the relufication's distillation (:class:`gradsparse.relufy.objective.Distill`).

- :func:`make_train_step`: ``step(model, state, batch, key, step) -> (model, state, metrics,
  finite)``: value_and_grad of the objective over the trainable parameters (and the probes when
  the monitors or the covariance accumulators need dL/da), optax update, post-update projections,
  the monitors and the accumulators, all in ONE jit region.
- :func:`make_train_chunk`: ``chunk(model, state, batches, noise_key, first_step) -> (model,
  state, bad_step)``: ``n`` plain steps in one ``lax.scan`` whose body IS the step (bit-equal
  parameters for the MLPs, tested), with no host sync; ``bad_step`` is the first step whose loss
  or gradient was not finite (-1 if none).
- The cross-entropy shorthand of both (the form the checks and benchmarks use):
  ``make_train_step(optimizer, trainable, projections)`` -> ``step(model, state, x, y, key, step)``
  and ``make_train_chunk(optimizer, ...)`` -> ``chunk(model, state, xs, ys, noise_key, first)``.
- :func:`loss_fn`, :func:`forward_backward`, :func:`make_eval_fn`, :func:`flatness_fn`,
  :func:`final_eval`, :func:`locate_nonfinite`.
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
from gradsparse.monitors import model_metrics, token_counts
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


class CrossEntropy(eqx.Module):
    """The objective of classification and byte-level language modelling: mean cross-entropy of
    ``model(x, probes, key=key)`` on ``batch = (x, y)``; aux = {accuracy, blocks}."""

    def tokens(self, model: Any, batch: tuple[Array, Array]) -> int:
        return batch[0].shape[0] * model.tokens_per_sample

    def __call__(self, model: Any, batch: tuple[Array, Array], key: Array | None, probes: Any = None
                 ) -> tuple[Array, dict[str, Any]]:
        x, y = batch
        if probes is None:
            probes = zero_probes(model.mlp_blocks(), self.tokens(model, batch))
        loss, (aux, acc) = loss_fn(model, probes, x, y, key)
        return loss, {"accuracy": acc, "blocks": aux}


#: the cross-entropy objective (stateless: one instance serves every run)
CROSS_ENTROPY = CrossEntropy()
#: aux entries of an objective that are inputs of the monitors, not metrics
_MONITOR_INPUTS = ("blocks", "mask")


def _check_monitors(monitors: Any) -> str | None:
    if monitors is True or monitors == "full":
        return "full"
    if monitors is False or monitors is None:
        return None
    if monitors == "counts":
        return "counts"
    raise ValueError(f"monitors: got {monitors!r}; allowed: True / 'full' (SPEC 2.1-2.6 with dL/da), 'counts' "
                     "(exact density counts over real tokens, forward only) or False")


def _step_fn(optimizer: optax.GradientTransformation, trainable: Any, projections: tuple, monitors: str | None,
             accumulator: Accumulator | None) -> Callable:
    """The jitted ``step(objective, model, state, batch, key, step_idx)``: the objective is an argument,
    so the arrays it holds (a teacher) are traced inputs, not constants baked into the program."""
    probe_grads = monitors == "full" or accumulator is not None  # the plain step never reads dL/da

    @eqx.filter_jit
    def step(objective, model, state, batch, key, step_idx):
        opt_state, acc_state = state if accumulator is not None else (state, None)
        params, static = eqx.partition(model, trainable)
        if probe_grads:
            probes = zero_probes(model.mlp_blocks(), objective.tokens(model, batch))

            def f(p, pr):
                return objective(eqx.combine(p, static), batch, key, probes=pr)

            (loss, aux), (g_params, g_probes) = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(params, probes)
        else:
            def f(p):
                return objective(eqx.combine(p, static), batch, key)

            (loss, aux), g_params = jax.value_and_grad(f, has_aux=True)(params)
            g_probes = None
        updates, new_opt = optimizer.update(g_params, opt_state, params)
        new_model = eqx.combine(optax.apply_updates(params, updates), static)
        for proj in projections:
            new_model = proj(new_model, step_idx)
        gnorm = optax.tree.norm(g_params)
        finite = jnp.isfinite(loss) & jnp.isfinite(gnorm)
        metrics = {"loss": loss, **{k: v for k, v in aux.items() if k not in _MONITOR_INPUTS}, "grad_norm": gnorm}
        num_samples = jax.tree_util.tree_leaves(batch)[0].shape[0]
        if monitors == "full":
            metrics["layers"] = model_metrics(model.mlp_blocks(), aux["blocks"], g_probes, num_samples,
                                              aux.get("mask"))
        elif monitors == "counts":
            metrics["counts"] = token_counts(model.mlp_blocks(), aux["blocks"], aux.get("mask"))
        if accumulator is None:
            return new_model, new_opt, metrics, finite
        blocks = aux["blocks"]
        etas = [pg["a"] * blk.act.deriv(ax["z"]) for blk, ax, pg in zip(model.mlp_blocks(), blocks, g_probes)]
        new_acc = accumulator.update(acc_state, [ax["x"] for ax in blocks], etas, num_samples)
        return new_model, (new_opt, new_acc), metrics, finite

    return step


def make_train_step(objective: Callable | optax.GradientTransformation, optimizer: Any = None, trainable: Any = None,
                    projections: Sequence[Projection] = (), *, monitors: bool | str = True,
                    accumulator: Accumulator | None = None) -> Callable:
    """Jitted ``step(model, state, batch, key, step) -> (model, state, metrics, finite)`` of ``objective``.

    ``state`` is the optimizer state, or ``(optimizer state, covariance state)`` with an
    ``accumulator`` (:func:`gradsparse.factory.init_state` builds it; it needs an objective with
    probes). ``metrics`` holds loss, grad_norm, the objective's other aux entries and, with
    ``monitors``, the per-layer monitors of this batch computed BEFORE the update: True (or
    'full') the SPEC 2.1-2.6 arrays under ``layers`` (dL/da from the probes), 'counts' the exact
    density counts over the real tokens under ``counts`` (:func:`gradsparse.monitors.token_counts`,
    forward only). ``key`` (pass ``fold_in(noise_key, step)``) drives the noise modules a model
    holds. ``finite`` is False when the loss or the gradient norm is NaN/inf; the caller then
    keeps the old model and state. Without monitors and accumulator the step differentiates the
    parameters only; its new parameters equal the monitored step's (tests/test_step_plain.py).

    Cross-entropy shorthand: ``make_train_step(optimizer, trainable, projections, ...)`` (an optax
    transformation first) is the step of :data:`CROSS_ENTROPY` called as ``step(model, state, x,
    y, key, step)``.
    """
    if isinstance(objective, optax.GradientTransformation):  # the cross-entropy shorthand
        optimizer, trainable, projections = objective, optimizer, (trainable if trainable is not None else projections)
        inner = make_train_step(CROSS_ENTROPY, optimizer, trainable, projections, monitors=monitors,
                                accumulator=accumulator)

        def xy_step(model, state, x, y, key, step_idx):
            return inner(model, state, (x, y), key, step_idx)

        return xy_step
    if not callable(objective):
        raise ValueError(f"objective: got {type(objective).__name__}; allowed: a callable (model, batch, key) -> "
                         "(loss, aux)")
    jitted = _step_fn(optimizer, trainable, tuple(projections), _check_monitors(monitors), accumulator)

    def step(model, state, batch, key, step_idx):
        return jitted(objective, model, state, batch, key, step_idx)

    step.jitted = jitted
    return step


def make_train_chunk(objective: Callable | optax.GradientTransformation, optimizer: Any = None,
                     trainable: Any = None, projections: Sequence[Projection] = (), *,
                     accumulator: Accumulator | None = None) -> Callable:
    """Jitted ``chunk(model, state, batches, noise_key, first_step) -> (model, state, bad_step)``.

    Runs ``n`` plain steps (``monitors=False``) of ``objective`` in one ``lax.scan``: step
    ``s = first_step + i`` trains on the i-th slice of ``batches`` (every leaf (n, B, ...)) with
    the noise key ``fold_in(noise_key, s)`` and projection step ``s``, exactly as ``n`` calls of
    :func:`make_train_step`'s step would (the scan body IS that step, so the parameters of the
    MLPs are bit-equal to single steps: ``tests/test_fused.py``; in the Transformers XLA compiles
    the scanned step with ulp-level differences). Nothing is synchronised with the host inside
    the chunk; ``bad_step`` (int32) is the first ``s`` whose loss or gradient norm was not finite,
    or -1. Past a bad step the carried model is not meaningful: the caller replays the chunk
    with single steps from its start (:func:`locate_nonfinite`) and discards it.

    Cross-entropy shorthand: ``make_train_chunk(optimizer, trainable, projections)`` ->
    ``chunk(model, state, xs, ys, noise_key, first_step)``.
    """
    if isinstance(objective, optax.GradientTransformation):  # the cross-entropy shorthand
        optimizer, trainable, projections = objective, optimizer, (trainable if trainable is not None else projections)
        inner = make_train_chunk(CROSS_ENTROPY, optimizer, trainable, projections, accumulator=accumulator)

        def xy_chunk(model, state, xs, ys, noise_key, first_step):
            if xs.shape[0] != ys.shape[0] or xs.shape[0] < 1:
                raise ValueError(f"chunk: xs {tuple(xs.shape)} and ys {tuple(ys.shape)} must share a leading axis "
                                 "n >= 1")
            return inner(model, state, (xs, ys), noise_key, first_step)

        return xy_chunk
    single = _step_fn(optimizer, trainable, tuple(projections), None, accumulator)

    @eqx.filter_jit
    def chunk(objective, model, state, batches, noise_key, first_step):
        lead = {a.shape[0] for a in jax.tree_util.tree_leaves(batches)}
        if len(lead) != 1 or min(lead) < 1:
            raise ValueError(f"chunk: the batches must share one leading axis n >= 1, got {sorted(lead)}")
        n = lead.pop()
        dyn, static = eqx.partition(model, eqx.is_array)
        first = jnp.asarray(first_step, jnp.int32)

        def body(carry, inp):
            d, st, bad = carry
            batch, i = inp
            s = first + i
            new_model, new_st, _, finite = single(objective, eqx.combine(d, static), st, batch,
                                                  jax.random.fold_in(noise_key, s), s)
            bad = jnp.where((bad < 0) & ~finite, s, bad)
            return (eqx.filter(new_model, eqx.is_array), new_st, bad), None

        steps = jnp.arange(n, dtype=jnp.int32)
        (dyn, state, bad), _ = jax.lax.scan(body, (dyn, state, jnp.asarray(-1, jnp.int32)), (batches, steps))
        return eqx.combine(dyn, static), state, bad

    def run(model, state, batches, noise_key, first_step):
        return chunk(objective, model, state, batches, noise_key, first_step)

    return run


def make_eval_fn(trainable: Any) -> Callable:
    """Jitted ``evaluate(model, x, y) -> metrics`` on held-out data: no noise, no update."""

    @eqx.filter_jit
    def evaluate(model, x, y):
        loss, acc, aux, _, g_probes = forward_backward(model, trainable, x, y, None)
        return {"loss": loss, "accuracy": acc, "layers": model_metrics(model.mlp_blocks(), aux, g_probes, x.shape[0])}

    return evaluate


def locate_nonfinite(model: Any, trainable: Any, batch: Any, key: Array | None, objective: Any = CROSS_ENTROPY
                     ) -> str:
    """Name the first MLP block whose activations or probe gradients are not finite (then the
    loss, then the first parameter gradient) for ``objective`` on ``batch``."""
    params, static = eqx.partition(model, trainable)
    probes = zero_probes(model.mlp_blocks(), objective.tokens(model, batch))

    @eqx.filter_jit
    def fb(objective, params, probes, batch, key):
        def f(p, pr):
            return objective(eqx.combine(p, static), batch, key, probes=pr)
        return jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(params, probes)

    (loss, aux), (g_params, g_probes) = fb(objective, params, probes, batch, key)
    for i, (ax, pg) in enumerate(zip(aux["blocks"], g_probes)):
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
