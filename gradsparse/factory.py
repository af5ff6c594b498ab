"""What a run IS: everything a TrainConfig builds, in one place.

Every caller that needs a run's model, keys or optimizer builds them here: the training loop,
finetuning, the theory checks and checkpoint loading (:func:`skeleton_from_header`). So the
order in which a seed is split into keys, the plug-ins a config switches on and the surgery a
finetuned run recorded are defined once.

- :class:`RunKeys`: the seed's keys, ``split(key(seed), 5)`` -> model, data, noise, flatness,
  heldout (this order is what makes today's runs reproduce yesterday's numbers).
- :func:`bare_model`: the model of ``cfg`` before plug-ins.
- :func:`build`: ``build(cfg, info, key, surgery=None) -> Built(model, trainable, projections)``:
  the bare model, the from-scratch plug-ins of ``cfg`` (:func:`gradsparse.plugins.configure`),
  then the finetuning surgery (``cfg.surgery`` or the ``surgery`` argument) replayed on top.
- :func:`finetune_start`: a trained model with finetuning surgery applied (``gradsparse
  finetune``); its result records the options, so :func:`build` rebuilds the same structure.
- :func:`make_schedule`, :func:`make_optimizer`, :func:`init_state`: the optax side; the
  state is the optimizer state, paired with the covariance accumulators when the config tracks them.
- :func:`skeleton_from_header`: (model, state) shaped like a checkpoint, for deserialising.
- :func:`build_distill`: the relufication run of a :class:`~gradsparse.relufy_config.DistillConfig`:
  (Built student, frozen teacher, tokenizer, BertInfo) from a pretrained BERT folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import equinox as eqx
import jax
import numpy as np
import optax

from gradsparse import covariance
from gradsparse.config import TrainConfig
from gradsparse.data import DataInfo
from gradsparse.models import ByteLM, ResidualMLP, ViT, default_trainable
from gradsparse.models.bert import BertEncoder, BertInfo, SentenceTokenizer, load_bert, with_activation
from gradsparse.plugins import Projection, config_projections, configure, replay_options, sparsify
from gradsparse.plugins.sparsify import SparsifyResult
from gradsparse.relufy_config import DistillConfig

Array = jax.Array


@dataclass(frozen=True)
class RunKeys:
    """The PRNG keys of a run, all from its seed: ``split(key(seed), 5)`` in this order."""

    model: Array
    data: Array
    noise: Array
    flatness: Array
    heldout: Array

    @staticmethod
    def of(seed: int) -> "RunKeys":
        return RunKeys(*jax.random.split(jax.random.key(seed), 5))


@dataclass
class Built:
    """What :func:`build` returns: the model, its trainable mask (pytree of bools) and the
    post-update projections the training step applies after every optax update."""

    model: Any
    trainable: Any
    projections: list[Projection]


def bare_model(cfg: TrainConfig, info: DataInfo, key: Array) -> Any:
    """The model of ``cfg`` (before plug-ins) for data described by ``info``."""
    act = cfg.act
    if cfg.model == "mlp":
        d_in = int(np.prod(info.input_shape))
        return ResidualMLP.create(key, d_in, info.num_classes, width=cfg.width, depth=cfg.depth,
                                  mlp_ratio=cfg.mlp_ratio, act=act, ln_affine=cfg.ln_affine, residual=cfg.residual)
    if cfg.model == "vit":
        if len(info.input_shape) != 2:
            raise ValueError(f"model 'vit' needs 2-D images, data has input shape {info.input_shape}")
        return ViT.create(key, info.input_shape, info.num_classes, patch=cfg.patch, width=cfg.width,
                          depth=cfg.depth, heads=cfg.heads, mlp_ratio=cfg.mlp_ratio, act=act, ln_affine=cfg.ln_affine)
    return ByteLM.create(key, seq_len=cfg.seq_len, width=cfg.width, depth=cfg.depth, heads=cfg.heads,
                         mlp_ratio=cfg.mlp_ratio, act=act, ln_affine=cfg.ln_affine)


def _with_surgery(cfg: TrainConfig, res: SparsifyResult) -> Built:
    """The from-scratch projections of ``cfg`` first (gamma floor, zeroth-bias clip), then the
    surgery's (gamma ramp, mix ramp, its own clip): the order finetuning has always used."""
    return Built(res.model, res.trainable, config_projections(cfg) + res.projections)


def build(cfg: TrainConfig, info: DataInfo, key: Array, surgery: dict[str, Any] | None = None) -> Built:
    """The run's model, trainable mask and projections (see the module docstring).

    ``surgery`` defaults to ``cfg.surgery``; with it the sparsify options are replayed on the
    configured model (array values then come from a checkpoint: the structure is what counts).
    """
    if not isinstance(cfg, TrainConfig):
        raise ValueError(f"cfg: got {type(cfg).__name__}; allowed: a TrainConfig")
    surgery = cfg.surgery if surgery is None else surgery
    model, projections = configure(bare_model(cfg, info, key), cfg)
    if surgery:
        return _with_surgery(cfg, replay_options(model, surgery))
    return Built(model, default_trainable(model), projections)


def finetune_start(parent: Any, cfg: TrainConfig, **options: Any) -> tuple[Built, dict[str, Any]]:
    """A trained model with the finetuning modules of :func:`gradsparse.plugins.sparsify`
    (``options`` are its keyword arguments). Returns (built, surgery options); put the options in
    the finetuning run's ``TrainConfig.surgery`` so that :func:`build` rebuilds the structure."""
    res = sparsify(parent, **options)
    return _with_surgery(cfg, res), res.options


def make_schedule(cfg: TrainConfig) -> optax.Schedule:
    """Learning rate per step: constant or cosine decay to 0 at ``steps``, after ``warmup`` linear steps."""
    if cfg.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, cfg.lr, max(cfg.warmup, 1) if cfg.warmup else 1,
                                                  cfg.steps, end_value=0.0)
    if cfg.warmup:
        return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, cfg.warmup), optax.constant_schedule(cfg.lr)],
                                    [cfg.warmup])
    return optax.constant_schedule(cfg.lr)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """optax chain: [clip by global norm] -> [coupled weight decay for sgd/adam] -> optimizer."""
    sched = make_schedule(cfg)
    parts = []
    if cfg.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(cfg.grad_clip))
    if cfg.weight_decay > 0 and cfg.optimizer != "adamw":
        parts.append(optax.add_decayed_weights(cfg.weight_decay))
    if cfg.optimizer == "sgd":
        parts.append(optax.sgd(sched, momentum=cfg.momentum or None))
    elif cfg.optimizer == "adam":
        parts.append(optax.adam(sched))
    else:
        parts.append(optax.adamw(sched, weight_decay=cfg.weight_decay))
    return optax.chain(*parts)


def make_accumulator(cfg: TrainConfig, model: Any) -> covariance.Accumulator | None:
    """The SPEC 3.3 covariance accumulator of ``cfg`` (None unless ``track_covariance``)."""
    if not cfg.track_covariance:
        return None
    return covariance.accumulator([(b.d, b.n) for b in model.mlp_blocks()], cfg.lr, cfg.weight_decay)


def init_state(cfg: TrainConfig, built: Built, optimizer: optax.GradientTransformation,
               accumulator: covariance.Accumulator | None = None) -> Any:
    """The training state the step carries beside the model: the optimizer state, or
    ``(optimizer state, covariance state)`` when ``accumulator`` is given. It is checkpointed whole."""
    opt_state = optimizer.init(eqx.filter(built.model, built.trainable))
    return opt_state if accumulator is None else (opt_state, accumulator.init())


def skeleton_from_header(header: dict[str, Any]) -> tuple[Any, Any]:
    """(model, state) shaped like the checkpoint described by ``header`` (for deserialising)."""
    if not isinstance(header, dict):
        raise ValueError(f"checkpoint header must be a mapping, got {type(header).__name__}")
    try:
        cfg_d = header["config"]
        if isinstance(cfg_d, dict) and header.get("surgery") and not cfg_d.get("surgery"):
            cfg_d = {**cfg_d, "surgery": header["surgery"]}  # finetuned checkpoints written before config.surgery
        cfg = TrainConfig.from_dict(cfg_d)
        info = DataInfo.from_dict(header["data_info"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"checkpoint header is incomplete or invalid ({type(e).__name__}: {e})") from None
    built = build(cfg, info, jax.random.key(0))
    return built.model, init_state(cfg, built, make_optimizer(cfg), make_accumulator(cfg, built.model))


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
