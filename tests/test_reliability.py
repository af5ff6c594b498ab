"""Nothing lost, nothing cryptic: what a user (or the machine) can do wrong gives one line and
loses no data.

Classes: (1) nothing is replaced without --overwrite; (2) every OSError is one line naming the
path and the flag, and a log line is never half-written; (3) the memory a config needs is
checked before anything is written, and every numeric flag has a bound; (4) checkpoint
integrity covers the header and --resume can fall back to an intact checkpoint; (5) Ctrl-C
saves a checkpoint and prints the resume command, interrupted and smoke reports say so;
(6) log.jsonl is bit-identical across reruns.

Tests run as root in CI, where chmod does not stop writes, so read-only file systems,
permission errors and full disks are produced by patching the writers
(``gradsparse.io.os`` / ``gradsparse.runfolder.os``) to raise; nothing is mounted.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

import gradsparse.io as gio
import gradsparse.memory as gmem
import gradsparse.runfolder as grf
import gradsparse.train as gtrain
from gradsparse.checkpoint import CheckpointDamaged, list_checkpoints, load_checkpoint, read_header
from gradsparse.cli import build_parser, main
from gradsparse.config import TrainConfig
from gradsparse.data import DataInfo, load_dataset
from gradsparse.factory import build, init_state, make_optimizer
from gradsparse.runfolder import JsonlAppender
from gradsparse.train import TrainingInterrupted, train
from theory_checks import suite
from theory_checks.protocol import PRESETS, Check, Finding
from theory_checks.report import SMOKE_NOTE
from theory_checks.verdicts import effect_verdict

ROOT = Path(__file__).resolve().parents[1]
FLAGS = ["--data", "random_inputs", "--n-train", "128", "--n-test", "32", "--width", "8", "--depth", "2",
         "--batch-size", "8", "--eval-batch", "16", "--steps", "12", "--log-every", "3", "--checkpoint-every", "5",
         "--quiet"]
TINY = dict(data="random_inputs", n_train=128, n_test=32, width=8, depth=2, batch_size=8, eval_batch=16, steps=12,
            log_every=3, checkpoint_every=5)


def files_under(root: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in Path(root).rglob("*") if p.is_file()}


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def assert_same_state(a: Path, b: Path) -> None:
    ma, oa, ha = load_checkpoint(a)
    mb, ob, hb = load_checkpoint(b)
    assert ha["step"] == hb["step"]
    for x, y in zip(jax.tree_util.tree_leaves((ma, oa)), jax.tree_util.tree_leaves((mb, ob)), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def ref(tmp_path_factory) -> Path:
    """A finished tiny run (12 steps, log every 3, checkpoints at 5, 10, 12), through the CLI."""
    out = tmp_path_factory.mktemp("ref") / "run"
    assert main(["train", *FLAGS, "--out", str(out)]) == 0
    return out


class OsProxy:
    """``os`` with some functions replaced: patched into one gradsparse module at a time."""

    def __init__(self, **over):
        self._over = over

    def __getattr__(self, name):
        return self._over[name] if name in self._over else getattr(os, name)


# ================================================================= 1. nothing replaced without --overwrite
def test_finetune_refuses_its_own_source_and_folders_holding_a_run(tmp_path, capsys, ref):
    run = tmp_path / "run"
    shutil.copytree(ref, run)
    (run / "log.jsonl").unlink()  # the case that used to delete the parent's checkpoints
    before = files_under(run)
    base = ["finetune", str(run), "--modules", "jsrelu", "--steps", "2", "--quiet"]
    for extra, needle in ((["--out", str(run)], "is the run folder"),
                          (["--out", str(run), "--overwrite"], "is the run folder"),
                          (["--out", str(run / "sub")], "lies inside the run folder"),
                          (["--out", str(run / "checkpoints" / "x")], "lies inside the run folder")):
        assert main([*base, *extra]) == 2
        assert needle in one_line(capsys)
    ck = list_checkpoints(run)[-1][1]  # the checkpoint file itself, with --out its run folder
    assert main(["finetune", str(ck), "--modules", "jsrelu", "--steps", "2", "--out", str(run), "--overwrite"]) == 2
    assert "is the run folder" in one_line(capsys)
    assert files_under(run) == before
    # a folder holding only checkpoints/ (or only a summary) is a run: refused, kept
    only = tmp_path / "only"
    (only / "checkpoints").mkdir(parents=True)
    shutil.copy(ck, only / "checkpoints" / ck.name)
    (tmp_path / "summ").mkdir()
    (tmp_path / "summ" / "summary.json").write_text("{}")
    for folder, holds in ((only, "checkpoints/"), (tmp_path / "summ", "summary.json")):
        snap = files_under(folder)
        for cmd in (["finetune", str(ref), "--modules", "jsrelu", "--steps", "2", "--out", str(folder), "--quiet"],
                    ["train", *FLAGS, "--out", str(folder)]):
            assert main(cmd) == 2
            err = one_line(capsys)
            assert "already holds a run" in err and holds in err and "--overwrite" in err
        assert files_under(folder) == snap


def test_resume_without_config_but_with_run_files_is_refused(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "summary.json").write_text('{"steps": 3}')
    assert main(["train", *FLAGS, "--out", str(tmp_path / "run"), "--resume"]) == 2
    assert "holds summary.json but no config.json" in one_line(capsys)
    assert (tmp_path / "run" / "summary.json").read_text() == '{"steps": 3}'


def _check(name: str, value: float = 0.3, interrupt: bool = False) -> Check:
    def run(ctx, params):
        if interrupt:
            raise KeyboardInterrupt
        return Finding(effect_verdict([value, value, value], 0.1), f"measured {value}", per_seed={"e": [value] * 3})
    return Check(name=name, slug=f"g{name[1:]}_fake", title=f"fake {name}", claim="a fake claim", rule="a fake rule",
                 presets={p: {} for p in PRESETS}, run=run)


def test_check_merges_into_an_existing_report_and_refuses_another_preset(tmp_path, capsys, monkeypatch):
    out = tmp_path / "rep"
    checks = {"G91": _check("G91", 0.3), "G92": _check("G92", 0.2), "G93": _check("G93", 0.4)}
    chosen = []
    monkeypatch.setattr(suite, "get_checks", lambda names=None: [checks[n] for n in chosen])
    chosen[:] = ["G91", "G92", "G93"]
    assert main(["check", "--preset", "quick", "--out", str(out), "--quiet"]) == 0
    capsys.readouterr()
    checks["G92"] = _check("G92", -0.5)  # re-run G92 with another outcome
    chosen[:] = ["G92"]
    assert main(["check", "--preset", "quick", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "keeping G91, G93; re-running and replacing G92" in printed and "the report holds 3 checks" in printed
    data = json.loads((out / "report.json").read_text())
    assert [r["name"] for r in data["results"]] == ["G91", "G92", "G93"]
    assert [r["measured"] for r in data["results"]] == ["measured 0.3", "measured -0.5", "measured 0.4"]
    assert data["replaced"] == ["G92"] and data["kept"] == ["G91", "G93"]
    md = (out / "report.md").read_text()
    assert "re-run and replaced G92; kept from earlier runs G91 (started" in md and "G93 (started" in md
    # another preset or seeds: refused, the report is kept as it was
    before = files_under(out)
    for argv in (["--preset", "smoke"], ["--preset", "quick", "--seeds", "4"]):
        assert main(["check", *argv, "--out", str(out), "--quiet"]) == 2
        err = one_line(capsys)
        assert "results are merged only at equal preset and seeds" in err and "--overwrite" in err
    (out / "report.json").write_text("{")  # unreadable: refused too
    assert main(["check", "--preset", "quick", "--out", str(out), "--quiet"]) == 2
    assert "not readable JSON" in one_line(capsys)
    (out / "report.json").write_bytes(before[out / "report.json"])
    assert files_under(out) == before
    # --overwrite starts a new report; the old report's own files go
    assert main(["check", "--preset", "smoke", "--out", str(out), "--quiet", "--overwrite"]) == 0
    data = json.loads((out / "report.json").read_text())
    assert [r["name"] for r in data["results"]] == ["G92"] and "kept" not in data


# ================================================================= 2. OSErrors: one line, path and flag
@pytest.mark.parametrize("code,word", [(errno.EROFS, "Read-only file system"), (errno.EACCES, "Permission denied"),
                                       (errno.ENOSPC, "No space left on device")])
def test_atomic_write_failures_name_the_path_and_the_flag(tmp_path, capsys, monkeypatch, code, word):
    def replace(src, dst):
        if str(dst).startswith(str(tmp_path)):
            raise OSError(code, os.strerror(code), src, None, dst)
        return os.replace(src, dst)

    monkeypatch.setattr(gio, "os", OsProxy(replace=replace))
    out = tmp_path / "run"
    assert main(["train", *FLAGS, "--out", str(out)]) == 2
    err = one_line(capsys)
    assert err.startswith(f"gradsparse train: error: --out {out}: {out / 'config.json'}: {word}; "), err
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]  # no temp file left
    assert not (out / "config.json").exists()
    # the report of a check, and a figure of the spectrum command: the same, with their flags
    monkeypatch.setattr(suite, "get_checks", lambda names=None: [_check("G91")])
    assert main(["check", "--preset", "smoke", "--out", str(tmp_path / "rep"), "--quiet"]) == 2
    err = one_line(capsys)
    assert err.startswith(f"gradsparse check: error: --out {tmp_path / 'rep'}: ") and word in err, err


def test_failed_checkpoint_write_mid_run_then_resume(tmp_path, capsys, monkeypatch, ref):
    def replace(src, dst):
        if "checkpoints" in str(dst) and str(dst).startswith(str(tmp_path)):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as a failed write(2): no file name
        return os.replace(src, dst)

    monkeypatch.setattr(gio, "os", OsProxy(replace=replace))
    out = tmp_path / "run"
    assert main(["train", *FLAGS, "--out", str(out)]) == 2
    err = one_line(capsys)
    assert f"--out {out}: {out / 'checkpoints' / 'step_00000005.eqx'}: No space left on device" in err
    assert "continues with --resume" in err
    assert list_checkpoints(out) == [] and not list(out.rglob("*.tmp"))
    monkeypatch.undo()
    assert main(["train", *FLAGS, "--out", str(out), "--resume"]) == 0
    assert (out / "log.jsonl").read_bytes() == (ref / "log.jsonl").read_bytes()
    assert_same_state(out, ref)


def test_paths_that_cannot_hold_a_run(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    assert main(["train", *FLAGS, "--out", str(tmp_path / "afile" / "run")]) == 2
    err = one_line(capsys)
    assert f"--out {tmp_path / 'afile' / 'run'}" in err and "Not a directory" in err
    with pytest.raises(SystemExit) as e:  # '' would silently mean the current folder
        main(["train", *FLAGS, "--out", ""])
    assert e.value.code == 2 and "argument --out: must be a file or folder path" in one_line(capsys)
    if Path("/proc/self").is_dir():
        assert main(["train", *FLAGS, "--out", "/proc/gradsparse-run"]) == 2
        err = one_line(capsys)
        assert "--out /proc/gradsparse-run" in err and "/proc is a pseudo-filesystem" in err


def test_a_log_line_is_never_half_written(tmp_path, monkeypatch):
    path = tmp_path / "log.jsonl"
    log = JsonlAppender(path, [b'{"step": 0}'])
    log.append(b'{"step": 1}\n')
    calls = {"ftruncate": 0}

    def half_write(fd, data):  # the disk fills after half the line
        os.write(fd, bytes(data[:len(data) // 2]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def ftruncate(fd, size):  # the first cut-back fails too
        calls["ftruncate"] += 1
        if calls["ftruncate"] == 1:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return os.ftruncate(fd, size)

    def truncate(p, size):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    def close(fd):  # and closing fails as well
        os.close(fd)
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(grf, "os", OsProxy(write=half_write, ftruncate=ftruncate, truncate=truncate, close=close))
    with pytest.raises(OSError) as e:
        log.append(b'{"step": 2, "loss": 0.5}\n')
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(path)
    log.close()  # cuts back what the failed cut-back left, then closes; raises nothing
    assert path.read_bytes() == b'{"step": 0}\n{"step": 1}\n'
    assert calls["ftruncate"] == 2
    # a plain half write with a working truncate: cut back at once
    monkeypatch.setattr(grf, "os", OsProxy(write=half_write))
    log = JsonlAppender(path, [b'{"step": 0}'])
    with pytest.raises(OSError):
        log.append(b'{"step": 1, "x": [1, 2, 3]}\n')
    assert path.read_bytes() == b'{"step": 0}\n'
    log.close()


def test_disk_full_during_a_run_leaves_a_valid_log_and_resumes(tmp_path, capsys, monkeypatch, ref):
    def write(fd, data):
        if bytes(data[:12]) == b'{"step": 9, ':
            os.write(fd, bytes(data[:40]))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return os.write(fd, data)

    monkeypatch.setattr(grf, "os", OsProxy(write=write))
    out = tmp_path / "run"
    assert main(["train", *FLAGS, "--out", str(out)]) == 2
    assert f"--out {out}: {out / 'log.jsonl'}: No space left on device" in one_line(capsys)
    raw = (out / "log.jsonl").read_bytes()
    assert raw.endswith(b"\n") and [json.loads(x)["step"] for x in raw.splitlines()] == [0, 3, 6]
    monkeypatch.undo()
    assert main(["train", *FLAGS, "--out", str(out), "--resume"]) == 0
    assert (out / "log.jsonl").read_bytes() == (ref / "log.jsonl").read_bytes()
    assert [json.loads(x)["step"] for x in (out / "times.jsonl").read_text().splitlines()] == [0, 3, 6, 9, 11]


# ================================================================= 3. memory and bounds
def test_memory_estimate_closed_forms():
    info = DataInfo("vector", (40,), 10)
    cfg = TrainConfig(width=16, depth=2, mlp_ratio=4, batch_size=256, eval_batch=8, optimizer="adam")
    built = build(cfg, info, jax.random.key(0))
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(built.model) if hasattr(x, "size"))
    n_state = sum(x.size for x in jax.tree_util.tree_leaves(init_state(cfg, built, make_optimizer(cfg))))
    est = gmem.estimate(cfg, info)
    assert est.parameters == 4 * n_params and est.gradients == 4 * n_params  # every parameter trains
    assert est.optimizer_state == 4 * n_state and n_state == 2 * n_params + 2  # Adam's mu, nu, its and the lr's count
    d, n, b = 16, 64, 256
    assert est.peak_phase == "training batch" and est.attention == 0
    assert est.probes == 2 * 4 * b * 2 * (n + d)
    assert est.activations == 4 * b * 2 * (4 * n + 4 * d) + 4 * b * (40 + 10) + est.probes
    assert est.total == 2 * (est.parameters + est.optimizer_state) + est.gradients + est.activations
    # the LM's attention term: 2 arrays of B x heads x T x T per block
    lm = TrainConfig(model="lm", data="text", width=16, heads=2, depth=3, seq_len=32, batch_size=512, eval_batch=8)
    e = gmem.estimate(lm, DataInfo("text", (), 256))
    assert e.peak_phase == "training batch" and e.attention == 2 * 3 * 512 * 2 * 32 * 32 * 4
    assert gmem.estimate(lm, DataInfo("text", (), 256), devices=4).attention == e.attention // 4
    with pytest.raises(ValueError, match="devices"):
        gmem.estimate(lm, DataInfo("text", (), 256), devices=0)
    with pytest.raises(ValueError) as err:
        gmem.check_fits(cfg, info, memory=(1000, "a test machine"))
    assert f"needs {est.describe()}, more than the 1000 B of a test machine" in str(err.value)
    total, what = gmem.available_memory()
    if jax.devices()[0].platform == "cpu":
        assert total <= os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") and "memory" in what


def test_configs_that_cannot_fit_are_refused_before_anything_is_written(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(gmem, "available_memory", lambda: (16 * 2**30, "this machine's memory (os.sysconf)"))
    for argv in (["--model", "lm", "--seq-len", "65536"], ["--width", "16384", "--mlp-ratio", "1", "--depth", "4"]):
        out = tmp_path / "run"
        assert main(["train", *argv, "--out", str(out), "--quiet"]) == 2
        err = one_line(capsys)
        assert "memory: this config needs about" in err and "16.0 GiB of this machine's memory (os.sysconf)" in err
        assert ("attention B*heads*T*T" in err) == ("lm" in argv)
        assert not out.exists()


def _numeric_flags() -> list[tuple[str, str, type]]:
    sub = build_parser()._subparsers._group_actions[0]  # argparse keeps its subcommands there
    out = []
    for name, p in sub.choices.items():
        if name == "spectrum":  # bounded by its own module (see the closing note of this change)
            continue
        for a in p._actions:
            if a.type in (int, float) and a.option_strings:
                out.append((name, max(a.option_strings, key=len), a.type))
    return out


@pytest.mark.parametrize("cmd,flag,kind", _numeric_flags(), ids=lambda v: str(getattr(v, "__name__", v)))
def test_every_numeric_flag_has_a_bound(tmp_path, capsys, cmd, flag, kind):
    out = tmp_path / "out"
    base = {"train": ["train", "--out", str(out), "--quiet"],
            "finetune": ["finetune", str(tmp_path / "none"), "--modules", "jsrelu", "--steps", "2", "--out", str(out)],
            "relufy": ["relufy", str(tmp_path / "none"), "--steps", "2", "--out", str(out)],
            "check": ["check", "--out", str(out), "--quiet"], "figures": ["figures", "--work", str(out)],
            "bench": ["bench", "--out", str(out / "b.md")], "measure": ["measure", str(tmp_path / "none")]}[cmd]
    value = "100000000000000" if kind is int else "inf"
    assert main([*base, flag, value]) == 2
    err = one_line(capsys)
    assert flag.lstrip("-").replace("-", "_") in err.replace("-", "_"), err
    assert not out.exists()


# ================================================================= 4. checkpoint integrity
def test_header_edits_and_flipped_bytes_are_named_damaged(tmp_path, ref):
    ck = list_checkpoints(ref)[0][1]
    raw = ck.read_bytes()
    cut = raw.index(b"\n")
    edited = tmp_path / "edited.eqx"
    edited.write_bytes(raw.replace(b'"lr": 0.001', b'"lr": 0.5', 1))
    with pytest.raises(CheckpointDamaged, match=re.escape(f"checkpoint {edited} is damaged: its header differs")):
        load_checkpoint(edited)
    flipped = tmp_path / "flipped.eqx"
    for i in range(cut + 1):  # every byte of the header line, and its newline
        b = bytearray(raw if i == cut else raw[:cut + 1])  # the header alone is read
        b[i] ^= 0x01
        flipped.write_bytes(bytes(b))
        with pytest.raises(CheckpointDamaged) as e:
            read_header(flipped)
        assert str(flipped) in str(e.value) and "damaged" in str(e.value), (i, str(e.value))
    # a checkpoint written before header_sha256 existed still loads
    legacy = tmp_path / "legacy.eqx"
    head = raw[:cut]
    legacy.write_bytes(head[:head.rindex(b', "header_sha256"')] + b"}" + raw[cut:])
    m1, o1, h1 = load_checkpoint(legacy)
    m2, o2, h2 = load_checkpoint(ck)
    assert {k: v for k, v in h2.items() if k != "header_sha256"} == h1
    for x, y in zip(jax.tree_util.tree_leaves((m1, o1)), jax.tree_util.tree_leaves((m2, o2)), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_resume_offers_and_then_uses_the_newest_intact_checkpoint(tmp_path, capsys, ref):
    run = tmp_path / "run"
    shutil.copytree(ref, run)
    for _, p in list_checkpoints(run)[1:]:  # damage step 10 and step 12 (the payload's last bytes)
        b = bytearray(p.read_bytes())
        b[-3] ^= 0xFF
        p.write_bytes(bytes(b))
    before = files_under(run)
    assert main(["train", "--out", str(run), "--resume", "--quiet"]) == 2
    err = one_line(capsys)
    assert f"checkpoint {run / 'checkpoints' / 'step_00000012.eqx'} is damaged" in err
    assert "the newest intact checkpoint is step_00000005.eqx (step 5): resume with --skip-damaged" in err
    assert files_under(run) == before
    assert main(["train", "--out", str(run), "--resume", "--skip-damaged", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "skipped step_00000012.eqx: checkpoint" in err and "skipped step_00000010.eqx" in err
    assert (run / "checkpoints" / "step_00000012.eqx.damaged").read_bytes() == \
        before[run / "checkpoints" / "step_00000012.eqx"]
    assert (run / "log.jsonl").read_bytes() == (ref / "log.jsonl").read_bytes()
    assert_same_state(run, ref)
    meta = json.loads((run / "meta.json").read_text())
    assert [s["checkpoint"] for s in meta["resumes"][-1]["skipped_damaged"]] == ["step_00000012.eqx",
                                                                               "step_00000010.eqx"]


# ================================================================= 5. interrupts, smoke and finetune labels
def test_interrupt_saves_a_checkpoint_and_resumes_to_the_same_run(tmp_path, ref):
    ds = load_dataset("random_inputs", seed=0, n_train=128, n_test=32)

    def stop(rec):
        if rec["step"] == 9:
            raise KeyboardInterrupt

    run = tmp_path / "run"
    with pytest.raises(TrainingInterrupted) as e:
        train(TrainConfig(**TINY), run, dataset=ds, progress=False, on_log=stop)
    assert e.value.step == 9 and e.value.saved and e.value.checkpoint == run / "checkpoints" / "step_00000009.eqx"
    assert [s for s, _ in list_checkpoints(run)] == [5, 9]
    train(TrainConfig(**TINY), run, dataset=ds, progress=False, resume=True)
    assert (run / "log.jsonl").read_bytes() == (ref / "log.jsonl").read_bytes()
    assert_same_state(run, ref)


def test_cli_interrupt_prints_the_exact_resume_command(tmp_path, capsys, monkeypatch, ref):
    calls = {"n": 0}
    real = gtrain.summarize

    def summarize(*a, **k):  # ^C while step 6's held-out monitors are summarised (after update 6 was computed)
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(gtrain, "summarize", summarize)
    out = tmp_path / "run"
    argv = ["train", *FLAGS, "--out", str(out)]
    assert main(argv) == 130
    err = one_line(capsys)
    ck = out / "checkpoints" / "step_00000006.eqx"
    assert f"interrupted at step 6 of 12; checkpoint {ck} holds step 6; continue with: " in err
    command = err.split("continue with: ", 1)[1]
    assert command == "gradsparse " + shlex.join([*argv[:], "--resume"])
    monkeypatch.undo()
    assert main(shlex.split(command)[1:]) == 0
    assert (out / "log.jsonl").read_bytes() == (ref / "log.jsonl").read_bytes()
    assert_same_state(out, ref)


def test_real_sigint_saves_a_checkpoint(tmp_path):
    run = tmp_path / "run"
    flags = [f if f != "12" else "1000000" for f in FLAGS]  # far more steps than it gets to run
    flags[flags.index("--checkpoint-every") + 1] = "100"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    # the child installs Python's ^C handler itself: a suite started in the background of a
    # non-interactive shell passes SIGINT on ignored, and Python then installs none (no
    # preexec_fn: forking a process that has started JAX's threads can deadlock)
    start = ("import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
             "sys.argv = ['gradsparse', *sys.argv[1:]]; runpy.run_module('gradsparse.cli', run_name='__main__')")
    proc = subprocess.Popen([sys.executable, "-c", start, "train", *flags, "--out", str(run)], cwd=tmp_path,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        t0 = time.time()
        while not list_checkpoints(run):
            assert proc.poll() is None and time.time() - t0 < 120, proc.stderr.read() if proc.poll() is not None else ""
            time.sleep(0.01)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:  # never leave a million-step run behind
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err
    line = err.strip().splitlines()[-1]
    assert "interrupted at step " in line and "--resume" in line.split("continue with: ")[1], line
    step = int(line.split("interrupted at step ")[1].split()[0])
    assert step >= 100 and f"checkpoint {run / 'checkpoints' / f'step_{step:08d}.eqx'} holds step {step}" in line
    _, _, header = load_checkpoint(run / "checkpoints" / f"step_{step:08d}.eqx")  # the state after update `step`
    assert header["step"] == step
    recs = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    assert all(r["step"] % 3 == 0 for r in recs)  # whole lines only


def test_a_sigint_stops_the_loop_at_the_next_step_and_is_never_lost(tmp_path, ref):
    """A real SIGINT during a run is taken at the next entry of the step plan (a KeyboardInterrupt
    raised where the signal lands could be swallowed, e.g. inside a garbage-collector callback)."""
    # Python's own handler, as in an interactive run (a shell starts background jobs with SIGINT ignored)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _sigint_run(tmp_path, ref)
    finally:
        signal.signal(signal.SIGINT, previous)


def _sigint_run(tmp_path, ref):
    def sigint_at_3(rec):
        if rec["step"] == 3:
            os.kill(os.getpid(), signal.SIGINT)  # handled by the loop: nothing raised here

    run = tmp_path / "run"
    with pytest.raises(TrainingInterrupted) as e:
        train(TrainConfig(**TINY), run, progress=False, on_log=sigint_at_3)
    assert e.value.step == 4 and e.value.saved  # log step 3 finished, then the loop stopped
    assert [s for s, _ in list_checkpoints(run)] == [4]
    train(TrainConfig(**TINY), run, progress=False, resume=True)
    assert (run / "log.jsonl").read_bytes() == (ref / "log.jsonl").read_bytes()


def test_interrupted_and_smoke_reports_say_so(tmp_path, capsys, monkeypatch):
    checks = [_check("G91"), _check("G92", interrupt=True), _check("G93")]
    monkeypatch.setattr(suite, "get_checks", lambda names=None: checks)
    out = tmp_path / "rep"
    assert main(["check", "--preset", "smoke", "--out", str(out), "--quiet"]) == 130
    err = one_line(capsys)
    assert f"interrupted; {out / 'report.md'} says so and lists the 2 check(s) that did not run: G92, G93" in err
    md = (out / "report.md").read_text()
    assert "**INTERRUPTED**: 1 of 3 requested check(s) finished (G91); did not run: G92, G93." in md
    data = json.loads((out / "report.json").read_text())
    assert data["interrupted"] is True and data["not_run"] == ["G92", "G93"] and data["note"] == SMOKE_NOTE
    head = md.split("| Claim |")[0]
    assert SMOKE_NOTE in head
    verdict_lines = [x for x in md.splitlines() if x.startswith("| G9") or x.startswith("- Verdict:")]
    assert len(verdict_lines) == 2 and all(SMOKE_NOTE in x for x in verdict_lines)
    # a quick report carries no smoke label
    monkeypatch.setattr(suite, "get_checks", lambda names=None: [_check("G91")])
    assert main(["check", "--preset", "quick", "--out", str(tmp_path / "q"), "--quiet"]) == 0
    assert SMOKE_NOTE not in (tmp_path / "q" / "report.md").read_text()


def test_train_resume_on_a_finetune_folder_names_the_right_command(tmp_path, capsys, ref):
    ft = tmp_path / "ft"  # a finetuning run folder: its config records the surgery (a non-null `surgery`)
    shutil.copytree(ref, ft)
    cfg = json.loads((ft / "config.json").read_text())
    (ft / "config.json").write_text(json.dumps({**cfg, "surgery": {"modules": ["jsrelu"]}, "parent": str(ref)}))
    before = files_under(ft)
    assert main(["train", "--out", str(ft), "--resume", "--quiet"]) == 2
    err = one_line(capsys)
    assert "holds a finetuning run" in err and "use gradsparse finetune --resume" in err
    with pytest.raises(ValueError, match="use gradsparse finetune --resume"):  # the library says the same
        train(TrainConfig.from_dict(json.loads((ft / "config.json").read_text())), ft, resume=True, progress=False)
    run = tmp_path / "scratch"
    shutil.copytree(ref, run)
    snap = files_under(run)
    assert main(["finetune", str(ref), "--modules", "jsrelu", "--steps", "2", "--out", str(run), "--resume"]) == 2
    err = one_line(capsys)
    assert "holds a run trained from scratch" in err and "continue it with gradsparse train" in err
    assert files_under(ft) == before and files_under(run) == snap


# ================================================================= 6. determinism
def test_log_jsonl_is_bit_identical_across_reruns(tmp_path, ref):
    out = tmp_path / "again"
    assert main(["train", *FLAGS, "--out", str(out)]) == 0
    assert (out / "log.jsonl").read_bytes() == (ref / "log.jsonl").read_bytes()
    assert all("time" not in json.loads(x) for x in (out / "log.jsonl").read_text().splitlines())
    for (_, a), (_, b) in zip(list_checkpoints(out), list_checkpoints(ref), strict=True):
        ha, hb = read_header(a), read_header(b)
        assert ha["loop"]["log_sha256"] == hb["loop"]["log_sha256"] and ha["payload_sha256"] == hb["payload_sha256"]
    times = [json.loads(x) for x in (out / "times.jsonl").read_text().splitlines()]
    assert [t["step"] for t in times] == [0, 3, 6, 9, 11] and all(t["time"] >= 0 for t in times)
    assert [t["time"] for t in times] == sorted(t["time"] for t in times)
