"""Fused plain steps (one lax.scan between log points) against single jitted steps: bit-equal
parameters and logs, the same divergence report, and interrupts that keep the last chunk."""

from __future__ import annotations

import json

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gradsparse import loop as loop_mod
from gradsparse import train as train_mod
from gradsparse.checkpoint import load_model
from gradsparse.config import TrainConfig
from gradsparse.data import Batcher, Dataset, DataInfo, load_dataset, noisy_labels, noisy_labels_device
from gradsparse.factory import RunKeys, build, init_state, make_accumulator, make_optimizer
from gradsparse.step import make_train_chunk, make_train_step
from gradsparse.train import TrainingDiverged, TrainingInterrupted, train

TINY = dict(steps=40, width=16, depth=2, batch_size=16, log_every=10, checkpoint_every=7, eval_batch=32)


@pytest.fixture(scope="module")
def mnist():
    return load_dataset("mnist1d", seed=0)


def _leaves(model):
    return [np.asarray(a) for a in jax.tree_util.tree_leaves(eqx.filter(model, eqx.is_array))]


def _assert_same(a, b):
    la, lb = _leaves(a), _leaves(b)
    assert len(la) == len(lb)
    for u, v in zip(la, lb):
        np.testing.assert_array_equal(u, v)


@pytest.mark.parametrize("extra", [
    dict(optimizer="sgd", lr=0.1, momentum=0.9),
    dict(optimizer="adam", lr=1e-3, weight_noise="synapse", rho=0.05, zeroth_bias=True, track_covariance=True),
])
def test_chunk_equals_single_steps_bit_for_bit(mnist, extra):
    cfg = TrainConfig(**{**TINY, **extra})
    keys = RunKeys.of(cfg.seed)
    built = build(cfg, DataInfo.of(mnist), keys.model)
    opt = make_optimizer(cfg)
    acc = make_accumulator(cfg, built.model)
    state = init_state(cfg, built, opt, acc)
    single = make_train_step(opt, built.trainable, built.projections, monitors=False, accumulator=acc)
    chunk = make_train_chunk(opt, built.trainable, built.projections, accumulator=acc)
    batcher = Batcher(mnist, keys.data, cfg.batch_size, cfg.seq_len)
    first, n = 3, 6
    m1, s1 = built.model, state
    for s in range(first, first + n):
        x, y = batcher(s)
        m1, s1, _, fin = single(m1, s1, jnp.asarray(x), jnp.asarray(y), jax.random.fold_in(keys.noise, s),
                                jnp.asarray(s, jnp.int32))
        assert bool(fin)
    xs, ys = batcher.chunk(first, n)
    m2, s2, bad = chunk(built.model, state, jnp.asarray(xs), jnp.asarray(ys), keys.noise, jnp.asarray(first, jnp.int32))
    assert int(bad) == -1
    _assert_same(m1, m2)
    for u, v in zip(jax.tree_util.tree_leaves(s1), jax.tree_util.tree_leaves(s2)):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
    assert not all(np.array_equal(u, v) for u, v in zip(_leaves(built.model), _leaves(m2)))  # it did train


def test_chunk_names_the_first_bad_step(mnist):
    cfg = TrainConfig(**TINY)
    keys = RunKeys.of(0)
    built = build(cfg, DataInfo.of(mnist), keys.model)
    opt = make_optimizer(cfg)
    chunk = make_train_chunk(opt, built.trainable, built.projections)
    xs, ys = Batcher(mnist, keys.data, cfg.batch_size, cfg.seq_len).chunk(0, 5)
    xs = np.array(xs)
    xs[2, 0, 0] = np.nan
    _, _, bad = chunk(built.model, init_state(cfg, built, opt), jnp.asarray(xs), jnp.asarray(ys), keys.noise,
                      jnp.asarray(20, jnp.int32))
    assert int(bad) == 22


def test_batcher_chunk_is_the_stacked_batches(mnist):
    b = Batcher(mnist, jax.random.key(1), 32, 0)
    xs, ys = b.chunk(120, 10)  # crosses the epoch boundary at step 125
    for i in range(10):
        x, y = b(120 + i)
        np.testing.assert_array_equal(xs[i], x)
        np.testing.assert_array_equal(ys[i], y)
    text = load_dataset("text", seed=0)
    bt = Batcher(text, jax.random.key(2), 4, 16)
    xs, ys = bt.chunk(5, 3)
    for i in range(3):
        x, y = bt(5 + i)
        np.testing.assert_array_equal(np.asarray(xs[i]), x)
        np.testing.assert_array_equal(np.asarray(ys[i]), y)
    y = mnist.y_train[:64]
    key = jax.random.key(3)
    np.testing.assert_array_equal(np.asarray(noisy_labels_device(jnp.asarray(y), key, 0.5, 10)),
                                  noisy_labels(y, key, 0.5, 10))
    with pytest.raises(ValueError, match="n: must be >= 1"):
        b.chunk(0, 0)


@pytest.mark.parametrize("extra", [dict(label_noise=0.3, optimizer="sgd", lr=0.1),
                                   dict(model="lm", data="text", seq_len=8, width=8, depth=1, heads=2, eval_batch=8,
                                        steps=24, checkpoint_every=0)])
def test_fused_run_equals_unfused_run(tmp_path, mnist, extra):
    cfg = TrainConfig(**{**TINY, **extra})
    ds = mnist if cfg.data == "mnist1d" else None
    fused = train(cfg.replace(fuse_steps=4), tmp_path / "fused", dataset=ds, progress=False)
    single = train(cfg.replace(fuse_steps=1), tmp_path / "single", dataset=ds, progress=False)
    if cfg.model == "mlp":
        assert (tmp_path / "fused" / "log.jsonl").read_bytes() == (tmp_path / "single" / "log.jsonl").read_bytes()
        _assert_same(fused.model, single.model)
    else:  # XLA compiles the scanned attention step with ulp-level differences (see TrainConfig.fuse_steps)
        for a, b in zip(_leaves(fused.model), _leaves(single.model)):
            np.testing.assert_allclose(a, b, rtol=0, atol=2e-3)
        la = [json.loads(s) for s in (tmp_path / "fused" / "log.jsonl").read_text().splitlines()]
        lb = [json.loads(s) for s in (tmp_path / "single" / "log.jsonl").read_text().splitlines()]
        assert [r["step"] for r in la] == [r["step"] for r in lb]
        np.testing.assert_allclose([r["loss"] for r in la], [r["loss"] for r in lb], rtol=1e-4)
    ck = sorted(p.name for p in (tmp_path / "fused" / "checkpoints").iterdir())
    assert ck == sorted(p.name for p in (tmp_path / "single" / "checkpoints").iterdir())
    grid = (7, 14, 21, 28, 35, 40) if cfg.checkpoint_every == 7 else (cfg.steps,)
    assert ck == [f"step_{s:08d}.eqx" for s in grid]  # the absolute 7-step grid


def test_divergence_in_a_fused_chunk_is_located_by_replay(tmp_path, mnist):
    cfg = TrainConfig(**TINY)
    b = Batcher(mnist, RunKeys.of(cfg.seed).data, cfg.batch_size, cfg.seq_len)
    x = mnist.x_train.copy()
    idx = np.flatnonzero((mnist.x_train == b(13)[0][0]).all(axis=1))[0]
    x[idx, 5] = np.nan  # first seen at step 13: inside the chunk 11..14 of a 4-step fusion
    bad = Dataset("bad", "vector", x, mnist.y_train, mnist.x_test, mnist.y_test, 10)
    got = {}
    for fuse in (1, 4):
        with pytest.raises(TrainingDiverged) as e:
            train(cfg.replace(fuse_steps=fuse), tmp_path / f"f{fuse}", dataset=bad, progress=False)
        got[fuse] = (e.value.step, e.value.where, e.value.checkpoint.name)
        log = (tmp_path / f"f{fuse}" / "log.jsonl").read_text().splitlines()
        assert [json.loads(line)["step"] for line in log] == [0, 10]
    assert got[1] == got[4] and got[4][0] == 13 and got[4][1].startswith("MLP block 0") and got[4][2] == "step_00000007.eqx"


def test_interrupt_inside_fused_steps_keeps_the_last_chunk(tmp_path, mnist, monkeypatch):
    cfg = TrainConfig(**{**TINY, "checkpoint_every": 0, "fuse_steps": 4})
    real = train_mod.make_train_chunk
    calls = []

    def counting(*a, **k):
        chunk = real(*a, **k)

        def wrapped(*args):
            calls.append(int(args[-1]))
            if len(calls) == 3:
                raise KeyboardInterrupt
            return chunk(*args)
        return wrapped

    monkeypatch.setattr(train_mod, "make_train_chunk", counting)
    with pytest.raises(TrainingInterrupted) as e:
        train(cfg, tmp_path / "run", dataset=mnist, progress=False)
    # chunks start at 1 and 5 (steps 1..8), then step 9 is single, 10 logged, the 3rd chunk (11..14) is cut
    assert calls == [1, 5, 11] and e.value.step == 11 and e.value.saved
    monkeypatch.setattr(train_mod, "make_train_chunk", real)
    res = train(cfg, tmp_path / "run", dataset=mnist, progress=False, resume=True)
    ref = train(cfg, tmp_path / "ref", dataset=mnist, progress=False)
    _assert_same(res.model, ref.model)
    assert (tmp_path / "run" / "log.jsonl").read_bytes() == (tmp_path / "ref" / "log.jsonl").read_bytes()
    model, _ = load_model(tmp_path / "run")
    _assert_same(model, ref.model)


def test_fuse_steps_is_validated():
    with pytest.raises(ValueError, match="fuse_steps"):
        TrainConfig(**TINY, fuse_steps=0).validate()
    assert TrainConfig.from_dict({k: v for k, v in TrainConfig().to_dict().items() if k != "fuse_steps"}).fuse_steps == 16


def test_step_plan_covers_every_step_once_on_the_absolute_grid():
    cfg = TrainConfig(**TINY)  # 40 steps, log every 10, checkpoint every 7
    plan = list(loop_mod.step_plan(0, cfg, 4))
    assert plan[:8] == [("log", 0, 1), ("chunk", 1, 4), ("step", 5, 1), ("step", 6, 1), ("checkpoint", 7, 0),
                        ("step", 7, 1), ("step", 8, 1), ("step", 9, 1)]
    covered = [u for kind, s, n in plan if kind != "checkpoint" for u in range(s, s + n)]
    assert covered == list(range(cfg.steps))
    assert [s for kind, s, _ in plan if kind == "log"] == [0, 10, 20, 30, 39]
    assert [s for kind, s, _ in plan if kind == "checkpoint"] == [7, 14, 21, 28, 35]
    for kind, s, n in plan:  # no chunk crosses a log step or a checkpoint
        if kind == "chunk":
            assert not any(u % 10 == 0 or u == 39 for u in range(s + 1, s + n)) and (s + n) // 7 == s // 7 or \
                (s + n) % 7 == 0
    # a resume at 14 cuts the same chunks as the run from 0
    assert list(loop_mod.step_plan(14, cfg, 4)) == plan[plan.index(("checkpoint", 14, 0)) + 1:]
    assert all(kind in ("log", "step", "checkpoint") for kind, _, _ in loop_mod.step_plan(0, cfg, 1))


def test_hooks_run_every_n_steps_and_change_no_bit(tmp_path, mnist):
    """A hook every 6 updates sees the state after updates 6, 12, ... (chunks stop there); for the
    MLP the run's parameters and log are bit-equal to the run without it."""
    cfg = TrainConfig(**{**TINY, "fuse_steps": 4})
    seen = []
    hooked = train(cfg, tmp_path / "h", dataset=mnist, progress=False,
                   hooks=[(lambda info: seen.append((info.step, len(info.histories[0]))), 6)])
    plain = train(cfg, tmp_path / "p", dataset=mnist, progress=False)
    assert [s for s, _ in seen] == list(range(6, cfg.steps + 1, 6))
    assert seen[0][1] == 1  # only step 0 was logged before update 6
    _assert_same(hooked.model, plain.model)
    assert (tmp_path / "h" / "log.jsonl").read_bytes() == (tmp_path / "p" / "log.jsonl").read_bytes()
    with pytest.raises(ValueError, match="every"):
        train(cfg, None, dataset=mnist, progress=False, hooks=[(print, 0)])
