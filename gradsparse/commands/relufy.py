"""``gradsparse relufy``: relufy a pretrained Hugging Face BERT by distillation against its original.

    gradsparse relufy HF_FOLDER --steps N --out RUN [--activation relu|mix]
                      [--modules zeroth_bias,restricted_ln|none] [--lr --batch-size --seq-len --hidden-weight
                      --seed --log-every --checkpoint-every --t-mix --t-up --zeroth-bias-clip --fuse-steps
                      --resume --skip-damaged --overwrite --quiet]

HF_FOLDER holds a config.json of model_type 'bert' and safetensors weights. The run
(:mod:`gradsparse.relufy`) writes a run folder like every gradsparse run: ``--resume`` continues
it (``--skip-damaged`` past damaged checkpoints), a finished run says so and changes nothing, a
folder that holds anything is refused unless ``--resume`` or ``--overwrite``. ``gradsparse
finetune HF_FOLDER ...`` (with ``--modules``) is the older name of this command.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from gradsparse.commands import add_run_folder_flags, check_run_out, path_arg
from gradsparse.commands.train import diverged
from gradsparse.errors import TrainingDiverged
from gradsparse.relufy import DISTILL_ACTIVATIONS, DISTILL_MODULES, DistillConfig, relufy
from gradsparse.runfolder import check_out

#: the flags that map one to one onto DistillConfig fields
FIELDS = ("activation", "lr", "batch_size", "seq_len", "hidden_weight", "seed", "log_every", "checkpoint_every",
          "t_mix", "t_up", "zeroth_bias_clip", "fuse_steps")


def is_hf_bert_folder(path: Path) -> bool:
    """Whether ``path`` is a Hugging Face BERT folder: config.json with a ``model_type`` and
    safetensors weights. A folder whose config.json names another model_type is refused
    (ValueError); a gradsparse run folder (its config.json has no model_type) is not one."""
    cfg = path / "config.json"
    if not path.is_dir() or not cfg.is_file():
        return False
    try:
        d = json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    if not isinstance(d, dict) or "model_type" not in d:
        return False
    if d["model_type"] != "bert":
        raise ValueError(f"{path}: config.json names model_type {d['model_type']!r}; allowed: a Hugging Face "
                         "folder of model_type bert, or a gradsparse checkpoint / run folder")
    if not ((path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()):
        raise ValueError(f"{path}: a BERT config.json but no model.safetensors (or model.safetensors.index.json); "
                         "allowed: a Hugging Face folder with safetensors weights")
    return True


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_distill_arguments(g: argparse._ActionsContainer) -> None:
    """The flags of a relufication run that ``gradsparse finetune HF_FOLDER`` shares."""
    g.add_argument("--activation", choices=DISTILL_ACTIVATIONS,
                   help="replace GELU by relu, or by the ReLU -> JSReLU mix (ramped over --t-mix) (default relu)")
    g.add_argument("--batch-size", type=int, help="sentences per step (default 16)")
    g.add_argument("--seq-len", type=int, help="tokens per sentence, special tokens included (default 32)")
    g.add_argument("--hidden-weight", type=float,
                   help="weight of the per-layer hidden-state MSE beside the embedding cosine loss (default 10)")
    g.add_argument("--checkpoint-every", type=int, help="checkpoint every k steps (default 0: at the end only)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("folder", type=path_arg, metavar="HF_FOLDER", help="a Hugging Face BERT folder (safetensors)")
    p.add_argument("--steps", type=int, required=True, help="distillation steps")
    p.add_argument("--out", type=path_arg, required=True, help="run folder to write (outside HF_FOLDER)")
    p.add_argument("--modules", default="none",
                   help=f"comma-separated from {','.join(DISTILL_MODULES)}, or none")
    add_distill_arguments(p)
    p.add_argument("--lr", type=float, help="Adam learning rate (default 5e-5)")
    p.add_argument("--seed", type=int, help="data-order seed (default 0)")
    p.add_argument("--log-every", type=int, help="log every k steps (default 50)")
    p.add_argument("--t-mix", type=int, help="steps until the ReLU -> JSReLU mix is complete (default steps/2)")
    p.add_argument("--t-up", type=int, help="restricted LN: steps until |gamma| >= 1 (default steps/2)")
    p.add_argument("--zeroth-bias-clip", type=float, help="clip |b0| <= c |gamma| (default 0.1)")
    p.add_argument("--fuse-steps", type=int, help="plain steps fused into one compiled loop between log points "
                                                   "(default 16)")
    add_run_folder_flags(p, overwrite="allow writing into a folder that holds a run",
                         resume="continue the run in --out from its last checkpoint (same arguments as the first call)",
                         skip_damaged="with --resume: start from the newest intact checkpoint when later ones are damaged")


def run(args: argparse.Namespace) -> int:
    folder_arg: Path = args.folder
    names = [t.strip() for t in args.modules.split(",") if t.strip()]
    if names != ["none"]:
        bad = [n for n in names if n not in DISTILL_MODULES]
        if bad or not names or len(set(names)) != len(names):
            raise ValueError(f"--modules {args.modules!r}: a Hugging Face folder takes a comma-separated subset of "
                             f"{', '.join(DISTILL_MODULES)} (each once), or none; the JSReLU mix is --activation mix")
    mods = tuple(m for m in DISTILL_MODULES if m in names)
    out: Path = args.out
    check_run_out(out, resume=args.resume, overwrite=args.overwrite, skip_damaged=args.skip_damaged)
    folder = folder_arg.resolve()
    fields = dict(model_folder=str(folder), modules=mods, steps=args.steps)
    for name in FIELDS:
        if getattr(args, name, None) is not None:
            fields[name] = getattr(args, name)
    try:  # every flag within its bounds before the model folder is read
        cfg = DistillConfig(**fields).validate()
    except ValueError as e:
        field, _, rest = str(e).partition(":")
        raise ValueError(f"{_flag(field)}:{rest}" if field in fields else str(e)) from None
    if not is_hf_bert_folder(folder_arg):
        raise ValueError(f"{folder_arg} is not a Hugging Face BERT folder (a config.json of model_type bert and "
                         "model.safetensors); a gradsparse checkpoint is finetuned with gradsparse finetune")
    if out.resolve() == folder or out.resolve().is_relative_to(folder):
        raise ValueError(f"--out {out} lies inside the model folder {folder}; choose a folder outside it")
    if not (args.overwrite or args.resume):
        check_out(out)  # early, before the model is read; the run folder checks again once it holds the lock
    try:
        res = relufy(cfg, out, resume=args.resume, progress=not args.quiet and sys.stderr.isatty(),
                     overwrite=args.overwrite, skip_damaged=args.skip_damaged)
    except TrainingDiverged as e:
        raise diverged(e, out, cfg.lr) from None
    if res.already_complete:
        print(f"{out}: the run is already complete ({cfg.steps} steps); nothing to do")
        return 0
    b, a = res.summary["before"], res.summary["after"]
    print(f"relufied {folder} ({cfg.activation}, modules [{', '.join(mods) or 'none'}], {cfg.steps} steps): "
          f"density {b['teacher_positive_fraction/mean']:.4f} (GELU, positive) / {b['density/mean']:.4f} (relufied) "
          f"-> {a['density/mean']:.4f}; teacher cosine {b['teacher_cos']:.4f} -> {a['teacher_cos']:.4f}; "
          f"neighbour agreement {b['nn_agreement']:.3f} -> {a['nn_agreement']:.3f}; "
          f"{res.summary['train_time_s']:.0f} s; run folder {out}")
    return 0
