"""Reading the weights of any model: gradsparse checkpoints, .npz, safetensors, Hugging Face folders, PyTorch.

Two entry points, one for each kind of caller:

* :func:`read_tensors` ``(path) -> {name: np.ndarray}``: every tensor as stored (raw names, raw
  layouts, every dtype), for model loaders that map names onto their own modules.
* :func:`weight_matrices` ``(path, select=None) -> WeightSet(matrices, skipped, conventions)``: the
  2-D weight matrices in ONE orientation, ``(out, in)``, each with a role and a layer index, the
  tensors left out with the reason, and the conventions applied (for spectra).

Formats (:func:`detect_format`; ``SUPPORTED`` lists them for error messages):

=====================  ===========================================================================
``gradsparse``         a run folder (its latest checkpoint) or a checkpoint file (``step_*.eqx``),
                       read with :func:`gradsparse.checkpoint.load_model`
``npz``                ``.npz`` of named arrays (``allow_pickle=False``)
``safetensors``        a ``.safetensors`` file, read with the ``safetensors`` package's numpy API
                       (no torch); bfloat16 arrives as ``ml_dtypes.bfloat16``
``safetensors-index``  a sharded checkpoint: ``model.safetensors.index.json`` (its ``weight_map``)
``hf``                 a Hugging Face model folder: ``config.json`` + ``model.safetensors`` or the
                       sharded index (or ``pytorch_model.bin`` / its index, which needs torch)
``torch``              a PyTorch state dict ``.bin`` / ``.pt`` / ``.pth``, only when torch is
                       installed, loaded with ``torch.load(..., weights_only=True)`` (never unpickles
                       code); nested dicts (``{"state_dict": {...}}``) are flattened with dots
=====================  ===========================================================================

Conventions of :func:`weight_matrices` (also returned in ``WeightSet.conventions``):

* **Orientation (out, in).** torch ``nn.Linear`` (BERT, LLaMA, T5, ViT, ...) and equinox ``Linear`` /
  gradsparse ``Dense`` store ``(out, in)``: kept as stored. GPT-2-style ``Conv1D`` modules
  (``c_attn``, ``c_proj``, ``c_fc``, ``q_attn``) store ``(in, out)``: transposed. The layout is
  detected from ``config.json``'s ``model_type`` (gpt2, openai-gpt, imagegpt) or, without it, from the
  shape of a fused ``c_attn`` weight (``(d, 3d)`` is Conv1D, ``(3d, d)`` is Linear); ``layout=``
  overrides it. So ``W W^T`` is always ``out x out`` (``K K^T``, ``n x n``, for the key matrix).
* **Fused q/k/v.** GPT-2's ``c_attn``, ``qkv`` (timm, gradsparse), ``qkv_proj``, ``Wqkv`` and torch's
  ``in_proj_weight`` hold ``[q | k | v]`` as contiguous thirds of the output axis: with ``3d`` output
  rows and ``d`` inputs they are split into ``name[q]``, ``name[k]``, ``name[v]`` (``d x d`` each).
  ``query_key_value`` (GPT-NeoX, Bloom) interleaves heads and is kept whole (role ``attn_qkv``).
* **Skipped** (listed with the reason, never analysed): non-float tensors (``position_ids`` and other
  integer buffers, bool masks), 0-D and 1-D tensors (biases, LayerNorm scales), tensors with 4 or
  more axes (convolution kernels); 3-D tensors of a foreign format (a convolution kernel or stacked
  experts cannot be told apart). 3-D arrays of gradsparse checkpoints and .npz files are stacked
  layers ``(L, rows, cols)`` and are split into ``name[0] ... name[L-1]`` (as
  :func:`gradsparse.spectra.collect_matrices` does).
* **Roles** from the name (:func:`role_of`): ``key`` = the first MLP matrix (BERT
  ``intermediate.dense``, GPT-2 ``mlp.c_fc``, LLaMA ``up_proj``/``gate_proj``, T5 ``wi``, ViT ``fc1``,
  gradsparse ``key``), ``value`` = the second (``output.dense``, ``mlp.c_proj``, ``down_proj``, ``wo``,
  ``fc2``, gradsparse ``value``), attention ``attn_q``/``attn_k``/``attn_v``/``attn_o``
  (``attn_qkv`` when fused and not split), ``embedding`` (token, position, type and patch
  embeddings), ``other`` (heads, poolers, classifiers, anything unrecognised). ``roles=`` maps a
  role to a regular expression for a model's own naming (tried first). **Layer index**: the first
  all-digit dotted component of the name (``encoder.layer.3...`` -> 3, ``h.11...`` -> 11), else the
  stack index of a split 3-D array, else None.
* ``select``: a regular expression (``re.search`` on the matrix name, after splitting); matrices
  it does not match are listed as skipped.

Matrices are read when their ``array`` is accessed (one at a time, so a model larger than memory
in float64 can still be analysed matrix by matrix); hold the result if you need it twice.
"""

from __future__ import annotations

import errno
import hashlib
import importlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, NamedTuple

import jax
import numpy as np
from safetensors import safe_open

__all__ = [
    "SUPPORTED",
    "ROLES",
    "LAYOUTS",
    "WeightMatrix",
    "WeightSet",
    "detect_format",
    "read_config",
    "read_tensors",
    "role_of",
    "layer_of",
    "weight_matrices",
    "from_tensors",
    "names_by_reason",
    "inside_folder",
    "check_readable",
    "shard_files",
    "short_name",
]

SUPPORTED = (
    "a gradsparse run folder or checkpoint (.eqx)",
    "a .npz file of named arrays",
    "a .safetensors file",
    "a sharded model.safetensors.index.json",
    "a Hugging Face model folder (config.json + model.safetensors, its sharded index, or pytorch_model.bin)",
    "a PyTorch state dict .bin/.pt/.pth (needs torch)",
)
ROLES = ("key", "value", "attn_q", "attn_k", "attn_v", "attn_o", "attn_qkv", "embedding", "other")
LAYOUTS = ("auto", "linear", "conv1d")

_TORCH_SUFFIXES = (".bin", ".pt", ".pth")
_HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
_CONV1D_MODEL_TYPES = ("gpt2", "openai-gpt", "imagegpt")
_CONV1D_NAMES = frozenset({"c_attn", "c_proj", "c_fc", "q_attn"})
_SPLIT_QKV = frozenset({"c_attn", "qkv", "qkv_proj", "wqkv", "in_proj_weight", "in_proj"})
_KEPT_QKV = frozenset({"query_key_value", "qkv_fused"})
_HEADS = frozenset({"lm_head", "head", "heads", "classifier", "pooler", "score", "embed_out", "qa_outputs",
                    "cls", "output_layer", "proj_out"})
_ATTN_Q = frozenset({"query", "q", "q_proj", "q_lin", "wq", "to_q", "q_attn"})
_ATTN_K = frozenset({"key", "k", "k_proj", "k_lin", "wk", "to_k"})
_ATTN_V = frozenset({"value", "v", "v_proj", "v_lin", "wv", "to_v"})
_ATTN_O = frozenset({"o", "o_proj", "out_proj", "out_lin", "wo", "c_proj", "out", "proj", "dense", "to_out",
                     "dense_output"})
_MLP_KEY = frozenset({"intermediate", "c_fc", "fc1", "lin1", "up_proj", "gate_proj", "gate_up_proj", "w1", "w3",
                      "wi", "wi_0", "wi_1", "dense_h_to_4h", "fc_in", "key", "ff1", "linear1"})
_MLP_VALUE = frozenset({"c_proj", "fc2", "lin2", "down_proj", "w2", "wo", "dense_4h_to_h", "fc_out", "value",
                        "ff2", "linear2"})
_DROP = frozenset({"weight", "kernel"})


# --------------------------------------------------------------------------------------------
# types
# --------------------------------------------------------------------------------------------


@dataclass
class WeightMatrix:
    """One 2-D weight in ``(out, in)`` orientation.

    ``name``: the tensor name (``name[q]`` for a third of a fused q/k/v weight, ``name[i]`` for a
    layer of a stacked 3-D array); ``source``: the stored tensor it comes from; ``shape``: the
    shape of :attr:`array`; ``dtype``: the stored dtype; ``role``, ``layer``: see the module
    docstring; ``transposed``: True when the stored tensor was ``(in, out)`` (GPT-2 Conv1D).
    :attr:`array` reads the tensor on every access.
    """

    name: str
    source: str
    shape: tuple[int, int]
    dtype: str
    role: str
    layer: int | None
    transposed: bool = False
    _load: Callable[[], np.ndarray] = field(default=None, repr=False, compare=False)  # type: ignore[assignment]

    @property
    def array(self) -> np.ndarray:
        """The matrix, ``(out, in)``, in its stored dtype."""
        a = self._load()
        if a.shape != self.shape:  # pragma: no cover - a file changed while being read
            raise ValueError(f"{self.name}: expected shape {self.shape}, read {a.shape}")
        return a


class WeightSet(NamedTuple):
    """What :func:`weight_matrices` returns: ``(matrices, skipped, conventions)``.

    ``skipped``: ``[(name, reason), ...]``; ``conventions``: a JSON-ready dict (format, layout and
    how it was detected, transposed and split tensors, the orientation, the config's model_type).
    """

    matrices: list[WeightMatrix]
    skipped: list[tuple[str, str]]
    conventions: dict[str, Any]


# --------------------------------------------------------------------------------------------
# formats
# --------------------------------------------------------------------------------------------


def inside_folder(folder: str | os.PathLike, name: Any, what: str) -> Path:
    """``folder / name`` for a file name read from a file inside ``folder`` (a shard of an index's
    ``weight_map``, a module path of ``modules.json``), checked before anything is opened.

    ``name`` must be a non-empty relative path that stays inside ``folder`` after normalisation
    (no absolute path, no ``..`` that leaves it); ValueError naming ``what`` otherwise. Only the
    name is checked: a file inside the folder that is a symlink (the Hugging Face cache links its
    snapshots into a blobs folder) stays readable.
    """
    if not isinstance(folder, (str, os.PathLike)):
        raise ValueError(f"folder: must be a str or path, got {type(folder).__name__}")
    if not isinstance(what, str) or not what:
        raise ValueError(f"what: must be a non-empty str naming where the name comes from, got {what!r}")
    allowed = f"allowed: a relative path inside {folder}"
    if not isinstance(name, str) or not name.strip() or "\x00" in name:
        raise ValueError(f"{what}: {str(name)[:120]!r} is not a file name; {allowed}")
    norm = os.path.normpath(name)
    if os.path.isabs(name) or norm == os.pardir or norm.startswith(os.pardir + os.sep):
        raise ValueError(f"{what}: {name[:120]!r} points outside the model folder {folder}; {allowed} "
                         "(no absolute path, no '..' that leaves it)")
    return Path(folder) / norm


def _nbytes(n: int) -> str:
    """``n`` bytes in the largest binary unit that keeps the number >= 1 ("4.0 TiB")."""
    for unit, k in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << k:
            return f"{n / (1 << k):.1f} {unit}"
    return f"{n} bytes"


def check_readable(path: str | os.PathLike) -> None:
    """Nothing when ``path`` exists (following symlinks); FileNotFoundError when nothing is there;
    ValueError for a symlink loop or a symlink to nothing (each named as such)."""
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"path: must be a str or path, got {type(path).__name__}")
    p = Path(path)
    try:
        os.stat(p)
        return
    except OSError as e:
        if e.errno == errno.ELOOP:
            target = f" (it points to {os.readlink(p)!r})" if p.is_symlink() else ""
            raise ValueError(f"{p} is a symlink loop{target}: a link that leads back to itself; "
                             "replace it with the file or a link to the file") from None
        if p.is_symlink():
            raise ValueError(f"{p} is a broken symlink: it points to {os.readlink(p)!r}, "
                             "which does not exist") from None
        if e.errno not in (errno.ENOENT, errno.ENOTDIR):
            raise
    raise FileNotFoundError(f"no file or folder at {p}")


def short_name(name: str, limit: int = 120) -> str:
    """``name`` when it has at most ``limit`` characters, else a readable prefix, '-' and 12 hex
    digits of the SHA-256 of the whole name (distinct names stay distinct): for file names made
    from tensor names, which a file system limits to 255 bytes."""
    if not isinstance(name, str):
        raise ValueError(f"name: must be a str, got {type(name).__name__}")
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 20:
        raise ValueError(f"limit: must be an int >= 20, got {limit!r}")
    if len(name.encode("utf-8")) <= limit:
        return name
    digest = hashlib.sha256(name.encode("utf-8")).hexdigest()[:12]
    head = name.encode("utf-8")[:limit - 13].decode("utf-8", "ignore")
    return f"{head}-{digest}"


_ZIP_MAGIC = b"PK\x03\x04"


def _sniff_torch(p: Path) -> None:
    """ValueError unless ``p`` starts as PyTorch writes: a zip archive or a pickle (protocol 2-5)."""
    try:
        with open(p, "rb") as f:
            head = f.read(4)
        size = p.stat().st_size
    except OSError as e:
        raise ValueError(f"{p}: cannot be read ({e.strerror or type(e).__name__})") from None
    if head[:4] == _ZIP_MAGIC or (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5):
        return
    what = ("it is empty" if size == 0 else
            f"{size} bytes that are neither a zip archive nor a pickle, as PyTorch writes")
    raise ValueError(f"{p} is not a readable model file ({what})")


def _unsupported(path: Path, why: str) -> ValueError:
    return ValueError(f"{path}: {why}; supported: " + "; ".join(SUPPORTED))


def _is_gradsparse_checkpoint(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            line = f.readline(1 << 20)
        head = json.loads(line)
    except (OSError, ValueError, UnicodeDecodeError, RecursionError):
        return False
    return isinstance(head, dict) and str(head.get("format", "")).startswith("gradsparse-checkpoint")


def detect_format(path: str | os.PathLike) -> str:
    """The format of ``path``: ``gradsparse``, ``npz``, ``safetensors``, ``safetensors-index``, ``hf``,
    ``torch`` or ``torch-index``. FileNotFoundError when nothing is there; ValueError (one line that
    lists the supported formats) for anything else."""
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"path: must be a str or path, got {type(path).__name__}; allowed: " + "; ".join(SUPPORTED))
    p = Path(path)
    check_readable(p)
    if p.is_dir():
        if (p / "checkpoints").is_dir():
            return "gradsparse"
        for name in _HF_WEIGHTS:
            if (p / name).is_symlink():
                check_readable(p / name)  # a symlink loop or a broken link is named, not taken for "no weights"
            if (p / name).is_file():
                return "hf"
        found = sorted(x.name for x in p.iterdir() if x.suffix in (".safetensors", ".npz", ".eqx") + _TORCH_SUFFIXES)
        hint = f" (it holds {', '.join(found[:4])}: pass the file)" if found else ""
        raise _unsupported(p, f"folder holds no model weights{hint}")
    name = p.name.lower()
    if name.endswith(".safetensors.index.json"):
        return "safetensors-index"
    if name.endswith(".bin.index.json"):
        return "torch-index"
    suffix = p.suffix.lower()
    if suffix == ".safetensors":
        return "safetensors"
    if suffix == ".npz":
        return "npz"
    if suffix in _TORCH_SUFFIXES:
        _sniff_torch(p)
        return "torch"
    if suffix == ".eqx" or _is_gradsparse_checkpoint(p):
        return "gradsparse"
    raise _unsupported(p, f"unsupported file type {p.suffix or '(no suffix)'!r}")


def read_config(path: str | os.PathLike) -> dict[str, Any] | None:
    """The Hugging Face ``config.json`` of a model folder (or next to a weight file), else None."""
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"path: must be a str or path, got {type(path).__name__}")
    p = Path(path)
    cfg = (p if p.is_dir() else p.parent) / "config.json"
    if not cfg.is_file():
        return None
    try:
        data = json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


class _Store(NamedTuple):
    """Names with their (shape, dtype) and a reader of one tensor."""

    meta: dict[str, tuple[tuple[int, ...], str]]
    get: Callable[[str], np.ndarray]
    fmt: str
    files: list[str]


def _npz_store(p: Path) -> _Store:
    try:
        with np.load(p, allow_pickle=False) as z:
            arrays = {k: np.asarray(z[k]) for k in z.files}
    except (OSError, ValueError, EOFError) as e:
        why = "it holds Python objects (pickles), not plain arrays" if "allow_pickle" in str(e) else str(e)
        raise ValueError(f"cannot read {p} as .npz of arrays: {why}") from None
    return _dict_store(arrays, "npz", [str(p)])


def _dict_store(arrays: Mapping[str, Any], fmt: str, files: list[str]) -> _Store:
    meta = {k: (tuple(int(d) for d in np.shape(v)), str(np.asarray(v).dtype)) for k, v in arrays.items()}
    return _Store(meta, lambda k: np.asarray(arrays[k]), fmt, files)


#: bytes per element of the safetensors dtypes
_ST_ITEMSIZE = {"bool": 1, "u8": 1, "i8": 1, "f8_e4m3": 1, "f8_e5m2": 1, "i16": 2, "u16": 2, "f16": 2, "bf16": 2,
                "i32": 4, "u32": 4, "f32": 4, "i64": 8, "u64": 8, "f64": 8}
#: the largest safetensors header read (the format's own limit is 100 MB)
_ST_MAX_HEADER = 1 << 27


def _damaged(p: Path, why: str) -> ValueError:
    return ValueError(f"{p} is truncated or damaged ({why})")


def _safetensors_meta(p: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """Shapes and dtypes from the file's JSON header (8-byte little-endian length, then JSON), every
    tensor's byte range checked against the file's size. ValueError in one line that never shows
    the bytes of a file it refuses."""
    try:
        size = p.stat().st_size
        with open(p, "rb") as f:
            raw_n = f.read(8)
            if len(raw_n) < 8:
                raise _damaged(p, f"{size} bytes, a safetensors file starts with an 8-byte header length")
            n = int.from_bytes(raw_n, "little")
            if not 2 <= n <= _ST_MAX_HEADER:
                raise ValueError(f"{p} is not a readable .safetensors file (its first 8 bytes are not a plausible "
                                 "header length)")
            if 8 + n > size:
                raise _damaged(p, f"{size} bytes, its header needs {8 + n}")
            text = f.read(n)
    except OSError as e:
        raise ValueError(f"{p}: cannot be read ({e.strerror or type(e).__name__})") from None
    try:
        header = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ValueError(f"{p} is not a readable .safetensors file (its header is not UTF-8 JSON)") from None
    if not isinstance(header, dict):
        raise ValueError(f"{p} is not a readable .safetensors file (header is not an object)")
    out = {}
    end = 0
    for k, v in header.items():
        if k == "__metadata__":
            continue
        try:
            shape = tuple(int(d) for d in v["shape"])
            dtype = str(v["dtype"]).lower()
            lo, hi = (int(x) for x in v["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{p}: malformed safetensors header entry {k[:120]!r}") from None
        if any(d < 0 for d in shape) or not 0 <= lo <= hi:
            raise ValueError(f"{p}: malformed safetensors header entry {k[:120]!r} (negative size or offsets)")
        need = int(np.prod(shape, dtype=object)) * _ST_ITEMSIZE.get(dtype, 1)
        if dtype in _ST_ITEMSIZE and hi - lo != need:
            raise _damaged(p, f"its header gives tensor {k[:120]!r} of shape {shape} {hi - lo} bytes, "
                              f"the shape needs {need}")
        end = max(end, hi)
        out[k] = (shape, dtype)
    if 8 + n + end > size:
        raise _damaged(p, f"its header claims {_nbytes(8 + n + end)} ({8 + n + end} bytes) for a file of "
                          f"{size} bytes")
    return out


def _read_error(name: str, path: Path, e: BaseException) -> ValueError:
    """One line in gradsparse's words for a tensor the safetensors reader could not return."""
    if isinstance(e, MemoryError):
        return ValueError(f"cannot read tensor {name[:120]!r} from {path}: not enough memory")
    if isinstance(e, OSError):
        return ValueError(f"cannot read tensor {name[:120]!r} from {path}: {e.strerror or type(e).__name__}")
    return ValueError(f"cannot read tensor {name[:120]!r} from {path}: the file is damaged or was changed while "
                      "being read (it does not follow the safetensors format)")


def _safetensors_reader(files: Mapping[str, Path]) -> Callable[[str], np.ndarray]:
    def get(name: str) -> np.ndarray:
        path = files[name]
        try:
            with safe_open(str(path), framework="np") as f:
                return f.get_tensor(name)
        except Exception as e:  # noqa: BLE001 - the Rust reader raises its own error types
            raise _read_error(name, path, e) from None

    return get


def _safetensors_store(p: Path) -> _Store:
    meta = _safetensors_meta(p)
    return _Store(meta, _safetensors_reader({k: p for k in meta}), "safetensors", [str(p)])


def _index_map(p: Path) -> dict[str, Path]:
    """``{tensor: shard path}`` of a sharded index; every shard name is checked to stay inside the
    index's folder (:func:`inside_folder`) before any shard is opened."""
    try:
        index = json.loads(p.read_text(encoding="utf-8"))
        wmap = index["weight_map"]
        if not isinstance(wmap, dict):
            raise TypeError("weight_map is not an object")
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
        why = "not UTF-8 JSON" if isinstance(e, (UnicodeDecodeError, RecursionError)) else str(e)
        raise ValueError(f"{p} is not a sharded-checkpoint index (need a 'weight_map' object: {why})") from None
    out = {str(name): inside_folder(p.parent, shard, f"{p}: shard of {str(name)[:120]!r}")
           for name, shard in wmap.items()}
    for name, f in out.items():
        if f.is_symlink():
            check_readable(f)
        if not f.is_file():
            raise FileNotFoundError(f"{p}: shard {str(wmap[name])!r} of {name[:120]!r} is missing ({f})")
    return out


def shard_files(index: str | os.PathLike) -> list[Path]:
    """The shard files of a sharded index (``model.safetensors.index.json``), sorted, each once;
    every name checked as :func:`inside_folder` says. ValueError / FileNotFoundError in one line."""
    if not isinstance(index, (str, os.PathLike)):
        raise ValueError(f"index: must be a str or path, got {type(index).__name__}")
    return sorted(set(_index_map(Path(index)).values()))


def _safetensors_index_store(p: Path) -> _Store:
    wmap = _index_map(p)
    meta: dict[str, tuple[tuple[int, ...], str]] = {}
    for shard in sorted(set(wmap.values())):
        shard_meta = _safetensors_meta(shard)
        for name, m in shard_meta.items():
            if wmap.get(name) == shard:
                meta[name] = m
    missing = sorted(set(wmap) - set(meta))
    if missing:
        raise ValueError(f"{p}: {len(missing)} tensors of the index are not in their shard (first: {missing[0]!r})")
    return _Store(meta, _safetensors_reader(wmap), "safetensors-index", sorted({str(f) for f in wmap.values()}))


def _import_torch(p: Path) -> Any:
    try:
        return importlib.import_module("torch")
    except ImportError:
        raise ValueError(f"{p} is a PyTorch file: reading it needs torch (pip install torch), "
                         "or convert it to .safetensors") from None


def _flatten_state(obj: Any, prefix: str, out: dict[str, Any], skipped: list[tuple[str, str]], torch: Any) -> None:
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            _flatten_state(v, f"{prefix}.{k}" if prefix else str(k), out, skipped, torch)
    elif isinstance(obj, torch.Tensor):
        t = obj.detach().cpu()
        if t.dtype == torch.bfloat16:  # numpy has no bfloat16: widen exactly
            t = t.float()
        out[prefix] = t.numpy()
    elif prefix:
        skipped.append((prefix, f"not a tensor ({type(obj).__name__})"))


def _torch_state(p: Path, torch: Any, skipped: list[tuple[str, str]]) -> dict[str, np.ndarray]:
    _sniff_torch(p)  # a shard of a torch index too: bytes torch cannot have written are named as such
    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, ... for foreign or unsafe files
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"cannot read {p} as a PyTorch state dict with weights_only=True: {first}") from None
    out: dict[str, np.ndarray] = {}
    _flatten_state(obj, "", out, skipped, torch)
    if not out:
        raise ValueError(f"{p} holds no tensors (got {type(obj).__name__})")
    return out


def _torch_store(p: Path, skipped: list[tuple[str, str]]) -> _Store:
    torch = _import_torch(p)
    return _dict_store(_torch_state(p, torch, skipped), "torch", [str(p)])


def _torch_index_store(p: Path, skipped: list[tuple[str, str]]) -> _Store:
    torch = _import_torch(p)
    wmap = _index_map(p)
    arrays: dict[str, np.ndarray] = {}
    for shard in sorted(set(wmap.values())):
        arrays.update(_torch_state(shard, torch, skipped))
    return _dict_store(arrays, "torch-index", sorted({str(f) for f in wmap.values()}))


def _pytree_arrays(tree: Any) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """Named array leaves of a pytree (names as :func:`gradsparse.spectra.collect_matrices` gives them)."""
    arrays: dict[str, Any] = {}
    skipped: list[tuple[str, str]] = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        name = jax.tree_util.keystr(path, simple=True, separator=".") or "weight"
        if isinstance(leaf, (np.ndarray, jax.Array)):
            arrays[name] = leaf
        else:
            skipped.append((name, f"not an array ({type(leaf).__name__})"))
    return arrays, skipped


def _store(path: str | os.PathLike, skipped: list[tuple[str, str]]) -> _Store:
    fmt = detect_format(path)
    p = Path(path)
    if fmt == "hf":
        for name, sub in (("model.safetensors", "safetensors"), ("model.safetensors.index.json", "safetensors-index"),
                          ("pytorch_model.bin", "torch"), ("pytorch_model.bin.index.json", "torch-index")):
            if (p / name).is_file():
                store = _store(p / name, skipped)
                return store._replace(fmt=f"hf folder ({name})")
    if fmt == "gradsparse":  # its structure comes from the factory, a layer above this reader
        raise ValueError(f"{p} is a gradsparse run folder or checkpoint: read it with gradsparse.checkpoint.load_model "
                         "(a model) or gradsparse.spectra.weight_set / analyze (its matrices)")
    if fmt == "npz":
        return _npz_store(p)
    if fmt == "safetensors":
        return _safetensors_store(p)
    if fmt == "safetensors-index":
        return _safetensors_index_store(p)
    if fmt == "torch":
        return _torch_store(p, skipped)
    return _torch_index_store(p, skipped)


def read_tensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every tensor of the weights at ``path``, ``{name: np.ndarray}``, names and layouts as stored.

    For model loaders: nothing is skipped, transposed or split (torch bfloat16 tensors are widened to float32,
    safetensors bfloat16 stays ``ml_dtypes.bfloat16``). Raises FileNotFoundError / ValueError (one
    line; an unsupported file lists the supported formats).
    """
    store = _store(path, [])
    return {k: np.asarray(store.get(k)) for k in store.meta}


# --------------------------------------------------------------------------------------------
# names: roles and layers
# --------------------------------------------------------------------------------------------


def _parts(name: str) -> list[str]:
    base = re.sub(r"\[[^\]]*\]$", "", name.lower())
    parts = [c for c in re.split(r"[./]", base) if c]
    while len(parts) > 1 and parts[-1] in _DROP:
        parts.pop()
    return parts


def role_of(name: str, roles: Mapping[str, str] | None = None) -> str:
    """Role of a weight from its name (see the module docstring); ``roles`` ({role: regex}) first.

    ``name[q]``/``[k]``/``[v]`` (a split fused weight) give ``attn_q``/``attn_k``/``attn_v``.
    """
    if not isinstance(name, str):
        raise ValueError(f"name: must be a str; allowed: a tensor name, got {type(name).__name__}")
    for role, pattern in (roles or {}).items():
        if re.search(pattern, name):
            return role
    m = re.search(r"\[([qkv])\]$", name)
    if m:
        return "attn_" + m.group(1)
    parts = _parts(name)
    if not parts:
        return "other"
    leaf = parts[-1]
    if any(c in _HEADS for c in parts):
        return "other"
    if any("embed" in c for c in parts) or leaf in ("wte", "wpe", "shared", "pos", "pos_embed", "cls_token"):
        return "embedding"
    if any("attn" in c or "attention" in c for c in parts):
        if leaf in _SPLIT_QKV or leaf in _KEPT_QKV:
            return "attn_qkv"
        for role, names in (("attn_q", _ATTN_Q), ("attn_k", _ATTN_K), ("attn_v", _ATTN_V), ("attn_o", _ATTN_O)):
            if leaf in names:
                return role
        return "other"
    if leaf in _MLP_VALUE or (leaf == "dense" and "output" in parts[:-1]):
        return "value"
    if leaf in _MLP_KEY or any(c == "intermediate" for c in parts):
        return "key"
    return "other"


def layer_of(name: str) -> int | None:
    """The first all-digit dotted component of ``name`` (``encoder.layer.3.x`` -> 3), else the index of
    a trailing ``[i]`` (a layer of a stacked array), else None."""
    if not isinstance(name, str):
        raise ValueError(f"name: must be a str; allowed: a tensor name, got {type(name).__name__}")
    for c in re.split(r"[./]", re.sub(r"\[[^\]]*\]$", "", name)):
        if c.isdigit():
            return int(c)
    m = re.search(r"\[(\d+)\]$", name)
    return int(m.group(1)) if m else None


# --------------------------------------------------------------------------------------------
# matrices
# --------------------------------------------------------------------------------------------


def _is_float(dtype: str) -> bool:
    d = dtype.lower()
    return d.startswith(("float", "bfloat", "f16", "f32", "f64", "bf16")) or d in ("f8_e4m3", "f8_e5m2", "half", "double")


def _canonical_dtype(dtype: str) -> str:
    return {"f64": "float64", "f32": "float32", "f16": "float16", "bf16": "bfloat16", "i64": "int64",
            "i32": "int32", "i16": "int16", "i8": "int8", "u8": "uint8", "bool": "bool"}.get(dtype.lower(), dtype)


def _detect_layout(meta: Mapping[str, tuple[tuple[int, ...], str]], config: Mapping[str, Any] | None) -> tuple[str, str]:
    mt = str((config or {}).get("model_type", "")).lower()
    if mt in _CONV1D_MODEL_TYPES:
        return "conv1d", f"config.json model_type {mt!r} (GPT-2 Conv1D)"
    for name, (shape, _) in meta.items():
        if len(shape) == 2 and _parts(name)[-1] == "c_attn":
            if shape[1] == 3 * shape[0]:
                return "conv1d", f"{name} has shape {shape} = (d, 3d): Conv1D (in, out)"
            if shape[0] == 3 * shape[1]:
                return "linear", f"{name} has shape {shape} = (3d, d): Linear (out, in)"
    if mt:
        return "linear", f"config.json model_type {mt!r} (torch Linear)"
    return "linear", "default (torch Linear / equinox)"


def _slicer(get: Callable[[str], np.ndarray], source: str, transpose: bool, part: int | None = None,
            index: int | None = None) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        a = np.asarray(get(source))
        if index is not None:
            a = a[index]
        if transpose:
            a = a.T
        if part is not None:
            rows = a.shape[0] // 3
            a = a[part * rows:(part + 1) * rows]
        return a

    return load


def _matrices(store: _Store, skipped: list[tuple[str, str]], *, select: str | None,
              roles: Mapping[str, str] | None, layout: str, config: Mapping[str, Any] | None,
              stacked: bool) -> WeightSet:
    if layout not in LAYOUTS:
        raise ValueError(f"layout: unknown {layout!r}; allowed: {', '.join(LAYOUTS)}")
    pattern = None
    if select is not None:
        try:
            pattern = re.compile(select)
        except re.error as e:
            raise ValueError(f"select: not a regular expression ({e}); allowed: a Python regex such as 'mlp|attn'") from None
    for role, rx in (roles or {}).items():
        if role not in ROLES:
            raise ValueError(f"roles: unknown role {role!r}; allowed: {', '.join(ROLES)}")
        try:
            re.compile(rx)
        except re.error as e:
            raise ValueError(f"roles: {role}={rx!r} is not a regular expression ({e})") from None
    if layout == "auto":
        used, how = _detect_layout(store.meta, config)
    else:
        used, how = layout, "given"
    mats: list[WeightMatrix] = []
    transposed: list[str] = []
    split: list[str] = []
    kept: list[str] = []

    def add(name: str, source: str, shape: tuple[int, int], dtype: str, load: Callable[[], np.ndarray],
            trans: bool) -> None:
        if pattern is not None and not pattern.search(name):
            skipped.append((name, f"not matched by select pattern {select!r}"))
            return
        mats.append(WeightMatrix(name=name, source=source, shape=shape, dtype=dtype, role=role_of(name, roles),
                                 layer=layer_of(name), transposed=trans, _load=load))

    for name, (shape, dtype) in store.meta.items():
        dtype = _canonical_dtype(dtype)
        if not _is_float(dtype):
            what = "an index buffer" if dtype.startswith(("int", "uint")) else "not a weight"
            skipped.append((name, f"{dtype} tensor of shape {shape} (non-float: {what})"))
            continue
        nd = len(shape)
        if nd <= 1:
            skipped.append((name, f"{nd}-D tensor of shape {shape} (bias or norm scale: no spectrum)"))
            continue
        if nd >= 4:
            skipped.append((name, f"{nd}-D tensor of shape {shape} (convolution kernel: not analysed)"))
            continue
        if nd == 3:
            if not stacked:
                skipped.append((name, f"3-D tensor of shape {shape} (convolution kernel or stacked experts: "
                                      "ambiguous, not analysed)"))
                continue
            for i in range(shape[0]):
                add(f"{name}[{i}]", name, (shape[1], shape[2]), dtype, _slicer(store.get, name, False, index=i),
                    False)
            continue
        parts = _parts(name)
        leaf = parts[-1] if parts else ""
        trans = used == "conv1d" and leaf in _CONV1D_NAMES
        rows, cols = (shape[1], shape[0]) if trans else (shape[0], shape[1])
        if trans:
            transposed.append(name)
        if leaf in _SPLIT_QKV and rows == 3 * cols:
            split.append(name)
            for j, tag in enumerate("qkv"):
                add(f"{name}[{tag}]", name, (cols, cols), dtype, _slicer(store.get, name, trans, part=j), trans)
            continue
        if leaf in _SPLIT_QKV or leaf in _KEPT_QKV:
            kept.append(name)
        add(name, name, (rows, cols), dtype, _slicer(store.get, name, trans), trans)
    conventions = {
        "format": store.fmt,
        "files": store.files,
        "model_type": (config or {}).get("model_type"),
        "layout": "GPT-2 Conv1D (in, out), transposed to (out, in)" if used == "conv1d" else "torch Linear (out, in), as stored",
        "layout_detected_from": how,
        "orientation": "every matrix is (out, in): rows = output features, so W W^T is out x out "
                       "(K K^T, n x n, for the key matrix)",
        "transposed": transposed,
        "fused_qkv_split": split,
        "fused_qkv_kept_whole": kept,
        "roles": "key = first MLP matrix, value = second, attn_q/k/v/o, attn_qkv (fused), embedding, other",
        "role_patterns": dict(roles or {}),
        "select": select,
    }
    return WeightSet(mats, skipped, conventions)


def weight_matrices(
    path: str | os.PathLike,
    select: str | None = None,
    *,
    roles: Mapping[str, str] | None = None,
    layout: str = "auto",
) -> WeightSet:
    """The 2-D weights at ``path`` as ``(out, in)`` matrices with roles and layers, the skipped tensors
    with reasons, and the conventions applied (see the module docstring).

    ``select``: regex on matrix names (others are skipped); ``roles``: ``{role: regex}`` tried before
    the built-in naming rules; ``layout``: ``auto`` (detect), ``linear`` (as stored) or ``conv1d``
    (transpose GPT-2 Conv1D weights). Raises FileNotFoundError / ValueError (one line) for a missing
    or unsupported path and for bad arguments.
    """
    skipped: list[tuple[str, str]] = []
    store = _store(path, skipped)
    stacked = store.fmt.startswith(("gradsparse", "npz"))
    return _matrices(store, skipped, select=select, roles=roles, layout=layout, config=read_config(path),
                     stacked=stacked)


def from_tensors(
    tensors: Any,
    select: str | None = None,
    *,
    roles: Mapping[str, str] | None = None,
    layout: str = "auto",
    config: Mapping[str, Any] | None = None,
    stacked: bool = True,
) -> WeightSet:
    """:func:`weight_matrices` for tensors already in memory: a ``{name: array}`` dict (from
    :func:`read_tensors` or a state dict converted to numpy) or any pytree of arrays (an equinox
    model). ``config``: a Hugging Face config (for the layout); ``stacked``: 3-D arrays are stacked
    layers ``(L, rows, cols)`` and are split (default, as for gradsparse models), else skipped."""
    arrays, skipped = _pytree_arrays(tensors)  # a flat {name: array} dict keeps its names
    if not arrays:
        raise ValueError("tensors: holds no arrays; allowed: a {name: array} dict or a pytree of arrays "
                         f"(an equinox model), got {type(tensors).__name__}")
    return _matrices(_dict_store(arrays, "in-memory arrays", []), list(skipped), select=select, roles=roles, layout=layout,
                     config=config, stacked=bool(stacked))


def names_by_reason(skipped: Iterable[tuple[str, str]]) -> dict[str, list[str]]:
    """``{reason kind: [names]}`` for a compact "skipped" summary (the kind: the reason's last
    parenthesised part, e.g. ``bias or norm scale: no spectrum``, else the whole reason)."""
    out: dict[str, list[str]] = {}
    for item in skipped:
        if not (isinstance(item, tuple) and len(item) == 2 and all(isinstance(x, str) for x in item)):
            raise ValueError(f"skipped: expected (name, reason) pairs of str, got {item!r}")
        name, reason = item
        m = re.search(r"\(([^()]*)\)$", reason)
        kind = m.group(1) if m else reason
        out.setdefault(kind, []).append(name)
    return out
