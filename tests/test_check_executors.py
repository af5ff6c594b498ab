"""The checks through the plan of runs: the same report from the sequential and local executors,
re-judging a folder without training (--judge), and a suite killed in the middle that a --resume
finishes by training only what was missing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gradsparse import cli
from theory_checks.suite import get_checks, run_checks

#: checks that cover a seed group (G1's baselines), finetunes from the SGD runs (G4) and from the byte
#: LM (G11): each kind of job an executor runs
SUBSET = ["G1", "G4", "G11"]


def per_seed(out: Path) -> dict[str, dict[str, list[float]]]:
    data = json.loads((out / "report.json").read_text())
    return {r["name"]: r["per_seed"] for r in data["results"]}


def report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


@pytest.fixture(scope="module")
def sequential(tmp_path_factory):
    out = tmp_path_factory.mktemp("seq")
    results, crashed = run_checks(get_checks(SUBSET), "smoke", out, [0, 1, 2], progress=False, echo=False,
                                  executor="sequential")
    assert not crashed
    return out


def test_sequential_plan_trains_every_run_before_judging(sequential):
    data = report(sequential)
    ex = data["execution"]
    assert ex["executor"] == "sequential" and ex["runs"] == len(json.loads((sequential / "runs" / "runs.json")
                                                                          .read_text())["runs"])
    assert data["trained_while_judging"] == []  # every run a check used was planned and trained first
    assert all(not r["unplanned"] for r in data["results"])


def test_local_executor_gives_the_same_report(sequential, tmp_path):
    results, crashed = run_checks(get_checks(SUBSET), "smoke", tmp_path, [0, 1, 2], progress=False, echo=False,
                                  executor="local", workers=2)
    assert not crashed and report(tmp_path)["execution"]["workers"] == 2
    assert per_seed(tmp_path) == per_seed(sequential)
    assert [r["verdict"] for r in report(tmp_path)["results"]] == [r["verdict"] for r in report(sequential)["results"]]


def test_judge_rejudges_from_the_folders_and_trains_nothing(sequential, tmp_path):
    import shutil

    folder = tmp_path / "rep"
    shutil.copytree(sequential, folder)
    assert cli.main(["check", *SUBSET, "--judge", str(folder), "--quiet"]) == 0
    data = report(folder)
    assert data["executor"] == "judge only" and "execution" not in data
    assert per_seed(folder) == per_seed(sequential)
    # a missing run: its check is INCONCLUSIVE, saying so; nothing is trained
    victim = next(p for p in (folder / "runs").iterdir() if p.name.startswith("g11-modules"))
    shutil.rmtree(victim)
    assert cli.main(["check", "G11", "--judge", str(folder), "--quiet"]) == 0
    g11 = next(r for r in report(folder)["results"] if r["name"] == "G11")
    assert g11["verdict"] == "INCONCLUSIVE" and "not in the run folders" in g11["reason"]
    assert not victim.exists()


def test_judge_and_resume_refuse_a_folder_without_a_plan(tmp_path, capsys):
    assert cli.main(["check", "--judge", str(tmp_path), "--quiet"]) == 2
    assert "holds no check plan" in capsys.readouterr().err
    assert cli.main(["check", "--resume", "--out", str(tmp_path), "--quiet"]) == 2
    assert cli.main(["check", "--resume", "--overwrite", "--out", str(tmp_path), "--quiet"]) == 2
    assert cli.main(["check", "--workers", "2", "--executor", "sequential", "--out", str(tmp_path)]) == 2
    assert cli.main(["check", "--executor", "ray", "--ray-address", "nowhere:1", "--workers", "2",
                     "--out", str(tmp_path)]) == 2


def test_a_killed_suite_resumes_training_only_what_was_missing(sequential, tmp_path):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "gradsparse.cli", "check", *SUBSET, "--preset", "smoke", "--out", str(out),
           "--executor", "sequential", "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            if len(list(out.glob("runs/*/summary.json"))) >= 4:
                break
            time.sleep(0.2)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    done_before = len(list(out.glob("runs/*/summary.json")))
    total = len(json.loads((out / "runs" / "runs.json").read_text())["runs"])
    assert 4 <= done_before < total, (done_before, total)
    assert cli.main(["check", *SUBSET, "--resume", "--out", str(out), "--executor", "sequential", "--quiet"]) == 0
    ex = report(out)["execution"]
    assert ex["jobs_reused"] >= 1 and ex["jobs_trained"] >= 1
    assert per_seed(out) == per_seed(sequential)
