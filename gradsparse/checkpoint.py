"""Checkpoints: one file per save, written atomically (temp file + rename).

File layout: one line of JSON (the header: format, step, the run's config, data info,
``surgery`` — the plug-in options applied after construction —, the loop state ``loop`` of a
training run, ``payload_bytes`` / ``payload_sha256`` of what follows, and last
``header_sha256``), then the equinox-serialised model leaves, then the optimizer-state leaves.
The header is enough to rebuild the skeleton that the leaves are read into, so
``load_model(path)`` needs nothing but the file.

Integrity covers the header too: with J = ``json.dumps(header without header_sha256)`` (the
canonical header JSON as written), the header line is J with ``, "header_sha256": "<hex>"``
inserted before its closing brace, where hex = SHA-256(J as UTF-8). Reading recomputes J from
the line's bytes, so an edited value (a changed ``lr``) or one flipped byte is recognised.
Checkpoints written before the field existed (no ``header_sha256``) still load; their header is
checked by the config validation only.

Reading checks everything a damaged or foreign file can get wrong and raises ValueError naming
the file: no JSON header, another format, a header whose SHA-256 differs (damaged), a payload
shorter/longer than the header says (truncated file) or with another SHA-256 (corrupt file),
leaves whose shape or dtype differ from the model the header describes, bytes left over after
the optimizer state. Every failure that means "this file is damaged" (as opposed to "this file
is not a checkpoint") is a :class:`CheckpointDamaged` (a ValueError), whose message names the
file and says "damaged"; ``--resume --skip-damaged`` skips such files.
"""

from __future__ import annotations

import difflib
import hashlib
import io
import json
import os
import re
from pathlib import Path
from typing import Any

import equinox as eqx
import jax

from gradsparse._validate import check_int
from gradsparse.errors import CheckpointDamaged  # noqa: F401 - also imported from here
from gradsparse.factory import skeleton_from_header
from gradsparse.io import atomic_write_bytes

FORMAT = "gradsparse-checkpoint-1"
_NAME = re.compile(r"^step_(\d{8,})\.eqx$")
#: the header's integrity field as it ends the header line
_TRAILER = re.compile(rb', "header_sha256": "([0-9a-f]{64})"\}\s*$')
#: any last field holding a SHA-256 (a header_sha256 whose name was damaged, or a legacy payload_sha256)
_LAST_DIGEST = re.compile(rb', "([^"]*)": "[0-9a-f]{64}"\}\s*$')


def checkpoint_path(run_dir: str | os.PathLike, step: int) -> Path:
    """``run_dir/checkpoints/step_{step:08d}.eqx`` (the state after ``step`` optimizer updates)."""
    check_int("step", step, 0)
    return Path(run_dir) / "checkpoints" / f"step_{step:08d}.eqx"


def save_checkpoint(path: str | os.PathLike, model: Any, opt_state: Any, header: dict[str, Any]) -> Path:
    """Write header + model leaves + optimizer leaves to ``path`` atomically.

    The header gains ``payload_bytes`` and ``payload_sha256`` (of the leaves that follow it), so
    a truncated or damaged file is recognised when it is read.
    """
    if not isinstance(header, dict):
        raise ValueError(f"header must be a mapping, got {type(header).__name__}")
    buf = io.BytesIO()
    eqx.tree_serialise_leaves(buf, model)
    eqx.tree_serialise_leaves(buf, opt_state)
    payload = buf.getvalue()
    head = {"format": FORMAT, **{k: v for k, v in header.items() if k != "header_sha256"},
            "payload_bytes": len(payload), "payload_sha256": hashlib.sha256(payload).hexdigest()}
    return atomic_write_bytes(path, header_line(head) + b"\n" + payload)


def header_line(header: dict[str, Any]) -> bytes:
    """The header line (without its newline) for ``header``: J = ``json.dumps(header)`` with
    ``"header_sha256": SHA-256(J)`` appended as its last field (see the module docstring).
    A ``header_sha256`` already in ``header`` is replaced."""
    if not isinstance(header, dict) or not header:
        raise ValueError("header: must be a non-empty mapping")
    body = json.dumps({k: v for k, v in header.items() if k != "header_sha256"}, default=str).encode("utf-8")
    return body[:-1] + b', "header_sha256": "' + hashlib.sha256(body).hexdigest().encode() + b'"}'


def _parse_header(line: bytes, path: Path) -> dict[str, Any]:
    """The header of ``line``, with its ``header_sha256`` checked when it has one."""
    m = _TRAILER.search(line)
    if m is not None:
        body = line[:m.start()] + b"}"
        if hashlib.sha256(body).hexdigest() != m.group(1).decode():
            raise CheckpointDamaged(f"checkpoint {path} is damaged: its header differs from the one it was saved "
                                    "with (header_sha256 does not match; edited or corrupted)")
    try:
        header = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        if FORMAT.encode() in line[:200] or b'"header_sha256"' in line:
            raise CheckpointDamaged(f"checkpoint {path} is damaged: its header is not valid JSON") from None
        raise ValueError(f"{path} is not a gradsparse checkpoint (no JSON header)") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path} is not a gradsparse checkpoint (its first line is not a JSON object)")
    if m is None:
        last = _LAST_DIGEST.search(line)
        if "header_sha256" in header or (last is not None and last.group(1) != b"payload_sha256"):
            raise CheckpointDamaged(f"checkpoint {path} is damaged: its header_sha256 field is malformed")
    if header.get("format") != FORMAT:
        fmt = header.get("format")
        if m is not None or (isinstance(fmt, str) and difflib.SequenceMatcher(None, fmt, FORMAT).ratio() > 0.9):
            raise CheckpointDamaged(f"checkpoint {path} is damaged: its format field reads {fmt!r}, "
                                    f"expected {FORMAT!r}")
        raise ValueError(f"{path} is not a gradsparse checkpoint (format {fmt!r}, expected {FORMAT!r})")
    return header


def read_header(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON header of a checkpoint; ValueError if the file is not a gradsparse checkpoint."""
    path = _regular_file(path)
    try:
        with open(path, "rb") as f:
            line = f.readline(1 << 20)
    except OSError as e:
        raise ValueError(f"cannot read checkpoint {path}: {e}") from None
    return _parse_header(line, path)


def _regular_file(path: str | os.PathLike) -> Path:
    """``path`` when it is a regular file; FileNotFoundError / ValueError saying what it is otherwise."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.is_dir():
        raise ValueError(f"checkpoint {path} is a folder; give a checkpoint file or a run folder")
    if not path.is_file():
        raise ValueError(f"checkpoint {path} is not a regular file (a device, pipe or socket); "
                         "give a checkpoint file (.eqx) or a run folder")
    return path


def _read_verified(path: Path) -> tuple[dict[str, Any], bytes]:
    """(header, payload) of a checkpoint file, with the payload's length and SHA-256 checked."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read checkpoint {path}: {e}") from None
    cut = raw.find(b"\n", 0, 1 << 20)
    if cut < 0:
        if FORMAT.encode() in raw[:200]:
            raise CheckpointDamaged(f"checkpoint {path} is damaged: its header line has no end")
        raise ValueError(f"{path} is not a gradsparse checkpoint (no JSON header line)")
    header = _parse_header(raw[:cut], path)
    payload = raw[cut + 1:]
    want = header.get("payload_bytes")
    if want is not None:  # absent only in checkpoints written before the field existed
        if not isinstance(want, int) or len(payload) != want:
            raise CheckpointDamaged(f"checkpoint {path} is truncated or damaged: {len(payload)} bytes of leaves, "
                                    f"its header says {want}")
        if hashlib.sha256(payload).hexdigest() != header.get("payload_sha256"):
            raise CheckpointDamaged(f"checkpoint {path} is damaged: the SHA-256 of its leaves differs from its "
                                    "header's")
    return header, payload


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint in ``run_dir/checkpoints``, sorted by step."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    out = []
    for p in folder.iterdir():
        m = _NAME.match(p.name)
        if m:
            out.append((int(m.group(1)), p))
    return sorted(out)


def resolve(path: str | os.PathLike) -> Path:
    """A checkpoint file, or the latest checkpoint of a run folder (or of its ``checkpoints/`` folder)."""
    p = Path(path)
    if p.is_dir():
        cks = list_checkpoints(p)
        if not cks and p.name == "checkpoints":
            cks = list_checkpoints(p.parent) if (p.parent / "checkpoints").resolve() == p.resolve() else []
        if not cks:
            raise FileNotFoundError(f"run folder {p} holds no checkpoints (expected {p}/checkpoints/step_*.eqx)")
        return cks[-1][1]
    if not p.exists():
        raise FileNotFoundError(f"no checkpoint or run folder at {p}")
    return p


def _deserialise(f, like: Any, path: Path, what: str) -> Any:
    """Read ``like``-shaped leaves from ``f``; ValueError unless every leaf's shape and dtype fit."""
    try:
        out = eqx.tree_deserialise_leaves(f, like)
    except Exception as e:  # noqa: BLE001 - shape mismatch, truncated data, unreadable .npy: all "does not fit"
        raise CheckpointDamaged(f"checkpoint {path} is damaged: its {what} does not fit the model its header "
                                f"describes ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    got = jax.tree_util.tree_leaves_with_path(out)
    want = jax.tree_util.tree_leaves_with_path(like)
    for (kp, a), (_, b) in zip(got, want):
        if eqx.is_array(b) and (not eqx.is_array(a) or a.shape != b.shape or a.dtype != b.dtype):
            raise CheckpointDamaged(f"checkpoint {path} is damaged: {what} leaf {jax.tree_util.keystr(kp)} is "
                                    f"{getattr(a, 'dtype', type(a).__name__)}{tuple(getattr(a, 'shape', ()))}, the "
                                    f"model its header describes has {b.dtype}{tuple(b.shape)}")
    return out


def read_leaves(path: str | os.PathLike, model_like: Any, opt_like: Any | None
                ) -> tuple[Any, Any, dict[str, Any]]:
    """(model, opt_state or None, header) read from checkpoint ``path`` into the given skeletons.

    ``model_like`` / ``opt_like`` fix the pytree structure, shapes and dtypes (for example the
    freshly built model of a run being resumed). With ``opt_like`` given, the file must end
    exactly after the optimizer state. Raises ValueError on any mismatch (see module docstring).
    """
    path = _regular_file(path)
    header, payload = _read_verified(path)
    f = io.BytesIO(payload)
    model = _deserialise(f, model_like, path, "model")
    opt_state = None
    if opt_like is not None:
        opt_state = _deserialise(f, opt_like, path, "optimizer state")
        if f.tell() != len(payload):
            raise CheckpointDamaged(f"checkpoint {path} is damaged: {len(payload) - f.tell()} bytes follow the "
                                    "optimizer state; its leaves do not fit the model its header describes")
    return model, opt_state, header


def load_checkpoint(path: str | os.PathLike, *, with_opt_state: bool = True) -> tuple[Any, Any, dict[str, Any]]:
    """(model, opt_state or None, header) from a checkpoint file or run folder."""
    path = resolve(path)
    header = read_header(path)
    model_like, opt_like = skeleton_from_header(header)
    return read_leaves(path, model_like, opt_like if with_opt_state else None)


def load_model(path: str | os.PathLike) -> tuple[Any, dict[str, Any]]:
    """(model, header) from a checkpoint file or a run folder (its latest checkpoint).

    The whole file is checked (length, SHA-256, and that the optimizer state fits too), so a
    damaged checkpoint is refused even when only its optimizer part is damaged.
    """
    model, _, header = load_checkpoint(path, with_opt_state=True)
    return model, header
