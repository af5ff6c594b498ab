"""Relufication: a pretrained BERT with ReLU (or the ReLU -> JSReLU mix) and the sparsity plug-ins,
distilled to its frozen original (``gradsparse relufy HF_FOLDER``), on the shared loop engine.

- :mod:`gradsparse.relufy.config`: :class:`DistillConfig` (one :class:`gradsparse.config.RunConfig`);
- :mod:`gradsparse.relufy.objective`: the distillation objective and the held-out evaluation;
- :mod:`gradsparse.relufy.build`: student, teacher and tokenizer of a config;
- :mod:`gradsparse.relufy.run`: :func:`relufy`, the adapter of :mod:`gradsparse.loop`.
"""

from gradsparse.relufy.build import build_distill
from gradsparse.relufy.config import (DEFAULT_HIDDEN_WEIGHT, DISTILL_ACTIVATIONS, DISTILL_MODULES, MIN_HELDOUT,
                                      DistillConfig)
from gradsparse.relufy.objective import Distill, HeldOut
from gradsparse.relufy.run import KIND, DistillResult, relufy

__all__ = ["DEFAULT_HIDDEN_WEIGHT", "DISTILL_ACTIVATIONS", "DISTILL_MODULES", "KIND", "MIN_HELDOUT", "Distill",
           "DistillConfig", "DistillResult", "HeldOut", "build_distill", "relufy"]
