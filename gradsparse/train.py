"""Training a model from a TrainConfig: the adapter of the loop engine (:mod:`gradsparse.loop`).

Data flow: config -> data + model (:mod:`gradsparse.factory`, :func:`prepare`) -> the jitted step
over the cross-entropy objective (:mod:`gradsparse.step`) returns the updated model and state plus
the monitors of the batch -> logged every ``log_every`` steps (:func:`record`: one JSON object per
line in ``RUN/log.jsonl``) -> checkpoints (``RUN/checkpoints``) -> ``summary.json``
(:func:`finish_run`). The run folder is a :class:`gradsparse.runfolder.RunFolder`; the step plan,
fused chunks, deferred finiteness checks, checkpoint grid and Ctrl-C policy are the engine's.
Nothing reads back into training except the plug-ins' post-update projections.

Everything random is a pure function of the seed (:class:`gradsparse.factory.RunKeys`): the data
order of step s comes from ``fold_in(data_key, epoch)``, the noise of step s from
``fold_in(noise_key, s)``, the flatness probes from ``fold_in(flatness_key, s)``.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from gradsparse import covariance
from gradsparse._validate import check_bool
from gradsparse.config import TrainConfig
from gradsparse.errors import TrainingDiverged, TrainingInterrupted  # noqa: F401 - also imported from here
from gradsparse.data import (LABEL_NOISE_TAG, Batcher, DataInfo, Dataset, data_sha256, heldout_batch, load_dataset,
                             noisy_labels, noisy_labels_device)
from gradsparse.factory import Built, RunKeys, build, init_state, make_accumulator, make_optimizer, make_schedule
from gradsparse.memory import check_fits
from gradsparse.monitors import summarize
from gradsparse.parallel import DataParallel
from gradsparse.loop import Loop, StepInfo
from gradsparse.runfolder import Resume, RunFolder
from gradsparse.step import (CROSS_ENTROPY, final_eval, flatness_fn, locate_nonfinite, make_eval_fn,
                             make_train_chunk, make_train_step)


@dataclass
class RunResult:
    """What ``train`` returns: the final model and state and where things were written.

    ``state`` is the optimizer state, or (optimizer state, covariance state) with
    ``track_covariance``; ``opt_state`` is always the optimizer state."""

    model: Any
    state: Any
    out_dir: Path | None
    history: list[dict[str, Any]] = field(default_factory=list)
    final: dict[str, Any] = field(default_factory=dict)
    tracks_covariance: bool = False
    #: True when ``train(..., resume=True)`` found the run finished: nothing was trained or written
    already_complete: bool = False

    @property
    def opt_state(self) -> Any:
        return self.state[0] if self.tracks_covariance else self.state


def _fmt(v: float) -> str:
    return f"{v:.4g}"


@dataclass
class Prepared:
    """Everything one run needs before anything is written (:func:`prepare`): data, keys, model,
    optimizer and its fresh state, batches and the header of the run folder."""

    cfg: TrainConfig
    out: Path | None
    ds: Dataset
    info: DataInfo
    keys: RunKeys
    dp: DataParallel
    built: Built
    optimizer: Any
    acc: Any
    model: Any
    state: Any
    batcher: Batcher
    heldout: tuple[Any, Any]
    fixed: tuple[Any, Any] | None
    label_key: Any
    header: dict[str, Any]

    def batch(self, t: int) -> tuple[Any, Any]:
        """The training batch of step ``t`` (host arrays), with the run's label noise."""
        x, y = self.batcher(t)
        if self.cfg.label_noise:
            y = noisy_labels(y, jax.random.fold_in(self.label_key, t), self.cfg.label_noise, self.ds.num_classes)
        return x, y

    def chunk_batch(self, t: int, n: int) -> tuple[Any, Any]:
        """The batches of steps ``t .. t+n-1`` stacked, (n, B, ...), as device arrays: the same
        examples and labels as ``n`` calls of :meth:`batch`."""
        xs, ys = self.batcher.chunk(t, n)
        ys = jnp.asarray(ys)
        if self.cfg.label_noise:
            ys = jnp.stack([noisy_labels_device(ys[i], jax.random.fold_in(self.label_key, t + i),
                                                self.cfg.label_noise, self.ds.num_classes) for i in range(n)])
        return jnp.asarray(xs), ys


def prepare(cfg: TrainConfig, out: Path | None, dataset: Dataset | None, start: Built | None, *,
            devices: int | None = None) -> Prepared:
    """The setup of one run of ``cfg`` (validated; nothing written): the dataset (``dataset`` or
    ``load_dataset``), :class:`RunKeys` of the seed, data parallelism, the memory check, the model
    (``start`` or :func:`build`), optimizer state, training batcher, held-out batch (SPEC 2), the
    fixed flatness subset and the header of the run folder. ``devices`` overrides
    the device count the memory check assumes (default: that of the data parallelism)."""
    ds = dataset if dataset is not None else load_dataset(cfg.data, seed=cfg.seed, path=cfg.data_path,
                                                          n_train=cfg.n_train, n_test=cfg.n_test)
    info = DataInfo.of(ds)
    keys = RunKeys.of(cfg.seed)
    dp = DataParallel.auto(cfg.batch_size, enabled=cfg.data_parallel)
    check_fits(cfg, info, start, devices=dp.n_devices if devices is None else devices)
    built = start if start is not None else build(cfg, info, keys.model)
    model = built.model
    optimizer = make_optimizer(cfg)
    acc = make_accumulator(cfg, model)
    state = init_state(cfg, built, optimizer, acc)
    batcher = Batcher(ds, keys.data, cfg.batch_size, cfg.seq_len)
    heldout = heldout_batch(ds, cfg.eval_batch, cfg.seq_len, keys.heldout)
    if cfg.flatness_subset and ds.kind != "text" and cfg.flatness_subset > ds.n_train:
        raise ValueError(f"flatness_subset: {cfg.flatness_subset} exceeds the {ds.n_train} training examples; "
                         f"allowed: at most {ds.n_train}")
    fixed = None
    if cfg.flatness_subset:  # a FIXED training subset for flatness and the monitors compared with it
        fixed = (Batcher(ds, keys.data, cfg.flatness_subset, cfg.seq_len)(0) if ds.kind == "text"
                 else (ds.x_train[:cfg.flatness_subset], ds.y_train[:cfg.flatness_subset]))
    label_key = jax.random.fold_in(keys.data, LABEL_NOISE_TAG)
    header = {"config": cfg.to_dict(), "data_info": info.to_dict()}
    if out is not None:
        header["data_sha256"] = data_sha256(ds)
    return Prepared(cfg, out, ds, info, keys, dp, built, optimizer, acc, model, state, batcher, heldout, fixed,
                    label_key, header)


def flat_step(s: int, cfg: TrainConfig) -> bool:
    """Whether logged step ``s`` also estimates flatness: every ``flatness_every`` steps and the last."""
    return bool(cfg.flatness_every) and (s % cfg.flatness_every == 0 or s == cfg.steps - 1)


def record(cfg: TrainConfig, s: int, lr: float, metrics: dict[str, Any], ev: dict[str, Any],
           ef: dict[str, Any] | None, fl: dict[str, Any] | None, cov: dict[str, Any] | None, heldout_n: int,
           fixed_n: int | None) -> dict[str, Any]:
    """The log line of logged step ``s``: the step's ``metrics`` (loss, accuracy, grad_norm and
    per-layer monitors of its batch, under ``train/``), the held-out evaluation ``ev`` (under
    ``heldout/``), the fixed subset's ``ef`` (``fixed/``), the flatness estimates ``fl``
    (``flat/``) and the covariance metrics ``cov``; ``lr``, the schedule's learning rate at ``s``."""
    rec = {"step": s, "loss": float(metrics["loss"]), "accuracy": float(metrics["accuracy"]),
           "grad_norm": float(metrics["grad_norm"]), "lr": float(lr), "batch_size": cfg.batch_size}
    rec.update(summarize(metrics["layers"], "train"))
    rec.update({"heldout/loss": float(ev["loss"]), "heldout/accuracy": float(ev["accuracy"]),
                "heldout_batch_size": heldout_n})
    rec.update(summarize(ev["layers"], "heldout"))
    if ef is not None:
        rec.update({"fixed/loss": float(ef["loss"]), "fixed/accuracy": float(ef["accuracy"]),
                    "fixed_batch_size": fixed_n})
        rec.update(summarize(ef["layers"], "fixed"))
    if fl is not None:
        rec.update({f"flat/{k}": float(v) for k, v in fl.items()})
    if cov is not None:
        rec.update(cov)
    return rec


class _Task:
    """One run of :func:`prepare`'s result for the loop engine: its batches, steps and records."""

    replay = True

    def __init__(self, run: Prepared, fuse: int):
        self.run, self.cfg, self.dp, tr, bl = run, run.cfg, run.dp, run.built.trainable, run.built
        self.plain_step = make_train_step(CROSS_ENTROPY, run.optimizer, tr, bl.projections, monitors=False,
                                          accumulator=run.acc)
        self.mon_step = make_train_step(CROSS_ENTROPY, run.optimizer, tr, bl.projections, monitors=True,
                                        accumulator=run.acc)
        self.fused = make_train_chunk(CROSS_ENTROPY, run.optimizer, tr, bl.projections,
                                      accumulator=run.acc) if fuse > 1 else None
        self.evaluate, self.sched = make_eval_fn(tr), make_schedule(run.cfg)
        self.flat = flatness_fn(tr, run.cfg.flatness_probes) if run.cfg.flatness_every else None
        self.heldout = tuple(self.dp.put_batch(a) for a in run.heldout)
        self.fixed = tuple(jnp.asarray(a) for a in run.fixed) if run.fixed is not None else None

    def batch(self, s: int) -> tuple[Any, Any]:
        return tuple(self.dp.put_batch(a) for a in self.run.batch(s))

    def key(self, s: int) -> Any:
        return jax.random.fold_in(self.run.keys.noise, s)

    def plain(self, model: Any, state: Any, s: int) -> tuple[Any, Any, Any]:
        m, st, _, finite = self.plain_step(model, state, self.batch(s), self.key(s), jnp.asarray(s, jnp.int32))
        return m, st, finite

    def chunk(self, model: Any, state: Any, s: int, n: int) -> tuple[Any, Any, Any]:
        return self.fused(model, state, self.run.chunk_batch(s, n), self.run.keys.noise, jnp.asarray(s, jnp.int32))

    def logged(self, model: Any, state: Any, s: int):
        cfg, batch = self.cfg, self.batch(s)
        new_model, new_state, metrics, finite = self.mon_step(model, state, batch, self.key(s),
                                                              jnp.asarray(s, jnp.int32))

        def records() -> list[dict[str, Any]]:
            ev = self.evaluate(model, *self.heldout)
            ef = self.evaluate(model, *self.fixed) if self.fixed is not None else None
            fl = None
            if self.flat is not None and flat_step(s, cfg):
                fx, fy = self.fixed if self.fixed is not None else tuple(jnp.asarray(a) for a in batch)
                fl = self.flat(model, fx, fy, jax.random.fold_in(self.run.keys.flatness, s))
            acc = self.run.acc
            cov = covariance.log_metrics(acc, new_state[1], cfg.batch_size, s + 1) if acc is not None else None
            return [record(cfg, s, self.sched(s), metrics, ev, ef, fl, cov, int(self.heldout[0].shape[0]),
                           int(self.fixed[0].shape[0]) if self.fixed is not None else None)]

        return new_model, new_state, finite, records

    def locate(self, model: Any, s: int) -> str:
        return locate_nonfinite(model, self.run.built.trainable, tuple(jnp.asarray(a) for a in self.run.batch(s)),
                                self.key(s))


def train(cfg: TrainConfig, out_dir: str | os.PathLike | None = None, *, dataset: Dataset | None = None,
          start: Built | None = None, progress: bool = True,
          on_log: Callable[[dict[str, Any]], None] | None = None, resume: bool = False,
          skip_damaged: bool = False, overwrite: bool | None = None,
          hooks: Sequence[tuple[Callable[[StepInfo], None], int]] = ()) -> RunResult:
    """Train ``cfg`` and write the run folder (when ``out_dir`` is given).

    The model, trainable mask and projections come from :func:`gradsparse.factory.build`, or from
    ``start`` (finetuning passes :func:`gradsparse.factory.finetune_start`'s result, whose surgery
    options must be in ``cfg.surgery``). The log holds one JSON object per logged step with
    ``step``, ``loss``, ``accuracy``, ``lr``, ``batch_size`` and per-layer monitors under
    ``train/...`` (this step's batch) and ``heldout/...`` (the run's fixed held-out batch), each
    also as ``.../mean``: nothing in it depends on the clock, so one config and seed give the
    same bytes. The wall-clock time of each logged step goes to ``times.jsonl``. Record s is
    computed before update s; the checkpoint ``step_c`` holds the state after c updates.

    Run folder: :class:`gradsparse.runfolder.RunFolder`. ``resume=True`` continues the run in
    ``out_dir`` from its latest checkpoint (data order, noise, the held-out batch, the flatness
    probes and the covariance accumulators are functions of (seed, step) or checkpointed, so the
    resumed run writes the same parameters and log lines as an uninterrupted one; a finished run
    is returned as it is, ``already_complete``); ``skip_damaged=True`` lets a resume start from
    the newest intact checkpoint when later ones are damaged. ``overwrite`` (default: True unless
    resuming) lets a new run replace a run in ``out_dir``; False refuses a folder that holds
    anything (what the commands do without ``--overwrite``). ``on_log`` is called only for steps
    computed in this call; ``hooks``: ``(fn, every)`` pairs, ``fn(StepInfo)`` after every ``every``
    updates (:meth:`gradsparse.loop.Loop.add_hook`). Everything is checked before anything is written, the memory the
    config needs included (:func:`gradsparse.memory.check_fits`): ValueError leaves the folder
    untouched.

    Raises :class:`gradsparse.errors.TrainingDiverged` on NaN/inf and
    :class:`gradsparse.errors.TrainingInterrupted` on Ctrl-C (:mod:`gradsparse.loop`).
    """
    if not isinstance(cfg, TrainConfig):
        raise ValueError(f"cfg: got {type(cfg).__name__}; allowed: a TrainConfig")
    cfg.validate()
    check_bool("resume", resume)
    out = Path(out_dir) if out_dir is not None else None
    if resume and out is None:
        raise ValueError("resume=True needs out_dir, the run folder to continue")
    if skip_damaged and not resume:
        raise ValueError("skip_damaged=True applies to a resume only (resume=True)")
    folder = RunFolder(out, resume=resume, overwrite=overwrite, skip_damaged=skip_damaged) if out is not None else None
    if start is not None and not isinstance(start, Built):
        raise ValueError(f"start: got {type(start).__name__}; allowed: a gradsparse.factory.Built")
    if resume and start is None:
        stored = folder.stored_config()
        if stored is not None and stored.surgery:
            raise ValueError(f"{out} holds a finetuning run (its config.json records surgery); use "
                             "gradsparse finetune --resume with the arguments it was started with")
    run = prepare(cfg, out, dataset, start)
    plan = Resume()
    if folder is not None:
        meta = {k: run.header[k] for k in ("data_info", "data_sha256")}
        plan = folder.open(cfg, run.header, run.model, run.state, meta=meta)
    if plan.complete:
        return RunResult(plan.model, plan.state, out, list(plan.records), dict(plan.summary), run.acc is not None,
                         already_complete=True)
    with folder if folder is not None else contextlib.nullcontext():  # the lock is held until the summary is written
        model, state = (plan.model, plan.state) if plan.checkpoint is not None else (run.model, run.state)
        fuse = cfg.fuse_steps if run.dp.n_devices == 1 else 1
        loop = Loop(_Task(run, fuse), cfg, fuse, [folder], progress=progress, desc="train", on_log=on_log,
                    postfix=lambda r: {"loss": _fmt(r["loss"]), "density": _fmt(r["train/density/mean"])})
        for fn, every in hooks:
            loop.add_hook(fn, every)
        if folder is not None:
            folder.start()
            for (path, why), kept in zip(plan.skipped, plan.kept_as):
                print(f"gradsparse: resuming from {plan.checkpoint} (step {plan.step}); skipped {path.name}: {why} "
                      f"(kept as {kept.name})", file=sys.stderr)
        res = loop.run(plan.step, run.dp.replicate(model), run.dp.replicate(state), elapsed=plan.elapsed_s,
                       last_checkpoint=plan.checkpoint, histories=[plan.records],
                       finish=lambda m, st, hist, t0: finish_run(cfg, folder, run.ds, run.keys, m, st, run.acc,
                                                                 hist[0], t0))
    return res.finished


def finish_run(cfg: TrainConfig, folder: RunFolder | None, ds: Dataset, keys: RunKeys, model: Any, state: Any,
               acc: Any, history: list[dict[str, Any]], t0: float, extra: dict[str, Any] | None = None) -> RunResult:
    """The final evaluation, ``summary.json`` (and ``covariance.npz``) of a completed run;
    ``extra`` is added to the summary."""
    final = final_eval(model, ds, cfg.seq_len, keys.heldout)
    final.update(extra or {})
    final["train_time_s"] = round(time.time() - t0, 3)
    final["steps"] = cfg.steps
    if history:
        final["density_start"] = history[0]["train/density/mean"]
        final["density_end"] = history[-1]["train/density/mean"]
        final["heldout_density_end"] = history[-1]["heldout/density/mean"]
    if folder is not None:
        if acc is not None:
            covariance.save(folder.out / "covariance.npz", acc, state[1], cfg.batch_size, cfg.steps)
        folder.finish(final)
    return RunResult(model, state, folder.out if folder is not None else None, history, final, acc is not None)
