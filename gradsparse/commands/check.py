"""``gradsparse check``: run the theory checks (SPEC 5, G1..G21) and write a report.

Writes, into ``--out`` (default ``runs/check``), atomically and after every check (so an
interrupted run keeps what it finished):

- ``report.md``: a table (claim, prediction, measured, verdict, figures) and per-check details
  (rule, parts, per-seed numbers, notes);
- ``report.json``: the same as data (``results``: one object per check);
- ``series/<check>.json``: the data each check's figures are drawn from (``gradsparse figures``);
- ``figures/*.png`` (+ .pdf): the checks' figures; ``runs/``: the run folders of every training run;
- ``<check>.error.txt``: the traceback of a check that crashed (its report line says so).

Plan, execute, judge: the checks' pre-registered plans are written first (``plan.json``), the union
of their planned runs (``runs/runs.json``, each run once by config hash) is trained by an executor
(``--executor``: sequential, local worker processes, or a Ray cluster; :mod:`gradsparse.executors`),
then each check is judged from the finished run folders. ``--resume`` reuses the finished runs of a
suite that was interrupted; ``--judge DIR`` judges again without training.

A report already in ``--out`` is never lost. By default the new results are MERGED into it:
the results of checks not run now are kept, each check run now replaces its earlier result
(and the run folders under ``runs/`` that it trains again), and both the output and report.md
say which were kept and which replaced. Merging needs the same
preset and seeds (a smoke G2 beside a quick G1 would mix evidence with code-path tests): a
report with another preset or seeds, or one that cannot be read, is refused unless
``--overwrite`` is given, which starts a new report (the old report's series, error files and
figures are removed; run folders under ``runs/`` stay).

A smoke report says "smoke: a code-path test, not evidence" in its header and in every verdict.
Ctrl-C writes the report marked interrupted, listing the checks that did not run (exit 130).

Exit status: 0 when every check ran (whatever the verdicts), 1 when a check crashed, 2 bad
input, 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from gradsparse.commands import path_arg
from gradsparse.io import foreign_entries as io_foreign_entries

DEFAULT_OUT = Path("runs/check")
#: the most seeds one invocation may ask for
MAX_SEEDS = 1000
#: the most local worker processes
MAX_WORKERS = 256

#: wall seconds of each check at the quick preset (3 seeds; G10-G12 5) on 2 CPU cores with a warm
#: compilation cache, trained one run after the other (the sequential executor; 595 s in all for G1-G14,
#: load 0.1-1.5; G15 and G16 measured alone; G17-G21 from their jobs' seconds in one run of all 21 with
#: the local executor, 680 s at load 1.1-3.8). A check reuses the runs of the checks before it (G13 and
#: G14 the baselines of G3), so one alone can take longer.
QUICK_SECONDS = {"G1": 33, "G2": 8, "G3": 28, "G4": 47, "G5": 66, "G6": 15, "G7": 15, "G8": 3, "G9": 42,
                 "G10": 172, "G11": 72, "G12": 56, "G13": 9, "G14": 30, "G15": 80, "G16": 60,
                 "G17": 100, "G18": 5, "G19": 35, "G20": 30, "G21": 30}
#: a first run (empty compilation cache, datasets not yet generated) against a warm one, at quick, on the
#: same 2 CPU cores: 1705 s (compiling 660 s, running 1045 s; load 2.3-7.3) against 776 s (compiling 88 s,
#: running 688 s; load 2-3.4)
COLD_FACTOR = 2.2
#: the same with the local executor (2 workers compile in parallel and share the cache): 914 s cold (the jobs
#: compiled for 429 s) against 648 s warm (load 1.4-4.7)
COLD_FACTOR_LOCAL = 1.41
#: the whole quick preset's wall time, sequential / local executor (2 workers), in one run on 2 CPU cores:
#: 1222 s / 653 s (load 1.5-4.5; benchmarks/executor_speed.py)
LOCAL_SPEEDUP = 1.87


def check_number(name: str) -> int | None:
    """14 for 'G14', 'g14', '14', 'g14_lazy_neuron_controls'; None for a name that is no check number
    (parsed without importing the checks, so the first line can be printed at once)."""
    import re

    m = re.fullmatch(r"g?0*(\d{1,2})(_\w*)?", str(name).strip().lower())
    return int(m.group(1)) if m and 1 <= int(m.group(1)) <= len(QUICK_SECONDS) else None


def cache_is_cold() -> bool:
    """Whether JAX's persistent compilation cache (``gradsparse.runtime.compilation_cache_dir``) holds
    nothing yet: the run then compiles every executable."""
    from gradsparse.runtime import compilation_cache_dir

    folder = compilation_cache_dir()
    try:
        return not any(folder.iterdir())
    except OSError:
        return True


def expected_time(names: list[str], preset: str, cold: bool, executor: str = "sequential") -> str:
    """What a run of ``names`` (all when empty) is expected to cost, in words: at quick, the sum of
    :data:`QUICK_SECONDS` (times :data:`COLD_FACTOR` with a cold compilation cache, divided by
    :data:`LOCAL_SPEEDUP` with the local executor)."""
    if preset == "smoke":
        return "seconds per check (a code-path test)"
    if preset != "quick":
        return f"longer than the quick preset's {sum(QUICK_SECONDS.values()) / 60:.0f} min (no measured estimate)"
    nums = [check_number(n) for n in names] if names else list(range(1, len(QUICK_SECONDS) + 1))
    if any(n is None for n in nums):
        return f"unknown (a name that is not G1..G{len(QUICK_SECONDS)})"
    warm = sum(QUICK_SECONDS[f"G{n}"] for n in set(nums)) / 60 / (LOCAL_SPEEDUP if executor == "local" else 1.0)
    if cold:
        factor = COLD_FACTOR_LOCAL if executor == "local" else COLD_FACTOR
        return (f"about {warm * factor:.0f} min on 2 idle CPU cores, as this is a first run: the compilation "
                f"cache is empty (later runs about {max(warm, 1):.0f} min)")
    return f"about {max(warm, 1):.0f} min on 2 idle CPU cores (compilation cache warm)"


def _span(seeds: list[int]) -> str:
    return f"{seeds[0]}-{seeds[-1]}" if len(seeds) > 1 else str(seeds[0])


def announce(names: list[str], preset: str, seeds: list[int], out: Path, executor: str = "sequential",
             judge: bool = False) -> str:
    """The first line a check run prints (before JAX or the checks are imported): what runs, where
    the report goes, who trains, and what it is expected to cost."""
    which = ", ".join(names) if names else f"all {len(QUICK_SECONDS)} checks (G1-G{len(QUICK_SECONDS)})"
    if judge:
        return (f"gradsparse check: judging {which} again from the run folders in {out} (preset {preset}, seeds "
                f"{_span(seeds)}); nothing is trained")
    return (f"gradsparse check: {which}, preset {preset}, seeds {_span(seeds)}, report in {out}; runs trained by "
            f"the {executor} executor first, then each check judged; expected "
            f"{expected_time(names, preset, cache_is_cold(), executor)}; a line per check follows, each saying how "
            f"long it compiled and ran")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("names", nargs="*", metavar="NAME", help="checks to run (G1 ... G21, or slugs); default: all")
    p.add_argument("--preset", choices=("smoke", "quick", "standard", "full"), default="quick",
                   help="smoke: seconds per check, a code-path test, not evidence; quick (default): the whole "
                        "suite on 2 CPU cores, 3 seeds; standard: 5 seeds and the full protocols on 2 cores; full: "
                        "larger models and more steps (meant for a GPU)")
    p.add_argument("--out", type=path_arg, default=DEFAULT_OUT,
                   help=f"report folder (default {DEFAULT_OUT}); a report there is merged into (same preset and seeds)")
    p.add_argument("--seeds", type=int, default=None, metavar="N",
                   help=f"number of seeds (0..N-1, N <= {MAX_SEEDS}); default 3 (smoke, quick) or 5 (standard, full); "
                        "verdicts need >= 3")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the report in --out instead of merging into it")
    p.add_argument("--list", action="store_true", help="list the checks with their claims and exit")
    p.add_argument("--vmap-seeds", choices=("auto", "on", "off"), default="auto",
                   help="train the seeds of one config together with jax.vmap: auto (default) where that measured "
                        "faster (CPU: MLP width <= 64, byte LM width <= 32; any accelerator), on, or off (one seed "
                        "after the other); equal up to float rounding, and the report names the runs trained so")
    p.add_argument("--executor", choices=("sequential", "local", "ray"), default=None,
                   help="who trains the planned runs: sequential (this process, one after the other), local "
                        "(worker processes on this machine; the default where there are >= 2 cores or devices), or "
                        "ray (a Ray cluster: --ray-address; pip install 'gradsparse[cluster]')")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="local executor: worker processes (default: one per CPU core, or per accelerator)")
    p.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="ray executor: 'auto' (the cluster this machine belongs to) or HOST:PORT of its head; "
                        "default: a cluster of this machine's own, started and stopped by the command")
    p.add_argument("--resume", action="store_true",
                   help="continue the report in --out: finished runs whose config hash matches are reused, so only "
                        "the runs a crash or Ctrl-C interrupted are trained")
    p.add_argument("--judge", type=path_arg, default=None, metavar="DIR",
                   help="judge the checks again from the finished run folders in DIR (a report folder), training "
                        "nothing; the report in DIR is replaced")
    p.add_argument("--quiet", action="store_true", help="no progress bar or per-check lines")


def check_seeds(seeds: int | None, flag: str = "--seeds") -> None:
    """ValueError unless ``seeds`` is None or an int in [1, MAX_SEEDS]."""
    if seeds is not None and (isinstance(seeds, bool) or not isinstance(seeds, int) or not 1 <= seeds <= MAX_SEEDS):
        raise ValueError(f"{flag}: must be an integer, got {seeds!r}; allowed: [1, {MAX_SEEDS}]")


#: what ``gradsparse check --out DIR`` writes into DIR (anything else there is someone else's)
CHECK_OUTPUTS = ("plan.json", "report.json", "report.md", "runs", "series", "figures")


def foreign_entries(out: Path) -> list[str]:
    """The entries of folder ``out`` that a check report does not write (sorted names; [] for a
    missing or empty folder): the report files, ``runs/``, ``series/``, ``figures/``, a check's
    ``*.error.txt`` and the temp files of atomic writes (``.NAME.tmp``) are a report's own."""
    return io_foreign_entries(out, lambda p: p.name in CHECK_OUTPUTS or p.name.endswith(".error.txt"))


def _previous(out: Path, preset: str, seeds: list[int], overwrite: bool):
    """(meta, results) of the report in ``out`` to merge into, or (None, []) for a new report."""
    from theory_checks.report import read_report

    if overwrite:
        try:
            old = read_report(out)
        except ValueError:
            old = None
        for r in (old[1] if old else []):  # what the old report made and a new one would not replace
            for rel in [f"series/{r.slug}.json", f"{r.slug}.error.txt", *r.figures]:
                p = out / rel
                if p.is_file() and p.resolve().is_relative_to(out.resolve()):
                    p.unlink()
        return None, []
    try:
        old = read_report(out)
    except ValueError as e:
        raise ValueError(f"--out {out}: {e}; pass --overwrite to replace that report, or choose another "
                         "folder") from None
    if old is None:
        foreign = foreign_entries(out)
        if foreign:
            raise ValueError(f"--out {out} is not empty and holds no check report ({', '.join(foreign[:5])}"
                             f"{', ...' if len(foreign) > 5 else ''}); choose a fresh folder, or pass --overwrite to "
                             "write the report beside those files")
        return None, []
    meta, results = old
    if meta.get("preset") != preset or meta.get("seeds") != seeds:
        raise ValueError(f"--out {out} holds a report of preset {meta.get('preset')!r} with seeds {meta.get('seeds')}, "
                         f"this run is preset {preset!r} with seeds {seeds}; results are merged only at equal preset "
                         "and seeds: pass --overwrite to replace that report, or choose another folder")
    return meta, results


def stored_plan(folder: Path, flag: str) -> tuple[str, list[int]]:
    """(preset, seeds) of the check plan in ``folder/plan.json``; ValueError naming ``flag`` when
    there is none or it cannot be read."""
    import json

    path = folder / "plan.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        preset, seeds = data["preset"], data["seeds"]
    except FileNotFoundError:
        raise ValueError(f"{flag} {folder}: holds no check plan (plan.json); it is not a check report folder") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{flag} {folder}: plan.json is unreadable ({type(e).__name__}: {e})") from None
    if preset not in ("smoke", "quick", "standard", "full") or not isinstance(seeds, list) or not seeds:
        raise ValueError(f"{flag} {folder}: plan.json names preset {preset!r} and seeds {seeds!r}, not a valid plan")
    return preset, [int(x) for x in seeds]


def default_executor() -> str:
    """'local' where there are >= 2 CPU cores (measured 1.87x faster on the quick preset with 2 cores,
    the same numbers), else 'sequential'. Decided without importing JAX (the first line comes first)."""
    from gradsparse.executors import cpu_cores

    return "local" if cpu_cores() >= 2 else "sequential"


def _resolve(args: argparse.Namespace) -> tuple[str, list[int], Path]:
    """(preset, seeds, report folder) from the flags: --judge and --resume take them from the folder's plan."""
    if args.judge is not None and (args.resume or args.overwrite):
        raise ValueError("--judge re-judges an existing report folder; it takes neither --resume nor --overwrite")
    if args.resume and args.overwrite:
        raise ValueError("--resume continues the report in --out and --overwrite replaces it: choose one")
    if args.workers is not None and not 1 <= args.workers <= MAX_WORKERS:
        raise ValueError(f"--workers: got {args.workers}; allowed: [1, {MAX_WORKERS}]")
    if args.executor is None and (args.workers is not None or args.ray_address is not None):
        args.executor = "ray" if args.ray_address is not None else "local"
    if args.workers is not None and args.executor != "local":
        raise ValueError(f"--workers applies to --executor local, not {args.executor}")
    if args.ray_address is not None and args.executor != "ray":
        raise ValueError(f"--ray-address applies to --executor ray, not {args.executor}")
    folder = args.judge if args.judge is not None else args.out
    if args.judge is not None or args.resume:
        preset, seeds = stored_plan(folder, "--judge" if args.judge is not None else "--resume")
        if args.seeds is not None and args.seeds != len(seeds):
            raise ValueError(f"--seeds {args.seeds}: the report in {folder} has {len(seeds)} seeds")
        return preset, seeds, folder
    n = args.seeds if args.seeds is not None else (5 if args.preset in ("standard", "full") else 3)
    return args.preset, list(range(n)), folder


def _worker_compile_s(out: Path) -> float:
    """Seconds the executor's jobs spent compiling, as report.json records them (0 when unknown)."""
    import json

    try:
        return float(json.loads((out / "report.json").read_text(encoding="utf-8"))["execution"]["worker_compile_s"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0.0


def run(args: argparse.Namespace) -> int:
    if not args.list:  # the first line, at once: before the checks (and with them JAX's models) are imported
        check_seeds(args.seeds)
        preset, seeds, out = _resolve(args)
        executor = args.executor or default_executor()
        if not args.quiet:
            print(announce(list(args.names), preset, seeds, out, executor, judge=args.judge is not None),
                  file=sys.stderr, flush=True)
    # here, not at the top: the checks import the whole library, and `gradsparse --help` stays fast
    from theory_checks.suite import CompileClock, get_checks, run_checks, time_split

    checks = get_checks(args.names)
    if args.list:
        for c in checks:
            print(f"{c.name:4s} {c.title}: {c.claim}")
        return 0
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder")
    prev_meta, previous = _previous(out, preset, seeds, args.overwrite)
    if previous:
        now = {c.name for c in checks}
        kept = [r.name for r in previous if r.name not in now]
        replaced = [r.name for r in previous if r.name in now]
        verb = "judging again" if args.judge is not None else "re-running"
        print(f"merging into the report in {out}: keeping {', '.join(kept) or 'none'}; "
              f"{verb} and replacing {', '.join(replaced) or 'none'} (--overwrite starts a new report)")
    interactive = sys.stderr.isatty()
    t0 = time.time()
    with CompileClock() as clock:
        results, crashed = run_checks(checks, preset, out, seeds, progress=not args.quiet and interactive,
                                      echo=not args.quiet, previous=previous, previous_meta=prev_meta,
                                      vmap_seeds=args.vmap_seeds, clock=clock, executor=executor,
                                      workers=args.workers, ray_address=args.ray_address, resume=args.resume,
                                      judge_only=args.judge is not None)
    wall = time.time() - t0
    split = time_split(wall, *clock.since((t0, 0, 0)))
    if executor != "sequential" and args.judge is None:  # the workers' compiling is not this process's
        split = f"{split}; in the workers the jobs compiled for {_worker_compile_s(out):.0f} s"
    counts = {v: sum(1 for r in results if r.verdict == v and not r.error) for v in ("PASS", "FAIL", "INCONCLUSIVE")}
    merged = f" (merged: the report holds {len({r.name for r in [*previous, *results]})} checks)" if previous else ""
    smoke = " [smoke: a code-path test, not evidence]" if preset == "smoke" else ""
    print(f"{len(results)} check(s) in {wall:.0f} s ({split}): PASS {counts['PASS']}, FAIL {counts['FAIL']}, "
          f"INCONCLUSIVE {counts['INCONCLUSIVE']}" + (f", CRASHED {sum(1 for r in results if r.error)}" if crashed else "")
          + f"; report {out / 'report.md'}{merged}{smoke}")
    return 1 if crashed else 0
