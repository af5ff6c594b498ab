"""The run folder: everything a run needs is checked before anything is written or deleted, and the
``--out`` decision (a new folder, a resume, an overwrite) is made again once the folder is locked,
for training and relufication runs alike.

Two data-loss cases this file pins down (both lost data before the RunFolder object existed):

- ``--resume`` on a folder whose ``times.jsonl`` is damaged (here: a folder in its place) deleted
  ``summary.json`` and rewrote ``config.json`` and ``meta.json``, then failed. Now: refused
  (exit 2) before anything is touched; a damaged *content* of times.jsonl still resumes (times
  are not part of what a run reproduces: the lines that match are kept).
- two runs into one ``--out``: the first, paused after its ``--out`` check and before it took the
  lock, resumed after the second had finished and replaced its checkpoints; both exited 0. Now
  the late run refuses (exit 2): under the lock the folder holds a run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny_bert import MAX_LEN, write_tiny_bert  # noqa: E402

from gradsparse.cli import main  # noqa: E402

FLAGS = ["--data", "random_inputs", "--n-train", "64", "--n-test", "16", "--width", "8", "--depth", "1",
         "--batch-size", "8", "--eval-batch", "8", "--log-every", "2", "--checkpoint-every", "3", "--quiet"]
HF_FLAGS = ["--activation", "relu", "--modules", "none", "--batch-size", "4", "--seq-len", str(MAX_LEN),
            "--log-every", "2", "--checkpoint-every", "3", "--lr", "1e-3", "--quiet"]


def files_under(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in Path(root).rglob("*")
            if p.is_file() and p.name != ".lock"}


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def bert(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("bert") / "m"
    write_tiny_bert(folder)
    return folder


def command(kind: str, out: Path, steps: int, bert: Path | None = None, seed: int = 0) -> list[str]:
    if kind == "train":
        return ["train", *FLAGS, "--steps", str(steps), "--seed", str(seed), "--out", str(out)]
    return ["finetune", str(bert), *HF_FLAGS, "--steps", str(steps), "--seed", str(seed), "--out", str(out)]


@pytest.mark.parametrize("kind", ["train", "relufy"])
def test_resume_with_a_damaged_times_file_touches_nothing(tmp_path, capsys, bert, kind):
    run = tmp_path / "run"
    assert main(command(kind, run, 4, bert)) == 0
    capsys.readouterr()
    (run / "times.jsonl").unlink()
    (run / "times.jsonl").mkdir()  # a folder where the run writes a file
    before = files_under(run)
    assert main(command(kind, run, 6, bert) + ["--resume"]) == 2  # extended: the resume has work to do
    err = one_line(capsys)
    assert "times.jsonl" in err and "folder" in err
    assert files_under(run) == before and (run / "times.jsonl").is_dir()
    # garbled times (a clock file) do not stop a resume: the matching lines are kept
    (run / "times.jsonl").rmdir()
    (run / "times.jsonl").write_bytes(b'{"step": 0, "time": 0.1}\n{"st\x00\xff')
    assert main(command(kind, run, 6, bert) + ["--resume"]) == 0
    steps = [json.loads(x)["step"] for x in (run / "times.jsonl").read_text().splitlines()]
    log = [json.loads(x)["step"] for x in (run / "log.jsonl").read_text().splitlines()]
    assert steps[0] == 0 and steps[-1] == log[-1] == 5


#: a child that runs ``gradsparse ARGS`` and waits at the folder lock until the file $GO exists
#: (it first creates $REACHED): the moment after its --out check and before it locks the folder
PAUSED_CHILD = """
import os, sys, time
from pathlib import Path
import gradsparse.runfolder as rf
real = rf.lock_run_folder
def paused(*a, **k):
    Path(os.environ["REACHED"]).touch()
    while not Path(os.environ["GO"]).exists():
        time.sleep(0.05)
    return real(*a, **k)
rf.lock_run_folder = paused
from gradsparse.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("kind", ["train", "relufy"])
def test_a_run_paused_before_the_lock_does_not_replace_the_run_that_took_the_folder(tmp_path, capsys, bert, kind):
    out = tmp_path / "out"
    reached, go = tmp_path / "reached", tmp_path / "go"
    env = {**os.environ, "REACHED": str(reached), "GO": str(go)}
    late = subprocess.Popen([sys.executable, "-c", PAUSED_CHILD, *command(kind, out, 3, bert, seed=1)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        t0 = time.time()
        while not reached.exists():
            assert late.poll() is None, late.communicate()
            assert time.time() - t0 < 300, "the child never reached the folder lock"
            time.sleep(0.1)
        assert main(command(kind, out, 3, bert, seed=0)) == 0  # the second run takes the folder and finishes
        capsys.readouterr()
        first = files_under(out)
        go.touch()
        _, err = late.communicate(timeout=300)
    finally:
        if late.poll() is None:
            late.kill()
    assert late.returncode == 2, err
    assert "already holds a run" in err.strip().splitlines()[-1]
    assert files_under(out) == first  # the finished run is intact


@pytest.mark.parametrize("kind", ["train", "relufy"])
def test_a_folder_of_other_files_is_refused_unless_overwrite(tmp_path, capsys, bert, kind):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    assert main(command(kind, out, 2, bert)) == 2
    err = one_line(capsys)
    assert "notes.txt" in err and "--overwrite" in err
    assert files_under(out) == {"notes.txt": b"my notes"}
    assert main(command(kind, out, 2, bert) + ["--overwrite"]) == 0  # the run is written beside them
    assert (out / "notes.txt").read_text() == "my notes" and (out / "summary.json").exists()


@pytest.mark.parametrize("kind", ["train", "relufy"])
def test_resume_of_a_finished_run_says_so_and_touches_nothing(tmp_path, capsys, bert, kind):
    run = tmp_path / "run"
    assert main(command(kind, run, 3, bert)) == 0
    capsys.readouterr()
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in run.rglob("*") if p.is_file() and p.name != ".lock"}
    assert main(command(kind, run, 3, bert) + ["--resume"]) == 0
    assert "already complete" in capsys.readouterr().out
    after = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in run.rglob("*") if p.is_file() and p.name != ".lock"}
    assert after == before
