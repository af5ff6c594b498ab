"""The SPEC 4 plug-ins on an NNX model's MLP blocks: each exactly the identity at insertion, in
place, with post-update projections ``project(model, step) -> model`` (a
:data:`gradsparse.plugins.Projection`) to call after each optimizer update, inside or outside jit.

- :func:`mix_activation` (SPEC 4.3): sigma -> (1 - k) sigma + k target with k = 0 at insertion,
  ramped by :func:`mix_projection` to k = min((step + 1) / T_mix, 1) (target ``jsrelu``: the
  paper's ReLU -> J-SquaredReLU mix; ``relu``: a swap to ReLU). Needs the activation to be an
  attribute of the block (``self.act = nnx.relu`` ... ``self.act(z)``) or an ``nnx.Sequential``
  entry, so it can be replaced; k is a :class:`~gradsparse.nnx.mixed.MixWeight` (not a Param:
  never trained).
- :func:`add_zeroth_bias` (SPEC 4.1): a zero (S, d) ``nnx.Param`` b0 added to K's input (default)
  or to V's output (placements :data:`gradsparse.plugins.zeroth_bias.PLACEMENTS`), b0[t] for token
  t of the (..., T, d) input (b0[0] for 2-D (B, d) inputs, S = 1), with
  :func:`zeroth_bias_projection` clipping |b0[t, j]| <= c |gamma_j| (gamma: scale of the block's
  LayerNorm, 1 without one).
- :func:`restrict_layernorm` (SPEC 4.2): finetuning: the LN shift becomes a :class:`FrozenShift`
  (not a Param: never trained) and :func:`gamma_ramp_projection` sets
  |gamma| <- max(|gamma|, min((step + 1) / T_up, 1)), sign kept; from scratch: the shift is
  removed and :func:`gamma_floor_projection` sets gamma <- max(gamma, 1).
- :func:`sparsify`: all of them in one call, returning the projections in the order they must run
  (gamma bound, mixing ramp, zeroth-bias clip, which reads gamma).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from gradsparse._validate import check_choice, check_float
from gradsparse.activations import Activation, Mixed, get_activation
from gradsparse.nnx._modules import Path, get_at, kernel, set_at
from gradsparse.nnx.discover import MLPSite, check_sites
from gradsparse.nnx.mixed import MixedActivation, check_unit
from gradsparse.nnx.probes import instrument
from gradsparse.plugins.blocks import Projection
from gradsparse.plugins.schedules import check_ramp_length, ramp
from gradsparse.plugins.zeroth_bias import PLACEMENTS

Array = jax.Array


class FrozenShift(nnx.Variable):
    """A LayerNorm shift kept fixed by the finetuning restricted LN (not an ``nnx.Param``)."""


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


# --------------------------------------------------------------------------------------------
# the activation mix (SPEC 4.3)
# --------------------------------------------------------------------------------------------


def mix_activation(model: Any, sites: Sequence[MLPSite], target: Activation | str = "jsrelu", *,
                   k: float = 0.0) -> Any:
    """Replace each site's activation sigma by :class:`MixedActivation` (1 - k) sigma + k target (in place).

    k = 0 (default) is exactly the old activation; :func:`mix_projection` ramps it. Sites already
    using ``target`` or a MixedActivation are left alone. Needs ``site.act_path`` (see
    :class:`MLPSite`); raises ValueError naming the block otherwise. Returns ``model``.
    """
    sites = check_sites(sites)
    tgt = get_activation(target)
    if isinstance(tgt, Mixed):
        raise ValueError("target: must be a plain activation (relu, jsrelu, ...), not a mix")
    k = check_unit("k", k)
    _require_act_path(sites)
    for s in sites:
        cur = get_at(model, s.act_path)
        if isinstance(cur, MixedActivation) or s.act == tgt:
            continue
        set_at(model, s.act_path, MixedActivation(s.act, tgt, k))
    return model


def mix_projection(sites: Sequence[MLPSite], t_mix: int) -> Projection:
    """``project(model, step)``: k <- min((step + 1) / T_mix, 1) in every site's MixedActivation."""
    sites = check_sites(sites)
    t_mix = check_ramp_length("t_mix", t_mix)

    def project(model: Any, step: Any) -> Any:
        k = ramp(step, t_mix)
        for s in sites:
            m = get_at(model, s.act_path) if s.act_path is not None else None
            if isinstance(m, MixedActivation):
                m.k[...] = k.astype(m.k[...].dtype)
        return model

    project.__name__ = f"mix_ramp(T_mix={t_mix})"
    return project


# --------------------------------------------------------------------------------------------
# the zeroth bias (SPEC 4.1)
# --------------------------------------------------------------------------------------------


def add_zeroth_bias(model: Any, sites: Sequence[MLPSite], *, seq_len: int | None = None,
                    placement: str = "input") -> Any:
    """A zero (S, d) ``nnx.Param`` ``zeroth_bias`` on K (placement 'input') or V ('output'), in place.

    S = ``seq_len``, default each site's ``tokens``. Instruments the sites (the probed call adds
    the bias). A site that already has one keeps it (its shape must match). Returns ``model``.
    """
    sites = check_sites(sites)
    check_choice("zeroth_bias_placement", placement, PLACEMENTS)
    if seq_len is not None and (isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1):
        raise ValueError(f"seq_len: must be a positive integer, got {seq_len!r}")
    instrument(model, sites)
    plan = []
    for s in sites:
        rows = seq_len if seq_len is not None else s.tokens
        here, other = (s.key, s.value) if placement == "input" else (s.value, s.key)
        if getattr(get_at(model, other), "zeroth_bias", None) is not None:
            raise ValueError(f"{s.name}: already has a zeroth bias at the other placement; allowed: {placement!r} "
                             "only where none exists")
        m = get_at(model, here)
        old = getattr(m, "zeroth_bias", None)
        if old is not None:
            if tuple(old[...].shape) != (rows, s.d):
                raise ValueError(f"{s.name}: has a zeroth bias of shape {tuple(old[...].shape)}, expected {(rows, s.d)}")
            continue
        plan.append((m, rows, s.d))
    for m, rows, d in plan:
        m.zeroth_bias = nnx.Param(jnp.zeros((rows, d), kernel(m)[...].dtype))
    return model


def _gamma(model: Any, s: MLPSite) -> Array | None:
    if s.ln is None:
        return None
    sc = getattr(get_at(model, s.ln), "scale", None)
    return sc[...] if isinstance(sc, nnx.Variable) else None


def zeroth_bias_projection(sites: Sequence[MLPSite], c: float = 0.1) -> Projection:
    """``project(model, step)``: clip |b0[t, j]| <= c |gamma_j| for every site's zeroth bias (SPEC 4.1).

    gamma: the scale of the site's LayerNorm after its own projection (run this one last), 1 when
    the site has no LayerNorm or it has no scale.
    """
    sites = check_sites(sites)
    c = check_float("zeroth_bias_clip", c, 0)

    def project(model: Any, step: Any) -> Any:
        for s in sites:
            for path in (s.key, s.value):
                b0 = getattr(get_at(model, path), "zeroth_bias", None)
                if b0 is None:
                    continue
                g = _gamma(model, s)
                bound = c * (jnp.abs(g) if g is not None else jnp.ones((b0[...].shape[-1],), b0[...].dtype))
                b0[...] = jnp.clip(b0[...], -bound, bound)
        return model

    project.__name__ = f"clip_zeroth_bias(c={c:g})"
    return project


# --------------------------------------------------------------------------------------------
# the restricted LayerNorm (SPEC 4.2)
# --------------------------------------------------------------------------------------------


def _lns(model: Any, sites: tuple[MLPSite, ...]) -> list[tuple[Path, Any]]:
    out: dict[Path, Any] = {}
    for s in sites:
        if s.ln is not None:
            out[s.ln] = get_at(model, s.ln)
    return list(out.items())


def restrict_layernorm(model: Any, sites: Sequence[MLPSite], *, from_scratch: bool = False) -> Any:
    """SPEC 4.2 on each site's LayerNorm, in place. Returns ``model``.

    Finetuning (default): the shift becomes a :class:`FrozenShift` (same values; not trained);
    pair with :func:`gamma_ramp_projection`. From scratch: the shift is removed (the identity
    when it is 0, as at initialisation); pair with :func:`gamma_floor_projection`.
    """
    sites = check_sites(sites)
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
    sites = check_sites(sites)
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
    sites = check_sites(sites)

    def project(model: Any, step: Any) -> Any:
        for _, ln in _lns(model, sites):
            sc = getattr(ln, "scale", None)
            if isinstance(sc, nnx.Variable):
                sc[...] = jnp.maximum(sc[...], 1.0)
        return model

    project.__name__ = "gamma_floor(1)"
    return project


# --------------------------------------------------------------------------------------------
# all of them
# --------------------------------------------------------------------------------------------


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
    sites = check_sites(sites)
    for name, v in (("zeroth_bias", zeroth_bias), ("restricted_ln", restricted_ln), ("from_scratch", from_scratch)):
        if not isinstance(v, bool):
            raise ValueError(f"{name}: must be True or False, got {v!r}")
    t_mix, t_up = check_ramp_length("t_mix", t_mix), check_ramp_length("t_up", t_up)
    c = check_float("zeroth_bias_clip", zeroth_bias_clip, 0)
    check_choice("zeroth_bias_placement", zeroth_bias_placement, PLACEMENTS)
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
