"""The report of a check run (report.md, report.json, series/) and the README figures drawn from it.

``meta`` (written into report.json beside ``results``) carries the preset and seeds, and, when
set by :func:`theory_checks.suite.run_checks`: ``requested`` (the checks asked for in this
invocation), ``interrupted`` and ``not_run`` (what did not finish), ``replaced`` and ``kept``
(results of an earlier report in the same folder that this one replaced or kept), and
``started_of`` (when the run that produced each result started). report.md states all of them
in its header; a smoke preset is labelled :data:`SMOKE_NOTE` there and in every verdict line.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
from pathlib import Path
from typing import Any, Sequence

from gradsparse.figures_spectra import FORMATS
from gradsparse.io import atomic_write_json, atomic_write_text, json_ready
from theory_checks.protocol import CheckResult
from theory_checks.verdicts import fmt, holm_rejections

#: how a smoke-preset report labels itself and every verdict
SMOKE_NOTE = "smoke: a code-path test, not evidence"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _names(v: Any) -> str:
    return ", ".join(str(x) for x in v) if v else "none"


#: the note of a check whose runs had their seeds trained together (jax.vmap)
VMAP_NOTE = ("seeds trained together with jax.vmap (equal to one-at-a-time training up to float rounding; "
             "`--vmap-seeds off` trains them one at a time)")


def render_markdown(results: Sequence[Any], meta: dict[str, Any]) -> str:
    """The report.md text for a list of :class:`theory_checks.protocol.CheckResult`."""
    counts = {v: sum(1 for r in results if r.verdict == v) for v in ("PASS", "FAIL", "INCONCLUSIVE")}
    crashed = [r for r in results if r.error]
    smoke = meta.get("preset") == "smoke" or any(r.preset == "smoke" for r in results)
    lines = [
        "# gradsparse theory checks",
        "",
    ]
    if smoke:
        lines += [f"**{SMOKE_NOTE}**: the smoke preset runs each check for seconds to test that the code runs; "
                  "its verdicts say nothing about the claims.", ""]
    lines += [
        f"Preset **{meta['preset']}**, seeds {meta['seeds']}, {len(results)} check(s), wall time "
        f"{meta.get('wall_s', 0):.0f} s"
        + (f" (compiling {meta['compile_s']:.0f} s, running {max(meta.get('wall_s', 0) - meta['compile_s'], 0):.0f} s)"
           if isinstance(meta.get("compile_s"), (int, float)) else "")
        + f", started {meta.get('started', '')}. "
        f"PASS {counts['PASS']}, FAIL {counts['FAIL']}, INCONCLUSIVE {counts['INCONCLUSIVE']}"
        + (f", crashed {len(crashed)}" if crashed else "") + ".",
        "",
    ]
    together = [r.name for r in results if any(n.startswith(VMAP_NOTE) for n in r.notes)]
    if together:
        lines += [f"Seeds trained together with jax.vmap (`--vmap-seeds {meta.get('vmap_seeds', 'auto')}`) in the runs "
                  f"of {_names(together)}: equal to one-at-a-time training up to float rounding; each check's notes "
                  "name its runs, and `--vmap-seeds off` trains every seed alone.", ""]
    requested = meta.get("requested")
    not_run = meta.get("not_run") or []
    done = [n for n in (requested or []) if n not in not_run]
    if meta.get("interrupted"):
        lines += [f"**INTERRUPTED**: {len(done)} of {len(requested or [])} requested check(s) finished "
                  f"({_names(done)}); did not run: {_names(not_run)}.", ""]
    elif requested is not None and not_run:
        lines += [f"**INCOMPLETE**: {len(done)} of {len(requested)} requested check(s) finished ({_names(done)}); "
                  f"not run (yet, or the run was stopped): {_names(not_run)}.", ""]
    elif requested is not None:
        lines += [f"Requested in this run: {_names(requested)} (all finished).", ""]
    if meta.get("replaced") or meta.get("kept"):
        started_of = meta.get("started_of") or {}
        kept = [f"{n} (started {started_of.get(n, '?')})" for n in meta.get("kept") or []]
        lines += [f"Merged into the report that was in this folder: re-run and replaced "
                  f"{_names(meta.get('replaced'))}; kept from earlier runs {_names(kept)}.", ""]
    if meta.get("plan_sha256"):
        lines += [f"Pre-registered plan: `plan.json`, SHA-256 `{meta['plan_sha256']}`, written before the first "
                  "training run: every check's arms, seeds, parts (primary / context / implementation, with delta "
                  "and its source) and gates. Only primary parts decide a verdict.", ""]
    lines += [
        "Verdicts come from the measured numbers by the rule stated in each check (see the details below); a "
        "verdict other than INCONCLUSIVE needs at least 3 seeds. A PASS certifies the predicted sign at 5% (lower "
        "bound > 0) with a point estimate above delta; it does not certify an effect of at least delta.",
        "",
    ]
    theory = [r for r in results if getattr(r, "section", "theory") != "implementation"]
    impl = [r for r in results if getattr(r, "section", "theory") == "implementation"]
    for title, group in (("Theory evidence", theory), ("Implementation checks (identities: unit tests of the "
                                                       "measurement, not evidence for the theory)", impl)):
        if not group:
            continue
        lines += [f"## {title}", "", "| Claim | Prediction | Measured | Verdict | Figures |",
                  "| --- | --- | --- | --- | --- |"]
        for r in group:
            figs = " ".join(f"[{Path(f).stem}]({f})" for f in r.figures if f.endswith(".png")) or "-"
            verdict = f"**{r.verdict}** ({r.agree}/{r.n} seeds)" if not r.error else "**CRASHED**"
            if getattr(r, "near_boundary", None):
                verdict += f"; {r.near_boundary}"
            if r.preset == "smoke":
                verdict += f"; {SMOKE_NOTE}"
            lines.append(f"| {r.name} {_cell(r.title)} | {_cell(r.claim)} | {_cell(r.measured)} | {verdict} | {figs} |")
        lines.append("")
    lines += multiplicity_lines(theory)
    lines += ["## Details", ""]
    compile_of = meta.get("compile_s_of") or {}
    for r in results:
        lines += [f"### {r.name}: {r.title}", "",
                  f"- Model: {r.model or 'see the check'}",
                  f"- Prediction: {r.claim}",
                  f"- Rule: {r.rule}",
                  f"- Verdict: **{r.verdict}**, {r.agree}/{r.n} seeds agree. {r.reason}"
                  + (f" ({SMOKE_NOTE})" if r.preset == "smoke" else ""),
                  f"- Measured: {r.measured}",
                  f"- Seeds: {r.seeds}; preset {r.preset}; {r.elapsed_s:.1f} s"
                  + (f" (compiling {compile_of[r.name]:.1f} s)" if r.name in compile_of else "")]
        if r.error:
            lines.append(f"- CRASHED: traceback in `{r.slug}.error.txt`")
        for g in r.gates:
            lines.append(f"- Gate {g['name']}: {fmt(g['value'])} (needs {g['op']} {fmt(g['threshold'])}; "
                         f"{'met' if g['ok'] else 'NOT met'}){': ' + g['what'] if g.get('what') else ''}")
        for note in r.notes:
            lines.append(f"- Note: {note}")
        for name, why in (getattr(r, "primaries", None) or {}).items():
            lines.append(f"- Primary (pre-registered) {name}: {why}")
        if getattr(r, "unplanned", None):
            lines.append(f"- WARNING: runs trained that the plan did not declare: {_names(r.unplanned)}")
        if getattr(r, "near_boundary", None):
            lines.append(f"- Boundary (leave one seed out): {r.near_boundary}")
        if r.parts:
            lines += ["", "| Part | Role | Verdict | Agree | p_fail | Boundary | Reason |",
                      "| --- | --- | --- | --- | --- | --- | --- |"]
            for k, pv in r.parts.items():
                pf = fmt(pv["p_fail"]) if pv.get("p_fail") is not None and pv.get("kind") in ("effect", "margin") else "-"
                lines.append(f"| {_cell(k)} | {pv.get('role') or '-'} | {pv['verdict']} | {pv['agree']}/{pv['n']} | "
                             f"{pf} | {_cell(pv.get('near_boundary') or '-')} | {_cell(pv['reason'])} |")
        if r.per_seed:
            lines += ["", "| Per seed | " + " | ".join(f"seed {s}" for s in r.seeds) + " |",
                      "| --- | " + " | ".join("---" for _ in r.seeds) + " |"]
            for k, vals in r.per_seed.items():
                cells = [fmt(v) for v in vals] + [""] * (len(r.seeds) - len(vals))
                lines.append(f"| {_cell(k)} | " + " | ".join(cells) + " |")
        for f in r.figures:
            if f.endswith(".png"):
                lines += ["", f"![{Path(f).stem}]({f})"]
        lines.append("")
    return "\n".join(lines) + "\n"


def multiplicity_lines(theory: Sequence[Any], alpha: float = 0.05) -> list[str]:
    """The suite-level multiplicity statement: how many theory checks were decided, the expected
    number of false FAILs if every predicted effect were exactly its delta (each check's false-FAIL
    rate is at most ``alpha``, Holm within the check), and which FAILs survive Holm's correction
    across the checks (each failed check's smallest primary p_fail)."""
    decided = [r for r in theory if not r.error and r.parts]
    if not decided:
        return []
    pf: dict[str, float] = {}
    for r in decided:
        if r.verdict != "FAIL":
            continue
        ps = [pv["p_fail"] for pv in r.parts.values() if pv.get("role") == "primary" and pv["verdict"] == "FAIL"
              and pv.get("p_fail") is not None and pv.get("kind") in ("effect", "margin")]
        pf[r.name] = min(ps) if ps else 0.0
    k = len(decided)
    fails = list(pf)
    # Holm over all k decided checks (a check that did not fail enters with p = 1)
    rej = holm_rejections([pf[n] for n in fails] + [1.0] * (k - len(fails)), alpha)
    survive = [n for n, ok in zip(fails, rej) if ok]
    return ["## Multiplicity across the checks", "",
            f"{k} theory check(s) were decided, each at a false-FAIL rate of at most {alpha:g} when every predicted "
            f"effect is exactly its delta (Holm's correction over each check's primary parts). Across the suite the "
            f"expected number of false FAILs is at most {alpha * k:.2f}. FAILs that survive Holm's correction across "
            f"all {k} checks (family-wise {alpha:g}): {_names(survive)}"
            + (f"; FAILs that do not: {_names([n for n in fails if n not in survive])}" if fails else "") + ". "
            "A check's INCONCLUSIVE gate (regime not reached) is not evidence either way.", ""]


def write_report(out: Path, results: Sequence[Any], meta: dict[str, Any]) -> None:
    """report.md, report.json and series/<slug>.json, each written atomically."""
    atomic_write_text(out / "report.md", render_markdown(results, meta))
    extra = {"note": SMOKE_NOTE} if meta.get("preset") == "smoke" else {}
    atomic_write_json(out / "report.json", {**meta, **extra, "results": [r.to_dict() for r in results]})
    for r in results:
        if r.series:
            atomic_write_json(out / "series" / f"{r.slug}.json", json_ready(r.series), indent=None)


def read_report(out: str | os.PathLike) -> tuple[dict[str, Any], list[CheckResult]] | None:
    """(meta, results) of the report in ``out`` (its report.json), or None when there is none.

    ValueError when report.json is unreadable or not a report (or only report.md is there)."""
    out = Path(out)
    path = out / "report.json"
    if not path.exists():
        if (out / "report.md").exists():
            raise ValueError(f"{out} holds report.md but no report.json, so its results cannot be merged")
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"{path} is not readable JSON ({type(e).__name__}: {e})") from None
    fields = {f.name for f in dataclasses.fields(CheckResult)}
    need = fields - {"series", "error"}
    if not isinstance(data, dict) or not isinstance(data.get("results"), list):
        raise ValueError(f"{path} is not a gradsparse check report (no results list)")
    results = []
    for i, d in enumerate(data["results"]):
        if not isinstance(d, dict) or not need <= set(d):
            raise ValueError(f"{path}: result {i + 1} is not a check result (missing "
                             f"{sorted(need - set(d)) if isinstance(d, dict) else 'everything'})")
        results.append(CheckResult(**{k: v for k, v in d.items() if k in fields and k != "series"}))
    meta = {k: v for k, v in data.items() if k != "results"}
    return meta, results


#: README figure name -> (check slug whose series it draws, what it shows)
README_FIGURES: dict[str, tuple[str, str]] = {
    "sparsity_weight_noise": ("g12_weight_noise_transformer",
                              "density over training of a small Transformer with and without weight noise"),
    "esd_key_mp": ("g07_spectral_concentration", "ESD of a trained key matrix against the Marchenko-Pastur law"),
    "modules_effect": ("g10_modules_from_scratch", "density and accuracy of each sparsity module vs vanilla"),
    "density_emergence": ("g03_sparsity_emerges", "density over training of the baseline residual MLP"),
}


#: fields of a result the report digest leaves out: wall-clock times, which differ between runs of equal evidence
DIGEST_SKIP = ("elapsed_s",)
#: the record :func:`readme_figures` writes beside the figures: the digest of the report they were drawn from
FIGURES_RECORD = "figures.json"


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=True).encode("utf-8")


def report_digest(report_dir: str | os.PathLike) -> str:
    """SHA-256 (hex) of the evidence of the report in ``report_dir``: its preset, seeds, plan hash,
    every result of report.json without the wall-clock fields (:data:`DIGEST_SKIP`) and every
    ``series/*.json``, as canonical JSON (sorted keys). Two runs that measured the same numbers have
    the same digest whatever their timings; the README's table and figures name it."""
    import hashlib

    report_dir = Path(report_dir)
    path = report_dir / "report.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: no readable report ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("results"), list):
        raise ValueError(f"{path} is not a gradsparse check report (no results list)")
    series = {}
    for p in sorted((report_dir / "series").glob("*.json")):
        series[p.stem] = json.loads(p.read_text(encoding="utf-8"))
    doc = {"preset": data.get("preset"), "seeds": data.get("seeds"), "plan_sha256": data.get("plan_sha256"),
           "results": [{k: v for k, v in r.items() if k not in DIGEST_SKIP} for r in data["results"]],
           "series": series}
    return hashlib.sha256(_canonical(doc)).hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def load_series(report_dir: str | os.PathLike, slug: str) -> dict[str, Any]:
    """The series a check saved in ``report_dir/series/<slug>.json``."""
    p = Path(report_dir) / "series" / f"{slug}.json"
    if not p.is_file():
        raise FileNotFoundError(f"{p} does not exist (run `gradsparse check` with that check into {report_dir})")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{p} is not valid JSON ({e})") from None


def readme_figures(report_dir: str | os.PathLike, out_dir: str | os.PathLike,
                   formats: Sequence[str] = FORMATS) -> dict[str, list[Path] | str]:
    """Draw the README figures from a check report folder (its ``series/*.json``), and record where
    they come from in ``out_dir/figures.json`` (:data:`FIGURES_RECORD`): the report's digest
    (:func:`report_digest`), preset, seeds, plan hash and start, and per figure the series it was
    drawn from and the SHA-256 of every file written (a test compares the README's figures with it).

    Returns {figure name: written paths, or the reason it was skipped (series missing/empty)}.
    """
    out_dir = Path(out_dir)
    done: dict[str, list[Path] | str] = {}
    try:
        digest = report_digest(report_dir)
        meta = json.loads((Path(report_dir) / "report.json").read_text(encoding="utf-8"))
    except ValueError:
        digest, meta = None, {}
    for name, (slug, _) in README_FIGURES.items():
        try:
            ser = load_series(report_dir, slug)
        except FileNotFoundError as e:
            done[name] = f"skipped: {e}"
            continue
        if not ser:
            done[name] = f"skipped: {slug} saved no series (check not measured)"
            continue
        mod = importlib.import_module(f"theory_checks.{slug}")
        draw = getattr(mod, "readme_figure", None)
        if draw is None:
            done[name] = f"skipped: theory_checks.{slug} draws no README figure"
            continue
        done[name] = draw(ser, out_dir / name, formats)
    drawn = {name: paths for name, paths in done.items() if not isinstance(paths, str)}
    if drawn:
        record = {"report_digest": digest, "preset": meta.get("preset"), "seeds": meta.get("seeds"),
                  "plan_sha256": meta.get("plan_sha256"), "started": meta.get("started"),
                  "figures": {name: {"series": f"series/{README_FIGURES[name][0]}.json",
                                     "series_sha256": file_sha256(Path(report_dir) / "series"
                                                                  / f"{README_FIGURES[name][0]}.json"),
                                     "files": {Path(p).name: file_sha256(p) for p in paths}}
                              for name, paths in drawn.items()}}
        atomic_write_json(out_dir / FIGURES_RECORD, record)
    return done
