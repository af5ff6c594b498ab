"""Plug-in sparsity modules (SPEC 4): each usable from scratch (``configure``) and for finetuning
(``sparsify``).

==================  ===========================================  ==================================
module              from scratch (TrainConfig field)             finetuning (``sparsify`` option)
==================  ===========================================  ==================================
zeroth bias (4.1)   ``zeroth_bias``, ``zeroth_bias_placement``,  ``zeroth_bias=True`` (same clip)
                    ``zeroth_bias_clip``: clip |b0| <= c|gamma|
restricted LN (4.2) ``restricted_ln``: no LN shift, gamma >= 1   ``restricted_ln=True``: shift frozen,
                                                                 |gamma| ramped to >= 1 over T_up
JSReLU (4.3)        ``activation='jsrelu'``                      ``jsrelu=True``: ReLU -> JSReLU mix
                                                                 over T_mix
weight noise (4.4)  ``weight_noise``, ``rho``, ``noise_per``     ``noise='synapse'|'exact'``
LoRA (4.6)          --                                           ``lora=True``, ``lora_rank``
==================  ===========================================  ==================================

Projections (clipping, gamma bounds, schedules) are explicit post-update functions
``project(model, step) -> model`` that the training step applies after the optax update.
"""

from __future__ import annotations

from typing import Any

from gradsparse.plugins.blocks import REQUIRED_FIELDS, Projection, default_select
from gradsparse.plugins.noise import ExactWeightNoise, SynapseNoise, add_noise, make_noise
from gradsparse.plugins.restricted_ln import gamma_floor_projection, gamma_ramp_projection, remove_ln_shift
from gradsparse.plugins.sparsify import MODULE_NAMES, SparsifyResult, replay_options, sparsify
from gradsparse.plugins.zeroth_bias import add_zeroth_bias, clip_zeroth_bias, zeroth_bias_projection

__all__ = ["configure", "config_projections", "sparsify", "replay_options", "SparsifyResult", "Projection",
           "MODULE_NAMES", "REQUIRED_FIELDS", "SynapseNoise", "ExactWeightNoise", "make_noise", "add_noise",
           "add_zeroth_bias", "clip_zeroth_bias", "zeroth_bias_projection", "remove_ln_shift",
           "gamma_floor_projection", "gamma_ramp_projection", "default_select"]


def config_projections(cfg: Any) -> list:
    """The post-update projections the from-scratch plug-ins of ``cfg`` need, in order:
    gamma <- max(gamma, 1) (restricted LN), then the zeroth-bias clip (which reads gamma)."""
    out = []
    if cfg.restricted_ln:
        out.append(gamma_floor_projection())
    if cfg.zeroth_bias:
        out.append(zeroth_bias_projection(cfg.zeroth_bias_clip))
    return out


def configure(model: Any, cfg: Any) -> tuple[Any, list]:
    """Apply the from-scratch plug-ins named in a TrainConfig to a freshly built model.

    ``cfg.restricted_ln``: the MLP blocks' LayerNorms lose their shift; ``cfg.zeroth_bias``:
    zero (S, d) biases at ``cfg.zeroth_bias_placement``; ``cfg.weight_noise`` ('synapse' |
    'exact', ``cfg.rho``, ``cfg.noise_per``): noise modules, active only when the training
    step passes a PRNG key. Deterministic (no randomness: every new parameter starts at 0).
    Returns (model, projections) with the projections of :func:`config_projections`.
    """
    for name in ("restricted_ln", "zeroth_bias", "weight_noise", "rho", "noise_per", "zeroth_bias_placement",
                 "zeroth_bias_clip"):
        if not hasattr(cfg, name):
            raise ValueError(f"configure needs a TrainConfig; {type(cfg).__name__} has no field {name!r}")
    if cfg.restricted_ln:
        model = remove_ln_shift(model)
    if cfg.zeroth_bias:
        model = add_zeroth_bias(model, placement=cfg.zeroth_bias_placement)
    if cfg.weight_noise != "none":
        model = add_noise(model, cfg.weight_noise, cfg.rho, cfg.noise_per)
    return model, config_projections(cfg)
