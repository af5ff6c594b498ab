"""``gradsparse figures``: draw the README figures into a folder of the user's (default ``runs/figures``).

With ``--from DIR`` the figures are drawn from a finished ``gradsparse check`` report folder
(its ``series/*.json``); without it, the checks the figures need (G3, G7, G10, G12) are trained
first in the chosen preset (default quick) into ``--work`` (default ``runs/figures/check``); a
report already there is merged into as ``gradsparse check`` does (``--overwrite`` replaces it).
The first line (stderr, at once) says what will be trained, for about how long, and where
everything goes. Beside the figures, ``figures.json`` records the digest of the report they were
drawn from (:func:`theory_checks.report.report_digest`), so figures and a report's table can be
matched. The repository's own ``figures/`` is written only when asked for: ``--out figures``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gradsparse.commands import path_arg
from gradsparse.io import foreign_entries
from gradsparse.commands.check import QUICK_SECONDS, _previous, cache_is_cold, check_seeds, expected_time

DEFAULT_OUT = Path("runs/figures")
DEFAULT_WORK = DEFAULT_OUT / "check"
#: the checks whose series the README figures draw (theory_checks.report.README_FIGURES), by name
NEEDED = ("G3", "G7", "G10", "G12")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=path_arg, default=DEFAULT_OUT,
                   help=f"where the figures go (default {DEFAULT_OUT}; `--out figures` rewrites the repository's)")
    p.add_argument("--from", dest="source", type=path_arg, default=None,
                   help="a `gradsparse check` report folder to draw from (nothing is trained)")
    p.add_argument("--preset", choices=("smoke", "quick", "standard", "full"), default="quick",
                   help="preset of the checks run when --from is not given (default quick)")
    p.add_argument("--work", type=path_arg, default=DEFAULT_WORK,
                   help=f"report folder for the checks run when --from is not given (default {DEFAULT_WORK})")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a report in --work instead of merging into it")
    p.add_argument("--seeds", type=int, default=3, metavar="N", help="seeds of those checks (default 3)")
    p.add_argument("--no-pdf", action="store_true", help="PNG only")


def announce(args: argparse.Namespace) -> str:
    """The first line of the command: what it draws from or trains, for about how long, and where."""
    if args.source is not None:
        return f"gradsparse figures: drawing the README figures from the report in {args.source} into {args.out}"
    return (f"gradsparse figures: no --from report given, so first training the checks the figures need "
            f"({', '.join(NEEDED)}; preset {args.preset}, {args.seeds} seeds) into {args.work}: "
            f"{expected_time(list(NEEDED), args.preset, cache_is_cold())}; then drawing the figures into {args.out}. "
            f"`--from DIR` draws from a finished `gradsparse check` report instead")


def foreign_figure_entries(out: Path, work: Path | None = None) -> list[str]:
    """The entries of folder ``out`` that are not figures (sorted names; [] for a missing folder):
    PNG and PDF files, ``figures.json``, the temp files of atomic writes and the ``--work`` report
    folder when it lies in ``out`` are a figure folder's own."""
    own_work = work.resolve() if work is not None else None
    return foreign_entries(out, lambda e: (e.is_file() and e.suffix.lower() in (".png", ".pdf"))
                           or e.name == "figures.json" or (own_work is not None and e.resolve() == own_work))


def run(args: argparse.Namespace) -> int:
    if args.source is None:
        check_seeds(args.seeds)
    if args.out.exists() and not args.out.is_dir():
        raise ValueError(f"--out {args.out} exists and is not a folder")
    foreign = foreign_figure_entries(args.out, args.work if args.source is None else None)
    if foreign:
        raise ValueError(f"--out {args.out} holds files that are not figures ({', '.join(foreign[:5])}"
                         f"{', ...' if len(foreign) > 5 else ''}); choose a fresh folder for the figures")
    print(announce(args), file=sys.stderr, flush=True)  # at once: before the checks (and JAX's models) load
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
