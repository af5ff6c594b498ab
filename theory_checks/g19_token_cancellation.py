"""G19: per-sample vs per-token gradients: why a Transformer needs weight noise.

Claim (the paper's argument for weight noise in Transformers; SPEC 4.4a): flatness wrt K constrains
the per-SAMPLE gradient G_s = dL_s/dK = sum_t eta_t x_t^T (t: the tokens of sample s). With many
tokens per sample G_s can be small through cancellation between tokens while each token's eta_t
x_t^T is not small, so flatness alone does not force per-token gradient sparsity. Token-wise synapse
noise (z_t <- K x_t + eps_t, eps_t ~ N(0, s^2 ||x_t||^2 I)) adds a per-token penalty ~ sum_t
||eta_t||^2 ||x_t||^2 (G12's docstring: (rho^2/6) sum_t tr(d^2 L/dz_t^2) to second order), which
closes that route. The zeroth bias (SPEC 4.1) is said to work by strengthening the per-token
gradient noise.

Statistic (per seed, per MLP block, on the vanilla run's held-out batch: ``eval_batch`` windows of
``seq_len`` tokens, the same windows for every arm and for the initialisation of a seed):

    P_s = ||sum_t eta_t x_t^T||_F^2,   T_s = sum_t ||eta_t||^2 ||x_t||^2,   C = sum_s P_s / sum_s T_s

eta_t = dL_s/dz_t of the per-sample loss (mean cross-entropy over the sample's tokens), from the
zero probes (g_t = dL_s/da_t, eta_t = g_t sigma'(z_t)), by vmap of value_and_grad over the windows,
eval mode (no noise); x_t is the input of K (LN output, + b0 with the zeroth bias). The loss scale
cancels in C. C = 1 exactly with one token per sample (the MLP: a unit test), C ~ 1 for unrelated
tokens, C = S for S identical tokens, C << 1 when the tokens' terms cancel. The per-token gradient
noise: R = sum_s sum_t ||M_t - Mbar_s||^2 / sum_s S ||Mbar_s||^2 = S / C - 1 (M_t = eta_t x_t^T,
Mbar_s their mean over the sample's S tokens; :func:`token_noise`). Per seed: the mean over blocks
of the per-block log ratios.

Arms (no new training; the same configs as G10 and G12 => the same runs): ``vanilla`` (G10's
vanilla = G12's rho 0), ``noise`` (G12's rho 0.5: token-wise synapse noise, 5x the paper's default;
G12's docstring says why), ``zeroth_bias`` (G10's arm), plus ``init_model`` of the vanilla config
(the zeroth bias starts at 0 and the noise is off in eval mode, so the three arms share it). Seeds:
G10/G12's (5 outside smoke).

Plan (pre-registered, :func:`plan`):

- primary ``noise_less_cancellation``: ln(C(rho 0.5) / C(vanilla)) > 0, i.e. noise lowers the
  per-token term T more than the per-sample term P (the identity ln(C_n / C_v) = ln(T_v / T_n) -
  ln(P_v / P_n)): in the noise-free model more of the flatness comes from cancellation;
- primary ``zeroth_bias_more_token_noise``: ln(R(zeroth bias) / R(vanilla)) > 0;
- context: ``noise_lowers_per_token`` / ``noise_lowers_per_sample`` (the two halves, normalised
  X_norm = mean_s X_s ||K||_F^2 / (n d), invariant to rescaling K against the LN before it, G12's
  normalisation); ``training_created_cancellation`` ln(C(init) / C(trained vanilla));
  ``vanilla_below_shuffled`` ln(C_shuffled / C) (the null: eta_t paired with the x of a random
  token of the same sample); ``vanilla_cancels`` ln(1 / C(vanilla)) (C < 1: net cancellation).
- delta (every part, on a log ratio): :data:`MIN_LOG_C` = 0.04, from the shuffled-pairing null:
  in the pilot the whole eta-x pairing structure of the trained vanilla LM moves C by |ln(C /
  C_shuffled)| = 0.043 +- 0.009 (rounded down); an effect of the noise on C below that is smaller
  than what re-pairing each eta_t with an unrelated token of its own sample does. (R ~ S/C - 1 with
  C ~ 1.1 and S = 32 moves by ~1.04x ln C, so the same delta serves R.)
- gates: every arm learned (held-out loss fell >= 10%, G10/G12's gate), per arm compared; the
  zeroth-bias part also needs the bias to fill >= 0.1 of its clip range (G10's ``zb_used``).

Pilot (seeds 1000-1002, quick, outside the test seeds; the three arms trained with G10/G12's configs
through the Context helpers, then this module's ``run``, both by
``python -m theory_checks.pilot G19 --preset quick --seeds 1000 1001 1002``; 17 s of analysis at
load 9 on 2 cores): C at init 4.31 +- 0.58 (tokens aligned), trained vanilla 1.105 +- 0.031, rho 0.5
1.135 +- 0.027, zeroth bias 1.114 +- 0.023; shuffled pairing (vanilla) 1.059 +- 0.021. Effects:
noise_less_cancellation +0.026 +- 0.008 (T falls by ln 1.601, P by ln 1.575: noise lowers both ~5x
after normalising), zeroth_bias_more_token_noise -0.008 +- 0.008 (R 27.7 vs 28.0),
training_created_cancellation +1.35, vanilla_below_shuffled -0.043, vanilla_cancels -0.100 (C > 1:
no net cancellation). Gates: held-out loss fell 63-65% in every arm; zeroth-bias fill 0.53. So at
this size the trained noise-free LM shows no net cancellation (C slightly above 1 and above its
shuffled null): training removes the initialisation's token alignment (C 4.3 -> 1.1) but stops near
the unrelated-token value, and the pilot expects the primaries to FAIL or be INCONCLUSIVE at delta
0.04. The delta was fixed from the null, not from the effects.

Design notes: (1) eta from the per-sample loss, not the batch mean: the samples of the LM do not
interact, so the batch-mean eta is the per-sample one / B; the vmap makes that explicit and is what
the tests check against jax.grad of one sample's loss wrt K. (2) C is a ratio of sums over samples
(not a mean of per-sample ratios), so samples with tiny gradients do not dominate. (3) Analysis
only: 17 s for 3 seeds (pilot) and 34 s for 5 seeds with loading the 15 runs and the figure (quick),
both on 2 cores at load 8-9 shared with other jobs.

Quick result (seeds 0-4, docs/checks/g19.md): FAIL. noise_less_cancellation 0.012 [-0.005, 0.028],
zeroth_bias_more_token_noise 0.005 [-0.011, 0.021] (delta 0.04); C init 4.00, vanilla 1.090, rho
0.5 1.103, zeroth bias 1.085, shuffled 1.039: no net cancellation in the trained LM at this size.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from gradsparse.figures import plot_bars
from gradsparse.models.common import zero_probes
from gradsparse.step import loss_fn
from theory_checks.context import LM, Context, describe, heldout, init_model, lm_runs
from theory_checks.g10_modules_from_scratch import (CLIP, MIN_FILL, MIN_LEARNED, SEEDS, arm_config, arm_runs,
                                                    heldout_loss, vanilla_config, zeroth_bias_fill)
from theory_checks.g12_weight_noise_transformer import noise_config
from theory_checks.plan import CheckPlan, GatePlan, PartPlan, arm
from theory_checks.protocol import Check, Finding
from theory_checks.verdicts import Gate, effect_verdict, mean_sd

#: G12's treatment: rho 0.5 (5x the paper's default; G12's docstring says why)
RHO = 0.5
#: the arms: name -> changes to the pinned LM config (the same configs as G10/G12 => the same runs)
ARM_NAMES = ("vanilla", "noise", "zeroth_bias")
SHUFFLE_TAG = 0x6919
#: the minimal effect of every part, on a log ratio of C (or of R, T, P)
MIN_LOG_C = 0.04
C_SOURCE = ("the shuffled-pairing null: the whole eta-x pairing structure of the trained vanilla LM moves C by "
            "|ln(C / C_shuffled)| = 0.043 +- 0.009 (pilot seeds 1000-1002), rounded down")
PILOT = ("pilot seeds 1000-1002: C init 4.31, vanilla 1.105, rho 0.5 1.135, zeroth bias 1.114, shuffled 1.059; "
         "noise_less_cancellation +0.026 +- 0.008, zeroth_bias_more_token_noise -0.008 +- 0.008")
WHY_NOISE = ("the paper's argument: flatness wrt K bounds the per-SAMPLE gradient sum_t eta_t x_t^T, which many tokens "
             "can keep small by cancelling each other; token-wise synapse noise adds ~ sum_t ||eta_t||^2 ||x_t||^2, a "
             "per-TOKEN penalty, so with noise less of the flatness can come from cancellation: C = P / T is larger")
WHY_ZB = ("the zeroth bias is said to work by strengthening the per-token gradient noise: the token-to-token spread "
          "of eta_t x_t^T within a sample relative to its mean, R = T / C - 1, is larger than vanilla's")
WHY_T = "the two halves of the primary: noise should lower the per-token term T more than the per-sample term P"
WHY_INIT = "whether training created the cancellation (C at the initialisation vs trained)"
WHY_CANCEL = ("the picture behind the claim: the noise-free model keeps its per-sample gradient small partly by "
              "cancellation between tokens, C < 1")
WHY_SHUF = "cancellation beyond that of unrelated eta-x pairing within a sample (the shuffled null)"


# ------------------------------------------------------------------------------------------ statistics
def cancellation_terms(eta: Any, x: Any) -> tuple[np.ndarray, np.ndarray]:
    """Per sample s, P_s = ||sum_t eta_t x_t^T||_F^2 and T_s = sum_t ||eta_t||^2 ||x_t||^2.

    eta: (S, T, n) effective gradients dL_s/dz_t; x: (S, T, d) inputs of K. Returns (P, T), each (S,),
    in float64. P_s = T_s + sum_{t != t'} (eta_t . eta_t')(x_t . x_t'): the cross terms are what
    cancellation (negative) or alignment (positive) between tokens adds.
    """
    e = np.asarray(eta, dtype=np.float64)
    v = np.asarray(x, dtype=np.float64)
    if e.ndim != 3 or v.ndim != 3 or e.shape[:2] != v.shape[:2]:
        raise ValueError(f"eta (S, T, n) and x (S, T, d) must agree in S and T, got {e.shape} and {v.shape}")
    G = np.einsum("stn,std->snd", e, v)
    P = np.sum(G * G, axis=(1, 2))
    T = np.sum(np.sum(e * e, axis=2) * np.sum(v * v, axis=2), axis=1)
    return P, T


def cancellation_ratio(P: Sequence[float], T: Sequence[float]) -> float:
    """C = sum_s P_s / sum_s T_s: 1 for one token per sample (exactly) or uncorrelated tokens, S for S
    identical tokens, < 1 when the tokens' rank-one terms cancel in the per-sample gradient."""
    p, t = np.asarray(P, np.float64), np.asarray(T, np.float64)
    den = float(np.sum(t))
    if not den > 0:
        raise ValueError(f"sum_s T_s must be > 0, got {den!r} (all effective gradients zero?)")
    return float(np.sum(p)) / den


def token_noise(C: float, tokens: int) -> float:
    """The per-token gradient noise: the token-to-token variance of M_t = eta_t x_t^T within a sample
    relative to the squared norm of their mean, summed over samples,

        R = sum_s sum_t ||M_t - Mbar_s||^2 / sum_s T ||Mbar_s||^2 = T / C - 1,  (T tokens)

    since sum_t ||M_t - Mbar||^2 = T_s - P_s / T and ||Mbar||^2 = P_s / T^2. Monotone in 1/C."""
    if tokens < 1 or not C > 0:
        raise ValueError(f"tokens >= 1 and C > 0 needed, got {tokens!r}, {C!r}")
    return tokens / C - 1.0


def shuffled_pairing(x: Any, rng: np.random.Generator) -> np.ndarray:
    """x (S, T, d) with its tokens permuted independently in every sample: paired with the unpermuted
    eta, the null of unrelated eta-x pairing."""
    v = np.asarray(x)
    idx = np.argsort(rng.random(v.shape[:2]), axis=1)
    return np.take_along_axis(v, idx[:, :, None], axis=1)


@eqx.filter_jit
def _per_sample(model: Any, x: jax.Array, y: jax.Array):
    blocks = model.mlp_blocks()
    tokens = model.tokens_per_sample

    def one(xs, ys):
        probes = zero_probes(blocks, tokens)

        def f(pr):
            loss, (aux, _) = loss_fn(model, pr, xs[None], ys[None], None)
            return loss, aux

        (loss, aux), g = jax.value_and_grad(f, has_aux=True)(probes)
        etas = [pg["a"] * blk.act.deriv(ax["z"]) for blk, ax, pg in zip(blocks, aux, g)]
        return loss, etas, [ax["x"] for ax in aux]

    return jax.vmap(one)(x, y)


def per_sample_gradients(model: Any, x: Any, y: Any) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
    """Per sample s (vmap over the batch) of the per-sample loss L_s (the model's own objective: mean
    cross-entropy over the sample's tokens), eval mode (no noise): (L (S,), etas, xs), with etas[l]
    (S, T, n) = dL_s/dz_t of MLP block l (g_t * sigma'(z_t), g from the zero probes) and xs[l] (S, T, d)
    the inputs of K. dL_s/dK_l = etas[l][s]^T xs[l][s] (tests check it against jax.grad)."""
    loss, etas, xs = _per_sample(model, jnp.asarray(x), jnp.asarray(y))
    return np.asarray(loss), [np.asarray(e) for e in etas], [np.asarray(v) for v in xs]


def block_numbers(model: Any, x: Any, y: Any, rng: np.random.Generator | None = None) -> list[dict[str, float]]:
    """Per MLP block: C, mean_s P_s, mean_s T_s, ||K||_F^2, n d, and (with ``rng``) C of the shuffled
    pairing (:func:`shuffled_pairing`)."""
    _, etas, xs = per_sample_gradients(model, x, y)
    out = []
    for blk, e, v in zip(model.mlp_blocks(), etas, xs):
        P, T = cancellation_terms(e, v)
        K = np.asarray(blk.key.weight, np.float64)
        row = {"C": cancellation_ratio(P, T), "P": float(np.mean(P)), "T": float(np.mean(T)),
               "k_fro2": float(np.sum(K * K)), "entries": float(K.size), "tokens": float(e.shape[1])}
        if rng is not None:
            Ps, Ts = cancellation_terms(e, shuffled_pairing(v, rng))
            row["C_shuffled"] = cancellation_ratio(Ps, Ts)
        out.append(row)
    return out


def seed_numbers(blocks: Mapping[str, Sequence[Mapping[str, float]]]) -> dict[str, float]:
    """One seed's statistics from :func:`block_numbers` of each model (pure: tests feed synthetic rows).

    ``blocks``: {"init", "vanilla", "noise", "zeroth_bias"} -> per-block rows. Per-block log ratios,
    then the mean over blocks:

    - ``noise_less_cancellation`` = mean_l ln(C_noise / C_vanilla)
      (= ln(T_van / T_noise) - ln(P_van / P_noise): noise lowers T more than P);
    - ``zeroth_bias_more_token_noise`` = mean_l ln(R_zb / R_vanilla), R = tokens / C - 1;
    - ``noise_lowers_per_token`` / ``noise_lowers_per_sample`` = mean_l ln(X_van / X_noise) with
      X = T_norm or P_norm, X_norm = mean_s X_s * ||K_l||_F^2 / (n_l d_l) (invariant to K -> s K with
      the compensating change of the LN before it, G12's normalisation);
    - ``training_created_cancellation`` = mean_l ln(C_init / C_vanilla);
    - ``vanilla_below_shuffled`` = mean_l ln(C_shuffled / C) of the vanilla model;
    - ``vanilla_cancels`` = mean_l ln(1 / C_vanilla) (> 0: the tokens' terms cancel on balance).
    """
    def lr(a: str, b: str, f) -> float:
        return float(np.mean([math.log(f(x) / f(y)) for x, y in zip(blocks[a], blocks[b])]))

    def norm(key: str):
        return lambda r: r[key] * r["k_fro2"] / r["entries"]

    def noise(r):
        return token_noise(r["C"], int(r["tokens"]))

    out = {
        "noise_less_cancellation": lr("noise", "vanilla", lambda r: r["C"]),
        "zeroth_bias_more_token_noise": lr("zeroth_bias", "vanilla", noise),
        "noise_lowers_per_token": lr("vanilla", "noise", norm("T")),
        "noise_lowers_per_sample": lr("vanilla", "noise", norm("P")),
        "training_created_cancellation": lr("init", "vanilla", lambda r: r["C"]),
        "vanilla_below_shuffled": float(np.mean([math.log(r["C_shuffled"] / r["C"]) for r in blocks["vanilla"]])),
        "vanilla_cancels": float(np.mean([-math.log(r["C"]) for r in blocks["vanilla"]])),
    }
    for a, rows in blocks.items():
        out[f"C_{a}"] = float(np.mean([r["C"] for r in rows]))
        for i, r in enumerate(rows):
            out[f"C_{a}_block{i + 1}"] = float(r["C"])
        if "C_shuffled" in rows[0]:
            out[f"C_shuffled_{a}"] = float(np.mean([r["C_shuffled"] for r in rows]))
        out[f"token_noise_{a}"] = float(np.mean([noise(r) for r in rows]))
        out[f"T_norm_{a}"] = float(np.mean([norm("T")(r) for r in rows]))
        out[f"P_norm_{a}"] = float(np.mean([norm("P")(r) for r in rows]))
        out[f"T_{a}"] = float(np.mean([r["T"] for r in rows]))
        out[f"P_{a}"] = float(np.mean([r["P"] for r in rows]))
    return out


# ------------------------------------------------------------------------------------------ the plan
def arm_configs(preset: str) -> dict[str, Any]:
    """The three arms: G10's vanilla LM (= G12's rho 0), G12's rho 0.5 arm, G10's zeroth-bias arm."""
    return {"vanilla": vanilla_config(preset), "noise": noise_config(preset, RHO),
            "zeroth_bias": arm_config(preset, "zeroth_bias")}


def gate_plans() -> list[GatePlan]:
    out = [GatePlan(f"{a}_learned", ">=", MIN_LEARNED,
                    f"{a}: min over seeds of 1 - held-out loss (end) / (start): the LM learned (G10/G12's gate)", (a,))
           for a in ARM_NAMES]
    out.append(GatePlan("zb_used", ">=", MIN_FILL, f"zeroth_bias: mean over seeds and blocks of ||b0||_F / ||{CLIP} "
                        "|gamma|||_F: the bias left its zero start (G10's gate)", ("zeroth_bias",)))
    return out


PARTS = [
    PartPlan("noise_less_cancellation", "effect", "primary",
             f"mean over MLP blocks of ln(C(rho {RHO}) / C(vanilla)), C = sum_s ||sum_t eta_t x_t^T||^2 / sum_s sum_t "
             "||eta_t||^2 ||x_t||^2 on the held-out windows", MIN_LOG_C, C_SOURCE,
             gates=("vanilla_learned", "noise_learned"), why=WHY_NOISE),
    PartPlan("zeroth_bias_more_token_noise", "effect", "primary",
             "mean over MLP blocks of ln(R(zeroth bias) / R(vanilla)), R = T / C - 1 the within-sample token-to-token "
             "variance of eta_t x_t^T relative to its mean", MIN_LOG_C, C_SOURCE,
             gates=("vanilla_learned", "zeroth_bias_learned", "zb_used"), why=WHY_ZB),
    PartPlan("noise_lowers_per_token", "effect", "context",
             f"mean over blocks of ln(T_norm(vanilla) / T_norm(rho {RHO})), T_norm = mean_s sum_t ||eta_t||^2 "
             "||x_t||^2 * ||K||_F^2 / (n d)", MIN_LOG_C, C_SOURCE, gates=("vanilla_learned", "noise_learned"),
             why=WHY_T),
    PartPlan("noise_lowers_per_sample", "effect", "context",
             f"mean over blocks of ln(P_norm(vanilla) / P_norm(rho {RHO})), P_norm = mean_s ||sum_t eta_t x_t^T||^2 * "
             "||K||_F^2 / (n d)", MIN_LOG_C, C_SOURCE, gates=("vanilla_learned", "noise_learned"), why=WHY_T),
    PartPlan("training_created_cancellation", "effect", "context",
             "mean over blocks of ln(C(init) / C(vanilla trained))", MIN_LOG_C, C_SOURCE,
             gates=("vanilla_learned",), why=WHY_INIT),
    PartPlan("vanilla_below_shuffled", "effect", "context",
             "mean over blocks of ln(C_shuffled / C), vanilla trained; C_shuffled pairs eta_t with x of a random other "
             "token of the same sample", MIN_LOG_C, C_SOURCE, gates=("vanilla_learned",), why=WHY_SHUF),
    PartPlan("vanilla_cancels", "effect", "context", "mean over blocks of ln(1 / C(vanilla trained))", MIN_LOG_C,
             C_SOURCE, gates=("vanilla_learned",), why=WHY_CANCEL),
]


def plan(preset: str, p: dict[str, Any]) -> CheckPlan:
    cfgs = arm_configs(preset)
    return CheckPlan(
        arms=[arm("vanilla", cfgs["vanilla"], note="G10's vanilla = G12's rho 0"),
              arm("noise", cfgs["noise"], note=f"G12's rho {RHO} arm (token-wise synapse noise)"),
              arm("zeroth_bias", cfgs["zeroth_bias"], note="G10's zeroth-bias arm")],
        parts=list(PARTS), gates=gate_plans(), seeds=None if preset == "smoke" else SEEDS,
        notes=["no new training: the arms are G10's and G12's runs; analysis only (per-sample gradients by vmap on "
               "the vanilla run's held-out windows, the same windows for every arm of a seed)", PILOT])


# ------------------------------------------------------------------------------------------ run
def learned(runs: Sequence[Any]) -> float:
    """min over seeds of 1 - held-out loss (last 10%) / held-out loss (first log)."""
    return min(1.0 - heldout_loss(r) / r.history[0]["heldout/loss"] for r in runs)


def run(ctx: Context, p: dict[str, Any]) -> Finding:
    cfgs = arm_configs(ctx.preset)
    runs = {"vanilla": lm_runs(ctx), "noise": lm_runs(ctx, weight_noise="synapse", rho=RHO),
            "zeroth_bias": arm_runs(ctx, "zeroth_bias")}
    vcfg = cfgs["vanilla"]
    ds = ctx.data(vcfg.data, vcfg.n_train, vcfg.n_test)
    nums, fills = [], []
    for i, s in enumerate(ctx.seeds):
        x, y = heldout(ctx, vcfg.replace(seed=s))
        rng = np.random.default_rng([SHUFFLE_TAG, int(s)])
        blocks = {"init": block_numbers(init_model(vcfg.replace(seed=s), ds), x, y, rng)}
        for a, rs in runs.items():
            blocks[a] = block_numbers(rs[i].model, x, y, rng)
        nums.append(seed_numbers(blocks))
        fills.append(float(np.mean([f["fill"] for f in zeroth_bias_fill(runs["zeroth_bias"][i].model, CLIP)])))
    per_seed = {k: [n[k] for n in nums] for k in nums[0]}
    per_seed["zb_fill"] = fills
    for a, rs in runs.items():
        per_seed[f"heldout_loss_{a}"] = [heldout_loss(r) for r in rs]
    parts = {q.name: effect_verdict(per_seed[q.name], float(q.delta), source=q.source, what=q.what) for q in PARTS}
    by = {g.name: g for g in gate_plans()}
    value = {f"{a}_learned": learned(runs[a]) for a in ARM_NAMES}
    value["zb_used"] = float(np.mean(fills))
    gates = [Gate(n, float(value[n]), by[n].op, by[n].threshold, by[n].what) for n in by]
    S = vcfg.seq_len
    g = lambda k: mean_sd(per_seed[k])  # noqa: E731
    measured = (f"C (held-out, {vcfg.eval_batch} windows x {S} tokens, mean over blocks): init {g('C_init')}, vanilla "
                f"{g('C_vanilla')}, rho {RHO} {g('C_noise')}, zeroth bias {g('C_zeroth_bias')}; shuffled pairing "
                f"(vanilla) {g('C_shuffled_vanilla')}; token noise R = {S}/C - 1: vanilla {g('token_noise_vanilla')}, "
                f"zeroth bias {g('token_noise_zeroth_bias')}; T_norm vanilla {g('T_norm_vanilla')} vs rho {RHO} "
                f"{g('T_norm_noise')}, P_norm {g('P_norm_vanilla')} vs {g('P_norm_noise')}")
    ser = {"C": {a: per_seed[f"C_{a}"] for a in ("init", "vanilla", "noise", "zeroth_bias")},
           "C_shuffled": {a: per_seed[f"C_shuffled_{a}"] for a in ("init", "vanilla", "noise", "zeroth_bias")},
           "seq_len": S}
    return Finding(None, measured, per_seed=per_seed, parts=parts, gates=gates, series=ser,
                   model=f"{describe(vcfg)}; arms: vanilla, synapse noise rho {RHO}, zeroth bias",
                   numbers={"tokens_per_sample": float(S), "windows": float(vcfg.eval_batch)},
                   notes=[f"eta_t = dL_s/dz_t of the per-sample loss (mean cross-entropy over the sample's {S} "
                          "tokens), by vmap over the held-out windows with the zero probes, eval mode (no noise); the "
                          "scale of the loss cancels in C",
                          "the same held-out windows (the vanilla run's) for all arms and the initialisation of a seed",
                          "C = 1 exactly with one token per sample (the MLP); C = S "
                          "for S identical tokens; C < 1: the tokens' rank-one terms cancel in dL_s/dK"])


def figures(ser: dict[str, Any], out_dir) -> list:
    groups = {a.replace("_", " "): {"C": ser["C"][a], "C shuffled pairing": ser["C_shuffled"][a]} for a in ser["C"]}
    return plot_bars(groups, out_dir / "g19_cancellation", ylabel="C = sum_s P_s / sum_s T_s (1: no cancellation)",
                     title=f"G19: per-sample vs per-token gradient of K (byte LM, {ser['seq_len']} tokens per sample)")


CHECK = Check(
    name="G19",
    slug="g19_token_cancellation",
    title="Token cancellation: why weight noise",
    claim=("In a small Transformer (32 tokens per sample), the per-sample gradient of K, sum_t eta_t x_t^T, is small "
           "partly through cancellation between tokens; token-wise synapse noise (rho 0.5) penalises the per-token "
           "terms, so it leaves less cancellation (larger C) than the noise-free model, and the zeroth bias raises "
           "the per-token gradient noise (token-to-token variance of eta_t x_t^T relative to its mean) over vanilla."),
    rule=(f"Per seed, per MLP block C = sum_s ||sum_t eta_t x_t^T||^2 / sum_s sum_t ||eta_t||^2 ||x_t||^2 on the "
          f"held-out windows, mean over blocks of log ratios. Primary: ln(C(rho {RHO}) / C(vanilla)) and ln(R(zeroth "
          f"bias) / R(vanilla)), R = T / C - 1, delta {MIN_LOG_C:.3g} each; PASS when the one-sided 95% lower bound "
          f"> 0 and the mean > delta, FAIL when the upper bound < delta; PASS needs both. Gates: every arm learned "
          f"(held-out loss fell >= {MIN_LEARNED:.0%}), the zeroth bias filled >= {MIN_FILL} of its clip range. "
          f"Context: T and P separately, C at init vs trained, C vs shuffled token pairing."),
    presets={k: {"lm": LM[k]} for k in ("smoke", "quick", "standard", "full")},
    run=run,
    figures=figures,
    plan=plan,
)
