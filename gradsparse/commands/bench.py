"""``gradsparse bench``: run the benchmark scripts and write one markdown table of their ratios.

Every ``benchmarks/bench_*.py`` (or the ones named with ``--only``) runs in its own subprocess,
one after the other, so that each measures on a quiet process. A script reports results as lines
``BENCH {"name": ..., "value": ..., "unit": ..., "target": ..., "note": ...}`` (see
``benchmarks/common.py``) or ``BENCH {"name": ..., "skipped": reason}``. A script that fails on a
missing optional dependency (``ModuleNotFoundError``) becomes a "skipped" row naming the module;
any other failure a "failed" row with the last line of its error output. Scripts that print no
``BENCH`` line contribute the lines that carry their ratios, verbatim (:func:`printed_ratios`).

The table (machine, versions, one row per ratio) is printed and, with ``--out``, written
atomically. Exit status: 0 when every script ran (skips included), 1 when one failed.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from gradsparse.commands import path_arg

PREFIX = "BENCH "
#: the longest --timeout per script (one week)
MAX_TIMEOUT_S = 7 * 24 * 3600.0
_X_RATIO = re.compile(r"\d(?:\.\d+)?x\b")


def default_dir() -> Path:
    """``benchmarks/`` of the source checkout this package lives in."""
    return Path(__file__).resolve().parents[2] / "benchmarks"


def discover(folder: Path) -> dict[str, Path]:
    """{name: path} of ``folder/bench_<name>.py``, sorted by name."""
    if not folder.is_dir():
        raise FileNotFoundError(f"benchmark folder {folder} does not exist (pass --dir)")
    return {p.stem[len("bench_"):]: p for p in sorted(folder.glob("bench_*.py"))}


def select(available: dict[str, Path], only: str | None) -> dict[str, Path]:
    """The scripts named in ``only`` (comma-separated; 'bench_' prefix and '.py' optional)."""
    if not available:
        raise FileNotFoundError("no benchmarks/bench_*.py scripts found")
    if only is None:
        return dict(available)
    names = [n.strip() for n in only.split(",") if n.strip()]
    if not names:
        raise ValueError("--only: give at least one benchmark name")
    chosen = {}
    for n in names:
        key = n.removesuffix(".py").removeprefix("bench_")
        if key not in available:
            raise ValueError(f"--only: unknown benchmark {n!r}; available: {', '.join(available)}")
        chosen[key] = available[key]
    return chosen


def machine_info() -> dict[str, str]:
    """CPU model, usable cores, OS, Python and library versions, jax devices."""
    from importlib.metadata import PackageNotFoundError, version

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    info = {"cpu": cpu, "cores": str(cores), "os": platform.platform(), "python": platform.python_version()}
    for dist in ("gradsparse", "jax", "jaxlib", "equinox", "optax", "numpy", "torch"):
        try:
            info[dist] = version(dist)
        except PackageNotFoundError:
            info[dist] = "not installed"
    try:
        import jax

        info["jax_devices"] = ", ".join(str(d) for d in jax.devices())
    except Exception as e:  # pragma: no cover - a broken jax install
        info["jax_devices"] = f"unavailable ({type(e).__name__})"
    return info


def parse_output(script: str, rc: int | None, stdout: str, stderr: str, timeout: float) -> list[dict[str, Any]]:
    """Rows for one script run (``rc`` None = timed out)."""
    rows: list[dict[str, Any]] = []
    for line in stdout.splitlines():
        if line.startswith(PREFIX):
            try:
                rec = json.loads(line[len(PREFIX):])
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and "name" in rec:
                rows.append({"script": script, **rec})
    if rc is None:
        rows.append({"script": script, "name": "(script)", "failed": f"timed out after {timeout:g} s"})
        return rows
    if rc != 0:
        m = re.search(r"ModuleNotFoundError: No module named '([^']+)'", stderr)
        if m:
            rows.append({"script": script, "name": "(script)",
                         "skipped": f"optional dependency '{m.group(1).split('.')[0]}' is not installed"})
        else:
            last = [ln for ln in stderr.strip().splitlines() if ln.strip()]
            rows.append({"script": script, "name": "(script)",
                         "failed": f"exit {rc}: {last[-1].strip() if last else 'no error output'}"})
        return rows
    if not rows:
        rows = [{"script": script, "name": "(printed)", "note": line, "raw": True} for line in printed_ratios(stdout)]
        if not rows:
            rows.append({"script": script, "name": "(script)", "note": "ran, printed no ratios"})
    return rows


def printed_ratios(stdout: str, limit: int = 60) -> list[str]:
    """Lines of a script that does not print ``BENCH`` records and that carry its ratios.

    Kept: lines with a ratio such as ``2.5x``; lines mentioning a ratio or a target next to a
    number; and whole tables whose header names a ratio column (up to the next blank line).
    """
    kept: list[str] = []
    in_table = False
    for raw in stdout.splitlines():
        line = raw.strip()
        if not line:
            in_table = False
            continue
        has_num = bool(re.search(r"\d", line))
        ratio_word = bool(re.search(r"ratio|target|speed-?up|overhead", line, re.IGNORECASE))
        if ratio_word and not has_num:  # a table header naming a ratio column
            in_table = True
            kept.append(line)
        elif in_table or _X_RATIO.search(line) or (ratio_word and has_num):
            kept.append(line)
        if len(kept) >= limit:
            break
    return kept


def _cell(v: Any) -> str:
    return str(v).replace("|", "\\|").replace("\n", " ")


def _value(r: dict[str, Any]) -> str:
    if r.get("raw"):
        return ""
    if "skipped" in r:
        return "skipped"
    if "failed" in r:
        return "FAILED"
    if r.get("raw") or "value" not in r:
        return ""
    v = float(r["value"])
    unit = r.get("unit", "")
    return f"{v:.3g}{unit}" if unit != "s" else f"{v:.3g} s"


def to_markdown(rows: list[dict[str, Any]], info: dict[str, str], *, command: str, elapsed: float) -> str:
    """The report: title, machine/versions table, one row per result."""
    when = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    out = ["# gradsparse benchmarks", "",
           f"Generated {when} by `{command}` in {elapsed:.0f} s. Values are ratios of medians measured in one "
           "run of each script (warm-up excluded); see benchmarks/README.md. 'load' is the machine's 1-minute "
           "load average when the value was measured: other processes on the cores distort timings.", "",
           "| machine | |", "| --- | --- |"]
    out += [f"| {_cell(k)} | {_cell(v)} |" for k, v in info.items()]
    out += ["", "| script | benchmark | value | target | met | load | note |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        met = "" if "met" not in r else ("yes" if r["met"] else "no")
        note = r.get("skipped") or r.get("failed") or r.get("note", "")
        load = "" if r.get("load") is None else f"{float(r['load']):.1f}"
        out.append(f"| {_cell(r['script'])} | {_cell(r['name'])} | {_value(r)} | {_cell(r.get('target', ''))} | "
                   f"{met} | {load} | {_cell(note)} |")
    return "\n".join(out) + "\n"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--only", metavar="NAMES", help="comma-separated benchmark names, e.g. monitors,torch "
                   "(bench_<name>.py; default: all)")
    p.add_argument("--out", type=path_arg, metavar="FILE.md", help="write the markdown table here (atomically)")
    p.add_argument("--dir", type=path_arg,
                   help="folder holding the bench_*.py scripts (default: the checkout's benchmarks/)")
    p.add_argument("--quick", action="store_true", help="fewer repeats and sizes (GRADSPARSE_BENCH_QUICK=1)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds allowed per script (default 1800)")
    p.add_argument("--list", action="store_true", help="list the benchmarks and exit")


def run(args: argparse.Namespace) -> int:
    from gradsparse.io import atomic_write_text

    folder = args.dir if args.dir is not None else default_dir()
    available = discover(folder)
    if args.list:
        print("\n".join(f"{n}\t{p}" for n, p in available.items()) or "(none)")
        return 0
    chosen = select(available, args.only)
    if not (0 < args.timeout <= MAX_TIMEOUT_S):
        raise ValueError(f"--timeout: must be a finite number of seconds, got {args.timeout}; "
                         f"allowed: (0, {MAX_TIMEOUT_S:g}]")
    if args.out is not None and args.out.is_dir():
        raise ValueError(f"--out {args.out} is a folder; give a file name such as bench.md")
    env = dict(os.environ)
    root = str(folder.resolve().parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if args.quick:
        env["GRADSPARSE_BENCH_QUICK"] = "1"
    rows: list[dict[str, Any]] = []
    t_all = time.time()
    failed = False
    for name, path in chosen.items():
        print(f"== {path.name}", flush=True)
        t0 = time.time()
        try:
            proc = subprocess.run([sys.executable, str(path)], cwd=root, env=env, capture_output=True, text=True,
                                  timeout=args.timeout)
            rc, so, se = proc.returncode, proc.stdout, proc.stderr
        except subprocess.TimeoutExpired as e:
            rc = None
            so = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            se = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
        sys.stdout.write(so)
        got = parse_output(path.name, rc, so, se, args.timeout)
        failed |= any("failed" in r for r in got)
        if any("failed" in r for r in got) and se.strip():
            sys.stderr.write(se[-3000:])
        rows += got
        print(f"   ({time.time() - t0:.0f} s)", flush=True)
    cmd = "gradsparse bench" + (f" --only {args.only}" if args.only else "") + (" --quick" if args.quick else "")
    md = to_markdown(rows, machine_info(), command=cmd, elapsed=time.time() - t_all)
    print()
    print(md, end="")
    if args.out is not None:
        atomic_write_text(args.out, md)
        print(f"wrote {args.out}")
    return 1 if failed else 0
