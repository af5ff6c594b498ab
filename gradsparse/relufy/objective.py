"""The objective of relufication and its held-out evaluation (student BERT -> frozen teacher BERT).

Loss (B sentences of T tokens, mask m; :mod:`gradsparse.distill`)::

    L = (1/B) sum_i (1 - cos(e^s_i, e^t_i))  +  w * (1/L) sum_{l=1..L} MSE_l(h^s_l, h^t_l)

with e the pooled sentence embeddings and MSE_l the mean squared entry difference of layer l's
output over real tokens (the embedding output h^0 is not compared: it is frozen and equal).
:class:`Distill` is this loss as an objective of :func:`gradsparse.step.make_train_step`: batch
= (input_ids, attention_mask, token_type_ids), each (B, T); its aux holds the two terms, the
student's per-block {x, z, a} and the token mask, so the step's monitors count over real tokens
only (``monitors='counts'``: :func:`gradsparse.monitors.token_counts`). The teacher is a field of
the objective and reaches the jitted step as an argument (its arrays are inputs, not constants).

Densities over the REAL tokens (padding excluded), as SPEC 2.1: ``active`` = #{|a| > 1e-6}
(exact activation density = active / (tokens * n); the flat output of ReLU, JSReLU and their mix
is 0) and ``positive`` = #{z > 0} (for GELU, whose outputs are never exactly 0, the fraction of
positive pre-activations is the density that counts).
"""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from gradsparse.distill import cosine_loss, heldout_metrics, hidden_mse
from gradsparse.models.bert import BertEncoder, SentenceTokenizer
from gradsparse.monitors import token_counts

Array = jax.Array

#: the token fields of a batch, in the order of the objective's batch tuple
FIELDS = ("input_ids", "attention_mask", "token_type_ids")


class Distill(eqx.Module):
    """L = L_cos + w L_hid of a student against ``teacher`` (module docstring); deterministic (the
    key is not used). ``hidden_weight`` w >= 0 (the hidden term only when w > 0)."""

    teacher: BertEncoder
    hidden_weight: float = eqx.field(static=True)

    def __check_init__(self):
        w = self.hidden_weight
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not w >= 0:
            raise ValueError(f"hidden_weight: must be a number >= 0, got {w!r}")

    def tokens(self, model: BertEncoder, batch: tuple[Array, Array, Array]) -> int:
        return batch[0].shape[0] * batch[0].shape[1]

    def __call__(self, model: BertEncoder, batch: tuple[Array, Array, Array], key: Array | None,
                 probes: Any = None) -> tuple[Array, dict[str, Any]]:
        ids, mask, types = batch
        t_hs, _ = self.teacher.encode_tokens(ids, attention_mask=mask, token_type_ids=types)
        t_hs = [jax.lax.stop_gradient(h) for h in t_hs]
        t_emb = self.teacher.pool(t_hs[-1], mask)
        s_hs, s_aux = model.encode_tokens(ids, probes, attention_mask=mask, token_type_ids=types)
        s_emb = model.pool(s_hs[-1], mask)
        l_cos = cosine_loss(s_emb, t_emb)
        l_hid = hidden_mse(s_hs[1:], t_hs[1:], mask)
        w = float(self.hidden_weight)
        loss = l_cos + w * l_hid if w > 0 else l_cos
        return loss, {"cosine_loss": l_cos, "hidden_mse": l_hid, "blocks": s_aux, "mask": mask.reshape(-1)}


def batch_arrays(b: dict[str, Any]) -> tuple[Array, Array, Array]:
    """The objective's batch from a tokenizer's output: (input_ids, attention_mask, token_type_ids)
    as device arrays, each (B, T)."""
    return tuple(jnp.asarray(b[k]) for k in FIELDS)


@eqx.filter_jit
def _embed(model: BertEncoder, ids: Array, mask: Array, types: Array, count_mask: Array
           ) -> tuple[Array, dict[str, Array]]:
    hs, aux = model.encode_tokens(ids, attention_mask=mask, token_type_ids=types)
    return model.pool(hs[-1], mask), token_counts(model.mlp_blocks(), aux, count_mask)


def _mean(v: list[float]) -> float:
    return float(sum(v) / len(v))


class HeldOut:
    """The held-out sentences tokenised once into fixed-shape batches (``eval_batch`` x ``seq_len``;
    the last batch is filled up with copies of the first sentence, which count nowhere), and the
    teacher's embeddings and fraction of positive pre-activations on them."""

    def __init__(self, tokenizer: SentenceTokenizer, sentences: list[str], eval_batch: int, seq_len: int,
                 teacher: BertEncoder):
        self.n = len(sentences)
        self.batches = []
        for s in range(0, self.n, eval_batch):
            chunk = sentences[s:s + eval_batch]
            b = tokenizer(chunk + [sentences[0]] * (eval_batch - len(chunk)), pad_to_multiple_of=seq_len)
            count = b["attention_mask"].copy()
            count[len(chunk):] = 0
            self.batches.append((len(chunk), batch_arrays(b), jnp.asarray(count)))
        self.teacher_emb, _, self.teacher_positive = self(teacher)

    def __call__(self, model: BertEncoder) -> tuple[np.ndarray, list[float], list[float]]:
        """(embeddings (N, d), exact density per layer, fraction of z > 0 per layer) on the held-out set."""
        embs, active, positive, tokens = [], 0.0, 0.0, 0.0
        for real, arrays, count in self.batches:
            e, c = _embed(model, *arrays, count)
            embs.append(np.asarray(e)[:real])
            active = active + np.asarray(c["active"], np.float64)
            positive = positive + np.asarray(c["positive"], np.float64)
            tokens += float(c["tokens"])
        n_units = model.mlp_blocks()[0].n
        return (np.concatenate(embs), [float(v) for v in active / (tokens * n_units)],
                [float(v) for v in positive / (tokens * n_units)])

    def record(self, student: BertEncoder) -> dict[str, Any]:
        """The held-out part of a log record: teacher cosine, neighbour agreement, densities."""
        emb, dens, _ = self(student)
        m = heldout_metrics(emb, self.teacher_emb, min_sentences=min(500, self.n))
        return {"heldout/teacher_cos": m["teacher_cos"], "heldout/nn_agreement": m["nn_agreement"],
                "heldout/density": dens, "heldout/density/mean": _mean(dens), "heldout/num_sentences": self.n}
