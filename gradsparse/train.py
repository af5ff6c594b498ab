"""One training loop for every model, with the monitors inside the jitted step.

Data flow: config -> data + model (:mod:`gradsparse.factory`) -> the jitted step
(:mod:`gradsparse.step`) returns the updated model and state plus the monitors of the batch ->
logged every ``log_every`` steps (one JSON object per line in ``RUN/log.jsonl``, written by
:mod:`gradsparse.runfolder`) -> checkpoints (``RUN/checkpoints``). Nothing reads back into
training except the plug-ins' post-update projections, which the step applies after the update.

Between two logged steps (or checkpoints) the plain steps run ``cfg.fuse_steps`` at a time in one
``lax.scan`` (:func:`gradsparse.step.make_train_chunk`), the rest one jitted call each; chunk
boundaries lie on the absolute step grid, so a resumed run cuts the same chunks. Nothing waits for
the device between log points: the finiteness flags of the plain steps are read at the next log
point or checkpoint, and a non-finite one is replayed step by step from the last checked state to
name the step and the block (:class:`TrainingDiverged`, as before fusion).

Everything random is a pure function of the seed (:class:`gradsparse.factory.RunKeys`): the data
order of step s comes from ``fold_in(data_key, epoch)``, the noise of step s from
``fold_in(noise_key, s)``, the flatness probes from ``fold_in(flatness_key, s)``.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
from tqdm.auto import tqdm

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
from gradsparse.runfolder import Resume, RunFolder, logged
from gradsparse.step import final_eval, flatness_fn, locate_nonfinite, make_eval_fn, make_train_chunk, make_train_step


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


def fuse_until(t: int, cfg: TrainConfig) -> int:
    """Where the plain steps from ``t`` (not a logged step) must stop fusing, on the absolute
    step grid: the next logged step, or the next checkpoint (after that many updates)."""
    nxt = min((t // cfg.log_every + 1) * cfg.log_every, cfg.steps - 1)
    if cfg.checkpoint_every:
        nxt = min(nxt, (t // cfg.checkpoint_every + 1) * cfg.checkpoint_every)
    return nxt


def step_plan(first: int, cfg: TrainConfig, fuse: int) -> Iterator[tuple[str, int, int]]:
    """The schedule of a training loop from update ``first`` to ``cfg.steps``, as ``(kind, s, n)``:
    ``("log", s, 1)``, the monitored step s (every logged step, :func:`logged`); ``("chunk", s,
    n)``, n = ``fuse`` fused plain steps from s; ``("step", s, 1)``, one plain step (the rest of
    a stretch shorter than ``fuse``, or all of them with ``fuse`` 1); ``("checkpoint", s, 0)``
    after s updates, on the checkpoint grid before the end. Plain stretches end at
    :func:`fuse_until`, so chunks lie on the absolute grid whatever ``first`` is."""
    s = first
    while s < cfg.steps:
        if logged(s, cfg):
            n, kind = 1, "log"
        else:
            n = fuse_until(s, cfg) - s
            n, kind = (fuse, "chunk") if fuse > 1 and n >= fuse else (1, "step")
        yield kind, s, n
        s += n
        if cfg.checkpoint_every and s % cfg.checkpoint_every == 0 and s < cfg.steps:
            yield "checkpoint", s, 0


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


def train(cfg: TrainConfig, out_dir: str | os.PathLike | None = None, *, dataset: Dataset | None = None,
          start: Built | None = None, progress: bool = True,
          on_log: Callable[[dict[str, Any]], None] | None = None, resume: bool = False,
          skip_damaged: bool = False, overwrite: bool | None = None) -> RunResult:
    """Train ``cfg`` and write the run folder (when ``out_dir`` is given).

    The model, trainable mask and projections come from :func:`gradsparse.factory.build`, or from
    ``start`` (finetuning passes :func:`gradsparse.factory.finetune_start`'s result, whose surgery
    options must be in ``cfg.surgery``). The log holds one JSON object per logged step with
    ``step``, ``loss``, ``accuracy``, ``lr``, ``batch_size`` and per-layer monitors under
    ``train/...`` (this step's batch) and ``heldout/...`` (the run's fixed held-out batch), each
    also as ``.../mean``: nothing in it depends on the clock, so one config and seed give the
    same bytes. The wall-clock time of each logged step (seconds since the run started, summed
    over resumed segments) goes to ``times.jsonl`` as ``{"step", "time"}``. Record s is computed
    before update s; the checkpoint ``step_c`` holds the state after c updates.

    Run folder: see :mod:`gradsparse.runfolder`. ``resume=True`` continues the run in ``out_dir``
    from its latest checkpoint (:func:`gradsparse.runfolder.plan_resume`): data order, noise, the
    held-out batch, the flatness probes and the covariance accumulators are functions of
    (seed, step) or checkpointed, so the resumed run writes the same parameters and log lines as
    an uninterrupted one; ``skip_damaged=True`` lets a resume start from the newest intact
    checkpoint when later ones are damaged (see :func:`gradsparse.runfolder.plan_resume`).
    ``on_log`` is called only for steps computed in this call. Everything is checked before
    anything is written, the memory the config needs included
    (:func:`gradsparse.memory.check_fits`): ValueError leaves the folder untouched.

    Raises :class:`TrainingDiverged` on NaN/inf: the log then ends at the last finite logged
    step and the last checkpoint is kept. Raises :class:`TrainingInterrupted` (a
    KeyboardInterrupt) on Ctrl-C after saving a checkpoint at the current step when it can.
    """
    if not isinstance(cfg, TrainConfig):
        raise ValueError(f"cfg: got {type(cfg).__name__}; allowed: a TrainConfig")
    cfg.validate()
    check_bool("resume", resume)
    check_bool("skip_damaged", skip_damaged)
    out = Path(out_dir) if out_dir is not None else None
    if resume and out is None:
        raise ValueError("resume=True needs out_dir, the run folder to continue")
    folder = RunFolder(out, resume=resume, overwrite=overwrite, skip_damaged=skip_damaged) if out is not None else None
    if skip_damaged and not resume:
        raise ValueError("skip_damaged=True applies to a resume only (resume=True)")
    if start is not None and not isinstance(start, Built):
        raise ValueError(f"start: got {type(start).__name__}; allowed: a gradsparse.factory.Built")
    if resume and start is None:
        stored = folder.stored_config()
        if stored is not None and stored.surgery:
            raise ValueError(f"{out} holds a finetuning run (its config.json records surgery); use "
                             "gradsparse finetune --resume with the arguments it was started with")
    run = prepare(cfg, out, dataset, start)
    ds, keys, dp, built, trainable = run.ds, run.keys, run.dp, run.built, run.built.trainable
    optimizer, acc, fixed, header = run.optimizer, run.acc, run.fixed, run.header
    model, state, (xe, ye) = run.model, run.state, run.heldout
    plan = Resume()
    if folder is not None:
        plan = folder.open(cfg, header, model, state, meta={k: header[k] for k in ("data_info", "data_sha256")})
    if plan.complete:
        return RunResult(plan.model, plan.state, out, list(plan.records), dict(plan.summary), acc is not None,
                         already_complete=True)
    if plan.checkpoint is not None:
        model, state = plan.model, plan.state
    first = plan.step

    model, state = dp.replicate(model), dp.replicate(state)
    xe, ye = dp.put_batch(xe), dp.put_batch(ye)
    if fixed is not None:
        fixed = tuple(jnp.asarray(a) for a in fixed)
    step_plain = make_train_step(optimizer, trainable, built.projections, monitors=False, accumulator=acc)
    step_mon = make_train_step(optimizer, trainable, built.projections, monitors=True, accumulator=acc)
    fuse = cfg.fuse_steps if dp.n_devices == 1 else 1
    step_chunk = make_train_chunk(optimizer, trainable, built.projections, accumulator=acc) if fuse > 1 else None
    evaluate = make_eval_fn(trainable)
    flat = flatness_fn(trainable, cfg.flatness_probes) if cfg.flatness_every else None
    sched = make_schedule(cfg)

    # ------------------------------------------------------------ writing starts here
    log = folder
    if folder is not None:
        try:
            folder.start()
        except BaseException:
            folder.close()
            raise
    for (path, why), kept in zip(plan.skipped, plan.kept_as):
        print(f"gradsparse: resuming from {plan.checkpoint} (step {plan.step}); skipped {path.name}: {why} "
              f"(kept as {kept.name})", file=sys.stderr)
    history: list[dict[str, Any]] = list(plan.records)
    last_ckpt: Path | None = plan.checkpoint
    last_step: int | None = plan.step if plan.checkpoint is not None else None
    bar = tqdm(total=cfg.steps, initial=first, disable=not progress, mininterval=0.5, dynamic_ncols=True,
               leave=False, desc="train")
    t0 = time.time() - plan.elapsed_s
    cur = (first, model, state)  # (updates done, model, state): replaced as ONE object, so ^C sees a consistent triple

    def save(step: int, m: Any, st: Any) -> Path | None:
        if out is None:
            return None
        return log.checkpoint(step, m, st, time.time() - t0)

    def interrupted() -> TrainingInterrupted:
        """Save the state after the last completed update (unless it is saved already or none was done)."""
        done, m, st = cur
        if out is None:
            return TrainingInterrupted(done, cfg.steps, None, False, None)
        bad = first_bad() if pending else None
        if bad is not None:
            return TrainingInterrupted(done, cfg.steps, last_ckpt, False, out, f"the loss was not finite at step {bad}")
        if last_step == done:
            return TrainingInterrupted(done, cfg.steps, last_ckpt, True, out)
        if done == 0:
            return TrainingInterrupted(done, cfg.steps, None, False, out, "no update was made yet")
        try:
            return TrainingInterrupted(done, cfg.steps, save(done, m, st), True, out)
        except KeyboardInterrupt:
            why = "interrupted again while writing it"
        except OSError as e:
            why = f"{e.strerror or e}: {e.filename}"
        return TrainingInterrupted(done, cfg.steps, last_ckpt, False, out, why)

    def batch(t: int) -> tuple[Any, Any]:
        x, y = run.batch(t)
        return dp.put_batch(x), dp.put_batch(y)

    def plain(m: Any, st: Any, t: int) -> tuple[Any, Any, Any]:
        x, y = batch(t)
        new_m, new_st, _, finite = step_plain(m, st, x, y, jax.random.fold_in(keys.noise, t), jnp.asarray(t, jnp.int32))
        return new_m, new_st, finite

    def first_bad() -> int | None:
        """The first unchecked step whose loss or gradient was not finite (one host sync)."""
        for t, n, flag in pending:
            if n:  # a fused chunk: flag is its bad step (-1: all finite)
                b = int(flag)
                if b >= 0:
                    return b
            elif not bool(flag):
                return t
        return None

    def settle() -> None:
        """Check the plain steps run since the last check; on a non-finite one, replay them
        one by one from the last checked state to name the step and the block, then raise."""
        nonlocal seg
        bad = first_bad() if pending else None
        if bad is None:
            pending.clear()
            seg = cur
            return
        t, m, st = seg
        for u in range(t, bad):
            m, st, _ = plain(m, st, u)
        x, y = batch(bad)
        raise TrainingDiverged(bad, locate_nonfinite(m, trainable, jnp.asarray(x), jnp.asarray(y),
                                                     jax.random.fold_in(keys.noise, bad)), last_ckpt)

    finished = False
    pending: list[tuple[int, int, Any]] = []  # (step, chunk length or 0 for one step, finite flag / bad step)
    seg = cur  # the last state whose steps are all checked finite
    try:
        for kind, s, n in step_plan(first, cfg, fuse):
            if kind == "checkpoint":
                settle()
                last_ckpt = save(s, model, state)
                last_step = s
                continue
            if kind == "log":
                settle()
                x, y = batch(s)
                key = jax.random.fold_in(keys.noise, s)
                new_model, new_state, metrics, finite = step_mon(model, state, x, y, key, jnp.asarray(s, jnp.int32))
                if not bool(finite):
                    where = locate_nonfinite(model, trainable, jnp.asarray(x), jnp.asarray(y), key)
                    raise TrainingDiverged(s, where, last_ckpt)
                ev = evaluate(model, xe, ye)
                ef = evaluate(model, *fixed) if fixed is not None else None
                fl = None
                if flat is not None and flat_step(s, cfg):
                    fx, fy = fixed if fixed is not None else (jnp.asarray(x), jnp.asarray(y))
                    fl = flat(model, fx, fy, jax.random.fold_in(keys.flatness, s))
                cov = covariance.log_metrics(acc, new_state[1], cfg.batch_size, s + 1) if acc is not None else None
                rec = record(cfg, s, sched(s), metrics, ev, ef, fl, cov, int(xe.shape[0]),
                             int(fixed[0].shape[0]) if fixed is not None else None)
                elapsed = round(time.time() - t0, 3)
                history.append(rec)
                if log is not None:
                    log.write(rec, time=elapsed)
                if on_log is not None:
                    on_log(rec)
                bar.set_postfix(loss=_fmt(rec["loss"]), density=_fmt(rec["train/density/mean"]), refresh=False)
                cur = seg = (s + 1, new_model, new_state)
            elif kind == "chunk":
                xs, ys = run.chunk_batch(s, n)
                new_model, new_state, bad = step_chunk(model, state, xs, ys, keys.noise, jnp.asarray(s, jnp.int32))
                pending.append((s, n, bad))
                cur = (s + n, new_model, new_state)
            else:
                new_model, new_state, finite = plain(model, state, s)
                pending.append((s, 0, finite))
                cur = (s + 1, new_model, new_state)
            model, state = cur[1], cur[2]
            bar.update(n)
        settle()
        last_ckpt = save(cfg.steps, model, state)
        last_step = cfg.steps
        finished = True
    except KeyboardInterrupt:
        raise interrupted() from None
    finally:
        bar.close()
        if log is not None and not finished:
            log.close()
        if log is not None:
            log.close_log()
    try:
        return finish_run(cfg, folder, ds, keys, model, state, acc, history, t0)
    except KeyboardInterrupt:
        raise TrainingInterrupted(cfg.steps, cfg.steps, last_ckpt, out is not None, out) from None
    finally:
        if folder is not None:
            folder.close()


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
