"""The configuration of a relufication run: finetune a pretrained BERT with ReLU (or the ReLU ->
JSReLU mix) and the sparsity plug-ins against its frozen original by distillation.

One frozen dataclass, :class:`DistillConfig`, validated by :meth:`DistillConfig.validate` and
serialised as JSON (``to_dict`` / ``from_dict``) into the run folder's ``config.json``. It records the
Hugging Face model folder and the SHA-256 of its weights, so a resume can refuse a folder whose
weights changed. :mod:`gradsparse.relufy.build` builds the student, teacher and tokenizer from it
(:func:`gradsparse.relufy.build.build_distill`); :mod:`gradsparse.relufy.run` trains it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gradsparse._validate import check_choice, check_float, check_int
from gradsparse.config import RunConfig

#: --activation of the relufication route: 'relu' replaces GELU by ReLU; 'mix' by the ReLU -> JSReLU
#: mix (1 - k) ReLU + k JSReLU with k = min((s+1)/t_mix, 1) (SPEC 4.3)
DISTILL_ACTIVATIONS = ("relu", "mix")
#: plug-ins of the relufication route (SPEC 4.1, 4.2; the finetuning variants of gradsparse.plugins)
DISTILL_MODULES = ("zeroth_bias", "restricted_ln")
#: the neighbour agreement needs at least this many held-out sentences (issue protocol: >= 500)
MIN_HELDOUT = 500
#: default weight of the per-layer hidden-state MSE in the distillation loss (docs/engine_measurements.md)
DEFAULT_HIDDEN_WEIGHT = 10.0
_I32 = 2**31 - 1


@dataclass(frozen=True)
class DistillConfig(RunConfig):
    """Everything that defines a relufication run (validated by :meth:`validate`).

    Model: ``model_folder`` (a Hugging Face BERT folder, stored resolved) and ``weights_sha256``
    (its :attr:`gradsparse.models.bert.BertInfo.weights_sha256`; None before the folder is read).
    Student: ``activation`` ('relu' | 'mix'), ``modules`` (subset of :data:`DISTILL_MODULES`, in
    that order), ``t_mix`` / ``t_up`` (ramp lengths of the mix and of the restricted-LN gamma
    floor, in steps), ``zeroth_bias_clip`` (|b0| <= c |gamma|).
    Training: ``steps``, ``lr`` (Adam, constant), ``batch_size`` sentences of at most ``seq_len``
    tokens (special tokens included; every batch padded to exactly ``seq_len``), ``seed`` (data
    order), ``hidden_weight`` w of L = L_cos + w L_hid (:func:`gradsparse.distill.distill_loss`).
    Held-out: ``num_heldout`` sentences of :func:`gradsparse.distill.default_split` (split seed 0,
    the same for every run seed, so runs are compared on the same sentences), evaluated in batches
    of ``eval_batch``. Logging: ``log_every`` (and the last step), ``checkpoint_every`` (0: only
    at the end). ``fuse_steps`` k: the plain steps between two log points or checkpoints run k at
    a time in one ``lax.scan`` (1: one jitted call per step); as in the Transformers of
    :class:`gradsparse.config.TrainConfig`, XLA compiles the scanned step with ulp-level
    differences, so k is part of what a run is. Configs written before the field read as 1 (they
    were trained unfused).
    """

    model_folder: str
    activation: str = "relu"
    modules: tuple[str, ...] = ()
    steps: int = 200
    lr: float = 5e-5
    batch_size: int = 16
    seq_len: int = 32
    hidden_weight: float = DEFAULT_HIDDEN_WEIGHT
    seed: int = 0
    log_every: int = 50
    checkpoint_every: int = 0
    t_mix: int | None = None
    t_up: int | None = None
    zeroth_bias_clip: float = 0.1
    num_heldout: int = 512
    eval_batch: int = 64
    weights_sha256: str | None = None
    fuse_steps: int = 16

    def validate(self) -> "DistillConfig":
        """Check every field; ValueError('field: what is wrong; allowed: ...'). Returns self."""
        if not isinstance(self.model_folder, str) or not self.model_folder:
            raise ValueError(f"model_folder: must be a non-empty path string, got {self.model_folder!r}")
        check_choice("activation", self.activation, DISTILL_ACTIVATIONS)
        if not isinstance(self.modules, tuple) or any(not isinstance(m, str) for m in self.modules):
            raise ValueError(f"modules: must be a tuple of names, got {self.modules!r}; allowed: subsets of "
                             f"{', '.join(DISTILL_MODULES)}")
        for m in self.modules:
            check_choice("modules", m, DISTILL_MODULES)
        if len(set(self.modules)) != len(self.modules):
            raise ValueError(f"modules: {self.modules!r} lists a module twice; allowed: each at most once")
        if list(self.modules) != [m for m in DISTILL_MODULES if m in self.modules]:
            raise ValueError(f"modules: {self.modules!r} must be in the order {', '.join(DISTILL_MODULES)}")
        check_int("steps", self.steps, 1, _I32)
        check_float("lr", self.lr, 0, 1, lo_open=True)
        check_int("batch_size", self.batch_size, 1, 4096)
        check_int("seq_len", self.seq_len, 3, 4096)
        check_float("hidden_weight", self.hidden_weight, 0, 1e6)
        check_int("seed", self.seed, 0, 2**32 - 1)
        check_int("log_every", self.log_every, 1, _I32)
        check_int("checkpoint_every", self.checkpoint_every, 0, _I32)
        for name in ("t_mix", "t_up"):
            v = getattr(self, name)
            if v is not None:
                check_int(name, v, 0, _I32)
        check_float("zeroth_bias_clip", self.zeroth_bias_clip, 0, 1e6)
        check_int("num_heldout", self.num_heldout, MIN_HELDOUT, 2**20)
        check_int("eval_batch", self.eval_batch, 1, 4096)
        check_int("fuse_steps", self.fuse_steps, 1, 4096)
        if self.weights_sha256 is not None and (not isinstance(self.weights_sha256, str)
                                                or len(self.weights_sha256) != 64):
            raise ValueError(f"weights_sha256: must be 64 hex digits or null, got {self.weights_sha256!r}")
        return self

    @property
    def ramp_mix(self) -> int:
        """t_mix, defaulting to steps // 2 (at least 1)."""
        return max(1, self.steps // 2) if self.t_mix is None else self.t_mix

    @property
    def ramp_up(self) -> int:
        """t_up, defaulting to steps // 2 (at least 1)."""
        return max(1, self.steps // 2) if self.t_up is None else self.t_up

    RESUME_FREE = ("weights_sha256",)  # checked against the model folder by the factory

    @classmethod
    def _upgrade(cls, d: dict[str, Any]) -> dict[str, Any]:
        if isinstance(d, dict) and "fuse_steps" not in d:  # written before fused chunks: trained unfused
            d = {**d, "fuse_steps": 1}
        return d

    def _extension_refused(self, stored: "DistillConfig", where: str) -> str | None:
        """The default ramps (steps // 2) change with ``steps``: such a run cannot be extended."""
        if (stored.t_mix is None and stored.activation == "mix") or (stored.t_up is None
                                                                     and "restricted_ln" in stored.modules):
            return (f"steps: {where} ramps its modules over steps // 2 (no --t-mix / --t-up given), so "
                    f"extending it from {stored.steps} to {self.steps} steps would change its schedule")
        return None


def check_resumable(stored: DistillConfig, cfg: DistillConfig, where: str = "the run") -> None:
    """ValueError unless a run started with ``stored`` may continue as ``cfg``: every field equal
    except ``steps`` (which may only grow) and ``weights_sha256`` (checked against the folder by
    the factory). The learning rate is constant, so an extended run is the continuation of the
    shorter one; the default ramps (steps // 2) would change with ``steps``, so extending a run
    that uses them is refused."""
    cfg.check_resumable(stored, where)
