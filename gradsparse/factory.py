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
from gradsparse.plugins import Projection, config_projections, configure, replay_options, sparsify
from gradsparse.plugins.sparsify import SparsifyResult

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
                                  mlp_ratio=cfg.mlp_ratio, act=act, ln_affine=cfg.ln_affine, residual=cfg.residual,
                                  norm=cfg.norm)
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
