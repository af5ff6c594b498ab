"""Sparsity monitors on a pretrained sentence encoder (``gradsparse measure``): one row per MLP layer.

Three passes over sentences of a text (B sentences per batch; N tokens; n MLP units per layer):

1. **Forward statistics** of the original model on whole sentences, over the REAL tokens only
   (padding excluded with the attention mask), pooled over all tokens and units of a layer:
   ``pos_frac`` = mean 1[z > 0] (GELU outputs are never exactly zero, so this is the natural
   "active" share), ``deriv_sparsity`` = mean 1[sigma'(z) in the zero-derivative set] and
   ``dsigma_sq`` = mean sigma'(z)^2 (SPEC 2.2), ``density`` = 1 - mean 1[|a - a_flat| <= 1e-6]
   (SPEC 2.1).
2. With ``activation`` (e.g. 'relu'): the same model with that activation in every MLP, NO
   finetuning: its ``density`` (SPEC 2.1: for ReLU the exact share of a > 1e-6) per layer, and the
   mean cosine of its sentence embeddings to the original's (``swap_teacher_cos``).
3. **Gradient statistics** of the original model under a self-supervised loss that is not at its
   optimum there: in-batch contrastive InfoNCE between two random crops of each sentence. Each
   sentence with at least ``crop_tokens + 2`` word pieces gives two crops of ``crop_tokens``
   consecutive pieces, start offsets drawn uniformly with a PRNG key (``fold_in(key, batch)``),
   each framed as [CLS] crop [SEP] (all crops the same length: no padding, so every monitor sees
   only real tokens). With normalised crop embeddings u_i, v_i and scale s (1/temperature):
   L = (1/2B) sum_i [CE(s u_i . v_., i) + CE(s v_i . u_., i)] (symmetric cross entropy over the B
   sentences of the batch). The monitors of ``gradsparse.monitors.model_metrics`` (SPEC 2.1-2.6:
   eta / g sparsity at relative thresholds, AF_K, AF_V, the sparsity identity, ||g^V||) are
   computed per batch with the probes of the same ``value_and_grad`` call, ``num_samples`` = B
   sentences (the loss is their mean), and averaged over batches. Forward quantities that the
   monitors compute again on the crops keep their name with the suffix ``_crops``
   (``density_crops``, ``act_sparsity_crops``, ``deriv_sparsity_crops``, ``dsigma_sq_crops``).
   Gradient statistics depend on the batch size (SPEC 3.4): it is reported with them.

Plus the spectrum rows (``gradsparse.spectra.spectrum_row``, SPEC 3.1, with the MP fit) of every
layer's key matrix K (n x d).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from gradsparse import monitors, spectra
from gradsparse.activations import Activation, get_activation
from gradsparse.models.bert import BertEncoder, SentenceTokenizer, check_batch, with_activation
from gradsparse.models.common import zero_probes

Array = jax.Array

#: per-layer columns of the forward pass
FORWARD_KEYS = ("pos_frac", "deriv_sparsity", "dsigma_sq", "density")
#: per-layer columns of the gradient pass shown in the text table (all monitors are in the JSON)
GRADIENT_COLUMNS = ("eta_sparse_0.001", "eta_sparse_1e-06", "g_sparse_0.001", "af_k", "af_v", "eta_l2sq",
                    "gv_norm", "identity_relerr")


def _pos_int(name: str, v: Any, lo: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
        raise ValueError(f"{name}: must be an integer >= {lo}, got {v!r}")
    return int(v)


# --------------------------------------------------------------------------------------------
# forward statistics (masked to real tokens)
# --------------------------------------------------------------------------------------------

@eqx.filter_jit
def _forward_sums(model: BertEncoder, ids: Array, mask: Array, types: Array):
    """Embeddings and, per layer, the sums over real tokens (:func:`gradsparse.monitors.token_counts`)."""
    emb, aux = model(ids, attention_mask=mask, token_type_ids=types)
    return emb, monitors.token_counts(model.mlp_blocks(), aux, mask, stats=("positive", "flat", "dsigma_sq", "active"))


def forward_stats(model: BertEncoder, tokenizer: SentenceTokenizer, sentences: Sequence[str], *,
                  batch_size: int = 64, pad_to_multiple_of: int = 16, progress: bool = False
                  ) -> tuple[dict[str, np.ndarray], np.ndarray, int]:
    """Pass 1 (module docstring): ({key: (L,) array for key in FORWARD_KEYS}, embeddings (S, d), tokens).

    Sentences go in batches of ``batch_size`` in order of length; T is padded to a multiple of
    ``pad_to_multiple_of`` (fewer shapes to compile); statistics are pooled over all real tokens.
    """
    if not isinstance(model, BertEncoder):
        raise ValueError(f"model: expected a BertEncoder, got {type(model).__name__}")
    batch_size = _pos_int("batch_size", batch_size)
    sents = list(sentences)
    lengths = [len(p) for p in tokenizer.pieces(sents)]
    order = np.argsort(lengths, kind="stable")
    n_units = model.mlp_blocks()[0].n
    total = np.zeros((len(model.layers), 4), np.float64)
    tokens = 0
    emb = np.zeros((len(sents), model.d), np.float32)
    starts = range(0, len(sents), batch_size)
    for s in tqdm(starts, desc="forward", unit="batch", leave=False, disable=not progress):
        idx = order[s:s + batch_size]
        b = check_batch(model, tokenizer([sents[i] for i in idx], pad_to_multiple_of=pad_to_multiple_of))
        e, c = _forward_sums(model, b["input_ids"], b["attention_mask"], b["token_type_ids"])
        emb[idx] = np.asarray(e)
        n_real = int(b["attention_mask"].sum())
        inactive = n_real * n_units - np.asarray(c["active"], np.float64)  # exact: integer counts
        total += np.stack([np.asarray(c[k], np.float64) for k in ("positive", "flat", "dsigma_sq")] + [inactive], 1)
        tokens += n_real
    frac = total / (tokens * n_units)
    out = {"pos_frac": frac[:, 0], "deriv_sparsity": frac[:, 1], "dsigma_sq": frac[:, 2], "density": 1.0 - frac[:, 3]}
    return out, emb, tokens


# --------------------------------------------------------------------------------------------
# gradient statistics under the crop-contrastive loss
# --------------------------------------------------------------------------------------------

def info_nce(u: Array, v: Array, scale: float = 20.0) -> Array:
    """Symmetric in-batch InfoNCE of paired (B, d) embeddings (module docstring); rows are normalised."""
    if u.ndim != 2 or u.shape != v.shape or u.shape[0] < 2:
        raise ValueError(f"info_nce: paired (B, d) embeddings with B >= 2 needed, got {tuple(u.shape)} "
                         f"and {tuple(v.shape)}")
    un = u / jnp.maximum(jnp.linalg.norm(u, axis=-1, keepdims=True), 1e-12)
    vn = v / jnp.maximum(jnp.linalg.norm(v, axis=-1, keepdims=True), 1e-12)
    logits = scale * un @ vn.T
    diag = jnp.diagonal(logits)
    l_uv = jax.nn.logsumexp(logits, axis=1) - diag
    l_vu = jax.nn.logsumexp(logits, axis=0) - diag
    return 0.5 * (jnp.mean(l_uv) + jnp.mean(l_vu))


def crop_pairs(tokenizer: SentenceTokenizer, pieces: Sequence[np.ndarray], key: Array, crop_tokens: int
               ) -> np.ndarray:
    """Two random crops per sentence: int32 (2, B, crop_tokens + 2), rows [CLS] crop [SEP].

    ``pieces``: token ids without special tokens, each with at least ``crop_tokens`` ids; the
    start of crop c of sentence i is uniform on [0, len_i - crop_tokens], drawn from ``key``.
    """
    crop_tokens = _pos_int("crop_tokens", crop_tokens)
    lens = np.asarray([len(p) for p in pieces])
    if lens.size == 0 or lens.min() < crop_tokens:
        raise ValueError(f"crop_pairs: every sentence needs >= {crop_tokens} word pieces")
    maxval = jnp.asarray(lens - crop_tokens + 1)
    starts = np.asarray(jax.random.randint(key, (2, len(pieces)), 0, maxval))
    out = np.empty((2, len(pieces), crop_tokens + 2), np.int32)
    out[:, :, 0], out[:, :, -1] = tokenizer.cls_id, tokenizer.sep_id
    for c in range(2):
        for i, p in enumerate(pieces):
            out[c, i, 1:-1] = p[starts[c, i]:starts[c, i] + crop_tokens]
    return out


@eqx.filter_jit
def _gradient_metrics(model: BertEncoder, ids: Array, scale: float):
    """InfoNCE of the two crop views (ids: (2, B, T)) and all monitors of the original model."""
    two, b, t = ids.shape
    flat = ids.reshape(two * b, t)
    probes = zero_probes(model.mlp_blocks(), two * b * t)

    def loss(pr):
        e, aux = model(flat, pr)
        return info_nce(e[:b], e[b:], scale), aux

    (val, aux), g = jax.value_and_grad(loss, has_aux=True)(probes)
    return val, monitors.model_metrics(model.mlp_blocks(), aux, g, b)


def gradient_stats(model: BertEncoder, tokenizer: SentenceTokenizer, sentences: Sequence[str], key: Array, *,
                   batch_size: int = 32, crop_tokens: int = 16, scale: float = 20.0, progress: bool = False
                   ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Pass 3 (module docstring): ({monitor: (L,) mean over batches}, {'loss', 'batches', ...})."""
    if not isinstance(model, BertEncoder):
        raise ValueError(f"model: expected a BertEncoder, got {type(model).__name__}")
    batch_size = _pos_int("batch_size", batch_size, 2)
    crop_tokens = _pos_int("crop_tokens", crop_tokens)
    if crop_tokens + 2 > tokenizer.max_length:
        raise ValueError(f"crop_tokens: {crop_tokens} + 2 special tokens exceed max_seq_length {tokenizer.max_length}")
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale: must be a finite number > 0, got {scale!r}")
    pieces = [p for p in tokenizer.pieces(list(sentences)) if len(p) >= crop_tokens + 2]
    n_batches = len(pieces) // batch_size
    if n_batches < 1:
        raise ValueError(f"gradient pass: {len(pieces)} sentences have >= {crop_tokens + 2} word pieces; a batch "
                         f"needs {batch_size} (use more --sentences, a smaller --batch-size or --crop-tokens)")
    acc: dict[str, np.ndarray] = {}
    losses = []
    for j in tqdm(range(n_batches), desc="gradients", unit="batch", leave=False, disable=not progress):
        views = crop_pairs(tokenizer, pieces[j * batch_size:(j + 1) * batch_size], jax.random.fold_in(key, j),
                           crop_tokens)
        val, met = _gradient_metrics(model, jnp.asarray(views), float(scale))
        losses.append(float(val))
        for k, v in met.items():
            acc[k] = acc.get(k, 0.0) + np.asarray(v, np.float64)
    stats = {k: v / n_batches for k, v in acc.items()}
    ctx = {"loss": float(np.mean(losses)), "loss_chance": math.log(batch_size), "batches": n_batches,
           "batch_size": batch_size, "crop_tokens": crop_tokens, "scale": float(scale),
           "tokens_per_batch": 2 * batch_size * (crop_tokens + 2)}
    return stats, ctx


# --------------------------------------------------------------------------------------------
# everything together
# --------------------------------------------------------------------------------------------

def key_spectra(model: BertEncoder, *, fit: bool = True) -> list[spectra.SpectrumRow]:
    """Spectrum rows (SPEC 3.1, MP fit) of each layer's key matrix K (n x d), named ``layer{l}.K``."""
    return [spectra.spectrum_row(f"layer{i}.K", np.asarray(b.key.effective_weight()), fit=fit)
            for i, b in enumerate(model.mlp_blocks())]


@dataclass
class MeasureResult:
    """Per-layer rows (``layers``: list of dicts, one per MLP block), their means, context, spectra."""

    layers: list[dict[str, float]]
    mean: dict[str, float]
    context: dict[str, Any]
    spectrum: list[spectra.SpectrumRow] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        clean = lambda d: {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in d.items()}  # noqa: E731
        return {"context": self.context, "layers": [clean(r) for r in self.layers], "mean": clean(self.mean),
                "spectrum": spectra.rows_to_dicts(self.spectrum)}


def measure_encoder(model: BertEncoder, tokenizer: SentenceTokenizer, sentences: Sequence[str], key: Array, *,
                    activation: str | Activation | None = None, batch_size: int = 32, crop_tokens: int = 16,
                    scale: float = 20.0, gradients: bool = True, spectrum: bool = True,
                    progress: bool = False) -> MeasureResult:
    """All three passes and the key spectra (module docstring) on ``sentences``."""
    if not isinstance(model, BertEncoder):
        raise ValueError(f"model: expected a BertEncoder, got {type(model).__name__}")
    sents = SentenceTokenizer._check(sentences)
    fwd, emb, tokens = forward_stats(model, tokenizer, sents, progress=progress)
    L = len(model.layers)
    rows = [{"layer": float(i)} | {k: float(fwd[k][i]) for k in FORWARD_KEYS} for i in range(L)]
    ctx: dict[str, Any] = {"sentences": len(sents), "tokens": tokens,
                           "activation": model.mlp_blocks()[0].act.name}
    if activation is not None:
        act = get_activation(activation)
        swapped = with_activation(model, act)
        sfwd, semb, _ = forward_stats(swapped, tokenizer, sents, progress=progress)
        for i in range(L):
            rows[i][f"density[{act.name}]"] = float(sfwd["density"][i])
        cos = np.sum(emb * semb, 1) / np.maximum(np.linalg.norm(emb, axis=1) * np.linalg.norm(semb, axis=1), 1e-12)
        ctx["swap_activation"] = act.name
        ctx["swap_teacher_cos"] = float(np.mean(cos))
        ctx["swap_teacher_cos_min"] = float(np.min(cos))
    if gradients:
        gst, gctx = gradient_stats(model, tokenizer, sents, key, batch_size=batch_size, crop_tokens=crop_tokens,
                                   scale=scale, progress=progress)
        for i in range(L):
            for k, v in gst.items():  # forward-pass names measured again on the crops get a suffix
                rows[i][k + "_crops" if k in rows[i] or k == "act_sparsity" else k] = float(v[i])
        ctx["gradient"] = gctx
    keys = [k for k in rows[0] if k != "layer"]
    mean = {k: float(np.mean([r[k] for r in rows])) for k in keys}
    spec = key_spectra(model) if spectrum else []
    return MeasureResult(rows, mean, ctx, spec)


def _fmt(v: float) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    a = abs(v)
    return f"{v:.4f}" if (a == 0 or 1e-3 <= a < 1e3) else f"{v:.3e}"


def format_table(result: MeasureResult) -> str:
    """Fixed-width per-layer table (forward, swapped-activation and gradient columns) plus a mean row."""
    if not isinstance(result, MeasureResult):
        raise ValueError(f"expected a MeasureResult, got {type(result).__name__}")
    have = result.layers[0]
    cols = ([c for c in FORWARD_KEYS if c in have] + [c for c in have if c.startswith("density[")]
            + [c for c in GRADIENT_COLUMNS if c in have])
    header = ["layer"] + cols
    body = [[str(int(r["layer"]))] + [_fmt(r[c]) for c in cols] for r in result.layers]
    body.append(["mean"] + [_fmt(result.mean[c]) for c in cols])
    widths = [max(len(header[i]), *(len(b[i]) for b in body)) for i in range(len(header))]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(header)] + [line(b) for b in body])
