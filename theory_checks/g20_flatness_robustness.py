"""G20: a flatter minimum (smaller tr(H_K)) is more robust to perturbations of the hidden features
and of the weights.

Claim (arXiv 2309.03004, the first link of the argument; SPEC 5): flatness with respect to the key
matrices K implies robustness. For the key layer z_t = K x_t of an MLP block, dL/dK = sum_t eta_t x_t^T
(eta_t = dL/dz_t), so the Gauss-Newton part of tr(H_K) is a sum over tokens of ||x_t||^2 times the
curvature of the loss in z_t, and dL/dx_t = K^T eta_t: with LayerNorm fixing ||x_t||, a small
tr(H_K) goes with small loss sensitivities to the hidden features (the "implicit adversarial
robustness" of the paper) and to the weights. Measured on the FINAL models of arms the suite
already trains (no new training), against tr(H_K) as the runs logged it.

Quantities, per run (one seed of one arm):

- R_x = E_samples sum_t sum_l ||dl/dx_{t,l}||^2 (:func:`feature_sensitivity`): l the per-sample loss
  (the mean cross-entropy over the sample's tokens; one token per sample for the mnist1d MLP),
  x_{t,l} the MLP input of block l (LN output, the input of K), dl/dx = (dl/dz) K, summed over all
  blocks (tr(H_K) is logged over all blocks' K), on the run's fixed held-out batch. Scale-normalised
  (:func:`normalised_rx`): R_x~ = sum_l R_{x,l} * mean_t ||x_{t,l}||^2 / d, the sensitivity to a
  RELATIVE perturbation of x (under K_l -> s K_l with the LN's gamma, beta -> /s, the same function,
  x -> x/s and R_{x,l} -> s^2 R_{x,l}: R_x~ is invariant, as G12's T_norm is).
- Weight perturbations of K (all blocks' key matrices jointly, p entries) of Frobenius norm eps,
  on the run's fixed training subset (the surface tr(H_K) was logged on), eps RELATIVE to ||K||_F
  (so invariant to the rescaling above):
  * random directions (:func:`random_increase`): the antithetic increase
    (L(K + eps u) + L(K - eps u))/2 - L(K) (odd orders cancel exactly), mean over ``draws``
    directions u uniform on the unit sphere; to second order eps^2/(2p) u^T H u per draw, whose
    mean is eps^2/(2p) tr(H_K) (the consistency part, against the logged trace at the last log);
    eps_rand = 1e-2 ||K||_F;
  * worst case (:func:`worst_increase`): normalised gradient ascent on the sphere ||dK||_F = eps
    (u <- grad L(K + eps u) / ||.||, ``ascent_steps`` steps from the gradient's direction; at a
    minimum of a quadratic this is power iteration, so it finds the top eigenvector), the increase
    L(K + eps u) - L(K) and the curvature along u, lambda_u = 2 (antithetic increase) / eps^2;
    eps_worst = 1e-3 ||K||_F (at 1e-2 the second-order term eps^2 lambda_max / 2 is of order 1 nat:
    not small; pilot below).
- tr(H_K): the Hutchinson estimate the runs logged (``flat/trace_k``, fixed training subset),
  scale-normalised as G12 (:func:`theory_checks.g12_weight_noise_transformer.normalised_trace`:
  T_norm = tr(H_K) sum_l ||K_l||_F^2 / p), mean over the last quarter of training (G5's "end").
- AF_K (``fixed/af_k``, summed over blocks, last quarter), normalised like the trace (AF_K -> AF_K/s^2
  under the rescaling): does it track tr(H_K)?

Arms (all trained by other checks, same configs => same runs): G5's SGD-noise arms on the plain-SGD
mnist1d baseline (``ref``: lr 0.1 B 32; ``lowlr``: lr 0.01; ``bigB``: B 128) and G12's byte-LM arms
(``lm_rho0``; ``lm_rho0.5``: synapse noise rho 0.5), on the context's seeds (quick: 0-2, a subset of
G12's five).

Statistic (pre-registered). For a pair of arms (a, b) and a seed: s = sign(ln T_norm(a) / T_norm(b))
(which arm the logged trace calls sharper) and effect = s * ln(R(a) / R(b)) for R = R_x~ (part
``*_robust_x``) or the worst-case increase (``*_robust_w``): > 0 when the flatter arm is the more
robust. The orientation is read per seed from the trace, not assumed, so the claim "flatter =>
more robust" is tested whichever arm is flatter. :func:`~theory_checks.verdicts.effect_verdict`,
delta 0.1 (a 10% difference of R, G5's log-trace delta; the flatness differences the pairs carry
are ln ~1.3-1.6 (pilot), so a robustness that followed the trace even at a fifth of its slope would exceed it).

- primary: ``sgd_lr_robust_x``, ``sgd_lr_robust_w`` (lowlr vs ref) and ``lm_noise_robust_x``,
  ``lm_noise_robust_w`` (rho 0 vs rho 0.5).
- context: ``*_robust_x_amplification`` (R_x~ divided by the output-gradient factor G_out =
  E_samples sum_t ||dl/dlogits_t||^2: the robustness with the loss level divided out, see gates);
  ``sgd_batch_robust_x`` / ``_w`` (bigB vs ref: gated on bigB not interpolated, which the pilot and
  G5 say it is not: INCONCLUSIVE expected); ``*_af_tracks_trace`` (s * ln AF_norm ratio, delta 0.1);
  ``random_matches_trace`` (margin part: |ln(random increase / (eps^2/(2p) tr(H_K) at the last log))|,
  mean over the five arms per seed, margin ln 1.5: the Hutchinson SE of one 8-probe estimate,
  3.5-7%, plus the spread of u^T H u over ``draws`` directions; a consistency check, not the claim).

Gates, per arm (every arm a part compares), and why: all these quantities scale with the loss level
(the cross-entropy factor 1 - ||p||^2 ~ 2 loss of G5's docstring multiplies R_x, the gradients and the
Gauss-Newton Hessian alike), so an interpolated arm is "flat" and "robust" only because its loss is
tiny. A comparison at matched loss (G5's rule) needs the models at the matched step, and the runs keep
only their final model (checkpoint_every 0), so the parts gate every arm on the regime instead:
``<arm>_not_interpolated`` (min over seeds of the last-10% fixed-subset loss >= 0.05, G5's floor) and
``<arm>_learned`` (max over seeds of it <= ln(C)/2, half the chance loss of C classes: 10 for mnist1d,
256 bytes for the LM; G15's rule), and each pair on ``<pair>_separated`` (min over seeds of
|ln T_norm(a)/T_norm(b)| >= 0.1, G5's log-trace delta: the trace orders the pair beyond its
Hutchinson error). The loss levels of a gated pair still differ (pilot: lowlr above ref), which is
why the amplification part divides G_out out: it is context because the claim is about robustness
itself (the loss increase), whose loss-level factor is part of what flatness predicts.

Pilot (seeds 1000-1002, outside the test seeds, quick;
``python -m theory_checks.pilot G20 --preset quick --seeds 1000 1001 1002``: this module's own
``run`` on ``Context(preset="quick", seeds=[1000, 1001, 1002])`` over the five arms, trained through
``sgd_runs`` / ``lm_runs``; the analysis took 38 s at load 6-8 with a
cold compilation cache, before both LM arms shared one compiled structure). Per arm, mean over the seeds:

| arm | fixed loss | T_norm | R_x~ | dL_worst | eps^2 lambda_max/2 | ||grad|| | random / closed form |
|---|---|---|---|---|---|---|---|
| ref | 0.217 | 0.605 | 3.85 | 0.024 | 0.0019 | 0.83 | 2.17 |
| lowlr | 0.303 | 2.37 | 6.01 | 0.054 | 0.0056 | 1.89 | 1.96 |
| bigB | 8.9e-4 | 0.047 | 20.8 | 1.8e-4 | 6e-5 | 0.005 | 2.20 |
| lm_rho0 | 2.00 | 0.738 | 0.037 | 0.0019 | 1e-4 | 0.14 | 1.11 |
| lm_rho0.5 | 2.07 | 0.165 | 0.011 | 7.2e-4 | 1e-5 | 0.044 | 1.01 |

Effects (primary): sgd_lr_robust_x 0.43 / 0.41 / 0.49, sgd_lr_robust_w 0.66 / 0.79 / 0.89,
lm_noise_robust_x 1.17 / 1.20 / 1.19, lm_noise_robust_w 0.95 / 1.12 / 0.82 (all well above delta
0.1; the delta was fixed before the pilot and not changed). Context: the amplification 0.31 and 1.21,
the second-order worst case 1.09 and 1.82, AF_K orders the pairs as the trace (0.79, 1.55; within a
run, late-half Spearman(AF_K, tr) 0.71-1.0 except ref seed 1002, -0.03). Gates pass for ref, lowlr
and both LM arms; bigB interpolated (loss 8e-4): flatter by 2.4 in ln T_norm than ref, yet its
held-out R_x~ is 5x ref's (confident errors on held-out inputs: the training-set flatness of an
interpolated arm says nothing about its held-out feature robustness), which is exactly why such an
arm cannot enter the comparison.

Findings of the pilot that shape the reading (written before the test seeds):

- the worst-case increase at eps = 1e-3 ||K|| is first-order: the ascent ends within cos 0.99 of the
  gradient and dL_worst ~ eps ||grad L||. The final SGD models are not stationary points of the
  fixed-subset loss, so the ``_w`` primaries compare gradient norms as much as curvature; the
  ``_w_second_order`` context part is the curvature part (eps^2 lambda_max / 2).
- ``random_matches_trace`` is expected to FAIL on the mnist1d arms: the antithetic random-direction
  increase of the ReLU MLP is ~2x eps^2/(2p) tr(H_K), and the ratio is the same at eps = 1e-1, 3e-2
  and 1e-2 ||K|| (2.15, 2.14, 2.17; 16 draws, ref seed 1000, trace recomputed at the final model
  with 32 probes; an exploratory script, not part of the package), so it is not a higher-order term:
  it is the ReLU kinks, units whose pre-activation crosses 0 under the perturbation, whose
  contribution is also O(eps^2) but which the autodiff Hessian (sigma'' = 0) does not see. With a
  smooth activation the closed form holds (tests/test_checks_g20.py, GELU). The logged Hutchinson
  tr(H_K) of a ReLU network thus measures the smooth part of the curvature only, about half of what
  a random perturbation feels.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from gradsparse.data import Batcher
from gradsparse.factory import RunKeys
from gradsparse.flatness import hvp
from gradsparse.models import zero_probes
from gradsparse.step import loss_fn
from theory_checks.context import (LM, SGD, Context, describe, heldout, lm_config, lm_runs, sgd_config, sgd_runs,
                                   window_rows)
from theory_checks.g04_flatness_together import spearman
from theory_checks.g05_sgd_noise import LOSS_FLOOR, MIN_LOG_TRACE
from theory_checks.g12_weight_noise_transformer import late_mean, normalised_trace
from theory_checks.plan import CheckPlan, GatePlan, PartPlan, arm
from theory_checks.protocol import Check, Finding
from theory_checks.verdicts import Gate, Verdict, effect_verdict, margin_verdict, mean_sd

Array = jax.Array

#: delta of the robustness parts (ln units: a 10% difference of R)
MIN_LOG_R = 0.1
#: margin of the consistency part: |ln(random increase / (eps^2/(2p) tr(H_K)))|
CONSISTENCY_MARGIN = math.log(1.5)
#: relative perturbation sizes: eps = REL * ||K||_F (all blocks' K jointly)
EPS_RAND_REL = 1e-2
EPS_WORST_REL = 1e-3
PILOT = ("pilot seeds 1000-1002: effects 0.41-0.49 (sgd R_x), 0.66-0.89 (sgd worst), 1.17-1.20 (LM R_x), "
         "0.82-1.12 (LM worst)")
R_SOURCE = ("a 10% difference of the robustness measure (G5's log-trace delta); the pairs' flatness differences are "
            "ln ~1.3-1.6, so robustness following the trace at a fifth of its slope exceeds it; " + PILOT)
C_SOURCE = ("the Hutchinson SE of one 8-probe trace estimate (3.5-7%, CHECKS_REVIEW_T3 5.3) plus the spread of "
            "u^T H u over the random directions: a factor 1.5 either way")
SEP_SOURCE = "G5's log-trace delta: the logged trace orders the pair beyond its Hutchinson error"

#: {pair: (arm a, arm b)}; the per-seed orientation comes from the logged trace, not from this order
PAIRS: dict[str, tuple[str, str]] = {"sgd_lr": ("lowlr", "ref"), "lm_noise": ("lm_rho0", "lm_rho0.5"),
                                     "sgd_batch": ("bigB", "ref")}
#: classes per arm family (for the learned gate: loss <= ln(C)/2)
CLASSES = {"sgd": 10, "lm": 256}

WHY_X = ("the paper's first link: a flat minimum in K is robust to perturbations of the hidden features x (dl/dx = "
         "K^T eta; tr(H_K) sums ||x_t||^2 times the curvature in z_t, and LayerNorm fixes ||x_t||), so across arms "
         "the one whose logged tr(H_K) is smaller has the smaller scale-normalised R_x; both arms in the "
         "fitted-but-not-interpolated regime")
WHY_W = ("the same link for the weights: a flat minimum in K has a smaller worst-case loss increase under a "
         "perturbation of K of the same relative size (eps = 1e-3 ||K||_F)")


def arm_configs(preset: str) -> dict[str, Any]:
    """{arm: TrainConfig} (seed a placeholder): G5's three SGD arms and G12's two LM arms."""
    return {"ref": sgd_config(preset), "lowlr": sgd_config(preset, lr=0.01), "bigB": sgd_config(preset, batch_size=128),
            "lm_rho0": lm_config(preset), "lm_rho0.5": lm_config(preset, weight_noise="synapse", rho=0.5)}


def family(a: str) -> str:
    return "lm" if a.startswith("lm_") else "sgd"


def _ng(a: str) -> str:
    return f"{a}_not_interpolated"


def _lg(a: str) -> str:
    return f"{a}_learned"


def _sg(pair: str) -> str:
    return f"{pair}_separated"


def _pair_gates(pair: str) -> tuple[str, ...]:
    a, b = PAIRS[pair]
    return (_ng(a), _lg(a), _ng(b), _lg(b), _sg(pair))


def _parts() -> list[PartPlan]:
    out: list[PartPlan] = []
    for pair, (a, b) in PAIRS.items():
        role = "context" if pair == "sgd_batch" else "primary"
        why_c = "context: bigB interpolates at quick (G5), where every quantity scales with the loss" \
            if pair == "sgd_batch" else ""
        out += [
            PartPlan(f"{pair}_robust_x", "effect", role,
                     f"s * ln R_x~({a}) / R_x~({b}), s = sign ln T_norm({a}) / T_norm({b}): the flatter arm has the "
                     "smaller scale-normalised feature sensitivity", MIN_LOG_R, R_SOURCE, gates=_pair_gates(pair),
                     why=why_c or WHY_X),
            PartPlan(f"{pair}_robust_w", "effect", role,
                     f"s * ln dL_worst({a}) / dL_worst({b}): the flatter arm has the smaller worst-case loss increase "
                     f"under ||dK||_F = {EPS_WORST_REL:g} ||K||_F", MIN_LOG_R, R_SOURCE, gates=_pair_gates(pair),
                     why=why_c or WHY_W)]
        if pair != "sgd_batch":
            out += [
                PartPlan(f"{pair}_robust_x_amplification", "effect", "context",
                         f"s * ln (R_x~/G_out)({a}) / (R_x~/G_out)({b}): with the output-gradient (loss-level) factor "
                         "divided out", MIN_LOG_R, R_SOURCE, gates=_pair_gates(pair),
                         why="context: separates the network's amplification from the loss level; the claim is about "
                             "the loss increase itself"),
                PartPlan(f"{pair}_robust_w_second_order", "effect", "context",
                         f"s * ln dL2({a}) / dL2({b}), dL2 = eps^2 lambda_max(H_K) / 2 at eps = {EPS_WORST_REL:g} "
                         "||K||_F (power iteration): the worst case without the gradient's first-order term",
                         MIN_LOG_R, R_SOURCE, gates=_pair_gates(pair),
                         why="context: the final SGD models are not stationary, so the worst-case increase is mostly "
                             "eps ||grad||; this is its curvature part"),
                PartPlan(f"{pair}_af_tracks_trace", "effect", "context",
                         f"s * ln AF_norm({a}) / AF_norm({b}) (fixed subset, last quarter): AF_K orders the pair as "
                         "tr(H_K) does", MIN_LOG_R, R_SOURCE, gates=_pair_gates(pair),
                         why="context: the review asks whether AF_K tracks tr(H_K) for a well-learned model")]
    out.append(PartPlan("random_matches_trace", "margin", "context",
                        "|ln(random-direction antithetic increase / (eps^2/(2p) tr(H_K) at the last log))|, mean over "
                        "the five arms", CONSISTENCY_MARGIN, C_SOURCE, gates=(),
                        why="context: a consistency check of the closed form (second order), not the claim"))
    return out


PARTS = _parts()


def gate_plans() -> list[GatePlan]:
    out: list[GatePlan] = []
    for a in ("ref", "lowlr", "bigB", "lm_rho0", "lm_rho0.5"):
        c = CLASSES[family(a)]
        out.append(GatePlan(_ng(a), ">=", LOSS_FLOOR, f"{a}: min over seeds of its last-10% fixed-subset loss (G5's "
                            "floor: below it the arm interpolated and every quantity shrinks with its loss)", (a,)))
        out.append(GatePlan(_lg(a), "<=", math.log(c) / 2, f"{a}: max over seeds of its last-10% fixed-subset loss "
                            f"(ln({c})/2, half the chance loss: past the first phase of fitting)", (a,)))
    for pair, (a, b) in PAIRS.items():
        out.append(GatePlan(_sg(pair), ">=", MIN_LOG_TRACE, f"min over seeds of |ln T_norm({a}) / T_norm({b})| "
                            f"(logged trace, last quarter): {SEP_SOURCE}", (a, b)))
    return out


def plan(preset: str, p: dict[str, Any]) -> CheckPlan:
    return CheckPlan(arms=[arm(a, c, note="G5's arm" if family(a) == "sgd" else "G12's arm")
                           for a, c in arm_configs(preset).items()],
                     parts=list(PARTS), gates=gate_plans(),
                     notes=[f"no new training (G5's and G12's runs); final models; R_x on the held-out batch, weight "
                            f"perturbations on the fixed training subset; eps_rand {EPS_RAND_REL:g} ||K||_F "
                            f"({p['draws']} antithetic draws), eps_worst {EPS_WORST_REL:g} ||K||_F "
                            f"({p['ascent_steps']} normalised ascent steps)"])


# ------------------------------------------------------------------------------ pytree helpers

def _dot(a: Any, b: Any) -> Array:
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def _norm(a: Any) -> Array:
    return jnp.sqrt(_dot(a, a))


def _axpy(alpha: Any, x: Any, y: Any) -> Any:
    """y + alpha x (pytrees)."""
    return jax.tree_util.tree_map(lambda u, v: v + alpha * u, x, y)


def _scale(alpha: Any, x: Any) -> Any:
    return jax.tree_util.tree_map(lambda u: alpha * u, x)


def _normal_like(key: Array, tree: Any) -> Any:
    leaves, td = jax.tree_util.tree_flatten(tree)
    ks = jax.random.split(key, max(len(leaves), 1))
    return jax.tree_util.tree_unflatten(td, [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(ks, leaves)])


# ------------------------------------------------------------------------------ weight perturbations

def random_increase(f: Callable[[Any], Array], params: Any, eps: Any, key: Array, draws: int
                    ) -> tuple[Array, Array]:
    """(mean, values (draws,)) of the antithetic loss increase (f(w + eps u) + f(w - eps u))/2 - f(w)
    over ``draws`` directions u uniform on the unit sphere of the pytree ``params``.

    Odd orders cancel exactly; to second order each value is eps^2/2 u^T H u, whose mean over u is
    eps^2/(2p) tr(H) (p = number of entries). Traceable (use inside jit)."""
    if not isinstance(draws, int) or draws < 1:
        raise ValueError(f"draws: must be an int >= 1, got {draws!r}")
    f0 = f(params)

    def one(k: Array) -> Array:
        u = _normal_like(k, params)
        u = _scale(1.0 / _norm(u), u)
        return 0.5 * (f(_axpy(eps, u, params)) + f(_axpy(-eps, u, params))) - f0

    vals = jax.lax.map(one, jax.random.split(key, draws))
    return jnp.mean(vals), vals


def worst_increase(f: Callable[[Any], Array], params: Any, eps: Any, key: Array, steps: int
                   ) -> dict[str, Array]:
    """The loss increase along an (approximately) worst direction of norm ``eps``.

    Normalised gradient ascent on the sphere: u_0 = grad f(w) / ||.|| (a random direction when the
    gradient is 0), u <- grad f(w + eps u) / ||.||, ``steps`` times (at a minimum of a quadratic this
    is power iteration: u -> top eigenvector of H). Returns {'increase': f(w + eps u) - f(w),
    'lambda_u': 2 ((f(w + eps u) + f(w - eps u))/2 - f(w)) / eps^2 (u^T H u to second order),
    'grad_norm': ||grad f(w)||, 'cos_grad': cosine between u and grad f(w)}. Traceable."""
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps: must be an int >= 0, got {steps!r}")
    f0, g0 = jax.value_and_grad(f)(params)
    r = _normal_like(key, params)
    gn = _norm(g0)
    u0 = jax.tree_util.tree_map(lambda g, q: jnp.where(gn > 0, g / jnp.where(gn > 0, gn, 1.0), q / _norm(r)), g0, r)

    def body(_, u):
        g = jax.grad(f)(_axpy(eps, u, params))
        n = _norm(g)
        return jax.tree_util.tree_map(lambda gi, ui: jnp.where(n > 0, gi / jnp.where(n > 0, n, 1.0), ui), g, u)

    u = jax.lax.fori_loop(0, steps, body, u0)
    fp, fm = f(_axpy(eps, u, params)), f(_axpy(-eps, u, params))
    return {"increase": fp - f0, "lambda_u": 2.0 * (0.5 * (fp + fm) - f0) / (eps * eps), "grad_norm": gn,
            "cos_grad": _dot(u, g0) / jnp.where(gn > 0, gn, 1.0)}


def top_curvature(f: Callable[[Any], Array], params: Any, key: Array, steps: int) -> Array:
    """The Rayleigh quotient u^T H u / u^T u after ``steps`` power iterations u <- H u / ||H u|| from a
    random start (H the Hessian of ``f`` at ``params``, by Hessian-vector products): the top eigenvalue
    (largest in magnitude) for enough steps, a lower bound on it otherwise. Traceable."""
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps: must be an int >= 1, got {steps!r}")
    r = _normal_like(key, params)

    def body(_, u):
        h = hvp(f, params, u)
        n = _norm(h)
        return jax.tree_util.tree_map(lambda hi, ui: jnp.where(n > 0, hi / jnp.where(n > 0, n, 1.0), ui), h, u)

    u = jax.lax.fori_loop(0, steps, body, _scale(1.0 / _norm(r), r))
    return _dot(u, hvp(f, params, u)) / _dot(u, u)


# ------------------------------------------------------------------------------ on a model

def key_weights(model: Any) -> list[Array]:
    """The key matrices K_l (n, d) of all MLP blocks (the leaves tr(H_K) is taken over)."""
    return [b.key.weight for b in model.mlp_blocks()]


def with_keys(model: Any, ks: Sequence[Array]) -> Any:
    return eqx.tree_at(lambda m: [b.key.weight for b in m.mlp_blocks()], model, list(ks))


def mean_loss(model: Any, x: Array, y: Array) -> Array:
    """The training loss (mean cross-entropy over all tokens) of ``model`` on (x, y), eval mode."""
    probes = zero_probes(model.mlp_blocks(), x.shape[0] * model.tokens_per_sample)
    return loss_fn(model, probes, x, y, None)[0]


@eqx.filter_jit
def feature_sensitivity(model: Any, x: Array, y: Array) -> dict[str, Array]:
    """Per block l: R_x,l = E_samples sum_t ||dl/dx_{t,l}||^2 ('rx', (L,)), and mean_t ||x_{t,l}||^2
    ('x_sq', (L,)); and G_out = E_samples sum_t ||dl/dlogits_t||^2 ('g_out').

    l = the per-sample loss (mean cross-entropy over the sample's tokens): the gradient of the SUM
    over samples of l is B x the gradient of the mean over all tokens. dl/dx = (dl/da * sigma'(z)) K_eff
    (x is the input of the key layer z = K x + b only)."""
    blocks = model.mlp_blocks()
    b_sz = x.shape[0]
    tps = model.tokens_per_sample
    probes = zero_probes(blocks, b_sz * tps)

    def f(pr):
        loss, (aux, _) = loss_fn(model, pr, x, y, None)
        return loss * b_sz, aux

    (_, aux), g = jax.value_and_grad(f, has_aux=True)(probes)
    rx, xsq = [], []
    for blk, ax, pg in zip(blocks, aux, g):
        dx = (pg["a"] * blk.act.deriv(ax["z"])) @ blk.key.effective_weight()
        rx.append(jnp.sum(dx * dx) / b_sz)
        xsq.append(jnp.mean(jnp.sum(ax["x"] * ax["x"], -1)))
    logits = model(x, probes)[0]
    p = jax.nn.softmax(logits, -1)
    go = p - jax.nn.one_hot(y.reshape(-1), logits.shape[-1], dtype=p.dtype)
    return {"rx": jnp.stack(rx), "x_sq": jnp.stack(xsq), "g_out": jnp.sum(go * go) / (tps * tps * b_sz)}


@eqx.filter_jit
def weight_robustness(model: Any, x: Array, y: Array, key: Array, rel_rand: float, rel_worst: float, draws: int,
                      steps: int) -> dict[str, Array]:
    """Random-direction and worst-case loss increases under perturbations of all key matrices (one
    pytree, p entries) of norm rel * ||K||_F, on (x, y) (module docstring)."""
    ks = key_weights(model)

    def f(k):
        return mean_loss(with_keys(model, k), x, y)

    kn = _norm(ks)
    k1, k2, k3 = jax.random.split(key, 3)
    rmean, rvals = random_increase(f, ks, rel_rand * kn, k1, draws)
    w = worst_increase(f, ks, rel_worst * kn, k2, steps)
    lam = top_curvature(f, ks, k3, 2 * steps)
    return {"loss": f(ks), "k_norm": kn, "rand_increase": rmean, "rand_values": rvals, "lambda_max": lam,
            "worst2": 0.5 * (rel_worst * kn) ** 2 * lam,
            "worst_increase": w["increase"], "lambda_u": w["lambda_u"], "grad_norm": w["grad_norm"],
            "cos_grad": w["cos_grad"]}


def normalised_rx(rx: Sequence[float], x_sq: Sequence[float], d: int) -> float:
    """R_x~ = sum_l R_{x,l} mean_t ||x_{t,l}||^2 / d: invariant to K_l -> s K_l against the LN before it."""
    if d < 1:
        raise ValueError(f"d: must be >= 1, got {d!r}")
    r, q = np.asarray(rx, np.float64), np.asarray(x_sq, np.float64)
    if r.shape != q.shape:
        raise ValueError(f"rx and x_sq must have one value per block, got {r.shape} and {q.shape}")
    return float(np.sum(r * q) / d)


def random_closed_form(eps: float, trace: float, p: int) -> float:
    """eps^2 / (2p) tr(H): the second-order mean loss increase along a random direction of norm eps."""
    if p < 1:
        raise ValueError(f"p: must be >= 1, got {p!r}")
    return float(eps) ** 2 * float(trace) / (2 * p)


# ------------------------------------------------------------------------------ logs -> numbers

def log_numbers(history: Sequence[Mapping[str, Any]], p_entries: int) -> dict[str, float]:
    """From a run's log: last-10% fixed-subset loss, last-quarter raw and normalised tr(H_K) and AF_K
    (summed over blocks, normalised by sum ||K_l||^2 / p), the trace at the last log. Pure."""
    rows = [h for h in history if "flat/trace_k" in h]
    if not rows:
        raise ValueError("no flat/trace_k in the training log (flatness_every = 0?)")
    s = np.asarray([h["step"] for h in rows], np.float64)
    raw = np.asarray([h["flat/trace_k"] for h in rows], np.float64)
    kf = [h["heldout/k_fro2"] for h in rows]
    norm = np.asarray([normalised_trace(t, k, p_entries) for t, k in zip(raw, kf)])
    af = np.asarray([np.sum(h["fixed/af_k"]) for h in rows], np.float64)
    afn = np.asarray([normalised_trace(a, k, p_entries) for a, k in zip(af, kf)])
    ls = np.asarray([h["step"] for h in history if "fixed/loss" in h], np.float64)
    lv = np.asarray([h["fixed/loss"] for h in history if "fixed/loss" in h], np.float64)
    half = window_rows(s, 0.5)
    rho = spearman(af[half], raw[half]) if int(half.sum()) >= 3 else math.nan
    return {"loss": float(np.mean(lv[window_rows(ls, 0.9)])), "trace": late_mean(s, raw), "trace_norm": late_mean(s, norm),
            "af": late_mean(s, af), "af_norm": late_mean(s, afn), "trace_last": float(raw[-1]),
            "trace_last_step": float(s[-1]), "af_trace_spearman_late": float(rho)}


def oriented(a: float, b: float, ta: float, tb: float) -> float:
    """sign(ln ta/tb) * ln(a/b): > 0 when the arm with the smaller trace has the smaller value; NaN
    when a value or trace is not positive and finite."""
    vals = (a, b, ta, tb)
    if not all(math.isfinite(v) and v > 0 for v in vals):
        return math.nan
    return math.copysign(1.0, math.log(ta / tb)) * math.log(a / b)


def measure(nums: Mapping[str, Sequence[Mapping[str, float]]]) -> tuple[dict[str, list[float]], list[Gate]]:
    """Per-part per-seed values and the gates from ``nums`` = {arm: [per-seed numbers]} with keys
    loss, trace_norm, af_norm, rx_norm, rx_amp, worst, worst2, rand_ratio (pure: tests feed synthetic numbers)."""
    n = len(next(iter(nums.values())))
    vals: dict[str, list[float]] = {}
    for pair, (a, b) in PAIRS.items():
        A, Bn = nums[a], nums[b]
        t = [(A[i]["trace_norm"], Bn[i]["trace_norm"]) for i in range(n)]
        vals[f"{pair}_robust_x"] = [oriented(A[i]["rx_norm"], Bn[i]["rx_norm"], *t[i]) for i in range(n)]
        vals[f"{pair}_robust_w"] = [oriented(A[i]["worst"], Bn[i]["worst"], *t[i]) for i in range(n)]
        if pair != "sgd_batch":
            vals[f"{pair}_robust_x_amplification"] = [oriented(A[i]["rx_amp"], Bn[i]["rx_amp"], *t[i])
                                                      for i in range(n)]
            vals[f"{pair}_af_tracks_trace"] = [oriented(A[i]["af_norm"], Bn[i]["af_norm"], *t[i]) for i in range(n)]
            vals[f"{pair}_robust_w_second_order"] = [oriented(A[i]["worst2"], Bn[i]["worst2"], *t[i])
                                                     for i in range(n)]
    vals["random_matches_trace"] = [float(np.mean([abs(math.log(nums[a][i]["rand_ratio"]))
                                                   if nums[a][i]["rand_ratio"] > 0 else math.inf for a in nums]))
                                    for i in range(n)]
    by = {g.name: g for g in gate_plans()}
    gates: list[Gate] = []
    for a in nums:
        losses = [x["loss"] for x in nums[a]]
        for name, v in ((_ng(a), min(losses)), (_lg(a), max(losses))):
            g = by[name]
            gates.append(Gate(name, float(v), g.op, g.threshold, g.what))
    for pair, (a, b) in PAIRS.items():
        sep = [abs(math.log(nums[a][i]["trace_norm"] / nums[b][i]["trace_norm"]))
               if nums[a][i]["trace_norm"] > 0 and nums[b][i]["trace_norm"] > 0 else 0.0 for i in range(n)]
        g = by[_sg(pair)]
        gates.append(Gate(g.name, float(min(sep)), g.op, g.threshold, g.what))
    return vals, gates


def decide(values: Sequence[float], pp: PartPlan) -> Verdict:
    if pp.kind == "margin":
        return margin_verdict(values, float(pp.delta), source=pp.source, what=pp.what)
    return effect_verdict(values, float(pp.delta), source=pp.source, what=pp.what)


# ------------------------------------------------------------------------------ the run

def fixed_subset(ds: Any, cfg: Any) -> tuple[np.ndarray, np.ndarray]:
    """The fixed training subset the run logged its traces on (as :mod:`gradsparse.train` builds it)."""
    if ds.kind == "text":
        return Batcher(ds, RunKeys.of(cfg.seed).data, cfg.flatness_subset, cfg.seq_len)(0)
    return ds.x_train[:cfg.flatness_subset], ds.y_train[:cfg.flatness_subset]


def without_noise(model: Any) -> Any:
    """``model`` with its blocks' weight-noise modules removed: the same function in eval mode (the
    noise applies only when a PRNG key is passed), and one compiled structure for all arms."""
    blocks = [b for b in model.mlp_blocks() if b.noise is not None]
    if not blocks:
        return model
    return eqx.tree_at(lambda m: [b.noise for b in m.mlp_blocks() if b.noise is not None], model,
                       [None] * len(blocks))


def run_numbers(ctx: Context, run: Any, cfg: Any, p: Mapping[str, Any]) -> dict[str, float]:
    """All numbers of one run (one seed of one arm)."""
    model = without_noise(run.model)
    p_entries = int(sum(int(np.prod(k.shape)) for k in key_weights(model)))
    out = log_numbers(run.history, p_entries)
    ds = ctx.data(cfg.data, cfg.n_train, cfg.n_test)
    hx, hy = heldout(ctx, cfg)
    fs = feature_sensitivity(model, jnp.asarray(hx), jnp.asarray(hy))
    rx, xsq = np.asarray(fs["rx"], np.float64), np.asarray(fs["x_sq"], np.float64)
    d = int(model.mlp_blocks()[0].d)
    fx, fy = fixed_subset(ds, cfg)
    wr = weight_robustness(model, jnp.asarray(fx), jnp.asarray(fy), jax.random.fold_in(RunKeys.of(cfg.seed).flatness,
                                                                                         0x6920),
                           EPS_RAND_REL, EPS_WORST_REL, int(p["draws"]), int(p["ascent_steps"]))
    wr = {k: np.asarray(v, np.float64) for k, v in wr.items()}
    kn = float(wr["k_norm"])
    cf = random_closed_form(EPS_RAND_REL * kn, out["trace_last"], p_entries)
    out.update({"rx": float(rx.sum()), "rx_norm": normalised_rx(rx, xsq, d), "x_sq": float(np.mean(xsq)),
                "g_out": float(fs["g_out"]), "worst": float(wr["worst_increase"]),
                "rand": float(wr["rand_increase"]), "rand_closed_form": cf,
                "rand_ratio": float(wr["rand_increase"]) / cf if cf > 0 else math.nan,
                "lambda_u": float(wr["lambda_u"]), "grad_norm": float(wr["grad_norm"]),
                "lambda_max": float(wr["lambda_max"]), "worst2": float(wr["worst2"]),
                "cos_grad": float(wr["cos_grad"]), "fixed_loss_final": float(wr["loss"]), "k_norm": kn})
    out["rx_amp"] = out["rx_norm"] / out["g_out"] if out["g_out"] > 0 else math.nan
    return out


def run(ctx: Context, p: dict[str, Any]) -> Finding:
    cfgs = arm_configs(ctx.preset)
    runs = {"ref": sgd_runs(ctx), "lowlr": sgd_runs(ctx, lr=0.01), "bigB": sgd_runs(ctx, batch_size=128),
            "lm_rho0": lm_runs(ctx), "lm_rho0.5": lm_runs(ctx, weight_noise="synapse", rho=0.5)}
    nums = {a: [run_numbers(ctx, r, cfgs[a].replace(seed=s), p) for s, r in zip(ctx.seeds, rs)]
            for a, rs in runs.items()}
    vals, gates = measure(nums)
    parts = {pp.name: decide(vals[pp.name], pp) for pp in PARTS}
    keys = ("loss", "trace", "trace_norm", "trace_last", "af_norm", "af_trace_spearman_late", "rx", "rx_norm",
            "rx_amp", "g_out", "x_sq", "worst", "worst2", "lambda_max", "lambda_u", "grad_norm", "cos_grad", "rand",
            "rand_closed_form",
            "rand_ratio", "k_norm")
    per_seed: dict[str, list[float]] = {}
    for a in nums:
        for k in keys:
            v = [float(x[k]) for x in nums[a]]
            if all(math.isfinite(x) for x in v):
                per_seed[f"{k}_{a}"] = v
    measured = "; ".join(
        f"{a}: fixed loss {mean_sd([x['loss'] for x in nums[a]])}, T_norm {mean_sd([x['trace_norm'] for x in nums[a]])}"
        f", R_x~ {mean_sd([x['rx_norm'] for x in nums[a]])}, dL_worst {mean_sd([x['worst'] for x in nums[a]])} "
        f"(lambda_u {mean_sd([x['lambda_u'] for x in nums[a]])}), random/closed form "
        f"{mean_sd([x['rand_ratio'] for x in nums[a]])}" for a in nums)
    ser = {"seeds": list(ctx.seeds), "arms": {a: {k: [float(x[k]) for x in nums[a]]
                                                  for k in ("trace_norm", "rx_norm", "worst", "loss")} for a in nums}}
    return Finding(None, measured, per_seed=per_seed, parts=parts, gates=gates, series=ser,
                   model=f"sgd arms: {describe(cfgs['ref'])}; lm arms: {describe(cfgs['lm_rho0'])}",
                   notes=[f"R_x on the held-out batch (per-sample loss, all blocks); weight perturbations of all K "
                          f"jointly on the fixed training subset: random eps {EPS_RAND_REL:g} ||K||_F ({p['draws']} "
                          f"antithetic draws), worst eps {EPS_WORST_REL:g} ||K||_F ({p['ascent_steps']} normalised "
                          "ascent steps)",
                          "orientation per seed from the logged scale-normalised trace (last quarter); final models "
                          "only (no checkpoints), hence regime gates instead of matched loss"])


def figures(ser: dict[str, Any], out_dir) -> list:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from gradsparse.figures_spectra import save_figure

    arms = ser.get("arms", {})
    if not arms:
        return []
    fig = Figure(figsize=(9.0, 3.8), dpi=120)
    FigureCanvasAgg(fig)
    for j, (key, label) in enumerate((("rx_norm", "ln R_x~ (held-out, all blocks)"),
                                      ("worst", f"ln worst-case loss increase (eps {EPS_WORST_REL:g} ||K||)"))):
        ax = fig.add_subplot(1, 2, j + 1)
        for i, (a, v) in enumerate(arms.items()):
            t = np.asarray(v["trace_norm"], np.float64)
            r = np.asarray(v[key], np.float64)
            ok = (t > 0) & (r > 0)
            mk = "o" if min(v["loss"]) >= LOSS_FLOOR else "x"
            ax.plot(np.log(t[ok]), np.log(r[ok]), mk, color=f"C{i}", label=a, ms=6)
        ax.set_xlabel("ln T_norm (logged tr(H_K), scale-normalised)", fontsize=8)
        ax.set_ylabel(label, fontsize=8)
        ax.grid(alpha=0.3)
        if j == 0:
            ax.legend(fontsize=7)
    fig.suptitle("G20: flatness vs robustness per arm and seed (x: arm interpolated, loss < 0.05)", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, out_dir / "g20_flatness_robustness")


_P = {"smoke": dict(draws=2, ascent_steps=2), "quick": dict(draws=4, ascent_steps=5),
      "full": dict(draws=8, ascent_steps=10)}

CHECK = Check(
    name="G20",
    slug="g20_flatness_robustness",
    title="Flatness implies robustness",
    claim=("Across trained arms in the fitted-but-not-interpolated regime, the arm with the smaller (scale-normalised) "
           "tr(H_K) is more robust: smaller sensitivity of the loss to relative perturbations of the MLP inputs x "
           "(R_x) and a smaller worst-case loss increase under a relative perturbation of K."),
    rule=(f"Per pair of arms and seed, effect = sign(ln T_norm ratio) * ln(R ratio) (> 0: the flatter arm is the more "
          f"robust), delta {MIN_LOG_R}; PASS when the one-sided 95% lower bound > 0 and the mean > delta, FAIL when "
          f"the upper bound < delta. Primary: R_x~ and the worst-case increase for G5's lr pair (lowlr vs ref) and "
          f"G12's noise pair (LM rho 0 vs 0.5). Gates: every compared arm not interpolated (fixed-subset loss >= "
          f"{LOSS_FLOOR}) and learned (<= ln(C)/2), and the pair's traces separated (|ln ratio| >= {MIN_LOG_TRACE}). "
          f"Context: the loss-level-free amplification, bigB vs ref, AF_K vs tr(H_K), the random-direction closed "
          f"form (margin ln 1.5)."),
    presets={k: {"sgd": SGD[k], "lm": LM[k], **_P["full" if k == "full" else "smoke" if k == "smoke" else "quick"]}
             for k in ("smoke", "quick", "standard", "full")},
    run=run,
    figures=figures,
    plan=plan,
)
