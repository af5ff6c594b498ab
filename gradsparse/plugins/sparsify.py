"""Model surgery for the finetuning route: plug the sparsity modules into a trained model.

``sparsify(model, ...)`` returns a :class:`SparsifyResult` with the new model, its trainable
mask, the post-update projections and the JSON options that rebuild the same pytree
(``replay_options``, used when a finetuned checkpoint is loaded). Every module is
exactly the identity at insertion: the zeroth bias starts at 0, the activation mix starts at
k = 0 (pure ReLU), LoRA's B factor starts at 0, the restricted-LN floor starts at 0, and noise
acts only during training.

Finetuning variants (SPEC 4): zeroth bias (4.1) with the clip |b0| <= c|gamma|; restricted LN
(4.2) with the shift frozen and |gamma| <- max(|gamma|, min((s+1)/T_up, 1)); J-SquaredReLU
(4.3) by mixing (1 - k) act + k JSReLU with k = min((s+1)/T_mix, 1); weight noise (4.4);
LoRA (4.6) on the key/value matrices with every other weight frozen.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp

from gradsparse._validate import check_bool, check_choice, check_float, check_int
from gradsparse.activations import JSReLU, Mixed
from gradsparse.models import default_trainable
from gradsparse.plugins.blocks import Projection, Select, resolve_select, selected_blocks
from gradsparse.plugins.lora import LORA_TARGETS, add_lora, check_lora_args, lora_trainable
from gradsparse.plugins.noise import NOISE_KINDS, NOISE_PER, add_noise
from gradsparse.plugins.restricted_ln import freeze_ln_shift, gamma_ramp_projection
from gradsparse.plugins.schedules import check_ramp_length, ramp
from gradsparse.plugins.zeroth_bias import PLACEMENTS, add_zeroth_bias, zeroth_bias_projection

Array = jax.Array

#: version of the options dict written into checkpoint headers under 'surgery'
OPTIONS_FORMAT = 1
#: module names of the finetuning route (CLI --modules)
MODULE_NAMES = ("zeroth_bias", "restricted_ln", "jsrelu", "noise", "lora")


@dataclass
class SparsifyResult:
    """What :func:`sparsify` returns.

    ``model``: the new model; ``trainable``: pytree of bools shaped like the model (as
    ``gradsparse.models.default_trainable`` gives); ``projections``: post-update functions
    ``project(model, step) -> model`` for ``train(..., projections=...)``; ``options``: the
    JSON-serialisable options that :func:`replay_options` replays (a run records them as
    ``TrainConfig.surgery``). Noise modules need no config change: the training step always
    passes a PRNG key, and a model uses it only where it holds noise modules.
    """

    model: Any
    trainable: Any
    projections: list[Projection]
    options: dict[str, Any]


def mix_in_jsrelu(model: Any, select: Select) -> Any:
    """Replace each selected block's activation by Mixed(k=0, act, JSReLU) (exactly ``act`` at k = 0).

    Blocks that already use JSReLU are left alone; blocks whose activation is already a Mixed
    keep it (its k is then driven by :func:`mix_projection`).
    """
    blocks = select(model)
    idx = [i for i, b in enumerate(blocks) if not isinstance(b.act, (JSReLU, Mixed))]
    if not idx:
        return model
    new = [Mixed(k=jnp.zeros((), jnp.float32), first=blocks[i].act, second=JSReLU()) for i in idx]
    return eqx.tree_at(lambda m: [select(m)[i].act for i in idx], model, new)


def mix_projection(t_mix: int, select: Select | None = None) -> Projection:
    """``project(model, step)`` setting k = min((step+1)/T_mix, 1) in every selected Mixed activation."""
    t_mix = check_ramp_length("t_mix", t_mix)

    def project(model: Any, step: Array) -> Any:
        sel = resolve_select(model, select)
        mixed = [b.act for b in sel(model) if isinstance(b.act, Mixed)]
        if not mixed:
            return model
        k = ramp(step, t_mix)
        return eqx.tree_at(lambda m: [b.act.k for b in sel(m) if isinstance(b.act, Mixed)], model,
                           [k.astype(a.k.dtype) for a in mixed])

    project.__name__ = f"mix_ramp(T_mix={t_mix})"
    return project


def sparsify(model: Any, *, zeroth_bias: bool = False, restricted_ln: bool = False, jsrelu: bool = False,
             noise: str = "none", lora: bool = False, select: Select | None = None,
             zeroth_bias_placement: str = "input", zeroth_bias_clip: float = 0.1, t_up: int = 1000,
             t_mix: int = 1000, rho: float = 0.1, noise_per: str = "sample", lora_rank: int = 4,
             lora_alpha: float | None = None, lora_targets: Sequence[str] = LORA_TARGETS, lora_seed: int = 0,
             seq_len: int | None = None) -> SparsifyResult:
    """Plug sparsity modules into a trained model (finetuning route, SPEC 4); see the module docstring.

    Modules: ``zeroth_bias`` (zero (S, d) bias at ``zeroth_bias_placement``, clipped to
    ``zeroth_bias_clip`` |gamma| after each step), ``restricted_ln`` (LN shift frozen,
    |gamma| ramped up to >= 1 over ``t_up`` steps), ``jsrelu`` (ReLU -> JSReLU mix over
    ``t_mix`` steps), ``noise`` ('none' | 'synapse' | 'exact', scale ``rho`` RMS(K), exact noise
    drawn per ``noise_per``), ``lora`` (rank ``lora_rank``, scale ``lora_alpha``/rank, default
    alpha = rank, on ``lora_targets``; every non-LoRA weight is then frozen except zeroth biases).

    Your own equinox model: pass ``select``, a function ``model -> list of MLP blocks`` that
    only reads structure (e.g. ``select=lambda m: m.layers``), and ``seq_len`` (number of
    token positions, 1 for one vector per sample) when using the zeroth bias on a model
    without a ``seq_len`` attribute. Each block must expose the fields listed in
    :mod:`gradsparse.plugins.blocks` for the modules you ask for: ``ln`` (with ``weight``,
    ``bias``), ``key``/``value`` (:class:`gradsparse.models.Dense`), ``act``
    (an :class:`~gradsparse.activations.Activation`), ``zeroth_bias`` + static
    ``zeroth_bias_placement`` and ``noise``, and its forward pass must use them as
    :class:`gradsparse.models.MLPBlock` does (the easy way: build the blocks from MLPBlock).
    A missing field raises ValueError naming it. Then train with your own loop (a complete,
    tested example of a model whose blocks live in ``layers``: ``docs/plugins.md``)::

        res = gradsparse.sparsify(my_model, zeroth_bias=True, jsrelu=True, select=lambda m: m.layers,
                                  seq_len=1)
        params, static = eqx.partition(res.model, res.trainable)
        # loss of eqx.combine(params, static)(x, zero_probes(blocks, num_tokens)), optax update of
        # params; model = eqx.combine(params, static)
        for project in res.projections:
            model = project(model, step)

    Returns a :class:`SparsifyResult`. Raises ValueError for unknown options or bad values.
    """
    for name, v in (("zeroth_bias", zeroth_bias), ("restricted_ln", restricted_ln), ("jsrelu", jsrelu),
                    ("lora", lora)):
        check_bool(name, v)
    if noise is None or noise is False:
        noise = "none"
    check_choice("noise", noise, NOISE_KINDS)
    check_choice("noise_per", noise_per, NOISE_PER)
    check_choice("zeroth_bias_placement", zeroth_bias_placement, PLACEMENTS)
    zeroth_bias_clip = check_float("zeroth_bias_clip", zeroth_bias_clip, 0)
    t_up, t_mix = check_ramp_length("t_up", t_up), check_ramp_length("t_mix", t_mix)
    rho = check_float("rho", rho, 0)
    alpha = float(lora_rank) if lora_alpha is None and isinstance(lora_rank, int) else lora_alpha
    lora_rank, alpha, lora_targets = check_lora_args(lora_rank, alpha, lora_targets)
    check_int("lora_seed", lora_seed, 0)
    custom = select is not None
    select = resolve_select(model, select)
    wanted = [n for n, on in (("zeroth_bias", zeroth_bias), ("restricted_ln", restricted_ln), ("jsrelu", jsrelu),
                              ("noise", noise != "none"), ("lora", lora)) if on]
    selected_blocks(model, select, wanted)  # validates the block contract for what is asked

    if zeroth_bias:
        model = add_zeroth_bias(model, seq_len=seq_len, placement=zeroth_bias_placement, select=select)
        if seq_len is None:
            seq_len = int(model.seq_len)
    if jsrelu:
        model = mix_in_jsrelu(model, select)
    if noise != "none":
        model = add_noise(model, noise, rho, noise_per, select=select)
    if lora:
        model = add_lora(model, lora_rank, alpha, jax.random.key(lora_seed), lora_targets, select=select)

    trainable = default_trainable(model)
    if lora:
        trainable = lora_trainable(trainable, select, lora_targets)
    if restricted_ln:
        trainable = freeze_ln_shift(trainable, select)

    projections: list[Projection] = []
    if restricted_ln:
        projections.append(gamma_ramp_projection(t_up, select))
    if jsrelu:
        projections.append(mix_projection(t_mix, select))
    if zeroth_bias:
        projections.append(zeroth_bias_projection(zeroth_bias_clip, select))

    options = {"format": OPTIONS_FORMAT, "modules": wanted, "select": "custom" if custom else "mlp_blocks",
               "zeroth_bias_placement": zeroth_bias_placement, "zeroth_bias_clip": zeroth_bias_clip,
               "seq_len": seq_len, "t_up": t_up, "t_mix": t_mix, "noise": noise, "rho": rho, "noise_per": noise_per,
               "lora_rank": lora_rank, "lora_alpha": alpha, "lora_targets": list(lora_targets),
               "lora_seed": lora_seed}
    return SparsifyResult(model, trainable, projections, options)


_OPTION_KEYS = ("format", "modules", "select", "zeroth_bias_placement", "zeroth_bias_clip", "seq_len", "t_up",
                "t_mix", "noise", "rho", "noise_per", "lora_rank", "lora_alpha", "lora_targets", "lora_seed")


def replay_options(model: Any, options: dict, select: Select | None = None) -> SparsifyResult:
    """Replay :func:`sparsify` from its ``options`` dict on a freshly built model (checkpoint loading).

    The result has the same pytree structure, static fields and trainable mask as the model the
    options were recorded from (array values come from the checkpoint). A model sparsified with
    a custom ``select`` needs the same ``select`` again.
    """
    if not isinstance(options, dict):
        raise ValueError(f"surgery options must be a mapping, got {type(options).__name__}")
    missing = [k for k in _OPTION_KEYS if k not in options]
    unknown = sorted(set(options) - set(_OPTION_KEYS))
    if missing or unknown:
        raise ValueError(f"surgery options: missing keys {missing}, unknown keys {unknown}; "
                         f"expected exactly {list(_OPTION_KEYS)}")
    if options["format"] != OPTIONS_FORMAT:
        raise ValueError(f"surgery options format {options['format']!r} is not supported (expected {OPTIONS_FORMAT})")
    mods = options["modules"]
    if not isinstance(mods, list) or any(m not in MODULE_NAMES for m in mods):
        raise ValueError(f"surgery options: modules must be a list from {', '.join(MODULE_NAMES)}, got {mods!r}")
    if options["select"] == "custom" and select is None:
        raise ValueError("these surgery options were recorded with a custom select; pass the same select=")
    return sparsify(model, zeroth_bias="zeroth_bias" in mods, restricted_ln="restricted_ln" in mods,
                    jsrelu="jsrelu" in mods, noise=options["noise"] if "noise" in mods else "none",
                    lora="lora" in mods, select=select, zeroth_bias_placement=options["zeroth_bias_placement"],
                    zeroth_bias_clip=options["zeroth_bias_clip"], t_up=options["t_up"], t_mix=options["t_mix"],
                    rho=options["rho"], noise_per=options["noise_per"], lora_rank=options["lora_rank"],
                    lora_alpha=options["lora_alpha"], lora_targets=options["lora_targets"],
                    lora_seed=options["lora_seed"], seq_len=options["seq_len"])
