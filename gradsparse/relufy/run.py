"""Relufication by finetuning: the adapter of the loop engine (:mod:`gradsparse.loop`) for a
pretrained BERT with ReLU (or the ReLU -> JSReLU mix) and the sparsity plug-ins, distilled to its
frozen original (``gradsparse relufy HF_FOLDER ...``).

What the route does (the "ReLU strikes back" / ProSparse recipe, with gradsparse's plug-ins):

1. teacher = the folder's model as trained (GELU), frozen; student = the same weights with GELU
   replaced by ReLU (``--activation relu``) or by (1 - k) ReLU + k JSReLU with k ramped from 0 to 1
   over ``t_mix`` steps (``--activation mix``), plus the plug-ins of ``--modules`` (zeroth bias,
   restricted LN: :func:`gradsparse.relufy.build.build_distill` says exactly what each touches in
   a post-LN BERT). Every plug-in is the identity at insertion.
2. the student is trained with Adam (constant lr) on the training sentences of
   :func:`gradsparse.distill.default_split` to L = L_cos + w L_hid (:class:`gradsparse.relufy.
   objective.Distill`), one step of :func:`gradsparse.step.make_train_step`; the plain steps
   between log points run ``fuse_steps`` at a time in one ``lax.scan``. The default w = 10
   (``--hidden-weight``) comes from a pilot on all-MiniLM-L6-v2 (docs/engine_measurements.md).
3. logged every ``log_every`` steps and at the last step (one JSON object per line in
   ``RUN/log.jsonl``; record s is computed BEFORE update s): ``loss``, ``cosine_loss``,
   ``hidden_mse``, ``grad_norm``, the student's exact per-layer activation density over the real
   tokens of the training batch (``train/density`` and its ``/mean``), and on ALL held-out
   sentences (>= 500): ``heldout/teacher_cos``, ``heldout/nn_agreement`` (top-1 nearest-neighbour
   agreement with the teacher) and ``heldout/density`` (+ ``/mean``); ``mix_k`` with the mix.
   Wall-clock times go to ``times.jsonl`` only, so the log is a function of config and seed.
4. ``summary.json`` at the end: ``before`` (the teacher's fraction of positive pre-activations per
   layer, the relufied student's exact density, teacher cosine and agreement before any update),
   ``after`` (the same after the last update), ``train_time_s`` (summed over resumed segments).

Resumable like every run (:class:`gradsparse.runfolder.RunFolder`: the same checks,
``--skip-damaged``, the same Ctrl-C policy): ``config.json`` records the model folder and the
SHA-256 of its weights; a resume re-reads the folder, refuses it when the SHA-256 changed, loads
the latest checkpoint (student + Adam state) and continues to the same parameters and log lines as
an uninterrupted run (data order of step s: :func:`gradsparse.distill.sentence_batch` with the run
seed's key; no other randomness).
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from gradsparse._validate import check_bool
from gradsparse.activations import Mixed
from gradsparse.distill import default_split, sentence_batch
from gradsparse.loop import Loop
from gradsparse.models.bert import BertEncoder
from gradsparse.relufy.build import build_distill
from gradsparse.relufy.config import DistillConfig
from gradsparse.relufy.objective import FIELDS, Distill, HeldOut, _mean, batch_arrays
from gradsparse.runfolder import Resume, RunFolder
from gradsparse.step import make_train_chunk, make_train_step

#: checkpoint header 'kind' of a relufication run
KIND = "gradsparse-distill-1"


@dataclass
class DistillResult:
    """What :func:`relufy` returns: the final student, Adam state, run folder, log records and summary."""

    student: Any
    opt_state: Any
    out_dir: Path | None
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    #: True when ``relufy(..., resume=True)`` found the run finished: nothing was trained or written
    already_complete: bool = False


def _mix_k(model: BertEncoder) -> float | None:
    act = model.mlp_blocks()[0].act
    return float(act.k) if isinstance(act, Mixed) else None


class _Task:
    """A relufication run for the loop engine: sentence batches, the distillation steps, records."""

    replay = False  # the objective names no block: the step is what a divergence can tell

    def __init__(self, cfg: DistillConfig, built: Any, teacher: BertEncoder, tok: Any, train_sents: list[str],
                 held: HeldOut):
        self.cfg, self.tok, self.sents, self.held = cfg, tok, train_sents, held
        objective, opt = Distill(teacher, cfg.hidden_weight), optax.adam(cfg.lr)
        self.optimizer = opt
        self.mon = make_train_step(objective, opt, built.trainable, built.projections, monitors="counts")
        self.plain_step = make_train_step(objective, opt, built.trainable, built.projections, monitors=False)
        self.fused = make_train_chunk(objective, opt, built.trainable, built.projections)
        self.data_key, self.noise = jax.random.key(cfg.seed), jax.random.key(0)  # no noise: the key is unused

    def batch(self, s: int) -> tuple[Any, ...]:
        b = sentence_batch(self.tok, self.sents, self.data_key, s, self.cfg.batch_size,
                           pad_to_multiple_of=self.cfg.seq_len)
        return batch_arrays(b)

    def plain(self, model: Any, state: Any, s: int) -> tuple[Any, Any, Any]:
        m, st, _, finite = self.plain_step(model, state, self.batch(s), self.noise, jnp.asarray(s, jnp.int32))
        return m, st, finite

    def chunk(self, model: Any, state: Any, s: int, n: int) -> tuple[Any, Any, Any]:
        batches = [self.batch(u) for u in range(s, s + n)]
        stacked = tuple(jnp.stack([b[i] for b in batches]) for i in range(len(FIELDS)))
        return self.fused(model, state, stacked, self.noise, jnp.asarray(s, jnp.int32))

    def logged(self, model: Any, state: Any, s: int):
        held = self.held.record(model)  # before update s
        new_model, new_state, metrics, finite = self.mon(model, state, self.batch(s), self.noise,
                                                         jnp.asarray(s, jnp.int32))

        def records() -> list[dict[str, Any]]:
            c, cfg = metrics["counts"], self.cfg
            dens = [float(v) for v in np.asarray(c["active"]) / (float(c["tokens"]) * model.mlp_blocks()[0].n)]
            rec = {"step": s, "loss": float(metrics["loss"]), "cosine_loss": float(metrics["cosine_loss"]),
                   "hidden_mse": float(metrics["hidden_mse"]), "grad_norm": float(metrics["grad_norm"]),
                   "lr": cfg.lr, "batch_size": cfg.batch_size, "train/density": dens,
                   "train/density/mean": _mean(dens), **held}
            k = _mix_k(model)
            if k is not None:
                rec["mix_k"] = k
            return [rec]

        return new_model, new_state, finite, records

    def locate(self, model: Any, s: int) -> str:
        return "distillation loss or its gradient; a lower --lr may help"


def relufy(cfg: DistillConfig, out_dir: str | os.PathLike | None = None, *, resume: bool = False,
           progress: bool = True, on_log: Callable[[dict[str, Any]], None] | None = None,
           overwrite: bool | None = None, skip_damaged: bool = False) -> DistillResult:
    """Train the relufied student of ``cfg`` against its teacher (module docstring); write the run
    folder when ``out_dir`` is given. ``resume``, ``skip_damaged`` and ``overwrite`` as in
    :func:`gradsparse.train.train` (a finished run is returned as it is, ``already_complete``).

    Everything is checked before anything is written (ValueError leaves the folder untouched).
    Raises :class:`gradsparse.errors.TrainingInterrupted` on Ctrl-C and
    :class:`gradsparse.errors.TrainingDiverged` when the loss or its gradient is NaN/inf
    (:mod:`gradsparse.loop`).
    """
    if not isinstance(cfg, DistillConfig):
        raise ValueError(f"cfg: got {type(cfg).__name__}; allowed: a DistillConfig")
    cfg.validate()
    check_bool("resume", resume)
    out = Path(out_dir) if out_dir is not None else None
    if resume and out is None:
        raise ValueError("resume=True needs out_dir, the run folder to continue")
    folder = RunFolder(out, resume=resume, overwrite=overwrite, skip_damaged=skip_damaged) if out is not None else None
    stored = folder.stored_config(DistillConfig) if resume else None
    if stored is not None:
        cfg.check_resumable(stored, f"the run in {out} (config.json)")
        cfg = cfg.replace(weights_sha256=stored.weights_sha256)
    built, teacher, tok, info = build_distill(cfg)  # refuses a folder whose weights changed
    cfg = cfg.replace(weights_sha256=info.weights_sha256)
    train_sents, held_sents = default_split(cfg.num_heldout)
    if cfg.batch_size > len(train_sents):
        raise ValueError(f"batch_size: {cfg.batch_size} exceeds the {len(train_sents)} training sentences")
    held = HeldOut(tok, held_sents, cfg.eval_batch, cfg.seq_len, teacher)
    task = _Task(cfg, built, teacher, tok, train_sents, held)
    student, opt_state = built.model, task.optimizer.init(eqx.filter(built.model, built.trainable))
    header = {"kind": KIND, "config": cfg.to_dict(), "bert_info": info.to_dict()}
    plan = Resume()
    if folder is not None:
        meta = {"model_folder": cfg.model_folder, "weights_sha256": cfg.weights_sha256, "bert_info": info.to_dict()}
        plan = folder.open(cfg, header, student, opt_state, meta=meta)
    if plan.complete:
        return DistillResult(plan.model, plan.state, out, list(plan.records), dict(plan.summary), True)
    if plan.checkpoint is not None:
        student, opt_state = plan.model, plan.state

    def finish(m: Any, st: Any, hist: list[list[dict[str, Any]]], t0: float) -> DistillResult:
        summary = _summary(cfg, hist[0], m, held, time.time() - t0)
        if folder is not None:
            folder.finish(summary)
        return DistillResult(m, st, out, hist[0], summary)

    with folder if folder is not None else contextlib.nullcontext():  # the lock is held until the summary
        if folder is not None:
            folder.start()
        loop = Loop(task, cfg, cfg.fuse_steps, [folder], progress=progress, desc="relufy", on_log=on_log,
                    postfix=lambda r: {"loss": f"{r['loss']:.4g}", "density": f"{r['train/density/mean']:.3g}",
                                       "cos": f"{r['heldout/teacher_cos']:.4f}"})
        return loop.run(plan.step, student, opt_state, elapsed=plan.elapsed_s, last_checkpoint=plan.checkpoint,
                        histories=[plan.records], finish=finish).finished


def _summary(cfg: DistillConfig, history: list[dict[str, Any]], student: BertEncoder, held: HeldOut,
             elapsed: float) -> dict[str, Any]:
    """summary.json: before (teacher GELU, relufied at step 0) and after (final student)."""
    first = history[0]
    after = held.record(student)
    tp = held.teacher_positive
    return {
        "model_folder": cfg.model_folder, "weights_sha256": cfg.weights_sha256, "activation": cfg.activation,
        "modules": list(cfg.modules), "steps": cfg.steps, "seed": cfg.seed, "hidden_weight": cfg.hidden_weight,
        "num_heldout": held.n,
        "before": {"teacher_positive_fraction": tp, "teacher_positive_fraction/mean": _mean(tp),
                   "density": first["heldout/density"], "density/mean": first["heldout/density/mean"],
                   "teacher_cos": first["heldout/teacher_cos"], "nn_agreement": first["heldout/nn_agreement"]},
        "after": {"density": after["heldout/density"], "density/mean": after["heldout/density/mean"],
                  "teacher_cos": after["heldout/teacher_cos"], "nn_agreement": after["heldout/nn_agreement"]},
        "train_time_s": round(elapsed, 3),
    }
