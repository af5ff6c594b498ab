"""Models: every MLP block exposes x, z, a and takes probes (see ``models.common``).

Common interface: ``model(x, probes, *, key=None) -> (logits, aux)`` with ``aux`` one dict
{'x', 'z', 'a'} per MLP block; ``model.mlp_blocks()``; ``model.tokens_per_sample``;
``model.seq_len`` (positions of the zeroth bias).
"""

from gradsparse.models.common import Dense, LayerNorm, MLPBlock, default_trainable, zero_probes
from gradsparse.models.mlp import ResidualMLP
from gradsparse.models.transformer import ByteLM, ViT

__all__ = ["Dense", "LayerNorm", "MLPBlock", "default_trainable", "zero_probes", "ResidualMLP", "ViT", "ByteLM"]
