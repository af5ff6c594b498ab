"""Restricted LayerNorm (SPEC 4.2): keep the LN output of each MLP block large and centred.

Why: ||LN(h)||^2 = d without the affine part; with gamma >= 1 and no shift it stays >= d
(SPEC G2), so the key matrix cannot shrink its input to dodge the sparsity pressure.

From scratch:   the LN of every selected MLP block has no shift (beta removed, ``bias=None``),
                and after every optimizer step gamma <- max(gamma, 1).
Finetuning:     the shift beta is frozen (kept, not trained) and after the update of step s
                |gamma| <- max(|gamma|, r(s)) with the sign kept (sign(0) counts as +), where
                r(s) = min((s + 1) / T_up, 1) (see :mod:`gradsparse.plugins.schedules`).
A LayerNorm without a weight has gamma = 1 implicitly; the projections leave it alone.
"""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp

from gradsparse.plugins.blocks import Select, resolve_select, selected_blocks
from gradsparse.plugins.schedules import check_ramp_length, ramp

Array = jax.Array


def remove_ln_shift(model: Any, select: Select | None = None) -> Any:
    """From-scratch restricted LN: drop the shift beta of every selected block's LayerNorm."""
    select = resolve_select(model, select)
    blocks = selected_blocks(model, select, ["restricted_ln"])
    if all(b.ln.bias is None for b in blocks):
        return model
    return eqx.tree_at(lambda m: [b.ln.bias for b in select(m)], model, [None] * len(blocks),
                       is_leaf=lambda x: x is None)


def _gammas(model: Any, select: Select) -> list:
    return [b.ln for b in select(model) if getattr(b.ln, "weight", None) is not None]


def gamma_floor_projection(select: Select | None = None):
    """From scratch: ``project(model, step)`` setting gamma <- max(gamma, 1) on every selected LN."""

    def project(model: Any, step: Array) -> Any:
        sel = resolve_select(model, select)
        lns = _gammas(model, sel)
        if not lns:
            return model
        return eqx.tree_at(lambda m: [ln.weight for ln in _gammas(m, sel)], model,
                           [jnp.maximum(ln.weight, 1.0) for ln in lns])

    project.__name__ = "gamma_floor(1)"
    return project


def signed_floor(gamma: Array, lower: Array | float) -> Array:
    """sign(gamma) * max(|gamma|, lower), with sign(0) = +1."""
    sign = jnp.where(gamma < 0, -1.0, 1.0).astype(gamma.dtype)
    return sign * jnp.maximum(jnp.abs(gamma), lower)


def gamma_ramp_projection(t_up: int, select: Select | None = None):
    """Finetuning: ``project(model, step)`` setting |gamma| <- max(|gamma|, min((step+1)/T_up, 1))."""
    t_up = check_ramp_length("t_up", t_up)

    def project(model: Any, step: Array) -> Any:
        sel = resolve_select(model, select)
        lns = _gammas(model, sel)
        if not lns:
            return model
        lower = ramp(step, t_up)
        return eqx.tree_at(lambda m: [ln.weight for ln in _gammas(m, sel)], model,
                           [signed_floor(ln.weight, lower) for ln in lns])

    project.__name__ = f"gamma_ramp(T_up={t_up})"
    return project


def freeze_ln_shift(mask: Any, select: Select) -> Any:
    """Trainable mask with every selected LN's shift beta set to False (finetuning variant)."""
    blocks = select(mask)
    if all(b.ln.bias is None for b in blocks):
        return mask
    return eqx.tree_at(lambda m: [b.ln.bias for b in select(m) if b.ln.bias is not None], mask,
                       [False] * sum(b.ln.bias is not None for b in blocks))
