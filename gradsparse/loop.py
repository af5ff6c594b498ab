"""THE training loop: one engine for a training run, a vmapped seed group and a relufication run.

A loop, read top to bottom (:meth:`Loop.run`): for each entry of the step plan (:func:`step_plan`)

- ``log`` s: settle the pending plain steps, run the monitored step s (the task computes the log
  records of s from the model BEFORE update s), check its finiteness now, write the records
  (``log.jsonl`` and ``times.jsonl`` of every run folder), call ``on_log``;
- ``chunk`` s, n: ``n`` fused plain steps from s in one ``lax.scan`` (no host sync);
- ``step`` s: one plain step (no host sync);
- ``checkpoint`` s: settle, then a checkpoint after s updates in every run folder;
- ``hook`` s: settle, then every hook whose period divides s (:meth:`Loop.add_hook`);

and at the end: settle, the final checkpoint, the hooks due at ``steps``, ``finish``.

The step plan cuts the plain steps between two points (log steps, checkpoints, hook steps) into
chunks of ``fuse`` on the ABSOLUTE step grid, so a resumed run cuts the same chunks as one from 0.

Deferred finiteness: the flags of the plain steps (a finite flag per step, the first bad step of
a chunk) are read at the next point ("settle": one host sync). On a non-finite one the steps are
replayed one by one from the last checked state to the bad step and the task names where it went
wrong: :class:`gradsparse.errors.TrainingDiverged` (step, where, the last good checkpoint); the log
then ends at the last finite logged step and no checkpoint of a bad state is written.

One interrupt policy (Ctrl-C, SIGINT): the pending flags are settled; if all were finite and at
least one update was made since the last checkpoint, a checkpoint of the state after the last
completed update is written in every run folder; then :class:`gradsparse.errors.TrainingInterrupted`
says what was kept (a second Ctrl-C or a failing disk while writing it is reported, not raised).
A Ctrl-C during ``finish`` (the final evaluation, the summary) leaves the final checkpoint as the
resume point. While the loop runs in the main thread with Python's own SIGINT handler, the first
SIGINT only asks the loop to stop, and it stops at the next entry of the plan (:class:`CtrlC`): a
KeyboardInterrupt raised wherever the signal happens to land can be lost (one raised inside a
garbage-collector callback is printed and dropped, and the run would go on); a second SIGINT
raises at once.

What a run is made of comes from a *task* (duck-typed): ``plain(model, state, s) -> (model, state,
finite)``, ``chunk(model, state, s, n) -> (model, state, bad_step)``, ``logged(model, state, s) ->
(model, state, finite, records)`` (``records()`` gives one record per run folder, called after the
finiteness check), ``locate(model, s) -> str`` and ``replay`` (whether ``locate`` needs the model at
the bad step; a task that cannot name more than the step says False). Flags may be arrays (a
vmapped group): the step counts as bad when any entry is.
"""

from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
from tqdm.auto import tqdm

from gradsparse.errors import TrainingDiverged, TrainingInterrupted
from gradsparse.runfolder import RunFolder, logged


def fuse_until(t: int, cfg: Any, cuts: Sequence[int] = ()) -> int:
    """Where the plain steps from ``t`` (not a logged step) must stop fusing, on the absolute
    step grid: the next logged step, checkpoint, or multiple of a period in ``cuts`` (after
    that many updates)."""
    nxt = min((t // cfg.log_every + 1) * cfg.log_every, cfg.steps - 1)
    for every in ((cfg.checkpoint_every,) if cfg.checkpoint_every else ()) + tuple(cuts):
        nxt = min(nxt, (t // every + 1) * every)
    return nxt


def step_plan(first: int, cfg: Any, fuse: int, hooks: Sequence[int] = ()) -> Iterator[tuple[str, int, int]]:
    """The schedule of a loop from update ``first`` to ``cfg.steps`` (``cfg``: anything with
    ``steps``, ``log_every``, ``checkpoint_every``), as ``(kind, s, n)``: ``("log", s, 1)``, the
    monitored step s (every logged step, :func:`gradsparse.runfolder.logged`); ``("chunk", s, n)``,
    n = ``fuse`` fused plain steps from s; ``("step", s, 1)``, one plain step (the rest of a
    stretch shorter than ``fuse``, or all of them with ``fuse`` 1); ``("checkpoint", s, 0)`` after
    s updates, on the checkpoint grid before the end; ``("hook", s, 0)`` after s updates when s
    (< steps) is a multiple of a period in ``hooks``. Plain stretches end at :func:`fuse_until`,
    so chunks lie on the absolute grid whatever ``first`` is."""
    s = first
    while s < cfg.steps:
        if logged(s, cfg):
            n, kind = 1, "log"
        else:
            n = fuse_until(s, cfg, hooks) - s
            n, kind = (fuse, "chunk") if fuse > 1 and n >= fuse else (1, "step")
        yield kind, s, n
        s += n
        if s < cfg.steps:
            if cfg.checkpoint_every and s % cfg.checkpoint_every == 0:
                yield "checkpoint", s, 0
            if any(s % every == 0 for every in hooks):
                yield "hook", s, 0


@dataclass
class StepInfo:
    """What a hook sees: ``step`` updates done, the model and state after them (stacked over the
    seeds of a group), the loop's ``histories`` (records logged so far, one list per run)."""

    step: int
    model: Any
    state: Any
    histories: list[list[dict[str, Any]]]


@dataclass
class LoopResult:
    """What :meth:`Loop.run` leaves: the final model and state, each run's records, the last
    checkpoint of the first run and the (resume-adjusted) start time."""

    model: Any
    state: Any
    histories: list[list[dict[str, Any]]]
    last_checkpoint: Path | None
    t0: float
    finished: Any = None


class CtrlC:
    """SIGINT while a loop runs: the first one sets :attr:`asked` (the loop raises KeyboardInterrupt
    at its next plan entry, :meth:`check`), a second one raises KeyboardInterrupt at once. Installed
    only in the main thread over Python's default handler; the previous handler comes back on exit."""

    def __init__(self):
        self.asked, self.prev = False, None

    def __enter__(self) -> "CtrlC":
        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self.prev = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.asked:
            raise KeyboardInterrupt
        self.asked = True

    def check(self) -> None:
        if self.asked:
            raise KeyboardInterrupt

    def __exit__(self, *exc: Any) -> None:
        if self.prev is not None:
            signal.signal(signal.SIGINT, self.prev)
            self.prev = None


def _bad_step(flag: Any, s: int, n: int) -> int | None:
    """The bad step a pending flag reports: a finite flag (bool, maybe per seed) of step s, or the
    first bad step of a chunk from s (int, -1 = none; maybe per seed)."""
    f = np.asarray(flag)
    if n == 0:
        return None if f.all() else s
    bad = f[f >= 0]
    return int(bad.min()) if bad.size else None


@dataclass
class Loop:
    """The engine (module docstring). ``cfg``: steps, log_every, checkpoint_every; ``fuse``: plain
    steps per chunk; ``folders``: one run folder (or None) per run the task trains; ``split(model,
    state, i)``: run i's (model, state) for its checkpoint (default: the whole pair)."""

    task: Any
    cfg: Any
    fuse: int = 1
    folders: Sequence[RunFolder | None] = (None,)
    split: Callable[[Any, Any, int], tuple[Any, Any]] | None = None
    progress: bool = False
    desc: str = "train"
    postfix: Callable[[dict[str, Any]], dict[str, str]] | None = None
    on_log: Callable[[dict[str, Any]], None] | None = None
    hooks: list[tuple[Callable[[StepInfo], None], int]] = field(default_factory=list)

    def add_hook(self, fn: Callable[[StepInfo], None], every: int) -> None:
        """Call ``fn(StepInfo)`` after every ``every`` updates (and at the end when ``every``
        divides ``steps``), with the state checked finite. Fused chunks stop at these steps."""
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every: must be an integer >= 1, got {every!r}")
        self.hooks.append((fn, every))

    def run(self, first: int, model: Any, state: Any, *, elapsed: float = 0.0,
            last_checkpoint: Path | None = None, histories: Sequence[list[dict[str, Any]]] | None = None,
            finish: Callable[[Any, Any, list[list[dict[str, Any]]], float], Any] | None = None) -> LoopResult:
        """Train from ``first`` updates done (``model``, ``state``) to ``cfg.steps``; ``elapsed``:
        the seconds of earlier segments of a resumed run, ``last_checkpoint``: its checkpoint,
        ``histories``: its kept records. ``finish(model, state, histories, t0)`` runs last (the
        summary); its value is ``LoopResult.finished``."""
        task, cfg, folders = self.task, self.cfg, list(self.folders)
        split = self.split or (lambda m, st, i: (m, st))
        writing = any(f is not None for f in folders)
        out = next((f.out for f in folders if f is not None), None)
        hist = [list(h) for h in histories] if histories is not None else [[] for _ in folders]
        t0 = time.time() - elapsed
        last = {"ckpt": last_checkpoint, "step": first if last_checkpoint is not None else None}
        cur = seg = (first, model, state)  # (updates done, model, state): replaced whole, so ^C sees one triple
        pending: list[tuple[int, int, Any]] = []  # (step, chunk length or 0 for one step, flag)
        periods = [every for _, every in self.hooks]

        def first_bad() -> int | None:
            for s, n, flag in pending:
                b = _bad_step(flag, s, n)
                if b is not None:
                    return b
            return None

        def diverged(b: int, m: Any, st: Any, t: int) -> TrainingDiverged:
            if task.replay:
                for u in range(t, b):
                    m, st, _ = task.plain(m, st, u)
            return TrainingDiverged(b, task.locate(m if task.replay else None, b), last["ckpt"])

        def settle() -> None:
            nonlocal seg
            b = first_bad() if pending else None
            if b is not None:
                raise diverged(b, seg[1], seg[2], seg[0])
            pending.clear()
            seg = cur

        def save(step: int, m: Any, st: Any) -> None:
            for i, f in enumerate(folders):
                if f is not None:
                    p = f.checkpoint(step, *split(m, st, i), time.time() - t0)
                    if i == 0:
                        last["ckpt"] = p
            last["step"] = step

        def call_hooks(step: int, m: Any, st: Any) -> None:
            for fn, every in self.hooks:
                if step % every == 0:
                    fn(StepInfo(step, m, st, hist))

        def interrupted() -> TrainingInterrupted:
            done, m, st = cur
            if not writing:
                return TrainingInterrupted(done, cfg.steps, None, False, None)
            b = first_bad() if pending else None
            if b is not None:
                return TrainingInterrupted(done, cfg.steps, last["ckpt"], False, out, f"the loss was not finite at "
                                                                                      f"step {b}")
            if last["step"] == done:
                return TrainingInterrupted(done, cfg.steps, last["ckpt"], True, out)
            if done == 0:
                return TrainingInterrupted(done, cfg.steps, None, False, out, "no update was made yet")
            try:
                save(done, m, st)
                return TrainingInterrupted(done, cfg.steps, last["ckpt"], True, out)
            except KeyboardInterrupt:
                why = "interrupted again while writing it"
            except OSError as e:
                why = f"{e.strerror or e}: {e.filename}"
            return TrainingInterrupted(done, cfg.steps, last["ckpt"], False, out, why)

        bar = tqdm(total=cfg.steps, initial=first, disable=not self.progress, mininterval=0.5, dynamic_ncols=True,
                   leave=False, desc=self.desc)
        try:
            with CtrlC() as ctrl_c:
                for kind, s, n in step_plan(first, cfg, self.fuse, periods):
                    ctrl_c.check()
                    if kind in ("checkpoint", "hook"):
                        settle()
                        if kind == "checkpoint":
                            save(s, model, state)
                        else:
                            call_hooks(s, model, state)
                        continue
                    if kind == "log":
                        settle()
                        new_model, new_state, finite, records = task.logged(model, state, s)
                        if not np.asarray(finite).all():
                            raise diverged(s, model, state, s)
                        elapsed_now = round(time.time() - t0, 3)
                        for i, rec in enumerate(records()):
                            hist[i].append(rec)
                            if folders[i] is not None:
                                folders[i].write(rec, time=elapsed_now)
                            if self.on_log is not None:
                                self.on_log(rec)
                        if self.postfix is not None:
                            bar.set_postfix(self.postfix(hist[0][-1]), refresh=False)
                        cur = seg = (s + 1, new_model, new_state)
                    elif kind == "chunk":
                        new_model, new_state, bad = task.chunk(model, state, s, n)
                        pending.append((s, n, bad))
                        cur = (s + n, new_model, new_state)
                    else:
                        new_model, new_state, finite = task.plain(model, state, s)
                        pending.append((s, 0, finite))
                        cur = (s + 1, new_model, new_state)
                    model, state = cur[1], cur[2]
                    bar.update(n)
                ctrl_c.check()
                settle()
                save(cfg.steps, model, state)
                call_hooks(cfg.steps, model, state)
        except KeyboardInterrupt:
            raise interrupted() from None
        finally:
            bar.close()
        result = LoopResult(model, state, hist, last["ckpt"], t0)
        if finish is not None:
            try:
                result.finished = finish(model, state, hist, t0)
            except KeyboardInterrupt:
                raise TrainingInterrupted(cfg.steps, cfg.steps, last["ckpt"], writing, out) from None
        return result
