"""``gradsparse check``: run the theory checks (SPEC 5, G1..G14) and write a report.

Writes, into ``--out`` (default ``runs/check``), atomically and after every check (so an
interrupted run keeps what it finished):

- ``report.md``: a table (claim, prediction, measured, verdict, figures) and per-check details
  (rule, parts, per-seed numbers, notes);
- ``report.json``: the same as data (``results``: one object per check);
- ``series/<check>.json``: the data each check's figures are drawn from (``gradsparse figures``);
- ``figures/*.png`` (+ .pdf): the checks' figures; ``runs/``: the run folders of every training run;
- ``<check>.error.txt``: the traceback of a check that crashed (its report line says so).

Exit status: 0 when every check ran (whatever the verdicts), 1 when a check crashed.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

DEFAULT_OUT = Path("runs/check")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("names", nargs="*", metavar="NAME", help="checks to run (G1 ... G14, or slugs); default: all")
    p.add_argument("--preset", choices=("smoke", "quick", "standard", "full"), default="quick",
                   help="smoke: seconds per check, a code-path test, not evidence; quick (default): the whole "
                        "suite in under 15 min on 2 CPU cores, 3 seeds; standard: 5 seeds and the full protocols, "
                        "under 90 min on 2 cores; full: larger models and more steps (meant for a GPU)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"report folder (default {DEFAULT_OUT})")
    p.add_argument("--seeds", type=int, default=None, metavar="N",
                   help="number of seeds (0..N-1); default 3 (smoke, quick) or 5 (standard, full); verdicts "
                        "need >= 3")
    p.add_argument("--list", action="store_true", help="list the checks with their claims and exit")
    p.add_argument("--quiet", action="store_true", help="no progress bar or per-check lines")


def run(args: argparse.Namespace) -> int:
    # here, not at the top: the checks import the whole library, and `gradsparse --help` stays fast
    from theory_checks.suite import get_checks, run_checks

    checks = get_checks(args.names)
    if args.list:
        for c in checks:
            print(f"{c.name:4s} {c.title}: {c.claim}")
        return 0
    if args.seeds is not None and args.seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {args.seeds}")
    n = args.seeds if args.seeds is not None else (5 if args.preset in ("standard", "full") else 3)
    out: Path = args.out
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder")
    interactive = sys.stderr.isatty()
    t0 = time.time()
    results, crashed = run_checks(checks, args.preset, out, list(range(n)), progress=not args.quiet and interactive,
                                  echo=not args.quiet)
    counts = {v: sum(1 for r in results if r.verdict == v and not r.error) for v in ("PASS", "FAIL", "INCONCLUSIVE")}
    print(f"{len(results)} check(s) in {time.time() - t0:.0f} s: PASS {counts['PASS']}, FAIL {counts['FAIL']}, "
          f"INCONCLUSIVE {counts['INCONCLUSIVE']}" + (f", CRASHED {sum(1 for r in results if r.error)}" if crashed else "")
          + f"; report {out / 'report.md'}")
    return 1 if crashed else 0
