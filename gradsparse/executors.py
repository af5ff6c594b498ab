"""Executors: who trains the jobs of a :class:`gradsparse.runplan.RunPlan`.

- ``sequential``: every job in this process, one after the other (seed groups and fused steps as
  :func:`gradsparse.runplan.run_job` runs them);
- ``local``: N worker processes on this machine (``spawn``); on a CPU each worker's XLA runs on
  one thread (``--xla_cpu_multi_thread_eigen=false``, BLAS threads 1) so that N workers share the
  cores instead of oversubscribing them; on an accelerator one worker per device;
- ``ray``: one Ray task per job (a seed group or a run) with its resource demand (1 CPU, or 1 GPU
  where the cluster has GPUs), on the cluster at ``ray_address`` ("auto", "HOST:PORT", or None for a
  cluster of this machine's own). Needs the ``cluster`` extra (``pip install 'gradsparse[cluster]'``).
  When the workers see ``out`` (a shared filesystem, or a cluster on this machine: a marker file
  written by the driver tells), they write the run folders there; otherwise each worker trains into
  a folder of its own node and returns the folders' files, which the driver writes atomically under
  ``out``. A task whose worker dies is retried by Ray (``max_retries``) and resumes from the run's
  latest checkpoint.

Every executor runs a job only after the jobs of its parents, and gives the same run folders: a
job is a pure function of its specs (:mod:`gradsparse.runplan`).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from gradsparse.io import atomic_write_bytes, atomic_write_json
from gradsparse.runplan import PLAN_FILE, Job, JobOutcome, RunPlan, finished, run_job

EXECUTORS = ("sequential", "local", "ray")
#: what the Ray executor says when Ray is not installed
RAY_MISSING = "--executor ray needs Ray: pip install 'gradsparse[cluster]' (or pip install ray)"


@dataclass
class Execution:
    """What :func:`execute` did: ``folders`` {run id: run folder}, the jobs that ``trained`` and
    those ``reused`` (finished before), their outcomes, the wall time and the executor."""

    folders: dict[str, Path]
    trained: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    outcomes: list[JobOutcome] = field(default_factory=list)
    wall_s: float = 0.0
    executor: str = "sequential"
    workers: int = 1


def cpu_cores() -> int:
    """The CPU cores this process may run on."""
    return max(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1), 1)


def accelerator_count() -> int:
    """Accelerator devices JAX sees here (0 on a CPU-only machine)."""
    try:
        import jax

        return 0 if jax.default_backend() == "cpu" else int(jax.local_device_count())
    except Exception:  # noqa: BLE001 - no usable jax backend: CPU
        return 0


def default_workers() -> int:
    """Local workers: one per accelerator device, else one per CPU core (at least 1)."""
    return accelerator_count() or cpu_cores()


def _check_workers(workers: int | None) -> int:
    if workers is None:
        return default_workers()
    if isinstance(workers, bool) or not isinstance(workers, int) or not 1 <= workers <= 256:
        raise ValueError(f"workers: got {workers!r}; allowed: an integer in [1, 256]")
    return workers


class _Scheduler:
    """Jobs in dependency order: ``take()`` the ready ones, ``finish(job)`` when a job is done."""

    def __init__(self, jobs: list[Job]):
        self.waiting = list(jobs)
        self.done: set[str] = set()

    def take(self) -> list[Job]:
        ready = [j for j in self.waiting if all(p in self.done for p in j.needs)]
        self.waiting = [j for j in self.waiting if j not in ready]
        return ready

    def finish(self, job: Job) -> None:
        self.done.update(r.run_id for r in job.runs)


def _drive(jobs: list[Job], on_done: Callable[[JobOutcome], None], submit: Callable[[Job], Any],
           wait: Callable[[list[Any]], list[tuple[Any, JobOutcome]]], cancel: Callable[[list[Any]], None]) -> None:
    """Run ``jobs`` parents first on a pool of workers: ``submit(job)`` starts one and returns its
    handle, ``wait(handles)`` blocks until at least one is done and returns (handle, outcome) pairs,
    ``cancel(handles)`` stops what still runs when anything goes wrong (Ctrl-C included)."""
    sched = _Scheduler(jobs)
    running: dict[Any, Job] = {}
    try:
        while sched.waiting or running:
            for job in sched.take():
                running[submit(job)] = job
            if not running:
                raise ValueError("run plan: jobs wait for parents that no job trains")
            for handle, outcome in wait(list(running)):
                job = running.pop(handle)
                on_done(outcome)
                sched.finish(job)
    except BaseException:
        cancel(list(running))
        raise


def _sequential(jobs: list[Job], runs_dir: Path, on_done: Callable[[JobOutcome], None], *, force: bool = False,
                **_: Any) -> None:
    for job in jobs:
        on_done(run_job(job, runs_dir, force=force))


# --------------------------------------------------------------------------------------- local
def _die_with_parent() -> None:
    """On Linux, a local worker is killed when the process that started it dies (PR_SET_PDEATHSIG), so
    a driver killed with SIGKILL leaves no worker training on (its run resumes with ``--resume``)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the driver died before the signal was set
        os._exit(1)


def _worker_init(cpu_threads: int | None, devices: Any = None) -> None:
    """A local worker's start: BLAS on ``cpu_threads`` threads (None: untouched; XLA's flags stay
    the driver's, so the workers compile the same kernels and share the persistent cache), one
    accelerator device of the queue ``devices`` (none: all visible, no memory preallocation), the
    persistent compilation cache on (workers share compiled executables through it)."""
    _die_with_parent()
    if devices is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(devices.get())
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    if cpu_threads is not None:
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = str(cpu_threads)
    from gradsparse.runtime import enable_compilation_cache

    enable_compilation_cache()


def _local(jobs: list[Job], runs_dir: Path, on_done: Callable[[JobOutcome], None], *, workers: int,
           cpu_threads: int | None = 1, accelerators: int = 0, force: bool = False, **_: Any) -> None:
    import concurrent.futures as cf
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    devices = None
    if accelerators:  # one worker per device
        devices = ctx.Queue()
        for i in range(workers):
            devices.put(i % accelerators)
    with cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_worker_init,
                                initargs=(cpu_threads, devices)) as pool:

        def wait(futures: list[Any]) -> list[tuple[Any, JobOutcome]]:
            done, _ = cf.wait(futures, return_when=cf.FIRST_COMPLETED)
            return [(f, f.result()) for f in done]

        def cancel(futures: list[Any]) -> None:
            for f in futures:
                f.cancel()
            pool.shutdown(wait=False, cancel_futures=True)

        _drive(jobs, on_done, lambda job: pool.submit(run_job, job, str(runs_dir), force=force), wait, cancel)


# ----------------------------------------------------------------------------------------- ray
def require_ray() -> Any:
    """The ray module; ValueError saying how to install it when it is missing."""
    try:
        import ray
    except ImportError:
        raise ValueError(RAY_MISSING) from None
    return ray


def pack_folder(folder: Path) -> dict[str, bytes]:
    """{relative path: bytes} of every file under ``folder`` (temp files of atomic writes left out)."""
    from gradsparse.io import is_temp_file

    out: dict[str, bytes] = {}
    for p in sorted(Path(folder).rglob("*")):
        if p.is_file() and not is_temp_file(p):
            out[p.relative_to(folder).as_posix()] = p.read_bytes()
    return out


def unpack_folder(files: dict[str, bytes], dest: Path) -> Path:
    """Write ``files`` (:func:`pack_folder`) as the folder ``dest``, atomically: built beside it,
    then renamed into place (an earlier, unfinished ``dest`` is replaced)."""
    dest = Path(dest)
    tmp = dest.parent / f".{dest.name}.{uuid.uuid4().hex[:8]}.tmp"
    for rel, data in files.items():
        p = (tmp / rel).resolve()
        if not p.is_relative_to(tmp.resolve()):
            raise ValueError(f"packed run folder: path {rel!r} leaves the folder")
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    old = None
    if dest.exists():
        old = dest.parent / f".{dest.name}.{uuid.uuid4().hex[:8]}.old"
        os.replace(dest, old)
    os.replace(tmp, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return dest


def _ray_job(job: Job, runs_dir: str, marker: str, parents: dict[str, dict[str, bytes]] | None,
             cpu_threads: int | None, force: bool = False) -> tuple[JobOutcome, dict[str, dict[str, bytes]] | None]:
    """A Ray task: train ``job`` where the driver's ``runs_dir`` is visible (the ``marker`` file is
    there), else in a folder of this node (the parents' files unpacked into it) and return the
    trained folders' files."""
    _worker_init(cpu_threads)
    if Path(marker).is_file():
        return run_job(job, runs_dir, force=force), None
    local = Path(tempfile.gettempdir()) / "gradsparse-ray" / Path(marker).name
    local.mkdir(parents=True, exist_ok=True)
    for name, files in (parents or {}).items():
        if not (local / name).is_dir():
            unpack_folder(files, local / name)
    outcome = run_job(job, local, force=force)
    return outcome, {r.folder: pack_folder(local / r.folder) for r in job.runs}


def _ray(jobs: list[Job], runs_dir: Path, on_done: Callable[[JobOutcome], None], *, ray_address: str | None = None,
         cpu_threads: int | None = 1, max_retries: int = 3, force: bool = False, shared_fs: bool | None = None,
         **_: Any) -> None:
    ray = require_ray()
    started = False
    if not ray.is_initialized():
        ray.init(address=ray_address, include_dashboard=False, log_to_driver=False, configure_logging=False)
        started = True
    try:
        gpus = float(ray.cluster_resources().get("GPU", 0))
        task = ray.remote(num_cpus=1, num_gpus=1 if gpus >= 1 else 0, max_retries=max_retries)(_ray_job)
        marker = runs_dir / f".executor-{uuid.uuid4().hex[:12]}"
        if shared_fs is not False:  # a worker that sees the marker writes into runs_dir itself
            atomic_write_bytes(marker, b"")

        def submit(job: Job) -> Any:
            parents = None
            if job.parents:  # shipped only to a worker that cannot see runs_dir
                parents = {p.folder: pack_folder(runs_dir / p.folder) for p in job.parents}
            return task.remote(job, str(runs_dir), str(marker), parents, cpu_threads, force)

        def wait(refs: list[Any]) -> list[tuple[Any, JobOutcome]]:
            done, _ = ray.wait(refs, num_returns=1)
            out = []
            for ref in done:
                outcome, files = ray.get(ref)
                for folder, packed in (files or {}).items():
                    unpack_folder(packed, runs_dir / folder)
                out.append((ref, outcome))
            return out

        try:
            _drive(jobs, on_done, submit, wait, lambda refs: [ray.cancel(r, force=True) for r in refs])
        finally:
            marker.unlink(missing_ok=True)
    finally:
        if started:
            ray.shutdown()


_RUNNERS = {"sequential": _sequential, "local": _local, "ray": _ray}


def execute(plan: RunPlan, out: str | os.PathLike, *, executor: str = "sequential", workers: int | None = None,
            ray_address: str | None = None, together: Callable[[Any], bool] | None = None,
            progress: bool = True, log: Callable[[str], None] | None = None, reuse: bool = True,
            shared_fs: bool | None = None) -> Execution:
    """Train every run of ``plan`` into ``out/<name>-<run_id>`` with ``executor`` (module
    docstring); finished runs there are reused (``reuse=False``: trained again). Writes
    ``out/runs.json`` (the plan) first. ``shared_fs`` (ray): None finds out whether the workers
    see ``out``; False makes every worker train on its own node and return the folders' files.
    ``together``: the seed-group rule of :meth:`RunPlan.jobs`. Returns an :class:`Execution`."""
    if not isinstance(plan, RunPlan):
        raise ValueError(f"plan: got {type(plan).__name__}; allowed: a gradsparse.runplan.RunPlan")
    if executor not in EXECUTORS:
        raise ValueError(f"executor: got {executor!r}; allowed: {', '.join(EXECUTORS)}")
    if executor == "ray":
        require_ray()
    n = _check_workers(workers) if executor == "local" else 1
    runs_dir = Path(out)
    if runs_dir.exists() and not runs_dir.is_dir():
        raise ValueError(f"{runs_dir} exists and is not a folder")
    runs_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(runs_dir / PLAN_FILE, plan.to_dict())
    jobs = plan.jobs(together)
    todo = [j for j in jobs if not reuse or not all(finished(runs_dir / r.folder, r) for r in j.runs)]
    res = Execution({rid: runs_dir / s.folder for rid, s in plan.runs.items()}, executor=executor, workers=n)
    res.reused = [j.label for j in jobs if j not in todo]
    if log is not None:
        log(f"runs: {len(plan)} in {len(jobs)} jobs; {len(res.reused)} job(s) already finished, {len(todo)} to "
            f"train with the {executor} executor" + (f" ({n} workers)" if executor == "local" else ""))
    bar = None
    if progress and todo:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(j.steps for j in todo), desc=f"runs ({executor})", unit="step", dynamic_ncols=True,
                   file=sys.stderr)
    steps = {j.label: j.steps for j in todo}

    def on_done(o: JobOutcome) -> None:
        res.outcomes.append(o)
        if o.trained:
            res.trained.append(o.label)
        if bar is not None:
            bar.update(steps.get(o.label, 0))
            bar.set_postfix_str(o.label[:40], refresh=True)

    acc = accelerator_count() if executor == "local" else 0
    t0 = time.time()
    try:
        _RUNNERS[executor](todo, runs_dir, on_done, workers=n, ray_address=ray_address, accelerators=acc,
                           cpu_threads=None if acc else split_threads(n) if executor == "local" else 1,
                           force=not reuse, shared_fs=shared_fs)
    finally:
        if bar is not None:
            bar.close()
    res.wall_s = round(time.time() - t0, 2)
    return res


def critical_path(plan: RunPlan, seconds: dict[str, float], workers: int,
                  together: Callable[[Any], bool] | None = None) -> dict[str, float]:
    """A projection of a plan's wall time on ``workers`` workers from per-job seconds
    (``seconds``: {job label: seconds}): ``serial`` (the sum), ``critical`` (the longest chain of
    parent -> finetune jobs) and ``projected`` = max(critical, list scheduling of the jobs, longest
    first, on the workers, parents first)."""
    jobs = plan.jobs(together)
    missing = [j.label for j in jobs if j.label not in seconds]
    if missing:
        raise ValueError(f"seconds: no time for job(s) {missing[:3]}{'...' if len(missing) > 3 else ''}")
    made = {r.run_id: j for j in jobs for r in j.runs}
    finish: dict[str, float] = {}
    for j in jobs:  # parents first
        start = max((finish[made[p].label] for p in j.needs if p in made), default=0.0)
        finish[j.label] = start + seconds[j.label]
    free = [0.0] * max(int(workers), 1)
    end: dict[str, float] = {}
    for j in sorted(jobs, key=lambda j: (len(j.needs) > 0, -seconds[j.label])):
        ready = max((end.get(made[p].label, 0.0) for p in j.needs if p in made), default=0.0)
        i = min(range(len(free)), key=lambda k: free[k])
        t = max(free[i], ready) + seconds[j.label]
        free[i] = end[j.label] = t
    return {"serial": round(sum(seconds[j.label] for j in jobs), 1), "critical": round(max(finish.values(), default=0), 1),
            "projected": round(max(max(end.values(), default=0.0), max(finish.values(), default=0.0)), 1),
            "jobs": len(jobs), "workers": int(workers)}


def split_threads(workers: int, cores: int | None = None) -> int:
    """XLA threads per local worker: the cores shared out (at least 1)."""
    cores = cores or cpu_cores()
    return max(cores // max(workers, 1), 1)


def describe(res: Execution) -> str:
    """'52 job(s) trained, 0 reused, 551 s with the local executor (2 workers; the jobs compiled for 130 s
    of their 1080 s)'."""
    busy = sum(o.seconds for o in res.outcomes if o.trained)
    comp = sum(o.compile_s for o in res.outcomes if o.trained)
    return (f"{len(res.trained)} job(s) trained, {len(res.reused)} reused, {res.wall_s:.0f} s with the {res.executor} "
            f"executor (" + (f"{res.workers} workers; " if res.executor == "local" else "")
            + f"the jobs compiled for {comp:.0f} s of their {busy:.0f} s)")


__all__: Sequence[str] = ("EXECUTORS", "Execution", "execute", "critical_path", "pack_folder", "unpack_folder",
                          "default_workers", "describe")
