"""Bring your own Flax NNX model: SPEC 2 monitors, SPEC 4 plug-ins and SPEC 3.1 spectra.

Needs the optional extra ``flax`` (``pip install 'gradsparse[flax]'``, flax 0.12.8).

One module per concern (each docstring holds its rules, formulas and shapes):

- :mod:`gradsparse.nnx.discover`: :func:`find_mlp_blocks` finds the MLP blocks (SPEC 1: K with
  kernel (d, n), sigma, V with kernel (n, d), and the LayerNorm feeding K) by one forward of a
  copy of the model, as :class:`MLPSite` records.
- :mod:`gradsparse.nnx.probes`: :func:`instrument` gives K and V the probes (:class:`ProbeValue`
  sows of x, z, a; :class:`ProbeGrad` perturbations at a and y), and :func:`value_and_grad` runs
  the user's loss and returns its gradients with the SPEC 2.1-2.6 metrics per block, as
  :func:`gradsparse.monitors.model_metrics` gives them for the native models.
- :mod:`gradsparse.nnx.plugins`: the SPEC 4 modules in place (:func:`mix_activation`,
  :func:`add_zeroth_bias`, :func:`restrict_layernorm`, :func:`sparsify`) and their post-update
  projections (:data:`gradsparse.plugins.Projection`: ``project(model, step) -> model``);
  :mod:`gradsparse.nnx.mixed` holds the :class:`MixedActivation` they swap in.
- :mod:`gradsparse.nnx.spectra`: :func:`named_matrices`, ``{path: matrix}`` with flax kernels
  given as (out, in); :func:`gradsparse.spectra.analyze` accepts NNX models and states through it.

Typical use::

    sites = gradsparse.nnx.find_mlp_blocks(model, x_sample)
    gradsparse.nnx.instrument(model, sites)
    loss, grads, metrics = gradsparse.nnx.value_and_grad(loss_fn, sites)(model, x, y)

Limits: each block must be called once per forward (no weight sharing across calls, no
``nnx.scan`` over stacked layers); the first argument of the loss (and of ``call``) is the model.
Measured costs: docs/nnx_measurements.md.
"""

from __future__ import annotations

from gradsparse.activations import GELUTanh, SiLU
from gradsparse.nnx.discover import (ACTIVATIONS, MATCH_RTOL, MLPSite, StochasticLayerWarning, find_mlp_blocks,
                                     layer_names, site_activation, stochastic_layers)
from gradsparse.nnx.mixed import MixedActivation, MixWeight
from gradsparse.nnx.plugins import (FrozenShift, add_zeroth_bias, gamma_floor_projection, gamma_ramp_projection,
                                    mix_activation, mix_projection, restrict_layernorm, sparsify,
                                    zeroth_bias_projection)
from gradsparse.nnx.probes import ProbeGrad, ProbeValue, instrument, value_and_grad
from gradsparse.nnx.spectra import named_matrices
from gradsparse.plugins.blocks import Projection
from gradsparse.plugins.zeroth_bias import PLACEMENTS

__all__ = [
    "ACTIVATIONS", "GELUTanh", "SiLU", "ProbeValue", "ProbeGrad", "MixWeight", "FrozenShift", "MixedActivation",
    "MLPSite", "StochasticLayerWarning", "stochastic_layers", "find_mlp_blocks", "instrument", "value_and_grad",
    "layer_names", "site_activation",
    "mix_activation", "mix_projection", "add_zeroth_bias", "zeroth_bias_projection", "restrict_layernorm",
    "gamma_ramp_projection", "gamma_floor_projection", "sparsify", "named_matrices",
]
