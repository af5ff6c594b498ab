"""Zeroth bias: the doubly-biased MLP ("DB-MLP", SPEC 4.1).

A learned per-position bias b0 of shape (S, d), zero at insertion, added to the MLP input

    z_t = K (LN(h_t) + b0[pos_t]) + b_K                (placement 'input', the paper's; default)

or to the MLP output, y_t = V a_t + b_V + b0[pos_t] (placement 'output'). S = model.seq_len
(1 for the MLP on single vectors, the number of tokens for Transformers). After every
optimizer step the bias is clipped elementwise to the scale of the preceding LayerNorm:

    |b0[t, j]| <= c |gamma_j|,   c = 0.1 by default (gamma = 1 when the LN has no weight).

Because b0 starts at 0 the model is exactly unchanged at insertion.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp

from gradsparse._validate import check_float, check_int
from gradsparse.plugins.blocks import Select, block_dim, gamma_of, resolve_select, selected_blocks

Array = jax.Array
PLACEMENTS = ("input", "output")


def add_zeroth_bias(model: Any, *, seq_len: int | None = None, placement: str = "input",
                    select: Select | None = None) -> Any:
    """Give every selected block a zero (S, d) zeroth bias; returns the new model.

    ``seq_len`` S defaults to ``model.seq_len`` (a model without that attribute must pass it).
    A block that already has a zeroth bias keeps it (its values are not reset); asking for a
    different placement than it has is an error.
    """
    if placement not in PLACEMENTS:
        raise ValueError(f"zeroth_bias_placement: unknown value {placement!r}; allowed: {', '.join(PLACEMENTS)}")
    select = resolve_select(model, select)
    blocks = selected_blocks(model, select, ["zeroth_bias"])
    if seq_len is None:
        seq_len = getattr(model, "seq_len", None)
        if seq_len is None:
            raise ValueError(f"{type(model).__name__} has no seq_len; pass seq_len (the number of token positions, "
                             "1 for one vector per sample) for the zeroth bias")
    check_int("seq_len", seq_len, 1)
    new_blocks = []
    for i, blk in enumerate(blocks):
        d = block_dim(blk)
        if blk.zeroth_bias is not None:
            if tuple(blk.zeroth_bias.shape) != (seq_len, d):
                raise ValueError(f"block {i} already has a zeroth bias of shape {tuple(blk.zeroth_bias.shape)}, "
                                 f"expected {(seq_len, d)}")
            if blk.zeroth_bias_placement != placement:
                raise ValueError(f"block {i} already has a zeroth bias at the {blk.zeroth_bias_placement}; "
                                 f"cannot place it at the {placement}")
            new_blocks.append(blk)
            continue
        b0 = jnp.zeros((seq_len, d), jnp.float32)
        blk = eqx.tree_at(lambda b: b.zeroth_bias, blk, b0, is_leaf=lambda x: x is None)
        if blk.zeroth_bias_placement != placement:
            blk = _with_placement(i, blk, placement)
        new_blocks.append(blk)
    return eqx.tree_at(select, model, new_blocks)


def _with_placement(i: int, blk: Any, placement: str) -> Any:
    try:
        return dataclasses.replace(blk, zeroth_bias_placement=placement)
    except (TypeError, ValueError) as e:
        raise ValueError(f"block {i} ({type(blk).__name__}): cannot set its static zeroth_bias_placement "
                         f"to {placement!r} ({e}); give the block class a dataclass-style constructor") from None


def clip_zeroth_bias(b0: Array, gamma: Array | None, c: float) -> Array:
    """Elementwise clip |b0[t, j]| <= c |gamma_j|. b0: (S, d); gamma: (d,) or None (= 1)."""
    bound = c * (jnp.abs(gamma) if gamma is not None else jnp.ones((b0.shape[-1],), b0.dtype))
    return jnp.clip(b0, -bound, bound)


def zeroth_bias_projection(c: float = 0.1, select: Select | None = None):
    """Post-update projection ``project(model, step) -> model`` clipping every selected zeroth bias.

    Blocks without a zeroth bias are left alone. Uses the LayerNorm gamma of the SAME (already
    updated and projected) model, so run it after the restricted-LN projection.
    """
    c = check_float("zeroth_bias_clip", c, 0)

    def project(model: Any, step: Array) -> Any:
        sel = resolve_select(model, select)
        blocks = [b for b in sel(model) if getattr(b, "zeroth_bias", None) is not None]
        if not blocks:
            return model
        new = [clip_zeroth_bias(b.zeroth_bias, gamma_of(b.ln), c) for b in blocks]
        return eqx.tree_at(lambda m: [b.zeroth_bias for b in sel(m) if getattr(b, "zeroth_bias", None) is not None],
                           model, new)

    project.__name__ = f"clip_zeroth_bias(c={c:g})"
    return project
