"""Seeds trained together: S runs that differ only in their seed, as ONE ``jax.vmap``-ed loop.

:func:`train_seeds` writes every seed's run folder as :func:`gradsparse.train.train` would (config,
meta, ``log.jsonl`` with the same records: held-out and fixed-subset monitors, flatness,
covariance metrics; checkpoints on the same grid; ``summary.json``), but each jitted call (the
monitored step, the fused plain steps, the held-out evaluation, the Hutchinson traces) runs the S
models at once over a leading seed axis. Every random draw is still the seed's own
(:class:`gradsparse.factory.RunKeys`: model, data order, noise, flatness probes, held-out batch).

Equal to one-at-a-time training up to float rounding, not bit for bit: the vmapped matmuls are
batched kernels whose sums XLA may order differently, and training amplifies ulp differences.
``tests/test_train_seeds.py`` bounds the difference; ``summary.json`` of each run records
``trained_with_seeds`` (the S seeds of the group), so a report can name the runs trained this way.

Worth it where one model leaves the machine idle: per-step fixed cost dominates at small widths
on a CPU and on an accelerator. :func:`worth_vmapping` is that rule (its measurements:
docs/engine_measurements.md). The loop is :mod:`gradsparse.loop`'s, over the vmapped task.

Not resumable as a group: ``resume`` is not offered (a seed's folder can be continued alone by
``gradsparse train --resume``, which continues it one seed at a time). A NaN/inf in any seed
stops the group, and every seed is then trained again one at a time by
:func:`gradsparse.train.train`, which raises :class:`gradsparse.errors.TrainingDiverged` naming the
step and the block exactly as it always does.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from gradsparse import covariance
from gradsparse.config import TrainConfig
from gradsparse.data import Dataset
from gradsparse.errors import TrainingDiverged
from gradsparse.factory import make_schedule
from gradsparse.loop import Loop
from gradsparse.memory import available_memory, estimate, fmt_bytes
from gradsparse.runfolder import RunFolder
from gradsparse.step import CROSS_ENTROPY, flatness_fn, make_eval_fn, make_train_chunk, make_train_step
from gradsparse.train import Prepared, RunResult, finish_run, flat_step, prepare, record, train

#: the key of ``summary.json`` (and ``RunResult.final``) naming the seeds trained together
SEEDS_KEY = "trained_with_seeds"
#: CPU widths up to which vmapping seeds measured faster (bench_fused, 2 cores): MLP, Transformers
CPU_MAX_WIDTH = {"mlp": 64, "lm": 32, "vit": 32}


def worth_vmapping(cfg: TrainConfig, backend: str | None = None) -> bool:
    """Whether the seeds of ``cfg`` train faster together (:func:`train_seeds`) than one after the
    other: on an accelerator always; on a CPU up to :data:`CPU_MAX_WIDTH` of the model kind, the
    widths where ``benchmarks/bench_fused.py`` measured a gain. Never with several devices
    (each run is then data-parallel) or ``fuse_steps`` 1 (the unfused loop is a debugging aid)."""
    if not isinstance(cfg, TrainConfig):
        raise ValueError(f"cfg: got {type(cfg).__name__}; allowed: a TrainConfig")
    backend = jax.default_backend() if backend is None else backend
    if cfg.fuse_steps == 1 or (cfg.data_parallel and len(jax.devices()) > 1):
        return False
    if backend != "cpu":
        return True
    return cfg.width <= CPU_MAX_WIDTH[cfg.model]


def check_group(cfgs: Sequence[TrainConfig]) -> list[TrainConfig]:
    """The validated configs of one seed group: at least one, all TrainConfigs equal except for
    ``seed``, the seeds distinct. ValueError saying which field differs otherwise."""
    cfgs = list(cfgs)
    if not cfgs or not all(isinstance(c, TrainConfig) for c in cfgs):
        raise ValueError("cfgs: must be a non-empty sequence of TrainConfig")
    cfgs = [c.validate() for c in cfgs]
    ref = {k: v for k, v in cfgs[0].to_dict().items() if k != "seed"}
    for c in cfgs[1:]:
        d = {k: v for k, v in c.to_dict().items() if k != "seed"}
        diff = sorted(k for k in set(ref) | set(d) if ref.get(k) != d.get(k))
        if diff:
            raise ValueError(f"cfgs: seeds train together only when their configs differ in the seed alone; "
                             f"seed {c.seed} differs from seed {cfgs[0].seed} in {', '.join(diff)}")
    seeds = [c.seed for c in cfgs]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"cfgs: seeds must be distinct, got {seeds}")
    return cfgs


def _stack(trees: Sequence[Any]) -> Any:
    return jax.tree_util.tree_map(lambda *a: jnp.stack(a), *trees)


def _pick(tree: Any, i: int) -> Any:
    return jax.tree_util.tree_map(lambda a: a[i], tree)


def train_seeds(cfgs: Sequence[TrainConfig], out_dirs: Sequence[str | os.PathLike | None] | None = None, *,
                dataset: Dataset | None = None, progress: bool = False) -> list[RunResult]:
    """Train the seed group ``cfgs`` (configs equal except for ``seed``: :func:`check_group`)
    together and write ``out_dirs[i]`` (or nothing, for None) as ``train(cfgs[i], out_dirs[i])``
    would; returns one :class:`gradsparse.train.RunResult` per seed, in order.

    The loop is :func:`gradsparse.train.train`'s: log step s runs the monitored step, the
    held-out (and fixed-subset) evaluation and, on the flatness grid, the Hutchinson traces;
    the plain steps between run ``fuse_steps`` at a time in one ``lax.scan``, chunks on the
    absolute grid; finiteness is checked at log points and checkpoints. Here each of those calls
    is vmapped over the S seeds. The times in ``times.jsonl`` and ``train_time_s`` are the
    group's wall clock (all S seeds). ``summary.json`` records :data:`SEEDS_KEY`.

    A NaN/inf in any seed: every seed is trained again by :func:`gradsparse.train.train`, one at a
    time (which names the step and block of the divergence). Ctrl-C: every seed's checkpoint is
    written at the last checked step (each then resumable alone), and
    :class:`gradsparse.train.TrainingInterrupted` is raised for the first seed.
    ValueError before anything is written: configs not a seed group, out_dirs of the wrong
    length or repeated, a run folder that is a file, or S times one run's memory estimate above
    the available memory.
    """
    cfgs = check_group(cfgs)
    outs = [None] * len(cfgs) if out_dirs is None else [Path(o) if o is not None else None for o in out_dirs]
    if len(outs) != len(cfgs):
        raise ValueError(f"out_dirs: {len(outs)} folders for {len(cfgs)} configs; allowed: one per config")
    named = [o.resolve() for o in outs if o is not None]
    if len(set(named)) != len(named):
        raise ValueError("out_dirs: every seed needs its own run folder")
    for o in outs:
        if o is not None and o.exists() and not o.is_dir():
            raise ValueError(f"run folder {o} exists and is not a folder")
    if not isinstance(progress, bool):
        raise ValueError(f"progress: must be True or False, got {progress!r}")
    cfg = cfgs[0]
    runs = [prepare(c, o, dataset, None, devices=1) for c, o in zip(cfgs, outs)]
    est = estimate(cfg, runs[0].info, None)
    limit, what = available_memory()
    if est.total * len(runs) > limit:
        raise ValueError(f"memory: {len(runs)} seeds together need {len(runs)} x {est.describe()}, more than the "
                         f"{fmt_bytes(limit)} of {what}; train fewer seeds together")
    try:
        return _train_group(cfgs, runs, progress)
    except TrainingDiverged:  # some seed diverged: one at a time, which names the step and block
        return [train(c, o, dataset=r.ds, progress=progress) for c, o, r in zip(cfgs, outs, runs)]


class _SeedsTask:
    """The S runs of a seed group as ONE task of the loop engine: every call vmapped over the seeds."""

    replay = False  # a NaN/inf in any seed: the group is retrained one seed at a time, which locates it

    def __init__(self, cfgs: list[TrainConfig], runs: list[Prepared]):
        cfg, first = cfgs[0], runs[0]
        self.cfgs, self.runs = cfgs, runs
        trainable, projections, self.acc = first.built.trainable, first.built.projections, first.acc
        self.static = eqx.partition(first.model, eqx.is_array)[1]
        self.dyn = _stack([eqx.filter(r.model, eqx.is_array) for r in runs])
        self.state = _stack([r.state for r in runs])
        noise_keys = jnp.stack([r.keys.noise for r in runs])
        flat_keys = jnp.stack([r.keys.flatness for r in runs])
        self.heldout = tuple(jnp.asarray(np.stack([r.heldout[i] for r in runs])) for i in (0, 1))
        self.fixed = None
        if first.fixed is not None:
            self.fixed = tuple(jnp.asarray(np.stack([np.asarray(r.fixed[i]) for r in runs])) for i in (0, 1))
        step_mon = make_train_step(CROSS_ENTROPY, first.optimizer, trainable, projections, monitors=True,
                                   accumulator=self.acc)
        step_plain = make_train_step(CROSS_ENTROPY, first.optimizer, trainable, projections, monitors=False,
                                     accumulator=self.acc)
        chunk = make_train_chunk(CROSS_ENTROPY, first.optimizer, trainable, projections, accumulator=self.acc)
        evaluate = make_eval_fn(trainable)
        flat = flatness_fn(trainable, cfg.flatness_probes) if cfg.flatness_every else None
        self.has_flat, self.sched = flat is not None, make_schedule(cfg)  # the configs differ in the seed alone
        static = self.static
        arrays = lambda t: eqx.filter(t, eqx.is_array)  # noqa: E731

        def over_seeds(fn: Any) -> Any:
            @jax.jit
            def v(d, st, x, y, s):
                def one(d, st, x, y, k):
                    m, st2, met, fin = fn(eqx.combine(d, static), st, (x, y), jax.random.fold_in(k, s), s)
                    return arrays(m), st2, met, fin
                return jax.vmap(one)(d, st, x, y, noise_keys)
            return v

        self.v_mon, self.v_plain = over_seeds(step_mon), over_seeds(step_plain)

        @jax.jit
        def v_chunk(d, st, xs, ys, s):
            def one(d, st, xs, ys, k):
                m, st2, bad = chunk(eqx.combine(d, static), st, (xs, ys), k, s)
                return arrays(m), st2, bad
            return jax.vmap(one)(d, st, xs, ys, noise_keys)

        @jax.jit
        def v_eval(d, x, y):
            return jax.vmap(lambda d, x, y: evaluate(eqx.combine(d, static), x, y))(d, x, y)

        @jax.jit
        def v_flat(d, x, y, s):
            return jax.vmap(lambda d, x, y, k: flat(eqx.combine(d, static), x, y, jax.random.fold_in(k, s)))(
                d, x, y, flat_keys)

        self.v_chunk, self.v_eval, self.v_flat = v_chunk, v_eval, v_flat

    def batches(self, t: int) -> tuple[Any, Any]:
        xy = [r.batch(t) for r in self.runs]
        return jnp.asarray(np.stack([a for a, _ in xy])), jnp.asarray(np.stack([b for _, b in xy]))

    def split(self, d: Any, st: Any, i: int) -> tuple[Any, Any]:
        """Seed i's model and state out of the stacked ones."""
        return eqx.combine(_pick(d, i), self.static), _pick(st, i)

    def plain(self, d: Any, st: Any, s: int) -> tuple[Any, Any, Any]:
        new_d, new_st, _, finite = self.v_plain(d, st, *self.batches(s), jnp.asarray(s, jnp.int32))
        return new_d, new_st, finite

    def chunk(self, d: Any, st: Any, s: int, n: int) -> tuple[Any, Any, Any]:
        xy = [r.chunk_batch(s, n) for r in self.runs]
        return self.v_chunk(d, st, jnp.stack([a for a, _ in xy]), jnp.stack([b for _, b in xy]),
                            jnp.asarray(s, jnp.int32))

    def logged(self, d: Any, st: Any, s: int):
        si, (x, y) = jnp.asarray(s, jnp.int32), self.batches(s)
        new_d, new_st, metrics, finite = self.v_mon(d, st, x, y, si)

        def records() -> list[dict[str, Any]]:
            ev = self.v_eval(d, *self.heldout)
            ef = self.v_eval(d, *self.fixed) if self.fixed is not None else None
            fl = None
            if self.has_flat and flat_step(s, self.cfgs[0]):
                fx, fy = self.fixed if self.fixed is not None else (x, y)
                fl = self.v_flat(d, fx, fy, si)
            met, ev, ef, fl = jax.device_get((metrics, ev, ef, fl))
            lr, out = float(self.sched(s)), []
            for i, c in enumerate(self.cfgs):
                cov = (covariance.log_metrics(self.acc, _pick(new_st, i)[1], c.batch_size, s + 1)
                       if self.acc is not None else None)
                out.append(record(c, s, lr, _pick(met, i), _pick(ev, i), _pick(ef, i) if ef is not None else None,
                                  _pick(fl, i) if fl is not None else None, cov, int(self.heldout[0].shape[1]),
                                  int(self.fixed[0].shape[1]) if self.fixed is not None else None))
            return out

        return new_d, new_st, finite, records

    def locate(self, model: Any, s: int) -> str:
        return "a seed of the group"


def _train_group(cfgs: list[TrainConfig], runs: list[Prepared], progress: bool) -> list[RunResult]:
    folders = [RunFolder(r.out) if r.out is not None else None for r in runs]
    with contextlib.ExitStack() as stack:  # every folder locked and checked before any is written
        for f, c, r in zip(folders, cfgs, runs):
            if f is not None:
                stack.enter_context(f)
                f.open(c, r.header, r.model, r.state, meta={k: r.header[k] for k in ("data_info", "data_sha256")})
        for f in folders:
            if f is not None:
                f.start()
        task = _SeedsTask(cfgs, runs)
        seeds = [c.seed for c in cfgs]

        def finish(d: Any, st: Any, hist: list[list[dict[str, Any]]], t0: float) -> list[RunResult]:
            return [finish_run(c, f, r.ds, r.keys, *task.split(d, st, i), task.acc, hist[i], t0,
                               extra={SEEDS_KEY: seeds}) for i, (c, r, f) in enumerate(zip(cfgs, runs, folders))]

        loop = Loop(task, cfgs[0], cfgs[0].fuse_steps, folders, split=task.split, progress=progress,
                    desc=f"train {len(runs)} seeds")
        return loop.run(0, task.dyn, task.state, finish=finish).finished
