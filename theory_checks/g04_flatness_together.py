"""G4: late in training, flatness and (relaxed) gradient sparsity fall together.

The theory's "late" phase is SGD near a well-learned minimum, where the loss has stopped falling but
SGD noise keeps acting and drifts the weights toward flatter minima. Plain CE on a model that fits
its data never shows that phase (the trace falls only because the loss does, CHECKS_REVIEW Exp 3),
so the check runs it where it is known to exist: label-noise SGD (a fraction p = 0.1 of each
batch's labels resampled uniformly; the setting where SGD provably drifts to smaller tr(H) at
constant loss), started from the end of the plain-SGD baseline (``theory_checks.context.SGD``).

Measured at every logged step of that phase: tr(H_K) by Hutchinson (``flat/trace_k``, every
``flatness_every`` steps) and the effective-gradient norm mean_t ||eta_t||^2
(``fixed/eta_l2sq/mean``), both on the FIXED 512-example training subset (SPEC 3.4), its loss
(``fixed/loss``), and the held-out density of blocks 2..L.

Plan (pre-registered, :func:`plan`) and what changed (CHECKS_REVIEW_T3 2d, issue 21 point 5):

- Phase length: 3000 steps at quick (was 1000). Pilot (seed 1000, outside the test seeds; the SGD
  baseline's quick run, then this phase for 4000 steps, log every 50, traces every 100 (an
  exploratory script, not part of the package)): the relative Q3 -> Q4 fall of the fixed-subset
  loss, truncating the phase at 1000 / 2000 / 3000 / 4000 steps, was 0.095 / 0.195 / 0.061 /
  0.054; the log-to-log relative SD of the loss over the last half 0.13 / 0.16 / 0.16 / 0.16. From
  3000 steps the fall is below the gate with room; 4000 would cost a third more for 0.007.
  Cost: the 4000-step pilot phase (40 trace estimates) took 84 s at load 6-10; the quick phase
  (3000 steps, 20 estimates) took 52 / 32 / 30 s for seeds 0-2 (the first compiles) at load ~7, so
  G4 costs ~2 min in the suite (the SGD baselines come cached from G3), ~1 min more than before.
- Plateau gate, relative to the loss's own noise: per seed the relative fall
  f = (loss(Q3) - loss(Q4)) / loss(Q3) of the fixed-subset loss (quarter means over the logs);
  gate value = the one-sided 95% t upper bound of f over seeds (a noise-aware mean, not the max of
  point values); threshold PLATEAU 0.18 = 3 x the SD that log noise alone gives one seed's f:
  sigma_rel sqrt(2 / m) = 0.161 sqrt(2 / 15) = 0.059 (sigma_rel: the pilot's log-to-log relative SD,
  m = 15 logs per quarter at 3000 steps, log every 50). A rising loss is no sign of fitting and
  does not fail the gate. Floor gate: min over seeds of the Q4 loss >= 0.05 (not interpolated;
  the same floor as G5).
- Trends only over the plateau window the gate certifies (the last half of the phase), with the
  loss partialled out: effect = -(partial Spearman of the quantity with the step, controlling for
  the fixed-subset loss) (:func:`partial_spearman`). Chosen over the trend of quantity/loss because
  the ratio assumes trace proportional to loss, which is false in both regimes (exact traces: trace
  ~ loss^0.82 after interpolation, and the trace RISES while the loss falls before it,
  CHECKS_REVIEW_T3 5.6); the rank partial correlation assumes only monotone relations, and ranks are
  robust to the heavy-tailed Hutchinson noise (5.3). Trace estimates every 150 steps give 11 in the
  window (:func:`estimates_in_window`; the plan refuses fewer than 8 outside smoke).
- Primaries: the claim's three quantities on the plateau (trace, ||eta||^2, density), delta 0.3
  (a medium rank association by the usual convention, stated before any pilot of this window; the
  pilot seed 1000 values at 3000 steps, -partial Spearman: trace 0.82, ||eta||^2 0.42, density
  0.66). Context: the old whole-phase trends (-Spearman over all logs, no loss control): they are
  mostly the fitting phase (P-G4: the loss falls too, -rho 0.90).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
from scipy.stats import rankdata, spearmanr

from gradsparse.data import DataInfo
from gradsparse.factory import bare_model, finetune_start
from gradsparse.plugins import sparsify
from theory_checks.context import tail, SGD, Context, describe, sgd_config, sgd_runs
from theory_checks.plan import CheckPlan, GatePlan, PartPlan, arm
from theory_checks.protocol import Check, Finding
from theory_checks.verdicts import Gate, effect_verdict, fmt, mean_sd, t_bounds

#: minimal trend: |partial Spearman| 0.3, a medium rank association (stated before the run)
MIN_TREND = 0.3
SOURCE = ("a medium rank association, |rho| >= 0.3 (stated; not fitted to a pilot). Pilot seed 1000 (outside the "
          "test seeds), 3000-step phase, last half, -partial Spearman given the loss: trace 0.82, ||eta||^2 0.42, "
          "density 0.66")
WHOLE_SOURCE = "a monotone trend |Spearman(step, .)| >= 0.3 (stated before the run, as before the redesign)"
#: plateau: one-sided 95% t upper bound over seeds of the relative Q3 -> Q4 fall of the fixed-subset loss
PLATEAU = 0.18
PLATEAU_SOURCE = ("3 x the SD log noise alone gives one seed's Q3->Q4 change: 0.161 x sqrt(2/15) = 0.059 (0.161: "
                  "log-to-log relative SD of the loss over the last half of the seed-1000 pilot phase, log every 50; "
                  "15 logs per quarter)")
LOSS_FLOOR = 0.05
#: the plateau window: the last half of the phase (what the plateau gate certifies)
WINDOW = 0.5
MIN_ESTIMATES = 8
KEYS = {"trace_k": "flat/trace_k", "eta_l2sq": "fixed/eta_l2sq/mean", "density": "heldout/density"}
WHY = ("the claim is that these quantities fall TOGETHER once the loss has stopped falling and only SGD (label) noise "
       "acts; over the certified plateau half, with the loss partialled out, a fall is not the fitting that moves "
       "all of them with the loss (for CE the trace follows the loss factor 1 - ||p||^2)")
WHY_WHOLE = ("context: over the whole phase the loss falls too (P-G4: -rho 0.90), so these trends mostly show the "
             "fitting")
GATES = ("loss_plateau", "loss_floor")


def phase_config(preset: str, p: Mapping[str, Any]):
    """The label-noise phase's TrainConfig (before the surgery options of its start)."""
    return sgd_config(preset, label_noise=p["label_noise"], steps=p["phase_steps"],
                      flatness_every=p["flatness_every"], log_every=p["log_every"])


def surgery_options(preset: str) -> dict[str, Any]:
    """The ``surgery`` options :func:`finetune_start` adds (no modules), computed without training
    on a freshly built model of the preset (they depend on the structure only)."""
    import jax

    cfg = sgd_config(preset)
    model = bare_model(cfg, DataInfo("vector", (40,), 10), jax.random.PRNGKey(0))
    return sparsify(model).options


def estimates_in_window(steps: int, log_every: int, flatness_every: int, frac: float = WINDOW) -> int:
    """How many trace estimates a run of ``steps`` makes at step / (steps - 1) >= 1 - ``frac``: at
    logged steps (every ``log_every`` and the last) that are multiples of ``flatness_every`` or the last."""
    if min(steps, log_every, flatness_every) < 1:
        raise ValueError("steps, log_every and flatness_every must be >= 1")
    last = steps - 1
    s = [t for t in range(steps) if (t % log_every == 0 or t == last) and (t % flatness_every == 0 or t == last)]
    return sum(1 for t in s if t / max(last, 1) >= 1 - frac - 1e-9)


def plan(preset: str, p: dict[str, Any]) -> CheckPlan:
    n_est = estimates_in_window(p["phase_steps"], p["log_every"], p["flatness_every"])
    if preset != "smoke" and n_est < MIN_ESTIMATES:
        raise ValueError(f"G4 {preset}: {n_est} trace estimates in the plateau window; need >= {MIN_ESTIMATES}")
    parts = [PartPlan(f"{k}_falls_on_plateau", "effect", "primary",
                      f"-partial Spearman(step, {KEYS[k]} | fixed-subset loss), last half of the phase", MIN_TREND,
                      SOURCE, gates=GATES, why=WHY) for k in KEYS]
    parts += [PartPlan(f"{k}_falls_whole_phase", "effect", "context", f"-Spearman(step, {KEYS[k]}), whole phase",
                       MIN_TREND, WHOLE_SOURCE, gates=("loss_floor",), why=WHY_WHOLE) for k in KEYS]
    gates = [GatePlan("loss_plateau", "<", PLATEAU, "one-sided 95% t upper bound over seeds of the relative fall "
                      f"(loss(Q3) - loss(Q4)) / loss(Q3), fixed subset, label-noise phase; threshold: {PLATEAU_SOURCE}",
                      ("labelnoise",)),
             GatePlan("loss_floor", ">=", LOSS_FLOOR, "min over seeds of the fixed-subset loss in the last quarter "
                      "(not interpolated)", ("labelnoise",))]
    ph = phase_config(preset, p).replace(surgery=surgery_options(preset))
    return CheckPlan(arms=[arm("sgd", sgd_config(preset), note="the plain-SGD baseline (shared)"),
                           arm("labelnoise", ph, start="sgd", note=f"label noise {p['label_noise']} from its end")],
                     parts=parts, gates=gates,
                     notes=[f"{n_est} trace estimates in the plateau window (last half of {p['phase_steps']} steps)"])


# ---------------------------------------------------------------- pure helpers

def partial_spearman(x: Sequence[float], y: Sequence[float], z: Sequence[float]) -> float:
    """Spearman correlation of x and y controlling for z (shapes (n,)): with r the Spearman
    correlations (average ranks for ties),
    r_xy.z = (r_xy - r_xz r_yz) / sqrt((1 - r_xz^2)(1 - r_yz^2)).
    NaN for fewer than 4 points, non-finite input, or a constant series / |r_xz| or |r_yz| = 1."""
    a, b, c = (np.asarray(v, np.float64) for v in (x, y, z))
    if not (a.shape == b.shape == c.shape) or a.ndim != 1:
        raise ValueError(f"x, y, z must be 1-D of equal length, got {a.shape}, {b.shape}, {c.shape}")
    if a.size < 4 or not (np.isfinite(a).all() and np.isfinite(b).all() and np.isfinite(c).all()):
        return math.nan
    ranks = np.vstack([rankdata(a), rankdata(b), rankdata(c)])
    if np.any(np.ptp(ranks, axis=1) == 0):
        return math.nan
    r = np.corrcoef(ranks)
    if not np.isfinite(r).all():
        return math.nan
    rxy, rxz, ryz = r[0, 1], r[0, 2], r[1, 2]
    den = (1 - rxz ** 2) * (1 - ryz ** 2)
    return float((rxy - rxz * ryz) / math.sqrt(den)) if den > 1e-12 else math.nan


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (average ranks for ties); NaN for fewer than 3 points."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if a.size < 3 or a.size != b.size:
        return float("nan")
    return float(spearmanr(a, b).statistic)


def rows_of(history: Sequence[Mapping[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(steps, values, fixed-subset loss) of the log rows carrying ``key`` and the loss; per-block
    keys (density) averaged over blocks 2..L."""
    rows = [h for h in history if key in h and "fixed/loss" in h]
    vals = [float(np.mean(tail(h[key]))) if isinstance(h[key], list) else float(h[key]) for h in rows]
    return (np.asarray([h["step"] for h in rows], np.float64), np.asarray(vals, np.float64),
            np.asarray([h["fixed/loss"] for h in rows], np.float64))


def in_window(steps: np.ndarray, frac: float = WINDOW) -> np.ndarray:
    """Mask of the steps in the last ``frac`` of the phase (t = step / last step >= 1 - frac)."""
    return steps / max(float(steps[-1]), 1.0) >= 1 - frac - 1e-9


def plateau_trend(history: Sequence[Mapping[str, Any]], key: str, frac: float = WINDOW) -> float:
    """-partial Spearman(step, quantity | loss) over the last ``frac`` of the phase (fall > 0)."""
    s, v, l = rows_of(history, key)
    m = in_window(s, frac)
    return -partial_spearman(s[m], v[m], l[m])


def plateau_raw_trend(history: Sequence[Mapping[str, Any]], key: str, frac: float = WINDOW) -> float:
    """-Spearman(step, quantity) over the last ``frac`` of the phase, the loss NOT partialled out."""
    s, v, _ = rows_of(history, key)
    m = in_window(s, frac)
    return -spearman(s[m], v[m])


def whole_trend(history: Sequence[Mapping[str, Any]], key: str) -> float:
    """-Spearman(step, quantity) over every log of the phase (fall > 0)."""
    s, v, _ = rows_of(history, key)
    return -spearman(s, v)


def relative_fall(steps: Sequence[float], loss: Sequence[float]) -> float:
    """(mean loss over Q3 - mean over Q4) / mean over Q3, quarters by t = step / last step
    ([0.5, 0.75] and [0.75, 1], as :func:`theory_checks.context.window_mean`); NaN when a quarter
    is empty or the Q3 mean is not > 0 (a float32 floor of 0 gives no ratio)."""
    s, l = np.asarray(steps, np.float64), np.asarray(loss, np.float64)
    t = s / max(float(s[-1]), 1.0)
    q3, q4 = l[(t >= 0.5 - 1e-9) & (t <= 0.75 + 1e-9)], l[t >= 0.75 - 1e-9]
    if q3.size == 0 or q4.size == 0 or not float(np.mean(q3)) > 0:
        return math.nan
    return float((np.mean(q3) - np.mean(q4)) / np.mean(q3))


def plateau_gates(falls: Sequence[float], q4: Sequence[float]) -> list[Gate]:
    """The two regime gates from per-seed relative falls and Q4 losses."""
    hi = t_bounds(falls)[3] if len(falls) >= 2 else math.nan
    return [Gate("loss_plateau", hi, "<", PLATEAU,
                 f"one-sided 95% t upper bound over seeds of the relative Q3->Q4 fall of the fixed-subset loss "
                 f"(per seed {[round(float(f), 3) for f in falls]})"),
            Gate("loss_floor", float(np.min(q4)) if len(q4) else math.nan, ">=", LOSS_FLOOR,
                 "min over seeds of the fixed-subset loss in the last quarter (not interpolated)")]


def measure(hist: Sequence[Sequence[Mapping[str, Any]]], pl: CheckPlan) -> tuple[dict, list[Gate], dict[str, Any]]:
    """(parts, gates, numbers) from the phase histories (one per seed) by the plan ``pl`` (pure:
    the unit tests feed synthetic histories)."""
    plateau = {k: [plateau_trend(h, key) for h in hist] for k, key in KEYS.items()}
    whole = {k: [whole_trend(h, key) for h in hist] for k, key in KEYS.items()}
    raw = {k: [plateau_raw_trend(h, key) for h in hist] for k, key in KEYS.items()}
    parts = {}
    for k in KEYS:
        for name, vals in ((f"{k}_falls_on_plateau", plateau[k]), (f"{k}_falls_whole_phase", whole[k])):
            pp = pl.part(name)
            v = effect_verdict(vals, float(pp.delta), source=pp.source, what=pp.what)
            bad = [i for i, x in enumerate(vals) if not math.isfinite(x)]
            if bad:
                v.reason = (f"trend undefined for seed(s) #{bad} (fewer than 4 points in the window, or the step's or "
                            f"the quantity's ranks coincide with the loss's) -> {v.reason}")
            parts[name] = v
    loss_cols = [rows_of(h, "fixed/loss") for h in hist]
    falls = [relative_fall(s, l) for s, _, l in loss_cols]
    q4 = [float(np.mean(l[s / max(s[-1], 1) >= 0.75 - 1e-9])) for s, _, l in loss_cols]
    n_est = [int(in_window(rows_of(h, "flat/trace_k")[0]).sum()) for h in hist]
    return parts, plateau_gates(falls, q4), dict(plateau=plateau, whole=whole, raw=raw, falls=falls, q4=q4,
                                                 n_est=n_est, loss_cols=loss_cols)


def run(ctx: Context, p: dict[str, Any]) -> Finding:
    base = sgd_runs(ctx)
    cfg = phase_config(ctx.preset, p)
    phases = []
    for s, r in zip(ctx.seeds, base):
        start, opts = finetune_start(r.model, cfg.replace(seed=s))
        phases.append(ctx.train(cfg.replace(seed=s, surgery=opts), f"g04-labelnoise-from-sgd{s}", start=start,
                                parent=r))
    hist = [ph.history for ph in phases]
    parts, gates, m = measure(hist, plan(ctx.preset, p))
    plateau, whole, raw, falls, q4, n_est = m["plateau"], m["whole"], m["raw"], m["falls"], m["q4"], m["n_est"]
    loss_cols = m["loss_cols"]
    loss_trend = [-spearman(s[in_window(s)], l[in_window(s)]) for s, _, l in loss_cols]
    per_seed = {**{f"plateau_trend_{k}": v for k, v in plateau.items()},
                **{f"plateau_raw_trend_{k}": v for k, v in raw.items()},
                **{f"whole_trend_{k}": v for k, v in whole.items()},
                "plateau_loss_trend": loss_trend, "loss_rel_fall_q3_q4": falls, "loss_q4": q4,
                "trace_estimates_in_window": [float(n) for n in n_est],
                "trace_start": [float(h[0]["flat/trace_k"]) for h in hist],
                "trace_end": [float(rows_of(h, "flat/trace_k")[1][-1]) for h in hist]}
    dropped = sorted(k for k, v in per_seed.items() if not all(math.isfinite(float(x)) for x in v))
    per_seed = {k: [float(x) for x in v] for k, v in per_seed.items() if k not in dropped}
    h0 = hist[0]
    ser = {"steps": [h["step"] for h in h0 if "flat/trace_k" in h],
           "trace_k": [h["flat/trace_k"] for h in h0 if "flat/trace_k" in h],
           "eta_l2sq": [h["fixed/eta_l2sq/mean"] for h in h0 if "flat/trace_k" in h],
           "density": [float(np.mean(tail(h["heldout/density"]))) for h in h0 if "flat/trace_k" in h],
           "loss": [h["fixed/loss"] for h in h0 if "flat/trace_k" in h], "seed": ctx.seeds[0],
           "window_start": float(h0[-1]["step"]) * (1 - WINDOW)}
    notes = ["traces, ||eta||^2 and the loss on the fixed 512-example training subset; density held-out, blocks 2..L",
             f"plateau window: the last half of the phase ({min(n_est)}-{max(n_est)} trace estimates per seed)"]
    if dropped:
        notes.append(f"not finite in some seed (left out of per_seed): {', '.join(dropped)}")
    return Finding(
        None,
        measured=(f"label-noise phase (p {p['label_noise']}, {p['phase_steps']} steps): loss Q3->Q4 relative fall "
                  f"{mean_sd(falls)}, Q4 loss {mean_sd(q4)}; on the plateau half, -partial Spearman given the loss: "
                  f"trace {mean_sd(plateau['trace_k'])}, ||eta||^2 {mean_sd(plateau['eta_l2sq'])}, density "
                  f"{mean_sd(plateau['density'])} (raw: trace {mean_sd(raw['trace_k'])}, ||eta||^2 "
                  f"{mean_sd(raw['eta_l2sq'])}, density {mean_sd(raw['density'])}, loss {mean_sd(loss_trend)}); "
                  f"whole phase -Spearman: trace {mean_sd(whole['trace_k'])}, ||eta||^2 {mean_sd(whole['eta_l2sq'])}, "
                  f"density {mean_sd(whole['density'])}; trace_k {mean_sd(per_seed.get('trace_start', [math.nan]))} -> "
                  f"{mean_sd(per_seed.get('trace_end', [math.nan]))}"),
        per_seed=per_seed, parts=parts, series=ser, gates=gates,
        model=f"{describe(cfg)}, label noise {p['label_noise']}, from the end of the SGD baseline", notes=notes)


#: the four quantities of the G4 figure: (series key, y label); each gets a panel of its own in its own units
PANELS = (("trace_k", "tr(H_K)\n(fixed subset)"), ("eta_l2sq", "mean ||eta||^2\n(fixed subset)"),
          ("density", "density, blocks 2..L\n(held-out)"), ("loss", "loss\n(fixed subset)"))


def draw(ser: dict[str, Any], lo: float = -math.inf) -> Any:
    """The G4 figure of one seed's label-noise phase (steps >= ``lo``) as a matplotlib Figure: one panel per
    quantity (:data:`PANELS`), each on its own axis in its own units (no quantity is rescaled), the x axis
    shared; the judged plateau window (``window_start`` on) is shaded."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    keep = [i for i, s in enumerate(ser["steps"]) if s >= lo]
    steps = np.asarray([ser["steps"][i] for i in keep], float)
    fig = Figure(figsize=(6.4, 6.4), dpi=120)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(PANELS), 1, sharex=True)
    win = ser.get("window_start")
    for i, (ax, (key, label)) in enumerate(zip(axes, PANELS)):
        ax.plot(steps, np.asarray([ser[key][j] for j in keep], float), color=f"C{i}", lw=1.4, marker=".", ms=3)
        ax.set_ylabel(label, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if win is not None and steps.size and steps[-1] >= win:
            ax.axvspan(max(float(win), float(steps[0])), float(steps[-1]), color="0.85", lw=0,
                       label="plateau window (judged: last half)" if i == 0 else None)
    if win is not None and steps.size and steps[-1] >= win:
        axes[0].legend(fontsize=7, loc="best")
    axes[-1].set_xlabel("step of the label-noise phase")
    which = "whole phase" if lo == -math.inf else "plateau window (judged: last half)"
    fig.suptitle(f"G4: label-noise SGD phase, {which} (seed {ser['seed']})", fontsize=10)
    fig.tight_layout()
    return fig


def figures(ser: dict[str, Any], out_dir) -> list:
    from gradsparse.figures_spectra import FORMATS, save_figure

    return (save_figure(draw(ser), out_dir / "g04_flatness", FORMATS)
            + save_figure(draw(ser, ser.get("window_start", 0.0)), out_dir / "g04_flatness_plateau", FORMATS))


PHASE = {"smoke": dict(label_noise=0.1, phase_steps=80, flatness_every=10, log_every=10),
         "quick": dict(label_noise=0.1, phase_steps=3000, flatness_every=150, log_every=50),
         "full": dict(label_noise=0.1, phase_steps=4000, flatness_every=250, log_every=50)}

CHECK = Check(
    name="G4",
    slug="g04_flatness_together",
    title="Flatness and gradient sparsity fall together",
    claim=("Late in training (loss plateaued, SGD noise still acting: label-noise SGD), the key-layer Hessian trace, "
           "the effective-gradient norm ||eta||^2 and the density fall together."),
    rule=(f"Three primary effect parts over the plateau window (the last half of the label-noise phase), each "
          f"-partial Spearman(step, quantity | fixed-subset loss) (trace_k and ||eta||^2 on the fixed training "
          f"subset, held-out density of blocks 2..L), delta = {MIN_TREND}: PASS when the lower bound > 0 and the mean "
          f"> delta, FAIL when the upper bound < delta; the claim passes when all three pass and fails when a FAIL "
          f"survives Holm. Gates: the t upper bound over seeds of the relative Q3 -> Q4 fall of the fixed-subset loss "
          f"< {PLATEAU} (3x the log noise of one seed's change), the Q4 loss >= {LOSS_FLOOR}; else INCONCLUSIVE. "
          f"The whole-phase trends are context."),
    presets={k: {"sgd": SGD[k], **PHASE[k]} for k in ("smoke", "quick", "full")},
    run=run,
    figures=figures,
    plan=plan,
)
