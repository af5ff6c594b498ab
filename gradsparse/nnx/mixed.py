"""The mixed activation of an NNX block (SPEC 4.3): (1 - k) first + k second with a k that is
a model variable but never trained.

    a = (1 - k) first(z) + k second(z)        k in [0, 1]; k = 0 is exactly ``first``

:class:`MixedActivation` replaces a block's activation in place (``gradsparse.nnx.mix_activation``)
and a post-update projection ramps k (``gradsparse.nnx.mix_projection``); the monitors read its
:attr:`MixedActivation.activation` (a gradsparse :class:`~gradsparse.activations.Mixed`) for sigma'
and the flat set, and ``gradsparse.nnx.find_mlp_blocks`` reports its ``first`` as the block's
activation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from gradsparse.activations import Activation, Mixed

Array = jax.Array


def check_unit(name: str, v: object) -> float:
    """``v`` as a float in [0, 1]; ValueError naming ``name`` otherwise."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= float(v) <= 1.0:
        raise ValueError(f"{name}: must be a number in [0, 1], got {v!r}")
    return float(v)


class MixWeight(nnx.Variable):
    """The mixing weight k of :class:`MixedActivation` (not an ``nnx.Param``: never trained)."""


class MixedActivation(nnx.Module):
    """(1 - k) first + k second (SPEC 4.3), k a :class:`MixWeight` scalar; k = 0 is exactly ``first``.

    ``activation`` is the gradsparse :class:`~gradsparse.activations.Mixed` with the current k,
    which the monitors use for sigma' and the flat set.
    """

    def __init__(self, first: Activation, second: Activation, k: float = 0.0):
        for what, a in (("first", first), ("second", second)):
            if not isinstance(a, Activation):
                raise ValueError(f"MixedActivation {what}: must be a gradsparse Activation, got {type(a).__name__}")
        self.first = first
        self.second = second
        self.k = MixWeight(jnp.asarray(check_unit("k", k), jnp.float32))

    @property
    def activation(self) -> Mixed:
        return Mixed(k=self.k[...], first=self.first, second=self.second)

    def __call__(self, z: Array) -> Array:
        return self.activation(z)
