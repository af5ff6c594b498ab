"""The checks' executors on this machine: a preset's wall time with the sequential and the local
executor (the same command, one after the other, in one run), whether their reports agree, the Ray
executor's overhead per run on a local cluster, and a projection of the quick, standard and full
presets' wall time on k workers from the measured per-job times (the critical path of the plan's
parent -> finetune DAG, and a list schedule of the jobs on k workers).

    python benchmarks/executor_speed.py                        # quick preset, 2 local workers, + ray
    python benchmarks/executor_speed.py --preset smoke --no-ray --out /tmp/ex
    python benchmarks/executor_speed.py --ray-only

Writes OUT/executors.json and prints a markdown table. Not a test: minutes to an hour.
"""

from __future__ import annotations

import common  # noqa: F401  (puts the checkout on sys.path)

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def load() -> str:
    a, b, c = os.getloadavg()
    return f"{a:.1f}/{b:.1f}/{c:.1f}"


def run_suite(preset: str, out: Path, executor: str, workers: int | None) -> dict:
    cmd = [sys.executable, "-m", "gradsparse.cli", "check", "--preset", preset, "--out", str(out), "--overwrite",
           "--executor", executor, "--quiet"]
    if workers is not None:
        cmd += ["--workers", str(workers)]
    before = load()
    t0 = time.time()
    rc = subprocess.run(cmd, stdout=subprocess.DEVNULL).returncode
    wall = time.time() - t0
    rep = json.loads((out / "report.json").read_text())
    return {"executor": executor, "workers": workers or 1, "rc": rc, "wall_s": round(wall, 1), "load_before": before,
            "load_after": load(), "execution": rep.get("execution", {}),
            "per_seed": {r["name"]: r["per_seed"] for r in rep["results"]},
            "verdicts": {r["name"]: r["verdict"] for r in rep["results"]}}


def compare(a: dict, b: dict) -> dict:
    """How many per-seed numbers differ between two reports, and the largest relative difference."""
    n = differ = 0
    worst = 0.0
    for check, cols in a["per_seed"].items():
        for k, xs in cols.items():
            for x, y in zip(xs, b["per_seed"].get(check, {}).get(k, [])):
                n += 1
                if x != y and not (x != x and y != y):
                    differ += 1
                    worst = max(worst, abs(x - y) / max(abs(x), abs(y), 1e-30))
    return {"numbers": n, "differ": differ, "worst_rel": worst,
            "verdicts_equal": a["verdicts"] == b["verdicts"]}


def ray_overhead(n_runs: int) -> dict:
    """What the Ray executor adds per job on a local 1-CPU cluster (a head, no dashboard): the wall
    time of n tiny runs minus the seconds the jobs themselves took inside the workers, per job;
    the sequential executor's own remainder beside it (the same runs, this process)."""
    os.environ.update({"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"})
    import tempfile

    from ray.cluster_utils import Cluster

    from gradsparse.config import TrainConfig
    from gradsparse.executors import execute
    from gradsparse.runplan import RunPlan, RunSpec
    from gradsparse.runtime import enable_compilation_cache
    from theory_checks.suite import CHECK_LOADER

    enable_compilation_cache()  # as the commands and every worker have it
    tiny = TrainConfig(model="mlp", data="mnist1d", width=8, depth=1, mlp_ratio=2, batch_size=16, steps=12,
                       log_every=4, eval_batch=32, flatness_every=0, checkpoint_every=0, n_train=256, n_test=64)
    plan = RunPlan(RunSpec("tiny", tiny.replace(seed=s).to_dict(), data_seed=0, loader=CHECK_LOADER)
                   for s in range(n_runs))
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    out = {"runs": n_runs, "load": load()}
    try:
        with tempfile.TemporaryDirectory() as d:
            execute(plan, Path(d) / "warm", executor="sequential", progress=False, together=lambda c: False)
            for name, kw in (("sequential", {}), ("ray", {"ray_address": c.address})):
                r = execute(plan, Path(d) / name, executor=name, progress=False, together=lambda c: False, **kw)
                inside = sum(o.seconds for o in r.outcomes)
                out[name] = {"wall_s": r.wall_s, "jobs_s": round(inside, 2),
                             "overhead_per_job_s": round((r.wall_s - inside) / n_runs, 3)}
    finally:
        c.shutdown()
    return out


def _family(job) -> str:
    """A job's config without its seed and length: jobs of one family cost the same per step and run."""
    d = {k: v for k, v in job.runs[0].config.items() if k not in ("seed", "steps")}
    return json.dumps(d, sort_keys=True, default=str)


def projection(preset: str, measured_preset: str, seconds_of: dict[str, float], ks: list[int]) -> dict:
    """Projected wall time of ``preset`` on k workers from the per-job seconds measured at
    ``measured_preset`` (``seconds_of``: {job label: s}): a job's seconds are its family's measured
    seconds per step and run (:func:`_family`) times its steps and runs. Jobs of a family never
    measured are counted in ``unmeasured_jobs`` and left out."""
    from gradsparse.executors import critical_path
    from gradsparse.runplan import RunPlan
    from theory_checks.protocol import PRESET_SEEDS
    from theory_checks.suite import get_checks, preset_run_plan

    seeds = lambda p: list(range(PRESET_SEEDS[p]))  # noqa: E731
    rate: dict[str, float] = {}
    for j in preset_run_plan(get_checks(), measured_preset, seeds(measured_preset)).jobs():
        if j.label in seconds_of:
            rate[_family(j)] = seconds_of[j.label] / max(j.steps, 1)
    plan = preset_run_plan(get_checks(), preset, seeds(preset))
    jobs = plan.jobs()
    known = [j for j in jobs if _family(j) in rate]
    sub = RunPlan()
    for j in known:
        for r in j.runs:
            if r.parent is None or r.parent in sub.runs:
                sub.add(r)
    secs = {j.label: rate[_family(j)] * j.steps for j in known}
    secs = {j.label: secs[j.label] for j in sub.jobs() if j.label in secs}
    out = {"preset": preset, "from": measured_preset, "jobs": len(jobs), "unmeasured_jobs": len(jobs) - len(secs)}
    if secs and len(secs) == len(sub.jobs()):
        cp = {k: critical_path(sub, secs, k) for k in ks}
        out.update({"serial_s": cp[ks[0]]["serial"], "critical_s": cp[ks[0]]["critical"],
                    **{f"k={k}": cp[k]["projected"] for k in ks}})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="quick", choices=("smoke", "quick", "standard"))
    ap.add_argument("--out", type=Path, default=Path("runs/executor_speed"))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--no-ray", action="store_true")
    ap.add_argument("--ray-runs", type=int, default=12)
    ap.add_argument("--ray-only", action="store_true", help="only the Ray executor's overhead per job")
    args = ap.parse_args()
    if args.ray_only:
        print(json.dumps(ray_overhead(args.ray_runs), indent=1))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    res: dict = {"preset": args.preset, "cores": len(os.sched_getaffinity(0))}
    res["sequential"] = run_suite(args.preset, args.out / "sequential", "sequential", None)
    res["local"] = run_suite(args.preset, args.out / "local", "local", args.workers)
    res["speedup"] = round(res["sequential"]["wall_s"] / res["local"]["wall_s"], 2)
    res["identity"] = compare(res["sequential"], res["local"])
    if not args.no_ray:
        try:
            res["ray"] = ray_overhead(args.ray_runs)
        except ImportError:
            res["ray"] = "ray not installed (pip install 'gradsparse[cluster]')"
    secs = res["sequential"]["execution"].get("job_seconds", {})
    res["projection"] = [projection(p, args.preset, secs, [1, 2, 4, 8, 16])
                         for p in dict.fromkeys((args.preset, "standard", "full"))]
    for r in ("sequential", "local"):
        res[r] = {k: v for k, v in res[r].items() if k not in ("per_seed",)}
    (args.out / "executors.json").write_text(json.dumps(res, indent=1) + "\n")
    print(f"| preset | sequential | local ({args.workers} workers) | speedup | per-seed numbers differing | load |")
    print("|---|---|---|---|---|---|")
    s, loc = res["sequential"], res["local"]
    print(f"| {args.preset} | {s['wall_s']} s | {loc['wall_s']} s | {res['speedup']}x | {res['identity']['differ']} of "
          f"{res['identity']['numbers']} | {s['load_before']} -> {loc['load_after']} |")
    print(json.dumps({k: res[k] for k in ("ray", "projection") if k in res}, indent=1))


if __name__ == "__main__":
    main()
