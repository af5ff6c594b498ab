"""Pre-LN Transformers: a ViT-style image classifier and a causal byte-level LM.

Block: h <- h + Attn(LN_1(h)); h <- h + MLP(LN_2(h)) with the MLP of ``models.common``.
Dense layers act on token-flattened (B*T, D) arrays; only attention itself reshapes to
(B, heads, T, d_head).
"""

from __future__ import annotations

import math

import einops
import equinox as eqx
import jax
import jax.numpy as jnp

from gradsparse._validate import check_int
from gradsparse.activations import Activation, ReLU
from gradsparse.models.common import Dense, LayerNorm, MLPBlock

Array = jax.Array


class Attention(eqx.Module):
    """Multi-head self-attention on (B*T, d) tokens; qkv: Dense d -> 3d, out: Dense d -> d."""

    ln: LayerNorm
    qkv: Dense
    out: Dense
    heads: int = eqx.field(static=True)
    causal: bool = eqx.field(static=True, default=False)

    def __call__(self, h: Array, batch: int) -> Array:
        t = h.shape[0] // batch
        qkv = self.qkv(self.ln(h))
        q, k, v = einops.rearrange(qkv, "(b t) (three h e) -> three b h t e", b=batch, t=t, three=3, h=self.heads)
        s = jnp.einsum("bhte,bhse->bhts", q, k) / math.sqrt(q.shape[-1])
        if self.causal:
            mask = jnp.tril(jnp.ones((t, t), bool))
            s = jnp.where(mask, s, jnp.finfo(s.dtype).min)
        o = jnp.einsum("bhts,bhse->bhte", jax.nn.softmax(s, axis=-1), v)
        return self.out(einops.rearrange(o, "b h t e -> (b t) (h e)"))


class TransformerBlock(eqx.Module):
    attn: Attention
    mlp: MLPBlock


def _blocks(key: Array, depth: int, width: int, heads: int, mlp_ratio: int, act: Activation,
            ln_affine: bool, causal: bool) -> list[TransformerBlock]:
    out = []
    for k in jax.random.split(key, depth):
        k1, k2, k3 = jax.random.split(k, 3)
        attn = Attention(LayerNorm.create(width, ln_affine), Dense.create(k1, width, 3 * width),
                         Dense.create(k2, width, width), heads, causal)
        out.append(TransformerBlock(attn, MLPBlock.create(k3, width, mlp_ratio * width, act, ln_affine)))
    return out


def _check_sizes(kind: str, **sizes: int) -> None:
    for name, v in sizes.items():
        check_int(f"{kind} {name}", v, 1)
    if sizes["width"] % sizes["heads"]:
        raise ValueError(f"{kind}: heads ({sizes['heads']}) must divide width ({sizes['width']})")


def _run_blocks(blocks: list[TransformerBlock], h: Array, probes, positions: Array, batch: int,
                key: Array | None, tps: int) -> tuple[Array, list[dict[str, Array]]]:
    keys = [None] * len(blocks) if key is None else list(jax.random.split(key, len(blocks)))
    aux = []
    for blk, pr, k in zip(blocks, probes, keys):
        h = h + blk.attn(h, batch)
        y, a = blk.mlp(h, pr, positions, key=k, tokens_per_sample=tps)
        h = h + y
        aux.append(a)
    return h, aux


class ViT(eqx.Module):
    """ViT-style classifier: (B, H, W) images -> non-overlapping p x p patches -> tokens; mean-pooled head."""

    embed: Dense
    pos: Array
    blocks: list[TransformerBlock]
    final_ln: LayerNorm
    head: Dense
    patch: int = eqx.field(static=True)
    image_hw: tuple[int, int] = eqx.field(static=True)

    @staticmethod
    def create(key: Array, image_hw: tuple[int, int], num_classes: int, *, patch: int = 7, width: int = 64,
               depth: int = 2, heads: int = 4, mlp_ratio: int = 4, act: Activation | None = None,
               ln_affine: bool = True) -> "ViT":
        _check_sizes("ViT", patch=patch, width=width, depth=depth, heads=heads, mlp_ratio=mlp_ratio,
                     num_classes=num_classes)
        hh, ww = image_hw
        if hh % patch or ww % patch:
            raise ValueError(f"ViT: patch {patch} must divide the image size {hh}x{ww}")
        act = act if act is not None else ReLU()
        t = (hh // patch) * (ww // patch)
        k0, k1, k2, k3 = jax.random.split(key, 4)
        return ViT(Dense.create(k0, patch * patch, width), 0.02 * jax.random.normal(k1, (t, width)),
                   _blocks(k2, depth, width, heads, mlp_ratio, act, ln_affine, False),
                   LayerNorm.create(width, ln_affine), Dense.create(k3, width, num_classes), patch, (hh, ww))

    @property
    def tokens_per_sample(self) -> int:
        return int(self.pos.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.pos.shape[0])

    def mlp_blocks(self) -> list[MLPBlock]:
        return [b.mlp for b in self.blocks]

    def __call__(self, x: Array, probes, *, key: Array | None = None):
        """x: (B, H, W) -> logits (B, C), per-block aux over the B*T tokens."""
        if x.ndim == 2:  # flattened images
            x = x.reshape(x.shape[0], *self.image_hw)
        b = x.shape[0]
        p = einops.rearrange(x, "b (i p) (j q) -> (b i j) (p q)", p=self.patch, q=self.patch)
        t = self.tokens_per_sample
        positions = jnp.tile(jnp.arange(t), b)
        h = self.embed(p) + self.pos[positions]
        h, aux = _run_blocks(self.blocks, h, probes, positions, b, key, t)
        pooled = einops.reduce(self.final_ln(h), "(b t) d -> b d", "mean", b=b)
        return self.head(pooled), aux


class ByteLM(eqx.Module):
    """Causal byte-level LM: (B, T) int bytes -> next-byte logits (B*T, 256)."""

    embed: Array
    pos: Array
    blocks: list[TransformerBlock]
    final_ln: LayerNorm
    head: Dense

    @staticmethod
    def create(key: Array, *, seq_len: int = 32, width: int = 64, depth: int = 2, heads: int = 4,
               mlp_ratio: int = 4, act: Activation | None = None, ln_affine: bool = True) -> "ByteLM":
        _check_sizes("ByteLM", seq_len=seq_len, width=width, depth=depth, heads=heads, mlp_ratio=mlp_ratio)
        act = act if act is not None else ReLU()
        k0, k1, k2, k3 = jax.random.split(key, 4)
        return ByteLM(0.02 * jax.random.normal(k0, (256, width)), 0.02 * jax.random.normal(k1, (seq_len, width)),
                      _blocks(k2, depth, width, heads, mlp_ratio, act, ln_affine, True),
                      LayerNorm.create(width, ln_affine), Dense.create(k3, width, 256))

    @property
    def seq_len(self) -> int:
        return int(self.pos.shape[0])

    @property
    def tokens_per_sample(self) -> int:
        return int(self.pos.shape[0])

    def mlp_blocks(self) -> list[MLPBlock]:
        return [b.mlp for b in self.blocks]

    def __call__(self, x: Array, probes, *, key: Array | None = None):
        b, t = x.shape
        if t != self.seq_len:
            raise ValueError(f"ByteLM expects sequences of length {self.seq_len}, got {t}")
        positions = jnp.tile(jnp.arange(t), b)
        h = self.embed[x.reshape(-1)] + self.pos[positions]
        h, aux = _run_blocks(self.blocks, h, probes, positions, b, key, t)
        return self.head(self.final_ln(h)), aux
