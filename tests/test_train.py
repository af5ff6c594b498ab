"""Training loop: log format, determinism, checkpoints, optimizers, NaN stop."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gradsparse.checkpoint import list_checkpoints, load_checkpoint, load_model
from gradsparse.config import TrainConfig
from gradsparse.data import Dataset, load_dataset
from gradsparse.models import zero_probes
from gradsparse.data import Batcher, DataInfo
from gradsparse.factory import RunKeys, bare_model, make_optimizer
from gradsparse.models import default_trainable
from gradsparse.rmt import decay_rate
from gradsparse.step import forward_backward
from gradsparse.train import TrainingDiverged, train

TINY = dict(steps=40, width=16, depth=2, batch_size=16, log_every=10, checkpoint_every=20, eval_batch=32)


@pytest.fixture(scope="module")
def mnist():
    return load_dataset("mnist1d", seed=0)


def test_run_folder_log_and_checkpoints(tmp_path, mnist):
    res = train(TrainConfig(**TINY), tmp_path, dataset=mnist, progress=False)
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    recs = [json.loads(line) for line in lines]
    assert [r["step"] for r in recs] == [0, 10, 20, 30, 39]
    r = recs[-1]
    for key in ("loss", "accuracy", "batch_size", "train/density/mean", "heldout/density/mean",
                "train/eta_sparse_0.001/mean", "train/af_k", "train/identity_relerr", "heldout/loss"):
        assert key in r, key
    assert len(r["train/density"]) == 2 and r["batch_size"] == 16
    assert 0 <= r["train/density/mean"] <= 1
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["steps"] == 40
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["seed"] == 0 and "jax" in meta["versions"]
    assert [s for s, _ in list_checkpoints(tmp_path)] == [20, 40]
    model, header = load_model(tmp_path)
    assert header["step"] == 40
    x = jnp.asarray(mnist.x_test[:8])
    pr = zero_probes(model.mlp_blocks(), 8)
    np.testing.assert_array_equal(model(x, pr)[0], res.model(x, pr)[0])
    _, opt_state, _ = load_checkpoint(tmp_path)
    assert jax.tree_util.tree_structure(opt_state) == jax.tree_util.tree_structure(res.opt_state)
    assert not list(tmp_path.rglob(".*tmp"))  # no temp files left behind


def test_same_seed_same_numbers_other_seed_differs(mnist):
    cfg = TrainConfig(**{**TINY, "checkpoint_every": 0})
    a = train(cfg, None, dataset=mnist, progress=False).history
    b = train(cfg, None, dataset=mnist, progress=False).history
    c = train(cfg.replace(seed=1), None, dataset=mnist, progress=False).history
    strip = lambda h: [{k: v for k, v in r.items() if k != "time"} for r in h]  # noqa: E731
    assert strip(a) == strip(b)
    assert strip(a) != strip(c)


@pytest.mark.parametrize("opt", ["sgd", "adam", "adamw"])
def test_optimizers_reduce_loss(mnist, opt):
    lr = 0.1 if opt == "sgd" else 3e-3
    cfg = TrainConfig(**{**TINY, "steps": 120, "log_every": 119, "checkpoint_every": 0}, optimizer=opt, lr=lr,
                      weight_decay=1e-4, schedule="cosine", warmup=10, grad_clip=1.0)
    h = train(cfg, None, dataset=mnist, progress=False).history
    assert h[-1]["loss"] < h[0]["loss"] - 0.2


def test_schedule_values():
    cfg = TrainConfig(steps=100, warmup=10, lr=0.5, schedule="constant", optimizer="sgd")
    opt = make_optimizer(cfg)
    params = {"w": jnp.ones(())}
    st = opt.init(params)
    up, _ = opt.update({"w": jnp.ones(())}, st, params)
    assert float(up["w"]) == pytest.approx(0.0)  # lr is 0 at step 0 of the warm-up


def test_nan_stops_with_step_and_layer(tmp_path, mnist):
    x = mnist.x_train.copy()
    x[:, 3] = np.nan
    bad = Dataset("bad", "vector", x, mnist.y_train, mnist.x_test, mnist.y_test, 10)
    with pytest.raises(TrainingDiverged) as e:
        train(TrainConfig(**TINY), tmp_path, dataset=bad, progress=False)
    assert e.value.step == 0 and "MLP block 0" in str(e.value)


@pytest.mark.parametrize("model,data", [("vit", "fashion_mnist"), ("lm", "text")])
def test_transformers_train(model, data, tmp_path):
    if data == "fashion_mnist":
        rng = np.random.default_rng(0)
        ds = Dataset("fake_images", "image", rng.standard_normal((64, 8, 8)).astype(np.float32),
                     rng.integers(0, 10, 64).astype(np.int32), rng.standard_normal((16, 8, 8)).astype(np.float32),
                     rng.integers(0, 10, 16).astype(np.int32), 10)
    else:
        ds = load_dataset("text")
    cfg = TrainConfig(model=model, data=data, width=16, depth=1, heads=2, patch=4, seq_len=8, steps=6, batch_size=8,
                      log_every=5, checkpoint_every=0, eval_batch=8)
    res = train(cfg, tmp_path, dataset=ds, progress=False)
    assert np.isfinite(res.history[-1]["loss"])
    assert len(res.history[-1]["train/density"]) == 1
    model_, _ = load_model(tmp_path)
    assert type(model_).__name__ == ("ViT" if model == "vit" else "ByteLM")


@pytest.mark.parametrize("changes,match", [
    ({"model": "cnn"}, "model"), ({"steps": -1}, "steps"), ({"lr": -0.1}, "lr"), ({"activation": "swish"}, "activation"),
    ({"model": "vit", "data": "fashion_mnist", "width": 10, "heads": 3}, "heads"), ({"momentum": 1.5}, "momentum"),
    ({"model": "lm", "data": "mnist1d"}, "text"), ({"bogus": 1}, "unknown config keys"), ({"width": 2.5}, "width"),
])
def test_config_validation(changes, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig.from_dict({**TrainConfig().to_dict(), **changes})


def test_covariance_tracking_matches_direct_accumulation(tmp_path, mnist):
    """C_x after T steps equals sum_t r^(T-1-t) mean_b x x^T recomputed from the logged batches' inputs."""

    cfg = TrainConfig(**{**TINY, "steps": 1, "checkpoint_every": 0, "log_every": 1}, optimizer="sgd", lr=0.1,
                      weight_decay=0.5, track_covariance=True)
    res = train(cfg, tmp_path, dataset=mnist, progress=False)
    cov = np.load(tmp_path / "covariance.npz")
    # one step: C_x = mean_b x x^T at the initial model (the accumulation sees the pre-update model)
    keys = RunKeys.of(cfg.seed)
    m0 = bare_model(cfg, DataInfo.of(mnist), keys.model)
    x, y = Batcher(mnist, keys.data, cfg.batch_size, cfg.seq_len)(0)
    _, _, aux, _, _ = forward_backward(m0, default_trainable(m0), jnp.asarray(x), jnp.asarray(y), None)
    xs = np.asarray(aux[0]["x"])
    np.testing.assert_allclose(cov["Cx_0"], xs.T @ xs / xs.shape[0], rtol=1e-4, atol=1e-6)
    assert float(cov["N"]) == cfg.batch_size
    rec = res.history[-1]
    d = m0.mlp_blocks()[0].d
    assert rec["cov/x_c"][0] == pytest.approx(d / cfg.batch_size)
    assert 1 <= rec["cov/x_participation_ratio"][0] <= d
    assert decay_rate(0.1, 0.5) == pytest.approx(0.95)


def test_noisy_labels_rate_and_purity():
    """Each label is resampled uniformly with probability p: it changes with probability p (1 - 1/C)."""
    from gradsparse.data import noisy_labels

    y = np.arange(20000) % 10
    key = jax.random.key(3)
    assert noisy_labels(y, key, 0.0, 10) is y
    z = noisy_labels(y, key, 0.3, 10)
    np.testing.assert_array_equal(z, noisy_labels(y, key, 0.3, 10))   # pure in the key
    assert np.mean(z != y) == pytest.approx(0.3 * 0.9, abs=0.01)
    assert set(np.unique(z)) == set(range(10))
    assert not np.array_equal(z, noisy_labels(y, jax.random.key(4), 0.3, 10))


def test_label_noise_changes_training_but_keeps_the_other_keys(mnist):
    """label_noise draws from its own key: the held-out batch and the first record's monitors of
    the held-out batch are those of the noise-free run; the training batches' labels differ."""
    a = train(TrainConfig(**{**TINY, "checkpoint_every": 0}), None, dataset=mnist, progress=False)
    b = train(TrainConfig(**{**TINY, "checkpoint_every": 0}, label_noise=0.5), None, dataset=mnist, progress=False)
    assert a.history[0]["heldout/loss"] == b.history[0]["heldout/loss"]
    assert a.history[0]["loss"] != b.history[0]["loss"]          # same batch inputs, resampled labels
    with pytest.raises(ValueError, match="label_noise"):
        TrainConfig(model="lm", data="text", label_noise=0.1).validate()
    with pytest.raises(ValueError, match="label_noise"):
        TrainConfig(label_noise=1.0).validate()


def test_fixed_subset_monitors_and_flatness(mnist):
    """With flatness_subset = N the fixed/... monitors at step s are those of the first N training
    examples evaluated at the model before update s, and the trace is computed there too."""
    from gradsparse.step import make_eval_fn

    cfg = TrainConfig(**{**TINY, "checkpoint_every": 0, "steps": 1, "log_every": 1}, flatness_every=1,
                      flatness_probes=2, flatness_subset=64)
    res = train(cfg, None, dataset=mnist, progress=False)
    m0 = bare_model(cfg, DataInfo.of(mnist), RunKeys.of(cfg.seed).model)
    ev = make_eval_fn(default_trainable(m0))(m0, jnp.asarray(mnist.x_train[:64]), jnp.asarray(mnist.y_train[:64]))
    rec = res.history[0]
    assert rec["fixed_batch_size"] == 64
    assert rec["fixed/loss"] == pytest.approx(float(ev["loss"]), rel=1e-6)
    np.testing.assert_allclose(rec["fixed/af_k"], np.asarray(ev["layers"]["af_k"]), rtol=1e-5)
    assert np.isfinite(rec["flat/trace_k"])
    with pytest.raises(ValueError, match="flatness_subset"):
        train(cfg.replace(flatness_subset=10**6), None, dataset=mnist, progress=False)


def test_configs_and_headers_of_earlier_versions_still_read():
    """Run folders written before TrainConfig.extra was removed (always {}) and finetuned checkpoints
    whose surgery stood in the header still rebuild; a non-empty 'extra' is still an unknown key."""
    from gradsparse.factory import skeleton_from_header
    from gradsparse.plugins import sparsify

    d = TrainConfig(**TINY).to_dict()
    assert TrainConfig.from_dict({**d, "extra": {}}) == TrainConfig(**TINY)
    with pytest.raises(ValueError, match="unknown config keys"):
        TrainConfig.from_dict({**d, "extra": {"a": 1}})
    info = {"kind": "vector", "input_shape": [40], "num_classes": 10}
    res = sparsify(bare_model(TrainConfig(**TINY), DataInfo.from_dict(info), jax.random.key(0)), jsrelu=True)
    model, _ = skeleton_from_header({"config": {**d, "extra": {}}, "data_info": info, "surgery": res.options})
    assert type(model.blocks[0].act).__name__ == "Mixed"
