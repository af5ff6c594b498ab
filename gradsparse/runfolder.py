"""A run folder on disk: provenance, the lock, temp-file cleanup, resume reconciled in ONE place,
the log writer, and :class:`RunFolder`, which owns open / resume / checkpoint / finish for every
kind of run (training, seed groups, relufication).

Layout: ``config.json``, ``meta.json`` (versions, seed, git revision, data digest, resumes),
``log.jsonl`` (one JSON object per logged step; a pure function of config and seed, so two runs
of one config write identical bytes), ``times.jsonl`` (``{"step", "time"}`` per logged step: the
wall-clock seconds since the run started, summed over resumed segments; kept out of log.jsonl
so that the log stays reproducible), ``checkpoints/step_*.eqx``, ``summary.json``,
``covariance.npz`` (with ``track_covariance``). The folder itself is locked while a run writes it
(:func:`lock_run_folder`; no lock file).

The order of :meth:`RunFolder.open` is the rule: lock the folder first, then decide (a new run,
a resume, an overwrite) and check everything the run will read or write (config, meta, every
checkpoint header and leaves it resumes from, the log, and that no file the run writes is a
folder), and only then write (:meth:`RunFolder.start`). So a second process that checked ``--out``
before the first one locked it still finds the folder as it is when it gets the lock, and a
refused resume leaves every byte where it was. A damaged *content* of ``times.jsonl`` never stops
a resume (wall-clock times are not part of what a run reproduces: the lines that still match are
kept); a ``times.jsonl`` that is not a file is refused like any other such path.

:func:`run_contents` says whether a folder already holds (part of) a run; :func:`check_out` is
the ``--out`` rule (nothing but a run to resume, or an empty folder, unless ``--overwrite``).
"""

from __future__ import annotations

import errno
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
from gradsparse._validate import check_bool
from gradsparse.checkpoint import (CheckpointDamaged, checkpoint_path, list_checkpoints, read_header, read_leaves,
                                   save_checkpoint)
from gradsparse.config import RunConfig, TrainConfig
from gradsparse.io import atomic_write_bytes, atomic_write_json, foreign_entries, is_temp_file, with_target

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
def logged(step: int, cfg: Any) -> bool:
    """Whether step ``step`` writes a log line: every ``log_every`` steps and the last step (``cfg``:
    any config with ``steps`` and ``log_every``)."""
    return step % cfg.log_every == 0 or step == cfg.steps - 1


# ---------------------------------------------------------------------------- reading a folder
#: what a run writes into its folder (a folder holding any of them holds a run, or part of one)
RUN_FILES = ("config.json", "meta.json", "log.jsonl", "times.jsonl", "summary.json", "covariance.npz", "checkpoints")


def run_contents(out: str | os.PathLike) -> list[str]:
    """The entries of :data:`RUN_FILES` present in ``out`` (``checkpoints`` only when it holds
    something); [] for a missing or empty folder, or one holding only a lock and temp files."""
    out = Path(out)
    if not out.is_dir():
        return []
    found = []
    for name in RUN_FILES:
        p = out / name
        if name == "checkpoints":
            if p.is_dir() and any(True for _ in p.iterdir()):
                found.append(name + "/")
            elif p.exists() and not p.is_dir():
                found.append(name)
        elif p.exists():
            found.append(name)
    return found


def other_files(out: str | os.PathLike) -> list[str]:
    """Entries of ``out`` that are no part of a run (not :data:`RUN_FILES`, the lock or temp files)."""
    return foreign_entries(Path(out), lambda p: p.name in RUN_FILES or p.name == ".lock")


def refuse_existing_run(out: str | os.PathLike, flag: str = "--out") -> None:
    """ValueError when ``out`` holds (part of) a run: nothing there may be replaced without
    ``--overwrite`` (or continued without ``--resume``)."""
    found = run_contents(out)
    if found:
        raise ValueError(f"{flag} {out} already holds a run ({', '.join(found)}); pass --resume to continue it, "
                         "--overwrite to replace it, or choose another folder")


def check_out(out: str | os.PathLike, flag: str = "--out") -> None:
    """The rule for a new run's folder without ``--overwrite``: it does not exist or is empty.
    ValueError when it holds (part of) a run (:func:`refuse_existing_run`) or files of someone
    else's (named). :meth:`RunFolder.open` applies it again once the folder is locked."""
    refuse_existing_run(out, flag)
    others = other_files(out)
    if others:
        shown = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
        raise ValueError(f"{flag} {out} is not empty and holds no run ({shown}); choose an empty or new folder, "
                         "or pass --overwrite to write the run beside these files (they are kept)")


#: what a damaged run folder's refusal offers
START_OVER = "--overwrite starts the run over (its checkpoints and log are removed)"


def _read_json_file(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"{path} ({what}) is unreadable or not valid JSON ({type(e).__name__}: {e}); "
                         f"the run folder is damaged; {START_OVER}") from None


def run_kind(out: str | os.PathLike) -> tuple[str, str | None] | None:
    """What kind of run ``out/config.json`` records: ``("relufication", model folder)`` when it
    names a ``model_folder`` (:mod:`gradsparse.relufy`), ``("training", None)`` for any other
    JSON object, None when there is no readable config.json. Reads nothing else."""
    if not isinstance(out, (str, os.PathLike)):
        raise ValueError(f"out: must be a str or path, got {type(out).__name__}")
    try:
        stored = json.loads((Path(out) / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None
    if not isinstance(stored, dict):
        return None
    if "model_folder" in stored:
        folder = stored["model_folder"]
        return "relufication", folder if isinstance(folder, str) else None
    return "training", None


def continue_command(out: str | os.PathLike) -> str | None:
    """The command that continues the run in ``out`` (from :func:`run_kind`), or None."""
    kind = run_kind(out)
    if kind is None:
        return None
    if kind[0] == "relufication":
        return f"gradsparse relufy {kind[1] or 'HF_FOLDER'} --out {out} --resume"
    return f"gradsparse train --out {out} --resume"


def _other_kind(out: Path, cls: type[RunConfig]) -> str | None:
    """A line for a run folder of another kind than ``cls`` reads, naming the command for it."""
    kind = run_kind(out)
    wants_model = "model_folder" in getattr(cls, "__dataclass_fields__", {})
    if kind is None or (kind[0] == "relufication") == wants_model:
        return None
    return f"{out} holds a {kind[0]} run, not a {'relufication' if wants_model else 'training'} run; " \
           f"continue it with: {continue_command(out)}"


def stored_config(out: Path, cls: type[RunConfig] = TrainConfig) -> RunConfig | None:
    """The validated ``out/config.json`` read as ``cls``, or None when the folder holds none
    (nothing started). A run of another kind (a relufication run read as a training run, or the
    reverse) is refused naming the command that continues it."""
    path = Path(out) / "config.json"
    if not path.exists():
        return None
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"{path} is not readable JSON ({type(e).__name__}: {e}); the run folder is damaged "
                         f"and cannot be resumed; {START_OVER}") from None
    other = _other_kind(Path(out), cls)
    if other is not None:
        raise ValueError(other)
    try:
        return cls.from_dict(stored)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path} is not a valid config ({e}); the run folder is damaged and cannot be resumed; "
                         f"{START_OVER}") from None


def _json_norm(v: Any) -> Any:
    """``v`` as it reads back from JSON (tuples become lists, paths strings), for comparisons."""
    return json.loads(json.dumps(v, default=str))


#: the files a run writes (each must be a file or absent) and how the header key is worded in errors
_WRITES = ("config.json", "meta.json", "log.jsonl", "times.jsonl", "summary.json", "covariance.npz")
_WHAT = {"data_info": "data shape", "data_sha256": "data", "kind": "kind of run", "bert_info": "model"}


def check_writable_layout(out: Path) -> None:
    """ValueError when something stands where the run writes: a folder (or device, pipe) in place
    of one of its files, or a file in place of ``checkpoints/``. Nothing is changed."""
    for name in _WRITES:
        p = out / name
        if (p.exists() or p.is_symlink()) and not p.is_file():
            kind = "a folder" if p.is_dir() else "not a regular file"
            raise ValueError(f"{p} is {kind}, where the run writes its {name}; the run folder is damaged "
                             "(move it away, then try again)")
    ck = out / "checkpoints"
    if (ck.exists() or ck.is_symlink()) and not ck.is_dir():
        raise ValueError(f"{ck} is not a folder, where the run keeps its checkpoints; the run folder is damaged "
                         "(move it away, then try again)")


@dataclass
class Resume:
    """What a run folder tells a run before anything is written: where to start and the log to
    keep. ``complete``: the folder holds this very run finished (its last checkpoint is at
    ``steps`` and ``summary.json`` is there, read into ``summary``): nothing is left to do."""

    step: int = 0
    checkpoint: Path | None = None
    model: Any = None
    state: Any = None
    elapsed_s: float = 0.0
    log_lines: list[bytes] = field(default_factory=list)  # kept lines, without their newlines
    records: list[dict[str, Any]] = field(default_factory=list)
    meta: dict[str, Any] | None = None  # the run's meta.json, when readable
    time_lines: list[bytes] = field(default_factory=list)  # kept lines of times.jsonl
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # damaged checkpoints skipped, and why
    kept_as: list[Path] = field(default_factory=list)  # where RunFolder.start moved them (NAME.damaged)
    complete: bool = False
    summary: dict[str, Any] | None = None


def plan_resume(out: Path, cfg: RunConfig, header: dict[str, Any], model_like: Any, state_like: Any, *,
                skip_damaged: bool = False) -> Resume:
    """Read and check everything a resume needs from ``out``; raise ValueError on any mismatch.

    ``cfg`` is any :class:`gradsparse.config.RunConfig` (its class reads the stored config);
    ``header`` is what the run's checkpoints carry besides config, step and loop: every key of it
    must be equal in the checkpoint resumed from (data info and digest of a training run, kind
    and model of a relufication run).

    - no ``config.json``: nothing was started (or the run was killed before writing anything),
      so the run starts from step 0 — unless other run files are there (:data:`RUN_FILES`),
      which means the folder is damaged;
    - ``config.json`` must be resumable as ``cfg`` (:meth:`gradsparse.config.RunConfig.check_resumable`);
    - no checkpoint yet: start from step 0 (the log is dropped);
    - else the latest checkpoint (step c) is read into the skeletons (header SHA-256, shapes,
      dtypes, length and SHA-256 checked), its header must describe the same config (up to
      ``steps``) and ``header``, and the log must hold exactly the lines the checkpoint counted
      (same SHA-256): those with step < c that ``cfg`` logs are kept, any later or partial line
      is dropped (``times.jsonl`` is cut back to the same steps; its damaged lines are dropped).

    A damaged latest checkpoint (:class:`gradsparse.errors.CheckpointDamaged`) is refused
    with a message naming it and the newest intact earlier checkpoint; with ``skip_damaged``
    the resume starts from that one instead (``Resume.skipped`` lists what was skipped and
    why; :meth:`RunFolder.start` keeps those files as ``*.damaged``) and the log is cut back to it.
    Any other mismatch (another config, other data) is refused whatever ``skip_damaged`` says.
    A run whose latest checkpoint is at ``cfg.steps`` and that wrote its ``summary.json`` is
    ``complete``.
    """
    check_bool("skip_damaged", skip_damaged)
    res = Resume()
    stored = stored_config(out, type(cfg))
    if stored is None:
        found = [n for n in run_contents(out) if n != "config.json"]
        if found:
            raise ValueError(f"{out} holds {', '.join(found)} but no config.json; the run folder is damaged and "
                             "cannot be resumed (--overwrite replaces it)")
        return res
    cfg.check_resumable(stored, f"the run in {out} (config.json)")
    meta_path = out / "meta.json"
    if meta_path.exists():
        meta = _read_json_file(meta_path, "the run's metadata")
        res.meta = meta if isinstance(meta, dict) else None
    cks = list_checkpoints(out)
    if not cks:
        return res
    for i in range(len(cks) - 1, -1, -1):
        step, path = cks[i]
        try:
            h, model, state = _read_resumable(path, step, cfg, header, model_like, state_like)
        except CheckpointDamaged as e:
            if not skip_damaged:
                raise ValueError(f"{e}; {_offer(cks[:i], cfg, header, model_like, state_like)}") from None
            res.skipped.append((path, str(e)))
            continue
        break
    else:
        raise ValueError(f"{out}: none of its {len(cks)} checkpoints is intact (latest: {res.skipped[0][1]}); "
                         "the run cannot be resumed (--overwrite starts it over)")
    loop = h.get("loop") if isinstance(h.get("loop"), dict) else {}
    res.step, res.checkpoint, res.model, res.state = step, path, model, state
    elapsed = loop.get("elapsed_s", 0.0)
    res.elapsed_s = float(elapsed) if isinstance(elapsed, (int, float)) and math.isfinite(elapsed) else 0.0
    res.log_lines, res.records = resume_log(out / "log.jsonl", loop, step, cfg)
    res.time_lines = resume_times(out / "times.jsonl", [r["step"] for r in res.records])
    summary = out / "summary.json"
    if step == cfg.steps and not res.skipped and summary.is_file() and stored.steps == cfg.steps:
        done = _read_json_file(summary, "the run's summary")
        if isinstance(done, dict):
            res.complete, res.summary = True, done
    return res


def _read_resumable(path: Path, step: int, cfg: RunConfig, header: dict[str, Any], model_like: Any,
                    state_like: Any) -> tuple[dict[str, Any], Any, Any]:
    """(header, model, state) of checkpoint ``path`` (named ``step``) for resuming ``cfg``.

    CheckpointDamaged when the file is damaged; ValueError when it belongs to another run."""
    h = read_header(path)  # header checks first: they name what differs; the leaves are read last
    if h.get("step") != step:
        raise CheckpointDamaged(f"checkpoint {path} is damaged or renamed: its header says step {h.get('step')!r}, "
                                f"its name says {step}")
    try:
        ck_cfg = type(cfg).from_dict(h.get("config"))
    except (ValueError, TypeError) as e:
        raise ValueError(f"checkpoint {path}: its config is not valid ({e})") from None
    cfg.check_resumable(ck_cfg, f"checkpoint {path}")
    if step > cfg.steps:
        raise ValueError(f"checkpoint {path} is at step {step}, beyond steps {cfg.steps}")
    for key in header:
        if key != "config" and _json_norm(h.get(key)) != _json_norm(header.get(key)):
            what = _WHAT.get(key, key)
            raise ValueError(f"checkpoint {path}: the {what} it was trained with differs from this run's "
                             f"({key} {h.get(key)!r} vs {header.get(key)!r}); resume with the same data and model")
    model, state, _ = read_leaves(path, model_like, state_like)
    return h, model, state


def _offer(earlier: list[tuple[int, Path]], cfg: RunConfig, header: dict[str, Any], model_like: Any,
           state_like: Any) -> str:
    """What to say after a damaged checkpoint: the newest intact one among ``earlier``, if any."""
    for step, path in reversed(earlier):
        try:
            _read_resumable(path, step, cfg, header, model_like, state_like)
        except CheckpointDamaged:
            continue
        except ValueError:
            break
        return (f"the newest intact checkpoint is {path.name} (step {step}): resume with --skip-damaged to "
                f"continue from it (the log is cut back to step {step}; damaged files are kept as *.damaged)")
    return "no earlier checkpoint is intact; --overwrite starts the run over"


def resume_log(path: Path, loop: dict[str, Any], c: int, cfg: Any) -> tuple[list[bytes], list[dict]]:
    """The log lines (and records) a run resumed at step ``c`` keeps; ValueError if the log disagrees.

    ``cfg`` is the run's config: anything with ``steps`` and ``log_every`` (a TrainConfig, or a
    relufication run's DistillConfig), read through :func:`logged`.

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
                             f"after {n}; the log lost lines and the run cannot be resumed faithfully; {START_OVER}")
        digest = hashlib.sha256(b"".join(line + b"\n" for line in complete[:n])).hexdigest()
        if digest != loop.get("log_sha256"):
            raise ValueError(f"{path}: its first {n} lines differ from those written before the checkpoint at step "
                             f"{c}; the log was changed and the run cannot be resumed faithfully; {START_OVER}")
        complete = complete[:n]
    lines, records = [], []
    for i, line in enumerate(complete):
        try:
            rec = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            raise ValueError(f"{path} line {i + 1} is not valid JSON; the log is damaged; {START_OVER}") from None
        s = rec.get("step") if isinstance(rec, dict) else None
        if not isinstance(s, int) or isinstance(s, bool):
            raise ValueError(f"{path} line {i + 1} has no integer 'step'; the log is damaged; {START_OVER}")
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
                         f"the log is damaged and the run cannot be resumed faithfully; {START_OVER}")
    return lines, records


def resume_times(path: Path, steps: list[int]) -> list[bytes]:
    """The lines of ``times.jsonl`` a resumed run keeps: one per kept log step, in order.

    Wall-clock times are not part of what a run reproduces, so this never refuses: a missing,
    unreadable or damaged file keeps what can be matched (complete lines whose ``step`` is the
    next kept log step) and drops the rest."""
    try:
        raw = path.read_bytes() if path.exists() else b""
    except OSError:
        return []
    kept: list[bytes] = []
    want = iter(steps)
    nxt = next(want, None)
    for line in raw.split(b"\n")[:-1]:
        try:
            rec = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            break
        if nxt is None or not isinstance(rec, dict) or rec.get("step") != nxt:
            break
        kept.append(line)
        nxt = next(want, None)
    return kept


# ---------------------------------------------------------------------------- writing a folder
def remove_temp_files(out: Path) -> None:
    """Delete the temp files of atomic writes that a killed process left (``.NAME.XXXX.tmp``)."""
    for folder in (out, out / "checkpoints"):
        if folder.is_dir():
            for p in folder.iterdir():
                if is_temp_file(p) and p.is_file():
                    p.unlink(missing_ok=True)


class _FolderLock:
    """An exclusive ``flock`` held on the run folder's own descriptor (no lock file is written)."""

    def __init__(self, fd: int):
        self.fd: int | None = fd

    def close(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)  # closing the descriptor releases the lock


def lock_run_folder(out: Path):
    """Hold an exclusive lock on the folder ``out`` itself (released when the process ends, even
    when killed); nothing is written into the folder for it.

    Two processes writing one run folder would interleave their logs; the second one gets
    ValueError. Returns the lock (keep it; ``close()`` releases it), or None where locks are
    unsupported.
    """
    if fcntl is None:  # pragma: no cover - not POSIX
        return None
    try:
        fd = os.open(out, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError as e:
        raise with_target(e, out) from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise ValueError(f"run folder {out} is in use by another gradsparse process") from None
        raise with_target(e, out) from e
    return _FolderLock(fd)


class JsonlAppender:
    """Appends whole lines to one file and never leaves a half line behind.

    The file is written through an unbuffered descriptor opened with O_APPEND: each line goes
    out with ``os.write`` calls until all of it is written, so nothing is buffered that a later
    ``flush`` or ``close`` could write (or half-write). If writing a line fails in any way (disk
    full, read-only, an interrupt between two partial writes), the file is cut back to its last
    complete line (``ftruncate`` to the size before the line) before the error propagates;
    :meth:`close` cuts back again if the size on disk is not the size of the complete lines.
    OSErrors name the file.
    """

    def __init__(self, path: Path, kept: list[bytes]):
        self.path = Path(path)
        body = b"".join(line + b"\n" for line in kept)
        atomic_write_bytes(self.path, body)  # also a fresh, empty file
        try:
            self.fd: int | None = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        except OSError as e:
            raise with_target(e, self.path) from e
        self.size = len(body)

    def append(self, line: bytes) -> None:
        """Write ``line`` (which ends in a newline) whole, or leave the file as it was."""
        if self.fd is None:
            raise ValueError(f"{self.path} is closed")
        try:
            view = memoryview(line)
            while view:
                n = os.write(self.fd, view)
                view = view[n:]
        except BaseException as e:
            self._cut_back()
            if isinstance(e, OSError):
                new = with_target(e, self.path)
                if new is not e:
                    raise new from e
            raise
        self.size += len(line)

    def _cut_back(self) -> None:
        """Truncate to the complete lines; best effort (a second failure is reported by close)."""
        try:
            os.ftruncate(self.fd, self.size)
        except (OSError, TypeError):
            try:
                os.truncate(self.path, self.size)
            except OSError:
                pass

    def sync(self) -> None:
        try:
            os.fsync(self.fd)
        except OSError as e:
            raise with_target(e, self.path) from e

    def close(self) -> None:
        """Close the file; if its size is not that of the complete lines (a failed cut-back),
        cut it back first. Never writes."""
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        try:
            if os.fstat(fd).st_size != self.size:
                os.ftruncate(fd, self.size)
        except OSError:
            pass
        finally:
            try:
                os.close(fd)
            except OSError:
                pass


class LogWriter:
    """Appends one JSON line per record to ``log.jsonl`` (and, with ``time``, one
    ``{"step", "time"}`` line to ``times.jsonl``) and keeps the count and SHA-256 of the log
    lines written so far (a checkpoint stores both, so a resume can cut the log back to it).

    Each line is written whole or not at all (:class:`JsonlAppender`): a failed write (disk
    full) or a failure while closing never leaves a half line at the end of either file.
    """

    def __init__(self, path: Path, kept: list[bytes], lock: Any, times_path: Path | None = None,
                 kept_times: list[bytes] | None = None):
        self.path, self.lock = Path(path), lock
        self.hash = hashlib.sha256(b"".join(line + b"\n" for line in kept))
        self.count = len(kept)
        self.log = JsonlAppender(self.path, kept)
        self.times = None
        try:
            if times_path is not None:
                self.times = JsonlAppender(times_path, list(kept_times or []))
        except BaseException:
            self.log.close()
            raise

    def write(self, rec: dict[str, Any], time: float | None = None) -> None:
        """Append ``rec`` to the log; with ``time``, ``{"step": rec["step"], "time": time}`` to times.jsonl."""
        line = (json.dumps(rec) + "\n").encode("utf-8")
        self.log.append(line)
        self.hash.update(line)
        self.count += 1
        if time is not None and self.times is not None:
            self.times.append((json.dumps({"step": rec.get("step"), "time": time}) + "\n").encode("utf-8"))

    def sync(self) -> None:
        """fsync: the lines a checkpoint counts are on disk before it is."""
        self.log.sync()
        if self.times is not None:
            self.times.sync()

    def position(self) -> dict[str, Any]:
        return {"log_lines": self.count, "log_sha256": self.hash.hexdigest()}

    def checkpoint(self, out: Path, step: int, model: Any, state: Any, header: dict[str, Any],
                   elapsed_s: float) -> Path:
        """Sync the log, then write ``out/checkpoints/step_{step}`` holding (model, state) with
        ``header`` plus ``step`` and ``loop`` = {step, elapsed_s, log_lines, log_sha256}: the
        log position a resume cuts back to."""
        self.sync()
        loop = {"step": step, "elapsed_s": round(elapsed_s, 3), **self.position()}
        return save_checkpoint(checkpoint_path(out, step), model, state, {**header, "step": step, "loop": loop})

    def close(self) -> None:
        try:
            self.log.close()
            if self.times is not None:
                self.times.close()
        finally:
            if self.lock is not None:
                self.lock.close()


def _keep_damaged(path: Path) -> Path:
    """Rename a damaged checkpoint to ``NAME.damaged`` (``NAME.damaged.1``, ... if taken): it stays
    for inspection and is no longer listed as a checkpoint."""
    dst = path.with_name(path.name + ".damaged")
    if not path.exists():  # gone since it was read: nothing to keep
        return dst
    i = 1
    while dst.exists():
        dst = path.with_name(f"{path.name}.damaged.{i}")
        i += 1
    os.replace(path, dst)
    return dst


class RunFolder:
    """One run folder, from open to finish: the only writer of a run's files.

    ``RunFolder(out, resume=..., overwrite=..., skip_damaged=...)`` checks the flags only.
    :meth:`open` takes the folder lock, then decides and checks (nothing written):

    - ``resume``: :func:`plan_resume` (config, meta, checkpoint header and leaves, log, times)
      and :func:`check_writable_layout`; a ``complete`` plan means there is nothing to do;
    - a new run without ``overwrite``: the folder must be empty (:func:`check_out`), under the lock,
      so a run that took the folder since this process looked is not replaced;
    - ``overwrite``: a run in the folder is replaced (its checkpoints, summary and covariance file
      go when :meth:`start` writes), other files are kept.

    On ValueError nothing is left behind (a folder that :meth:`open` created is removed again).
    :meth:`start` then writes the run's start (config, meta, the kept log); :meth:`write`,
    :meth:`checkpoint`, :meth:`finish` and :meth:`close` follow. The lock is held until
    :meth:`close`, the summary included.
    """

    def __init__(self, out: str | os.PathLike, *, resume: bool = False, overwrite: bool | None = None,
                 skip_damaged: bool = False):
        check_bool("resume", resume)
        check_bool("skip_damaged", skip_damaged)
        if overwrite is None:
            overwrite = not resume
        check_bool("overwrite", overwrite)
        if resume and overwrite:
            raise ValueError("resume=True and overwrite=True exclude each other: a resume continues the run in the "
                             "folder, overwrite replaces it")
        if skip_damaged and not resume:
            raise ValueError("skip_damaged=True applies to a resume only (resume=True)")
        self.out = Path(out)
        if self.out.exists() and not self.out.is_dir():
            raise ValueError(f"run folder {self.out} exists and is not a folder")
        self.resume, self.overwrite, self.skip_damaged = resume, overwrite, skip_damaged
        self.lock: Any = None
        self.log: LogWriter | None = None
        self.plan: Resume | None = None
        self._start: tuple[RunConfig, dict[str, Any], dict[str, Any]] | None = None

    # ------------------------------------------------------------------ reading
    def stored_config(self, cls: type[RunConfig] = TrainConfig) -> RunConfig | None:
        """The folder's config.json read as ``cls`` (None when there is none): a read before the lock,
        to pick the config of a resume; :meth:`open` checks it again under the lock."""
        return stored_config(self.out, cls)

    def open(self, cfg: RunConfig, header: dict[str, Any], model_like: Any, state_like: Any, *,
             meta: dict[str, Any] | None = None) -> Resume:
        """Lock the folder, then decide and check everything (see the class docstring); nothing is
        written. ``header``: what every checkpoint carries besides config, step and loop; ``meta``:
        what ``meta.json`` records besides versions, seed and git revision. Returns the plan."""
        created = not self.out.exists()
        self.out.mkdir(parents=True, exist_ok=True)
        try:
            self.lock = lock_run_folder(self.out)
            if self.resume:
                plan = plan_resume(self.out, cfg, header, model_like, state_like, skip_damaged=self.skip_damaged)
            else:
                if not self.overwrite:
                    check_out(self.out)
                plan = Resume()
            check_writable_layout(self.out)
        except BaseException:
            self._release(created)
            raise
        if plan.complete:
            self._release(False)
        self.plan, self._start = plan, (cfg, header, dict(meta or {}))
        return plan

    def _release(self, created: bool) -> None:
        """Give the lock back; remove the folder again when :meth:`open` created it and it holds nothing."""
        try:
            if created and not any(True for _ in self.out.iterdir()):
                self.out.rmdir()
        except OSError:
            pass
        finally:
            if self.lock is not None:
                self.lock.close()
                self.lock = None

    # ------------------------------------------------------------------ writing
    def start(self) -> Resume:
        """Write the start of the opened run: a fresh start (no checkpoint to resume) removes the
        checkpoints, summary and covariance file an earlier run left and writes config and meta; a
        resume keeps the checked log lines, renames the damaged checkpoints it skipped to
        ``*.damaged`` and records the resume in ``meta.json``. Returns the plan."""
        if self._start is None or self.plan is None or self.plan.complete:
            raise ValueError("RunFolder.start: open() the folder first (and not for a complete run)")
        cfg, header, extra = self._start
        out, plan = self.out, self.plan
        remove_temp_files(out)
        meta_now = {"versions": versions(), "seed": cfg.seed, "git_revision": git_revision(),
                    "git_dirty": git_dirty(), **extra}
        (out / "summary.json").unlink(missing_ok=True)
        atomic_write_json(out / "config.json", cfg.to_dict())
        if plan.checkpoint is None:  # fresh start (also: resumed before the first checkpoint)
            for _, p in list_checkpoints(out):
                p.unlink(missing_ok=True)
            (out / "covariance.npz").unlink(missing_ok=True)
            atomic_write_json(out / "meta.json", {**meta_now, "started": time.time()})
            self.log = LogWriter(out / "log.jsonl", [], None, out / "times.jsonl", [])
            return plan
        plan.kept_as = [_keep_damaged(p) for p, _ in plan.skipped]
        meta = dict(plan.meta) if plan.meta is not None else dict(meta_now)
        entry = {"from_step": plan.step, "steps": cfg.steps, "time": time.time(), **meta_now}
        if plan.skipped:
            entry["skipped_damaged"] = [{"checkpoint": p.name, "kept_as": k.name, "why": why}
                                        for (p, why), k in zip(plan.skipped, plan.kept_as)]
        meta["resumes"] = list(meta.get("resumes") or []) + [entry]
        atomic_write_json(out / "meta.json", meta)
        self.log = LogWriter(out / "log.jsonl", plan.log_lines, None, out / "times.jsonl", plan.time_lines)
        return plan

    def write(self, rec: dict[str, Any], time: float | None = None) -> None:
        """Append ``rec`` to the log (and its time to times.jsonl)."""
        self.log.write(rec, time=time)

    def checkpoint(self, step: int, model: Any, state: Any, elapsed_s: float) -> Path:
        """``checkpoints/step_{step}`` with the run's header and the log position (:meth:`LogWriter.checkpoint`)."""
        return self.log.checkpoint(self.out, step, model, state, self._start[1], elapsed_s)

    def close_log(self) -> None:
        """Close the log files (cutting back a half-written line); the lock stays held."""
        if self.log is not None:
            self.log.close()

    def finish(self, summary: dict[str, Any]) -> None:
        """Write ``summary.json`` (the run is complete), still under the lock."""
        atomic_write_json(self.out / "summary.json", summary)

    def close(self) -> None:
        """Close the log and give the lock back."""
        try:
            self.close_log()
        finally:
            self._release(False)

    def __enter__(self) -> "RunFolder":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
