"""A tiny random BERT in Hugging Face / sentence-transformers layout, written by the tests, and a
plain float64 numpy forward of Hugging Face's BertModel to check encoders against."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from scipy.special import erf

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


def numpy_bert(t: dict[str, np.ndarray], ids: np.ndarray, mask: np.ndarray, act=None, zs: list | None = None
               ) -> list[np.ndarray]:
    """Plain float64 numpy forward of HF BertModel: [h^0, ..., h^L], each (B, T, d).

    ``zs``: a list that receives each layer's MLP pre-activations z (B, T, n)."""
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
        z = lin(x, f"{p}.intermediate.dense")
        if zs is not None:
            zs.append(z)
        y = lin(act(z), f"{p}.output.dense")
        h = ln(x + y, f"{p}.output.LayerNorm")
        out.append(h)
    return out


def mean_pool(h: np.ndarray, mask: np.ndarray) -> np.ndarray:
    m = mask[..., None].astype(np.float64)
    return (h * m).sum(1) / m.sum(1)
