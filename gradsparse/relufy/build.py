"""What a relufication run IS: the student, teacher and tokenizer of a DistillConfig."""

from __future__ import annotations

import equinox as eqx
import jax

from gradsparse.factory import Built
from gradsparse.models.bert import BertEncoder, BertInfo, SentenceTokenizer, load_bert, with_activation
from gradsparse.plugins import sparsify
from gradsparse.relufy.config import DistillConfig


def build_distill(cfg: DistillConfig) -> tuple[Built, BertEncoder, SentenceTokenizer, BertInfo]:
    """The relufication run of ``cfg``: (Built student, teacher, tokenizer, info).

    Teacher: the folder's model as trained (GELU), frozen. Student: the same weights with ReLU in
    every MLP (``cfg.activation`` 'relu'), or the ReLU -> JSReLU mix (``'mix'``, k = 0 at
    insertion, ramped over ``cfg.ramp_mix`` steps), plus ``cfg.modules`` inserted by
    :func:`gradsparse.plugins.sparsify` on the blocks of ``BertEncoder.mlp_blocks()``: the zeroth
    bias ((max_seq_length, d) per layer, added to K's input, clipped |b0| <= c |gamma| of LN_att)
    and the restricted LN (finetuning variant, on LN_att, the attention sub-layer's output
    LayerNorm that feeds K and is the residual around the MLP: its shift beta frozen, |gamma|
    floored at min((s+1)/t_up, 1)). Every module is exactly the identity at insertion, so the
    built student equals the plain relufied model. Trainable: every floating array of the
    student except the embedding tables and their LayerNorm (the activation change is inside
    the layers) and what the plug-ins freeze. The tokenizer truncates at ``cfg.seq_len`` tokens.

    Raises ValueError when the folder's weights differ from ``cfg.weights_sha256`` (when set) or
    ``cfg.seq_len`` exceeds the folder's max_seq_length.
    """
    if not isinstance(cfg, DistillConfig):
        raise ValueError(f"cfg: got {type(cfg).__name__}; allowed: a DistillConfig")
    cfg.validate()
    teacher, tok, info = load_bert(cfg.model_folder)
    if cfg.weights_sha256 is not None and info.weights_sha256 != cfg.weights_sha256:
        raise ValueError(f"{cfg.model_folder}: the SHA-256 of its weights is {info.weights_sha256}, the run was "
                         f"started with {cfg.weights_sha256}; the model folder changed, so the run cannot continue "
                         "(start a new run with --out elsewhere)")
    if cfg.seq_len > info.max_seq_length:
        raise ValueError(f"seq_len: {cfg.seq_len} exceeds the model's max_seq_length {info.max_seq_length}; "
                         f"allowed: [3, {info.max_seq_length}]")
    res = sparsify(with_activation(teacher, "relu"), zeroth_bias="zeroth_bias" in cfg.modules,
                   restricted_ln="restricted_ln" in cfg.modules, jsrelu=cfg.activation == "mix",
                   zeroth_bias_clip=cfg.zeroth_bias_clip, t_up=cfg.ramp_up, t_mix=cfg.ramp_mix)
    trainable = eqx.tree_at(lambda m: m.embeddings, res.trainable,
                            jax.tree_util.tree_map(lambda _: False, res.trainable.embeddings))
    from tokenizers import Tokenizer  # the tokenizers package: only a distillation run needs it

    short = SentenceTokenizer(Tokenizer.from_str(tok.tokenizer.to_str()), cfg.seq_len, tok.pad_id, tok.cls_id,
                              tok.sep_id, tok.vocab_size)
    return Built(res.model, trainable, res.projections), teacher, short, info
