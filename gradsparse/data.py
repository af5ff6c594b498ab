"""Datasets, made or read locally (never downloaded), deterministic given a seed.

Every dataset has a train and a held-out split. Batches are pure functions of
``(key, step)``: :func:`batch_indices` draws the permutation of an epoch from
``fold_in(key, epoch)``, so a resumed run sees exactly the same data order.

Names (``load_dataset``):

- ``mnist1d``       : the 1-D digits of mnist1d, generated offline by its ``make_dataset``
                      (4000 train / 1000 held-out, 40 features, 10 classes)
- ``random_labels`` : mnist1d inputs with labels drawn uniformly at random (both splits)
- ``random_inputs`` : iid N(0, 1) inputs (40 features) with random labels
- ``fashion_mnist`` : Fashion-MNIST from IDX files (default /usr/share/datasets/fashion-mnist,
                      from the Debian package ``dataset-fashion-mnist``; or ``path``)
- ``text``          : bytes for the causal LM (default: the Python standard library's .py sources;
                      or the file at ``path``); the last 10% is held out
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import math
import os
import struct
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gradsparse._validate import check_choice, check_int

DATASETS = ("mnist1d", "random_labels", "random_inputs", "fashion_mnist", "text")
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


@dataclass(frozen=True)
class Dataset:
    """A dataset in host memory.

    kind ``vector``: x (N, D) float32; ``image``: x (N, H, W) float32 standardised;
    ``text``: x is a 1-D uint8 array of bytes (y unused, empty). y: (N,) int32 labels.
    """

    name: str
    kind: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:]) if self.kind != "text" else ()

    @property
    def n_train(self) -> int:
        return int(self.x_train.shape[0])


def _rng_from_seed(seed: int) -> np.random.Generator:
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
        raise ValueError(f"seed must be an int, got {seed!r}")
    return np.random.default_rng(int(seed))


@functools.lru_cache(maxsize=4)
def make_mnist1d(seed: int = 0, num_samples: int = 5000) -> Dataset:
    """Generate mnist1d offline (its ``make_dataset``; the downloader is never called).

    mnist1d's generator seeds NumPy's global RNG; we save and restore that state around the call
    so that no global state leaks out of gradsparse. Cached per (seed, num_samples): the result is
    a pure function of them and takes seconds to make; its arrays are read-only.
    """
    if num_samples < 50:
        raise ValueError(f"mnist1d needs num_samples >= 50, got {num_samples}")
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = int(num_samples)
    args.seed = int(seed)
    state = np.random.get_state()
    try:
        d = make_dataset(args)
    finally:
        np.random.set_state(state)
    arrays = [d["x"].astype(np.float32), d["y"].astype(np.int32),
              d["x_test"].astype(np.float32), d["y_test"].astype(np.int32)]
    for a in arrays:  # cached: make the shared arrays immutable
        a.setflags(write=False)
    return Dataset("mnist1d", "vector", *arrays, 10)


def _read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally .gz). Raises ValueError on a corrupt or truncated file."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise ValueError(f"cannot read IDX file {path}: {e}") from None
    if len(raw) < 4:
        raise ValueError(f"IDX file {path} is truncated ({len(raw)} bytes)")
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08 or not 1 <= ndim <= 4:
        raise ValueError(f"{path} is not an unsigned-byte IDX file (header {raw[:4].hex()})")
    if len(raw) < 4 + 4 * ndim:
        raise ValueError(f"IDX file {path} is truncated in its header")
    dims = struct.unpack(">" + "I" * ndim, raw[4 : 4 + 4 * ndim])
    n = math.prod(dims)  # exact (np.prod would overflow int64 on a forged header)
    body = raw[4 + 4 * ndim :]
    if len(body) != n:
        raise ValueError(f"IDX file {path} holds {len(body)} data bytes, its header says {n} (corrupt or truncated)")
    return np.frombuffer(body, dtype=np.uint8).reshape(dims)


def _find_idx(folder: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(
        f"Fashion-MNIST file {stem}[.gz] not found in {folder}; install it with "
        f"`apt-get install dataset-fashion-mnist` or pass --data-path to a folder with the IDX files"
    )


def load_fashion_mnist(path: str | os.PathLike | None = None) -> Dataset:
    """Fashion-MNIST from its four IDX files; images standardised to mean 0, std 1 (train statistics)."""
    folder = Path(path) if path is not None else FASHION_DIR
    if not folder.is_dir():
        raise FileNotFoundError(
            f"Fashion-MNIST folder {folder} does not exist; install it with "
            f"`apt-get install dataset-fashion-mnist` or pass --data-path to a folder with the IDX files"
        )
    xs = {s: _read_idx(_find_idx(folder, f"{s}-images-idx3-ubyte")) for s in ("train", "t10k")}
    ys = {s: _read_idx(_find_idx(folder, f"{s}-labels-idx1-ubyte")) for s in ("train", "t10k")}
    for s in xs:
        if xs[s].ndim != 3 or ys[s].ndim != 1 or xs[s].shape[0] != ys[s].shape[0]:
            raise ValueError(f"Fashion-MNIST {s} images {xs[s].shape} and labels {ys[s].shape} do not match")
        if xs[s].shape[0] == 0 or 0 in xs[s].shape[1:]:
            raise ValueError(f"Fashion-MNIST {s} images have shape {xs[s].shape}; every dimension must be >= 1")
        if ys[s].max(initial=0) > 9:
            raise ValueError(f"Fashion-MNIST {s} labels must be 0..9, found {int(ys[s].max())}")
    xtr = xs["train"].astype(np.float32) / 255.0
    mu, sd = float(xtr.mean()), float(xtr.std()) or 1.0
    f = lambda a: ((a.astype(np.float32) / 255.0) - mu) / sd  # noqa: E731
    return Dataset("fashion_mnist", "image", f(xs["train"]), ys["train"].astype(np.int32),
                   f(xs["t10k"]), ys["t10k"].astype(np.int32), 10)


def default_text_files() -> list[Path]:
    """The Python standard library's own .py files (present on every machine), sorted."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.glob("*.py") if p.is_file())
    if not files:  # pragma: no cover - exotic installs
        files = sorted(Path(os.path.dirname(os.__file__)).glob("*.py"))
    return files


def load_text(path: str | os.PathLike | None = None, max_bytes: int = 4_000_000) -> Dataset:
    """Bytes for the byte-level LM: a given file, or the stdlib sources; last 10% held out."""
    if max_bytes < 1000:
        raise ValueError(f"max_bytes must be >= 1000, got {max_bytes}")
    if path is not None:
        p = Path(path)
        if p.is_dir():
            raise ValueError(f"text path {p} is a folder; give a text file")
        if not p.is_file():
            raise FileNotFoundError(f"text file {p} does not exist")
        try:
            with open(p, "rb") as f:
                raw = f.read(max_bytes)
        except OSError as e:
            raise ValueError(f"cannot read text file {p}: {e}") from None
    else:
        chunks, total = [], 0
        for p in default_text_files():
            b = p.read_bytes()
            chunks.append(b)
            total += len(b)
            if total >= max_bytes:
                break
        raw = b"".join(chunks)[:max_bytes]
    if len(raw) < 1000:
        raise ValueError(f"text for the LM must hold at least 1000 bytes, got {len(raw)} (empty or tiny file?)")
    arr = np.frombuffer(raw, dtype=np.uint8).copy()
    cut = int(len(arr) * 0.9)
    empty = np.zeros((0,), np.int32)
    return Dataset("text", "text", arr[:cut], empty, arr[cut:], empty, 256)


def load_dataset(name: str, *, seed: int = 0, path: str | os.PathLike | None = None,
                 n_train: int | None = None, n_test: int | None = None) -> Dataset:
    """Load a dataset by name (see module docstring). ``n_train``/``n_test`` truncate the splits."""
    check_choice("data", name, DATASETS)
    for label, n in (("n_train", n_train), ("n_test", n_test)):
        if n is not None:
            check_int(label, n, 1)
    rng = _rng_from_seed(seed)
    if name in ("mnist1d", "random_labels"):
        ds = make_mnist1d(seed=seed)
        if name == "random_labels":
            ds = Dataset("random_labels", "vector", ds.x_train, rng.integers(0, 10, len(ds.y_train)).astype(np.int32),
                         ds.x_test, rng.integers(0, 10, len(ds.y_test)).astype(np.int32), 10)
    elif name == "random_inputs":
        ntr, nte = n_train or 4000, n_test or 1000
        ds = Dataset("random_inputs", "vector",
                     rng.standard_normal((ntr, 40)).astype(np.float32), rng.integers(0, 10, ntr).astype(np.int32),
                     rng.standard_normal((nte, 40)).astype(np.float32), rng.integers(0, 10, nte).astype(np.int32), 10)
    elif name == "fashion_mnist":
        ds = load_fashion_mnist(path)
    else:
        ds = load_text(path)
    if ds.kind != "text":
        for label, n, have in (("n_train", n_train, ds.x_train.shape[0]), ("n_test", n_test, ds.x_test.shape[0])):
            if n is not None and n > have:
                raise ValueError(f"{label} {n} exceeds the {have} examples of {name}'s "
                                 f"{'training' if label == 'n_train' else 'held-out'} split")
        ds = Dataset(ds.name, ds.kind, ds.x_train[:n_train], ds.y_train[:n_train],
                     ds.x_test[:n_test], ds.y_test[:n_test], ds.num_classes)
    return ds


def epoch_permutation(key: jax.Array, epoch: int | jax.Array, n: int) -> jax.Array:
    """The order of the n training examples in ``epoch``: ``permutation(fold_in(key, epoch), n)``."""
    return jax.random.permutation(jax.random.fold_in(key, epoch), n)


def batch_indices(key: jax.Array, n: int, batch_size: int, step: int | jax.Array) -> jax.Array:
    """Indices of the examples in batch ``step``: epoch e = step // (n // batch_size) is the
    permutation ``jax.random.permutation(fold_in(key, e), n)``; batches never straddle epochs.

    Pure in (key, step): the same step always gets the same examples. Shape (batch_size,).
    """
    if batch_size < 1 or batch_size > n:
        raise ValueError(f"batch_size must be in [1, {n}] (the training set size), got {batch_size}")
    per_epoch = n // batch_size
    epoch, pos = step // per_epoch, step % per_epoch
    return jax.lax.dynamic_slice_in_dim(epoch_permutation(key, epoch, n), pos * batch_size, batch_size)


def text_windows(key: jax.Array, data: jax.Array, batch_size: int, seq_len: int, step: int | jax.Array) -> jax.Array:
    """``batch_size`` random windows of ``seq_len + 1`` bytes from ``data`` for step ``step``.

    Returns int32 (batch_size, seq_len + 1): inputs are [:, :-1], next-byte targets [:, 1:].
    """
    if data.shape[0] < seq_len + 2:
        raise ValueError(f"text of {data.shape[0]} bytes is too short for seq_len {seq_len}")
    starts = jax.random.randint(jax.random.fold_in(key, step), (batch_size,), 0, data.shape[0] - seq_len - 1)
    idx = starts[:, None] + jnp.arange(seq_len + 1)[None, :]
    return data[idx].astype(jnp.int32)


def get_batch(ds: Dataset, key: jax.Array, step: int, batch_size: int, *, split: str = "train",
              seq_len: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Host-side batch (x, y) for ``step`` (see :func:`batch_indices` / :func:`text_windows`).

    For text: x (B, seq_len) int32 bytes, y (B, seq_len) next bytes. Otherwise x (B, ...), y (B,).
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    xs, ys = (ds.x_train, ds.y_train) if split == "train" else (ds.x_test, ds.y_test)
    if ds.kind == "text":
        w = np.asarray(text_windows(key, jnp.asarray(xs), batch_size, seq_len, step))
        return w[:, :-1], w[:, 1:]
    idx = np.asarray(batch_indices(key, xs.shape[0], min(batch_size, xs.shape[0]), step))
    return xs[idx], ys[idx]


@dataclass(frozen=True)
class DataInfo:
    """What a model needs to know about its data (stored in checkpoint headers)."""

    kind: str
    input_shape: tuple[int, ...]
    num_classes: int

    @staticmethod
    def of(ds: Dataset) -> "DataInfo":
        return DataInfo(ds.kind, tuple(int(s) for s in ds.input_shape), int(ds.num_classes))

    def to_dict(self) -> dict:
        return {"kind": self.kind, "input_shape": list(self.input_shape), "num_classes": self.num_classes}

    @staticmethod
    def from_dict(d: dict) -> "DataInfo":
        """Inverse of :meth:`to_dict`; ValueError for a malformed or impossible description."""
        try:
            info = DataInfo(str(d["kind"]), tuple(int(v) for v in d["input_shape"]), int(d["num_classes"]))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"data_info: malformed ({type(e).__name__}: {e}); allowed: a mapping with kind, "
                             "input_shape and num_classes") from None
        if any(v < 1 for v in info.input_shape) or info.num_classes < 1 or info.kind not in ("vector", "image", "text"):
            raise ValueError(f"data_info: impossible description {d!r}; allowed: kind vector|image|text, "
                             "positive input_shape and num_classes")
        return info


class Batcher:
    """Host-side training batches, a pure function of (key, step): the same examples as
    :func:`get_batch` (``split='train'``), with each epoch's permutation computed once.

    ``batcher(step) -> (x, y)``; for text, x and y are (B, seq_len) windows and their next bytes.
    """

    def __init__(self, ds: Dataset, key: jax.Array, batch_size: int, seq_len: int):
        self.ds, self.key, self.bs, self.seq_len = ds, key, batch_size, seq_len
        if ds.kind != "text" and batch_size > ds.n_train:
            raise ValueError(f"batch_size {batch_size} exceeds the {ds.n_train} training examples; "
                             f"allowed: at most {ds.n_train}")
        if ds.kind == "text" and ds.x_train.shape[0] < seq_len + 2:
            raise ValueError(f"seq_len {seq_len} needs at least {seq_len + 2} bytes of training text, "
                             f"the text has {ds.x_train.shape[0]}")
        self._epoch, self._perm = -1, None
        self._text_dev = jnp.asarray(ds.x_train) if ds.kind == "text" else None

    def __call__(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        if self.ds.kind == "text":
            w = np.asarray(text_windows(self.key, self._text_dev, self.bs, self.seq_len, step))
            return w[:, :-1], w[:, 1:]
        per_epoch = self.ds.n_train // self.bs
        epoch, pos = divmod(step, per_epoch)
        if epoch != self._epoch:
            self._perm = np.asarray(epoch_permutation(self.key, epoch, self.ds.n_train))
            self._epoch = epoch
        idx = self._perm[pos * self.bs:(pos + 1) * self.bs]
        return self.ds.x_train[idx], self.ds.y_train[idx]

    def chunk(self, start: int, n: int) -> tuple[Any, Any]:
        """The batches of steps ``start .. start+n-1`` stacked on a new leading axis: (n, B, ...).

        The same examples as ``n`` calls of ``batcher(step)``; for text the windows stay on the
        device (no host round trip per step), otherwise one host array."""
        if n < 1:
            raise ValueError(f"n: must be >= 1, got {n}")
        if self.ds.kind == "text":
            w = jnp.stack([text_windows(self.key, self._text_dev, self.bs, self.seq_len, s)
                           for s in range(start, start + n)])
            return w[:, :, :-1], w[:, :, 1:]
        pairs = [self(s) for s in range(start, start + n)]
        return np.stack([x for x, _ in pairs]), np.stack([y for _, y in pairs])


#: tag folded into the data key for label noise, so runs without it keep their keys
LABEL_NOISE_TAG = 0x1ABE1


def noisy_labels(y: np.ndarray, key: jax.Array, p: float, num_classes: int) -> np.ndarray:
    """Label noise (label-noise SGD): each label is replaced, with probability ``p``, by a label
    drawn uniformly from the ``num_classes`` classes (it may draw the true label). Pure in ``key``."""
    if p <= 0:
        return y
    return np.asarray(noisy_labels_device(jnp.asarray(y), key, p, num_classes), dtype=np.asarray(y).dtype)


def noisy_labels_device(y: jax.Array, key: jax.Array, p: float, num_classes: int) -> jax.Array:
    """:func:`noisy_labels` without leaving the device (the same labels, as a jax array)."""
    if p <= 0:
        return y
    k1, k2 = jax.random.split(key)
    flip = jax.random.bernoulli(k1, p, y.shape)
    new = jax.random.randint(k2, y.shape, 0, num_classes).astype(y.dtype)
    return jnp.where(flip, new, y)


def heldout_batch(ds: Dataset, n: int, seq_len: int, key: jax.Array) -> tuple[np.ndarray, np.ndarray]:
    """THE held-out batch of a run: the first ``n`` test examples (at most all of them), or, for
    text, ``n`` windows of the held-out text drawn with ``key`` (the run's ``heldout`` key,
    :class:`gradsparse.factory.RunKeys`). Monitors, final evaluation and checks all use this one."""
    if ds.kind == "text":
        if ds.x_test.shape[0] < seq_len + 2:
            raise ValueError(f"seq_len {seq_len} needs at least {seq_len + 2} bytes of held-out text, the held-out "
                             f"10% of the text has {ds.x_test.shape[0]}")
        w = np.asarray(text_windows(key, jnp.asarray(ds.x_test), n, seq_len, 0))
        return w[:, :-1], w[:, 1:]
    n = min(n, ds.x_test.shape[0])
    return ds.x_test[:n], ds.y_test[:n]


def data_sha256(ds: Dataset) -> str:
    """SHA-256 over a dataset's name, kind, classes and the dtype, shape and bytes of its four arrays.

    Stored in checkpoints and ``meta.json``; a resumed run refuses data with another digest
    (a changed ``data_path`` file would otherwise silently break the resumed run's equality).
    """
    h = hashlib.sha256(f"{ds.name}|{ds.kind}|{ds.num_classes}".encode())
    for a in (ds.x_train, ds.y_train, ds.x_test, ds.y_test):
        a = np.ascontiguousarray(a)
        h.update(f"|{a.dtype.str}{a.shape}|".encode())
        h.update(memoryview(a).cast("B"))
    return h.hexdigest()
