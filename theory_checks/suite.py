"""The registry of checks and running them: one check into a result, a list into a report folder."""

from __future__ import annotations

import datetime as _dt
import importlib
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Sequence

from tqdm.auto import tqdm

from gradsparse.io import atomic_write_bytes, atomic_write_text
from gradsparse.runfolder import versions
from gradsparse.runtime import CompileClock, enable_compilation_cache  # noqa: F401 - CompileClock is used from here too
from theory_checks.context import Context
from theory_checks.protocol import Check, CheckResult, Finding, Unavailable
from theory_checks.report import SMOKE_NOTE, VMAP_NOTE, write_report
from theory_checks.plan import judge, plan_bytes, plan_sha256
from theory_checks.verdicts import Verdict, gated

def time_split(wall: float, compile_s: float, compiled: int, cached: int) -> str:
    """'compiling 12.3 s (40 compiled, 7 from the cache), running 30.1 s' for a wall time."""
    bits = [f"{compiled} compiled"] if compiled else []
    if cached:
        bits.append(f"{cached} from the cache")
    return (f"compiling {compile_s:.1f} s" + (f" ({', '.join(bits)})" if bits else "")
            + f", running {max(wall - compile_s, 0.0):.1f} s")


def run_check(check: Check, ctx: Context, *, fig_dir: Path | None = None, plan: Any = None) -> CheckResult:
    """Run one check in ``ctx`` and package its result.

    :class:`Unavailable` becomes an INCONCLUSIVE result with its message; any other exception
    propagates (the command records it as a crash). Figures (when the check draws any and
    ``fig_dir`` is given) are written there; their paths are relative to ``ctx.out_dir``.
    """
    params = check.params(ctx.preset)
    if plan is None:  # the suite passes the plan it wrote to plan.json: the one judged is the one registered
        plan = check.make_plan(ctx.preset)
    if plan is not None and planned_seeds(plan, ctx.seeds) != list(ctx.seeds):
        ctx = ctx.with_seeds(planned_seeds(plan, ctx.seeds))
    t0 = time.time()
    mark = ctx.mark()
    unavailable = False
    try:
        finding = check.run(ctx, params)
    except Unavailable as e:
        unavailable = True
        finding = Finding(Verdict("INCONCLUSIVE", 0, len(ctx.seeds), str(e)), f"not measured: {e}")
    if not isinstance(finding, Finding):
        raise TypeError(f"check {check.name} returned {type(finding).__name__}, expected Finding")
    figs: list[str] = []
    if fig_dir is not None and check.figures is not None and finding.series:
        for p in check.figures(finding.series, fig_dir):
            p = Path(p)
            try:
                figs.append(str(p.relative_to(ctx.out_dir)) if ctx.out_dir is not None else str(p))
            except ValueError:
                figs.append(str(p))
    parts = dict(finding.parts)
    section, unplanned = "theory", []
    if plan is not None and not unavailable:
        v, parts = judge(plan, finding.parts, finding.gates)
        section = plan.section
        unplanned = ctx.unplanned_since(mark, plan)
    else:
        v = gated(finding.verdict, finding.gates)
        if plan is not None:
            section = plan.section
    together = ctx.vmapped_since(mark)
    notes = list(finding.notes)
    if together:
        notes.append(f"{VMAP_NOTE}: {', '.join(together)}")
    return CheckResult(
        name=check.name, slug=check.slug, title=check.title, claim=check.claim, rule=check.rule, preset=ctx.preset,
        seeds=list(ctx.seeds), verdict=v.verdict, agree=v.agree, n=v.n, reason=v.reason, measured=finding.measured,
        per_seed={k: [float(x) for x in vals] for k, vals in finding.per_seed.items()},
        numbers={k: float(x) for k, x in finding.numbers.items()},
        parts={k: p.to_dict() for k, p in parts.items()}, notes=notes, figures=figs,
        elapsed_s=round(time.time() - t0, 2), series=finding.series, gates=[g.to_dict() for g in finding.gates],
        model=finding.model, section=section, near_boundary=v.near_boundary, unplanned=unplanned,
        primaries={q.name: q.why for q in plan.parts if q.role == "primary"} if plan is not None else {})


def crash_result(check: Check, ctx: Context, exc: BaseException, elapsed: float) -> CheckResult:
    """The result recorded for a check that raised: verdict INCONCLUSIVE with ``error`` set."""
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return CheckResult(
        name=check.name, slug=check.slug, title=check.title, claim=check.claim, rule=check.rule, preset=ctx.preset,
        seeds=list(ctx.seeds), verdict="INCONCLUSIVE", agree=0, n=len(ctx.seeds),
        reason=f"crashed: {type(exc).__name__}: {exc}", measured="crashed (see error file)", per_seed={},
        numbers={}, parts={}, notes=[], figures=[], elapsed_s=round(elapsed, 2), error=tb)


#: the check modules, in claim order (G1..G21)
CHECK_MODULES = (
    "g01_identity", "g02_layernorm_norm", "g03_sparsity_emerges", "g04_flatness_together", "g05_sgd_noise",
    "g06_flat_region", "g07_spectral_concentration", "g08_kkt_bounds", "g09_isotropy_mp",
    "g10_modules_from_scratch", "g11_modules_finetune", "g12_weight_noise_transformer",
    "g13_derivative_vs_activation", "g14_lazy_neuron_controls", "g15_gd_vs_sgd", "g16_wd_update_mp",
    "g17_layernorm_ablation", "g18_gradient_leads", "g19_token_cancellation", "g20_flatness_robustness",
    "g21_derivative_stability",
)


def all_checks() -> list[Check]:
    """Every registered check, G1..G21."""
    return [importlib.import_module(f"theory_checks.{m}").CHECK for m in CHECK_MODULES]


def get_checks(names: Sequence[str] | None = None) -> list[Check]:
    """Checks by name ('G3', 'g3', 'g03', '3', or the slug), in claim order; all when empty.

    Raises ValueError naming the unknown names and the known ones.
    """
    checks = all_checks()
    if not names:
        return checks
    index: dict[str, Check] = {}
    for c in checks:
        num = int(c.name[1:])
        for alias in (c.name.lower(), f"g{num:02d}", str(num), c.slug.lower()):
            index[alias] = c
    wanted, unknown = [], []
    for n in names:
        c = index.get(str(n).strip().lower())
        if c is None:
            unknown.append(n)
        elif c not in wanted:
            wanted.append(c)
    if unknown:
        raise ValueError(f"unknown check(s) {unknown}; known: {', '.join(c.name for c in checks)}")
    return [c for c in checks if c in wanted]


class ChecksInterrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`run_checks`: the report was written, marked interrupted, listing the
    checks that did not run (``not_run``); ``message`` says so in one line."""

    def __init__(self, report: Path, not_run: list[str]):
        self.report, self.not_run = report, not_run
        self.message = (f"interrupted; {report} says so and lists the {len(not_run)} check(s) that did not run: "
                        f"{', '.join(not_run)}")
        super().__init__(self.message)


PLAN_FILE = "plan.json"


def planned_seeds(plan: Any, seeds: Sequence[int]) -> list[int]:
    """The seeds a check with ``plan`` runs on: ``seeds``, or 0..plan.seeds-1 where its plan asks
    for more (e.g. G10-G12's 5 at quick)."""
    n = plan.seeds or 0
    return list(range(n)) if n > len(seeds) else list(seeds)


def check_plans(checks: Sequence[Any], plans: dict[str, Any], seeds: Sequence[int]) -> dict[str, Any]:
    """{check name: its plan (``plans[name]``) as data, with the seeds it will use}."""
    out: dict[str, Any] = {}
    for c in checks:
        plan = plans.get(c.name)
        if plan is None:
            out[c.name] = {"plan": None, "seeds": list(seeds)}
            continue
        out[c.name] = {**plan.to_dict(), "seeds": planned_seeds(plan, seeds), "title": c.title, "claim": c.claim}
    return out


def write_plan(out: Path, checks: Sequence[Any], plans: dict[str, Any], preset: str, seeds: Sequence[int],
               keep: Sequence[str] = ()) -> dict[str, Any]:
    """Write ``out/plan.json`` (atomically, BEFORE any training): the pre-registered plan of every
    check about to run, plus the plans of the kept results of a report merged into (``keep``).
    Returns the plan data; :func:`theory_checks.plan.plan_sha256` of it is printed in report.md."""
    old: dict[str, Any] = {}
    path = out / PLAN_FILE
    if keep and path.is_file():
        try:
            old = json.loads(path.read_text(encoding="utf-8")).get("checks", {})
        except (OSError, ValueError, AttributeError):
            old = {}
    data = {"preset": preset, "seeds": list(seeds),
            "checks": {**{k: v for k, v in old.items() if k in keep}, **check_plans(checks, plans, seeds)}}
    atomic_write_bytes(out / PLAN_FILE, plan_bytes(data))
    return data


def _claim_order(name: str) -> int:
    try:
        return int(str(name)[1:])
    except ValueError:
        return 10**6


def _arm_label(check: Any, arm_name: str) -> str:
    """'g03-base': the folder prefix of a check's arm (letters, digits, '-', '_', '.')."""
    import re

    return re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{check.slug.split('_')[0]}-{arm_name}")[:60]


#: how the checks load a run's dataset (data seed 0, mnist1d from the disk cache): run specs name it
CHECK_LOADER = "theory_checks.context:load_data"


def checks_run_plan(checks: Sequence[Any], plans: dict[str, Any], seeds: Sequence[int]) -> Any:
    """The union of the checks' planned runs (:class:`gradsparse.runplan.RunPlan`): every arm of
    every check's plan x the check's seeds (:func:`planned_seeds` of ``seeds``), a finetune arm
    after its start arm, each run once (deduplicated by the hash of its full config and parent)."""
    from gradsparse.runplan import RunPlan, RunSpec

    rplan = RunPlan()
    for c in checks:
        plan = plans.get(c.name)
        if plan is None:
            continue
        arms = {a.name: a for a in plan.arms}
        done: dict[tuple[str, int], str] = {}

        def add(a: Any, s: int) -> str:
            if (a.name, s) not in done:
                parent = add(arms[a.start], s) if a.start is not None else None
                try:
                    spec = RunSpec(_arm_label(c, a.name), {**a.config, "seed": int(s)}, parent=parent, data_seed=0,
                                   loader=CHECK_LOADER)
                except ValueError as e:
                    raise ValueError(f"check {c.name}, arm {a.name}: {e}") from None
                done[(a.name, s)] = rplan.add(spec)
            return done[(a.name, s)]

        for a in plan.arms:
            for s in planned_seeds(plan, seeds):
                add(a, s)
    return rplan


def preset_run_plan(checks: Sequence[Any], preset: str, seeds: Sequence[int]) -> Any:
    """The run plan (:func:`checks_run_plan`) of ``checks`` at ``preset`` with ``seeds``, as
    :func:`run_checks` would train it (nothing is trained or written)."""
    return checks_run_plan(checks, {c.name: c.make_plan(preset) for c in checks}, seeds)


def run_checks(checks: Sequence[Any], preset: str, out: Path, seeds: list[int], *, progress: bool = True,
               echo: bool = True, previous: Sequence[CheckResult] = (), previous_meta: dict[str, Any] | None = None,
               vmap_seeds: str = "auto", clock: CompileClock | None = None, executor: str = "sequential",
               workers: int | None = None, ray_address: str | None = None, resume: bool = False,
               judge_only: bool = False) -> tuple[list[Any], bool]:
    """Plan, execute, judge: write the checks' plans (``plan.json``), train the union of their
    planned runs with ``executor`` (:func:`gradsparse.executors.execute`: "sequential", "local"
    with ``workers``, "ray" at ``ray_address``) into ``out/runs``, then judge each check from the
    finished run folders. Returns (results of this call, any_crashed). Writes the report after
    each check.

    ``resume``: finished run folders whose config hash matches are reused (without it every
    planned run is trained again). ``judge_only``: nothing is trained; a planned run missing from
    ``out/runs`` makes its check INCONCLUSIVE ("not in the run folders").
    ``previous``: the results of the report already in ``out`` (same preset and seeds; see
    :func:`theory_checks.report.read_report`): the report then MERGES them with this call's
    results — checks not run now are kept, each check run now replaces its earlier result (and
    the report says which were kept and which replaced). On Ctrl-C the report is written marked
    interrupted, listing the checks that did not run, and :class:`ChecksInterrupted` is raised.
    ``vmap_seeds`` ("auto", "on", "off"): :attr:`theory_checks.context.Context.vmap_seeds`.
    ``clock``: a :class:`CompileClock` to time compilation with (one is opened here otherwise); each
    check's line (``echo``) and report.json (``compile_s_of``, ``compile_s``) say how much of its wall
    time was compiling.
    """
    from gradsparse.executors import EXECUTORS, require_ray

    if executor not in EXECUTORS:
        raise ValueError(f"executor: got {executor!r}; allowed: {', '.join(EXECUTORS)}")
    if executor == "ray" and not judge_only:
        require_ray()  # before anything is written
    enable_compilation_cache()
    out.mkdir(parents=True, exist_ok=True)
    ctx = Context(preset=preset, seeds=seeds, out_dir=out, vmap_seeds=vmap_seeds, may_train=not judge_only)
    started = _dt.datetime.now().isoformat(timespec="seconds")
    meta: dict[str, Any] = {"preset": preset, "seeds": seeds, "started": started, "versions": versions(),
                            "wall_s": 0.0, "command": " ".join(sys.argv), "requested": [c.name for c in checks],
                            "vmap_seeds": vmap_seeds, "executor": "judge only" if judge_only else executor}
    plans = {c.name: c.make_plan(preset) for c in checks}
    meta["plan_sha256"] = plan_sha256(write_plan(out, checks, plans, preset, ctx.seeds,
                                                 keep=[r.name for r in previous]))
    rplan = checks_run_plan(checks, plans, ctx.seeds)
    ctx.index.update({rid: out / "runs" / spec.folder for rid, spec in rplan.runs.items()})
    earlier = {r.name: r for r in previous}
    prev_started = dict((previous_meta or {}).get("started_of") or {})
    started_of = {n: prev_started.get(n, (previous_meta or {}).get("started", "?")) for n in earlier}
    results: list[Any] = []
    crashed = False
    t0 = time.time()

    def report(interrupted: bool = False) -> None:
        done = {r.name: r for r in results}
        merged = sorted({**earlier, **done}.values(), key=lambda r: _claim_order(r.name))
        meta["wall_s"] = round(time.time() - t0, 1)
        meta["started_of"] = {**started_of, **{n: started for n in done}}
        if earlier:
            meta["replaced"] = [n for n in earlier if n in done]
            meta["kept"] = [n for n in earlier if n not in done]
        meta["interrupted"] = interrupted
        meta["not_run"] = [c.name for c in checks if c.name not in done]
        meta["trained_while_judging"] = list(ctx.trained_here)
        write_report(out, merged, meta)

    own_clock = clock is None
    clock = (clock or CompileClock()).__enter__() if own_clock else clock
    compile_of = dict((previous_meta or {}).get("compile_s_of") or {})
    compile_of = {n: v for n, v in compile_of.items() if n in earlier}
    bar = None
    try:
        if not judge_only:
            from gradsparse.executors import describe, execute

            say = (lambda m: tqdm.write(m, file=sys.stderr)) if echo else None
            ran = execute(rplan, out / "runs", executor=executor, workers=workers, ray_address=ray_address,
                          together=ctx.together, progress=progress, log=say, reuse=resume)
            meta["execution"] = {"executor": executor, "workers": ran.workers, "runs": len(rplan),
                                 "jobs_trained": len(ran.trained), "jobs_reused": len(ran.reused),
                                 "wall_s": ran.wall_s, "compile_s": round(clock.seconds(t0), 2),
                                 "worker_compile_s": round(sum(o.compile_s for o in ran.outcomes), 2),
                                 "job_compile_s": {o.label: o.compile_s for o in ran.outcomes if o.trained},
                                 "job_seconds": {o.label: o.seconds for o in ran.outcomes if o.trained}}
            if say is not None:
                say(f"runs done: {describe(ran)}; judging the checks from the run folders")
        bar = tqdm(total=len(checks), disable=not progress, desc=f"check ({preset})", unit="check",
                   dynamic_ncols=True)
        for check in checks:
            bar.set_postfix_str(check.name, refresh=True)
            t1 = time.time()
            mark = clock.mark()
            try:
                res = run_check(check, ctx, fig_dir=out / "figures", plan=plans[check.name])
            except Exception as e:  # a crash is recorded, the suite goes on
                crashed = True
                res = crash_result(check, ctx, e, time.time() - t1)
                atomic_write_text(out / f"{check.slug}.error.txt", res.error or "")
            comp_s, n_comp, n_cached = clock.since(mark)
            compile_of[res.name] = round(comp_s, 2)
            meta["compile_s_of"] = compile_of
            meta["compile_s"] = round(clock.seconds(t0), 2)
            results.append(res)
            report()
            if echo:
                msg = f"{res.name:4s} {('CRASHED' if res.error else res.verdict):12s} {res.agree}/{res.n}  " \
                      f"{res.elapsed_s:6.1f}s ({time_split(time.time() - t1, comp_s, n_comp, n_cached)})  " \
                      f"{res.measured}"
                if res.preset == "smoke":
                    msg = f"{msg[:400]}  [{SMOKE_NOTE}]"
                tqdm.write(msg[:460], file=sys.stderr)
            bar.update(1)
    except KeyboardInterrupt:
        report(interrupted=True)
        raise ChecksInterrupted(out / "report.md", meta["not_run"]) from None
    finally:
        if bar is not None:
            bar.close()
        if own_clock:
            clock.__exit__(None, None, None)
    return results, crashed
