"""Run configurations: validated dataclasses, serialised as JSON in every run folder.

:class:`RunConfig` is the base of every run's config (:class:`TrainConfig` here, the relufication
run's ``DistillConfig`` in :mod:`gradsparse.relufy.config`): ``to_dict`` / ``from_dict`` (unknown
keys named with the closest field, missing required fields named), ``replace`` (a validated copy)
and :meth:`RunConfig.check_resumable` (every field equal except ``steps``, which may only grow,
and what a subclass frees or forbids) are defined once. Subclasses write ``validate``.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

from gradsparse._validate import check_bool, check_choice, check_float, check_int
from gradsparse.activations import Activation, get_activation
from gradsparse.data import DATASETS
from gradsparse.models.common import NORMS
from gradsparse.plugins.noise import NOISE_KINDS, NOISE_PER
from gradsparse.plugins.zeroth_bias import PLACEMENTS

MODELS = ("mlp", "vit", "lm")
OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "cosine")
#: datasets that read ``data_path`` (the others are generated)
PATH_DATASETS = ("fashion_mnist", "text")
#: largest number of MLP/attention weights a config may ask for (about 8 GiB of float32 parameters)
MAX_PARAMS = 2**31
_I32 = 2**31 - 1
#: upper bounds of the integer fields (beyond them a run cannot be represented or cannot fit)
INT_BOUNDS: dict[str, tuple[int, int]] = {
    "width": (1, 2**16), "mlp_ratio": (1, 256), "depth": (1, 1024), "heads": (1, 1024), "patch": (1, 4096),
    "seq_len": (1, 2**16), "steps": (1, _I32), "batch_size": (1, 2**24), "log_every": (1, _I32),
    "eval_batch": (1, 2**20), "flatness_probes": (1, 4096), "warmup": (0, _I32), "checkpoint_every": (0, _I32),
    "flatness_every": (0, _I32), "flatness_subset": (0, 2**20), "seed": (0, 2**32 - 1), "n_train": (1, 2**26), "n_test": (1, 2**26),
    "fuse_steps": (1, 4096),
}


class RunConfig:
    """The base of the run configs (dataclasses): serialisation, copies and the resume rule, once.

    ``from_dict`` builds and validates from a JSON mapping: unknown keys are an error naming the
    closest field, a missing required field is named, lists become tuples where the field's
    default is a tuple (JSON has no tuples). ``to_dict`` is the inverse (tuples as lists).
    """

    #: fields a resumed run may change besides ``steps`` (checked elsewhere, e.g. against the disk)
    RESUME_FREE: ClassVar[tuple[str, ...]] = ()

    def validate(self) -> "RunConfig":  # pragma: no cover - every subclass defines it
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def _upgrade(cls, d: dict[str, Any]) -> dict[str, Any]:
        """Configs written by earlier versions, brought to the current fields (default: as is)."""
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunConfig":
        """Build and validate from a mapping; unknown keys are an error (with the allowed ones)."""
        if not isinstance(d, dict):
            raise ValueError(f"config must be a mapping, got {type(d).__name__}")
        d = cls._upgrade(d)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted((k for k in d if k not in fields), key=repr)
        if unknown:
            hints = [f"{k!r} -> {m[0]!r}" for k in unknown if isinstance(k, str)
                     for m in [difflib.get_close_matches(k, fields, n=1)] if m]
            hint = f" (did you mean {', '.join(hints)}?)" if hints else ""
            raise ValueError(f"unknown config keys {unknown}{hint}; allowed: {sorted(fields)}")
        missing = [n for n, f in fields.items() if n not in d and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING]
        if missing:
            raise ValueError(f"config: {', '.join(missing)} missing; it is required")
        d = {k: tuple(v) if isinstance(v, list) and isinstance(fields[k].default, tuple) else v for k, v in d.items()}
        return cls(**d).validate()

    def replace(self, **changes: Any) -> "RunConfig":
        """A validated copy with ``changes`` applied (unknown names are an error)."""
        return type(self).from_dict({**self.to_dict(), **changes})

    def _extension_refused(self, stored: "RunConfig", where: str) -> str | None:
        """Why ``stored`` (a run on disk) cannot be extended to this config's ``steps``, or None."""
        return None

    def check_resumable(self, stored: "RunConfig", where: str = "the run") -> None:
        """ValueError unless the run started with ``stored`` may continue as this config: every
        field equal except ``steps`` (which may only grow, and only where the subclass allows it:
        :meth:`_extension_refused`) and :attr:`RESUME_FREE`."""
        if type(stored) is not type(self):
            raise ValueError(f"check_resumable compares two {type(self).__name__} objects, got "
                             f"{type(stored).__name__}")
        a, b = RunConfig.to_dict(stored), RunConfig.to_dict(self)  # every field (no subclass omissions)
        for name in a:
            if name != "steps" and name not in self.RESUME_FREE and a[name] != b[name]:
                raise ValueError(f"{name}: {b[name]!r} differs from {a[name]!r} of {where}; a resumed run keeps its "
                                 "config (only steps may grow)")
        if self.steps < stored.steps:
            raise ValueError(f"steps: {self.steps} is fewer than the {stored.steps} of {where}; a resumed run can "
                             "only be extended")
        why = self._extension_refused(stored, where) if self.steps != stored.steps else None
        if why:
            raise ValueError(why)


@dataclass
class TrainConfig(RunConfig):
    """Everything that defines a run. ``validate()`` raises ValueError naming the bad field.

    Model: ``model`` (mlp | vit | lm), ``width`` d, ``mlp_ratio`` (n = mlp_ratio * d), ``depth``
    (MLP blocks), ``heads``, ``patch`` (ViT), ``seq_len`` (LM), ``ln_affine``, ``residual`` (mlp),
    ``norm`` (mlp only: what feeds each block's key layer; "layernorm" (default) = the LayerNorm,
    "none" = the residual stream h itself, "scale" = s LN(h) with LN without affine part and one
    learnable scalar s per block, init 1; the final LayerNorm before the classifier is kept in all
    three; the non-default values need ``restricted_ln`` and ``zeroth_bias`` off, which act on the
    LayerNorm's parameters. Configs written before this field read as the default, and ``to_dict``
    leaves it out at the default: :attr:`LATE_DEFAULTS`.)
    Optimisation: ``optimizer`` (sgd | adam | adamw), ``lr``, ``momentum`` (sgd), ``weight_decay``
    ``label_noise`` p (a fraction p of each batch's labels resampled uniformly: label-noise SGD),
    (coupled L2 for sgd/adam, decoupled for adamw), ``schedule`` (constant | cosine) after
    ``warmup`` linear steps, ``grad_clip`` (global norm; 0 = off).
    Plug-ins (SPEC 4): ``weight_noise`` (none | synapse | exact) with ``rho`` and ``noise_per``,
    ``zeroth_bias`` (+ ``zeroth_bias_placement``, ``zeroth_bias_clip``), ``restricted_ln``.
    Monitoring: ``log_every``, ``eval_batch`` (held-out batch for the monitors),
    ``flatness_every`` (Hutchinson trace; 0 = off) with ``flatness_probes``, on the current batch or,
    with ``flatness_subset`` = N > 0, on the first N training examples (a FIXED subset, SPEC 3.4;
    the monitors are then also logged on it under ``fixed/...``),
    ``track_covariance`` (SPEC 3.3 accumulations).
    Placement: ``data_parallel`` shards each batch over all visible devices when the batch size
    divides evenly (``gradsparse.parallel.DataParallel.auto``); False keeps one device.
    ``fuse_steps`` k: on one device, the plain (unlogged) steps between two log points or
    checkpoints run k at a time in one ``lax.scan`` (:func:`gradsparse.step.make_train_chunk`;
    1 = one jitted call per step). For the MLPs the parameters are bit-equal to single steps; in
    the Transformers XLA compiles the scanned step with ulp-level differences (Adam then carries
    them), so k is part of what a run is. Configs written before this field read as the default.
    Default 16 (what it buys on a CPU: docs/engine_measurements.md).
    Finetuning: ``surgery`` holds the options of :func:`gradsparse.plugins.sparsify` that were
    applied to the parent model (None for a run from scratch); ``parent`` names the parent
    checkpoint (provenance only).
    """

    model: str = "mlp"
    data: str = "mnist1d"
    data_path: str | None = None
    activation: str = "relu"
    width: int = 128
    mlp_ratio: int = 4
    depth: int = 4
    heads: int = 4
    patch: int = 7
    seq_len: int = 32
    ln_affine: bool = True
    residual: bool = True
    norm: str = "layernorm"
    steps: int = 3000
    batch_size: int = 64
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.0
    label_noise: float = 0.0
    weight_decay: float = 0.0
    warmup: int = 0
    schedule: str = "constant"
    grad_clip: float = 0.0
    seed: int = 0
    n_train: int | None = None
    n_test: int | None = None
    log_every: int = 50
    eval_batch: int = 256
    checkpoint_every: int = 1000
    flatness_every: int = 0
    flatness_probes: int = 8
    flatness_subset: int = 0
    track_covariance: bool = False
    weight_noise: str = "none"
    rho: float = 0.1
    noise_per: str = "sample"
    zeroth_bias: bool = False
    zeroth_bias_placement: str = "input"
    zeroth_bias_clip: float = 0.1
    restricted_ln: bool = False
    data_parallel: bool = True
    fuse_steps: int = 16
    surgery: dict[str, Any] | None = None
    parent: str | None = None

    #: fields added after run folders and run ids existed, with their defaults: ``to_dict`` leaves
    #: them out at the default, so config.json, checkpoint headers and run ids of default runs are the
    #: bytes they were before the field existed (the run ids leave them out too:
    #: gradsparse.runplan.config_digest)
    LATE_DEFAULTS: ClassVar[dict[str, Any]] = {"norm": "layernorm"}

    @classmethod
    def without_late_defaults(cls, d: Mapping[str, Any]) -> dict[str, Any]:
        """``d`` (a config mapping) without the :attr:`LATE_DEFAULTS` fields that hold their defaults."""
        return {k: v for k, v in d.items() if not (k in cls.LATE_DEFAULTS and v == cls.LATE_DEFAULTS[k])}

    def to_dict(self) -> dict[str, Any]:
        return self.without_late_defaults(super().to_dict())

    # ---------------------------------------------------------------- validation
    def validate(self) -> "TrainConfig":
        """Check every field; raise ValueError('field: what is wrong; allowed ...').

        Names must be known (model, data, optimizer, schedule, activation grammar, ...); integers
        lie in :data:`INT_BOUNDS` (``seed`` < 2^32, ``steps`` < 2^31, ...); rates are finite and
        >= 0 (``lr`` > 0, ``momentum`` < 1); ``heads`` divides ``width`` for the transformers;
        ``warmup`` < ``steps`` and, with the cosine schedule, ``steps`` > max(warmup, 1); the
        blocks hold at most :data:`MAX_PARAMS` weights (depth * (2 r d^2 [+ 4 d^2 attention]));
        model and data fit together; ``data_path`` only for the datasets that read a file;
        ``n_train``/``n_test`` not for text; ``surgery`` is a JSON mapping or null. Checks that need the data
        (batch_size <= training examples, patch divides the image, seq_len fits the text) run
        in ``train`` before anything is written.
        """
        check_choice("model", self.model, MODELS)
        check_choice("data", self.data, DATASETS)
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_choice("schedule", self.schedule, SCHEDULES)
        check_choice("weight_noise", self.weight_noise, NOISE_KINDS)
        check_choice("noise_per", self.noise_per, NOISE_PER)
        check_choice("zeroth_bias_placement", self.zeroth_bias_placement, PLACEMENTS)
        check_choice("norm", self.norm, NORMS)
        if self.norm != "layernorm":
            if self.model != "mlp":
                raise ValueError(f"norm: {self.norm!r} is only built for model 'mlp', got model {self.model!r}; "
                                 "allowed for the other models: 'layernorm'")
            for name in ("restricted_ln", "zeroth_bias"):
                if getattr(self, name) is True:
                    raise ValueError(f"norm: {self.norm!r} has no LayerNorm parameters for {name} to act on; "
                                     f"allowed with {name}: 'layernorm'")
        if not isinstance(self.activation, str):
            raise ValueError(f"activation: must be a name string, got {self.activation!r}")
        try:
            self.act
        except ValueError as e:
            raise ValueError(f"activation: {e}") from None
        for name, (lo, hi) in INT_BOUNDS.items():
            v = getattr(self, name)
            if v is None and name in ("n_train", "n_test"):
                continue
            check_int(name, v, lo, hi)
        if self.data_path is not None:
            if not isinstance(self.data_path, str) or not self.data_path:
                raise ValueError(f"data_path: must be a non-empty path string or null, got {self.data_path!r}")
            if self.data not in PATH_DATASETS:
                raise ValueError(f"data_path: data {self.data!r} is generated and reads no file; "
                                 f"data_path applies to {', '.join(PATH_DATASETS)}")
        if self.data == "text":
            for name in ("n_train", "n_test"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{name}: does not apply to data 'text' (the text is cut 90/10 by bytes)")
        for name in ("lr", "momentum", "weight_decay", "grad_clip", "rho", "zeroth_bias_clip"):
            check_float(name, getattr(self, name), 0)
        check_float("lr", self.lr, 0, lo_open=True)
        check_float("momentum", self.momentum, 0, 1, hi_open=True)
        check_float("label_noise", self.label_noise, 0, 1, hi_open=True)
        if self.label_noise > 0 and self.data == "text":
            raise ValueError("label_noise: does not apply to data 'text'; allowed: 0 for the byte LM")
        if self.width % self.heads and self.model != "mlp":
            raise ValueError(f"heads: {self.heads} does not divide width {self.width}")
        if self.warmup >= self.steps and self.warmup > 0:
            raise ValueError(f"warmup: {self.warmup} must be smaller than steps ({self.steps})")
        if self.schedule == "cosine" and self.steps <= max(self.warmup, 1):
            raise ValueError(f"steps: schedule 'cosine' needs steps > max(warmup, 1), got steps {self.steps} "
                             f"and warmup {self.warmup}")
        n_params = self.depth * (2 * self.mlp_ratio * self.width**2 + (4 * self.width**2 if self.model != "mlp" else 0))
        if n_params > MAX_PARAMS:
            raise ValueError(f"width/depth/mlp_ratio: the blocks would hold about {n_params:.3g} weights, more than "
                             f"the limit {MAX_PARAMS:.3g} (2^31); use a smaller width, depth or mlp_ratio")
        for name in ("ln_affine", "residual", "track_covariance", "zeroth_bias", "restricted_ln", "data_parallel"):
            check_bool(name, getattr(self, name))
        if self.model == "lm" and self.data != "text":
            raise ValueError(f"model 'lm' trains on data 'text', got data {self.data!r}")
        if self.model != "lm" and self.data == "text":
            raise ValueError(f"data 'text' is for model 'lm', got model {self.model!r}")
        if self.model == "vit" and self.data not in ("fashion_mnist",):
            raise ValueError(f"model 'vit' needs image data (fashion_mnist), got {self.data!r}")
        if self.surgery is not None:
            if not isinstance(self.surgery, dict) or not all(isinstance(k, str) for k in self.surgery):
                raise ValueError(f"surgery: got {self.surgery!r}; allowed: null or a mapping with string keys "
                                 "(the options gradsparse.plugins.sparsify records)")
            try:
                json.dumps(self.surgery, allow_nan=False)
            except (TypeError, ValueError, RecursionError):
                raise ValueError("surgery: holds a value that is not JSON; allowed: numbers, strings, booleans, "
                                 "null, lists, mappings, no NaN/inf") from None
        if self.parent is not None and not isinstance(self.parent, str):
            raise ValueError(f"parent: got {self.parent!r}; allowed: null or a checkpoint path string")
        return self

    @property
    def act(self) -> Activation:
        """The activation ``activation`` names, parsed once per name (validation and the factory share it)."""
        cached = self.__dict__.get("_act")
        if cached is None or cached[0] != self.activation:
            cached = (self.activation, get_activation(self.activation))
            self.__dict__["_act"] = cached
        return cached[1]

    @classmethod
    def _upgrade(cls, d: dict[str, Any]) -> dict[str, Any]:
        if d.get("extra", None) == {}:  # configs written before 'extra' was removed (it was always empty)
            d = {k: v for k, v in d.items() if k != "extra"}
        return d

    def _extension_refused(self, stored: "TrainConfig", where: str) -> str | None:
        if stored.schedule == "cosine":
            return (f"steps: {where} uses schedule 'cosine', whose learning rate at every step depends on "
                    f"steps ({stored.steps}); it cannot be extended to {self.steps}")
        return None


def check_resumable(stored: TrainConfig, cfg: TrainConfig, where: str = "the run") -> None:
    """Raise ValueError unless a run started with ``stored`` may continue as ``cfg``.

    Every field must be equal except ``steps``, which may grow (the run is extended) but never
    shrink. With ``schedule='cosine'`` the learning rate at every step depends on ``steps``
    (``optax.warmup_cosine_decay_schedule(..., decay_steps=steps)``), so a longer run would not be
    the continuation of the one on disk: there ``steps`` must stay equal too.
    """
    if not isinstance(stored, TrainConfig) or not isinstance(cfg, TrainConfig):
        raise ValueError("check_resumable compares two TrainConfig objects")
    cfg.check_resumable(stored, where)
