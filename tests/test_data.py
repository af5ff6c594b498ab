"""Data: determinism, held-out splits, IDX parsing and its errors, text loading."""

import gzip
import struct

import jax
import numpy as np
import pytest

from gradsparse.data import Batcher, batch_indices, get_batch, load_dataset, load_fashion_mnist, load_text


def _idx(arr: np.ndarray) -> bytes:
    return struct.pack(">HBB", 0, 8, arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape) + arr.tobytes()


@pytest.fixture
def fake_fashion(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 30), ("t10k", 10)):
        imgs = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        (tmp_path / f"{split}-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx(imgs)))
        (tmp_path / f"{split}-labels-idx1-ubyte").write_bytes(_idx(labels))
    return tmp_path


def test_mnist1d_is_deterministic_and_split():
    a = load_dataset("mnist1d", seed=3)
    b = load_dataset("mnist1d", seed=3)
    assert a.x_train.shape == (4000, 40) and a.x_test.shape == (1000, 40)
    np.testing.assert_array_equal(a.x_train, b.x_train)
    assert set(np.unique(a.y_train)) == set(range(10))


def test_mnist1d_leaves_numpy_global_state_alone():
    state = np.random.get_state()[1].copy()
    from gradsparse.data import make_mnist1d

    make_mnist1d.cache_clear()
    make_mnist1d(seed=11, num_samples=200)
    np.testing.assert_array_equal(np.random.get_state()[1], state)


def test_random_sets():
    r = load_dataset("random_labels", seed=0)
    m = load_dataset("mnist1d", seed=0)
    np.testing.assert_array_equal(r.x_train, m.x_train)
    assert np.mean(r.y_train == m.y_train) < 0.2
    ri = load_dataset("random_inputs", seed=0, n_train=500, n_test=100)
    assert ri.x_train.shape == (500, 40) and ri.x_test.shape == (100, 40)
    assert abs(float(ri.x_train.std()) - 1.0) < 0.05


def test_batches_cover_each_epoch_once():
    key = jax.random.key(0)
    n, bs = 100, 10
    seen = np.concatenate([np.asarray(batch_indices(key, n, bs, s)) for s in range(10)])
    np.testing.assert_array_equal(np.sort(seen), np.arange(n))
    np.testing.assert_array_equal(batch_indices(key, n, bs, 3), batch_indices(key, n, bs, 3))
    assert not np.array_equal(batch_indices(key, n, bs, 0), batch_indices(key, n, bs, 10))
    with pytest.raises(ValueError):
        batch_indices(key, n, 0, 0)


def test_fashion_from_idx_files(fake_fashion):
    ds = load_fashion_mnist(fake_fashion)
    assert ds.x_train.shape == (30, 28, 28) and ds.x_test.shape == (10, 28, 28)
    assert abs(float(ds.x_train.mean())) < 1e-4 and abs(float(ds.x_train.std()) - 1) < 1e-3


def test_fashion_errors(tmp_path, fake_fashion):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path / "nope")
    raw = (fake_fashion / "t10k-labels-idx1-ubyte").read_bytes()
    (fake_fashion / "t10k-labels-idx1-ubyte").write_bytes(raw[:-3])
    with pytest.raises(ValueError, match="truncated"):
        load_fashion_mnist(fake_fashion)
    (fake_fashion / "t10k-labels-idx1-ubyte").write_bytes(b"\x01\x02\x03\x04garbage")
    with pytest.raises(ValueError, match="IDX"):
        load_fashion_mnist(fake_fashion)


def test_text(tmp_path):
    ds = load_text()
    assert ds.x_train.dtype == np.uint8 and len(ds.x_test) > 0
    assert abs(len(ds.x_test) / (len(ds.x_train) + len(ds.x_test)) - 0.1) < 0.01
    x, y = get_batch(ds, jax.random.key(0), 5, 4, seq_len=16)
    assert x.shape == (4, 16)
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(ValueError, match="at least 1000 bytes"):
        load_text(tmp_path / "empty.txt")
    with pytest.raises(FileNotFoundError):
        load_text(tmp_path / "missing.txt")


def test_unknown_dataset():
    with pytest.raises(ValueError, match="allowed"):
        load_dataset("cifar")


def test_training_batches_equal_get_batch():
    """The training loop's cached batcher serves exactly the examples of data.get_batch for every step."""
    ds = load_dataset("random_inputs", seed=0, n_train=50, n_test=10)
    key = jax.random.key(7)
    b = Batcher(ds, key, 8, 32)
    for step in (0, 1, 5, 6, 7, 13):  # 6 batches per epoch: crosses two epoch boundaries
        x1, y1 = b(step)
        x2, y2 = get_batch(ds, key, step, 8)
        np.testing.assert_array_equal(x1, x2)
        np.testing.assert_array_equal(y1, y2)
