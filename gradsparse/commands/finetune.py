"""``gradsparse finetune``: plug sparsity modules into a checkpoint and finetune it (SPEC 4, G11).

    gradsparse finetune RUN_OR_CHECKPOINT --modules zeroth_bias,restricted_ln,jsrelu[,lora,noise]
                        --steps N --out DIR [--lr LR --t-up T --t-mix T --lora-rank R --rho RHO ...]
    gradsparse finetune HF_FOLDER --activation relu|mix --modules zeroth_bias,restricted_ln|none [--distill]
                        --steps N --out RUN [--lr --batch-size --seq-len --hidden-weight --seed --log-every
                        --checkpoint-every --t-mix --t-up --zeroth-bias-clip --resume --overwrite]

The first argument decides the route: a Hugging Face BERT folder (config.json with model_type
'bert' and safetensors weights) is relufied by distillation against its frozen original
(:mod:`gradsparse.relufy`; ``gradsparse relufy HF_FOLDER`` is the name of that route now, this one
keeps working); anything else is a gradsparse checkpoint or run folder.

``--modules none`` finetunes without modules (the control run). The finetuned run folder is a
normal run folder; its checkpoints record the surgery options and the parent checkpoint, so
``gradsparse.checkpoint.load_model`` rebuilds them.

``--out`` may not be the parent's run folder or lie inside it (even with ``--overwrite``: the
parent is what is being read), and a folder that holds (part of) a run is refused unless
``--resume`` or ``--overwrite`` is given. Every numeric flag is checked against its bounds
before the checkpoint is read.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gradsparse._validate import check_float, check_int
from gradsparse.checkpoint import load_model, resolve
from gradsparse.commands import add_run_folder_flags, check_run_out, path_arg
from gradsparse.commands import relufy as relufy_command
from gradsparse.commands.relufy import add_distill_arguments, is_hf_bert_folder
from gradsparse.commands.train import run_summary
from gradsparse.config import INT_BOUNDS, TrainConfig
from gradsparse import data
from gradsparse.factory import RunKeys, finetune_start
from gradsparse.plugins.sparsify import MODULE_NAMES
from gradsparse.runfolder import check_out, run_contents, stored_config
from gradsparse.step import final_eval
from gradsparse.train import train


def parse_modules(text: str) -> list[str]:
    """'a,b,c' -> ['a', 'b', 'c'] (or [] for 'none'); ValueError listing the allowed names."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    if names == ["none"]:
        return []
    bad = [n for n in names if n not in MODULE_NAMES]
    if bad or not names:
        raise ValueError(f"unknown module(s) {', '.join(bad) or repr(text)}; allowed: {', '.join(MODULE_NAMES)} "
                         "(comma-separated), or none")
    if len(set(names)) != len(names):
        raise ValueError(f"module listed twice in {text!r}")
    return names


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", type=path_arg,
                   help="checkpoint file or run folder (its latest checkpoint), or a Hugging Face BERT folder")
    p.add_argument("--modules", required=True,
                   help=f"comma-separated from {','.join(MODULE_NAMES)} (or 'none' for a control run)")
    p.add_argument("--steps", type=int, required=True, help="finetuning steps")
    p.add_argument("--out", type=path_arg, required=True,
                   help="run folder to write (not the parent's run folder, nor inside it)")
    p.add_argument("--lr", type=float, help="learning rate (default: the parent run's; 5e-5 for a BERT folder)")
    p.add_argument("--warmup", type=int, default=0, help="linear warm-up steps (default 0)")
    p.add_argument("--t-up", type=int, help="restricted LN: steps until |gamma| >= 1 (default steps/2)")
    p.add_argument("--t-mix", type=int, help="jsrelu: steps until the ReLU -> JSReLU mix is complete (default steps/2)")
    p.add_argument("--zeroth-bias-placement", choices=("input", "output"), default="input",
                   help="where the zeroth bias is added")
    p.add_argument("--zeroth-bias-clip", type=float, default=0.1, help="clip |b0| <= c |gamma| (default 0.1)")
    p.add_argument("--noise", choices=("synapse", "exact"), default="synapse", help="noise kind (default synapse)")
    p.add_argument("--noise-per", choices=("sample", "batch"), default="sample",
                   help="exact weight noise drawn per sample or per batch")
    p.add_argument("--rho", type=float, default=0.1, help="noise scale relative to RMS(K) (default 0.1)")
    p.add_argument("--lora-rank", type=int, default=4, help="rank r of the LoRA adapters (SPEC 4.6)")
    p.add_argument("--lora-alpha", type=float, help="LoRA scale numerator (default: the rank)")
    p.add_argument("--seed", type=int, help="data-order seed (default: the parent run's)")
    p.add_argument("--log-every", type=int, help="log every k steps (default: the parent run's)")
    add_run_folder_flags(p, overwrite="allow writing into a folder that holds a run",
                         resume="continue a finetuning run in --out from its last checkpoint (same arguments as the "
                                "first call)",
                         skip_damaged="with --resume: start from the newest intact checkpoint when later ones are damaged")
    g = p.add_argument_group("Hugging Face BERT folder (relufication by distillation; its own command now: "
                             "gradsparse relufy HF_FOLDER takes these flags)")
    g.add_argument("--distill", action="store_true",
                   help="train the student to the frozen original (the objective of this route; implied)")
    add_distill_arguments(g)

_I32 = 2**31 - 1


def check_flags(args: argparse.Namespace) -> None:
    """Every numeric flag within its bounds (ValueError naming the flag), before anything is read."""
    check_int("--steps", args.steps, *INT_BOUNDS["steps"])
    check_int("--warmup", args.warmup, *INT_BOUNDS["warmup"])
    for name in ("t_up", "t_mix"):
        if getattr(args, name) is not None:
            check_int("--" + name.replace("_", "-"), getattr(args, name), 0, _I32)
    check_int("--lora-rank", args.lora_rank, 1, 2**16)
    if args.lora_alpha is not None:
        check_float("--lora-alpha", args.lora_alpha, 0, lo_open=True)
    check_float("--rho", args.rho, 0)
    check_float("--zeroth-bias-clip", args.zeroth_bias_clip, 0)
    if args.lr is not None:
        check_float("--lr", args.lr, 0, lo_open=True)
    if args.seed is not None:
        check_int("--seed", args.seed, *INT_BOUNDS["seed"])
    if args.log_every is not None:
        check_int("--log-every", args.log_every, *INT_BOUNDS["log_every"])


def source_run(ckpt: Path) -> Path | None:
    """The run folder a checkpoint file belongs to: RUN for RUN/checkpoints/step_*.eqx, the file's
    folder when that holds a run, else None (a loose checkpoint file)."""
    parent = ckpt.resolve().parent
    if parent.name == "checkpoints":
        return parent.parent
    return parent if run_contents(parent) else None


def refuse_out_in_source(out: Path, ckpt: Path) -> None:
    """ValueError when ``out`` is the parent checkpoint's run folder or lies inside it."""
    src, dst = source_run(ckpt), out.resolve()
    if src is not None and (dst == src or dst.is_relative_to(src)):
        where = "is" if dst == src else "lies inside"
        raise ValueError(f"--out {out} {where} the run folder {src} that holds the checkpoint being finetuned "
                         f"({ckpt}); choose a folder outside it")


_HF_ONLY = ("activation", "batch_size", "seq_len", "hidden_weight", "checkpoint_every")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def run_hf(args: argparse.Namespace) -> int:
    """The relufication route for a Hugging Face BERT folder: ``gradsparse relufy`` (its name now)."""
    for name, default in (("warmup", 0), ("lora_alpha", None), ("zeroth_bias_placement", "input")):
        if getattr(args, name) != default:
            raise ValueError(f"{_flag(name)} applies to a gradsparse checkpoint only, not to a Hugging Face folder")
    args.folder = args.checkpoint
    return relufy_command.run(args)


def run(args: argparse.Namespace) -> int:
    if is_hf_bert_folder(args.checkpoint):
        return run_hf(args)
    given = [_flag(n) for n in _HF_ONLY if getattr(args, n) is not None] + (["--distill"] if args.distill else [])
    if given:
        verb = "applies" if len(given) == 1 else "apply"
        raise ValueError(f"{', '.join(given)} {verb} to a Hugging Face BERT folder only; {args.checkpoint} is not "
                         "one (a folder with a config.json of model_type bert and model.safetensors)")
    mods = parse_modules(args.modules)
    check_flags(args)
    out: Path = args.out
    check_run_out(out, resume=args.resume, overwrite=args.overwrite, skip_damaged=args.skip_damaged)
    ckpt = resolve(args.checkpoint)
    refuse_out_in_source(out, ckpt)
    if not (args.overwrite or args.resume):
        check_out(out)  # early, before the checkpoint is read; the run folder checks again once it holds the lock
    if args.resume:
        stored = stored_config(out)
        if stored is not None and not stored.surgery:
            raise ValueError(f"--resume: {out} holds a run trained from scratch (its config.json records no "
                             "surgery); continue it with gradsparse train --out ... --resume")
    model, header = load_model(ckpt)
    cfg = TrainConfig.from_dict(header["config"])
    if cfg.surgery:
        raise ValueError(f"{ckpt} is already a finetuned checkpoint (modules {cfg.surgery.get('modules')}); "
                         "finetune its parent instead")
    half = max(1, args.steps // 2)
    changes = {"steps": args.steps, "warmup": args.warmup, "parent": str(ckpt)}
    for name in ("lr", "seed", "log_every"):
        if getattr(args, name) is not None:
            changes[name] = getattr(args, name)
    ft_cfg = cfg.replace(**changes)
    built, surgery = finetune_start(
        model, ft_cfg, zeroth_bias="zeroth_bias" in mods, restricted_ln="restricted_ln" in mods,
        jsrelu="jsrelu" in mods, noise=args.noise if "noise" in mods else "none", lora="lora" in mods,
        zeroth_bias_placement=args.zeroth_bias_placement, zeroth_bias_clip=args.zeroth_bias_clip,
        t_up=half if args.t_up is None else args.t_up, t_mix=half if args.t_mix is None else args.t_mix,
        rho=args.rho, noise_per=args.noise_per, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha)
    ft_cfg = ft_cfg.replace(surgery=surgery)
    ds = data.load_dataset(ft_cfg.data, seed=ft_cfg.seed, path=ft_cfg.data_path, n_train=ft_cfg.n_train,
                      n_test=ft_cfg.n_test)
    before = final_eval(built.model, ds, ft_cfg.seq_len, RunKeys.of(ft_cfg.seed).heldout)
    run_res = train(ft_cfg, out, dataset=ds, start=built, progress=not args.quiet and sys.stderr.isatty(),
                    resume=args.resume, skip_damaged=args.skip_damaged, overwrite=args.overwrite)
    if run_res.already_complete:
        print(f"{out}: the run is already complete ({ft_cfg.steps} steps); nothing to do")
        return 0
    f = run_res.final
    print(f"finetuned {ckpt} with modules [{', '.join(mods) or 'none'}]: {run_summary(f, ft_cfg.steps)}; "
          f"test accuracy {before['test_accuracy']:.3f} -> {f['test_accuracy']:.3f}; run folder {out}")
    return 0
