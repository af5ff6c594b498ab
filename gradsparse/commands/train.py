"""``gradsparse train``: train a model with in-step monitors; writes a run folder.

``--resume`` continues the run in ``--out`` after a crash or a kill (even SIGKILL): the config
comes from ``RUN/config.json``; flags given with ``--resume`` must equal it (an error names the
first field that differs), except ``--steps``, which may extend a run with the constant schedule
(a cosine schedule depends on ``steps``, so there it must stay equal). Training restarts from
the latest checkpoint, the log is cut back to it, and the final parameters and log lines equal
those of an uninterrupted run. A folder without ``config.json`` (the run was killed before it
wrote anything) is started from step 0 with the config the flags give, so the same command line
plus ``--resume`` can simply be repeated until the run completes. A damaged latest checkpoint is
refused with the name of the newest intact one; ``--resume --skip-damaged`` continues from it.

A folder that holds (part of) a run, or any other files, is never written into without
``--overwrite`` (which replaces a run there and keeps other files). ``--resume`` on a finished run
says so and changes nothing. Ctrl-C saves a
checkpoint at the current step when it can and prints the ``--resume`` command (exit 130).

Exit codes: 0 done; 2 bad input, a path that cannot be written, a config that does not fit in
memory (one line on stderr); 3 the loss or a gradient became NaN/inf (one line naming the step
and the layer and suggesting a lower ``--lr``; the log ends at the last good logged step and the
last checkpoint is kept; a run that diverged before its first checkpoint keeps nothing, so the
retry needs no ``--overwrite``); 130 interrupted.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from gradsparse.commands import add_run_folder_flags, check_run_out, path_arg
from gradsparse.config import MODELS, NOISE_KINDS, NORMS, OPTIMIZERS, SCHEDULES, TrainConfig, check_resumable
from gradsparse import data
from gradsparse.data import DATASETS
from gradsparse.errors import TrainingDiverged
from gradsparse.checkpoint import list_checkpoints
from gradsparse.runfolder import RUN_FILES, check_out, stored_config
from gradsparse.train import train

# CLI flag -> config field, for the plain scalar options
_FIELDS = ("activation", "width", "mlp_ratio", "depth", "heads", "patch", "seq_len", "steps", "batch_size", "lr",
           "momentum", "weight_decay", "warmup", "grad_clip", "seed", "n_train", "n_test", "log_every", "eval_batch",
           "checkpoint_every", "flatness_every", "flatness_probes", "flatness_subset", "label_noise", "rho",
           "zeroth_bias_clip", "fuse_steps")


#: one line per config field for ``--help`` (the default is added from TrainConfig)
_FIELD_HELP = {
    "activation": "activation: relu, jsrelu, relu2, gelu, sshaped2(h,sx,sy), ...", "width": "model width d",
    "mlp_ratio": "hidden units per width, n = mlp_ratio * d", "depth": "number of MLP (or Transformer) blocks",
    "heads": "attention heads (vit, lm)", "patch": "ViT patch size", "seq_len": "tokens per sample (lm)",
    "steps": "training steps", "batch_size": "examples per step", "lr": "learning rate",
    "momentum": "SGD momentum", "weight_decay": "weight decay", "warmup": "warm-up steps of the schedule",
    "grad_clip": "global gradient-norm clip (0: off)", "seed": "seed of initialisation, data order and noise",
    "n_train": "training examples used (all when unset)", "n_test": "test examples used (all when unset)",
    "log_every": "steps between log lines", "eval_batch": "held-out examples the monitors use",
    "checkpoint_every": "steps between checkpoints (0: at the end only)",
    "flatness_every": "steps between Hutchinson traces (0: off)", "flatness_probes": "Rademacher probes per trace",
    "flatness_subset": "fixed training examples for traces (0: the held-out batch)",
    "label_noise": "fraction of training labels replaced at random", "rho": "synapse-noise scale (SPEC 4.4)",
    "zeroth_bias_clip": "clip c of the zeroth bias, |b0| <= c |gamma|",
    "fuse_steps": "plain steps fused into one compiled loop between log points",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    p.add_argument("--config", type=path_arg, help="JSON file with TrainConfig fields (flags override it)")
    p.add_argument("--model", choices=MODELS, help=f"model (default {d.model})")
    p.add_argument("--data", choices=DATASETS, help=f"dataset (default {d.data}; lm uses text)")
    p.add_argument("--data-path", help="Fashion-MNIST IDX folder or text file for the LM")
    p.add_argument("--optimizer", choices=OPTIMIZERS, help=f"optimizer (default {d.optimizer})")
    p.add_argument("--schedule", choices=SCHEDULES, help=f"learning-rate schedule (default {d.schedule})")
    p.add_argument("--weight-noise", choices=NOISE_KINDS,
                   help=f"weight noise on the key layers, SPEC 4.4 (default {d.weight_noise})")
    p.add_argument("--noise-per", choices=("sample", "batch"),
                   help=f"exact weight noise drawn per sample or per batch (default {d.noise_per})")
    p.add_argument("--zeroth-bias", action="store_true", default=None, help="add the zeroth bias (DB-MLP)")
    p.add_argument("--zeroth-bias-placement", choices=("input", "output"),
                   help=f"where the zeroth bias is added (default {d.zeroth_bias_placement})")
    p.add_argument("--restricted-ln", action="store_true", default=None, help="restricted LayerNorm")
    p.add_argument("--no-ln-affine", dest="ln_affine", action="store_false", default=None,
                   help="LayerNorms without gain and shift (default: with them)")
    p.add_argument("--norm", choices=NORMS,
                   help=f"what feeds each MLP block's key layer, model mlp only: the LayerNorm, the residual "
                        f"stream itself (none) or a LayerNorm without affine times a learnable scalar (scale) "
                        f"(default {d.norm})")
    p.add_argument("--plain", dest="residual", action="store_false", default=None, help="plain (non-residual) LN-MLP")
    p.add_argument("--track-covariance", action="store_true", default=None,
                   help="carry the decayed input and effective-gradient covariances in the step (SPEC 3.3)")
    types = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
    for name in _FIELDS:
        t = types[name]
        conv = float if "float" in str(t) else (str if "str" in str(t) else int)
        p.add_argument("--" + name.replace("_", "-"), type=conv, metavar=name.upper(),
                       help=f"{_FIELD_HELP.get(name, name.replace('_', ' '))} (default {getattr(d, name)})")
    p.add_argument("--out", type=path_arg, required=True, help="run folder to write (must not hold a run already)")
    add_run_folder_flags(p, overwrite="replace the run in --out (its checkpoints, log and summary are removed)",
                         resume="continue the run in --out from its latest checkpoint (config from RUN/config.json; "
                                "only --steps may differ, to extend a constant-schedule run)",
                         skip_damaged="with --resume: start from the newest intact checkpoint when later ones are "
                                      "damaged (they are kept as *.damaged; the log is cut back)")


def given_fields(args: argparse.Namespace) -> dict:
    """The config fields the user gave: the ``--config`` file's, overridden by explicit flags."""
    base: dict = {}
    if args.config is not None:
        if args.config.is_dir():
            raise ValueError(f"config file {args.config} is a folder")
        if not args.config.is_file():
            raise FileNotFoundError(f"config file {args.config} does not exist")
        try:
            base = json.loads(args.config.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise ValueError(f"config file {args.config} is not readable JSON ({type(e).__name__}: {e})") from None
        if not isinstance(base, dict):
            raise ValueError(f"config file {args.config} must hold a JSON object")
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    for name in sorted(names):
        v = getattr(args, name, None)
        if v is not None:
            base[name] = v
    return base


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The validated config of the flags (and ``--config`` file); lm defaults to text, vit to fashion_mnist."""
    base = given_fields(args)
    if base.get("model") == "lm" and "data" not in base:
        base["data"] = "text"
    if base.get("model") == "vit" and "data" not in base:
        base["data"] = "fashion_mnist"
    return TrainConfig.from_dict(base)


def resume_config(args: argparse.Namespace, out: Path) -> TrainConfig | None:
    """The config to resume the run in ``out`` with, or None when ``out`` holds no config.json.

    Every field given by a flag or ``--config`` must equal the stored one, except ``steps``.
    """
    stored = stored_config(out)
    if stored is None:
        return None
    path = out / "config.json"
    if stored.surgery:
        raise ValueError(f"--resume: {out} holds a finetuning run ({path} records surgery with modules "
                         f"{stored.surgery.get('modules')}); use gradsparse finetune --resume with the arguments "
                         "it was started with")
    given = given_fields(args)
    TrainConfig.from_dict({**stored.to_dict(), **given})  # the given values must be valid on their own
    cur = stored.to_dict()
    for name, v in given.items():
        if name != "steps" and v != cur[name]:
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"--resume: {name} {v!r} (from {flag} or --config) differs from {cur[name]!r} in {path}; "
                             "a resumed run keeps its config (leave the flag out; only --steps may extend the run)")
    cfg = stored.replace(steps=given.get("steps", stored.steps))
    check_resumable(stored, cfg, f"the run in {out}")
    return cfg


def run(args: argparse.Namespace) -> int:
    out: Path = args.out
    check_run_out(out, resume=args.resume, overwrite=args.overwrite, skip_damaged=args.skip_damaged)
    cfg = (resume_config(args, out) if args.resume else None) or config_from_args(args)
    if not (args.overwrite or args.resume):
        check_out(out)  # early, before the data are read; the run folder checks again once it holds the lock
    ds = data.load_dataset(cfg.data, seed=cfg.seed, path=cfg.data_path, n_train=cfg.n_train, n_test=cfg.n_test)
    try:
        res = train(cfg, out, dataset=ds, progress=not args.quiet and sys.stderr.isatty(), resume=args.resume,
                    skip_damaged=args.skip_damaged, overwrite=args.overwrite)
    except TrainingDiverged as e:
        raise diverged(e, out, cfg.lr) from None
    if res.already_complete:
        print(f"{out}: the run is already complete ({cfg.steps} steps); nothing to do")
        return 0
    f = res.final
    print(f"trained {cfg.model} on {cfg.data}: {run_summary(f, cfg.steps)}; test accuracy {f['test_accuracy']:.3f}; "
          f"run folder {out}")
    return 0


def run_summary(final: dict, steps: int) -> str:
    """'N steps in Ts; density a -> b (held-out c)' from a run's summary dict."""
    nan = float("nan")
    return (f"{steps} steps in {final['train_time_s']:.1f}s; density {final.get('density_start', nan):.3f} -> "
            f"{final.get('density_end', nan):.3f} (held-out {final.get('heldout_density_end', nan):.3f})")


def discard_unstarted_run(out: Path) -> bool:
    """Remove the files of a run that stopped before its first checkpoint (config, meta, log,
    times: nothing a resume could continue from), so that the same command, with other flags,
    starts afresh without ``--overwrite``; the folder itself goes when that leaves it empty.
    Returns False (and removes nothing) when ``out`` holds a checkpoint."""
    if not isinstance(out, Path):
        raise ValueError(f"out: must be a Path, got {type(out).__name__}")
    if not out.is_dir() or list_checkpoints(out):
        return False
    for name in RUN_FILES:
        p = out / name
        if name == "checkpoints":
            if p.is_dir() and not p.is_symlink() and not any(p.iterdir()):
                p.rmdir()
        elif p.is_file() or p.is_symlink():
            p.unlink()
    if not any(out.iterdir()):
        out.rmdir()
    return True


def diverged(e: TrainingDiverged, out: Path, lr: float) -> TrainingDiverged:
    """``e`` with the way out: a lower ``--lr``, and, when no checkpoint was written, the run's
    files removed (:func:`discard_unstarted_run`) so that the retry needs no ``--overwrite``."""
    if not isinstance(e, TrainingDiverged):
        raise ValueError(f"e: must be a TrainingDiverged, got {type(e).__name__}")
    line = f"{e}; a lower --lr than {lr:g} may help"
    if e.checkpoint is None and discard_unstarted_run(out):
        line += f" (no checkpoint was written, so nothing was kept in {out}: the retry needs no --overwrite)"
    new = TrainingDiverged(e.step, e.where, e.checkpoint)
    new.args = (line,)
    return new
