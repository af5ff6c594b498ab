"""Pretrained post-LN BERT encoders (Hugging Face ``BertModel`` layout) with the MLP of ``models.common``.

Loaded from a Hugging Face folder: ``config.json``, ``model.safetensors`` (or a sharded
``model.safetensors.index.json``), ``tokenizer.json`` (read with the ``tokenizers`` package) and,
when present, the sentence-transformers pooling of the folder (``modules.json``,
``1_Pooling/config.json``, ``sentence_bert_config.json``). Inference and gradient probes only:
no dropout (a PRNG key passed to the model drives the noise plug-ins of the MLP blocks, as in the
other models).

Shapes: B sentences, T tokens each (padded), N = B*T, d = hidden size, n = intermediate size,
H heads, d_h = d / H. Dense layers act on token-flattened (N, d) arrays (as ``models.transformer``);
only attention reshapes to (B, H, T, d_h).

Embeddings::

    h^0_t = LN_emb(W_word[id_t] + W_pos[t] + W_type[type_t])                     (N, d)

Layer l (POST-LN, as BERT; HF names in brackets)::

    q, k, v = Q h, K_att h, V_att h          [attention.self.query/key/value]     (N, d) each
    A       = softmax(q k^T / sqrt(d_h) + mask) v   per head, padded keys masked   (N, d)
    s_t     = h_t + O A_t + b_O              [attention.output.dense]             (N, d)
    x_t     = LN_att(s_t)                    [attention.output.LayerNorm]         (N, d)
    z_t     = K x_t + b_K                    [intermediate.dense]                 (N, n)
    a_t     = sigma(z_t)   (exact-erf GELU for hidden_act = "gelu")                (N, n)
    y_t     = V a_t + b_V                    [output.dense]                       (N, d)
    h'_t    = LN_out(x_t + y_t)              [output.LayerNorm]                   (N, d)

Which x the monitors see: in a post-LN model the LayerNorm that feeds the MLP is the
*attention sub-layer's output LayerNorm* LN_att, and its output x_t is at the same time the
residual stream entering the MLP. The layer's :class:`~gradsparse.models.common.MLPBlock` holds
LN_att as its ``ln`` (so the restricted-LN plug-in acts on it) and K, V as ``key``, ``value``;
it receives s_t and returns x, z, a as aux, exactly as in the pre-LN models (SPEC 1). The residual
added to y_t is LN_att(s_t) without the zeroth bias (the zeroth bias, SPEC 4.1, enters the key
matrix only). LN_out lies outside the block: it is the input LN of the next layer's attention.

Sentence embedding (sentence-transformers Pooling / Normalize): mean pooling
e = sum_t m_t h^L_t / max(sum_t m_t, 1e-9) with the attention mask m (also "cls": h^L_0, and
"max": max over unmasked tokens), then e / max(||e||, 1e-12) when the folder lists Normalize.

Public: :func:`load_bert` -> (model, tokenizer, info), :func:`encode` -> (num_sentences, d)
embeddings, :func:`hidden_states` -> per-layer (B, T, d) arrays, and the :class:`BertEncoder`
model with the common model interface (``model(input_ids, probes, attention_mask=...)`` ->
(embeddings, aux), ``mlp_blocks()``, ``seq_len``).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import einops
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from gradsparse import weights
from gradsparse.activations import GELU, Activation, ReLU, get_activation
from gradsparse.models.common import Dense, LayerNorm, MLPBlock, zero_probes

Array = jax.Array

#: pooling modes of the sentence-transformers Pooling module that are implemented
POOLING_MODES = ("mean", "cls", "max")
#: sentence-transformers module types a folder's modules.json may list
SUPPORTED_MODULES = ("Transformer", "Pooling", "Normalize")
#: hidden_act values of config.json and the activation they map to
HIDDEN_ACTS = {"gelu": GELU, "relu": ReLU}

_MEAN_CLAMP = 1e-9  # sentence-transformers: sum of the mask clamped at 1e-9
_NORM_EPS = 1e-12  # torch.nn.functional.normalize


# --------------------------------------------------------------------------------------------
# reading the folder
# --------------------------------------------------------------------------------------------

def _read_tensors(folder: Path) -> dict[str, np.ndarray]:
    """All tensors of a Hugging Face folder (:func:`gradsparse.weights.read_tensors`: model.safetensors
    or the shards of model.safetensors.index.json), bfloat16 widened to float32."""
    for name in ("model.safetensors", "model.safetensors.index.json"):
        if (folder / name).is_symlink():
            weights.check_readable(folder / name)  # a symlink loop or broken link is named as such
    if not ((folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file()):
        present = sorted(p.name for p in folder.iterdir())[:12]
        raise ValueError(f"{folder}: no model.safetensors or model.safetensors.index.json (found: {present}); "
                         "allowed: a Hugging Face folder with safetensors weights")
    out = {}
    for k, v in weights.read_tensors(folder).items():
        out[k] = v.astype(np.float32) if v.dtype.kind == "V" or str(v.dtype) == "bfloat16" else v
    return out


def _weight_files(folder: Path) -> list[Path]:
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    return weights.shard_files(folder / "model.safetensors.index.json")


def _sha256(files: Sequence[Path]) -> str:
    """SHA-256 of the weight files' bytes, concatenated in the listed order."""
    h = hashlib.sha256()
    for p in files:
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {path} as JSON: {e}") from None


def _pos_int(cfg: dict, key: str, default: int | None = None) -> int:
    v = cfg.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"config.json: {key} must be a positive integer, got {v!r}")
    return v


@dataclass(frozen=True)
class BertConfig:
    """The fields of a Hugging Face BERT ``config.json`` this encoder uses."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    pad_token_id: int = 0

    @staticmethod
    def from_dict(cfg: dict) -> "BertConfig":
        """Validate a parsed config.json; ValueError names the offending field and what is allowed."""
        if not isinstance(cfg, dict):
            raise ValueError(f"config.json must hold a JSON object, got {type(cfg).__name__}")
        mt = cfg.get("model_type", "bert")
        if mt != "bert":
            raise ValueError(f"config.json: model_type {mt!r} is not supported; allowed: bert")
        pet = cfg.get("position_embedding_type", "absolute")
        if pet != "absolute":
            raise ValueError(f"config.json: position_embedding_type {pet!r} is not supported; allowed: absolute")
        act = cfg.get("hidden_act", "gelu")
        if act not in HIDDEN_ACTS:
            raise ValueError(f"config.json: hidden_act {act!r} is not supported; allowed: {', '.join(HIDDEN_ACTS)}")
        eps = cfg.get("layer_norm_eps", 1e-12)
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (0 < eps < 1):
            raise ValueError(f"config.json: layer_norm_eps must be a number in (0, 1), got {eps!r}")
        pad = cfg.get("pad_token_id", 0)
        if pad is None:
            pad = 0
        if isinstance(pad, bool) or not isinstance(pad, int) or pad < 0:
            raise ValueError(f"config.json: pad_token_id must be a non-negative integer, got {pad!r}")
        out = BertConfig(
            vocab_size=_pos_int(cfg, "vocab_size"), hidden_size=_pos_int(cfg, "hidden_size"),
            num_hidden_layers=_pos_int(cfg, "num_hidden_layers"),
            num_attention_heads=_pos_int(cfg, "num_attention_heads"),
            intermediate_size=_pos_int(cfg, "intermediate_size"),
            max_position_embeddings=_pos_int(cfg, "max_position_embeddings"),
            type_vocab_size=_pos_int(cfg, "type_vocab_size", 2), layer_norm_eps=float(eps), hidden_act=act,
            pad_token_id=pad)
        if out.hidden_size % out.num_attention_heads:
            raise ValueError(f"config.json: num_attention_heads ({out.num_attention_heads}) must divide "
                             f"hidden_size ({out.hidden_size})")
        if out.pad_token_id >= out.vocab_size:
            raise ValueError(f"config.json: pad_token_id {out.pad_token_id} must be < vocab_size {out.vocab_size}")
        return out


@dataclass
class BertInfo:
    """What :func:`load_bert` read: the folder, its config, pooling, and the weights' SHA-256."""

    folder: str
    config: BertConfig
    pooling: str
    normalize: bool
    max_seq_length: int
    weight_files: list[str]
    weights_sha256: str
    num_params: int
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["config"] = asdict(self.config)
        return d


def _pooling(folder: Path) -> tuple[str, bool, list[str]]:
    """(pooling mode, normalize, notes) from modules.json + the Pooling folder's config.json."""
    mfile = folder / "modules.json"
    if not mfile.is_file():
        return "mean", False, ["no modules.json: mean pooling, no normalisation"]
    mods = _read_json(mfile)
    if not isinstance(mods, list):
        raise ValueError(f"{mfile}: expected a JSON list of modules")
    mode, normalize, notes = None, False, []
    for m in mods:
        typ = str(m.get("type", "")) if isinstance(m, dict) else ""
        short = typ.rsplit(".", 1)[-1]
        if short not in SUPPORTED_MODULES:
            raise ValueError(f"{mfile}: module type {typ!r} is not supported; allowed: {', '.join(SUPPORTED_MODULES)}")
        if short == "Normalize":
            normalize = True
        elif short == "Pooling":
            where = f"{mfile}: the Pooling module's path"
            pcfg_path = weights.inside_folder(folder, m.get("path"), where) / "config.json"
            if not pcfg_path.is_file():
                raise ValueError(f"{mfile} lists a Pooling module but {pcfg_path} does not exist")
            pcfg = _read_json(pcfg_path)
            on = [k for k in ("pooling_mode_cls_token", "pooling_mode_mean_tokens", "pooling_mode_max_tokens",
                              "pooling_mode_mean_sqrt_len_tokens", "pooling_mode_weightedmean_tokens",
                              "pooling_mode_lasttoken") if pcfg.get(k)]
            if "pooling_mode" in pcfg and not on:
                on = [f"pooling_mode_{pcfg['pooling_mode']}"]
            names = {"pooling_mode_cls_token": "cls", "pooling_mode_mean_tokens": "mean",
                     "pooling_mode_max_tokens": "max", "pooling_mode_mean": "mean", "pooling_mode_cls": "cls",
                     "pooling_mode_max": "max"}
            if len(on) != 1 or on[0] not in names:
                raise ValueError(f"{pcfg_path}: pooling {on or 'none'} is not supported; allowed: exactly one of "
                                 f"{', '.join(POOLING_MODES)}")
            mode = names[on[0]]
    if mode is None:
        mode = "mean"
        notes.append("modules.json lists no Pooling module: mean pooling")
    return mode, normalize, notes


def _max_seq_length(folder: Path, cfg: BertConfig) -> int:
    sb = folder / "sentence_bert_config.json"
    n = None
    if sb.is_file():
        n = _read_json(sb).get("max_seq_length")
    if n is None and (folder / "tokenizer_config.json").is_file():
        n = _read_json(folder / "tokenizer_config.json").get("model_max_length")
        if isinstance(n, (int, float)) and n > 1e6:  # "unset" sentinel of transformers
            n = None
    if n is None:
        n = cfg.max_position_embeddings
    if isinstance(n, bool) or not isinstance(n, int) or n < 3:
        raise ValueError(f"{folder}: max_seq_length must be an integer >= 3, got {n!r}")
    return min(n, cfg.max_position_embeddings)


# --------------------------------------------------------------------------------------------
# tokenizer
# --------------------------------------------------------------------------------------------

class SentenceTokenizer:
    """``tokenizer.json`` of the folder (``tokenizers.Tokenizer``), truncating at ``max_length`` tokens
    (special tokens included) and padding to the longest sentence of a batch with ``pad_id``.

    ``tok(sentences)`` -> {'input_ids', 'attention_mask', 'token_type_ids'}: int32 (B, T) numpy
    arrays; ``pad_to_multiple_of`` rounds T up (fewer distinct shapes to compile; padding changes
    no embedding). ``pieces(sentences)`` -> token ids without special tokens (for crops),
    truncated to ``max_length - 2``; ``cls_id``/``sep_id`` frame a single sentence.
    """

    def __init__(self, tokenizer: Any, max_length: int, pad_id: int, cls_id: int, sep_id: int,
                 vocab_size: int) -> None:
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self.pad_id, self.cls_id, self.sep_id = int(pad_id), int(cls_id), int(sep_id)
        self.vocab_size = int(vocab_size)
        tokenizer.no_padding()
        tokenizer.enable_truncation(max_length=self.max_length)

    @staticmethod
    def from_folder(folder: Path, cfg: BertConfig, max_length: int) -> "SentenceTokenizer":
        from tokenizers import Tokenizer

        path = folder / "tokenizer.json"
        if not path.is_file():
            raise ValueError(f"{folder}: no tokenizer.json (a fast-tokenizer file is needed)")
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as e:  # the tokenizers package raises its own exception type
            raise ValueError(f"cannot read {path} as a tokenizers file: {e}") from None
        tcfg = _read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}
        ids = {}
        for role, default in (("cls_token", "[CLS]"), ("sep_token", "[SEP]")):
            name = tcfg.get(role, default)
            if isinstance(name, dict):  # AddedToken serialisation
                name = name.get("content", default)
            i = tok.token_to_id(str(name))
            if i is None:
                raise ValueError(f"{path}: the {role} {name!r} is not in the vocabulary")
            ids[role] = i
        if tok.get_vocab_size() > cfg.vocab_size:
            raise ValueError(f"{path}: tokenizer vocabulary ({tok.get_vocab_size()}) is larger than the model's "
                             f"vocab_size ({cfg.vocab_size})")
        return SentenceTokenizer(tok, max_length, cfg.pad_token_id, ids["cls_token"], ids["sep_token"],
                                 cfg.vocab_size)

    @staticmethod
    def _check(sentences: Sequence[str]) -> list[str]:
        if isinstance(sentences, str):
            raise ValueError("sentences must be a list of strings, got a single string (wrap it in a list)")
        out = list(sentences)
        if not out:
            raise ValueError("sentences: the list is empty; allowed: one or more strings")
        bad = [i for i, s in enumerate(out) if not isinstance(s, str)]
        if bad:
            raise ValueError(f"sentences: item {bad[0]} is {type(out[bad[0]]).__name__}, not a string")
        return out

    def pad(self, seqs: Sequence[Sequence[int]], pad_to_multiple_of: int | None = None) -> dict[str, np.ndarray]:
        """Right-pad token id lists into the (B, T) arrays a :class:`BertEncoder` takes."""
        if pad_to_multiple_of is not None and (isinstance(pad_to_multiple_of, bool)
                                               or not isinstance(pad_to_multiple_of, int) or pad_to_multiple_of < 1):
            raise ValueError(f"pad_to_multiple_of: must be a positive integer or None, got {pad_to_multiple_of!r}")
        if not seqs or any(len(s) == 0 for s in seqs):
            raise ValueError("pad: every sequence needs at least one token")
        t = max(len(s) for s in seqs)
        if t > self.max_length:
            raise ValueError(f"pad: a sequence has {t} tokens; allowed: at most max_length = {self.max_length}")
        if pad_to_multiple_of:
            t = min(-(-t // pad_to_multiple_of) * pad_to_multiple_of, self.max_length)
        ids = np.full((len(seqs), t), self.pad_id, np.int32)
        mask = np.zeros((len(seqs), t), np.int32)
        for i, s in enumerate(seqs):
            ids[i, :len(s)] = s
            mask[i, :len(s)] = 1
        return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}

    def __call__(self, sentences: Sequence[str], pad_to_multiple_of: int | None = None) -> dict[str, np.ndarray]:
        sents = self._check(sentences)
        enc = self.tokenizer.encode_batch(sents)
        return self.pad([e.ids for e in enc], pad_to_multiple_of)

    def pieces(self, sentences: Sequence[str]) -> list[np.ndarray]:
        """Token ids of each sentence without special tokens, at most ``max_length - 2`` of them."""
        sents = self._check(sentences)
        enc = self.tokenizer.encode_batch(sents, add_special_tokens=False)
        return [np.asarray(e.ids[: self.max_length - 2], np.int32) for e in enc]


# --------------------------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------------------------

class BertEmbeddings(eqx.Module):
    """h^0 = LN(W_word[ids] + W_pos[positions] + W_type[types]); tables (vocab, d), (P, d), (types, d)."""

    word: Array
    position: Array
    token_type: Array
    ln: LayerNorm

    def __call__(self, ids: Array, positions: Array, types: Array) -> Array:
        return self.ln(self.word[ids] + self.position[positions] + self.token_type[types])


class BertSelfAttention(eqx.Module):
    """s = h + O softmax(q k^T / sqrt(d_h) + mask) v (per head); the LN after it is the MLP block's ``ln``."""

    query: Dense
    key: Dense
    value: Dense
    out: Dense
    heads: int = eqx.field(static=True)

    def __call__(self, h: Array, mask: Array) -> Array:
        """h: (B*T, d); mask: (B, T) bool (True = real token). Returns s = h + attention output (B*T, d)."""
        b, t = mask.shape
        split = lambda u: einops.rearrange(u, "(b t) (h e) -> b h t e", b=b, t=t, h=self.heads)  # noqa: E731
        q, k, v = split(self.query(h)), split(self.key(h)), split(self.value(h))
        s = jnp.einsum("bhte,bhse->bhts", q, k) / math.sqrt(q.shape[-1])
        s = jnp.where(mask[:, None, None, :], s, jnp.finfo(s.dtype).min)
        o = jnp.einsum("bhts,bhse->bhte", jax.nn.softmax(s, axis=-1), v)
        return h + self.out(einops.rearrange(o, "b h t e -> (b t) (h e)"))


class BertLayer(eqx.Module):
    """attention (+ residual) -> MLPBlock (its ``ln`` = LN_att) -> LN_out(x + y); see the module docstring."""

    attn: BertSelfAttention
    mlp: MLPBlock
    out_ln: LayerNorm


def _check_batch(input_ids: Array, attention_mask: Array | None, token_type_ids: Array | None):
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids: must be a (B, T) integer array, got shape {tuple(input_ids.shape)}")
    if not jnp.issubdtype(input_ids.dtype, jnp.integer):
        raise ValueError(f"input_ids: must hold integers, got dtype {input_ids.dtype}")
    mask = jnp.ones(input_ids.shape, bool) if attention_mask is None else jnp.asarray(attention_mask)
    if mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask: shape {tuple(mask.shape)} must equal input_ids' {tuple(input_ids.shape)}")
    types = jnp.zeros_like(input_ids) if token_type_ids is None else jnp.asarray(token_type_ids)
    if types.shape != input_ids.shape:
        raise ValueError(f"token_type_ids: shape {tuple(types.shape)} must equal input_ids' {tuple(input_ids.shape)}")
    return mask.astype(bool), types


class BertEncoder(eqx.Module):
    """Post-LN BERT with sentence pooling. Fields: ``embeddings``, ``layers`` (list of :class:`BertLayer`),
    ``pooling`` ('mean' | 'cls' | 'max'), ``normalize``, ``seq_len`` (max tokens per sentence: the
    zeroth bias has ``seq_len`` positions).

    ``model(input_ids, probes=None, *, attention_mask=None, token_type_ids=None, key=None)`` ->
    (embeddings (B, d), aux): aux is one {'x', 'z', 'a'} dict per MLP block over all N = B*T
    tokens, padded ones included (their gradients are exactly 0; leave them out of statistics
    with the attention mask). ``probes``: one {'a': (N, n), 'y': (N, d)} per block, or None.
    """

    embeddings: BertEmbeddings
    layers: list[BertLayer]
    pooling: str = eqx.field(static=True, default="mean")
    normalize: bool = eqx.field(static=True, default=False)
    seq_len: int = eqx.field(static=True, default=512)

    def mlp_blocks(self) -> list[MLPBlock]:
        return [layer.mlp for layer in self.layers]

    @property
    def d(self) -> int:
        return int(self.embeddings.word.shape[1])

    def encode_tokens(self, input_ids: Array, probes=None, *, attention_mask: Array | None = None,
                      token_type_ids: Array | None = None, key: Array | None = None
                      ) -> tuple[list[Array], list[dict[str, Array]]]:
        """All hidden states [h^0 (embeddings), h^1, ..., h^L], each (B*T, d), and the per-block aux."""
        input_ids = jnp.asarray(input_ids)
        mask, types = _check_batch(input_ids, attention_mask, token_type_ids)
        b, t = input_ids.shape
        if t > self.embeddings.position.shape[0]:
            raise ValueError(f"input_ids: {t} tokens per sentence; allowed: at most "
                             f"{self.embeddings.position.shape[0]} (position table)")
        if probes is None:
            probes = zero_probes(self.mlp_blocks(), b * t)
        if len(probes) != len(self.layers):
            raise ValueError(f"probes: {len(probes)} given for {len(self.layers)} layers")
        positions = jnp.tile(jnp.arange(t), b)
        h = self.embeddings(input_ids.reshape(-1), positions, types.reshape(-1))
        hs, aux = [h], []
        keys = [None] * len(self.layers) if key is None else list(jax.random.split(key, len(self.layers)))
        for layer, pr, k in zip(self.layers, probes, keys):
            s = layer.attn(h, mask)
            y, ax = layer.mlp(s, pr, positions, key=k, tokens_per_sample=t)
            h = layer.out_ln(layer.mlp.ln(s) + y)
            hs.append(h)
            aux.append(ax)
        return hs, aux

    def pool(self, h: Array, attention_mask: Array) -> Array:
        """Sentence embeddings (B, d) from the last hidden state h (B*T, d) (module docstring)."""
        mask = jnp.asarray(attention_mask).astype(bool)
        b, t = mask.shape
        hb = h.reshape(b, t, -1)
        m = mask[..., None].astype(h.dtype)
        if self.pooling == "mean":
            e = jnp.sum(hb * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), _MEAN_CLAMP)
        elif self.pooling == "cls":
            e = hb[:, 0]
        elif self.pooling == "max":
            e = jnp.max(jnp.where(m > 0, hb, -1e9), axis=1)
        else:  # pragma: no cover - checked at construction
            raise ValueError(f"pooling {self.pooling!r}; allowed: {', '.join(POOLING_MODES)}")
        if self.normalize:
            e = e / jnp.maximum(jnp.linalg.norm(e, axis=-1, keepdims=True), _NORM_EPS)
        return e

    def __call__(self, input_ids: Array, probes=None, *, attention_mask: Array | None = None,
                 token_type_ids: Array | None = None, key: Array | None = None
                 ) -> tuple[Array, list[dict[str, Array]]]:
        input_ids = jnp.asarray(input_ids)
        hs, aux = self.encode_tokens(input_ids, probes, attention_mask=attention_mask,
                                     token_type_ids=token_type_ids, key=key)
        mask = jnp.ones(input_ids.shape, bool) if attention_mask is None else attention_mask
        return self.pool(hs[-1], mask), aux


def with_activation(model: BertEncoder, act: str | Activation) -> BertEncoder:
    """The same model with every MLP block's activation replaced (e.g. 'relu' for relufication)."""
    if not isinstance(model, BertEncoder):
        raise ValueError(f"model: expected a BertEncoder, got {type(model).__name__}")
    a = get_activation(act)
    return eqx.tree_at(lambda m: [layer.mlp.act for layer in m.layers], model, [a] * len(model.layers))


# --------------------------------------------------------------------------------------------
# weights -> model
# --------------------------------------------------------------------------------------------

def _strip_prefix(tensors: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list[str]]:
    """Accept 'bert.'-prefixed names (task-head checkpoints) and the old LayerNorm gamma/beta names.

    Returns (tensors under BertModel names, names outside the 'bert.' prefix that were left out)."""
    dropped: list[str] = []
    if "embeddings.word_embeddings.weight" not in tensors and "bert.embeddings.word_embeddings.weight" in tensors:
        dropped = sorted(k for k in tensors if not k.startswith("bert."))
        tensors = {k[5:]: v for k, v in tensors.items() if k.startswith("bert.")}
    out = {}
    for k, v in tensors.items():
        if k.endswith("LayerNorm.gamma"):
            k = k[: -len("gamma")] + "weight"
        elif k.endswith("LayerNorm.beta"):
            k = k[: -len("beta")] + "bias"
        out[k] = v
    return out, dropped


class _Weights:
    def __init__(self, tensors: dict[str, np.ndarray], folder: Path) -> None:
        self.t, self.folder, self.used = tensors, folder, set()

    def get(self, name: str, shape: tuple[int, ...]) -> Array:
        if name not in self.t:
            raise ValueError(f"{self.folder}: weight {name!r} is missing (is this a BERT checkpoint?)")
        v = self.t[name]
        if tuple(v.shape) != shape:
            raise ValueError(f"{self.folder}: weight {name!r} has shape {tuple(v.shape)}, config.json implies {shape}")
        if not np.issubdtype(v.dtype, np.floating):
            raise ValueError(f"{self.folder}: weight {name!r} has dtype {v.dtype}; allowed: floating point")
        bad = int(v.size - np.count_nonzero(np.isfinite(v)))
        if bad:
            raise ValueError(f"{self.folder}: weight {name!r} holds {bad} NaN or inf entries; allowed: finite weights "
                             "(the folder's weights are damaged)")
        self.used.add(name)
        return jnp.asarray(v, jnp.float32)

    def dense(self, prefix: str, d_in: int, d_out: int) -> Dense:
        return Dense(self.get(f"{prefix}.weight", (d_out, d_in)), self.get(f"{prefix}.bias", (d_out,)))

    def ln(self, prefix: str, d: int, eps: float) -> LayerNorm:
        return LayerNorm(self.get(f"{prefix}.weight", (d,)), self.get(f"{prefix}.bias", (d,)), eps)


def build_bert(tensors: dict[str, np.ndarray], cfg: BertConfig, *, pooling: str = "mean", normalize: bool = False,
               seq_len: int | None = None, activation: str | Activation | None = None,
               source: str = "weights") -> BertEncoder:
    """A :class:`BertEncoder` from Hugging Face tensor names (``embeddings.*``, ``encoder.layer.{i}.*``).

    ``activation`` overrides config.json's ``hidden_act``; ``seq_len`` defaults to
    ``max_position_embeddings``. Missing tensors, wrong shapes and non-float weights raise ValueError.
    """
    return _build(tensors, cfg, pooling=pooling, normalize=normalize, seq_len=seq_len, activation=activation,
                  source=source)[0]


def _build(tensors: dict[str, np.ndarray], cfg: BertConfig, *, pooling: str, normalize: bool, seq_len: int | None,
           activation: str | Activation | None, source: str) -> tuple[BertEncoder, list[str]]:
    """:func:`build_bert` and the names of the tensors it did not use."""
    if pooling not in POOLING_MODES:
        raise ValueError(f"pooling: {pooling!r} is not supported; allowed: {', '.join(POOLING_MODES)}")
    seq_len = cfg.max_position_embeddings if seq_len is None else seq_len
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or not 1 <= seq_len <= cfg.max_position_embeddings:
        raise ValueError(f"seq_len: must be an integer in [1, {cfg.max_position_embeddings}], got {seq_len!r}")
    act = HIDDEN_ACTS[cfg.hidden_act]() if activation is None else get_activation(activation)
    mapped, dropped = _strip_prefix(tensors)
    w = _Weights(mapped, Path(source))
    d, n, eps = cfg.hidden_size, cfg.intermediate_size, cfg.layer_norm_eps
    emb = BertEmbeddings(w.get("embeddings.word_embeddings.weight", (cfg.vocab_size, d)),
                         w.get("embeddings.position_embeddings.weight", (cfg.max_position_embeddings, d)),
                         w.get("embeddings.token_type_embeddings.weight", (cfg.type_vocab_size, d)),
                         w.ln("embeddings.LayerNorm", d, eps))
    layers = []
    for i in range(cfg.num_hidden_layers):
        p = f"encoder.layer.{i}"
        attn = BertSelfAttention(w.dense(f"{p}.attention.self.query", d, d), w.dense(f"{p}.attention.self.key", d, d),
                                 w.dense(f"{p}.attention.self.value", d, d),
                                 w.dense(f"{p}.attention.output.dense", d, d), cfg.num_attention_heads)
        mlp = MLPBlock(w.ln(f"{p}.attention.output.LayerNorm", d, eps), w.dense(f"{p}.intermediate.dense", d, n),
                       w.dense(f"{p}.output.dense", n, d), act)
        layers.append(BertLayer(attn, mlp, w.ln(f"{p}.output.LayerNorm", d, eps)))
    extra = [k for k in w.t if k.startswith(f"encoder.layer.{cfg.num_hidden_layers}.")]
    if extra:
        raise ValueError(f"{source}: the weights hold more layers than num_hidden_layers = {cfg.num_hidden_layers}")
    unused = dropped + sorted(set(mapped) - w.used)
    return BertEncoder(emb, layers, pooling, normalize, seq_len), unused


def load_bert(folder: str | Path, *, activation: str | Activation | None = None
              ) -> tuple[BertEncoder, SentenceTokenizer, BertInfo]:
    """Load a Hugging Face BERT folder: (model, tokenizer, info).

    Reads config.json, the safetensors weights, tokenizer.json and the sentence-transformers
    pooling (module docstring). ``activation`` replaces the MLP activation (e.g. 'relu'); by
    default it is config.json's ``hidden_act`` (exact-erf GELU for 'gelu'). The pooler, position
    id buffer and other unused tensors are listed in ``info.notes``.
    """
    folder = Path(folder)
    if not folder.exists():
        if folder.is_symlink():
            weights.check_readable(folder)  # names a symlink loop or a broken link
        raise FileNotFoundError(f"no model folder at {folder}")
    if not folder.is_dir():
        raise ValueError(f"{folder} is a file; allowed: a Hugging Face model folder (config.json, model.safetensors)")
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder}: no config.json; allowed: a Hugging Face model folder")
    cfg = BertConfig.from_dict(_read_json(folder / "config.json"))
    pooling, normalize, notes = _pooling(folder)
    max_len = _max_seq_length(folder, cfg)
    tensors = _read_tensors(folder)
    model, unused = _build(tensors, cfg, pooling=pooling, normalize=normalize, seq_len=max_len,
                           activation=activation, source=str(folder))
    tok = SentenceTokenizer.from_folder(folder, cfg, max_len)
    files = _weight_files(folder)
    if unused:
        notes.append(f"unused tensors: {', '.join(unused[:6])}" + (" ..." if len(unused) > 6 else ""))
    n_params = sum(int(a.size) for a in jax.tree_util.tree_leaves(eqx.filter(model, eqx.is_array)))
    info = BertInfo(str(folder.resolve()), cfg, pooling, normalize, max_len, [p.name for p in files],
                    _sha256(files), n_params, notes)
    return model, tok, info


# --------------------------------------------------------------------------------------------
# inference helpers
# --------------------------------------------------------------------------------------------

@eqx.filter_jit
def _embed(model: BertEncoder, ids: Array, mask: Array, types: Array) -> Array:
    return model(ids, attention_mask=mask, token_type_ids=types)[0]


@eqx.filter_jit
def _hidden(model: BertEncoder, ids: Array, mask: Array, types: Array) -> list[Array]:
    return model.encode_tokens(ids, attention_mask=mask, token_type_ids=types)[0]


def check_batch(model: BertEncoder, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Validate a tokenised batch on the host: (B, T) integer arrays, ids < vocab, >= 1 real token each."""
    if not isinstance(batch, dict) or "input_ids" not in batch:
        raise ValueError("batch: expected a dict with 'input_ids' (and 'attention_mask', 'token_type_ids')")
    ids = np.asarray(batch["input_ids"])
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"input_ids: must be a (B, T) integer array, got {ids.dtype} of shape {ids.shape}")
    vocab = int(model.embeddings.word.shape[0])
    if ids.size and (ids.min() < 0 or ids.max() >= vocab):
        raise ValueError(f"input_ids: ids must lie in [0, {vocab}), got [{ids.min()}, {ids.max()}]")
    mask = np.asarray(batch.get("attention_mask", np.ones_like(ids)))
    types = np.asarray(batch.get("token_type_ids", np.zeros_like(ids)))
    if mask.shape != ids.shape or types.shape != ids.shape:
        raise ValueError("attention_mask and token_type_ids must have the shape of input_ids")
    if ids.shape[1] > model.embeddings.position.shape[0]:
        raise ValueError(f"input_ids: {ids.shape[1]} tokens; allowed: at most {model.embeddings.position.shape[0]}")
    if (mask.sum(axis=1) < 1).any():
        raise ValueError("attention_mask: every sentence needs at least one real token")
    ntypes = int(model.embeddings.token_type.shape[0])
    if types.size and (types.min() < 0 or types.max() >= ntypes):
        raise ValueError(f"token_type_ids: must lie in [0, {ntypes})")
    return {"input_ids": ids.astype(np.int32), "attention_mask": mask.astype(np.int32),
            "token_type_ids": types.astype(np.int32)}


def hidden_states(model: BertEncoder, batch: dict[str, np.ndarray]) -> list[np.ndarray]:
    """[h^0, ..., h^L] of a tokenised batch, each (B, T, d) float32 (h^0: embedding output).

    As Hugging Face's ``output_hidden_states``; rows of padded tokens are computed but meaningless.
    """
    b = check_batch(model, batch)
    hs = _hidden(model, b["input_ids"], b["attention_mask"], b["token_type_ids"])
    bsz, t = b["input_ids"].shape
    return [np.asarray(h).reshape(bsz, t, -1) for h in hs]


def encode(model: BertEncoder, tokenizer: SentenceTokenizer, sentences: Sequence[str], *, batch_size: int = 64,
           progress: bool = False) -> np.ndarray:
    """Sentence embeddings (num_sentences, d) float32, in the order given.

    Sentences are tokenised in batches of ``batch_size`` taken in order of length (less
    padding), padded to a multiple of 8 tokens (few shapes to compile), and put back in order.
    """
    if not isinstance(model, BertEncoder):
        raise ValueError(f"model: expected a BertEncoder, got {type(model).__name__}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: must be a positive integer, got {batch_size!r}")
    sents = SentenceTokenizer._check(sentences)
    lengths = [len(p) for p in tokenizer.pieces(sents)]
    order = np.argsort(lengths, kind="stable")
    out = np.zeros((len(sents), model.d), np.float32)
    starts = range(0, len(sents), batch_size)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc="encode", unit="batch", leave=False)
    for s in starts:
        idx = order[s:s + batch_size]
        b = check_batch(model, tokenizer([sents[i] for i in idx], pad_to_multiple_of=8))
        out[idx] = np.asarray(_embed(model, b["input_ids"], b["attention_mask"], b["token_type_ids"]))
    return out
