"""Finding the MLP blocks (SPEC 1) of a Flax NNX model.

**An MLP block** inside an NNX model is a pair of Linear-like modules (a 2-D ``kernel`` of shape
(in, out), as ``nnx.Linear``) that are children of one module, K with kernel (d, n) and V with
kernel (n, d), where V's input is an elementwise activation of K's output::

    x = input of K (N, d)   z = K x + b_K (N, n)   a = sigma(z) (N, n)   y = V a + b_V (N, d)

(N = tokens: all leading axes of the arrays, flattened). :func:`find_mlp_blocks` finds them by
running the model once on a sample, on a copy (nothing of the model changes): every Linear-like
pair with those shapes whose data flow satisfies ``V.input == sigma(K.output)`` for one of the
activations of :data:`ACTIVATIONS` (to ``MATCH_RTOL max(1, max|a|)``) is a block; the activation
is identified from the same data (for a block whose activation is already a
:class:`~gradsparse.nnx.mixed.MixedActivation`, its ``first``), and the LayerNorm whose output is
K's input (SPEC 1: x = LN(h)), if any, is recorded for the plug-ins. A model that is already
instrumented or sparsified gives the same sites again.

A stochastic layer inside a found block (``nnx.Dropout`` with a rate above 0, or any module of
the block that holds an ``nnx.Rngs`` / ``nnx.RngStream``) is named in ``MLPSite.stochastic`` and
reported with a :class:`StochasticLayerWarning`: the block is found with it switched off, and while
it is on (training with dropout) V's input is no longer sigma(K's output), so the density and
eta = dL/dz of SPEC 2 do not describe the block; measure with it off (``model.eval()``, or
``deterministic=True``), or place it after V.

Limits: each block must be called once per forward (no weight sharing across calls, no
``nnx.scan`` over stacked layers); K and V are Linear-like modules (a block whose weights are bare
2-D ``nnx.Param`` attributes used as ``x @ w`` is named, not found); a gated (GLU) block,
``V(sigma(K1 x) * K2 x)``, is not an MLP block of SPEC 1 and is explained pair by pair.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

from gradsparse.activations import GELU, Activation, GELUTanh, JSReLU, ReLU, ReLU2, SiLU, get_activation
from gradsparse.nnx._modules import Path, get_at, is_linear, kernel, path_name, retype
from gradsparse.nnx.mixed import MixedActivation

#: relative tolerance of the data-flow test V.input == sigma(K.output)
MATCH_RTOL = 1e-5
#: the activations :func:`find_mlp_blocks` recognises, tried in this order
ACTIVATIONS: tuple[Activation, ...] = (ReLU(), JSReLU(), ReLU2(), GELU(), GELUTanh(), SiLU())

_NORMS = (nnx.LayerNorm, nnx.RMSNorm)


@dataclass(frozen=True)
class MLPSite:
    """One MLP block of an NNX model (paths as ``nnx.iter_modules`` gives them).

    ``name``: the block's path ("blocks.0.mlp"); ``block``/``key``/``value``: paths of the block
    module, of K (kernel (d, n)) and of V (kernel (n, d)); ``ln``: path of the LayerNorm whose
    output is K's input, or None; ``act_path``: path of the block attribute holding the activation
    (None when the activation is applied inline, then it cannot be swapped); ``act``: the
    identified activation (a gradsparse Activation); ``d``, ``n``: widths; ``tokens``: T of the
    sample's (..., T, d) input of K (1 for a (B, d) input), the default zeroth-bias length;
    ``stochastic``: paths of the block's stochastic layers (dropout), see the module docstring.
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
    stochastic: tuple[str, ...] = ()


class StochasticLayerWarning(UserWarning):
    """A found MLP block holds a stochastic layer (dropout) whose output SPEC 2's metrics do not model."""


def check_sites(sites: Any) -> tuple[MLPSite, ...]:
    """``sites`` (one MLPSite or an iterable of them) as a non-empty tuple; ValueError otherwise."""
    if isinstance(sites, MLPSite):
        sites = [sites]
    sites = tuple(sites) if isinstance(sites, Iterable) else ()
    if not sites or not all(isinstance(s, MLPSite) for s in sites):
        raise ValueError("sites: must be a non-empty list of MLPSite (from find_mlp_blocks)")
    return sites


def layer_names(sites: Sequence[MLPSite]) -> list[str]:
    """The block names, in the order of the metrics' per-layer entries."""
    return [s.name for s in check_sites(sites)]


def site_activation(model: Any, site: MLPSite) -> Activation:
    """The activation the block applies now: a :class:`MixedActivation`'s current mix, else ``site.act``."""
    if site.act_path is not None:
        m = get_at(model, site.act_path)
        if isinstance(m, MixedActivation):
            return m.activation
    return site.act


# --------------------------------------------------------------------------------------------
# detection: one forward of a copy whose Linear and LayerNorm modules sow their inputs/outputs
# --------------------------------------------------------------------------------------------


class _Seen(nnx.Intermediate):
    """Detection-only sows (inputs/outputs of every Linear and LayerNorm of a copy of the model)."""


def _seen_linear_call(self, base, x, *args, **kwargs):
    self.sow(_Seen, "in", x)
    out = base.__call__(self, x, *args, **kwargs)
    self.sow(_Seen, "out", out)
    return out


def _seen_norm_call(self, base, *args, **kwargs):
    out = base.__call__(self, *args, **kwargs)
    self.sow(_Seen, "out", out)
    return out


def _container(path: Path, modules: dict[Path, Any]) -> Path:
    """The module holding a Linear: its parent, skipping nnx.List / nnx.Dict containers."""
    p = path[:-1]
    while p and isinstance(modules.get(p), (nnx.List, nnx.Dict)):
        p = p[:-1]
    return p


def _close(pred: np.ndarray, a: np.ndarray) -> bool:
    """max |pred - a| <= MATCH_RTOL max(1, max |a|) (same shape required)."""
    a64 = np.asarray(a, dtype=np.float64)
    if pred.shape != a64.shape:
        return False
    tol = MATCH_RTOL * max(1.0, float(np.max(np.abs(a64), initial=0.0)))
    return float(np.max(np.abs(pred - a64), initial=0.0)) <= tol


def _matches(act: Activation, z: np.ndarray, a: np.ndarray) -> bool:
    try:
        pred = np.asarray(act(jnp.asarray(z)), dtype=np.float64)
    except Exception:  # noqa: BLE001 - a user activation that cannot take z simply does not match
        return False
    return pred.shape == np.shape(a) and bool(np.all(np.isfinite(pred))) and _close(pred, a)


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
        if _close(pred, a):
            return block_path + sub
    return None


def _is_stochastic(m: Any) -> bool:
    """An ``nnx.Dropout`` with a rate above 0, or a module holding an ``nnx.Rngs`` / ``nnx.RngStream``."""
    if isinstance(m, nnx.Dropout):
        return float(getattr(m, "rate", 1.0) or 0.0) > 0.0
    return any(isinstance(v, (nnx.Rngs, nnx.RngStream)) for v in vars(m).values())


def stochastic_layers(block: Any, skip: Sequence[Path] = ()) -> list[str]:
    """Paths (relative to ``block``, ``"<block>"`` for the block itself) of the stochastic layers
    of an NNX module: dropout and any module that draws random numbers; ``skip``: paths of
    submodules to leave out (K and V)."""
    if not isinstance(block, nnx.Module):
        raise ValueError(f"block: must be a flax.nnx.Module, got {type(block).__name__}")
    out = []
    for p, m in nnx.iter_modules(block):
        if tuple(p) in set(skip) or not _is_stochastic(m):
            continue
        out.append(path_name(tuple(p)) if p else "<block>")
    return out


def _warn_stochastic(site: MLPSite) -> None:
    names = ", ".join(site.stochastic)
    warnings.warn(f"{site.name} holds a stochastic layer ({names}) inside the MLP block: it was found with the "
                  "layer off, but while it is on (training with dropout) V's input is not sigma(K's output), so "
                  "density and eta = dL/dz no longer describe the block; measure with it off (model.eval() or "
                  "deterministic=True), or move it after V", StochasticLayerWarning, stacklevel=3)


def _bare_params(modules: dict[Path, Any], linears: Sequence[Path]) -> dict[str, str]:
    """{module name: why} for modules that hold 2-D ``nnx.Param`` weights outside Linear-like modules."""
    out = {}
    for p, m in modules.items():
        if p in linears:
            continue
        names = [k for k, v in vars(m).items() if isinstance(v, nnx.Param)
                 and getattr(v.get_value(), "ndim", 0) == 2]
        if names:
            out[path_name(p)] = (f"{path_name(p)} holds bare 2-D nnx.Param {', '.join(names)} (used as x @ w), not "
                                 "Linear-like modules; allowed: K and V as nnx.Linear or any module with a 2-D "
                                 "'kernel' variable")
    return out


def _one_call(seen: dict, path: Path, what: str) -> tuple[Any, str | None]:
    v = seen.get(path + (what,))
    if v is None:
        return None, "not called by the forward"
    if len(v) != 1:
        return None, f"called {len(v)} times per forward (allowed: once)"
    return np.asarray(v[0]), None


def _common(p: Path, q: Path) -> int:
    n = 0
    for a, b in zip(p, q):
        if a != b:
            break
        n += 1
    return n


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
    linears = [p for p, m in modules.items() if is_linear(m)]
    norms = [p for p, m in modules.items() if isinstance(m, _NORMS)]
    for p in linears:
        retype(modules[p], "seen_linear", _seen_linear_call)
    for p in norms:
        retype(modules[p], "seen_norm", _seen_norm_call)
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
    why: dict[str, list[str]] = {k: [v] for k, v in _bare_params(modules, linears).items()}
    for block, members in groups.items():
        pairs = []
        for kp in members:
            for vp in members:
                kk, kv = kernel(modules[kp]).get_value(), kernel(modules[vp]).get_value()
                if kp != vp and kk.shape[1] == kv.shape[0] and kk.shape[0] == kv.shape[1]:
                    pairs.append((kp, vp))
        reasons = why.setdefault(path_name(block), [])
        if not pairs:
            reasons.append("no two Linear layers with kernels (d, n) and (n, d)")
            continue
        hits = []
        for kp, vp in pairs:
            x, e1 = _one_call(seen, kp, "in")
            z, e2 = _one_call(seen, kp, "out")
            a, e3 = _one_call(seen, vp, "in")
            err = e1 or e2 or e3
            if err:
                reasons.append(f"{path_name(kp)} / {path_name(vp)}: {err}")
                continue
            loc = _act_location(block, modules[block], z, a)
            held = get_at(copy, loc) if loc is not None else None
            if isinstance(held, MixedActivation) and act is None:  # a plug-in's mix: its first activation
                sig = held.first
            else:
                sig = next((s for s in acts if _matches(s, z, a)), None)
            if sig is None:
                reasons.append(f"{path_name(kp)} / {path_name(vp)}: {path_name(vp)}'s input is not "
                               f"sigma({path_name(kp)}'s output) for sigma in {', '.join(s.name for s in acts)}")
                continue
            hits.append((kp, vp, x, z, loc, sig))
        if not hits and _gated(pairs, lambda q: tuple(kernel(modules[q]).get_value().shape)):
            reasons.append("it looks gated (GLU: two layers (d, n) feed one (n, d), V(sigma(K1 x) * K2 x)), which is "
                           "not an MLP block of SPEC 1")
        for kp, vp, x, z, loc, sig in hits:
            name = path_name(block) if len(hits) == 1 else f"{path_name(block)}.{kp[-1]}"
            ln = None
            for q in norms:
                outs = seen.get(q + ("out",), ())
                if any(np.shape(o) == x.shape and np.array_equal(np.asarray(o), x) for o in outs):
                    if ln is None or _common(q, kp) > _common(ln, kp):
                        ln = q
            d, n = int(x.shape[-1]), int(z.shape[-1])
            rel = [p[len(block):] for p in (kp, vp)]
            stoch = tuple(f"{path_name(block)}.{q}" if q != "<block>" else path_name(block)
                          for q in stochastic_layers(modules[block], rel))
            site = MLPSite(name, block, kp, vp, ln, loc, sig, d, n, int(x.shape[-2]) if x.ndim >= 3 else 1, stoch)
            found.append(site)
    if select is not None:
        names = [s.name for s in found]
        if callable(select):
            found = [s for s in found if select(s.name)]
        else:
            missing = [s for s in select if s not in names]
            if missing:
                reasons = "; ".join(f"{m}: {'; '.join(why.get(m) or ['no such module holding Linear layers'])}"
                                    for m in missing)
                raise ValueError(f"select: not MLP blocks: {reasons}; allowed: {', '.join(names) or 'none found'}")
            found = [s for s in found if s.name in set(select)]
    if not found:
        detail = " | ".join(f"{k}: {'; '.join(v)}" for k, v in list(why.items())[:6] if v)
        raise ValueError(f"no MLP block (Linear -> activation -> Linear) found: "
                         f"{detail or 'the model has no Linear layers'}")
    for site in found:
        if site.stochastic:
            _warn_stochastic(site)
    return found


def _gated(pairs: Sequence[tuple[Path, Path]], shape: Callable[[Path], tuple[int, ...]]) -> bool:
    """Two or more candidate K layers (kernel (d, n), d != n) for one V: the shape of a gated (GLU) block."""
    ks: dict[Path, set[Path]] = {}
    for kp, vp in pairs:
        d, n = shape(kp)
        if d != n:
            ks.setdefault(vp, set()).add(kp)
    return any(len(v) >= 2 for v in ks.values())
