"""Atomic output helpers: every file gradsparse writes goes through temp file + rename.

An ``OSError`` raised while writing (read-only file system, permission denied, disk full) is
re-raised with the TARGET path as its ``filename`` (never the temp file's, and never None as
it is for a failed ``write`` on a file descriptor), so ``gradsparse.cli`` can name the path and
the flag that chose it in one line. The temp file is removed on every failure.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

_MODE = 0o644


def with_target(e: OSError, path: str | os.PathLike, tmp: str | None = None) -> OSError:
    """``e`` as an OSError of the same kind whose ``filename`` is ``path`` when ``e`` named no
    file or named the temp file ``tmp``; ``e`` itself otherwise (a parent folder that could not
    be made, for example, stays named)."""
    if e.errno is None:
        return e
    named = e.filename
    target = Path(path)
    temp_names = (f".{target.name}.", f".{target.stem}.")
    is_temp = named is not None and (
        (tmp is not None and str(named) == str(tmp))
        or (Path(named).parent == target.parent and Path(named).name.startswith(temp_names)))
    if named is None or is_temp:
        return OSError(e.errno, e.strerror or os.strerror(e.errno), str(path))
    return e


def _unlink_quietly(tmp: str) -> None:
    try:
        if os.path.exists(tmp):
            os.unlink(tmp)
    except OSError:
        pass


def _replace_atomically(path: Path, prefix: str, suffix: str, fill: Callable[[int, str], None]) -> Path:
    """Create a temp file ``prefix*suffix`` beside ``path``, let ``fill(fd, tmp)`` write it (and
    close ``fd``), then rename it onto ``path``; on any failure the temp file is removed and an
    OSError names ``path`` (see the module docstring)."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=path.parent)
        try:
            fill(fd, tmp)
            os.replace(tmp, path)
        except BaseException:
            _unlink_quietly(tmp)
            raise
    except OSError as e:
        new = with_target(e, path, tmp)
        if new is e:
            raise
        raise new from e
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file in the same folder, fsync, rename).

    Raises OSError naming ``path`` (see the module docstring); ``path`` is then unchanged.
    """
    path = Path(path)

    def fill(fd: int, tmp: str) -> None:
        os.fchmod(fd, _MODE)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    return _replace_atomically(path, f".{path.name}.", ".tmp", fill)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write text (UTF-8) atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> Path:
    """Write ``obj`` as JSON atomically (NaN/inf are written as null-safe strings by the caller)."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=False, default=_json_default) + "\n")


def atomic_write_with(path: str | os.PathLike, writer: Callable[[str], None]) -> Path:
    """Call ``writer(tmp_path)`` to produce the file, then rename it onto ``path``.

    For libraries that insist on writing to a file name themselves (matplotlib's savefig,
    equinox serialisation). The temp name keeps the final suffix so format detection works.
    """
    path = Path(path)

    def fill(fd: int, tmp: str) -> None:
        os.close(fd)
        writer(tmp)
        os.chmod(tmp, _MODE)

    return _replace_atomically(path, f".{path.stem}.", path.suffix, fill)


def json_ready(o: Any) -> Any:
    """``o`` as strict JSON data: NaN/inf -> None, numpy scalars and arrays -> Python numbers and
    lists, tuples -> lists, mapping keys -> strings."""
    if isinstance(o, dict):
        return {str(k): json_ready(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [json_ready(v) for v in o]
    if isinstance(o, np.ndarray):
        return [json_ready(v) for v in o.tolist()]
    if isinstance(o, (np.floating, float)):
        f = float(o)
        return f if math.isfinite(f) else None
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.bool_):
        return bool(o)
    return o


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def is_temp_file(p: Path) -> bool:
    """Whether ``p`` is named as the temp file of an atomic write (``.NAME.XXXX.tmp``)."""
    return p.name.startswith(".") and p.name.endswith(".tmp")


def foreign_entries(folder: Path, is_own: Callable[[Path], bool]) -> list[str]:
    """The sorted names of the entries of ``folder`` that are not its kind of output: neither
    claimed by ``is_own`` nor temp files of atomic writes ([] for a missing folder). A command
    refuses to write into a folder where this is not empty."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if not is_own(p) and not is_temp_file(p))
