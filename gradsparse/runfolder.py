"""A run folder on disk: provenance, the lock, temp-file cleanup, resume reconciled in ONE place,
and the log writer.

Layout: ``config.json``, ``meta.json`` (versions, seed, git revision, data digest, resumes),
``log.jsonl`` (one JSON object per logged step), ``checkpoints/step_*.eqx``, ``summary.json``,
``covariance.npz`` (with ``track_covariance``), ``.lock``.

:func:`plan_resume` reads and checks everything a resumed run needs before anything is written;
:func:`open_run` then writes the folder's start (fresh or resumed) and returns the
:class:`LogWriter` the loop appends to.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jaxlib
import numpy as np
import optax

from gradsparse import __version__
from gradsparse.checkpoint import list_checkpoints, read_header, read_leaves
from gradsparse.config import TrainConfig, check_resumable
from gradsparse.io import atomic_write_bytes, atomic_write_json

try:  # POSIX advisory locks; elsewhere a run folder is not locked
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None


# ---------------------------------------------------------------------------- provenance
def versions() -> dict[str, str]:
    """Versions of gradsparse, Python and the numeric stack, the platform and the devices."""
    return {"gradsparse": __version__, "python": sys.version.split()[0], "jax": jax.__version__,
            "jaxlib": jaxlib.__version__, "equinox": eqx.__version__, "optax": optax.__version__,
            "numpy": np.__version__, "platform": platform.platform(),
            "devices": ", ".join(str(d) for d in jax.devices())}


def _git(*args: str) -> str | None:
    """stdout of ``git args`` run in the package's source checkout, or None when there is none.

    The package counts as a checkout only when ``<git top level>/gradsparse`` is this very
    package folder (an editable install or a run from the source tree); a package installed
    into site-packages that happens to sit inside some other repository (a venv in a project
    folder) is not, so its revision is None rather than that repository's.
    """
    here = Path(__file__).resolve().parent
    try:
        top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=here, capture_output=True, text=True,
                             timeout=5)
        if top.returncode != 0 or not top.stdout.strip():
            return None
        if (Path(top.stdout.strip()) / here.name).resolve() != here:
            return None
        res = subprocess.run(["git", *args], cwd=here, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout if res.returncode == 0 else None


def git_revision() -> str | None:
    """The commit (40 hex digits) of the source checkout gradsparse runs from, or None when it
    is not run from a git checkout (see :func:`_git`)."""
    out = _git("rev-parse", "HEAD")
    return out.strip() or None if out is not None else None


def git_dirty() -> bool | None:
    """Whether tracked files of the source checkout differ from its commit; None without a checkout."""
    out = _git("status", "--porcelain", "--untracked-files=no")
    return bool(out.strip()) if out is not None else None


# ---------------------------------------------------------------------------- the log grid
def logged(step: int, cfg: TrainConfig) -> bool:
    """Whether step ``step`` writes a log line: every ``log_every`` steps and the last step."""
    return step % cfg.log_every == 0 or step == cfg.steps - 1


# ---------------------------------------------------------------------------- reading a folder
def _read_json_file(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"{path} ({what}) is unreadable or not valid JSON ({type(e).__name__}: {e}); "
                         "the run folder is damaged") from None


def stored_config(out: Path) -> TrainConfig | None:
    """The validated ``out/config.json``, or None when the folder holds none (nothing started)."""
    path = Path(out) / "config.json"
    if not path.exists():
        return None
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"{path} is not readable JSON ({type(e).__name__}: {e}); the run folder is damaged") from None
    try:
        return TrainConfig.from_dict(stored)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path} is not a valid config ({e}); the run folder is damaged") from None


def _json_norm(v: Any) -> Any:
    """``v`` as it reads back from JSON (tuples become lists, paths strings), for comparisons."""
    return json.loads(json.dumps(v, default=str))


@dataclass
class Resume:
    """What a run folder tells a resumed run: where to start and the log to keep (nothing written yet)."""

    step: int = 0
    checkpoint: Path | None = None
    model: Any = None
    state: Any = None
    elapsed_s: float = 0.0
    log_lines: list[bytes] = field(default_factory=list)  # kept lines, without their newlines
    records: list[dict[str, Any]] = field(default_factory=list)
    meta: dict[str, Any] | None = None  # the run's meta.json, when readable


def plan_resume(out: Path, cfg: TrainConfig, header: dict[str, Any], model_like: Any, state_like: Any) -> Resume:
    """Read and check everything a resume needs from ``out``; raise ValueError on any mismatch.

    - no ``config.json``: nothing was started (or the run was killed before writing anything),
      so the run starts from step 0 — unless a log or checkpoints are there, which means the
      folder is damaged;
    - ``config.json`` must be resumable as ``cfg`` (:func:`gradsparse.config.check_resumable`);
    - no checkpoint yet: start from step 0 (the log is dropped);
    - else the latest checkpoint (step c) is read into the skeletons (shapes, dtypes, length and
      SHA-256 checked), its header must describe the same config (up to ``steps``), data info
      and data digest, and the log must hold exactly the lines the checkpoint counted (same
      SHA-256): those with step < c that ``cfg`` logs are kept, any later or partial line is dropped.
    """
    res = Resume()
    stored = stored_config(out)
    if stored is None:
        if list_checkpoints(out) or (out / "log.jsonl").exists():
            raise ValueError(f"{out} holds a log or checkpoints but no config.json; the run folder is damaged "
                             "and cannot be resumed")
        return res
    check_resumable(stored, cfg, f"the run in {out} (config.json)")
    meta_path = out / "meta.json"
    if meta_path.exists():
        meta = _read_json_file(meta_path, "the run's metadata")
        res.meta = meta if isinstance(meta, dict) else None
    cks = list_checkpoints(out)
    if not cks:
        return res
    step, path = cks[-1]
    h = read_header(path)  # header checks first: they name what differs; the leaves are read last
    if h.get("step") != step:
        raise ValueError(f"checkpoint {path}: its header says step {h.get('step')!r}, its name says {step}")
    try:
        ck_cfg = TrainConfig.from_dict(h.get("config"))
    except (ValueError, TypeError) as e:
        raise ValueError(f"checkpoint {path}: its config is not valid ({e})") from None
    check_resumable(ck_cfg, cfg, f"checkpoint {path}")
    if step > cfg.steps:
        raise ValueError(f"checkpoint {path} is at step {step}, beyond steps {cfg.steps}")
    for key in ("data_info", "data_sha256"):
        if key in h or key in header:
            if _json_norm(h.get(key)) != _json_norm(header.get(key)):
                what = {"data_info": "data shape", "data_sha256": "data"}[key]
                raise ValueError(f"checkpoint {path}: the {what} it was trained with differs from this run's "
                                 f"({key} {h.get(key)!r} vs {header.get(key)!r}); resume with the same data and model")
    model, state, _ = read_leaves(path, model_like, state_like)
    loop = h.get("loop") if isinstance(h.get("loop"), dict) else {}
    res.step, res.checkpoint, res.model, res.state = step, path, model, state
    elapsed = loop.get("elapsed_s", 0.0)
    res.elapsed_s = float(elapsed) if isinstance(elapsed, (int, float)) and math.isfinite(elapsed) else 0.0
    res.log_lines, res.records = _resume_log(out / "log.jsonl", loop, step, cfg)
    return res


def _resume_log(path: Path, loop: dict[str, Any], c: int, cfg: TrainConfig) -> tuple[list[bytes], list[dict]]:
    """The log lines (and records) a run resumed at step ``c`` keeps; ValueError if the log disagrees.

    With the checkpoint's ``loop.log_lines`` = n and ``loop.log_sha256``, the first n complete
    lines must hash to that digest (they are the lines written before the checkpoint); every
    later line, and a last line without its newline (cut by a crash), is dropped. The kept lines
    are those whose step ``cfg`` logs, and they must be exactly steps {s < c: s % log_every == 0}
    (plus steps - 1 when c == steps).
    """
    try:
        raw = path.read_bytes() if path.exists() else b""
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e}") from None
    complete = raw.split(b"\n")[:-1]  # the last piece is "" or a partial line
    n = loop.get("log_lines")
    if isinstance(n, int) and not isinstance(n, bool):
        if len(complete) < n:
            raise ValueError(f"{path} holds {len(complete)} complete lines but the checkpoint at step {c} was saved "
                             f"after {n}; the log lost lines and the run cannot be resumed faithfully")
        digest = hashlib.sha256(b"".join(line + b"\n" for line in complete[:n])).hexdigest()
        if digest != loop.get("log_sha256"):
            raise ValueError(f"{path}: its first {n} lines differ from those written before the checkpoint at step "
                             f"{c}; the log was changed and the run cannot be resumed faithfully")
        complete = complete[:n]
    lines, records = [], []
    for i, line in enumerate(complete):
        try:
            rec = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            raise ValueError(f"{path} line {i + 1} is not valid JSON; the log is damaged") from None
        s = rec.get("step") if isinstance(rec, dict) else None
        if not isinstance(s, int) or isinstance(s, bool):
            raise ValueError(f"{path} line {i + 1} has no integer 'step'; the log is damaged")
        if s >= c:
            break
        if logged(s, cfg):
            lines.append(line)
            records.append(rec)
    expected = list(range(0, c, cfg.log_every))
    if cfg.steps - 1 < c and (cfg.steps - 1) % cfg.log_every:
        expected.append(cfg.steps - 1)
    got = [r["step"] for r in records]
    if got != expected:
        show = lambda v: v if len(v) <= 8 else v[:4] + ["..."] + v[-3:]  # noqa: E731
        raise ValueError(f"{path} logs steps {show(got)} before the checkpoint at step {c}, expected {show(expected)}; "
                         "the log is damaged and the run cannot be resumed faithfully")
    return lines, records


# ---------------------------------------------------------------------------- writing a folder
def remove_temp_files(out: Path) -> None:
    """Delete the temp files of atomic writes that a killed process left (``.NAME.XXXX.tmp``)."""
    for folder in (out, out / "checkpoints"):
        if folder.is_dir():
            for p in folder.iterdir():
                if p.name.startswith(".") and p.name.endswith(".tmp") and p.is_file():
                    p.unlink(missing_ok=True)


def lock_run_folder(out: Path):
    """Hold an exclusive lock on ``out/.lock`` (released when the process ends, even when killed).

    Two processes writing one run folder would interleave their logs; the second one gets
    ValueError. Returns the open lock file (keep it open), or None where locks are unsupported.
    """
    if fcntl is None:  # pragma: no cover - not POSIX
        return None
    f = open(out / ".lock", "a+b")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise ValueError(f"run folder {out} is in use by another gradsparse process") from None
    return f


class LogWriter:
    """Appends one JSON line per record to ``log.jsonl`` and keeps the count and SHA-256 of the
    lines written so far (a checkpoint stores both, so a resume can cut the log back to it).

    Each record is written with one ``write`` and flushed; if that fails (disk full), the file is
    cut back to its last complete line before the error propagates, so the log never ends in a
    half-written line.
    """

    def __init__(self, path: Path, kept: list[bytes], lock: Any):
        self.path, self.lock = path, lock
        self.hash, self.count = hashlib.sha256(), 0
        body = b"".join(line + b"\n" for line in kept)
        self.hash.update(body)
        self.count = len(kept)
        if kept:
            atomic_write_bytes(path, body)
            self.f = open(path, "ab")
        else:
            self.f = open(path, "wb")
        self._size = len(body)

    def write(self, rec: dict[str, Any]) -> None:
        line = (json.dumps(rec) + "\n").encode("utf-8")
        try:
            self.f.write(line)
            self.f.flush()
        except OSError:
            self._cut_back()
            raise
        self._size += len(line)
        self.hash.update(line)
        self.count += 1

    def _cut_back(self) -> None:
        try:
            self.f.close()
        except OSError:
            pass
        with open(self.path, "r+b") as f:
            f.truncate(self._size)
        self.f = open(self.path, "ab")

    def sync(self) -> None:
        """Flush and fsync: the lines a checkpoint counts are on disk before it is."""
        self.f.flush()
        os.fsync(self.f.fileno())

    def position(self) -> dict[str, Any]:
        return {"log_lines": self.count, "log_sha256": self.hash.hexdigest()}

    def close(self) -> None:
        try:
            self.f.close()
        finally:
            if self.lock is not None:
                self.lock.close()


def open_run(out: Path, cfg: TrainConfig, header: dict[str, Any], plan: Resume) -> LogWriter:
    """Write the start of a run into ``out`` (locked): a fresh start (no checkpoint to resume)
    removes the checkpoints and summary an earlier run left and writes config/meta; a resume
    keeps the checked log lines and records the resume in ``meta.json``. Returns the log writer."""
    out.mkdir(parents=True, exist_ok=True)
    lock = lock_run_folder(out)
    try:
        remove_temp_files(out)
        meta_now = {"versions": versions(), "seed": cfg.seed, "git_revision": git_revision(),
                    "git_dirty": git_dirty(), "data_info": header["data_info"], "data_sha256": header["data_sha256"]}
        (out / "summary.json").unlink(missing_ok=True)
        atomic_write_json(out / "config.json", cfg.to_dict())
        if plan.checkpoint is None:  # fresh start (also: resumed before the first checkpoint)
            for _, p in list_checkpoints(out):
                p.unlink(missing_ok=True)
            atomic_write_json(out / "meta.json", {**meta_now, "started": time.time()})
            return LogWriter(out / "log.jsonl", [], lock)
        meta = dict(plan.meta) if plan.meta is not None else dict(meta_now)
        meta["resumes"] = list(meta.get("resumes") or []) + [
            {"from_step": plan.step, "steps": cfg.steps, "time": time.time(), **meta_now}]
        atomic_write_json(out / "meta.json", meta)
        return LogWriter(out / "log.jsonl", plan.log_lines, lock)
    except BaseException:
        if lock is not None:
            lock.close()
        raise
