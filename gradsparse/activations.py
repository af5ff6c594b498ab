"""Activation registry: sigma, sigma', the zero-derivative ("flat") set and its output value.

Every activation is an ``equinox.Module`` (a pytree) so that a model can hold it and a
schedule can change a parameter of it (the mixing weight ``k``) without recompiling.
All functions act elementwise on the last axis of ``z`` (shape ``(..., n)``) except
:class:`TopK`, which couples the units of one token along the last axis.

For each activation:

- ``act(z)``         : sigma(z)
- ``act.deriv(z)``   : sigma'(z), the derivative autodiff returns (at kinks: the stated one-sided value)
- ``act.flat_mask(z)``: bool, z in the zero-derivative set {sigma'(z) = 0}
- ``act.flat_value`` : sigma's output on that set (0 for ReLU-likes, ``sy`` for shifted ones);
                       activation sparsity counts |a - flat_value| <= 1e-6 (SPEC 2.1)

Names accepted by :func:`get_activation`: ``relu``, ``gelu``, ``relu2``, ``jsrelu``,
``shifted_relu(sx,sy)``, ``sshaped(h,sx,sy)``, ``mixed(k)`` (ReLU -> JSReLU), ``topk(k)``
(top-k of ReLU) and ``topk(k,base)``.
"""

from __future__ import annotations

import math
import re
from typing import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.scipy.special import erf

Array = jax.Array

#: tolerance for "derivative is zero" on smooth activations (GELU): |sigma'(z)| <= DERIV_TOL
DERIV_TOL = 1e-6


class Activation(eqx.Module):
    """Base class. Subclasses implement ``__call__``, ``deriv``, ``flat_mask``; ``flat_value`` is 0."""

    def __call__(self, z: Array) -> Array:  # pragma: no cover - abstract
        raise NotImplementedError

    def deriv(self, z: Array) -> Array:  # pragma: no cover - abstract
        raise NotImplementedError

    def flat_mask(self, z: Array) -> Array:
        return self.deriv(z) == 0

    @property
    def flat_value(self) -> float:
        return 0.0

    @property
    def name(self) -> str:
        return type(self).__name__.lower()


class ReLU(Activation):
    """sigma(z) = max(z, 0); sigma'(z) = 1[z > 0] (0 at z = 0, as jax.nn.relu); flat set z <= 0."""

    def __call__(self, z: Array) -> Array:
        return jax.nn.relu(z)

    def deriv(self, z: Array) -> Array:
        return (z > 0).astype(z.dtype)

    def flat_mask(self, z: Array) -> Array:
        return z <= 0

    @property
    def name(self) -> str:
        return "relu"


class GELU(Activation):
    """Exact GELU: sigma(z) = z Phi(z); sigma'(z) = Phi(z) + z phi(z).

    The zero-derivative set of GELU is a single point (z ~ -0.7518) plus the far negative tail
    where sigma' underflows; ``flat_mask`` counts |sigma'(z)| <= DERIV_TOL (1e-6).
    """

    def __call__(self, z: Array) -> Array:
        return jax.nn.gelu(z, approximate=False)

    def deriv(self, z: Array) -> Array:
        cdf = 0.5 * (1.0 + erf(z / math.sqrt(2.0)))
        pdf = jnp.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
        return cdf + z * pdf

    def flat_mask(self, z: Array) -> Array:
        return jnp.abs(self.deriv(z)) <= DERIV_TOL

    @property
    def name(self) -> str:
        return "gelu"


class ReLU2(Activation):
    """Squared ReLU: sigma(z) = max(z, 0)^2; sigma'(z) = 2 max(z, 0); flat set z <= 0."""

    def __call__(self, z: Array) -> Array:
        r = jax.nn.relu(z)
        return r * r

    def deriv(self, z: Array) -> Array:
        return 2.0 * jax.nn.relu(z)

    def flat_mask(self, z: Array) -> Array:
        return z <= 0

    @property
    def name(self) -> str:
        return "relu2"


@jax.custom_jvp
def jsrelu(z: Array) -> Array:
    """J-SquaredReLU: f(z) = z^2/2 + z for z >= 0, else 0.

    Its derivative jumps from 0 to 1 at z = 0: f'(z) = (z + 1) 1[z >= 0]; the custom JVP makes
    autodiff return exactly that (including f'(0) = 1).
    """
    return jnp.where(z >= 0, 0.5 * z * z + z, jnp.zeros_like(z))


@jsrelu.defjvp
def _jsrelu_jvp(primals, tangents):
    (z,), (dz,) = primals, tangents
    return jsrelu(z), jnp.where(z >= 0, z + 1.0, jnp.zeros_like(z)) * dz


class JSReLU(Activation):
    """J-SquaredReLU (SPEC 4.3): f = z^2/2 + z on z >= 0, 0 below; f' = (z+1) 1[z >= 0]; flat set z < 0."""

    def __call__(self, z: Array) -> Array:
        return jsrelu(z)

    def deriv(self, z: Array) -> Array:
        return jnp.where(z >= 0, z + 1.0, jnp.zeros_like(z))

    def flat_mask(self, z: Array) -> Array:
        return z < 0

    @property
    def name(self) -> str:
        return "jsrelu"


class ShiftedReLU(Activation):
    """sigma(z) = max(z - sx, 0) + sy; sigma' = 1[z > sx]; flat set z <= sx with output sy."""

    sx: float = eqx.field(static=True, default=0.0)
    sy: float = eqx.field(static=True, default=0.0)

    def __call__(self, z: Array) -> Array:
        return jax.nn.relu(z - self.sx) + self.sy

    def deriv(self, z: Array) -> Array:
        return (z > self.sx).astype(z.dtype)

    def flat_mask(self, z: Array) -> Array:
        return z <= self.sx

    @property
    def flat_value(self) -> float:
        return float(self.sy)

    @property
    def name(self) -> str:
        return f"shifted_relu({self.sx:g},{self.sy:g})"


class SShaped(Activation):
    """Shifted S-shaped (dead-zone) activation with a flat middle (used for claim G6).

    With u = z - sx: sigma(z) = sy + (u - h) for u > h, sy for |u| <= h, sy + (u + h) for u < -h.
    sigma'(z) = 1[|u| > h]; the flat set is |u| <= h (half-width h) with output sy, which is not 0
    when sy != 0, so sparsity there is "a equals the flat output", not "a = 0".
    """

    h: float = eqx.field(static=True, default=1.5)
    sx: float = eqx.field(static=True, default=0.0)
    sy: float = eqx.field(static=True, default=0.0)

    def __call__(self, z: Array) -> Array:
        u = z - self.sx
        return self.sy + jnp.where(u > self.h, u - self.h, jnp.where(u < -self.h, u + self.h, 0.0 * u))

    def deriv(self, z: Array) -> Array:
        return (jnp.abs(z - self.sx) > self.h).astype(z.dtype)

    def flat_mask(self, z: Array) -> Array:
        return jnp.abs(z - self.sx) <= self.h

    @property
    def flat_value(self) -> float:
        return float(self.sy)

    @property
    def name(self) -> str:
        return f"sshaped({self.h:g},{self.sx:g},{self.sy:g})"


class SShaped2(SShaped):
    """The paper's squared S-shape with a flat middle (claim G6; SPEC 5):

    with u = z - sx: sigma(z) = relu(u - h)^2 - relu(-u - h)^2 + sy,
    sigma'(z) = 2 relu(u - h) + 2 relu(-u - h). The derivative goes to 0 continuously at the edges
    of the flat set |u| <= h (unlike the linear dead-zone :class:`SShaped`), whose output is sy;
    flat set and output as :class:`SShaped`.
    """

    def __call__(self, z: Array) -> Array:
        u = z - self.sx
        return jnp.square(jax.nn.relu(u - self.h)) - jnp.square(jax.nn.relu(-u - self.h)) + self.sy

    def deriv(self, z: Array) -> Array:
        u = z - self.sx
        return 2.0 * jax.nn.relu(u - self.h) + 2.0 * jax.nn.relu(-u - self.h)

    @property
    def name(self) -> str:
        return f"sshaped2({self.h:g},{self.sx:g},{self.sy:g})"


class Mixed(Activation):
    """(1 - k) * first + k * second, with k an array leaf so a schedule can move it (SPEC 4.3).

    Default: ReLU -> JSReLU. k = 0 is exactly ``first``. Flat set: the intersection of both flat
    sets (where both derivatives vanish), output (1-k) flat_first + k flat_second.
    ``k`` is never trained (see ``gradsparse.train.trainable_mask``).
    """

    k: Array
    first: Activation
    second: Activation

    def __call__(self, z: Array) -> Array:
        k = jax.lax.stop_gradient(self.k)
        return (1.0 - k) * self.first(z) + k * self.second(z)

    def deriv(self, z: Array) -> Array:
        k = jax.lax.stop_gradient(self.k)
        return (1.0 - k) * self.first.deriv(z) + k * self.second.deriv(z)

    def flat_mask(self, z: Array) -> Array:
        return self.first.flat_mask(z) & self.second.flat_mask(z)

    @property
    def flat_value(self) -> float:
        # k is traced inside jit; flat outputs of the registry's mixable activations are equal (0)
        return self.first.flat_value

    @property
    def name(self) -> str:
        return f"mixed({self.first.name},{self.second.name})"


class TopK(Activation):
    """Top-k (Lazy Neuron): keep the k largest activations of each token, zero the rest.

    a = base(z) * m, m = 1[base(z) >= k-th largest of the token] (ties may keep more than k);
    sigma' = base'(z) * m; flat set: base's flat set or not kept. Output 0 on the flat set.
    """

    k: int = eqx.field(static=True, default=32)
    base: Activation = ReLU()

    def _mask(self, z: Array) -> Array:
        a = self.base(z)
        kk = min(self.k, z.shape[-1])
        kth = jax.lax.top_k(jax.lax.stop_gradient(a), kk)[0][..., -1:]
        return a >= kth

    def __call__(self, z: Array) -> Array:
        return jnp.where(self._mask(z), self.base(z), jnp.zeros_like(z))

    def deriv(self, z: Array) -> Array:
        return jnp.where(self._mask(z), self.base.deriv(z), jnp.zeros_like(z))

    def flat_mask(self, z: Array) -> Array:
        return self.base.flat_mask(z) | ~self._mask(z)

    @property
    def name(self) -> str:
        return f"topk({self.k},{self.base.name})"


class GELUTanh(Activation):
    """tanh-approximate GELU (``nnx.gelu`` / ``jax.nn.gelu``'s default).

    sigma(z) = z/2 (1 + tanh u), u = c (z + 0.044715 z^3), c = sqrt(2/pi);
    sigma'(z) = (1 + tanh u)/2 + z/2 (1 - tanh^2 u) c (1 + 3 * 0.044715 z^2).
    Flat set: |sigma'(z)| <= DERIV_TOL (1e-6), as for the exact GELU.
    """

    def __call__(self, z: Array) -> Array:
        return jax.nn.gelu(z, approximate=True)

    def deriv(self, z: Array) -> Array:
        c = math.sqrt(2.0 / math.pi)
        t = jnp.tanh(c * (z + 0.044715 * z**3))
        return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * c * (1.0 + 3 * 0.044715 * z * z)

    def flat_mask(self, z: Array) -> Array:
        return jnp.abs(self.deriv(z)) <= DERIV_TOL

    @property
    def name(self) -> str:
        return "gelu_tanh"


class SiLU(Activation):
    """SiLU / swish: sigma(z) = z s(z), s the logistic; sigma'(z) = s(z) (1 + z (1 - s(z))).
    Flat set: |sigma'(z)| <= DERIV_TOL (1e-6)."""

    def __call__(self, z: Array) -> Array:
        return jax.nn.silu(z)

    def deriv(self, z: Array) -> Array:
        s = jax.nn.sigmoid(z)
        return s * (1.0 + z * (1.0 - s))

    def flat_mask(self, z: Array) -> Array:
        return jnp.abs(self.deriv(z)) <= DERIV_TOL

    @property
    def name(self) -> str:
        return "silu"


_SIMPLE: dict[str, Callable[[], Activation]] = {
    "relu": ReLU,
    "gelu": GELU,
    "relu2": ReLU2,
    "gelu_tanh": GELUTanh,
    "silu": SiLU,
    "jsrelu": JSReLU,
}

#: names (with their parameter syntax) accepted by get_activation
ACTIVATION_NAMES = (
    "relu", "gelu", "gelu_tanh", "silu", "relu2", "jsrelu", "shifted_relu(sx,sy)", "sshaped(h,sx,sy)", "sshaped2(h,sx,sy)", "mixed(k)",
    "topk(k[,base])",
)

_CALL = re.compile(r"^\s*([a-z_0-9]+)\s*(?:\((.*)\))?\s*$")


def _floats(args: list[str], name: str, n: int) -> list[float]:
    if len(args) != n:
        raise ValueError(f"activation {name!r} takes {n} numbers, got {len(args)}")
    try:
        vals = [float(a) for a in args]
    except ValueError:
        raise ValueError(f"activation {name!r}: parameters must be numbers, got {args}") from None
    if not all(math.isfinite(v) for v in vals):
        raise ValueError(f"activation {name!r}: parameters must be finite, got {args}")
    return vals


def get_activation(spec: str | Activation) -> Activation:
    """Parse an activation name (see ``ACTIVATION_NAMES``) into an :class:`Activation`.

    Examples: ``"relu"``, ``"sshaped(1.5,1.6,-1.6)"``, ``"mixed(0.25)"``, ``"topk(16,relu)"``.
    Raises ValueError naming the allowed activations for an unknown or malformed name.
    """
    if isinstance(spec, Activation):
        return spec
    if not isinstance(spec, str):
        raise ValueError(f"activation must be a name string, got {type(spec).__name__}")
    m = _CALL.match(spec.lower())
    if not m:
        raise ValueError(f"malformed activation {spec!r}; allowed: {', '.join(ACTIVATION_NAMES)}")
    name, argstr = m.group(1), m.group(2)
    args = [a.strip() for a in argstr.split(",")] if argstr not in (None, "") else []
    if name in _SIMPLE:
        if args:
            raise ValueError(f"activation {name!r} takes no parameters")
        return _SIMPLE[name]()
    if name == "shifted_relu":
        sx, sy = _floats(args, name, 2)
        return ShiftedReLU(sx=sx, sy=sy)
    if name in ("sshaped", "sshaped2"):
        h, sx, sy = _floats(args, name, 3)
        if h < 0:
            raise ValueError(f"{name} half-width h must be >= 0, got {h}")
        return (SShaped if name == "sshaped" else SShaped2)(h=h, sx=sx, sy=sy)
    if name == "mixed":
        (k,) = _floats(args, name, 1)
        if not 0.0 <= k <= 1.0:
            raise ValueError(f"mixed(k) needs 0 <= k <= 1, got {k}")
        return Mixed(k=jnp.asarray(k, jnp.float32), first=ReLU(), second=JSReLU())
    if name == "topk":
        if not 1 <= len(args) <= 2:
            raise ValueError("topk takes k and optionally a base activation: topk(16) or topk(16,gelu)")
        try:
            k = int(args[0])
        except ValueError:
            raise ValueError(f"topk k must be an integer, got {args[0]!r}") from None
        if k < 1:
            raise ValueError(f"topk k must be >= 1, got {k}")
        base = get_activation(args[1]) if len(args) == 2 else ReLU()
        return TopK(k=k, base=base)
    raise ValueError(f"unknown activation {spec!r}; allowed: {', '.join(ACTIVATION_NAMES)}")
