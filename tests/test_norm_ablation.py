"""The MLP's norm ablation (TrainConfig.norm): what each variant feeds the key layer, its gradient,
the default model left unchanged, the config errors, and run ids pinned across the new field."""

from __future__ import annotations

import json

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gradsparse.config import TrainConfig
from gradsparse.data import DataInfo
from gradsparse.factory import build, skeleton_from_header
from gradsparse.models import ResidualMLP
from gradsparse.models.common import LayerNorm, NoNorm, ScaledLayerNorm, zero_probes
from gradsparse.runplan import config_digest, finished_config, run_id
from theory_checks.context import sgd_config


def _tiny(norm: str, ln_affine: bool = False) -> ResidualMLP:
    return ResidualMLP.create(jax.random.key(3), 10, 4, width=8, depth=2, mlp_ratio=2, ln_affine=ln_affine, norm=norm)


def _forward(m: ResidualMLP, x: jax.Array):
    return m(x, zero_probes(m.mlp_blocks(), x.shape[0]))


def _residual_stream(m: ResidualMLP, x: jax.Array) -> list[np.ndarray]:
    """h entering each block, recomputed outside the model (residual MLP: h <- h + y)."""
    h = m.inp(x)
    out = []
    for blk in m.blocks:
        out.append(np.asarray(h))
        y, _ = blk(h, {"a": jnp.zeros((x.shape[0], blk.n)), "y": jnp.zeros((x.shape[0], blk.d))},
                   jnp.zeros((x.shape[0],), jnp.int32))
        h = h + y
    return out


def test_none_feeds_h_exactly():
    m = _tiny("none")
    assert all(isinstance(b.ln, NoNorm) for b in m.blocks) and isinstance(m.final_ln, LayerNorm)
    x = jax.random.normal(jax.random.key(4), (5, 10)) * 3.0
    _, aux = _forward(m, x)
    for hx, a in zip(_residual_stream(m, x), aux):
        assert np.array_equal(np.asarray(a["x"]), hx)
    # the norm is the residual stream's own: not pinned at d = 8
    assert abs(float(np.mean(np.sum(np.asarray(aux[0]["x"]) ** 2, -1))) - 8.0) > 1.0


def test_scale_norm_closed_form():
    m = _tiny("scale")
    s = 0.37
    m = eqx.tree_at(lambda t: [b.ln.scale for b in t.blocks], m, [jnp.asarray(s, jnp.float32)] * 2)
    x = jax.random.normal(jax.random.key(5), (6, 10))
    _, aux = _forward(m, x)
    for hx, a, blk in zip(_residual_stream(m, x), aux, m.blocks):
        c = hx - hx.mean(-1, keepdims=True)
        var = np.mean(c * c, -1)
        want = s**2 * 8 * var / (var + blk.ln.eps)
        np.testing.assert_allclose(np.sum(np.asarray(a["x"], np.float64) ** 2, -1), want, rtol=1e-5)
    assert np.asarray(m.blocks[0].ln.scale).shape == ()
    assert float(_tiny("scale").blocks[1].ln.scale) == 1.0


def test_scale_gradient_matches_finite_difference():
    m = _tiny("scale")
    x = jax.random.normal(jax.random.key(6), (7, 10))
    y = jnp.arange(7) % 4

    def loss_at(s0: jax.Array) -> jax.Array:
        mm = eqx.tree_at(lambda t: t.blocks[0].ln.scale, m, s0)
        logits, _ = _forward(mm, x)
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(7), y])

    s0 = jnp.asarray(1.3, jnp.float32)
    g = float(jax.grad(loss_at)(s0))
    f64 = lambda v: float(loss_at(jnp.asarray(v, jnp.float32)))  # noqa: E731
    eps = 1e-2
    fd = (f64(1.3 + eps) - f64(1.3 - eps)) / (2 * eps)
    assert abs(g) > 1e-3
    assert g == pytest.approx(fd, rel=2e-2)
    # the scale is trained: the default mask marks it
    built = build(TrainConfig(width=8, depth=2, mlp_ratio=2, ln_affine=False, norm="scale"),
                  DataInfo("vector", (10,), 4), jax.random.key(0))
    assert built.trainable.blocks[0].ln.scale is True


def test_default_model_unchanged():
    # literal numbers of this tiny default model (affine LN), computed with the code before the norm field
    m = ResidualMLP.create(jax.random.key(3), 10, 4, width=8, depth=2, mlp_ratio=2)
    assert all(type(b.ln) is LayerNorm for b in m.blocks)
    x = jax.random.normal(jax.random.key(4), (5, 10))
    y, aux = _forward(m, x)
    assert np.asarray(y[0]).tolist() == [-0.00477290153503418, -0.5490914583206177, 0.6602343916893005,
                                         0.42351996898651123]
    assert float(jnp.sum(y)) == 1.8169727325439453
    assert float(jnp.sum(aux[1]["x"] ** 2)) == 39.99934005737305
    leaves = jax.tree_util.tree_leaves(m)
    assert len(leaves) == 18
    assert float(sum(jnp.sum(v) for v in leaves if jnp.issubdtype(v.dtype, jnp.floating))) == 25.49937629699707
    # the explicit norm="layernorm" is the same model, leaf by leaf
    m2 = ResidualMLP.create(jax.random.key(3), 10, 4, width=8, depth=2, mlp_ratio=2, norm="layernorm")
    assert all(np.array_equal(a, b) for a, b in zip(leaves, jax.tree_util.tree_leaves(m2)))
    # the ablations change only the pre-MLP norm: same dense weights for the same key
    for norm in ("none", "scale"):
        mm = _tiny(norm)
        assert np.array_equal(mm.blocks[1].key.weight, _tiny("layernorm").blocks[1].key.weight)


def test_config_errors():
    assert TrainConfig().norm == "layernorm"
    for norm in ("none", "scale"):
        assert TrainConfig(norm=norm).validate().norm == norm
    with pytest.raises(ValueError, match="norm: unknown value 'rms'; allowed: layernorm, none, scale"):
        TrainConfig(norm="rms").validate()
    with pytest.raises(ValueError, match="norm: 'none' is only built for model 'mlp'"):
        TrainConfig(model="lm", data="text", norm="none").validate()
    with pytest.raises(ValueError, match="norm: 'scale' has no LayerNorm parameters for restricted_ln"):
        TrainConfig(norm="scale", restricted_ln=True).validate()
    with pytest.raises(ValueError, match="zeroth_bias"):
        TrainConfig(norm="none", zeroth_bias=True).validate()
    with pytest.raises(ValueError, match="ResidualMLP norm"):
        _tiny("batchnorm")
    # configs written before the field read as the default, and a default config writes no norm
    # (config.json and checkpoint headers of default runs keep their bytes)
    d = TrainConfig().to_dict()
    assert "norm" not in d and TrainConfig.from_dict(d).norm == "layernorm"
    assert TrainConfig(norm="scale").to_dict()["norm"] == "scale"
    assert TrainConfig.from_dict(TrainConfig(norm="none").to_dict()).norm == "none"
    # resuming compares every field, the omitted one included
    TrainConfig(steps=20).check_resumable(TrainConfig(steps=10))
    with pytest.raises(ValueError, match="norm: 'layernorm' differs from 'none'"):
        TrainConfig(steps=20).check_resumable(TrainConfig(steps=10, norm="none"))
    with pytest.raises(ValueError, match="norm: 'none' differs from 'layernorm'"):
        TrainConfig(steps=20, norm="none").check_resumable(TrainConfig(steps=10))


def test_run_ids_pinned():
    # literal run ids of existing configs, computed before the norm field existed
    assert run_id(sgd_config("quick").to_dict()) == "d7ad444fb05e-s0"
    assert run_id(TrainConfig().to_dict()) == "45f1cf271c10-s0"
    assert run_id(sgd_config("quick", ln_affine=False, flatness_every=0).to_dict()) == "573ccb3634ce-s0"
    assert run_id({**sgd_config("quick").to_dict(), "norm": "layernorm"}) == "d7ad444fb05e-s0"
    # a non-default norm is a different run
    base = sgd_config("quick", ln_affine=False, flatness_every=0)
    ids = {config_digest(base.replace(norm=n).to_dict()) for n in ("layernorm", "none", "scale")}
    assert len(ids) == 3


def test_old_run_folder_still_finished(tmp_path):
    cfg = sgd_config("quick")
    old = cfg.to_dict()  # as a run folder written before the field: no norm
    assert "norm" not in old
    (tmp_path / "config.json").write_text(json.dumps(old), encoding="utf-8")
    (tmp_path / "summary.json").write_text("{}", encoding="utf-8")
    assert finished_config(tmp_path, cfg.to_dict())
    assert finished_config(tmp_path, {**cfg.to_dict(), "norm": "layernorm"})  # an explicit default too
    assert not finished_config(tmp_path, cfg.replace(norm="none").to_dict())


@pytest.mark.parametrize("norm", ["none", "scale"])
def test_checkpoint_skeleton_rebuilds_norm(norm):
    cfg = TrainConfig(width=8, depth=2, mlp_ratio=2, ln_affine=False, norm=norm)
    info = DataInfo("vector", (10,), 4)
    model, _ = skeleton_from_header({"config": cfg.to_dict(), "data_info": info.to_dict()})
    want = NoNorm if norm == "none" else ScaledLayerNorm
    assert all(isinstance(b.ln, want) for b in model.blocks)
