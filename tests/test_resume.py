"""Crash and resume: a run killed at any moment continues from its last checkpoint and ends with
exactly the parameters and log lines of an uninterrupted run; same seed, same numbers."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from gradsparse.checkpoint import list_checkpoints, load_checkpoint, read_header
from gradsparse.cli import main
from gradsparse.config import TrainConfig
from gradsparse.data import load_dataset
from gradsparse.runfolder import git_revision
from gradsparse.train import train

ROOT = Path(__file__).resolve().parents[1]
# small enough for 2 cores; log every 3 steps, checkpoint every 5 (log and checkpoint grids differ)
TINY = dict(data="random_inputs", n_train=128, n_test=32, width=8, depth=2, batch_size=8, steps=24, log_every=3,
            checkpoint_every=5, eval_batch=16)


@pytest.fixture(scope="module")
def ds():
    return load_dataset("random_inputs", seed=0, n_train=128, n_test=32)


PLUGINS = dict(TINY, optimizer="sgd", lr=0.05, momentum=0.9, schedule="cosine", warmup=4, weight_noise="synapse",
               rho=0.05, zeroth_bias=True, restricted_ln=True, flatness_every=6, flatness_probes=2, grad_clip=1.0)


@pytest.fixture(scope="module")
def refs(tmp_path_factory, ds):
    """Uninterrupted reference runs: {'plain': (folder, RunResult), 'plugins': (folder, RunResult)}."""
    root = tmp_path_factory.mktemp("refs")
    return {name: (root / name, train(TrainConfig(**fields), root / name, dataset=ds, progress=False))
            for name, fields in (("plain", TINY), ("plugins", PLUGINS))}


class Crash(Exception):
    pass


def crash_at(step):
    def on_log(rec):
        if rec["step"] == step:
            raise Crash(step)
    return on_log


def log_without_time(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "time"}
            for line in (run / "log.jsonl").read_text().splitlines()]


def assert_same_state(a: Path, b: Path) -> None:
    """The final checkpoints hold bit-identical model and optimizer leaves, and the same step."""
    ma, oa, ha = load_checkpoint(a)
    mb, ob, hb = load_checkpoint(b)
    assert ha["step"] == hb["step"]
    la, lb = jax.tree_util.tree_leaves((ma, oa)), jax.tree_util.tree_leaves((mb, ob))
    assert len(la) == len(lb) > 0
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def no_temp_files(run: Path) -> bool:
    return not [p for p in run.rglob("*") if p.name.endswith(".tmp")]


# --------------------------------------------------------------------------- in-process crashes
@pytest.mark.parametrize("name", ["plain", "plugins"])
def test_crash_then_resume_equals_uninterrupted(tmp_path, ds, refs, name):
    """Plain, and with sgd+momentum, cosine warm-up, synapse noise, zeroth bias, restricted LN,
    clipping and Hutchinson flatness: the resumed run ends bit-identical to the reference."""
    cfg = TrainConfig(**(TINY if name == "plain" else PLUGINS))
    ref_dir, ref = refs[name]
    run = tmp_path / "run"
    with pytest.raises(Crash):
        train(cfg, run, dataset=ds, progress=False, on_log=crash_at(12))
    assert [s for s, _ in list_checkpoints(run)] == [5, 10]
    with open(run / "log.jsonl", "a") as f:  # a crash in the middle of a log line
        f.write('{"step": 15, "loss": 0.12')
    (run / "checkpoints" / ".step_00000015.eqx.abc123.tmp").write_bytes(b"half a checkpoint")
    res = train(cfg, run, dataset=ds, progress=False, resume=True)
    assert log_without_time(run) == log_without_time(ref_dir)
    assert [r["step"] for r in log_without_time(run)] == [0, 3, 6, 9, 12, 15, 18, 21, 23]
    assert_same_state(run, ref_dir)
    assert [{k: v for k, v in r.items() if k != "time"} for r in res.history] == \
        [{k: v for k, v in r.items() if k != "time"} for r in ref.history]
    assert res.final["test_loss"] == ref.final["test_loss"]
    assert res.final["density_start"] == ref.final["density_start"]
    assert no_temp_files(run)
    meta = json.loads((run / "meta.json").read_text())
    assert [r["from_step"] for r in meta["resumes"]] == [10]
    times = [json.loads(line)["time"] for line in (run / "times.jsonl").read_text().splitlines()]
    assert times == sorted(times)  # elapsed time continues across the crash (kept in times.jsonl, not the log)


def test_crash_then_resume_with_covariance_tracking(tmp_path, ds):
    """The covariance accumulators are checkpointed with the optimizer state: a run with
    track_covariance resumes to the log, parameters and covariance.npz of an uninterrupted run."""
    cfg = TrainConfig(**TINY, optimizer="sgd", lr=0.1, weight_decay=0.01, track_covariance=True)
    ref = tmp_path / "ref"
    train(cfg, ref, dataset=ds, progress=False)
    run = tmp_path / "run"
    with pytest.raises(Crash):
        train(cfg, run, dataset=ds, progress=False, on_log=crash_at(12))
    train(cfg, run, dataset=ds, progress=False, resume=True)
    assert log_without_time(run) == log_without_time(ref)
    assert "cov/x_participation_ratio" in log_without_time(run)[-1]
    assert_same_state(run, ref)
    a, b = np.load(run / "covariance.npz"), np.load(ref / "covariance.npz")
    assert sorted(a.files) == sorted(b.files) and len(a.files) == 2 * cfg.depth + 1
    for k in a.files:
        np.testing.assert_array_equal(a[k], b[k])


def test_killed_before_first_checkpoint_starts_over(tmp_path, ds, refs):
    cfg = TrainConfig(**TINY)
    ref_dir = refs["plain"][0]
    run = tmp_path / "run"
    with pytest.raises(Crash):
        train(cfg, run, dataset=ds, progress=False, on_log=crash_at(3))
    assert list_checkpoints(run) == [] and (run / "config.json").exists()
    with open(run / "log.jsonl", "a") as f:
        f.write('{"step": 6, "lo')
    train(cfg, run, dataset=ds, progress=False, resume=True)
    assert log_without_time(run) == log_without_time(ref_dir)
    assert_same_state(run, ref_dir)
    # killed before anything was written: an empty folder starts the run (a missing one: see the CLI test)
    (tmp_path / "empty").mkdir()
    train(cfg, tmp_path / "empty", dataset=ds, progress=False, resume=True)
    assert log_without_time(tmp_path / "empty") == log_without_time(ref_dir)


def test_resume_of_a_finished_run_changes_nothing(tmp_path, ds, refs):
    run = tmp_path / "run"
    shutil.copytree(refs["plain"][0], run)
    before = (run / "log.jsonl").read_bytes()
    res = train(TrainConfig(**TINY), run, dataset=ds, progress=False, resume=True)
    assert (run / "log.jsonl").read_bytes() == before
    assert res.history and res.history[-1]["step"] == 23
    assert json.loads((run / "summary.json").read_text())["steps"] == 24
    assert_same_state(run, refs["plain"][0])


def test_extending_steps_equals_the_longer_run(tmp_path, ds, refs):
    long_ = TrainConfig(**{**TINY, "steps": 40})
    train(long_, tmp_path / "ref", dataset=ds, progress=False)
    shutil.copytree(refs["plain"][0], tmp_path / "run")  # the finished 24-step run
    assert log_without_time(tmp_path / "run")[-1]["step"] == 23  # it logged its last step
    train(long_, tmp_path / "run", dataset=ds, progress=False, resume=True)
    # step 23 is not on the 3-step grid of the longer run: its line is gone
    assert log_without_time(tmp_path / "run") == log_without_time(tmp_path / "ref")
    assert_same_state(tmp_path / "run", tmp_path / "ref")
    assert json.loads((tmp_path / "run" / "config.json").read_text())["steps"] == 40


def test_resume_refuses_what_would_not_reproduce(tmp_path, ds):
    cfg = TrainConfig(**TINY)
    run = tmp_path / "run"
    with pytest.raises(Crash):
        train(cfg, run, dataset=ds, progress=False, on_log=crash_at(12))
    snapshot = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match="width: 16 differs from 8"):
        train(cfg.replace(width=16), run, dataset=ds, progress=False, resume=True)
    with pytest.raises(ValueError, match="steps: 20 is fewer than the 24"):
        train(cfg.replace(steps=20), run, dataset=ds, progress=False, resume=True)
    other = load_dataset("random_inputs", seed=1, n_train=128, n_test=32)
    with pytest.raises(ValueError, match="data it was trained with differs"):
        train(cfg, run, dataset=other, progress=False, resume=True)
    lines = (run / "log.jsonl").read_bytes().splitlines(keepends=True)
    (run / "log.jsonl").write_bytes(b"".join(lines[:2] + lines[3:]))  # a lost line before the checkpoint
    with pytest.raises(ValueError, match="log.jsonl: its first 4 lines differ"):
        train(cfg, run, dataset=ds, progress=False, resume=True)
    (run / "log.jsonl").write_bytes(snapshot[run / "log.jsonl"])
    ck = list_checkpoints(run)[-1][1]
    ck.write_bytes(snapshot[ck][:-100])  # truncated latest checkpoint
    with pytest.raises(ValueError, match="truncated or damaged"):
        train(cfg, run, dataset=ds, progress=False, resume=True)
    ck.write_bytes(snapshot[ck])
    # nothing was written by the refused attempts
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == snapshot
    cos = TrainConfig(**{**TINY, "schedule": "cosine"})
    (tmp_path / "cos").mkdir()
    (tmp_path / "cos" / "config.json").write_text(json.dumps(cos.to_dict()))
    with pytest.raises(ValueError, match="schedule 'cosine'.*cannot be extended to 30"):
        train(cos.replace(steps=30), tmp_path / "cos", dataset=ds, progress=False, resume=True)
    assert [p.name for p in (tmp_path / "cos").iterdir()] == ["config.json"]


def test_same_seed_same_bits_with_noise_and_flatness(ds, refs):
    cfg = TrainConfig(**{**PLUGINS, "checkpoint_every": 0})
    strip = lambda h: [{k: v for k, v in r.items() if k != "time"} for r in h]  # noqa: E731
    a = refs["plugins"][1]
    b = train(cfg, None, dataset=ds, progress=False)
    assert strip(a.history) == strip(b.history)
    assert "flat/trace_k" in a.history[0] and np.isfinite(a.history[0]["flat/trace_k"])
    for x, y in zip(jax.tree_util.tree_leaves(a.model), jax.tree_util.tree_leaves(b.model)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    c = train(cfg.replace(seed=1), None, dataset=ds, progress=False)
    assert strip(a.history)[0]["loss"] != strip(c.history)[0]["loss"]


def test_run_folder_records_provenance(refs):
    run = refs["plain"][0]
    meta = json.loads((run / "meta.json").read_text())
    assert meta["seed"] == 0 and meta["versions"]["jax"] == jax.__version__
    assert meta["git_revision"] == git_revision()
    assert meta["git_revision"] is None or len(meta["git_revision"]) == 40
    assert len(meta["data_sha256"]) == 64
    assert json.loads((run / "config.json").read_text()) == TrainConfig(**TINY).to_dict()
    header = read_header(list_checkpoints(run)[1][1])  # step 10: the lines of steps 0, 3, 6, 9 precede it
    assert header["step"] == 10 and header["loop"]["log_lines"] == 4
    assert header["data_sha256"] == meta["data_sha256"]


def _git(cwd, *args):
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd, check=True,
                          capture_output=True, text=True).stdout.strip()


@pytest.mark.skipif(subprocess.run(["git", "--version"], capture_output=True).returncode != 0, reason="no git")
def test_git_revision_only_for_a_source_checkout(tmp_path, monkeypatch):
    import gradsparse.runfolder as tr

    repo = tmp_path / "repo"
    (repo / "gradsparse").mkdir(parents=True)
    (repo / "gradsparse" / "train.py").write_text("# copy\n")
    _git(repo, "init", "-q")
    _git(repo, "add", "gradsparse/train.py")
    _git(repo, "commit", "-q", "-m", "x")
    head = _git(repo, "rev-parse", "HEAD")
    monkeypatch.setattr(tr, "__file__", str(repo / "gradsparse" / "train.py"))
    assert tr.git_revision() == head and tr.git_dirty() is False
    (repo / "gradsparse" / "train.py").write_text("# changed\n")
    assert tr.git_dirty() is True
    # installed into site-packages inside some other repository: not its revision
    inner = repo / "venv" / "lib" / "site-packages" / "gradsparse"
    inner.mkdir(parents=True)
    monkeypatch.setattr(tr, "__file__", str(inner / "train.py"))
    assert tr.git_revision() is None and tr.git_dirty() is None
    outside = tmp_path / "plain" / "gradsparse"
    outside.mkdir(parents=True)
    monkeypatch.setattr(tr, "__file__", str(outside / "train.py"))
    assert tr.git_revision() is None


# --------------------------------------------------------------------------- the command line
def test_cli_resume_flags_must_match(tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["train", "--data", "random_inputs", "--n-train", "128", "--n-test", "32", "--width", "8", "--depth", "2",
            "--batch-size", "8", "--steps", "6", "--log-every", "2", "--checkpoint-every", "3", "--eval-batch", "16",
            "--out", str(run), "--quiet"]
    assert main([*argv, "--resume"]) == 0  # nothing to resume yet: starts the run
    capsys.readouterr()
    snapshot = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    for extra, needle in ((["--width", "16"], "width 16"), (["--lr", "0.01"], "lr 0.01"),
                          (["--steps", "4"], "fewer"), (["--overwrite"], "give one of them"),
                          (["--seed", "-1"], "seed")):
        code = main(["train", "--out", str(run), "--resume", "--quiet", *extra])
        err = capsys.readouterr().err.strip()
        assert code == 2 and needle in err and len(err.splitlines()) == 1, (extra, err)
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == snapshot
    # the same flags again, or none: allowed; more steps: extends
    assert main([*argv, "--resume"]) == 0
    assert main(["train", "--out", str(run), "--resume", "--quiet", "--steps", "8"]) == 0
    assert [r["step"] for r in log_without_time(run)] == [0, 2, 4, 6, 7]
    assert main(argv) == 2  # without --resume or --overwrite an existing run is refused
    assert "pass --resume" in capsys.readouterr().err


def _wait_for(pred, proc, timeout=120.0):
    t0 = time.time()
    while not pred():
        if proc.poll() is not None:
            raise AssertionError(f"process ended early ({proc.returncode}): {proc.stderr.read()}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError("timed out waiting for a checkpoint")
        time.sleep(0.005)


def test_sigkill_mid_run_then_resume_equals_uninterrupted(tmp_path):
    """Start the command in a subprocess, SIGKILL it twice after checkpoints appear (once during
    the first run, once during the resumed one), resume to the end: same leaves, same log."""
    steps = 300
    args = ["train", "--data", "random_inputs", "--n-train", "128", "--n-test", "32", "--width", "8", "--depth", "2",
            "--batch-size", "8", "--steps", str(steps), "--log-every", "3", "--checkpoint-every", "25",
            "--eval-batch", "16", "--quiet"]
    assert main([*args, "--out", str(tmp_path / "ref")]) == 0
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}

    def start(*extra):
        return subprocess.Popen([sys.executable, "-m", "gradsparse.cli", *args, "--out", str(run), *extra],
                                cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def latest():
        return list_checkpoints(run)[-1][0] if list_checkpoints(run) else 0

    proc = start()
    _wait_for(lambda: latest() >= 25, proc)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    first = latest()
    assert 25 <= first < steps  # killed mid-run

    proc = start("--resume")
    _wait_for(lambda: latest() > first, proc)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert latest() < steps

    proc = start("--resume")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert f"{steps} steps" in out
    assert log_without_time(run) == log_without_time(tmp_path / "ref")
    assert len(log_without_time(run)) == len(range(0, steps, 3)) + 1
    assert_same_state(run, tmp_path / "ref")
    assert no_temp_files(run)
    assert [r["from_step"] for r in json.loads((run / "meta.json").read_text())["resumes"]][0] == first
