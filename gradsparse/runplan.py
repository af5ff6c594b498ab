"""A plan of training runs: configs x seeds, deduplicated by a hash of the full config, with the
finetunes that depend on their base runs; and the job that trains one piece of it.

Data flow: :class:`RunSpec` (one run: its full :class:`~gradsparse.config.TrainConfig` as a dict,
seed included, and the run it finetunes from) -> :class:`RunPlan` (the union, each run once:
``run_id = sha256(config, parent)[:12] + "-s<seed>"``) -> :meth:`RunPlan.jobs` (what trains
together: a seed group — the seeds of one config as one ``jax.vmap``, where
:func:`gradsparse.train_seeds.worth_vmapping` says so — or one run) -> an executor
(:mod:`gradsparse.executors`: sequential, local processes, Ray) calls :func:`run_job` for each job,
parents first -> run folders ``RUNS/<name>-<run_id>`` that anyone can read back
(:func:`gradsparse.train.train` with ``resume=True`` returns a finished run as it is).

A job is a pure function of its specs: the same job trains the same numbers whichever executor
runs it, on whichever process (up to the XLA kernels the machine runs). A finished run folder whose
stored config equals the spec is reused (:func:`finished`); an unfinished one with a checkpoint is
resumed from it; anything else is trained from the start.

Your own sweep, from Python::

    from gradsparse.config import TrainConfig
    from gradsparse.runplan import sweep
    from gradsparse.executors import execute

    base = TrainConfig(model="mlp", data="mnist1d", width=32, depth=1, steps=200)
    plan = sweep([base.replace(lr=lr) for lr in (1e-3, 3e-3)], seeds=[0, 1, 2])
    folders = execute(plan, "runs/sweep", executor="local").folders   # {run_id: run folder}
"""

from __future__ import annotations

import hashlib
import importlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from gradsparse.io import json_ready

#: the plan file an execution writes beside the run folders (what ``--resume`` and ``--judge`` read)
PLAN_FILE = "runs.json"
RUNS_FORMAT = 1
#: the dataset loader of a spec that names none: :func:`load_for_spec`'s default
DEFAULT_LOADER = "gradsparse.runplan:load_dataset_for"


def _canonical(obj: Any) -> str:
    return json.dumps(json_ready(obj), sort_keys=True, separators=(",", ":"))


def _without_late_defaults(config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` without the fields added after run ids existed while they hold their defaults
    (``TrainConfig.LATE_DEFAULTS``): so every run id and run folder written before such a field
    existed stays valid; a non-default value enters the digest as any field does. (Imported here:
    the config module loads the models, which the command's first line must not wait for.)"""
    from gradsparse.config import TrainConfig

    return TrainConfig.without_late_defaults(config)


def config_digest(config: Mapping[str, Any], parent: str | None = None) -> str:
    """12 hex digits of SHA-256 over the canonical JSON of ``config`` without its seed, and without
    the fields of ``TrainConfig.LATE_DEFAULTS`` at their defaults, and the ``parent`` run id: the seeds of
    one config share it."""
    if not isinstance(config, Mapping):
        raise ValueError(f"config: got {type(config).__name__}; allowed: a mapping (TrainConfig.to_dict())")
    if parent is not None and not isinstance(parent, str):
        raise ValueError(f"parent: got {type(parent).__name__}; allowed: a run id (str) or None")
    rest = {k: v for k, v in _without_late_defaults(config).items() if k != "seed"}
    return hashlib.sha256(_canonical({"config": rest, "parent": parent}).encode()).hexdigest()[:12]


def run_id(config: Mapping[str, Any], parent: str | None = None) -> str:
    """``<config_digest>-s<seed>``: the identity of a run (its folder name ends with it); with the
    seed it covers the whole config, so two specs with the same id train the same numbers."""
    seed = config.get("seed") if isinstance(config, Mapping) else None
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"config: needs an integer 'seed', got {seed!r}")
    return f"{config_digest(config, parent)}-s{seed}"


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not name or len(name) > 80 or any(
            not (c.isalnum() or c in "-_.") for c in name) or name.startswith("."):
        raise ValueError(f"run name: got {name!r}; allowed: 1-80 characters of letters, digits, '-', '_', '.', "
                         "not starting with '.'")
    return name


@dataclass(frozen=True)
class RunSpec:
    """One training run.

    ``config``: ``TrainConfig.to_dict()``, seed included; ``name``: a readable label (the folder
    is ``<name>-<run_id>``); ``parent``: the run id this run finetunes from (its final model, with
    the sparsity modules of ``config['surgery']`` replayed on it); ``data_seed``: the seed of the
    dataset (None: the run's seed, as :func:`gradsparse.train.train` loads it); ``loader``:
    ``"module:function"`` called as ``fn(name, n_train=..., n_test=..., data_seed=...)`` for the
    dataset (default :func:`load_dataset_for`)."""

    name: str
    config: Mapping[str, Any]
    parent: str | None = None
    data_seed: int | None = None
    loader: str = DEFAULT_LOADER

    def __post_init__(self) -> None:
        _check_name(self.name)
        run_id(self.config, self.parent)  # validates config and parent
        try:
            self.train_config()
        except (ValueError, TypeError) as e:
            raise ValueError(f"run {self.name}: its config is not a valid TrainConfig ({e})") from None
        if self.data_seed is not None and (not isinstance(self.data_seed, int) or self.data_seed < 0):
            raise ValueError(f"data_seed: got {self.data_seed!r}; allowed: None or an integer >= 0")
        if not isinstance(self.loader, str) or self.loader.count(":") != 1:
            raise ValueError(f"loader: got {self.loader!r}; allowed: 'module:function'")

    @property
    def run_id(self) -> str:
        return run_id(self.config, self.parent)

    @property
    def folder(self) -> str:
        return f"{self.name}-{self.run_id}"

    @property
    def seed(self) -> int:
        return int(self.config["seed"])

    def train_config(self) -> Any:
        from gradsparse.config import TrainConfig

        return TrainConfig.from_dict(dict(self.config)).validate()

    def group_key(self) -> str:
        """What a seed group shares: everything but the seed (and no parent)."""
        d = dict(self.config)
        d.pop("seed", None)
        return _canonical({"config": d, "loader": self.loader, "data_seed": self.data_seed})

    def to_dict(self) -> dict[str, Any]:
        return json_ready({"name": self.name, "config": dict(self.config), "parent": self.parent,
                           "data_seed": self.data_seed, "loader": self.loader, "run_id": self.run_id})

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "RunSpec":
        try:
            spec = cls(d["name"], dict(d["config"]), d.get("parent"), d.get("data_seed"), d.get("loader", DEFAULT_LOADER))
        except (KeyError, TypeError) as e:
            raise ValueError(f"run spec: {e!r} in {str(dict(d))[:200]}") from None
        if d.get("run_id") not in (None, spec.run_id):
            raise ValueError(f"run spec {spec.name}: recorded run id {d.get('run_id')} differs from its config's "
                             f"{spec.run_id} (the file was edited or written by another version)")
        return spec


@dataclass(frozen=True)
class Job:
    """What one worker trains at once: one run, or a seed group (:meth:`RunPlan.jobs`); ``parents``:
    the specs of the runs its runs finetune from (trained by earlier jobs)."""

    runs: tuple[RunSpec, ...]
    parents: tuple[RunSpec, ...] = ()

    @property
    def label(self) -> str:
        r = self.runs[0]
        return r.folder if len(self.runs) == 1 else f"{r.name}-{r.run_id.rsplit('-', 1)[0]} x{len(self.runs)} seeds"

    @property
    def needs(self) -> tuple[str, ...]:
        return tuple(sorted({r.parent for r in self.runs if r.parent is not None}))

    @property
    def steps(self) -> int:
        return int(self.runs[0].config.get("steps", 0)) * len(self.runs)


class RunPlan:
    """The union of runs, each once (module docstring). ``add`` keeps the first spec of a run id
    (its name names the folder); a parent must be added before the runs that finetune from it."""

    def __init__(self, specs: Iterable[RunSpec] = ()):
        self.runs: dict[str, RunSpec] = {}
        for s in specs:
            self.add(s)

    def add(self, spec: RunSpec) -> str:
        if not isinstance(spec, RunSpec):
            raise ValueError(f"spec: got {type(spec).__name__}; allowed: a RunSpec")
        if spec.parent is not None and spec.parent not in self.runs:
            raise ValueError(f"run {spec.name}: its parent {spec.parent} is not in the plan; add the parent first")
        self.runs.setdefault(spec.run_id, spec)
        return spec.run_id

    def __len__(self) -> int:
        return len(self.runs)

    def jobs(self, together: Callable[[Any], bool] | None = None) -> list[Job]:
        """The jobs in an order where every parent's job comes first: runs without a parent that
        differ only in their seed form one seed group when ``together(train_config)`` says so
        (default :func:`gradsparse.train_seeds.worth_vmapping`), every other run is a job of its own."""
        if together is None:
            from gradsparse.train_seeds import worth_vmapping as together
        groups: dict[str, list[RunSpec]] = {}
        order: list[tuple[str, Any]] = []
        for rid, spec in self.runs.items():
            if spec.parent is None and together(spec.train_config()):
                k = spec.group_key()
                if k not in groups:
                    groups[k] = []
                    order.append(("group", k))
                groups[k].append(spec)
            else:
                order.append(("run", rid))
        jobs: list[Job] = []
        for kind, k in order:
            runs = tuple(groups[k]) if kind == "group" else (self.runs[k],)
            if kind == "group" and len(runs) > 1:
                jobs.append(Job(runs))
            else:
                for r in runs:
                    jobs.append(Job((r,), (self.runs[r.parent],) if r.parent else ()))
        return _parents_first(jobs)

    def to_dict(self) -> dict[str, Any]:
        return {"format": RUNS_FORMAT, "runs": [s.to_dict() for s in self.runs.values()]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "RunPlan":
        if not isinstance(d, Mapping) or d.get("format") != RUNS_FORMAT or not isinstance(d.get("runs"), list):
            raise ValueError(f"not a run plan of format {RUNS_FORMAT} (expected {{'format': {RUNS_FORMAT}, 'runs': "
                             "[...]}})")
        return cls(RunSpec.from_dict(r) for r in d["runs"])


def _parents_first(jobs: list[Job]) -> list[Job]:
    """Stable topological order: a job after the jobs that train its parents."""
    made: dict[str, int] = {}
    for i, j in enumerate(jobs):
        for r in j.runs:
            made[r.run_id] = i
    done: set[int] = set()
    out: list[Job] = []

    def visit(i: int, path: tuple[int, ...]) -> None:
        if i in done:
            return
        if i in path:
            raise ValueError("run plan: the finetune dependencies form a cycle")
        for p in jobs[i].needs:
            if p in made:
                visit(made[p], path + (i,))
        done.add(i)
        out.append(jobs[i])

    for i in range(len(jobs)):
        visit(i, ())
    return out


def sweep(configs: Sequence[Any], seeds: Sequence[int], *, name: str = "run", data_seed: int | None = None) -> RunPlan:
    """A plan of every config (TrainConfig) x seed: ``name-<i>`` labels config i."""
    from gradsparse.config import TrainConfig

    if not configs:
        raise ValueError("configs: empty; allowed: a non-empty list of TrainConfig")
    if not seeds or any(not isinstance(s, int) or isinstance(s, bool) or s < 0 for s in seeds):
        raise ValueError(f"seeds: got {seeds!r}; allowed: a non-empty list of integers >= 0")
    plan = RunPlan()
    for i, c in enumerate(configs):
        if not isinstance(c, TrainConfig):
            raise ValueError(f"configs[{i}]: got {type(c).__name__}; allowed: a TrainConfig")
        for s in seeds:
            plan.add(RunSpec(f"{_check_name(name)}-{i}", c.replace(seed=int(s)).validate().to_dict(),
                             data_seed=data_seed))
    return plan


# ---------------------------------------------------------------------------------------- a job
_DATA: dict[tuple, Any] = {}  # per process: a worker loads each dataset once


def load_dataset_for(name: str, *, n_train: int | None = None, n_test: int | None = None,
                     data_seed: int = 0, path: str | None = None) -> Any:
    """The default loader: :func:`gradsparse.data.load_dataset`."""
    from gradsparse.data import load_dataset

    return load_dataset(name, seed=data_seed, n_train=n_train, n_test=n_test, path=path)


def dataset_for(spec: RunSpec) -> Any:
    """The dataset of ``spec`` through its loader (memoised per process)."""
    cfg = spec.config
    seed = spec.seed if spec.data_seed is None else spec.data_seed
    key = (spec.loader, cfg.get("data"), cfg.get("n_train"), cfg.get("n_test"), seed, cfg.get("data_path"))
    if key not in _DATA:
        mod, fn = spec.loader.split(":")
        load = getattr(importlib.import_module(mod), fn)
        kw: dict[str, Any] = {"n_train": cfg.get("n_train"), "n_test": cfg.get("n_test"), "data_seed": seed}
        if cfg.get("data_path"):
            kw["path"] = cfg.get("data_path")
        _DATA[key] = load(cfg["data"], **kw)
    return _DATA[key]


def finished(folder: Path, spec: RunSpec) -> bool:
    """Whether ``folder`` holds the finished run of ``spec``: a summary and the spec's config."""
    return finished_config(folder, spec.config)


def finished_config(folder: str | Path, config: Mapping[str, Any]) -> bool:
    """Whether ``folder`` holds a finished run (``summary.json``) whose ``config.json`` is ``config``
    (``TrainConfig.to_dict()``, seed included; the fields of ``TrainConfig.LATE_DEFAULTS`` at their defaults
    count as absent on both sides, so a run written before such a field existed is still finished)."""
    folder = Path(folder)
    try:
        stored = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(stored, dict):
        return False
    return (folder / "summary.json").is_file() and (_canonical(_without_late_defaults(stored))
                                                    == _canonical(_without_late_defaults(config)))


def _has_checkpoint(folder: Path) -> bool:
    from gradsparse.checkpoint import list_checkpoints

    try:
        return bool(list_checkpoints(folder))
    except (OSError, ValueError):
        return False


def parent_start(parent_folder: Path, cfg: Any) -> Any:
    """The start of a finetune: the parent run's final model with ``cfg.surgery`` replayed on it
    (:func:`gradsparse.plugins.replay_options`), as :func:`gradsparse.factory.finetune_start` made it."""
    from gradsparse.checkpoint import load_model
    from gradsparse.factory import _with_surgery
    from gradsparse.plugins import replay_options

    model, _ = load_model(parent_folder)
    return _with_surgery(cfg, replay_options(model, dict(cfg.surgery)))


@dataclass
class JobOutcome:
    """What :func:`run_job` did: ``trained`` (False: every run was already finished), the wall
    seconds, and each run's ``train_time_s`` from its summary."""

    label: str
    trained: bool
    seconds: float
    run_seconds: dict[str, float] = field(default_factory=dict)
    #: of ``seconds``, the wall time JAX spent compiling (or reading compiled code from the cache)
    compile_s: float = 0.0


def run_job(job: Job, runs_dir: str | Path, *, force: bool = False, progress: bool = False) -> JobOutcome:
    """Train ``job`` into ``runs_dir/<spec.folder>`` (parents must be finished there): a seed
    group with :func:`gradsparse.train_seeds.train_seeds` (all its seeds again, unless every one
    is finished), one run with :func:`gradsparse.train.train` (resumed from its latest checkpoint
    when it has one). Finished runs are left as they are, unless ``force`` (then every run is
    trained again from the start)."""
    from gradsparse.runtime import CompileClock, release_compiled_code

    runs_dir = Path(runs_dir)
    with CompileClock() as clock:
        outcome = _run_job(job, runs_dir, force, progress)
    outcome.compile_s = round(clock.seconds(), 3)
    release_compiled_code()
    return outcome


def _run_job(job: Job, runs_dir: Path, force: bool, progress: bool) -> JobOutcome:
    t0 = time.time()
    outs = [runs_dir / r.folder for r in job.runs]
    trained = False
    if force or not all(finished(o, r) for o, r in zip(outs, job.runs)):
        trained = True
        ds = dataset_for(job.runs[0])
        cfgs = [r.train_config() for r in job.runs]
        if len(job.runs) > 1:
            from gradsparse.train_seeds import train_seeds

            train_seeds(cfgs, outs, dataset=ds, progress=progress)
        else:
            from gradsparse.train import train

            spec, out = job.runs[0], outs[0]
            start = None
            if spec.parent is not None:
                par = next((p for p in job.parents if p.run_id == spec.parent), None)
                if par is None or not finished(runs_dir / par.folder, par):
                    raise ValueError(f"run {spec.folder}: its parent {spec.parent} is not finished in {runs_dir}")
                start = parent_start(runs_dir / par.folder, cfgs[0])
            if _has_checkpoint(out) and not force:
                train(cfgs[0], out, dataset=ds, start=start, progress=progress, resume=True, skip_damaged=True)
            else:
                train(cfgs[0], out, dataset=ds, start=start, progress=progress, overwrite=True)
    secs: dict[str, float] = {}
    for o, r in zip(outs, job.runs):
        try:
            secs[r.run_id] = float(json.loads((o / "summary.json").read_text(encoding="utf-8")).get("train_time_s", 0.0))
        except (OSError, ValueError, AttributeError):
            pass
    return JobOutcome(job.label, trained, round(time.time() - t0, 3), secs)
