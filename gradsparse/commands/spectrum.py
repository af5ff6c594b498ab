"""``gradsparse spectrum PATH``: per-matrix singular-value table and spectrum figures of any model.

Input (read by :mod:`gradsparse.weights`): a gradsparse run folder (its latest checkpoint; with
several checkpoints the ratio / near-zero-rate vs step figures are drawn from up to
``--max-checkpoints`` of them) or checkpoint file; a ``.npz`` file of named arrays (3-D arrays are
split per layer); a ``.safetensors`` file or a sharded ``model.safetensors.index.json``; a Hugging
Face model folder (``config.json`` + ``model.safetensors``, its index, or ``pytorch_model.bin``);
a PyTorch state dict ``.bin``/``.pt``/``.pth`` (needs torch; ``weights_only=True``). Matrices are
taken as ``(out, in)`` (GPT-2 Conv1D weights transposed, fused ``c_attn`` split into q/k/v);
non-float and 1-D tensors are skipped and listed; ``--select`` keeps the matrices whose name
matches a regex, ``--role ROLE=REGEX`` labels a model's own naming.

Output: the table, the skipped tensors and a per-role summary on stdout (with ``--json``: a JSON
array of rows and nothing else; ``--json --meta``: ``{"metadata", "summary", "rows"}`` with the unit
conventions); ``--csv FILE`` writes the rows as CSV. Unless ``--no-figures``, ``spectrum.json`` (the
document form) and the figures go to ``--out`` (default: ``RUN_DIR/spectrum``; for a .npz or
checkpoint file, ``spectrum/`` next to it or next to the run folder of a ``checkpoints/`` file; for
a foreign model, ``./spectrum_<name>`` in the current folder, never inside the model's folder):

* ``esd_<name>.png/.pdf`` per matrix (ESD of ``W W^T / N`` with the MP fit and the MP law at
  ``c = min/max`` of its shape) and ``esd_pl_<name>`` (log-log ESD of ``s^2`` with the fitted power
  law and ``xmin``) when there are at most ``--max-esd`` matrices or no layer indices;
* with at least two layer indices: ``esd_role_<role>`` (per role, one panel per matrix, fitted MP
  law, spikes marked), ``esd_pl_role_<role>`` (the same matrices, log-log, power law) and
  ``ratio_vs_depth``, ``mass80_ratio_vs_depth``, ``stable_rank_vs_depth``, ``alpha_vs_depth``;
* with several checkpoints: ``ratio_vs_step``, ``mass80_ratio_vs_step``, ``near_zero_rate_vs_step``,
  ``alpha_vs_step`` (the power-law fit of every checkpoint's matrices).

Columns: the singular-value columns, the MP fit (``num_spikes`` left empty where ``fit_ok`` is
false), the power-law (HT-SR) columns of WeightWatcher's default analysis (``alpha``,
``alpha_weighted``, ``log_alpha_norm``, ``xmin``, ``pl_ks``, ``num_pl_evals``, ``pl_fit_ok``) and,
with ``--randomize``, correlation traps (``num_traps``, ``rand_distance``; entries shuffled with
``--seed``). ``--no-fit`` skips the MP and power-law fits.

Exit 2 (one line) for input that cannot be read: a damaged or truncated file (named, with its size
and what its header needs; none of its bytes are shown), a name in a sharded index that leaves its
folder, a symlink loop, a relufication run folder (the commands for it are named); also when no
matrix could be analysed, and when a matrix could not be read unless ``--allow-unreadable`` (then
its row says why). A damaged earlier checkpoint of a run is left out of the vs-step figures and
named on stderr.

Last, on stderr: the whole command's time and where it went (start-up: Python and the imports before
the command runs; opening; reading and analysis; output; figures, usually most of it: ``--no-figures``
skips them, ``--formats png`` halves them).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import time
from pathlib import Path

import numpy as np

from gradsparse import spectra, weights
from gradsparse.io import atomic_write_text


def _role_pattern(text: str) -> tuple[str, str]:
    role, sep, rx = text.partition("=")
    if not sep or not rx:
        raise argparse.ArgumentTypeError(f"expected ROLE=REGEX, got {text!r}")
    if role not in weights.ROLES:
        raise argparse.ArgumentTypeError(f"unknown role {role!r} (choose from {', '.join(weights.ROLES)})")
    try:
        re.compile(rx)
    except re.error as e:
        raise argparse.ArgumentTypeError(f"{rx!r} is not a regular expression ({e})") from None
    return role, rx


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", metavar="PATH",
                        help="run folder, checkpoint (.eqx), .npz, .safetensors, model.safetensors.index.json, "
                             "Hugging Face model folder, or PyTorch .bin/.pt (needs torch)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    parser.add_argument("--meta", action="store_true",
                        help="with --json: print {metadata (units, conventions, skipped), summary, rows}")
    parser.add_argument("--csv", metavar="FILE", default=None, help="also write the rows as CSV to FILE")
    parser.add_argument("--out", metavar="DIR", default=None,
                        help="folder for figures and spectrum.json (default: RUN_DIR/spectrum; "
                             "./spectrum_<name> for a foreign model)")
    parser.add_argument("--select", metavar="REGEX", default=None,
                        help="analyse only matrices whose name matches REGEX (re.search)")
    parser.add_argument("--role", metavar="ROLE=REGEX", type=_role_pattern, action="append", default=[],
                        help=f"label names matching REGEX as ROLE ({', '.join(weights.ROLES)}); repeatable, "
                             "tried before the built-in naming rules")
    parser.add_argument("--layout", choices=weights.LAYOUTS, default="auto",
                        help="matrix layout: auto (detect GPT-2 Conv1D), linear (out, in) as stored, conv1d (transpose)")
    parser.add_argument("--rtol", type=float, default=None,
                        help="non-zero singular values: s > rtol * s_max (default: max(shape) * eps(dtype))")
    parser.add_argument("--route", choices=spectra.ROUTES, default="auto",
                        help="singular values via the float64 Gram matrix, gesdd svdvals, or auto (default)")
    parser.add_argument("--no-fit", action="store_true",
                        help="skip the Marchenko-Pastur and power-law fit columns")
    parser.add_argument("--randomize", action="store_true",
                        help="correlation traps: shuffle each matrix's entries, fit MP to the shuffled ESD, "
                             "count its spikes (num_traps) and the distance to the ESD (rand_distance)")
    parser.add_argument("--seed", type=int, default=0,
                        help="with --randomize: seed of the jax PRNG key that shuffles the entries (default 0)")
    parser.add_argument("--alpha", type=float, default=0.05,
                        help="false-positive rate of the Tracy-Widom spike test (default 0.05)")
    parser.add_argument("--ks-max", type=float, default=None,
                        help="KS bound of fit_ok (default: max(0.05, 5 / bulk size))")
    parser.add_argument("--no-figures", action="store_true", help="print only; write no figures or spectrum.json")
    parser.add_argument("--max-esd", type=int, default=16,
                        help="per-matrix ESD figures only for models with at most this many matrices (default 16)")
    parser.add_argument("--formats", default="png,pdf",
                        help="figure formats, comma-separated, from png, pdf, svg (default png,pdf)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--max-checkpoints", type=int, default=20,
                        help="checkpoints used for the vs-step figures, evenly spaced (default 20)")
    parser.add_argument("--allow-unreadable", action="store_true",
                        help="list matrices that cannot be read (damaged file, not enough memory) as rows with an "
                             "error and exit 0; without it they make the command fail (exit 2)")


def _relufication_run(path: Path) -> None:
    """ValueError naming the right commands when ``path`` is a relufication run or one of its
    checkpoints (its checkpoints hold a relufied BERT, not a model the factory rebuilds)."""
    from gradsparse.runfolder import continue_command, run_kind

    parent = path.resolve().parent
    run = path if path.is_dir() else parent.parent if parent.name == "checkpoints" else None
    kind = run_kind(run) if run is not None else None
    if kind is None or kind[0] != "relufication":
        return
    model = kind[1] or "HF_FOLDER"
    raise ValueError(f"{path} is a relufication run (gradsparse relufy); spectrum reads training runs and model files, "
                     f"not a relufied BERT's checkpoints: for the spectra of the model it started from run "
                     f"gradsparse spectrum {model}; to continue the run: {continue_command(run)}")


def _history(path: Path, limit: int) -> list[tuple[int, Path]]:
    if not path.is_dir() or not (path / "checkpoints").is_dir():
        return []
    from gradsparse import checkpoint

    cks = checkpoint.list_checkpoints(path)
    if len(cks) <= limit:
        return cks
    idx = np.unique(np.round(np.linspace(0, len(cks) - 1, limit)).astype(int))
    return [cks[i] for i in idx]


def _default_out(path: Path, fmt: str) -> Path:
    if not fmt.startswith(("gradsparse", "npz")):  # a foreign model's folder may be read-only or shared
        stem = path.name if path.is_dir() else path.stem.replace(".safetensors.index", "").replace(".bin.index", "")
        if stem in ("model", "pytorch_model", ""):
            stem = path.resolve().parent.name if not path.is_dir() else stem
        return Path.cwd() / f"spectrum_{_safe(stem)}"
    if path.is_dir():
        return path / "spectrum"
    parent = path.resolve().parent
    if parent.name == "checkpoints":
        parent = parent.parent
    return parent / "spectrum"


def _safe(name: str) -> str:
    """A file-name stem for a matrix name: unusual characters replaced, and a name too long for a
    file system shortened to a readable prefix and a hash of the whole name (:func:`weights.short_name`)."""
    return weights.short_name(re.sub(r"[^A-Za-z0-9_.\-\[\]]+", "_", name).strip("_.") or "weight")


def _figures(rows: list[spectra.SpectrumRow], history_rows: list[tuple[int, list]], out: Path, document: str,
             max_esd: int, formats: tuple[str, ...]) -> list[Path]:
    from gradsparse import figures_spectra as fs  # matplotlib: imported only when figures are drawn

    written = [atomic_write_text(out / "spectrum.json", document + "\n")]
    layered = len({r.layer for r in rows if r.layer is not None}) >= 2
    if len(rows) <= max_esd or not layered:
        for r in rows:
            if r.error or r.sv is None:
                continue
            n_big, k = max(r.shape), min(r.shape)
            eigs = r.sv * r.sv / n_big
            title = f"{r.name} {r.shape[0]}x{r.shape[1]}: ESD of W W^T / {n_big}"
            written += fs.plot_esd(eigs, out / f"esd_{_safe(r.name)}", fit=r.mp_fit, c_pred=k / n_big,
                                   s2_pred=float(np.sum(eigs)) / k, title=title, formats=formats)
            if r.pl_fit is not None:
                ok = "ok" if r.pl_fit.fit_ok else f"NOT ok: {r.pl_fit.reason}"
                written += fs.plot_powerlaw_esd(r.sv * r.sv, out / f"esd_pl_{_safe(r.name)}", fit=r.pl_fit,
                                                title=f"{r.name} {r.shape[0]}x{r.shape[1]}: log-log ESD of s^2 ({ok})",
                                                formats=formats)
    if layered:
        written += fs.plot_model_spectra(rows, out, formats=formats)
    if len(history_rows) >= 2:
        for col, ylabel in (("ratio", "s_max / s_min (non-zero)"), ("mass80_ratio", "80%-mass ratio of W W^T")):
            written += fs.plot_ratio_vs_step(fs.series_from_rows(history_rows, col), out / f"{col}_vs_step",
                                             ylabel=ylabel, formats=formats)
        written += fs.plot_near_zero_vs_step(fs.series_from_rows(history_rows, "near_zero_rate"),
                                             out / "near_zero_rate_vs_step", formats=formats)
        alphas = fs.series_from_rows(history_rows, "alpha")
        if any(np.isfinite(np.asarray(v[1], dtype=np.float64)).any() for v in alphas.values()):
            written += fs.plot_alpha_vs_step(alphas, out / "alpha_vs_step",
                                             flags=fs.series_from_rows(history_rows, "pl_fit_ok"), formats=formats)
    return written


def check_readable_rows(rows: list[spectra.SpectrumRow], allow_unreadable: bool) -> None:
    """ValueError when no row could be analysed, or when a matrix could not be read and
    ``allow_unreadable`` is False (one line naming the first few and why)."""
    failed = [r for r in rows if r.error]
    unreadable = [r for r in failed if r.error.startswith("cannot read")]
    show = lambda rs: "; ".join(f"{r.name}: {r.error}" for r in rs[:3]) + (  # noqa: E731
        f"; ... ({len(rs) - 3} more)" if len(rs) > 3 else "")
    if rows and len(failed) == len(rows):
        raise ValueError(f"no matrix could be analysed ({len(rows)} of {len(rows)}: {show(failed)})")
    if unreadable and not allow_unreadable:
        raise ValueError(f"{len(unreadable)} of {len(rows)} matrices could not be read ({show(unreadable)}); "
                         "pass --allow-unreadable to analyse the others")


def _history_rows(hist: list[tuple[int, Path]], rows: list, args: argparse.Namespace, roles: dict, fit: bool
                  ) -> tuple[list[tuple[int, list]], list[tuple[Path, str]]]:
    """The rows of every earlier checkpoint for the vs-step figures, and the damaged ones skipped (with why)."""
    from gradsparse import checkpoint

    out: list[tuple[int, list]] = []
    skipped: list[tuple[Path, str]] = []
    for step, ck in hist[:-1]:
        try:
            model, _ = checkpoint.load_model(ck)
        except ValueError as e:  # a damaged earlier checkpoint: the figures are drawn without it
            skipped.append((ck, str(e).replace("\n", " ")))
            continue
        out.append((step, spectra.analyze(model, rtol=args.rtol, route=args.route, select=args.select, roles=roles,
                                          progress=False, power_law=fit)))
    out.append((hist[-1][0], rows))
    return out, skipped


def _skipped_lines(skipped: list[tuple[str, str]]) -> list[str]:
    if not skipped:
        return []
    lines = [f"skipped {len(skipped)} tensors:"]
    for kind, names in weights.names_by_reason(skipped).items():
        shown = ", ".join(names[:3]) + (f", ... ({len(names) - 3} more)" if len(names) > 3 else "")
        lines.append(f"  {len(names)} x {kind}: {shown}")
    return lines


def _summary_lines(rows: list[spectra.SpectrumRow]) -> list[str]:
    summary = spectra.get_summary(rows)
    cols = ("count", "stable_rank", "ratio", "mass80_ratio", "num_spikes", "ks", "mp_c", "fit_ok", "alpha",
            "alpha_weighted", "pl_fit_ok")
    if any(math.isfinite(d.get("num_traps_margin", math.nan)) for d in summary.values()):
        cols += ("num_traps", "rand_distance")
    table = [["role", *cols]]
    for role, d in summary.items():
        table.append([role] + [spectra._fmt(d[c], "d" if c == "count" else ".4g") for c in cols])
    widths = [max(len(t[i]) for t in table) for i in range(len(table[0]))]
    lines = ["summary (mean per role; fit_ok, pl_fit_ok: fraction of fitted matrices; num_spikes over fit_ok rows):"]
    for t in table:
        lines.append("  " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(t, widths))))
    return lines


def process_age() -> float | None:
    """Seconds since this process started (Linux: /proc), or None where that cannot be read: the
    start-up before :func:`run` (Python, the library's imports) is part of what a user waits for."""
    try:
        with open("/proc/self/stat") as f:
            start = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22: starttime, in clock ticks since boot
        with open("/proc/uptime") as f:
            up = float(f.read().split()[0])
        return max(up - start / os.sysconf("SC_CLK_TCK"), 0.0)
    except (OSError, ValueError, IndexError):
        return None


def time_line(phases: dict[str, float], startup: float | None, files: int) -> str:
    """'spectrum: 12.3 s in all: start-up 1.2 s, reading 0.4 s, analysis 1.9 s, figures 8.8 s (37 files)'."""
    total = sum(phases.values()) + (startup or 0.0)
    bits = ([f"start-up {startup:.1f} s"] if startup is not None else [])
    bits += [f"{k} {v:.1f} s" for k, v in phases.items()]
    line = f"spectrum: {total:.1f} s in all: {', '.join(bits)}"
    if "figures" in phases:
        line += f" ({files} files; --no-figures skips them, --formats png halves them)"
    return line


def run(args: argparse.Namespace) -> int:
    startup = process_age()
    clock = time.perf_counter()
    phases: dict[str, float] = {}

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        phases[name] = phases.get(name, 0.0) + now - clock
        clock = now

    path = Path(args.path)
    if not path.exists():
        if path.is_symlink():
            weights.check_readable(path)  # a symlink loop or a broken link, named as such
        raise FileNotFoundError(f"no model weights at {path}")
    _relufication_run(path)
    if args.rtol is not None and not (math.isfinite(args.rtol) and 0.0 <= args.rtol < 1.0):
        raise ValueError(f"--rtol must lie in [0, 1), got {args.rtol}")
    if not (0.0 < args.alpha < 1.0):
        raise ValueError(f"--alpha must lie in (0, 1), got {args.alpha}")
    if args.ks_max is not None and not (0.0 < args.ks_max <= 1.0):
        raise ValueError(f"--ks-max must lie in (0, 1], got {args.ks_max}")
    if args.max_checkpoints < 1:
        raise ValueError(f"--max-checkpoints must be >= 1, got {args.max_checkpoints}")
    if args.max_esd < 0:
        raise ValueError(f"--max-esd must be >= 0, got {args.max_esd}")
    if args.meta and not args.json:
        raise ValueError("--meta only applies with --json")
    formats = tuple(f.strip().lower() for f in args.formats.split(",") if f.strip())
    if not formats or any(f not in ("png", "pdf", "svg") for f in formats):
        raise ValueError(f"--formats: {args.formats!r} is not a comma-separated list of png, pdf, svg")
    figures = not args.no_figures
    roles = dict(args.role)
    wset = spectra.weight_set(path, args.select, roles=roles, layout=args.layout)
    lap("opening")
    out = (Path(args.out) if args.out else _default_out(path, wset.conventions["format"])) if figures else None
    if out is not None and out.exists() and not out.is_dir():  # before the analysis: fail before printing
        raise ValueError(f"--out {out} exists and is not a folder; allowed: a folder (created when missing)")
    fit = not args.no_fit
    rows = spectra.analyze(wset, rtol=args.rtol, route=args.route, fit=fit, alpha=args.alpha, keep_sv=figures,
                           ks_max=args.ks_max, progress=False if args.no_progress else None,
                           randomize=args.randomize, key=args.seed)
    check_readable_rows(rows, args.allow_unreadable)
    meta = spectra.table_metadata(wset, source=str(path), fit=fit, alpha=args.alpha, rtol=args.rtol,
                                  ks_max=args.ks_max, rows=rows, randomize=args.randomize,
                                  seed=args.seed if args.randomize else None)
    lap("reading and analysis")
    history_rows: list[tuple[int, list]] = []
    if figures:
        hist = _history(path, args.max_checkpoints)
        if len(hist) >= 2:
            history_rows, damaged = _history_rows(hist, rows, args, roles, fit)
            if damaged:  # stderr: --json keeps stdout to the JSON
                print(f"spectrum: {len(damaged)} earlier checkpoints skipped in the vs-step figures (damaged): "
                      + "; ".join(f"{p.name} ({why})" for p, why in damaged), file=sys.stderr)
            lap("earlier checkpoints")
    if args.csv:
        atomic_write_text(args.csv, spectra.rows_to_csv(rows))
    if args.json:
        sys.stdout.write(spectra.rows_to_json(rows, metadata=meta if args.meta else None) + "\n")
    else:
        conv = wset.conventions
        print(f"spectrum of {path} ({conv['format']}; {conv['layout']}, detected from {conv['layout_detected_from']})")
        print(spectra.format_table(rows))
        for key, what in (("transposed", "transposed (in, out) -> (out, in)"),
                          ("fused_qkv_split", "fused q/k/v split into [q], [k], [v]"),
                          ("fused_qkv_kept_whole", "fused q/k/v kept whole (head layout unknown)")):
            if conv[key]:
                print(f"{len(conv[key])} tensors {what}: {', '.join(conv[key][:3])}" + (" ..." if len(conv[key]) > 3 else ""))
        for line in _skipped_lines(wset.skipped):
            print(line)
        if len(rows) > 1:
            for line in _summary_lines(rows):
                print(line)
        if fit:
            print("units: eigenvalues of W W^T / N, N = max(rows, cols) (WeightWatcher's are N times larger); "
                  "sigma_mp = entry std; num_spikes: TW test, num_spikes_margin: WeightWatcher's rule")
            print("power law: WeightWatcher's default fit of the ESD tail; xmin in units of s^2 (as WeightWatcher, "
                  "as lambda_max); pl_fit_ok: tail >= 10 eigenvalues and 1.5 <= alpha <= 6")
            withheld = meta.get("num_spikes_withheld", [])
            if withheld:
                print(f"num_spikes left empty for {len(withheld)} matrices whose MP fit is not ok "
                      "(KS above its threshold: the MP law does not describe the bulk); "
                      "num_spikes_margin is WeightWatcher's margin rule on the same fit")
        if args.csv:
            print(f"wrote {args.csv}")
    lap("output")
    written: list[Path] = []
    if out is not None:
        document = spectra.rows_to_json(rows, metadata=meta)
        try:
            written = _figures(rows, history_rows, out, document, args.max_esd, formats)
        except OSError as e:
            if args.out is not None:
                raise
            raise ValueError(f"cannot write the figures to {out}, the default --out ({e.strerror or e}: "
                             f"{e.filename or out}); pass --out DIR to write them to a folder you may write to, "
                             "or --no-figures") from None
        lap("figures")
        if not args.json:
            print(f"wrote {len(written)} files to {out}")
    # the whole command's time, where it went (stderr: --json keeps stdout to the JSON)
    print(time_line(phases, startup, len(written)), file=sys.stderr)
    return 0
