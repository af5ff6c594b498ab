"""``gradsparse figures``: regenerate the README figures.

With ``--from DIR`` the figures are drawn from a finished ``gradsparse check`` report folder
(its ``series/*.json``); without it, the checks the figures need (G3, G7, G10, G12) are run first
in the chosen preset (default quick) into ``--work`` (default ``runs/figures``); a report
already there is merged into as ``gradsparse check`` does (``--overwrite`` replaces it).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from gradsparse.commands import path_arg
from gradsparse.commands.check import _previous, check_seeds


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=path_arg, default=Path("figures"), help="where the figures go (default figures/)")
    p.add_argument("--from", dest="source", type=path_arg, default=None,
                   help="a `gradsparse check` report folder to draw from (nothing is trained)")
    p.add_argument("--preset", choices=("smoke", "quick", "standard", "full"), default="quick",
                   help="preset of the checks run when --from is not given (default quick)")
    p.add_argument("--work", type=path_arg, default=Path("runs/figures"),
                   help="report folder for the checks run when --from is not given (default runs/figures)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a report in --work instead of merging into it")
    p.add_argument("--seeds", type=int, default=3, metavar="N", help="seeds of those checks (default 3)")
    p.add_argument("--no-pdf", action="store_true", help="PNG only")


def run(args: argparse.Namespace) -> int:
    # here, not at the top: the checks import the whole library, and `gradsparse --help` stays fast
    from theory_checks.report import README_FIGURES, readme_figures
    from theory_checks.suite import get_checks, run_checks

    source: Path | None = args.source
    if source is not None:
        if not source.is_dir():
            raise FileNotFoundError(f"--from {source} is not a folder (expected a `gradsparse check --out` folder)")
        if not (source / "series").is_dir():
            raise FileNotFoundError(f"{source} holds no series/ folder; run `gradsparse check --out {source}` first")
    else:
        check_seeds(args.seeds)
        if args.work.exists() and not args.work.is_dir():
            raise ValueError(f"--work {args.work} exists and is not a folder")
        seeds = list(range(args.seeds))
        prev_meta, previous = _previous(args.work, args.preset, seeds, args.overwrite)
        slugs = sorted({slug for slug, _ in README_FIGURES.values()})
        run_checks(get_checks(slugs), args.preset, args.work, seeds, progress=False, echo=True, previous=previous,
                   previous_meta=prev_meta)
        source = args.work
    formats = ("png",) if args.no_pdf else ("png", "pdf")
    done = readme_figures(source, args.out, formats)
    missing = 0
    for name, res in done.items():
        if isinstance(res, str):
            missing += 1
            print(f"{name}: {res}")
        else:
            print(f"{name}: " + ", ".join(str(p) for p in res))
    return 1 if missing == len(done) else 0
