"""LayerNorm-ed MLPs for vector inputs (mnist1d, synthetic sets, flattened images).

``ResidualMLP`` (default): h = W_in x; L blocks h <- h + MLP(LN(h)); logits = head(LN_f(h)).
With ``residual=False`` it is the plain LN-MLP: h <- MLP(LN(h)). ``norm`` replaces the blocks' LN
(the final LN_f stays): "none" feeds h itself to the MLP, "scale" feeds s LN(h) (LN without affine
part, one learnable scalar s per block; :func:`gradsparse.models.common.make_norm`). Each sample is one token
(S = 1, so the zeroth bias is a single (1, d) row).
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp

from gradsparse._validate import check_int
from gradsparse.activations import Activation, ReLU
from gradsparse.models.common import NORMS, Dense, LayerNorm, MLPBlock

Array = jax.Array


class ResidualMLP(eqx.Module):
    """Residual (or plain) LN-MLP classifier. Input (B, d_in) -> logits (B, classes)."""

    inp: Dense
    blocks: list[MLPBlock]
    final_ln: LayerNorm
    head: Dense
    residual: bool = eqx.field(static=True, default=True)

    @staticmethod
    def create(key: Array, d_in: int, num_classes: int, *, width: int = 128, depth: int = 4,
               mlp_ratio: int = 4, act: Activation | None = None, ln_affine: bool = True,
               residual: bool = True, norm: str = "layernorm") -> "ResidualMLP":
        for name, v in (("d_in", d_in), ("num_classes", num_classes), ("width", width), ("depth", depth),
                        ("mlp_ratio", mlp_ratio)):
            check_int(f"ResidualMLP {name}", v, 1)
        if norm not in NORMS:
            raise ValueError(f"ResidualMLP norm: got {norm!r}; allowed: {', '.join(NORMS)}")
        act = act if act is not None else ReLU()
        keys = jax.random.split(key, depth + 2)
        blocks = [MLPBlock.create(keys[i], width, mlp_ratio * width, act, ln_affine, norm) for i in range(depth)]
        return ResidualMLP(Dense.create(keys[-2], d_in, width), blocks, LayerNorm.create(width, ln_affine),
                           Dense.create(keys[-1], width, num_classes), residual)

    tokens_per_sample = 1
    seq_len = 1

    def mlp_blocks(self) -> list[MLPBlock]:
        return list(self.blocks)

    def __call__(self, x: Array, probes: list[dict[str, Array]], *, key: Array | None = None
                 ) -> tuple[Array, list[dict[str, Array]]]:
        """x: (B, d_in) (extra trailing axes are flattened); returns logits (B, C) and per-block aux."""
        x = x.reshape(x.shape[0], -1)
        h = self.inp(x)
        positions = jnp.zeros((x.shape[0],), jnp.int32)
        keys = [None] * len(self.blocks) if key is None else list(jax.random.split(key, len(self.blocks)))
        aux = []
        for blk, pr, k in zip(self.blocks, probes, keys):
            y, a = blk(h, pr, positions, key=k)
            h = h + y if self.residual else y
            aux.append(a)
        return self.head(self.final_ln(h)), aux
