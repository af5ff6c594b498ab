"""The weight matrices of an NNX model, named, for the spectra of SPEC 3.1.

:func:`named_matrices` turns an NNX model or its ``nnx.State`` into ``{path: matrix}``; flax
``kernel`` variables are (in, out) and are given as (out, in), so K is n x d as in the native
models. :func:`gradsparse.spectra.analyze` accepts NNX models and states through it.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from gradsparse.nnx._modules import path_name


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
        name = path_name(tuple(path))
        if a.ndim == 2:
            out[name] = a
        else:
            for i in range(a.shape[0]):
                out[f"{name}[{i}]"] = a[i]
    if not out:
        raise ValueError("no 2-D weights found in the NNX model/state (only scalars, vectors or 4-D+ arrays)")
    return out
