"""What a check runs in: data (cached), training runs (cached per config), the shared baseline.

Seeds: seed s changes the model initialisation, the batch order and the noise of a run
(``TrainConfig.seed``); the dataset itself is made once per name (data seed 0), so that seeds
compare like with like. Runs are cached per (config, tag) inside one :class:`Context`: checks that
study the same baseline (G3, G4, G7, G8, G9, G13, G14) share its runs instead of repeating them.
Every run is built by :mod:`gradsparse.factory` (through :func:`gradsparse.train.train`).

Seed groups: :meth:`Context.seed_runs` trains the seeds of one config together
(:func:`gradsparse.train_seeds.train_seeds`, one ``jax.vmap``) when ``vmap_seeds`` is "on", or
"auto" and :func:`gradsparse.train_seeds.worth_vmapping` says it measured faster (CPU: MLP width
<= 64, byte LM width <= 32; any accelerator). Such runs equal one-at-a-time runs up to float
rounding; the report names them (:meth:`Context.vmapped_since`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from gradsparse.config import TrainConfig
from gradsparse.data import DATASETS, DataInfo, Dataset, heldout_batch, load_dataset, make_mnist1d
from gradsparse.factory import Built, RunKeys, build
from gradsparse.io import atomic_write_with
from gradsparse.runplan import finished_config, run_id
from gradsparse.runtime import cache_root, release_compiled_code
from gradsparse.train import train
from gradsparse.train_seeds import SEEDS_KEY, train_seeds, worth_vmapping
from theory_checks.protocol import PRESETS, Unavailable


def _mnist1d_cached(seed: int = 0):
    """mnist1d (data seed ``seed``) from an .npz cache under :func:`cache_root`, made once.

    Generating mnist1d takes ~6 s; the arrays are a pure function of the seed, so a cached copy
    is exactly the dataset ``gradsparse.data.load_dataset('mnist1d', seed=seed)`` returns.
    """
    path = cache_root() / "data" / f"mnist1d_seed{seed}.npz"
    if path.is_file():
        try:
            with np.load(path) as z:
                arrays = [z[k] for k in ("x_train", "y_train", "x_test", "y_test")]
            return Dataset("mnist1d", "vector", *arrays, 10)
        except (OSError, KeyError, ValueError):
            pass  # corrupt cache: make it again
    ds = make_mnist1d(seed=seed)
    try:
        atomic_write_with(path, lambda tmp: np.savez(open(tmp, "wb"), x_train=ds.x_train, y_train=ds.y_train,
                                                     x_test=ds.x_test, y_test=ds.y_test))
    except OSError:
        pass
    return ds


def load_data(name: str, *, n_train: int | None = None, n_test: int | None = None, data_seed: int = 0):
    """A dataset for the checks (data seed 0 unless told), truncated like ``load_dataset`` does.

    'mnist1d' comes from the disk cache; 'random_labels' relabels it exactly as
    ``gradsparse.data.load_dataset`` does; everything else is ``load_dataset``. Raises
    :class:`Unavailable` when Fashion-MNIST files are missing.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; allowed: {', '.join(DATASETS)}")
    if name in ("mnist1d", "random_labels"):
        ds = _mnist1d_cached(data_seed)
        if name == "random_labels":
            rng = np.random.default_rng(data_seed)  # the same draws as load_dataset('random_labels')
            ds = Dataset("random_labels", "vector", ds.x_train, rng.integers(0, 10, len(ds.y_train)).astype(np.int32),
                         ds.x_test, rng.integers(0, 10, len(ds.y_test)).astype(np.int32), 10)
        return Dataset(ds.name, ds.kind, ds.x_train[:n_train], ds.y_train[:n_train], ds.x_test[:n_test],
                       ds.y_test[:n_test], ds.num_classes)
    try:
        return load_dataset(name, seed=data_seed, n_train=n_train, n_test=n_test)
    except (FileNotFoundError, OSError) as e:
        raise Unavailable(f"dataset {name} unavailable: {e}") from None


#: the settings of :attr:`Context.vmap_seeds`
VMAP_SEEDS = ("auto", "on", "off")


@dataclass
class Context:
    """What a check runs in: preset, seeds, output folder, shared run cache, log function.

    ``out_dir`` (or None): run folders go to ``out_dir/runs/<tag>-<hash>-s<seed>``.
    ``vmap_seeds``: "auto" (default), "on" or "off": whether :meth:`seed_runs` trains a config's
    seeds together (see the module docstring).
    """

    preset: str = "quick"
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    out_dir: Path | None = None
    log: Callable[[str], None] = lambda msg: None
    vmap_seeds: str = "auto"
    _runs: dict[str, Any] = field(default_factory=dict, repr=False)
    _data: dict[tuple, Any] = field(default_factory=dict, repr=False)
    _used: list[str] = field(default_factory=list, repr=False)
    _cfgs: dict[str, dict[str, Any]] = field(default_factory=dict, repr=False)
    #: {run id: finished run folder} of the runs the suite's executor trained (:mod:`gradsparse.runplan`)
    index: dict[str, Path] = field(default_factory=dict)
    #: False when judging only: a run not in :attr:`index` is :class:`Unavailable`, never trained
    may_train: bool = True
    #: the run ids this context trained itself (runs the plan did not declare, or no executor ran)
    trained_here: list[str] = field(default_factory=list, repr=False)
    _tags: dict[str, str] = field(default_factory=dict, repr=False)
    _rid_of: dict[int, str] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; allowed: {', '.join(PRESETS)}")
        if not self.seeds or any(not isinstance(s, int) or s < 0 for s in self.seeds):
            raise ValueError(f"seeds must be a non-empty list of integers >= 0, got {self.seeds!r}")
        if self.out_dir is not None:
            self.out_dir = Path(self.out_dir)
        if self.vmap_seeds not in VMAP_SEEDS:
            raise ValueError(f"vmap_seeds: got {self.vmap_seeds!r}; allowed: {', '.join(VMAP_SEEDS)}")

    def data(self, name: str, n_train: int | None = None, n_test: int | None = None):
        key = (name, n_train, n_test)
        if key not in self._data:
            self._data[key] = load_data(name, n_train=n_train, n_test=n_test)
        return self._data[key]

    def train(self, cfg: Any, tag: str, *, start: Built | None = None, parent: Any = None, cache: bool = True):
        """The run of ``cfg``: from the finished run folder the suite's executor trained
        (:attr:`index`), else trained now through :func:`gradsparse.train.train` (cached by run id).

        ``start`` (finetuning: :func:`gradsparse.factory.finetune_start`) is passed through with
        ``parent``, the run (a result of this context) it finetunes from: the run id
        (:func:`gradsparse.runplan.run_id`) hashes the config and the parent's id, as the plan of runs
        does. With :attr:`may_train` False (``gradsparse check --judge``) a run missing from the
        folders is :class:`Unavailable`. Returns the :class:`gradsparse.train.RunResult`.
        """
        cfg = cfg.validate()
        if start is not None and parent is None:
            raise ValueError("a finetune (start=...) needs parent=, the run it starts from")
        rid = self.run_key(cfg, parent)
        self._used.append(rid)
        self._cfgs[rid] = cfg.to_dict()
        self._tags.setdefault(rid, tag)
        if cache and rid in self._runs:
            return self._runs[rid]
        ds = self.data(cfg.data, cfg.n_train, cfg.n_test)
        name = self.index[rid].name if rid in self.index else f"{tag}-{rid}"
        if self._finished(rid, cfg):
            res = train(cfg, self.index[rid], dataset=ds, start=start, progress=False, resume=True)
        elif not self.may_train:
            raise Unavailable(f"run {name} is not in the run folders (judging trains nothing: train it with "
                              "gradsparse check --resume)")
        else:
            t0 = time.time()
            res = train(cfg, self._run_dir(name), dataset=ds, start=start, progress=False)
            self.trained_here.append(rid)
            self.log(f"  trained {tag}-{rid}: {cfg.steps} steps in {time.time() - t0:.1f}s")
            release_compiled_code()
        self._rid_of[id(res)] = rid
        if cache:
            self._runs[rid] = res
        return res

    def run_key(self, cfg: TrainConfig, parent: Any = None) -> str:
        """The run id of ``cfg`` (finetuned from the run ``parent`` of this context, or from scratch)."""
        pid = None
        if parent is not None:
            pid = self._rid_of.get(id(parent))
            if pid is None:
                raise ValueError("parent: not a run of this context")
        return run_id(cfg.to_dict(), pid)

    def _finished(self, rid: str, cfg: TrainConfig) -> bool:
        """Whether the executor's folder of run ``rid`` (:attr:`index`) holds ``cfg`` finished."""
        return rid in self.index and finished_config(self.index[rid], cfg.to_dict())

    def _run_dir(self, name: str) -> Path | None:
        return self.out_dir / "runs" / name if self.out_dir is not None else None

    def together(self, cfg: TrainConfig) -> bool:
        """Whether :meth:`seed_runs` trains the seeds of ``cfg`` as one vmapped group."""
        if self.vmap_seeds == "auto":
            return worth_vmapping(cfg)
        return self.vmap_seeds == "on"

    def seed_runs(self, cfg: Any, tag: str, **kw: Any) -> list[Any]:
        """One run of ``cfg`` per seed of this context: from the executor's run folders, else the
        seeds not cached yet trained together (:func:`gradsparse.train_seeds.train_seeds`) when
        :meth:`together` says so and no ``start`` or ``cache=False`` is given, else one after the other."""
        cfgs = [cfg.replace(seed=s).validate() for s in self.seeds]
        todo = [c for c in cfgs if self.run_key(c) not in self._runs and not self._finished(self.run_key(c), c)]
        if (len(todo) >= 2 and self.may_train and kw.get("start") is None and kw.get("cache", True)
                and self.together(cfgs[0])):
            keys = [self.run_key(c) for c in todo]
            t0 = time.time()
            results = train_seeds(todo, [self._run_dir(f"{tag}-{k}") for k in keys],
                                  dataset=self.data(cfg.data, cfg.n_train, cfg.n_test))
            self.log(f"  trained {tag} seeds {[c.seed for c in todo]} together (vmap): "
                     f"{cfg.steps} steps in {time.time() - t0:.1f}s")
            release_compiled_code()
            self.trained_here.extend(keys)
            self._runs.update(zip(keys, results))
            self._rid_of.update((id(r), k) for k, r in zip(keys, results))
        return [self.train(c, tag, **kw) for c in cfgs]

    def vmapped_since(self, mark: int) -> list[str]:
        """The run tags used since ``mark`` (a :meth:`mark`) whose seeds were trained together; a
        check's report names them."""
        out: list[str] = []
        for key in self._used[mark:]:
            run = self._runs.get(key)
            name = self._tags.get(key, key)
            if run is not None and run.final.get(SEEDS_KEY) and name not in out:
                out.append(name)
        return out

    def with_seeds(self, seeds: Sequence[int]) -> "Context":
        """This context with other seeds (a check whose plan needs more seeds than the preset's),
        sharing the run and data caches."""
        return dataclasses.replace(self, seeds=list(seeds))

    def unplanned_since(self, mark: int, plan: Any) -> list[str]:
        """The runs used since ``mark`` whose config (seed aside) is not an arm of ``plan``."""
        planned = [json.dumps(a.config, sort_keys=True, default=str) for a in plan.arms]
        out = []
        for key in self._used[mark:]:
            d = dict(self._cfgs.get(key, {}))
            d.pop("seed", None)
            if json.dumps(d, sort_keys=True, default=str) not in planned and key not in out:
                out.append(key)
        return out

    def mark(self) -> int:
        """A position in the record of runs used (for :meth:`vmapped_since`)."""
        return len(self._used)


#: The baseline run several checks share (G3, G4, G7, G8, G9, G13, G14; vanilla of G10/G11): a
#: LayerNorm-ed residual MLP on mnist1d trained with Adam. Chosen by measurement (2-core CPU,
#: width 64, depth 2, 1500 steps): plain SGD at lr 0.05-0.1 moves density only from ~0.50 to
#: ~0.39-0.45, SGD + momentum 0.9 (lr 0.1) to ~0.31, Adam at lr 3e-3 to ~0.21, so Adam is the
#: setting in which the predicted emergence is visible inside the quick budget. The claims about
#: SGD noise (G5) use plain SGD, since that is what they are about.
BASE: dict[str, dict[str, Any]] = {
    "smoke": dict(model="mlp", data="mnist1d", width=16, depth=1, mlp_ratio=4, optimizer="adam", lr=3e-3,
                  batch_size=64, steps=120, log_every=10, eval_batch=128, flatness_every=20, flatness_probes=2,
                  checkpoint_every=0),
    "quick": dict(model="mlp", data="mnist1d", width=64, depth=2, mlp_ratio=4, optimizer="adam", lr=3e-3,
                  batch_size=64, steps=1000, log_every=25, eval_batch=256, flatness_every=100, flatness_probes=8,
                  checkpoint_every=0),
    "full": dict(model="mlp", data="mnist1d", width=128, depth=4, mlp_ratio=4, optimizer="adam", lr=3e-3,
                 batch_size=64, steps=6000, log_every=50, eval_batch=512, flatness_every=250, flatness_probes=16,
                 checkpoint_every=0),
}
BASE["standard"] = dict(BASE["quick"])

#: The plain-SGD baseline of the claims about SGD noise (G3's SGD arm, G4, G5, G7, G8, G9): residual
#: LN-MLP width 128, 4 blocks, plain SGD lr 0.1, batch 32, all 4000 mnist1d training examples,
#: 2000 steps; Hutchinson traces (and the monitors compared with them, logged under fixed/...) on a
#: FIXED 512-example training subset (SPEC 3.4); density verdicts on blocks 2..L. Chosen from a
#: pilot (CHECKS_REVIEW.md, Exp 1, seed 0): held-out density of blocks 2-4 0.50 -> 0.36 at lr 0.1,
#: 0.49 at lr 0.01 and 0.43 at batch 128, train loss 0.30 (not interpolated).
SGD: dict[str, dict[str, Any]] = {
    "smoke": dict(model="mlp", data="mnist1d", width=16, depth=2, mlp_ratio=4, optimizer="sgd", lr=0.1,
                  batch_size=32, steps=120, log_every=20, eval_batch=128, flatness_every=40, flatness_probes=2,
                  flatness_subset=128, checkpoint_every=0),
    "quick": dict(model="mlp", data="mnist1d", width=128, depth=4, mlp_ratio=4, optimizer="sgd", lr=0.1,
                  batch_size=32, steps=2000, log_every=100, eval_batch=512, flatness_every=200, flatness_probes=8,
                  flatness_subset=512, checkpoint_every=0),
    "full": dict(model="mlp", data="mnist1d", width=256, depth=4, mlp_ratio=4, optimizer="sgd", lr=0.1,
                 batch_size=32, steps=6000, log_every=100, eval_batch=512, flatness_every=250, flatness_probes=16,
                 flatness_subset=512, checkpoint_every=0),
}
SGD["standard"] = dict(SGD["quick"])
#: what the SGD baseline is, for verdict lines
SGD_MODEL = "residual LN-MLP (ReLU) on mnist1d, plain SGD (constant lr, no weight decay)"


def _preset_config(table: dict[str, dict[str, Any]], preset: str, changes: dict[str, Any]) -> TrainConfig:
    """``table[preset]`` with ``changes`` applied, as a validated TrainConfig."""
    if preset not in table:
        raise ValueError(f"unknown preset {preset!r}; allowed: {', '.join(PRESETS)}")
    return TrainConfig.from_dict({**table[preset], **changes})


def _tag(name: str, changes: dict[str, Any]) -> str:
    """The run-cache tag of a baseline variant: 'name' or 'name-k1v1-k2v2' (keys sorted)."""
    return name if not changes else name + "-" + "-".join(f"{k}{v}" for k, v in sorted(changes.items()))


def base_config(preset: str, **changes: Any) -> TrainConfig:
    """The :data:`BASE` TrainConfig of ``preset`` with ``changes`` applied (validated)."""
    return _preset_config(BASE, preset, changes)


def base_runs(ctx: Context, *, flatness: bool = False, **changes: Any) -> list[Any]:
    """The shared baseline (with ``changes``), one run per seed.

    Variants (non-empty ``changes``) skip the Hutchinson estimates unless ``flatness`` is set
    (compiling them is the most expensive part of a short run: ~8 s CPU of ~16 s).
    """
    tag = _tag("base", changes)
    if changes and not flatness:
        changes = {"flatness_every": 0, **changes}
    return ctx.seed_runs(base_config(ctx.preset, **changes), tag)


#: The ONE pinned small Transformer of the module and weight-noise claims (G10, G11, G12): the causal
#: byte LM on the embedded text (the Python standard library's sources, present on every machine),
#: seq_len 32 tokens per sample, so the zeroth bias is a per-position bias (at S = 1 it would be a
#: clipped copy of the key bias). Monitors and traces: all MLP blocks (no block sees raw features);
#: Hutchinson traces on a FIXED subset of 256 training windows.
LM: dict[str, dict[str, Any]] = {
    "smoke": dict(model="lm", data="text", width=16, depth=1, heads=2, seq_len=16, mlp_ratio=4, optimizer="adam",
                  lr=3e-3, batch_size=16, steps=40, log_every=10, eval_batch=32, flatness_every=20, flatness_probes=2,
                  flatness_subset=32, checkpoint_every=0),
    "quick": dict(model="lm", data="text", width=32, depth=2, heads=2, seq_len=32, mlp_ratio=4, optimizer="adam",
                  lr=3e-3, batch_size=32, steps=800, log_every=100, eval_batch=128, flatness_every=200,
                  flatness_probes=4, flatness_subset=256, checkpoint_every=0),
    "full": dict(model="lm", data="text", width=128, depth=4, heads=4, seq_len=64, mlp_ratio=4, optimizer="adam",
                 lr=1e-3, batch_size=64, steps=8000, log_every=200, eval_batch=256, flatness_every=1000,
                 flatness_probes=8, flatness_subset=256, checkpoint_every=0),
}
LM["standard"] = dict(LM["quick"])


def lm_config(preset: str, **changes: Any) -> TrainConfig:
    """The :data:`LM` TrainConfig of ``preset`` with ``changes`` applied (validated)."""
    return _preset_config(LM, preset, changes)


def lm_runs(ctx: Context, **changes: Any) -> list[Any]:
    """The pinned byte LM (with ``changes``), one run per seed (cached: G10-G12 share the vanilla runs)."""
    return ctx.seed_runs(lm_config(ctx.preset, **changes), _tag("lm", changes))


def sgd_config(preset: str, **changes: Any) -> TrainConfig:
    """The :data:`SGD` TrainConfig of ``preset`` with ``changes`` applied (validated)."""
    return _preset_config(SGD, preset, changes)


def sgd_runs(ctx: Context, **changes: Any) -> list[Any]:
    """The plain-SGD baseline (with ``changes``), one run per seed (cached: checks share it)."""
    return ctx.seed_runs(sgd_config(ctx.preset, **changes), _tag("sgd", changes))


def describe(cfg: TrainConfig) -> str:
    """'residual LN-MLP w128 x4 (relu), sgd lr 0.1 B32, 2000 steps, mnist1d' for verdict lines."""
    kind = {"mlp": "residual LN-MLP" if cfg.residual else "plain LN-MLP", "vit": "pre-LN ViT",
            "lm": "causal byte LM"}[cfg.model]
    extra = f", seq {cfg.seq_len}" if cfg.model == "lm" else ""
    return (f"{kind} w{cfg.width} x{cfg.depth} ({cfg.activation}{extra}), {cfg.optimizer} lr {cfg.lr:g} "
            f"B{cfg.batch_size}, {cfg.steps} steps, {cfg.data}")


def tail(per_block: Sequence[Any]) -> Sequence[Any]:
    """Blocks 2..L of a per-block sequence (all of it for a one-block model, e.g. the smoke preset)."""
    return per_block[1:] if len(per_block) > 1 else per_block


def late_blocks(history: Sequence[Mapping[str, Any]], key: str, first: int = 1, frac: float = 0.1) -> float:
    """Mean over blocks ``first``.. (0-based; default: blocks 2..L) of a per-layer logged ``key``,
    averaged over the last ``frac`` of training (at least the last log)."""
    s = np.asarray([h["step"] for h in history if key in h], dtype=np.float64)
    v = np.asarray([np.mean(h[key][first:] if len(h[key]) > first else h[key]) for h in history if key in h],
                   dtype=np.float64)
    if s.size == 0:
        raise ValueError(f"key {key!r} not in the training log")
    t = s / max(s[-1], 1.0)
    m = t >= 1.0 - frac - 1e-9
    return float(np.mean(v[m])) if m.any() else float(v[-1])


def per_block_end(history: Sequence[Mapping[str, Any]], key: str, frac: float = 0.1) -> list[float]:
    """Per-block value of a per-layer ``key``, averaged over the last ``frac`` of training."""
    rows = [h for h in history if key in h]
    if not rows:
        raise ValueError(f"key {key!r} not in the training log")
    t = np.asarray([h["step"] for h in rows], dtype=np.float64)
    t = t / max(t[-1], 1.0)
    sel = [h[key] for h, ti in zip(rows, t) if ti >= 1.0 - frac - 1e-9] or [rows[-1][key]]
    return [float(x) for x in np.mean(np.asarray(sel, dtype=np.float64), axis=0)]


def heldout(ctx: Context, cfg: Any, n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The held-out batch the training loop monitors (first ``eval_batch`` test examples)."""
    ds = ctx.data(cfg.data, cfg.n_train, cfg.n_test)
    return heldout_batch(ds, n or cfg.eval_batch, cfg.seq_len, RunKeys.of(cfg.seed).heldout)


def end_value(history: Sequence[Mapping[str, Any]], key: str, frac: float = 0.1) -> float:
    """Mean of ``key`` over the last ``frac`` of training (by step; at least the last log)."""
    v = window_mean(history, key, 1.0 - frac, 1.0)
    return v if math.isfinite(v) else series(history, key)[1][-1]


def init_model(cfg: Any, ds: Any) -> Any:
    """The model :func:`gradsparse.train.train` starts from for ``cfg`` (the factory's build with the
    run's model key), plug-ins included."""
    return build(cfg, DataInfo.of(ds), RunKeys.of(cfg.seed).model).model


def series(history: Sequence[Mapping[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of a logged key; raises ValueError naming the missing key."""
    if not history:
        raise ValueError("empty training history")
    if key not in history[0]:
        avail = sorted(k for k in history[0] if k.endswith("/mean") or "/" not in k)
        raise ValueError(f"key {key!r} not in the training log; available: {avail}")
    steps = np.asarray([h["step"] for h in history if key in h], dtype=np.float64)
    vals = np.asarray([h[key] for h in history if key in h], dtype=np.float64)
    return steps, vals


def start_end(history: Sequence[Mapping[str, Any]], key: str) -> tuple[float, float]:
    """First and last logged value of ``key``."""
    _, v = series(history, key)
    return float(v[0]), float(v[-1])


def window_rows(steps: Sequence[float], lo: float, hi: float = 1.0) -> np.ndarray:
    """Boolean mask of the logged steps in the fraction [lo, hi] of training (t = step / last step;
    the end window of the last 10% is ``lo = 0.9``)."""
    s = np.asarray(steps, np.float64)
    t = s / max(float(s[-1]), 1.0)
    return (t >= lo - 1e-9) & (t <= hi + 1e-9)


def window_mean(history: Sequence[Mapping[str, Any]], key: str, lo: float, hi: float) -> float:
    """Mean of ``key`` over logged steps in the fraction [lo, hi] of training (by step)."""
    s, v = series(history, key)
    if s.size == 0:
        return math.nan
    m = window_rows(s, lo, hi)
    return float(np.mean(v[m])) if m.any() else math.nan


def block_activations(model: Any, x: np.ndarray) -> list[np.ndarray]:
    """Per MLP block, the activations a (N tokens, n units) of ``model`` on inputs ``x`` (eval mode:
    no noise), from the blocks' own aux output (zero probes)."""
    import jax.numpy as jnp

    from gradsparse.models.common import zero_probes

    xs = jnp.asarray(x)
    num_tokens = int(xs.shape[0]) * int(getattr(model, "tokens_per_sample", 1) if model.seq_len == 1 else
                                        xs.shape[1])
    _, aux = model(xs, zero_probes(model.mlp_blocks(), num_tokens))
    return [np.asarray(a["a"]) for a in aux]


def dead_fraction(model: Any, x: np.ndarray, tol: float = 1e-6) -> list[float]:
    """Per MLP block, the fraction of units never active (|a| <= tol) on every token of ``x``:
    Lazy Neuron's "not dead neurons" control (sparsity that is dead units is not the phenomenon)."""
    return [float(np.mean(np.all(np.abs(a) <= tol, axis=0))) for a in block_activations(model, x)]
