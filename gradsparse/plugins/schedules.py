"""Ramp schedules of the finetuning route (SPEC 4.2, 4.3), as plain functions of the step.

The training loop applies projections after the optimizer update of step ``s`` (0-based) and
passes ``s``; after that update ``s + 1`` updates have been made, so the ramp value is

    ramp(s, T) = min((s + 1) / T, 1)          (T = 0: 1 from the first update on)

which reaches 1 after exactly T updates. At insertion (before any update) the value is 0.
"""

from __future__ import annotations

from gradsparse._validate import check_int

import jax
import jax.numpy as jnp

Array = jax.Array


def check_ramp_length(name: str, t: object) -> int:
    """``t`` as an int >= 0, else ValueError naming ``name``."""
    return check_int(name, t, 0)


def ramp(step: Array | int, t: int) -> Array:
    """min((step + 1) / t, 1) as a float32 scalar (1 when t = 0); ``step`` may be traced."""
    t = check_ramp_length("t", t)
    if t == 0:
        return jnp.asarray(1.0, jnp.float32)
    return jnp.minimum((jnp.asarray(step, jnp.float32) + 1.0) / float(t), 1.0)
