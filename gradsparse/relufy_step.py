"""The jitted functions of relufication by distillation (student BERT -> frozen teacher BERT).

- :func:`make_distill_step`: ``step(student, opt_state, teacher, ids, mask, types, step) ->
  (student, opt_state, metrics)``: ONE jit region with the teacher's forward pass, the student's
  ``value_and_grad`` over its trainable parameters, the optax update and then the plug-ins'
  post-update projections (gamma ramp, mix ramp, zeroth-bias clip), as
  :func:`gradsparse.step.make_train_step` applies them.
- :func:`make_embed_fn`: ``embed(model, ids, mask, types) -> (embeddings, counts)`` for the held-out
  evaluation, with the per-layer counts behind the densities.

Loss (B sentences of T tokens, mask m; :mod:`gradsparse.distill`)::

    L = (1/B) sum_i (1 - cos(e^s_i, e^t_i))  +  w * (1/L) sum_{l=1..L} MSE_l(h^s_l, h^t_l)

with e the pooled sentence embeddings and MSE_l the mean squared entry difference of layer l's
output over real tokens (the embedding output h^0 is not compared: it is frozen and equal).

Per-layer counts over the REAL tokens of the batch (padding excluded), as SPEC 2.1: ``active`` =
#{|a| > 1e-6} (exact activation density = active / (tokens * n); the flat output of ReLU, JSReLU
and their mix is 0) and ``positive`` = #{z > 0} (for GELU, whose outputs are never exactly 0, the
fraction of positive pre-activations is the density that counts).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

from gradsparse.distill import cosine_loss, hidden_mse
from gradsparse.models.bert import BertEncoder
from gradsparse.plugins import Projection

Array = jax.Array

#: |a| <= ZERO_TOL counts as an exact zero (SPEC 2.1)
ZERO_TOL = 1e-6


def layer_counts(aux: list[dict[str, Array]], mask: Array) -> dict[str, Array]:
    """{'active': (L,), 'positive': (L,), 'tokens': ()} over the real tokens (mask (B, T)) of the per-block aux."""
    m = mask.reshape(-1).astype(jnp.float32)
    active = jnp.stack([jnp.sum((jnp.abs(ax["a"]) > ZERO_TOL).astype(jnp.float32) * m[:, None]) for ax in aux])
    positive = jnp.stack([jnp.sum((ax["z"] > 0).astype(jnp.float32) * m[:, None]) for ax in aux])
    return {"active": active, "positive": positive, "tokens": jnp.sum(m)}


def distill_objective(student: BertEncoder, teacher: BertEncoder, ids: Array, mask: Array, types: Array,
                      hidden_weight: float) -> tuple[Array, dict[str, Any]]:
    """(L, aux) for one batch: L as in the module docstring; aux holds the cosine and hidden terms
    and the student's per-layer counts. The teacher gets no gradient (stop_gradient)."""
    t_hs, _ = teacher.encode_tokens(ids, attention_mask=mask, token_type_ids=types)
    t_hs = [jax.lax.stop_gradient(h) for h in t_hs]
    t_emb = teacher.pool(t_hs[-1], mask)
    s_hs, s_aux = student.encode_tokens(ids, attention_mask=mask, token_type_ids=types)
    s_emb = student.pool(s_hs[-1], mask)
    l_cos = cosine_loss(s_emb, t_emb)
    l_hid = hidden_mse(s_hs[1:], t_hs[1:], mask)
    loss = l_cos + hidden_weight * l_hid if hidden_weight > 0 else l_cos
    return loss, {"cosine_loss": l_cos, "hidden_mse": l_hid, "counts": layer_counts(s_aux, mask)}


def make_distill_step(optimizer: optax.GradientTransformation, trainable: Any,
                      projections: Sequence[Projection] = (), *, hidden_weight: float = 0.0) -> Callable:
    """Jitted ``step(student, opt_state, teacher, ids, mask, types, step_idx) -> (student, opt_state, metrics)``.

    ``metrics``: loss, cosine_loss, hidden_mse, grad_norm (of the trainable parameters) and the
    per-layer counts of this batch, all computed BEFORE the update. ``step_idx`` (int32 scalar,
    0-based) drives the projections' ramps. Deterministic: no PRNG key (no noise plug-ins here).
    """
    if isinstance(hidden_weight, bool) or not isinstance(hidden_weight, (int, float)) or not hidden_weight >= 0:
        raise ValueError(f"hidden_weight: must be a number >= 0, got {hidden_weight!r}")
    projections = tuple(projections)
    hw = float(hidden_weight)

    @eqx.filter_jit
    def step(student, opt_state, teacher, ids, mask, types, step_idx):
        params, static = eqx.partition(student, trainable)

        def f(p):
            return distill_objective(eqx.combine(p, static), teacher, ids, mask, types, hw)

        (loss, aux), grads = jax.value_and_grad(f, has_aux=True)(params)
        updates, new_opt = optimizer.update(grads, opt_state, params)
        new_student = eqx.combine(optax.apply_updates(params, updates), static)
        for proj in projections:
            new_student = proj(new_student, step_idx)
        metrics = {"loss": loss, "cosine_loss": aux["cosine_loss"], "hidden_mse": aux["hidden_mse"],
                   "grad_norm": optax.tree.norm(grads), "counts": aux["counts"]}
        return new_student, new_opt, metrics

    return step


@eqx.filter_jit
def _embed(model: BertEncoder, ids: Array, mask: Array, types: Array, count_mask: Array
           ) -> tuple[Array, dict[str, Array]]:
    hs, aux = model.encode_tokens(ids, attention_mask=mask, token_type_ids=types)
    return model.pool(hs[-1], mask), layer_counts(aux, count_mask)


def make_embed_fn() -> Callable:
    """Jitted ``embed(model, ids, mask, types, count_mask) -> (embeddings (B, d), counts)`` (no noise, no
    gradient); the counts are over the tokens where ``count_mask`` (B, T) is 1 (e.g. the attention
    mask with filler rows zeroed)."""
    return _embed
