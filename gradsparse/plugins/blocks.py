"""Which MLP blocks a plug-in acts on, and the field contract a block must meet.

Every plug-in takes ``select``: a function ``model -> list of blocks``. For the models of
:mod:`gradsparse.models` the default is ``model.mlp_blocks()``. For a user's own equinox model,
``select`` returns that model's MLP blocks, e.g. ``lambda m: m.layers`` or
``lambda m: [blk.ffn for blk in m.blocks]``. ``select`` must only read the model's STRUCTURE
(attribute access, list indexing), never its array values: it is also applied to the
trainable mask (same structure, bool leaves) and inside jitted projections.

Block contract (what each plug-in reads or replaces; the simplest way to meet all of it is to
build the blocks from :class:`gradsparse.models.MLPBlock`, in any container):

===============  ==========================================================================
field            needed by
===============  ==========================================================================
``ln``           zeroth_bias, restricted_ln: a LayerNorm-like module with ``weight`` (gamma,
                 (d,) array or None) and ``bias`` (beta, (d,) array or None)
``key``          zeroth_bias, noise, lora: a :class:`gradsparse.models.Dense` (K: weight (n, d),
                 ``lora_a``/``lora_b``/``lora_scale``)
``value``        lora: a :class:`gradsparse.models.Dense` (V: weight (d, n))
``act``          jsrelu: a :class:`gradsparse.activations.Activation` applied as a = act(z)
``zeroth_bias``  zeroth_bias: (S, d) array or None, with a static ``zeroth_bias_placement``
                 ('input' | 'output'); the forward pass adds ``zeroth_bias[position]`` to the
                 LN output (input) or to the MLP output (output)
``noise``        noise: None or a noise module; the forward pass computes
                 ``z = noise(z, x, key_dense, prng_key, tokens_per_sample)`` when it is given a
                 PRNG key (training) and skips it otherwise (evaluation)
===============  ==========================================================================
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import jax

from gradsparse.activations import Activation
from gradsparse.models import Dense


Select = Callable[[Any], list]
#: a post-update step ``project(model, step) -> model`` (clipping, gamma bounds, schedules), applied
#: after the optax update inside the jitted training step
Projection = Callable[[Any, jax.Array], Any]

#: fields each plug-in needs on a selected block (see the module docstring)
REQUIRED_FIELDS: dict[str, tuple[str, ...]] = {
    "zeroth_bias": ("ln", "key", "zeroth_bias", "zeroth_bias_placement"),
    "restricted_ln": ("ln",),
    "jsrelu": ("act",),
    "noise": ("key", "noise"),
    "lora": ("key", "value"),
}


def default_select(model: Any) -> list:
    """``model.mlp_blocks()`` (every gradsparse model has it)."""
    return list(model.mlp_blocks())


def resolve_select(model: Any, select: Select | None) -> Select:
    """``select`` itself, or :func:`default_select` when the model has ``mlp_blocks``."""
    if select is not None:
        if not callable(select):
            raise ValueError(f"select must be a function model -> list of MLP blocks, got {type(select).__name__}")
        return select
    if not callable(getattr(model, "mlp_blocks", None)):
        raise ValueError(f"{type(model).__name__} has no mlp_blocks(); pass select=lambda model: [its MLP blocks] "
                         "(see gradsparse.plugins.blocks for the fields a block must have)")
    return default_select


def selected_blocks(model: Any, select: Select, modules: Iterable[str]) -> list:
    """Apply ``select`` and check every block has the fields the requested ``modules`` need.

    Raises ValueError naming the block, the missing field and the plug-in that needs it.
    """
    blocks = select(model)
    if isinstance(blocks, tuple):
        blocks = list(blocks)
    if not isinstance(blocks, list) or not blocks:
        raise ValueError(f"select(model) must return a non-empty list of MLP blocks, got {blocks!r:.80}")
    for i, blk in enumerate(blocks):
        for mod in modules:
            for f in REQUIRED_FIELDS[mod]:
                if not hasattr(blk, f):
                    raise ValueError(f"block {i} ({type(blk).__name__}) has no field {f!r}, which {mod} needs; "
                                     f"a block must expose {', '.join(REQUIRED_FIELDS[mod])} for {mod} "
                                     "(see gradsparse.plugins.blocks)")
        if "zeroth_bias" in modules or "restricted_ln" in modules:
            for f in ("weight", "bias"):
                if not hasattr(blk.ln, f):
                    raise ValueError(f"block {i}: its ln ({type(blk.ln).__name__}) has no {f!r} attribute; the "
                                     "LayerNorm must expose weight (gamma) and bias (beta), each an array or None")
        if "zeroth_bias" in modules or "noise" in modules or "lora" in modules:
            _check_dense(i, "key", blk.key)
        if "lora" in modules:
            _check_dense(i, "value", blk.value)
        if "jsrelu" in modules and not isinstance(blk.act, Activation):
            raise ValueError(f"block {i}: act is a {type(blk.act).__name__}, jsrelu needs a "
                             "gradsparse.activations.Activation")
    return blocks


def _check_dense(i: int, name: str, dense: Any) -> None:
    if not isinstance(dense, Dense):
        raise ValueError(f"block {i}: {name} is a {type(dense).__name__}; plug-ins need a gradsparse.models.Dense "
                         "(weight (out, in), bias, lora_a, lora_b, lora_scale)")


def block_dim(blk: Any) -> int:
    """d, the width of the block's input (columns of K)."""
    return int(blk.key.weight.shape[1])


def gamma_of(ln: Any) -> jax.Array | None:
    """The LayerNorm scale gamma, or None (no affine weight: gamma = 1)."""
    return getattr(ln, "weight", None)
