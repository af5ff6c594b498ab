"""LoRA on the key and value matrices for the finetuning route (SPEC 4.6).

A Dense layer W (out, in) becomes W + (alpha / r) B A with A (r, in) drawn
U(-1/sqrt(in), 1/sqrt(in)) and B (out, r) = 0, so the layer is exactly unchanged at
insertion. During finetuning only A and B (and the other plug-ins' own parameters) train;
W and everything else is frozen (see :func:`lora_trainable`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp

from gradsparse._validate import check_float, check_int
from gradsparse.plugins.blocks import Select, resolve_select, selected_blocks

Array = jax.Array
LORA_TARGETS = ("key", "value")


def check_lora_args(rank: object, alpha: object, targets: Sequence[str]) -> tuple[int, float, tuple[str, ...]]:
    """Validate (rank >= 1 int, alpha > 0 finite, targets a non-empty subset of key/value)."""
    rank = check_int("lora_rank", rank, 1)
    alpha = check_float("lora_alpha", alpha, 0, lo_open=True)
    targets = tuple(targets)
    if not targets or any(t not in LORA_TARGETS for t in targets) or len(set(targets)) != len(targets):
        raise ValueError(f"lora_targets: must be distinct names from {', '.join(LORA_TARGETS)}, got {list(targets)}")
    return rank, alpha, targets


def add_lora_to_dense(dense: Any, rank: int, alpha: float, key: Array) -> Any:
    """Dense with LoRA factors A (r, in) ~ U(-1/sqrt(in), 1/sqrt(in)), B (out, r) = 0, scale alpha/r."""
    if dense.lora_a is not None:
        raise ValueError("this Dense layer already has LoRA factors")
    d_out, d_in = dense.weight.shape
    if rank > min(d_in, d_out):
        raise ValueError(f"lora_rank {rank} exceeds min(in, out) = {min(d_in, d_out)} of a {d_out}x{d_in} layer")
    lim = 1.0 / math.sqrt(d_in)
    a = jax.random.uniform(key, (rank, d_in), jnp.float32, -lim, lim)
    b = jnp.zeros((d_out, rank), jnp.float32)
    return dataclasses.replace(dense, lora_a=a, lora_b=b, lora_scale=alpha / rank)


def add_lora(model: Any, rank: int = 4, alpha: float | None = None, key: Array | None = None,
             targets: Sequence[str] = LORA_TARGETS, select: Select | None = None) -> Any:
    """Add LoRA (rank r, scale alpha/r; alpha defaults to r) to the key/value Dense of each selected block.

    ``key``: PRNG key for the A factors (default ``jax.random.key(0)``); one split per layer.
    """
    alpha = float(rank) if alpha is None and isinstance(rank, int) else alpha
    rank, alpha, targets = check_lora_args(rank, alpha, targets)
    key = jax.random.key(0) if key is None else key
    select = resolve_select(model, select)
    blocks = selected_blocks(model, select, ["lora"])
    keys = jax.random.split(key, len(blocks) * len(targets)).reshape(len(blocks), len(targets))
    new_blocks = []
    for blk, ks in zip(blocks, keys):
        for name, k in zip(targets, ks):
            dense = add_lora_to_dense(getattr(blk, name), rank, alpha, k)
            blk = eqx.tree_at(lambda b, name=name: getattr(b, name), blk, dense)
        new_blocks.append(blk)
    return eqx.tree_at(select, model, new_blocks)


def lora_trainable(mask: Any, select: Select, targets: Sequence[str] = LORA_TARGETS,
                   also: Sequence[str] = ("zeroth_bias",)) -> Any:
    """Mask with everything False except the LoRA factors of ``targets`` and the block fields in ``also``.

    ``mask`` is a trainable mask (bool leaves, e.g. from ``gradsparse.models.default_trainable``) of the
    LoRA-augmented model; fields in ``also`` keep the value they had in ``mask``.
    """
    blocks = select(mask)
    kept = [[getattr(b, f) for f in also if getattr(b, f, None) is not None] for b in blocks]
    frozen = jax.tree_util.tree_map(lambda _: False, mask)

    def where(m):
        out = []
        for b in select(m):
            for t in targets:
                out += [getattr(b, t).lora_a, getattr(b, t).lora_b]
            out += [getattr(b, f) for f in also if getattr(b, f, None) is not None]
        return out

    repl = []
    for b, kp in zip(blocks, kept):
        repl += [True, True] * len(targets)
        repl += kp
    return eqx.tree_at(where, frozen, repl)
