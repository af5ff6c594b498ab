"""The ``gradsparse`` command line: one entry point, one module per subcommand.

Each subcommand lives in ``gradsparse/commands/<name>.py`` and exposes
``add_arguments(parser)`` and ``run(args) -> int``. User mistakes (``ValueError``,
``FileNotFoundError``) become a one-line message on stderr and exit code 2; nothing is written.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("gradsparse.commands.train", "train an MLP / ViT / byte LM with in-step sparsity monitors"),
    "check": ("gradsparse.commands.check", "run the theory checks (G1..G14) and write a report"),
    "spectrum": ("gradsparse.commands.spectrum", "per-layer singular-value table and spectrum figures"),
    "finetune": ("gradsparse.commands.finetune", "plug sparsity modules into a checkpoint and finetune it"),
    "figures": ("gradsparse.commands.figures", "regenerate the README figures from a quick run"),
    "bench": ("gradsparse.commands.bench", "run the benchmarks and write a markdown table"),
    "measure": ("gradsparse.commands.measure", "sparsity monitors of a pretrained Hugging Face encoder, per layer"),
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="gradsparse", description=__doc__.splitlines()[0])
    from gradsparse import __version__

    parser.add_argument("--version", action="version", version=f"gradsparse {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, (modname, help_) in COMMANDS.items():
        try:
            mod = importlib.import_module(modname)
        except ModuleNotFoundError as e:
            if e.name == modname:
                continue  # command not built yet
            raise
        p = sub.add_parser(name, help=help_, description=help_)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    from gradsparse.runtime import enable_compilation_cache

    enable_compilation_cache()
    try:
        return int(args._run(args) or 0)
    except (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError) as e:
        print(f"gradsparse {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gradsparse: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
