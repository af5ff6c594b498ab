"""Distillation losses and held-out metrics (closed forms), the held-out split, token batches, and
the sentence splitter of the default text."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gradsparse import distill
from gradsparse.models.bert import load_bert
from gradsparse.sentences import load_sentences, split_sentences
from tiny_bert import write_tiny_bert


def _emb(n=8, d=6, seed=0):
    return np.random.default_rng(seed).standard_normal((n, d))


def test_cosine_loss_closed_forms():
    t = jnp.asarray(_emb())
    assert float(distill.cosine_loss(t, t)) == pytest.approx(0.0, abs=1e-6)
    assert float(distill.cosine_loss(3.0 * t, t)) == pytest.approx(0.0, abs=1e-6)  # scale-invariant
    assert float(distill.cosine_loss(-t, t)) == pytest.approx(2.0, abs=1e-6)
    e = jnp.eye(4)
    assert float(distill.cosine_loss(e, jnp.roll(e, 1, axis=1))) == pytest.approx(1.0, abs=1e-7)  # orthogonal
    # gradient: d/ds (1 - cos) = -(t/|t| - cos s/|s|)/|s| / B; none flows to the teacher
    s = jnp.asarray(_emb(seed=1))
    gs, gt = jax.grad(distill.cosine_loss, argnums=(0, 1))(s, t)
    sn, tn = np.linalg.norm(s, axis=1, keepdims=True), np.linalg.norm(t, axis=1, keepdims=True)
    cos = np.sum(s * t, 1, keepdims=True) / (sn * tn)
    np.testing.assert_allclose(gs, -(t / tn - cos * s / sn) / sn / s.shape[0], rtol=1e-5, atol=1e-7)
    assert float(jnp.abs(gt).max()) == 0.0
    with pytest.raises(ValueError, match="same shape"):
        distill.cosine_loss(s, t[:3])


def test_hidden_mse_counts_real_tokens_only():
    B, T, d = 3, 5, 4
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    ht = jnp.asarray(np.random.default_rng(0).standard_normal((B * T, d)))
    c = 0.5
    hs = ht + c
    hs = jnp.where(jnp.asarray(mask.reshape(-1, 1)) > 0, hs, 1e3)  # garbage on padded tokens
    assert float(distill.hidden_mse([hs], [ht], mask)) == pytest.approx(c * c, rel=1e-6)
    # two layers: the mean of c^2 and 0
    assert float(distill.hidden_mse([hs, ht], [ht, ht], mask)) == pytest.approx(c * c / 2, rel=1e-6)
    s, t = jnp.asarray(_emb(3, 4, 1)), jnp.asarray(_emb(3, 4, 2))
    full = distill.distill_loss(s, t, student_hidden=[hs], teacher_hidden=[ht], mask=mask, hidden_weight=2.0)
    assert float(full) == pytest.approx(float(distill.cosine_loss(s, t)) + 2 * c * c, rel=1e-6)
    with pytest.raises(ValueError, match="needs student_hidden"):
        distill.distill_loss(s, t, hidden_weight=1.0)
    with pytest.raises(ValueError, match="hidden_weight"):
        distill.distill_loss(s, t, hidden_weight=-1.0)


def test_teacher_cosine_and_neighbour_agreement_closed_forms():
    t = _emb(40, 6)
    assert distill.teacher_cosine(t, t) == pytest.approx(1.0)
    assert distill.teacher_cosine(-t, t) == pytest.approx(-1.0)
    assert distill.neighbour_agreement(t, t) == 1.0
    q, _ = np.linalg.qr(np.random.default_rng(5).standard_normal((6, 6)))
    assert distill.neighbour_agreement(2.5 * t @ q, t) == 1.0  # rotation and scale keep every neighbour
    # other width: the teacher embedded in 9 dimensions after a rotation
    assert distill.neighbour_agreement(np.concatenate([t @ q, np.zeros((40, 3))], 1), t) == 1.0
    # 4 well-separated pairs: nn(i) = i ^ 1. A student that gives sentence i the teacher's embedding of
    # i + 1 (mod 8) has nn_s(i) = ((i + 1) ^ 1) - 1 != i ^ 1 for every i: agreement 0.
    centres = 10 * np.eye(4)
    pairs = np.repeat(centres, 2, axis=0) + 0.1 * np.tile([[1, 0, 0, 0], [0, 1, 0, 0]], (4, 1))
    np.testing.assert_array_equal(distill.nearest_neighbours(pairs), np.arange(8) ^ 1)
    permuted = pairs[(np.arange(8) + 1) % 8]
    assert distill.neighbour_agreement(permuted, pairs) == 0.0
    # half the pairs permuted within themselves (a swap keeps the pair): the rest intact -> 1
    assert distill.neighbour_agreement(pairs[np.arange(8) ^ 1], pairs) == 1.0
    with pytest.raises(ValueError, match="at least 2"):
        distill.nearest_neighbours(t[:1])
    with pytest.raises(ValueError, match="NaN"):
        distill.teacher_cosine(np.full((2, 2), np.nan), t[:2, :2])
    m = distill.heldout_metrics(t, t, min_sentences=40)
    assert m == {"teacher_cos": pytest.approx(1.0), "nn_agreement": 1.0, "num_sentences": 40.0}
    with pytest.raises(ValueError, match="at least 500"):
        distill.heldout_metrics(t, t)


def test_heldout_split_is_deterministic_and_disjoint():
    sents = [f"Sentence number {i}." for i in range(50)] + ["Sentence number 3."]  # one duplicate
    tr, ho = distill.heldout_split(sents, 10, seed=1)
    assert len(ho) == 10 and len(tr) == 40 and not set(tr) & set(ho)
    assert sorted(tr + ho) == sorted(set(sents))
    assert tr == sorted(tr, key=sents.index) and ho == sorted(ho, key=sents.index)  # input order kept
    assert distill.heldout_split(sents, 10, seed=1) == (tr, ho)
    assert distill.heldout_split(sents, 10, seed=2)[1] != ho
    with pytest.raises(ValueError, match=r"num_heldout: must be an integer in \[1, 49\]"):
        distill.heldout_split(sents, 50)
    tr_d, ho_d = distill.default_split()
    assert len(ho_d) == distill.DEFAULT_HELDOUT >= 500 and len(tr_d) >= 1000 and not set(tr_d) & set(ho_d)


def test_sentence_batches_cover_an_epoch(tmp_path):
    pytest.importorskip("safetensors", reason="safetensors is not installed (pip install safetensors)")
    pytest.importorskip("tokenizers", reason="tokenizers is not installed (pip install tokenizers)")
    write_tiny_bert(tmp_path / "m")
    _, tok, _ = load_bert(tmp_path / "m")
    sents = [f"the cat sat {'on the mat ' * (i % 3)}." for i in range(12)]
    key = jax.random.key(0)
    seen = []
    for step in range(3):
        b = distill.sentence_batch(tok, sents, key, step, 4)
        # padded to a multiple of 8 tokens, capped at max_seq_length (12)
        assert b["input_ids"].shape[0] == 4 and b["input_ids"].shape[1] in (8, 12)
        lengths = [len(p) + 2 for p in tok.pieces([sents[i] for i in b["index"]])]
        np.testing.assert_array_equal(b["attention_mask"].sum(1), lengths)
        np.testing.assert_array_equal(b["input_ids"][:, 0], tok.cls_id)
        seen += b["index"].tolist()
    assert sorted(seen) == list(range(12))  # one epoch: every sentence once
    again = distill.sentence_batch(tok, sents, key, 1, 4)
    np.testing.assert_array_equal(again["index"], seen[4:8])
    with pytest.raises(ValueError, match="batch_size"):
        distill.sentence_batch(tok, sents, key, 0, 13)


def test_split_sentences_rules(tmp_path):
    text = ("Heading\n*******\n\nThe first sentence is here. And a second one follows! Is this a third one?\n"
            "continued on the next line without a capital start.\n\n"
            "   >>> print('code is dropped')\n   code is dropped.\n\n"
            "Too short.\n\nThe first sentence is here.\n\n"
            "Numbers like 1 2 3 4 5 6 7 8 9 10 11 12 fill this line.\n")
    assert split_sentences(text) == ["The first sentence is here.", "And a second one follows!",
                                     "Is this a third one? continued on the next line without a capital start."]
    p = tmp_path / "t.txt"
    p.write_text(text)
    assert load_sentences(p) == split_sentences(text)
    with pytest.raises(ValueError, match="at least 5 needed"):
        load_sentences(p, min_sentences=5)
    with pytest.raises(FileNotFoundError):
        load_sentences(tmp_path / "missing.txt")
    assert len(load_sentences()) > 1500
