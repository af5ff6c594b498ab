"""Per-job seconds of a preset's run plan, measured without training the whole preset, and the
preset's projected wall time on k workers.

Every job family of the plan (a config without its seed and length: :func:`family`) is trained
for ``--short`` steps (cold: compiling), again for ``--short`` and for ``--long`` steps (a seed
group's seeds at once), in one process; the warm slope gives its seconds per step and the cold
run's remainder its fixed cost (compiling, data, the final evaluation). A job of the preset then costs intercept + slope x its steps, and
:func:`gradsparse.executors.critical_path` gives the serial, critical-path and k-worker wall times.
Prepared for a GPU machine (``benchmarks/gpu_executors.sh``); it runs on a CPU too (``--families``
limits the work).

    python benchmarks/preset_runtimes.py --preset full --out runs/preset_runtimes
"""

from __future__ import annotations

import common  # noqa: F401  (puts the checkout on sys.path)

import argparse
import json
import os
import tempfile
import time
from pathlib import Path


def family(job) -> str:
    d = {k: v for k, v in job.runs[0].config.items() if k not in ("seed", "steps")}
    return json.dumps({"config": d, "runs": len(job.runs), "finetune": job.runs[0].parent is not None},
                      sort_keys=True, default=str)


def time_job(job, steps: int, folder: Path) -> float:
    """Wall seconds of ``job`` trained for ``steps`` steps (a finetune: its parent trained first, not timed)."""
    from gradsparse.runplan import Job, RunSpec, run_job

    def short(r: RunSpec, parent: str | None) -> RunSpec:
        return RunSpec(r.name, {**r.config, "steps": steps, "log_every": min(r.config.get("log_every", 1), steps),
                                "flatness_every": min(r.config.get("flatness_every", 0), steps)},
                       parent=parent, data_seed=r.data_seed, loader=r.loader)

    parents = tuple(short(p, None) for p in job.parents)
    for p in parents:
        run_job(Job((p,)), folder)
    runs = tuple(short(r, parents[0].run_id if parents else None) for r in job.runs)
    t0 = time.time()
    run_job(Job(runs, parents), folder, force=True)
    return time.time() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="full", choices=("smoke", "quick", "standard", "full"))
    ap.add_argument("--short", type=int, default=40)
    ap.add_argument("--long", type=int, default=200)
    ap.add_argument("--families", type=int, default=0, help="time at most this many job families (0: all)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--out", type=Path, default=Path("runs/preset_runtimes"))
    args = ap.parse_args()

    import jax

    from gradsparse.executors import critical_path
    from theory_checks.protocol import PRESET_SEEDS
    from theory_checks.suite import get_checks, preset_run_plan

    seeds = list(range(PRESET_SEEDS[args.preset]))
    plan = preset_run_plan(get_checks(), args.preset, seeds)
    jobs = plan.jobs()
    fams: dict[str, object] = {}
    for j in jobs:
        fams.setdefault(family(j), j)
    # the families with the most work first: where the time budget ends, the largest jobs are timed
    ranked = sorted(fams.items(), key=lambda kv: -sum(j.steps for j in jobs if family(j) == kv[0]))
    todo = ranked[: args.families or None]
    rates: dict[str, tuple[float, float]] = {}
    t_all = time.time()
    with tempfile.TemporaryDirectory() as d:
        for i, (key, job) in enumerate(todo):
            cold = time_job(job, args.short, Path(d) / f"f{i}w")  # compiles (what a real job also pays once)
            a = time_job(job, args.short, Path(d) / f"f{i}a")
            b = time_job(job, args.long, Path(d) / f"f{i}b")
            slope = max(b - a, 0.0) / (args.long - args.short)
            rates[key] = (max(cold - slope * args.short, 0.0), slope)
            print(f"{i + 1}/{len(todo)} {job.label[:60]}: {cold:.1f} s cold / {a:.1f} s warm at {args.short} steps, "
                  f"{b:.1f} s at {args.long}; {slope * 1e3:.2f} ms/step", flush=True)
    secs = {j.label: rates[family(j)][0] + rates[family(j)][1] * int(j.runs[0].config["steps"])
            for j in jobs if family(j) in rates}
    res = {"preset": args.preset, "device": str(jax.devices()[0]), "load": os.getloadavg(), "jobs": len(jobs),
           "families": len(fams), "timed_families": len(todo), "timing_wall_s": round(time.time() - t_all, 1),
           "job_seconds": secs}
    if len(secs) == len(jobs):
        res["projection"] = {f"k={k}": critical_path(plan, secs, k) for k in args.workers}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"runtimes_{args.preset}.json").write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps({k: v for k, v in res.items() if k != "job_seconds"}, indent=1))


if __name__ == "__main__":
    main()
