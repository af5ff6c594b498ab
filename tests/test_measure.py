"""``gradsparse measure`` on a tiny random BERT: per-layer forward statistics against a numpy forward,
the swapped-ReLU density, the crop-contrastive gradient monitors; InfoNCE and crops in closed form."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

from gradsparse.cli import main
from gradsparse.measure import crop_pairs, info_nce
from gradsparse.models.bert import load_bert
from gradsparse.sentences import load_sentences
from tiny_bert import numpy_bert, write_tiny_bert

pytest.importorskip("safetensors", reason="safetensors is not installed (pip install safetensors)")
pytest.importorskip("tokenizers", reason="tokenizers is not installed (pip install tokenizers)")

SUBJECTS = ["The cat", "A dog", "The big red dog", "A small blue cat", "The green models"]
VERBS = ["sat on the mat", "ran in the park", "was slow and sat on the mat", "are fast and ran in the park"]


def _text() -> str:
    return "\n\n".join(f"{s} {v}." for s in SUBJECTS for v in VERBS)


def test_info_nce_closed_form():
    B, s = 5, 2.0
    u = jnp.eye(B, 8)
    # u_i . v_j = delta_ij: every row's cross entropy is log(e^s + B - 1) - s
    assert float(info_nce(u, 3.0 * u, s)) == pytest.approx(np.log(np.exp(s) + B - 1) - s, rel=1e-6)
    # identical rows: all logits equal, loss = log B
    w = jnp.ones((B, 3))
    assert float(info_nce(w, w, s)) == pytest.approx(np.log(B), rel=1e-6)
    with pytest.raises(ValueError, match="B >= 2"):
        info_nce(u[:1], u[:1])


def test_crop_pairs_are_random_contiguous_crops(tmp_path):
    write_tiny_bert(tmp_path / "m")
    _, tok, _ = load_bert(tmp_path / "m")
    pieces = tok.pieces(["the big red dog was slow and sat on the mat", "a small blue cat ran in the park"])
    v = crop_pairs(tok, pieces, jax.random.key(0), 4)
    assert v.shape == (2, 2, 6)
    assert (v[:, :, 0] == tok.cls_id).all() and (v[:, :, -1] == tok.sep_id).all()
    for c in range(2):
        for i, p in enumerate(pieces):
            crop = v[c, i, 1:-1].tolist()
            assert any(p[k:k + 4].tolist() == crop for k in range(len(p) - 3))
    np.testing.assert_array_equal(crop_pairs(tok, pieces, jax.random.key(0), 4), v)
    draws = {crop_pairs(tok, pieces, jax.random.key(k), 4).tobytes() for k in range(8)}
    assert len(draws) > 1
    with pytest.raises(ValueError, match=">= 12 word pieces"):
        crop_pairs(tok, pieces, jax.random.key(0), 12)


def test_measure_cli_json_matches_numpy(tmp_path, capsys):
    folder = tmp_path / "m"
    tensors = write_tiny_bert(folder)
    text = tmp_path / "t.txt"
    text.write_text(_text())
    sents = load_sentences(text)
    assert len(sents) == 20
    rc = main(["measure", str(folder), "--text", str(text), "--sentences", "100", "--activation", "relu",
               "--batch-size", "4", "--crop-tokens", "4", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    c = out["context"]
    assert c["sentences"] == 20 and c["layers"] == 2 and c["swap_activation"] == "relu"
    # numpy forward over the real tokens of all 20 sentences
    _, tok, _ = load_bert(folder)
    b = tok(sents)
    real = b["attention_mask"].astype(bool)
    zs, zr = [], []
    numpy_bert(tensors, b["input_ids"], b["attention_mask"], zs=zs)
    numpy_bert(tensors, b["input_ids"], b["attention_mask"], act=lambda z: np.maximum(z, 0), zs=zr)
    assert c["tokens"] == int(real.sum())
    for layer, z, z_relu in zip(out["layers"], zs, zr):
        zz = z[real]
        dsig = 0.5 * (1 + erf(zz / np.sqrt(2))) + zz * np.exp(-zz ** 2 / 2) / np.sqrt(2 * np.pi)
        gelu = 0.5 * zz * (1 + erf(zz / np.sqrt(2)))
        assert layer["pos_frac"] == pytest.approx(np.mean(zz > 0), abs=1e-6)
        assert layer["dsigma_sq"] == pytest.approx(np.mean(dsig ** 2), rel=1e-5)
        assert layer["deriv_sparsity"] == pytest.approx(np.mean(np.abs(dsig) <= 1e-6), abs=1e-6)
        assert layer["density"] == pytest.approx(1 - np.mean(np.abs(gelu) <= 1e-6), abs=1e-6)
        assert layer["density[relu]"] == pytest.approx(np.mean(z_relu[real] > 1e-6), abs=1e-6)
        # gradient monitors under the crop-contrastive loss (no padding: every token real)
        assert 0.0 <= layer["eta_sparse_1e-06"] <= layer["eta_sparse_0.001"] <= 1.0
        assert layer["af_k"] > 0 and layer["identity_relerr"] < 1e-4
    g = c["gradient"]
    eligible = sum(len(p) >= 6 for p in tok.pieces(sents))
    assert g["batches"] == eligible // 4 and g["tokens_per_batch"] == 2 * 4 * 6
    assert 0 < g["loss"] and np.isfinite(g["loss"])
    assert -1 <= c["swap_teacher_cos"] <= 1
    spec = out["spectrum"]
    assert [r["name"] for r in spec] == ["layer0.K", "layer1.K"] and spec[0]["shape"] == [32, 16]
    assert spec[0]["s_max"] == pytest.approx(float(np.linalg.norm(tensors["encoder.layer.0.intermediate.dense.weight"],
                                                                  2)), rel=1e-5)


def test_measure_cli_errors(tmp_path, capsys):
    assert main(["measure", str(tmp_path / "none")]) == 2
    assert "no model folder" in capsys.readouterr().err
    write_tiny_bert(tmp_path / "m")
    assert main(["measure", str(tmp_path / "m"), "--activation", "bogus", "--no-gradients"]) == 2
    err = capsys.readouterr().err
    assert "unknown activation 'bogus'" in err and len(err.strip().splitlines()) == 1
