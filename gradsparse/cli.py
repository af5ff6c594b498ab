"""The ``gradsparse`` command line: one entry point, one module per subcommand.

Each subcommand lives in ``gradsparse/commands/<name>.py`` and exposes
``add_arguments(parser)`` and ``run(args) -> int``. Every failure a user can cause ends in ONE
line on stderr, never a traceback:

- ``ValueError`` (bad input, a folder that holds a run, a config that does not fit in memory):
  the message, exit 2; nothing is written;
- ``OSError`` (read-only file system, permission denied, disk full, a file where a folder is
  needed, a path under a pseudo-filesystem such as /proc): the path, the flag that chose it and
  what is wrong, exit 2 (:func:`os_error_line`);
- running out of memory anyway (``MemoryError``, XLA ``RESOURCE_EXHAUSTED``): exit 2;
- the loss or a gradient became NaN/inf (:class:`gradsparse.errors.TrainingDiverged`): one line
  naming the step and the layer, exit 3 (the log ends at the last good logged step, the last
  checkpoint is kept);
- Ctrl-C: what was kept and, for a run, the exact ``--resume`` command, exit 130.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import shlex
import sys

from gradsparse.errors import TrainingDiverged

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("gradsparse.commands.train", "train an MLP / ViT / byte LM with in-step sparsity monitors"),
    "check": ("gradsparse.commands.check", "run the theory checks (G1..G21) and write a report"),
    "spectrum": ("gradsparse.commands.spectrum", "per-layer singular-value table and spectrum figures"),
    "finetune": ("gradsparse.commands.finetune", "plug sparsity modules into a checkpoint and finetune it "
                 "(a Hugging Face BERT folder: see relufy)"),
    "relufy": ("gradsparse.commands.relufy", "relufy a pretrained Hugging Face BERT by distillation to its original"),
    "figures": ("gradsparse.commands.figures", "regenerate the README figures from a quick run"),
    "bench": ("gradsparse.commands.bench", "run the benchmarks and write a markdown table"),
    "measure": ("gradsparse.commands.measure", "sparsity monitors of a pretrained Hugging Face encoder, per layer"),
}

#: file systems that cannot hold gradsparse's files
PSEUDO_ROOTS = ("/proc", "/sys", "/dev")

_HINTS = {
    errno.EROFS: "choose a folder on a writable file system",
    errno.ENOSPC: "free some space (a training run continues with --resume)",
    errno.EDQUOT: "free some space (a training run continues with --resume)",
    errno.EACCES: "choose a folder you may write to",
    errno.EPERM: "choose a folder you may write to",
    errno.ENOTDIR: "a part of this path is a file, not a folder",
    errno.EEXIST: "a file is in the way where a folder is needed",
    errno.EISDIR: "a folder is in the way where a file is needed",
}


class _Parser(argparse.ArgumentParser):
    """One-line errors (exit 2), no prefix matching of long flags (``--step`` is not ``--steps``),
    and every flag's default in its help line."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # one line, exit 2
        self.exit(2, f"{self.prog}: error: {message}\n")


class _HelpFormatter(argparse.HelpFormatter):
    """Every option gets a line; one that takes a value says its default (when it has one)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.help is argparse.SUPPRESS:
            return text
        if action.option_strings and action.nargs != 0 and "(default" not in text and "%(default)" not in text:
            if action.default is not None and action.default is not argparse.SUPPRESS:
                text += (" " if text else "") + "(default: %(default)s)"
            else:
                text += (" " if text else "") + ("(required)" if action.required else "(default: none)")
        return text


def build_parser(commands: "set[str] | None" = None) -> argparse.ArgumentParser:
    """The parser; ``commands``: the subcommands whose modules to import (None: all of them).
    The others are listed with their one-line help only, so ``gradsparse --help`` imports nothing
    heavy."""
    parser = _Parser(prog="gradsparse", description=__doc__.splitlines()[0])
    from gradsparse import __version__

    parser.add_argument("--version", action="version", version=f"gradsparse {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, (modname, help_) in COMMANDS.items():
        if commands is not None and name not in commands:
            sub.add_parser(name, help=help_, description=help_)
            continue
        try:
            mod = importlib.import_module(modname)
        except ModuleNotFoundError as e:
            if e.name == modname:
                continue  # command not built yet
            raise
        p = sub.add_parser(name, help=help_, description=help_)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run, _parser=p)
    return parser


def _command_of(argv: list[str]) -> str | None:
    """The subcommand named in ``argv`` (the first word that is one), or None."""
    for a in argv:
        if a in COMMANDS:
            return a
        if not a.startswith("-"):
            return None
    return None


def unknown_flags_line(parser: argparse.ArgumentParser, extras: list[str]) -> str:
    """One line for arguments a subcommand does not know: each named, with the closest flag it
    has (difflib) when one is close."""
    import difflib

    known = [s for a in parser._actions for s in a.option_strings]  # argparse has no public list of flags
    bits = []
    for i, x in enumerate(extras):
        if not x.startswith("-") and i > 0 and extras[i - 1].startswith("-") and "=" not in extras[i - 1]:
            continue  # the value typed after an unknown flag
        flag = x.split("=", 1)[0]
        close = difflib.get_close_matches(flag, known, n=1, cutoff=0.6) if flag.startswith("-") else []
        bits.append(f"{x!s} (did you mean {close[0]}?)" if close else f"{x!s}")
    return (f"{parser.prog}: error: unrecognized argument{'s' if len(bits) > 1 else ''}: {', '.join(bits)}; "
            f"`{parser.prog} --help` lists every flag")


def short_usage(parser: argparse.ArgumentParser) -> str:
    """'usage: gradsparse train --out OUT [flags]': the required flags and positionals only."""
    need = []
    for a in parser._actions:
        if a.option_strings and a.required:
            need.append(f"{max(a.option_strings, key=len)} {a.metavar or a.dest.upper()}")
        elif not a.option_strings and a.dest not in ("help",) and not isinstance(a, argparse._SubParsersAction):
            need.append(a.metavar or a.dest.upper())
    return f"usage: {parser.prog} {' '.join(need)} [flags]".replace("  ", " ")


def _flags(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(flag as typed, value) of every path-like argument the user gave or defaulted to."""
    parser = getattr(args, "_parser", None)
    names: dict[str, str] = {}
    if parser is not None:
        for a in parser._actions:  # argparse keeps no public list of a parser's arguments
            if a.dest and a.dest not in names:
                names[a.dest] = max(a.option_strings, key=len) if a.option_strings else (a.metavar or a.dest.upper())
    out = []
    for dest, v in vars(args).items():
        if dest.startswith("_") or dest == "command":
            continue
        for item in (v if isinstance(v, list) else [v]):
            if isinstance(item, (str, os.PathLike)) and str(item):
                out.append((names.get(dest, "--" + dest.replace("_", "-")), str(item)))
    return out


def _inside(path: str, top: str) -> bool:
    p, t = os.path.abspath(path), os.path.abspath(top)
    return p == t or p.startswith(t.rstrip(os.sep) + os.sep)


def os_error_line(e: OSError, args: argparse.Namespace | None = None) -> str:
    """One line for an OSError: the flag and its value, the path, what is wrong, and a hint.

    The flag is the argument whose value is the path, contains it, or lies inside it (a parent
    folder that could not be made); without one only the path is named.
    """
    path = e.filename if e.filename is not None else e.filename2
    reason = e.strerror or str(e)
    if path is None or e.errno is None:
        return str(e).replace("\n", " ")
    path = os.fsdecode(path)
    flag = None
    if args is not None:
        cands = _flags(args)
        holding = [c for c in cands if _inside(path, c[1])]
        under = [c for c in cands if _inside(c[1], path)]
        if holding:
            flag = max(holding, key=lambda c: len(os.path.abspath(c[1])))
        elif under:
            flag = min(under, key=lambda c: len(os.path.abspath(c[1])))
    hint = _HINTS.get(e.errno, "")
    absolute = os.path.abspath(path)
    pseudo = next((r for r in PSEUDO_ROOTS if _inside(absolute, r)), None)
    if pseudo is not None and e.errno not in (errno.ENOSPC, errno.EDQUOT):
        hint = f"{pseudo} is a pseudo-filesystem of the kernel, which cannot hold these files; choose another folder"
    head = ""
    if flag is not None:
        head = f"{flag[0]} {flag[1]}: " if os.path.abspath(flag[1]) != absolute else f"{flag[0]} "
    line = f"{head}{path}: {reason}" + (f"; {hint}" if hint else "")
    return line.replace("\n", " ")


def resume_command(argv: list[str]) -> str:
    """The command line that continues an interrupted run: the same arguments, ``--resume``
    added and ``--overwrite`` left out."""
    tokens = [a for a in argv if a != "--overwrite"]
    if "--resume" not in tokens:
        tokens.append("--resume")
    return "gradsparse " + shlex.join(tokens)


def _interrupt_line(e: KeyboardInterrupt, argv: list[str]) -> str:
    msg = getattr(e, "message", None)
    if not isinstance(msg, str) or not msg:
        return "interrupted"
    if getattr(e, "resumable", False):
        msg += f"; continue with: {resume_command(argv)}"
    return msg.replace("\n", " ")


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, MemoryError) or (type(e).__name__ in ("XlaRuntimeError", "JaxRuntimeError")
                                          and "RESOURCE_EXHAUSTED" in str(e))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cmd = _command_of(argv)
    parser = build_parser({cmd} if cmd else set())
    args, extras = parser.parse_known_args(argv)
    if extras:
        sub = getattr(args, "_parser", None) or parser
        print(short_usage(sub), file=sys.stderr)
        print(unknown_flags_line(sub, extras), file=sys.stderr)
        return 2
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    from gradsparse.runtime import enable_compilation_cache

    enable_compilation_cache()
    name = f"gradsparse {args.command}"
    try:
        return int(args._run(args) or 0)
    except TrainingDiverged as e:
        print(f"{name}: stopped: {e}", file=sys.stderr)
        return 3
    except ValueError as e:
        print(f"{name}: error: {str(e).replace(chr(10), ' ')}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"{name}: error: {os_error_line(e, args)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"{name}: {_interrupt_line(e, argv)}", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - only running out of memory is turned into a line here
        if not _is_oom(e):
            raise
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        print(f"{name}: error: out of memory ({first}); use a smaller batch_size, eval_batch, seq_len, width or "
              "depth", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
