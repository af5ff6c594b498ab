"""Bring your own Flax NNX model: SPEC 2 monitors, SPEC 4 plug-ins and SPEC 3.1 spectra.

Needs the optional extra ``flax`` (``pip install 'gradsparse[flax]'``, flax 0.12.8).

**An MLP block** (SPEC 1) inside an NNX model is a pair of Linear-like modules (a 2-D ``kernel``
of shape (in, out), as ``nnx.Linear``) that are children of one module, K with kernel (d, n) and
V with kernel (n, d), where V's input is an elementwise activation of K's output::

    x = input of K (N, d)   z = K x + b_K (N, n)   a = sigma(z) (N, n)   y = V a + b_V (N, d)

(N = tokens: all leading axes of the arrays, flattened). :func:`find_mlp_blocks` finds them by
running the model once on a sample, on a copy (nothing of the model changes): every Linear-like
pair with those shapes whose data flow satisfies ``V.input == sigma(K.output)`` for one of the
activations of :data:`ACTIVATIONS` (to ``1e-5 max(1, max|a|)``) is a block; the activation is
identified from the same data (for a block whose activation is already a
:class:`MixedActivation`, its ``first``), and the LayerNorm whose output is K's input (SPEC 1:
x = LN(h)), if any, is recorded for the plug-ins. A model that is already instrumented or
sparsified gives the same sites again.

**Probes** (the NNX mirror of :class:`gradsparse.models.MLPBlock`'s): :func:`instrument` gives K
and V, in place, a ``__call__`` that, under ``nnx.capture``, does::

    K:  self.sow(ProbeValue, 'x', x); z = K(x); self.sow(ProbeValue, 'z', z)
    V:  self.sow(ProbeValue, 'a', a); a = self.perturb('a', a, ProbeGrad)
        y = V(a); y = self.perturb('y', y, ProbeGrad)

and behaves exactly as before outside it (same outputs, same state; the parameter paths do not
change, so an optimizer state stays valid). :func:`value_and_grad` runs the user's own loss under
``nnx.capture(ProbeValue, init=zero probes)`` and differentiates with respect to the parameters
and the zero probes in ONE ``nnx.value_and_grad``, so ``g = dL/da`` and ``gV = dL/dy`` per token,
and reduces (x, z, a, g, gV, K, sigma) with :func:`gradsparse.monitors.model_metrics`:
the same SPEC 2.1-2.6 arrays, one entry per block, as the native models give. Gradients are of
the loss the user returns (SPEC 1 wants the MEAN over the batch); ``num_samples`` B (the AF
normalisation of SPEC 2.4) defaults to the leading size of the first array argument.

**Plug-ins** (SPEC 4, each exactly the identity at insertion; in place; post-update projections
``project(model, step) -> model`` to call after each optimizer update, inside or outside jit):

- :func:`mix_activation`: sigma -> (1 - k) sigma + k target with k = 0 at insertion, ramped by
  :func:`mix_projection` to k = min((step + 1) / T_mix, 1) (target ``jsrelu``: the paper's
  ReLU -> J-SquaredReLU mix, SPEC 4.3; ``relu``: a swap to ReLU). Needs the activation to be an
  attribute of the block (``self.act = nnx.relu`` ... ``self.act(z)``) or an ``nnx.Sequential``
  entry, so it can be replaced; k is a :class:`MixWeight` (not a Param: never trained).
- :func:`add_zeroth_bias`: a zero (S, d) ``nnx.Param`` b0 added to K's input (SPEC 4.1, default)
  or to V's output, b0[t] for token t of the (..., T, d) input (b0[0] for 2-D (B, d) inputs, S = 1),
  with :func:`zeroth_bias_projection` clipping |b0[t, j]| <= c |gamma_j| (gamma: scale of the
  block's LayerNorm, 1 without one).
- :func:`restrict_layernorm` (SPEC 4.2): finetuning: the LN shift becomes a :class:`FrozenShift`
  (not a Param: never trained) and :func:`gamma_ramp_projection` sets
  |gamma| <- max(|gamma|, min((step + 1) / T_up, 1)), sign kept; from scratch: the shift is
  removed and :func:`gamma_floor_projection` sets gamma <- max(gamma, 1).
- :func:`sparsify`: all of them in one call, returning the projections in the order they must run
  (gamma bound, mixing ramp, zeroth-bias clip, which reads gamma).

**Spectra**: :func:`named_matrices` turns an NNX model or its ``nnx.state`` into
``{path: matrix}`` (flax kernels (in, out) given as (out, in), so K is n x d as in the native
models); :func:`gradsparse.spectra.analyze` accepts NNX models and states through it.

Limits: each block must be called once per forward (no weight sharing across calls, no
``nnx.scan`` over stacked layers); the first argument of the loss (and of ``call``) is the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gradsparse import monitors
from gradsparse.activations import GELU, Activation, GELUTanh, JSReLU, Mixed, ReLU, ReLU2, SiLU, get_activation
from gradsparse._validate import check_float
from gradsparse.plugins.schedules import check_ramp_length, ramp

Array = jax.Array
Path = tuple  # a path in the model: attribute names and list indices, as nnx.iter_modules gives them
Projection = Callable[[Any, Any], Any]

__all__ = [
    "ACTIVATIONS", "GELUTanh", "SiLU", "ProbeValue", "ProbeGrad", "MixWeight", "FrozenShift", "MixedActivation",
    "MLPSite", "find_mlp_blocks", "instrument", "value_and_grad", "layer_names", "site_activation",
    "mix_activation", "mix_projection", "add_zeroth_bias", "zeroth_bias_projection", "restrict_layernorm",
    "gamma_ramp_projection", "gamma_floor_projection", "sparsify", "named_matrices",
]

#: zeroth-bias placements (SPEC 4.1): K's input (the paper's) or V's output
PLACEMENTS = ("input", "output")
#: relative tolerance of the data-flow test V.input == sigma(K.output)
MATCH_RTOL = 1e-5


#: the activations :func:`find_mlp_blocks` recognises, tried in this order
ACTIVATIONS: tuple[Activation, ...] = (ReLU(), JSReLU(), ReLU2(), GELU(), GELUTanh(), SiLU())


# --------------------------------------------------------------------------------------------
# variable types and the mixed activation
# --------------------------------------------------------------------------------------------


class ProbeValue(nnx.Intermediate):
    """What the probes sow: x and z on K, a on V (a subclass, so a model's own sows never mix in)."""


class ProbeGrad(nnx.Perturbation):
    """The zero probes added at a and y; their gradients are g = dL/da and gV = dL/dy."""


class MixWeight(nnx.Variable):
    """The mixing weight k of :class:`MixedActivation` (not an ``nnx.Param``: never trained)."""


class FrozenShift(nnx.Variable):
    """A LayerNorm shift kept fixed by the finetuning restricted LN (not an ``nnx.Param``)."""


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
        self.k = MixWeight(jnp.asarray(_unit("k", k), jnp.float32))

    @property
    def activation(self) -> Mixed:
        return Mixed(k=self.k[...], first=self.first, second=self.second)

    def __call__(self, z: Array) -> Array:
        return self.activation(z)


# --------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------


def _unit(name: str, v: object) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= float(v) <= 1.0:
        raise ValueError(f"{name}: must be a number in [0, 1], got {v!r}")
    return float(v)


def _name(path: Path) -> str:
    return ".".join(str(p) for p in path) or "<model>"


def _get(root: Any, path: Path) -> Any:
    obj = root
    for k in path:
        obj = obj[k] if isinstance(k, int) or not hasattr(obj, str(k)) else getattr(obj, k)
    return obj


def _set(root: Any, path: Path, value: Any) -> None:
    parent, k = _get(root, path[:-1]), path[-1]
    if isinstance(k, int):
        parent[k] = nnx.data(value)
    else:
        setattr(parent, k, nnx.data(value))


def _kernel(m: Any) -> Any:
    k = getattr(m, "kernel", None)
    return k if isinstance(k, nnx.Variable) else None


def _is_linear(m: Any) -> bool:
    k = _kernel(m)
    return isinstance(m, nnx.Module) and k is not None and getattr(k.get_value(), "ndim", 0) == 2


_NORMS = (nnx.LayerNorm, nnx.RMSNorm)


def _capturing(m: Any) -> bool:
    return hasattr(m, "__captures__")


# --------------------------------------------------------------------------------------------
# re-typing modules in place: a subclass whose __call__ adds the probes
# --------------------------------------------------------------------------------------------


class _Seen(nnx.Intermediate):
    """Detection-only sows (inputs/outputs of every Linear and LayerNorm of a copy of the model)."""


def _zb_rows(b0: Array, v: Array) -> Array:
    """The zeroth-bias rows for ``v``: b0[:T] for (..., T, d) arrays, b0[0] for (B, d) ones (S = 1)."""
    s = b0.shape[0]
    if v.ndim >= 3:
        t = v.shape[-2]
        if t > s:
            raise ValueError(f"zeroth bias: the input has {t} tokens but the bias has {s} rows; "
                             f"allowed: at most {s} tokens (add the bias with seq_len >= {t})")
        return b0[:t]
    if s != 1:
        raise ValueError(f"zeroth bias: a 2-D (B, d) input takes one bias row, got {s}; allowed: seq_len=1, "
                         "or (B, T, d) inputs")
    return b0[0]


def _key_call(self, base, x, *args, **kwargs):
    b0 = getattr(self, "zeroth_bias", None)
    if b0 is not None:
        x = x + _zb_rows(b0[...], x)
    cap = _capturing(self)
    if cap:
        self.sow(ProbeValue, "x", x)
    z = base.__call__(self, x, *args, **kwargs)
    if cap:
        self.sow(ProbeValue, "z", z)
    return z


def _value_call(self, base, a, *args, **kwargs):
    cap = _capturing(self)
    if cap:
        self.sow(ProbeValue, "a", a)
        a = self.perturb("a", a, ProbeGrad)
    y = base.__call__(self, a, *args, **kwargs)
    if cap:
        y = self.perturb("y", y, ProbeGrad)
    b0 = getattr(self, "zeroth_bias", None)
    if b0 is not None:
        y = y + _zb_rows(b0[...], y)
    return y


def _seen_linear_call(self, base, x, *args, **kwargs):
    self.sow(_Seen, "in", x)
    out = base.__call__(self, x, *args, **kwargs)
    self.sow(_Seen, "out", out)
    return out


def _seen_norm_call(self, base, *args, **kwargs):
    out = base.__call__(self, *args, **kwargs)
    self.sow(_Seen, "out", out)
    return out


_CALLS = {"key": _key_call, "value": _value_call, "seen_linear": _seen_linear_call, "seen_norm": _seen_norm_call}
_CLASSES: dict[tuple[type, str], type] = {}


def _subclass(base: type, role: str) -> type:
    """``base`` with the ``role``'s ``__call__`` (cached; same name, isinstance(base) holds)."""
    key = (base, role)
    if key not in _CLASSES:
        call = _CALLS[role]

        def __call__(self, *args, **kwargs):
            return call(self, base, *args, **kwargs)

        ns = {"__call__": __call__, "__module__": __name__, "__qualname__": base.__qualname__,
              "_gradsparse_role": role, "_gradsparse_base": base}
        _CLASSES[key] = type(base)(base.__name__, (base,), ns)
    return _CLASSES[key]


def _role(m: Any) -> str | None:
    return type(m).__dict__.get("_gradsparse_role")


def _retype(m: Any, role: str) -> None:
    object.__setattr__(m, "__class__", _subclass(type(m), role))


# --------------------------------------------------------------------------------------------
# finding the MLP blocks
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MLPSite:
    """One MLP block of an NNX model (paths as ``nnx.iter_modules`` gives them).

    ``name``: the block's path ("blocks.0.mlp"); ``block``/``key``/``value``: paths of the block
    module, of K (kernel (d, n)) and of V (kernel (n, d)); ``ln``: path of the LayerNorm whose
    output is K's input, or None; ``act_path``: path of the block attribute holding the activation
    (None when the activation is applied inline, then it cannot be swapped); ``act``: the
    identified activation (a gradsparse Activation); ``d``, ``n``: widths; ``tokens``: T of the
    sample's (..., T, d) input of K (1 for a (B, d) input), the default zeroth-bias length.
    """

    name: str
    block: Path
    key: Path
    value: Path
    ln: Path | None
    act_path: Path | None
    act: Activation
    d: int
    n: int
    tokens: int


def _container(path: Path, modules: dict[Path, Any]) -> Path:
    """The module holding a Linear: its parent, skipping nnx.List / nnx.Dict containers."""
    p = path[:-1]
    while p and isinstance(modules.get(p), (nnx.List, nnx.Dict)):
        p = p[:-1]
    return p


def _matches(act: Activation, z: np.ndarray, a: np.ndarray) -> bool:
    try:
        pred = np.asarray(act(jnp.asarray(z)), dtype=np.float64)
    except Exception:  # noqa: BLE001 - a user activation that cannot take z simply does not match
        return False
    a64 = np.asarray(a, dtype=np.float64)
    if pred.shape != a64.shape or not np.all(np.isfinite(pred)):
        return False
    tol = MATCH_RTOL * max(1.0, float(np.max(np.abs(a64), initial=0.0)))
    return float(np.max(np.abs(pred - a64), initial=0.0)) <= tol


def _act_location(block_path: Path, block: Any, z: np.ndarray, a: np.ndarray) -> Path | None:
    """The attribute (or nnx.List entry) of ``block`` that maps z to a, if any."""
    cands: list[tuple[Path, Any]] = []
    for attr, v in vars(block).items():
        if attr.startswith("_"):
            continue
        if isinstance(v, nnx.List):
            cands += [((attr, i), e) for i, e in enumerate(v)]
        else:
            cands.append(((attr,), v))
    for sub, v in cands:
        if isinstance(v, (nnx.Variable, type)) or not callable(v):
            continue
        if isinstance(v, nnx.Module) and not isinstance(v, MixedActivation):
            continue
        try:
            pred = np.asarray(v(jnp.asarray(z)), dtype=np.float64)
        except Exception:  # noqa: BLE001 - not an elementwise function of z
            continue
        if pred.shape == a.shape:
            tol = MATCH_RTOL * max(1.0, float(np.max(np.abs(a), initial=0.0)))
            if float(np.max(np.abs(pred - np.asarray(a, np.float64)), initial=0.0)) <= tol:
                return block_path + sub
    return None


def _one_call(seen: dict, path: Path, what: str) -> tuple[Any, str | None]:
    v = seen.get(path + (what,))
    if v is None:
        return None, "not called by the forward"
    if len(v) != 1:
        return None, f"called {len(v)} times per forward (allowed: once)"
    return np.asarray(v[0]), None


def find_mlp_blocks(model: Any, *sample: Any, call: Callable[..., Any] | None = None,
                    select: Sequence[str] | Callable[[str], bool] | None = None,
                    act: Activation | str | None = None) -> list[MLPSite]:
    """The MLP blocks of an NNX ``model``, found by one forward ``call(model, *sample)`` on a copy.

    ``sample``: example inputs (default call: ``model(*sample)``); a few samples suffice.
    ``select``: block names to keep (a sequence: each must be found) or a predicate on the name;
    default all. ``act``: the activation to verify instead of trying :data:`ACTIVATIONS` (a
    gradsparse Activation or a registry name). See the module docstring for the detection rule.
    Returns the sites in model order; raises ValueError when none is found, naming why each
    candidate was rejected.
    """
    if not isinstance(model, nnx.Module):
        raise ValueError(f"model: must be a flax.nnx.Module, got {type(model).__name__}")
    if not sample:
        raise ValueError("sample: pass example inputs (find_mlp_blocks(model, x)); allowed: the positional "
                         "arguments of one forward call, with call= for anything else")
    if call is not None and not callable(call):
        raise ValueError(f"call: must be a function (model, *sample) -> output, got {type(call).__name__}")
    if select is not None and not callable(select):
        if isinstance(select, str) or not all(isinstance(s, str) for s in select):
            raise ValueError(f"select: must be a list of block names or a function name -> bool, got {select!r:.80}")
    acts = ACTIVATIONS if act is None else (get_activation(act),)
    forward = call if call is not None else (lambda m, *a: m(*a))

    copy = nnx.clone(model)
    modules = dict(nnx.iter_modules(copy))
    linears = [p for p, m in modules.items() if _is_linear(m)]
    norms = [p for p, m in modules.items() if isinstance(m, _NORMS)]
    for p in linears:
        _retype(modules[p], "seen_linear")
    for p in norms:
        _retype(modules[p], "seen_norm")
    try:
        _, state = nnx.capture(forward, _Seen)(copy, *sample)
    except Exception as e:  # noqa: BLE001 - the user's forward on the user's sample
        raise ValueError(f"sample: the forward call(model, *sample) failed ({type(e).__name__}: {e}); "
                         "allowed: the inputs the model takes, with call= for another forward") from None
    seen = {tuple(p): v.get_value() for p, v in nnx.to_flat_state(state)}

    groups: dict[Path, list[Path]] = {}
    for p in linears:
        groups.setdefault(_container(p, modules), []).append(p)
    found: list[MLPSite] = []
    why: dict[str, str] = {}
    for block, members in groups.items():
        pairs = []
        for kp in members:
            for vp in members:
                kk, kv = _kernel(modules[kp]).get_value(), _kernel(modules[vp]).get_value()
                if kp != vp and kk.shape[1] == kv.shape[0] and kk.shape[0] == kv.shape[1]:
                    pairs.append((kp, vp))
        if not pairs:
            why[_name(block)] = "no two Linear layers with kernels (d, n) and (n, d)"
            continue
        hits = []
        for kp, vp in pairs:
            x, e1 = _one_call(seen, kp, "in")
            z, e2 = _one_call(seen, kp, "out")
            a, e3 = _one_call(seen, vp, "in")
            err = e1 or e2 or e3
            if err:
                why[_name(block)] = f"{_name(kp)} / {_name(vp)}: {err}"
                continue
            loc = _act_location(block, modules[block], z, a)
            held = _get(copy, loc) if loc is not None else None
            if isinstance(held, MixedActivation) and act is None:  # a plug-in's mix: its first activation
                sig = held.first
            else:
                sig = next((s for s in acts if _matches(s, z, a)), None)
            if sig is None:
                why[_name(block)] = (f"{_name(vp)}'s input is not sigma({_name(kp)}'s output) for sigma in "
                                     f"{', '.join(s.name for s in acts)}")
                continue
            hits.append((kp, vp, x, z, loc, sig))
        for kp, vp, x, z, loc, sig in hits:
            name = _name(block) if len(hits) == 1 else f"{_name(block)}.{kp[-1]}"
            ln = None
            for q in norms:
                outs = seen.get(q + ("out",), ())
                if any(np.shape(o) == x.shape and np.array_equal(np.asarray(o), x) for o in outs):
                    if ln is None or _common(q, kp) > _common(ln, kp):
                        ln = q
            d, n = int(x.shape[-1]), int(z.shape[-1])
            found.append(MLPSite(name, block, kp, vp, ln, loc, sig, d, n, int(x.shape[-2]) if x.ndim >= 3 else 1))
    if select is not None:
        names = [s.name for s in found]
        if callable(select):
            found = [s for s in found if select(s.name)]
        else:
            missing = [s for s in select if s not in names]
            if missing:
                reasons = "; ".join(f"{m}: {why.get(m, 'no such module holding Linear layers')}" for m in missing)
                raise ValueError(f"select: not MLP blocks: {reasons}; allowed: {', '.join(names) or 'none found'}")
            found = [s for s in found if s.name in set(select)]
    if not found:
        detail = "; ".join(f"{k}: {v}" for k, v in list(why.items())[:6]) or "the model has no Linear layers"
        raise ValueError(f"no MLP block (Linear -> activation -> Linear) found: {detail}")
    return found


def _common(p: Path, q: Path) -> int:
    n = 0
    for a, b in zip(p, q):
        if a != b:
            break
        n += 1
    return n


def _check_sites(sites: Any) -> tuple[MLPSite, ...]:
    if isinstance(sites, MLPSite):
        sites = [sites]
    sites = tuple(sites) if isinstance(sites, Iterable) else ()
    if not sites or not all(isinstance(s, MLPSite) for s in sites):
        raise ValueError("sites: must be a non-empty list of MLPSite (from find_mlp_blocks)")
    return sites


def instrument(model: Any, sites: Sequence[MLPSite]) -> Any:
    """Give the K and V modules of every site the probes (in place; idempotent); returns ``model``.

    Outside ``nnx.capture`` the model computes exactly what it did (same outputs, same state and
    parameter paths): only the class of K and V changes, to a subclass of theirs.
    """
    sites = _check_sites(sites)
    targets = []
    for s in sites:
        for path, role in ((s.key, "key"), (s.value, "value")):
            try:
                m = _get(model, path)
            except (AttributeError, IndexError, KeyError, TypeError):
                raise ValueError(f"{s.name}: the model has no module at {_name(path)}; allowed: sites found "
                                 "on this model") from None
            if not _is_linear(m):
                raise ValueError(f"{s.name}: {_name(path)} is not a Linear-like module; allowed: sites found on "
                                 "this model")
            if _role(m) not in (None, role):
                raise ValueError(f"{s.name}: {_name(path)} is already probed as {_role(m)!r}")
            targets.append((m, role))
    for m, role in targets:
        if _role(m) is None:
            _retype(m, role)
    return model


def layer_names(sites: Sequence[MLPSite]) -> list[str]:
    """The block names, in the order of the metrics' per-layer entries."""
    return [s.name for s in _check_sites(sites)]


def site_activation(model: Any, site: MLPSite) -> Activation:
    """The activation the block applies now: a :class:`MixedActivation`'s current mix, else ``site.act``."""
    if site.act_path is not None:
        m = _get(model, site.act_path)
        if isinstance(m, MixedActivation):
            return m.activation
    return site.act


# --------------------------------------------------------------------------------------------
# the monitored value_and_grad
# --------------------------------------------------------------------------------------------


class _Weight:
    def __init__(self, w: Array):
        self._w = w

    def effective_weight(self) -> Array:
        return self._w


class _BlockView:
    """What monitors.model_metrics reads of a block: ``key.effective_weight()`` and ``act``."""

    def __init__(self, k: Array, act: Activation):
        self.key = _Weight(k)
        self.act = act


def _num_samples(num_samples: int | None, args: tuple) -> int:
    if num_samples is not None:
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples: must be a positive int, got {num_samples!r}")
        return num_samples
    for a in args:
        if hasattr(a, "shape") and len(a.shape) >= 1:
            return int(a.shape[0])
    raise ValueError("num_samples: no array argument to take the batch size from; allowed: pass num_samples=B")


def _probe_metrics(model: Any, sites: tuple[MLPSite, ...], values: Any, grads: Any, b: int) -> dict[str, Array]:
    sown = {tuple(p): v.get_value() for p, v in nnx.to_flat_state(values)}
    pg = {tuple(p): v.get_value() for p, v in nnx.to_flat_state(grads)}
    views, aux, probe_grads = [], [], []
    for s in sites:
        got = {}
        for what, path, src in (("x", s.key, sown), ("z", s.key, sown), ("a", s.value, sown)):
            v = src.get(path + (what,))
            if v is None or len(v) != 1:
                n_calls = 0 if v is None else len(v)
                raise ValueError(f"{s.name}: the loss called the block {n_calls} times; allowed: once per forward")
            got[what] = v[0]
        got["g"], got["gV"] = pg[s.value + ("a",)], pg[s.value + ("y",)]
        f32 = {k: v.astype(jnp.float32) for k, v in got.items()}
        d, n = f32["x"].shape[-1], f32["z"].shape[-1]
        aux.append({"x": f32["x"].reshape(-1, d), "z": f32["z"].reshape(-1, n), "a": f32["a"].reshape(-1, n)})
        probe_grads.append({"a": f32["g"].reshape(-1, n), "y": f32["gV"].reshape(-1, d)})
        # K enters the metrics only through ||K||_F^2 (k_fro2), the same for K and K^T: the stored
        # (d, n) kernel is passed as is; a transposed copy cost 27 ms per step on four 512 x 2048
        # kernels on CPU (the metrics themselves 7 ms)
        k = _kernel(_get(model, s.key))[...].astype(jnp.float32)
        views.append(_BlockView(k, site_activation(model, s)))
    return monitors.model_metrics(views, aux, probe_grads, b)


def value_and_grad(loss_fn: Callable[..., Any], sites: Sequence[MLPSite], *, has_aux: bool = False,
                   wrt: Any = nnx.Param, num_samples: int | None = None) -> Callable[..., tuple[Any, Any, dict]]:
    """``fn(model, *args) -> (value, grads, metrics)``: the user's loss, its gradients and the monitors.

    ``loss_fn(model, *args)`` returns the (mean) loss, or ``(loss, aux)`` with ``has_aux``;
    ``value`` is that; ``grads`` is the ``nnx.State`` of gradients w.r.t. the ``wrt`` variables
    (``nnx.Param``), as ``nnx.value_and_grad`` gives; ``metrics`` maps each SPEC 2.1-2.6 name of
    :func:`gradsparse.monitors.layer_metrics` to an (L,) array over the sites (order of
    :func:`layer_names`). Call it inside your jitted step; the model must be instrumented
    (:func:`instrument`). The zero probes are shaped by ``nnx.eval_shape`` (no run-time cost, no
    change of the model's state); ``num_samples`` B defaults to the leading size of the first
    array argument.
    """
    if not callable(loss_fn):
        raise ValueError(f"loss_fn: must be a function (model, *args) -> loss, got {type(loss_fn).__name__}")
    sites = _check_sites(sites)
    if not isinstance(has_aux, bool):
        raise ValueError(f"has_aux: must be True or False, got {has_aux!r}")
    if num_samples is not None:
        _num_samples(num_samples, ())

    def shapes(m, *a):
        return nnx.capture(loss_fn, ProbeGrad)(m, *a)[1]

    def f(m, probes, *a):
        out, values = nnx.capture(loss_fn, ProbeValue, init=probes)(m, *a)
        if has_aux:
            if not (isinstance(out, tuple) and len(out) == 2):
                raise ValueError(f"loss_fn: with has_aux=True it must return (loss, aux), got {type(out).__name__}")
            return out[0], (out[1], values)
        return out, (None, values)

    grad_fn = nnx.value_and_grad(f, argnums=(nnx.DiffState(0, wrt), 1), has_aux=True)

    def fn(model: Any, *args: Any) -> tuple[Any, Any, dict]:
        for s in sites:
            for path, role in ((s.key, "key"), (s.value, "value")):
                if _role(_get(model, path)) != role:
                    raise ValueError(f"{s.name}: {_name(path)} has no probes; allowed: an instrumented model "
                                     "(call gradsparse.nnx.instrument(model, sites) once, outside the step)")
        b = _num_samples(num_samples, args)
        abstract = nnx.eval_shape(shapes, model, *args)
        probes = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), abstract)
        (loss, (aux, values)), (grads, pgrads) = grad_fn(model, probes, *args)
        metrics = _probe_metrics(model, sites, values, pgrads, b)
        return ((loss, aux) if has_aux else loss), grads, metrics

    return fn


# --------------------------------------------------------------------------------------------
# plug-ins (SPEC 4)
# --------------------------------------------------------------------------------------------


def _require_act_path(sites: tuple[MLPSite, ...]) -> None:
    for s in sites:
        if s.act_path is None:
            raise ValueError(f"{s.name}: its activation is applied inline, so it cannot be swapped; allowed: an "
                             "activation held by the block (self.act = nnx.relu ... self.act(z), or an "
                             "nnx.Sequential entry), then find_mlp_blocks again")


def _require_ln(sites: tuple[MLPSite, ...]) -> None:
    for s in sites:
        if s.ln is None:
            raise ValueError(f"{s.name}: no LayerNorm feeds its key layer; allowed: blocks with x = LN(h) "
                             "(an nnx.LayerNorm or nnx.RMSNorm output as K's input)")


def mix_activation(model: Any, sites: Sequence[MLPSite], target: Activation | str = "jsrelu", *,
                   k: float = 0.0) -> Any:
    """Replace each site's activation sigma by :class:`MixedActivation` (1 - k) sigma + k target (in place).

    k = 0 (default) is exactly the old activation; :func:`mix_projection` ramps it. Sites already
    using ``target`` or a MixedActivation are left alone. Needs ``site.act_path`` (see
    :class:`MLPSite`); raises ValueError naming the block otherwise. Returns ``model``.
    """
    sites = _check_sites(sites)
    tgt = get_activation(target)
    if isinstance(tgt, Mixed):
        raise ValueError("target: must be a plain activation (relu, jsrelu, ...), not a mix")
    k = _unit("k", k)
    _require_act_path(sites)
    for s in sites:
        cur = _get(model, s.act_path)
        if isinstance(cur, MixedActivation) or s.act == tgt:
            continue
        _set(model, s.act_path, MixedActivation(s.act, tgt, k))
    return model


def mix_projection(sites: Sequence[MLPSite], t_mix: int) -> Projection:
    """``project(model, step)``: k <- min((step + 1) / T_mix, 1) in every site's MixedActivation."""
    sites = _check_sites(sites)
    t_mix = check_ramp_length("t_mix", t_mix)

    def project(model: Any, step: Any) -> Any:
        k = ramp(step, t_mix)
        for s in sites:
            m = _get(model, s.act_path) if s.act_path is not None else None
            if isinstance(m, MixedActivation):
                m.k[...] = k.astype(m.k[...].dtype)
        return model

    project.__name__ = f"mix_ramp(T_mix={t_mix})"
    return project


def add_zeroth_bias(model: Any, sites: Sequence[MLPSite], *, seq_len: int | None = None,
                    placement: str = "input") -> Any:
    """A zero (S, d) ``nnx.Param`` ``zeroth_bias`` on K (placement 'input') or V ('output'), in place.

    S = ``seq_len``, default each site's ``tokens``. Instruments the sites (the probed call adds
    the bias). A site that already has one keeps it (its shape must match). Returns ``model``.
    """
    sites = _check_sites(sites)
    if placement not in PLACEMENTS:
        raise ValueError(f"zeroth_bias_placement: unknown value {placement!r}; allowed: {', '.join(PLACEMENTS)}")
    if seq_len is not None and (isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1):
        raise ValueError(f"seq_len: must be a positive integer, got {seq_len!r}")
    instrument(model, sites)
    plan = []
    for s in sites:
        rows = seq_len if seq_len is not None else s.tokens
        here, other = (s.key, s.value) if placement == "input" else (s.value, s.key)
        if getattr(_get(model, other), "zeroth_bias", None) is not None:
            raise ValueError(f"{s.name}: already has a zeroth bias at the other placement; allowed: {placement!r} "
                             "only where none exists")
        m = _get(model, here)
        old = getattr(m, "zeroth_bias", None)
        if old is not None:
            if tuple(old[...].shape) != (rows, s.d):
                raise ValueError(f"{s.name}: has a zeroth bias of shape {tuple(old[...].shape)}, expected {(rows, s.d)}")
            continue
        plan.append((m, rows, s.d))
    for m, rows, d in plan:
        m.zeroth_bias = nnx.Param(jnp.zeros((rows, d), _kernel(m)[...].dtype))
    return model


def _gamma(model: Any, s: MLPSite) -> Array | None:
    if s.ln is None:
        return None
    sc = getattr(_get(model, s.ln), "scale", None)
    return sc[...] if isinstance(sc, nnx.Variable) else None


def zeroth_bias_projection(sites: Sequence[MLPSite], c: float = 0.1) -> Projection:
    """``project(model, step)``: clip |b0[t, j]| <= c |gamma_j| for every site's zeroth bias (SPEC 4.1).

    gamma: the scale of the site's LayerNorm after its own projection (run this one last), 1 when
    the site has no LayerNorm or it has no scale.
    """
    sites = _check_sites(sites)
    c = check_float("zeroth_bias_clip", c, 0)

    def project(model: Any, step: Any) -> Any:
        for s in sites:
            for path in (s.key, s.value):
                b0 = getattr(_get(model, path), "zeroth_bias", None)
                if b0 is None:
                    continue
                g = _gamma(model, s)
                bound = c * (jnp.abs(g) if g is not None else jnp.ones((b0[...].shape[-1],), b0[...].dtype))
                b0[...] = jnp.clip(b0[...], -bound, bound)
        return model

    project.__name__ = f"clip_zeroth_bias(c={c:g})"
    return project


def _lns(model: Any, sites: tuple[MLPSite, ...]) -> list[tuple[Path, Any]]:
    out: dict[Path, Any] = {}
    for s in sites:
        if s.ln is not None:
            out[s.ln] = _get(model, s.ln)
    return list(out.items())


def restrict_layernorm(model: Any, sites: Sequence[MLPSite], *, from_scratch: bool = False) -> Any:
    """SPEC 4.2 on each site's LayerNorm, in place. Returns ``model``.

    Finetuning (default): the shift becomes a :class:`FrozenShift` (same values; not trained);
    pair with :func:`gamma_ramp_projection`. From scratch: the shift is removed (the identity
    when it is 0, as at initialisation); pair with :func:`gamma_floor_projection`.
    """
    sites = _check_sites(sites)
    if not isinstance(from_scratch, bool):
        raise ValueError(f"from_scratch: must be True or False, got {from_scratch!r}")
    _require_ln(sites)
    for _, ln in _lns(model, sites):
        b = getattr(ln, "bias", None)
        if not isinstance(b, nnx.Variable):
            continue
        if from_scratch:
            ln.bias = nnx.data(None)
        elif not isinstance(b, FrozenShift):
            ln.bias = FrozenShift(b[...])
    return model


def _signed_floor(g: Array, lower: Array | float) -> Array:
    sign = jnp.where(g < 0, -1.0, 1.0).astype(g.dtype)
    return sign * jnp.maximum(jnp.abs(g), lower)


def gamma_ramp_projection(sites: Sequence[MLPSite], t_up: int) -> Projection:
    """Finetuning: ``project(model, step)``: |gamma| <- max(|gamma|, min((step + 1) / T_up, 1)), sign kept
    (sign(0) = +)."""
    sites = _check_sites(sites)
    t_up = check_ramp_length("t_up", t_up)

    def project(model: Any, step: Any) -> Any:
        lower = ramp(step, t_up)
        for _, ln in _lns(model, sites):
            sc = getattr(ln, "scale", None)
            if isinstance(sc, nnx.Variable):
                sc[...] = _signed_floor(sc[...], lower.astype(sc[...].dtype))
        return model

    project.__name__ = f"gamma_ramp(T_up={t_up})"
    return project


def gamma_floor_projection(sites: Sequence[MLPSite]) -> Projection:
    """From scratch: ``project(model, step)``: gamma <- max(gamma, 1) on every site's LayerNorm."""
    sites = _check_sites(sites)

    def project(model: Any, step: Any) -> Any:
        for _, ln in _lns(model, sites):
            sc = getattr(ln, "scale", None)
            if isinstance(sc, nnx.Variable):
                sc[...] = jnp.maximum(sc[...], 1.0)
        return model

    project.__name__ = "gamma_floor(1)"
    return project


def sparsify(model: Any, sites: Sequence[MLPSite], *, activation: Activation | str | None = None,
             zeroth_bias: bool = False, restricted_ln: bool = False, from_scratch: bool = False,
             t_mix: int = 1000, t_up: int = 1000, zeroth_bias_clip: float = 0.1,
             zeroth_bias_placement: str = "input", seq_len: int | None = None) -> list[Projection]:
    """Plug the SPEC 4 modules into an NNX model (in place); returns the post-update projections.

    ``activation``: mix the blocks' activation towards it (``"jsrelu"``: the paper's ReLU ->
    JSReLU; ``"relu"``: a swap to ReLU) over ``t_mix`` steps (from scratch: k = 1 at once, no ramp);
    ``zeroth_bias``: a zero (S, d) bias at ``zeroth_bias_placement``, clipped to
    ``zeroth_bias_clip`` |gamma|; ``restricted_ln``: LN shift frozen and |gamma| ramped to >= 1
    over ``t_up`` steps (from scratch: no shift, gamma >= 1). Every module is the identity at
    insertion when finetuning. Use with your optax loop::

        projections = gradsparse.nnx.sparsify(model, sites, activation="jsrelu", zeroth_bias=True,
                                              restricted_ln=True)
        optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)   # after sparsify
        # in the jitted step, after optimizer.update(model, grads):
        for project in projections:
            project(model, step)
    """
    sites = _check_sites(sites)
    for name, v in (("zeroth_bias", zeroth_bias), ("restricted_ln", restricted_ln), ("from_scratch", from_scratch)):
        if not isinstance(v, bool):
            raise ValueError(f"{name}: must be True or False, got {v!r}")
    t_mix, t_up = check_ramp_length("t_mix", t_mix), check_ramp_length("t_up", t_up)
    c = check_float("zeroth_bias_clip", zeroth_bias_clip, 0)
    if zeroth_bias_placement not in PLACEMENTS:
        raise ValueError(f"zeroth_bias_placement: unknown value {zeroth_bias_placement!r}; "
                         f"allowed: {', '.join(PLACEMENTS)}")
    if activation is not None:
        get_activation(activation)
        _require_act_path(sites)
    if restricted_ln:
        _require_ln(sites)
    projections: list[Projection] = []
    if restricted_ln:
        restrict_layernorm(model, sites, from_scratch=from_scratch)
        projections.append(gamma_floor_projection(sites) if from_scratch else gamma_ramp_projection(sites, t_up))
    if activation is not None:
        mix_activation(model, sites, activation, k=1.0 if from_scratch else 0.0)
        if not from_scratch:
            projections.append(mix_projection(sites, t_mix))
    if zeroth_bias:
        add_zeroth_bias(model, sites, seq_len=seq_len, placement=zeroth_bias_placement)
        projections.append(zeroth_bias_projection(sites, c))
    return projections


# --------------------------------------------------------------------------------------------
# spectra (SPEC 3.1)
# --------------------------------------------------------------------------------------------


def named_matrices(model_or_state: Any) -> dict[str, np.ndarray]:
    """{path: matrix} for every 2-D floating variable of an NNX model or ``nnx.State``, in state order.

    Names are the variable paths joined with '.' ("blocks.0.mlp.fc1.kernel"). Flax ``kernel``
    variables are (in, out) and are given TRANSPOSED, (out, in), so that K is n x d and the
    spectra table's ``near_zero_rate`` counts the n x n Gram as for the native models; other
    matrices (embeddings) as stored. 3-D variables are taken as layer stacks (nnx.vmap/scan):
    ``name[i]``. Scalars, vectors, integer arrays (RNG state) and 4-D+ arrays are left out.
    Raises ValueError when there is no matrix.
    """
    if isinstance(model_or_state, nnx.Module):
        state = nnx.state(model_or_state)
    elif isinstance(model_or_state, nnx.State):
        state = model_or_state
    else:
        raise ValueError(f"named_matrices: expected a flax.nnx.Module or nnx.State, got {type(model_or_state).__name__}")
    out: dict[str, np.ndarray] = {}
    for path, var in nnx.to_flat_state(state):
        v = var.get_value() if isinstance(var, nnx.Variable) else var
        if not hasattr(v, "ndim") or v.ndim not in (2, 3) or not jnp.issubdtype(v.dtype, jnp.floating):
            continue
        a = np.asarray(v)
        if path and path[-1] == "kernel":
            a = np.swapaxes(a, -1, -2)
        name = _name(tuple(path))
        if a.ndim == 2:
            out[name] = a
        else:
            for i in range(a.shape[0]):
                out[f"{name}[{i}]"] = a[i]
    if not out:
        raise ValueError("no 2-D weights found in the NNX model/state (only scalars, vectors or 4-D+ arrays)")
    return out
