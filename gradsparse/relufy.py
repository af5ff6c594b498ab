"""Relufication by finetuning: a pretrained BERT with ReLU (or the ReLU -> JSReLU mix) and the
sparsity plug-ins, distilled to its frozen original (``gradsparse finetune HF_FOLDER ...``).

What the route does (the "ReLU strikes back" / ProSparse recipe, with gradsparse's plug-ins):

1. teacher = the folder's model as trained (GELU), frozen; student = the same weights with GELU
   replaced by ReLU (``--activation relu``) or by (1 - k) ReLU + k JSReLU with k ramped from 0 to 1
   over ``t_mix`` steps (``--activation mix``), plus the plug-ins of ``--modules`` (zeroth bias,
   restricted LN: :func:`gradsparse.factory.build_distill` says exactly what each touches in a
   post-LN BERT). Every plug-in is the identity at insertion.
2. the student is trained with Adam (constant lr) on the training sentences of
   :func:`gradsparse.distill.default_split` to L = L_cos + w L_hid (:mod:`gradsparse.relufy_step`).
   The default w = 10 (``--hidden-weight``) comes from a pilot on all-MiniLM-L6-v2
   (``benchmarks/relufy_claim.py --steps 60 --pilot-hidden 0 10 30``: ReLU, no modules, 60 steps,
   batch 16, seq_len 32, lr 5e-5, seed 0; 512 held-out sentences; before finetuning: teacher
   cosine 0.5216, neighbour agreement 0.357, density 0.140)::

       w     teacher cosine   neighbour agreement   density (mean over layers)
       0     0.9707           0.803                 0.2370
       1     0.9748           0.797                 0.2383
       10    0.9798           0.826                 0.2457
       30    0.9805           0.826                 0.2478

   The hidden-state term helps the teacher cosine and the agreement up to w ~ 10 and saturates
   there; it costs a little density (the student is held closer to the GELU teacher's states).
   (w = 1 from the same code at 60 steps outside that script; one seed, so differences of 0.01
   in agreement are within its noise.)
3. logged every ``log_every`` steps and at the last step (one JSON object per line in
   ``RUN/log.jsonl``, written whole by :class:`gradsparse.runfolder.LogWriter`; record s is
   computed BEFORE update s): ``loss``, ``cosine_loss``, ``hidden_mse``, ``grad_norm``, the student's
   exact per-layer activation density on the training batch (``train/density`` and its ``/mean``),
   and on ALL held-out sentences (>= 500): ``heldout/teacher_cos``, ``heldout/nn_agreement``
   (top-1 nearest-neighbour agreement with the teacher) and ``heldout/density`` (+ ``/mean``);
   ``mix_k`` with the mix. Wall-clock times go to ``times.jsonl`` only, so the log is a function
   of config and seed.
4. ``summary.json`` at the end: ``before`` (the teacher's fraction of positive pre-activations per
   layer, the relufied student's exact density, teacher cosine and agreement before any update),
   ``after`` (the same after the last update), ``train_time_s`` (summed over resumed segments).

Resumable like every run: ``config.json`` records the model folder and the SHA-256 of its
weights; a resume re-reads the folder, refuses it when the SHA-256 changed, loads the latest
checkpoint (student + Adam state) and continues to the same parameters and log lines as an
uninterrupted run (data order of step s: :func:`gradsparse.distill.sentence_batch` with the run
seed's key; no other randomness). Ctrl-C saves a checkpoint at the current step.
"""

from __future__ import annotations

import json
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
from tqdm.auto import tqdm

from gradsparse._validate import check_bool
from gradsparse.activations import Mixed
from gradsparse.errors import TrainingDiverged, TrainingInterrupted
from gradsparse.distill import default_split, heldout_metrics, sentence_batch
from gradsparse.factory import build_distill
from gradsparse.models.bert import BertEncoder, SentenceTokenizer
from gradsparse.relufy_config import DistillConfig
from gradsparse.relufy_step import make_distill_step, make_embed_fn
from gradsparse.runfolder import Resume, RunFolder, logged

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


class HeldOut:
    """The held-out sentences tokenised once into fixed-shape batches (``eval_batch`` x ``seq_len``;
    the last batch is filled up with copies of the first sentence, which count nowhere), and the
    teacher's embeddings and fraction of positive pre-activations on them."""

    def __init__(self, tokenizer: SentenceTokenizer, sentences: list[str], eval_batch: int, seq_len: int,
                 teacher: BertEncoder):
        self.n = len(sentences)
        self.batches = []
        for s in range(0, self.n, eval_batch):
            chunk = sentences[s:s + eval_batch]
            b = tokenizer(chunk + [sentences[0]] * (eval_batch - len(chunk)), pad_to_multiple_of=seq_len)
            count = b["attention_mask"].copy()
            count[len(chunk):] = 0
            self.batches.append((len(chunk), tuple(jnp.asarray(b[k]) for k in
                                                   ("input_ids", "attention_mask", "token_type_ids")),
                                 jnp.asarray(count)))
        self.embed = make_embed_fn()
        self.teacher_emb, _, self.teacher_positive = self(teacher)

    def __call__(self, model: BertEncoder) -> tuple[np.ndarray, list[float], list[float]]:
        """(embeddings (N, d), exact density per layer, fraction of z > 0 per layer) on the held-out set."""
        embs, active, positive, tokens = [], 0.0, 0.0, 0.0
        for real, arrays, count in self.batches:
            e, c = self.embed(model, *arrays, count)
            embs.append(np.asarray(e)[:real])
            active = active + np.asarray(c["active"], np.float64)
            positive = positive + np.asarray(c["positive"], np.float64)
            tokens += float(c["tokens"])
        n_units = model.mlp_blocks()[0].n
        return (np.concatenate(embs), [float(v) for v in active / (tokens * n_units)],
                [float(v) for v in positive / (tokens * n_units)])


def _mean(v: list[float]) -> float:
    return float(sum(v) / len(v))


def _mix_k(model: BertEncoder) -> float | None:
    act = model.mlp_blocks()[0].act
    return float(act.k) if isinstance(act, Mixed) else None


def _heldout_record(student: BertEncoder, held: HeldOut) -> dict[str, Any]:
    emb, dens, _ = held(student)
    m = heldout_metrics(emb, held.teacher_emb, min_sentences=min(500, held.n))
    return {"heldout/teacher_cos": m["teacher_cos"], "heldout/nn_agreement": m["nn_agreement"],
            "heldout/density": dens, "heldout/density/mean": _mean(dens), "heldout/num_sentences": held.n}


def _stored(out: Path) -> DistillConfig | None:
    p = out / "config.json"
    if not p.exists():
        return None
    try:
        return DistillConfig.from_dict(json.loads(p.read_text(encoding="utf-8")))
    except (OSError, json.JSONDecodeError, TypeError, ValueError) as e:
        raise ValueError(f"{p} is not the config of a relufication run ({e}); resume it with the command that "
                         "started it, or use --overwrite") from None


def relufy(cfg: DistillConfig, out_dir: str | os.PathLike | None = None, *, resume: bool = False,
           progress: bool = True, on_log: Callable[[dict[str, Any]], None] | None = None,
           overwrite: bool | None = None, skip_damaged: bool = False) -> DistillResult:
    """Train the relufied student of ``cfg`` against its teacher (module docstring); write the run
    folder when ``out_dir`` is given. ``resume=True`` continues the run in ``out_dir``.

    Everything is checked before anything is written (ValueError leaves the folder untouched).
    Raises :class:`gradsparse.train.TrainingInterrupted` on Ctrl-C after saving a checkpoint, and
    :class:`gradsparse.train.TrainingDiverged` when the loss or its gradient is NaN/inf (the log
    ends at the last finite logged step; the last checkpoint is kept).
    """
    if not isinstance(cfg, DistillConfig):
        raise ValueError(f"cfg: got {type(cfg).__name__}; allowed: a DistillConfig")
    cfg.validate()
    check_bool("resume", resume)
    out = Path(out_dir) if out_dir is not None else None
    if resume and out is None:
        raise ValueError("resume=True needs out_dir, the run folder to continue")
    folder = RunFolder(out, resume=resume, overwrite=overwrite, skip_damaged=skip_damaged) if out is not None else None
    stored = _stored(out) if resume else None
    if stored is not None:
        cfg.check_resumable(stored, f"the run in {out} (config.json)")
        cfg = cfg.replace(weights_sha256=stored.weights_sha256)
    built, teacher, tok, info = build_distill(cfg)  # refuses a folder whose weights changed
    cfg = cfg.replace(weights_sha256=info.weights_sha256)
    train_sents, held_sents = default_split(cfg.num_heldout)
    if cfg.batch_size > len(train_sents):
        raise ValueError(f"batch_size: {cfg.batch_size} exceeds the {len(train_sents)} training sentences")
    optimizer = optax.adam(cfg.lr)
    student = built.model
    opt_state = optimizer.init(eqx.filter(student, built.trainable))
    header = {"kind": KIND, "config": cfg.to_dict(), "bert_info": info.to_dict()}

    held = HeldOut(tok, held_sents, cfg.eval_batch, cfg.seq_len, teacher)
    plan = Resume()
    if folder is not None:
        meta = {"model_folder": cfg.model_folder, "weights_sha256": cfg.weights_sha256, "bert_info": info.to_dict()}
        plan = folder.open(cfg, header, student, opt_state, meta=meta)
    if plan.complete:
        return DistillResult(plan.model, plan.state, out, list(plan.records), dict(plan.summary), True)
    if plan.checkpoint is not None:
        student, opt_state = plan.model, plan.state
    first, records, elapsed0, last_ckpt = plan.step, plan.records, plan.elapsed_s, plan.checkpoint
    step_fn = make_distill_step(optimizer, built.trainable, built.projections, hidden_weight=cfg.hidden_weight)
    data_key = jax.random.key(cfg.seed)

    # ------------------------------------------------------------ writing starts here
    log = folder
    if folder is not None:
        try:
            folder.start()
        except BaseException:
            folder.close()
            raise
    history = list(records)
    t0 = time.time() - elapsed0
    bar = tqdm(total=cfg.steps, initial=first, disable=not progress, mininterval=0.5, dynamic_ncols=True,
               leave=False, desc="relufy")
    cur = (first, student, opt_state)
    last_step = first if last_ckpt is not None else None

    finished = False

    def save(step: int, m: Any, st: Any) -> Path | None:
        if out is None:
            return None
        return log.checkpoint(step, m, st, time.time() - t0)

    try:
        for s in range(first, cfg.steps):
            b = sentence_batch(tok, train_sents, data_key, s, cfg.batch_size, pad_to_multiple_of=cfg.seq_len)
            ids, mask, types = (jnp.asarray(b[k]) for k in ("input_ids", "attention_mask", "token_type_ids"))
            do_log = logged(s, cfg)
            rec_held = _heldout_record(student, held) if do_log else None
            new_student, new_opt, metrics = step_fn(student, opt_state, teacher, ids, mask, types,
                                                    jnp.asarray(s, jnp.int32))
            if not (bool(jnp.isfinite(metrics["loss"])) and bool(jnp.isfinite(metrics["grad_norm"]))):
                raise TrainingDiverged(s, "distillation loss or its gradient; a lower --lr may help", last_ckpt)
            if do_log:
                c = metrics["counts"]
                dens = [float(v) for v in np.asarray(c["active"]) / (float(c["tokens"]) * student.mlp_blocks()[0].n)]
                rec = {"step": s, "loss": float(metrics["loss"]), "cosine_loss": float(metrics["cosine_loss"]),
                       "hidden_mse": float(metrics["hidden_mse"]), "grad_norm": float(metrics["grad_norm"]),
                       "lr": cfg.lr, "batch_size": cfg.batch_size, "train/density": dens,
                       "train/density/mean": _mean(dens), **rec_held}
                k = _mix_k(student)
                if k is not None:
                    rec["mix_k"] = k
                history.append(rec)
                if log is not None:
                    log.write(rec, time=round(time.time() - t0, 3))
                if on_log is not None:
                    on_log(rec)
                bar.set_postfix(loss=f"{rec['loss']:.4g}", density=f"{rec['train/density/mean']:.3g}",
                                cos=f"{rec['heldout/teacher_cos']:.4f}", refresh=False)
            cur = (s + 1, new_student, new_opt)
            student, opt_state = new_student, new_opt
            bar.update(1)
            if cfg.checkpoint_every and (s + 1) % cfg.checkpoint_every == 0 and s + 1 < cfg.steps:
                last_ckpt, last_step = save(s + 1, student, opt_state), s + 1
        last_ckpt, last_step = save(cfg.steps, student, opt_state), cfg.steps
        finished = True
    except KeyboardInterrupt:
        done, m, st = cur
        if out is None:
            raise TrainingInterrupted(done, cfg.steps, None, False, None) from None
        if last_step == done:
            raise TrainingInterrupted(done, cfg.steps, last_ckpt, True, out) from None
        if done == 0:
            raise TrainingInterrupted(done, cfg.steps, None, False, out, "no update was made yet") from None
        raise TrainingInterrupted(done, cfg.steps, save(done, m, st), True, out) from None
    finally:
        bar.close()
        if log is not None and not finished:
            log.close()
    try:
        summary = _summary(cfg, history, student, held, time.time() - t0)
        if folder is not None:
            folder.finish(summary)
    finally:
        if folder is not None:
            folder.close()
    return DistillResult(student, opt_state, out, history, summary)


def _summary(cfg: DistillConfig, history: list[dict[str, Any]], student: BertEncoder, held: HeldOut,
             elapsed: float) -> dict[str, Any]:
    """summary.json: before (teacher GELU, relufied at step 0) and after (final student)."""
    first = history[0]
    after = _heldout_record(student, held)
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
