"""Distillation pieces for finetuning a sentence encoder against its frozen original (relufication).

A student encoder (e.g. the same BERT with ReLU in its MLPs) is trained towards the teacher (the
original model) on sentences; held-out sentences measure how much of the teacher survived.

Losses (student s, teacher t; B sentences, d-dim embeddings; jittable, mean over the batch):

* :func:`cosine_loss`:  L_cos = (1/B) sum_i (1 - cos(s_i, t_i)),  cos(u, v) = u.v / (||u|| ||v||)
  (each norm clamped at 1e-12). 0 for a student equal to the teacher up to positive scale.
* :func:`hidden_mse`:   L_hid = (1/L) sum_l  sum_t m_t ||h^s_{l,t} - h^t_{l,t}||^2 / (d sum_t m_t)
  over the real tokens (mask m) of the listed layers: the mean squared entry difference.
* :func:`distill_loss`: L_cos + hidden_weight * L_hid.

Held-out metrics (host side, numpy; N held-out sentences):

* :func:`teacher_cosine`: (1/N) sum_i cos(s_i, t_i).
* :func:`neighbour_agreement`: top-1 nearest-neighbour agreement: for each i, the nearest other
  sentence by cosine, nn(i) = argmax_{j != i} cos(e_i, e_j), in the student's and in the teacher's
  embedding space; the fraction of i where both agree (ties: the lowest index). Invariant to
  rotations and positive scalings of either space; the issue's protocol uses N >= 500
  (:func:`heldout_metrics` enforces ``min_sentences``).

Data: :func:`heldout_split` is a deterministic split of a sentence list into training and held-out
sentences (duplicates removed first, so no sentence is on both sides); :func:`sentence_batch`
gives the token batch of training step ``step`` (every sentence once per epoch, order from a PRNG
key as ``data.batch_indices``).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gradsparse.data import batch_indices
from gradsparse.models.bert import SentenceTokenizer
from gradsparse.sentences import load_sentences

Array = jax.Array

_EPS = 1e-12
#: held-out sentences of the default split (the neighbour agreement needs >= 500)
DEFAULT_HELDOUT = 512


# --------------------------------------------------------------------------------------------
# losses (jittable)
# --------------------------------------------------------------------------------------------

def _check_pair(student, teacher, what: str) -> None:
    if student.ndim != 2 or student.shape != teacher.shape:
        raise ValueError(f"{what}: student {tuple(student.shape)} and teacher {tuple(teacher.shape)} embeddings "
                         "must both be (B, d) of the same shape")


def _cos_rows(u: Array, v: Array) -> Array:
    nu = jnp.maximum(jnp.linalg.norm(u, axis=-1), _EPS)
    nv = jnp.maximum(jnp.linalg.norm(v, axis=-1), _EPS)
    return jnp.sum(u * v, -1) / (nu * nv)


def cosine_loss(student: Array, teacher: Array) -> Array:
    """L_cos = mean_i (1 - cos(s_i, t_i)) for (B, d) embeddings; the teacher gets no gradient."""
    _check_pair(student, teacher, "cosine_loss")
    return jnp.mean(1.0 - _cos_rows(student, jax.lax.stop_gradient(teacher)))


def hidden_mse(student_hidden: Sequence[Array], teacher_hidden: Sequence[Array], mask: Array) -> Array:
    """Mean squared difference of hidden states over real tokens, averaged over the given layers.

    ``*_hidden``: lists of (B*T, d) (or (B, T, d)) arrays, one per compared layer; ``mask``: (B, T).
    """
    if len(student_hidden) != len(teacher_hidden) or not student_hidden:
        raise ValueError(f"hidden_mse: {len(student_hidden)} student and {len(teacher_hidden)} teacher layers; "
                         "allowed: the same number, at least one")
    m = jnp.asarray(mask).reshape(-1).astype(jnp.float32)
    total = 0.0
    for hs, ht in zip(student_hidden, teacher_hidden):
        if hs.shape != ht.shape:
            raise ValueError(f"hidden_mse: layer shapes differ: {tuple(hs.shape)} vs {tuple(ht.shape)}")
        hs2, ht2 = hs.reshape(m.shape[0], -1), jax.lax.stop_gradient(ht).reshape(m.shape[0], -1)
        diff = jnp.sum((hs2 - ht2) ** 2, -1)
        total = total + jnp.sum(diff * m) / (jnp.maximum(jnp.sum(m), 1.0) * hs2.shape[-1])
    return total / len(student_hidden)


def distill_loss(student: Array, teacher: Array, *, student_hidden: Sequence[Array] | None = None,
                 teacher_hidden: Sequence[Array] | None = None, mask: Array | None = None,
                 hidden_weight: float = 0.0) -> Array:
    """L = L_cos + hidden_weight * L_hid (the hidden term only when hidden_weight > 0)."""
    if not (isinstance(hidden_weight, (int, float)) and not isinstance(hidden_weight, bool) and hidden_weight >= 0):
        raise ValueError(f"hidden_weight: must be a number >= 0, got {hidden_weight!r}")
    loss = cosine_loss(student, teacher)
    if hidden_weight > 0:
        if student_hidden is None or teacher_hidden is None or mask is None:
            raise ValueError("distill_loss: hidden_weight > 0 needs student_hidden, teacher_hidden and mask")
        loss = loss + hidden_weight * hidden_mse(student_hidden, teacher_hidden, mask)
    return loss


# --------------------------------------------------------------------------------------------
# held-out metrics (numpy)
# --------------------------------------------------------------------------------------------

def _as_matrix(x, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] < 1:
        raise ValueError(f"{name}: must be a (N, d) array of embeddings, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name}: holds NaN or inf")
    return a


def teacher_cosine(student, teacher) -> float:
    """(1/N) sum_i cos(s_i, t_i) of (N, d) student and teacher embeddings."""
    s, t = _as_matrix(student, "student"), _as_matrix(teacher, "teacher")
    if s.shape != t.shape:
        raise ValueError(f"teacher_cosine: student {s.shape} and teacher {t.shape} must have the same shape")
    ns = np.maximum(np.linalg.norm(s, axis=1), _EPS)
    nt = np.maximum(np.linalg.norm(t, axis=1), _EPS)
    return float(np.mean(np.sum(s * t, 1) / (ns * nt)))


def nearest_neighbours(emb) -> np.ndarray:
    """nn(i) = argmax_{j != i} cos(e_i, e_j) for (N, d) embeddings (N >= 2); ties -> lowest j."""
    e = _as_matrix(emb, "embeddings")
    if e.shape[0] < 2:
        raise ValueError(f"nearest_neighbours: need at least 2 embeddings, got {e.shape[0]}")
    u = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), _EPS)
    sim = u @ u.T
    np.fill_diagonal(sim, -np.inf)
    return np.argmax(sim, axis=1)


def neighbour_agreement(student, teacher) -> float:
    """Fraction of sentences whose nearest other sentence is the same for student and teacher."""
    s, t = _as_matrix(student, "student"), _as_matrix(teacher, "teacher")
    if s.shape[0] != t.shape[0]:
        raise ValueError(f"neighbour_agreement: {s.shape[0]} student and {t.shape[0]} teacher embeddings; "
                         "allowed: one of each per sentence")
    return float(np.mean(nearest_neighbours(s) == nearest_neighbours(t)))


def heldout_metrics(student, teacher, *, min_sentences: int = 500) -> dict[str, float]:
    """{'teacher_cos', 'nn_agreement', 'num_sentences'} on held-out embeddings (N >= min_sentences)."""
    if isinstance(min_sentences, bool) or not isinstance(min_sentences, int) or min_sentences < 2:
        raise ValueError(f"min_sentences: must be an integer >= 2, got {min_sentences!r}")
    n = np.asarray(student).shape[0] if np.ndim(student) == 2 else 0
    if n < min_sentences:
        raise ValueError(f"heldout_metrics: {n} held-out sentences; allowed: at least {min_sentences}")
    return {"teacher_cos": teacher_cosine(student, teacher), "nn_agreement": neighbour_agreement(student, teacher),
            "num_sentences": float(n)}


# --------------------------------------------------------------------------------------------
# sentences -> splits -> token batches
# --------------------------------------------------------------------------------------------

def heldout_split(sentences: Sequence[str], num_heldout: int = DEFAULT_HELDOUT, seed: int = 0
                  ) -> tuple[list[str], list[str]]:
    """(training, held-out) sentences: duplicates dropped (first kept), then a permutation drawn with
    ``numpy.random.default_rng(seed)``; its first ``num_heldout`` sentences are held out. Both lists
    keep the input order. Same input and seed, same split."""
    if isinstance(sentences, str):
        raise ValueError("sentences: must be a list of strings, got a single string")
    uniq = list(dict.fromkeys(sentences))
    if any(not isinstance(s, str) for s in uniq):
        raise ValueError("sentences: every item must be a string")
    if isinstance(num_heldout, bool) or not isinstance(num_heldout, int) or not 1 <= num_heldout < len(uniq):
        raise ValueError(f"num_heldout: must be an integer in [1, {len(uniq) - 1}] (unique sentences - 1), "
                         f"got {num_heldout!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed: must be a non-negative integer, got {seed!r}")
    perm = np.random.default_rng(seed).permutation(len(uniq))
    held = np.zeros(len(uniq), bool)
    held[perm[:num_heldout]] = True
    return [s for s, h in zip(uniq, held) if not h], [s for s, h in zip(uniq, held) if h]


def default_split(num_heldout: int = DEFAULT_HELDOUT, seed: int = 0) -> tuple[list[str], list[str]]:
    """:func:`heldout_split` of the default text's sentences (``gradsparse.sentences``)."""
    return heldout_split(load_sentences(), num_heldout, seed)


def sentence_batch(tokenizer: SentenceTokenizer, sentences: Sequence[str], key: Array, step: int,
                   batch_size: int, *, pad_to_multiple_of: int | None = 8) -> dict[str, np.ndarray]:
    """Token batch of training step ``step``: the sentences ``data.batch_indices(key, N, batch_size, step)``
    (every sentence once per epoch), tokenised and padded ((B, T) int32 arrays) plus 'index' (B,)."""
    if not isinstance(tokenizer, SentenceTokenizer):
        raise ValueError(f"tokenizer: expected a SentenceTokenizer, got {type(tokenizer).__name__}")
    sents = list(sentences)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or not 1 <= batch_size <= len(sents):
        raise ValueError(f"batch_size: must be an integer in [1, {len(sents)}] (the number of sentences), "
                         f"got {batch_size!r}")
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
        raise ValueError(f"step: must be a non-negative integer, got {step!r}")
    idx = np.asarray(batch_indices(key, len(sents), batch_size, int(step)))
    out = tokenizer([sents[i] for i in idx], pad_to_multiple_of=pad_to_multiple_of)
    out["index"] = idx.astype(np.int32)
    return out
