"""The report of a check run (report.md, report.json, series/) and the README figures drawn from it."""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from typing import Any, Sequence

from gradsparse.figures_spectra import FORMATS
from gradsparse.io import atomic_write_json, atomic_write_text, json_ready
from theory_checks.verdicts import fmt


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_markdown(results: Sequence[Any], meta: dict[str, Any]) -> str:
    """The report.md text for a list of :class:`theory_checks.protocol.CheckResult`."""
    counts = {v: sum(1 for r in results if r.verdict == v) for v in ("PASS", "FAIL", "INCONCLUSIVE")}
    crashed = [r for r in results if r.error]
    lines = [
        "# gradsparse theory checks",
        "",
        f"Preset **{meta['preset']}**, seeds {meta['seeds']}, {len(results)} check(s), wall time "
        f"{meta.get('wall_s', 0):.0f} s, started {meta.get('started', '')}. "
        f"PASS {counts['PASS']}, FAIL {counts['FAIL']}, INCONCLUSIVE {counts['INCONCLUSIVE']}"
        + (f", crashed {len(crashed)}" if crashed else "") + ".",
        "",
        "Verdicts come from the measured numbers by the rule stated in each check (see the details below); a "
        "verdict other than INCONCLUSIVE needs at least 3 seeds.",
        "",
        "| Claim | Prediction | Measured | Verdict | Figures |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in results:
        figs = " ".join(f"[{Path(f).stem}]({f})" for f in r.figures if f.endswith(".png")) or "-"
        verdict = f"**{r.verdict}** ({r.agree}/{r.n} seeds)" if not r.error else "**CRASHED**"
        lines.append(f"| {r.name} {_cell(r.title)} | {_cell(r.claim)} | {_cell(r.measured)} | {verdict} | {figs} |")
    lines += ["", "## Details", ""]
    for r in results:
        lines += [f"### {r.name}: {r.title}", "",
                  f"- Model: {r.model or 'see the check'}",
                  f"- Prediction: {r.claim}",
                  f"- Rule: {r.rule}",
                  f"- Verdict: **{r.verdict}**, {r.agree}/{r.n} seeds agree. {r.reason}",
                  f"- Measured: {r.measured}",
                  f"- Seeds: {r.seeds}; preset {r.preset}; {r.elapsed_s:.1f} s"]
        if r.error:
            lines.append(f"- CRASHED: traceback in `{r.slug}.error.txt`")
        for g in r.gates:
            lines.append(f"- Gate {g['name']}: {fmt(g['value'])} (needs {g['op']} {fmt(g['threshold'])}; "
                         f"{'met' if g['ok'] else 'NOT met'}){': ' + g['what'] if g.get('what') else ''}")
        for note in r.notes:
            lines.append(f"- Note: {note}")
        if r.parts:
            lines += ["", "| Part | Verdict | Agree | Reason |", "| --- | --- | --- | --- |"]
            for k, pv in r.parts.items():
                lines.append(f"| {_cell(k)} | {pv['verdict']} | {pv['agree']}/{pv['n']} | {_cell(pv['reason'])} |")
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


def write_report(out: Path, results: Sequence[Any], meta: dict[str, Any]) -> None:
    """report.md, report.json and series/<slug>.json, each written atomically."""
    atomic_write_text(out / "report.md", render_markdown(results, meta))
    atomic_write_json(out / "report.json", {**meta, "results": [r.to_dict() for r in results]})
    for r in results:
        if r.series:
            atomic_write_json(out / "series" / f"{r.slug}.json", json_ready(r.series), indent=None)


#: README figure name -> (check slug whose series it draws, what it shows)
README_FIGURES: dict[str, tuple[str, str]] = {
    "sparsity_weight_noise": ("g12_weight_noise_transformer",
                              "density over training of a small Transformer with and without weight noise"),
    "esd_key_mp": ("g07_spectral_concentration", "ESD of a trained key matrix against the Marchenko-Pastur law"),
    "modules_effect": ("g10_modules_from_scratch", "density and accuracy of each sparsity module vs vanilla"),
    "density_emergence": ("g03_sparsity_emerges", "density over training of the baseline residual MLP"),
}


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
    """Draw the README figures from a check report folder (its ``series/*.json``).

    Returns {figure name: written paths, or the reason it was skipped (series missing/empty)}.
    """
    out_dir = Path(out_dir)
    done: dict[str, list[Path] | str] = {}
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
    return done
