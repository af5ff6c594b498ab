"""The plan of runs (gradsparse.runplan) and its executors (gradsparse.executors): identities,
grouping, dependency order, the critical-path projection, packing run folders, and that the
sequential and local executors write the same bytes."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from gradsparse.config import TrainConfig
from gradsparse.executors import critical_path, execute, pack_folder, unpack_folder
from gradsparse.factory import finetune_start
from gradsparse.runplan import Job, RunPlan, RunSpec, config_digest, finished_config, parent_start, run_id, sweep
from theory_checks.suite import CHECK_LOADER

TINY = TrainConfig(model="mlp", data="mnist1d", width=8, depth=1, mlp_ratio=2, optimizer="adam", lr=3e-3,
                   batch_size=16, steps=12, log_every=4, eval_batch=32, flatness_every=0, checkpoint_every=0,
                   n_train=256, n_test=64)


def spec(name: str, cfg: TrainConfig, seed: int, parent: str | None = None) -> RunSpec:
    return RunSpec(name, cfg.replace(seed=seed).validate().to_dict(), parent=parent, data_seed=0, loader=CHECK_LOADER)


def test_run_id_covers_the_whole_config_and_the_parent():
    a = TINY.replace(seed=0).to_dict()
    assert run_id(a) == run_id(dict(reversed(list(a.items()))))  # key order does not matter
    assert run_id(a).endswith("-s0") and run_id({**a, "seed": 3}).endswith("-s3")
    assert config_digest(a) == config_digest({**a, "seed": 3})  # the seeds of a config share the digest
    assert run_id({**a, "lr": 1e-3}) != run_id(a)
    assert run_id(a, parent="x-s0") != run_id(a)
    with pytest.raises(ValueError, match="integer 'seed'"):
        run_id({k: v for k, v in a.items() if k != "seed"})
    with pytest.raises(ValueError, match="run name"):
        RunSpec("../up", a)
    with pytest.raises(ValueError, match="loader"):
        RunSpec("ok", a, loader="no_colon")


def test_plan_deduplicates_groups_seeds_and_orders_parents_first():
    plan = RunPlan()
    base = [plan.add(spec("base", TINY, s)) for s in (0, 1, 2)]
    assert plan.add(spec("again", TINY, 1)) == base[1] and len(plan) == 3  # the same run once, first name kept
    assert plan.runs[base[1]].name == "base"
    ft = TINY.replace(steps=8)
    kids = [plan.add(spec("ft", ft, s, parent=base[s])) for s in (0, 1, 2)]
    plan.add(spec("other", TINY.replace(lr=1e-2), 0))
    with pytest.raises(ValueError, match="parent .* is not in the plan"):
        plan.add(spec("orphan", ft, 0, parent="nope-s0"))
    jobs = plan.jobs(lambda cfg: True)
    assert [len(j.runs) for j in jobs] == [3, 1, 1, 1, 1]  # one seed group; finetunes alone; a lone config
    assert [r.run_id for r in jobs[0].runs] == base
    pos = {r.run_id: i for i, j in enumerate(jobs) for r in j.runs}
    assert all(pos[plan.runs[k].parent] < pos[k] for k in kids)
    assert all(j.parents and j.parents[0].run_id == base[s] for s, j in enumerate(jobs[1:4]))
    assert [len(j.runs) for j in plan.jobs(lambda cfg: False)] == [1] * 7  # no seed groups
    again = RunPlan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert list(again.runs) == list(plan.runs)
    bad = plan.to_dict()
    bad["runs"][0]["config"]["lr"] = 0.5
    with pytest.raises(ValueError, match="recorded run id"):
        RunPlan.from_dict(bad)


def test_critical_path_projection_on_a_known_plan():
    plan = RunPlan()
    a = plan.add(spec("a", TINY, 0))
    plan.add(spec("b", TINY.replace(lr=1e-2), 0))
    plan.add(spec("c", TINY.replace(steps=8), 0, parent=a))
    jobs = plan.jobs(lambda cfg: False)
    secs = {jobs[0].label: 10.0, jobs[1].label: 4.0, jobs[2].label: 3.0}
    p = critical_path(plan, secs, workers=2)
    # a (10 s) then its finetune c (3 s) is the longest chain; b runs beside a
    assert p["serial"] == 17.0 and p["critical"] == 13.0 and p["projected"] == 13.0
    assert critical_path(plan, secs, workers=1)["projected"] == 17.0
    with pytest.raises(ValueError, match="no time for job"):
        critical_path(plan, {}, workers=2)


def test_pack_and_unpack_a_folder_atomically(tmp_path):
    src = tmp_path / "run"
    (src / "checkpoints").mkdir(parents=True)
    (src / "log.jsonl").write_bytes(b'{"step": 0}\n')
    (src / "checkpoints" / "step_4.ckpt").write_bytes(bytes(range(256)))
    (src / ".log.jsonl.abc.tmp").write_bytes(b"half")  # a temp file of an atomic write is not part of a run
    files = pack_folder(src)
    assert sorted(files) == ["checkpoints/step_4.ckpt", "log.jsonl"]
    dest = tmp_path / "out" / "run"
    dest.mkdir(parents=True)
    (dest / "stale").write_text("an unfinished earlier copy")
    unpack_folder(files, dest)
    assert pack_folder(dest) == files and not (dest / "stale").exists()
    assert [p.name for p in dest.parent.iterdir()] == ["run"]  # no temp folder left behind
    with pytest.raises(ValueError, match="leaves the folder"):
        unpack_folder({"../evil": b"x"}, tmp_path / "x")


def test_parent_start_equals_the_finetune_start_of_the_checks(tmp_path):
    """What an executor rebuilds from the parent's folder equals what a check builds in memory."""
    from gradsparse.train import train
    from theory_checks.context import load_data

    ds = load_data("mnist1d", n_train=256, n_test=64)
    res = train(TINY.replace(seed=0), tmp_path / "p", dataset=ds, progress=False)
    cfg = TINY.replace(seed=0, steps=8)
    built, opts = finetune_start(res.model, cfg, zeroth_bias=True, jsrelu=True, t_mix=4)
    again = parent_start(tmp_path / "p", cfg.replace(surgery=opts))
    la, lb = jax.tree_util.tree_leaves(built.model), jax.tree_util.tree_leaves(again.model)
    assert len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))
    assert jax.tree_util.tree_structure(built.trainable) == jax.tree_util.tree_structure(again.trainable)
    assert len(built.projections) == len(again.projections)


def _files(folder: Path) -> dict[str, bytes]:
    """A run folder's bytes without its clocks: the summary, times and meta are left out and a
    checkpoint's header line (which holds its elapsed seconds) is cut off its arrays."""
    skip = {"summary.json", "times.jsonl", "meta.json"}
    return {k: v.split(b"\n", 1)[1] if k.startswith("checkpoints/") else v
            for k, v in pack_folder(folder).items() if k not in skip}


def test_sequential_and_local_executors_write_the_same_runs_and_reuse_finished_ones(tmp_path):
    plan = RunPlan()
    base = [plan.add(spec("base", TINY, s)) for s in (0, 1)]
    opts = finetune_start(_tiny_model(), TINY, zeroth_bias=True)[1]
    for s in (0, 1):
        plan.add(spec("ft", TINY.replace(steps=8, surgery=opts), s, parent=base[s]))
    plan.add(spec("lr", TINY.replace(lr=1e-2), 0))
    seq = execute(plan, tmp_path / "seq", executor="sequential", progress=False, together=lambda c: True)
    loc = execute(plan, tmp_path / "loc", executor="local", workers=2, progress=False, together=lambda c: True)
    assert len(seq.trained) == len(loc.trained) == 4  # one seed group, two finetunes, one lone run
    for rid, folder in seq.folders.items():
        assert finished_config(folder, plan.runs[rid].config)
        assert _files(folder) == _files(loc.folders[rid]), rid
    again = execute(plan, tmp_path / "seq", executor="sequential", progress=False, together=lambda c: True)
    assert again.trained == [] and len(again.reused) == 4
    forced = execute(plan, tmp_path / "seq", executor="sequential", progress=False, together=lambda c: True,
                     reuse=False)
    assert len(forced.trained) == 4
    assert json.loads((tmp_path / "seq" / "runs.json").read_text())["runs"][0]["run_id"] == base[0]


def _tiny_model():
    from gradsparse.data import DataInfo
    from gradsparse.factory import RunKeys, build
    from theory_checks.context import load_data

    return build(TINY, DataInfo.of(load_data("mnist1d", n_train=256, n_test=64)), RunKeys.of(0).model).model


def test_execute_validates_its_input(tmp_path):
    plan = sweep([TINY], seeds=[0])
    with pytest.raises(ValueError, match="executor: got 'gpu'"):
        execute(plan, tmp_path, executor="gpu")
    with pytest.raises(ValueError, match="workers"):
        execute(plan, tmp_path, executor="local", workers=0)
    with pytest.raises(ValueError, match="RunPlan"):
        execute([plan], tmp_path)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a folder"):
        execute(plan, tmp_path / "file")
    with pytest.raises(ValueError, match="seeds"):
        sweep([TINY], seeds=[-1])
    assert [s.seed for s in sweep([TINY, TINY.replace(lr=1e-2)], seeds=[0, 1]).runs.values()] == [0, 1, 0, 1]


def test_job_label_names_a_seed_group():
    plan = RunPlan(spec("base", TINY, s) for s in (0, 1, 2))
    (job,) = plan.jobs(lambda c: True)
    assert isinstance(job, Job) and job.label.endswith("x3 seeds") and job.steps == 3 * TINY.steps


def test_the_ray_executor_without_ray_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    import sys

    from gradsparse import cli

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(ValueError, match=r"pip install 'gradsparse\[cluster\]'"):
        execute(sweep([TINY], seeds=[0]), tmp_path / "r", executor="ray")
    assert not (tmp_path / "r").exists()  # refused before anything is written
    assert cli.main(["check", "G1", "--preset", "smoke", "--executor", "ray", "--out", str(tmp_path / "c"),
                     "--quiet"]) == 2
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if not ln.startswith("gradsparse check: G1")]
    assert len(err) == 1 and "gradsparse[cluster]" in err[0]
    assert not (tmp_path / "c").exists()


def test_local_workers_die_with_a_killed_driver(tmp_path):
    """A driver killed with SIGKILL leaves no worker training on (it would hold the run folder's lock
    that a --resume needs)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    code = ("from gradsparse.executors import execute; from gradsparse.runplan import RunPlan, RunSpec; "
            "from test_runplan import TINY, CHECK_LOADER; "
            "plan = RunPlan(RunSpec('long', TINY.replace(seed=s, steps=4000).to_dict(), data_seed=0, "
            "loader=CHECK_LOADER) for s in range(2)); "
            f"execute(plan, {str(tmp_path / 'runs')!r}, executor='local', workers=2, progress=False, "
            "together=lambda c: False)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    driver = subprocess.Popen([sys.executable, "-c", code], env=env)

    def children() -> list[int]:
        out = []
        for d in Path("/proc").iterdir():
            if d.name.isdigit():
                try:
                    if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == driver.pid:
                        out.append(int(d.name))
                except (OSError, ValueError, IndexError):
                    pass
        return out

    try:
        deadline = time.time() + 120
        while time.time() < deadline and not list((tmp_path / "runs").glob("*/log.jsonl")):
            time.sleep(0.1)
        kids = children()
        assert kids, "no worker started"
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    deadline = time.time() + 20
    while time.time() < deadline and any(Path(f"/proc/{k}").exists() and "Z" not in _state(k) for k in kids):
        time.sleep(0.1)
    alive = [k for k in kids if Path(f"/proc/{k}").exists() and "Z" not in _state(k)]
    assert not alive, f"workers still running after the driver was killed: {alive}"


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "Z"
