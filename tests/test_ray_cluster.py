"""The smoke preset on a real Ray cluster of this machine (a head and one more node, no dashboard,
everything on 127.0.0.1): a worker killed while it trains is retried, and the report equals the
sequential executor's. Skipped where Ray is not installed (``pip install 'gradsparse[cluster]'``)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

#: Ray binds to 127.0.0.1 only with these (measured with Ray 2.60.0; Ray reads them when it is
#: imported, so they are set first); a throwaway cluster needs no auth
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}
os.environ.update(LOOPBACK_ENV)
ray = pytest.importorskip("ray")

from theory_checks.suite import get_checks, run_checks  # noqa: E402



@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        c.add_node(num_cpus=1)
        yield c
    finally:
        if ray.is_initialized():
            ray.shutdown()
        c.shutdown()  # every process of the cluster, by its own handle


def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(d.name))
    return out


def _task_workers(c) -> list[int]:
    """PIDs of the worker processes of this cluster's raylets that are running a job now."""
    from ray._private import ray_constants

    pids = []
    for node in c.list_all_nodes():
        for info in node.all_processes.get(ray_constants.PROCESS_TYPE_RAYLET, []):
            for pid in _children(info.process.pid):
                try:
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
                except OSError:
                    continue
                if b"_ray_job" in cmd:
                    pids.append(pid)
    return pids


def test_smoke_preset_on_a_local_ray_cluster_survives_a_killed_worker(cluster, tmp_path):
    ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
    addresses = {n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]}
    assert addresses == {"127.0.0.1"} and len([n for n in ray.nodes() if n["Alive"]]) == 2
    assert cluster.address.startswith("127.0.0.1:")

    out = tmp_path / "ray"
    killed: list[int] = []

    def kill_one_in_flight() -> None:
        deadline = time.time() + 300
        while time.time() < deadline and not killed:
            started = [p for p in out.glob("runs/*/log.jsonl") if not (p.parent / "summary.json").exists()]
            workers = _task_workers(cluster)
            if started and workers:
                os.kill(workers[0], signal.SIGKILL)
                killed.append(workers[0])
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_one_in_flight, daemon=True)
    killer.start()
    _, crashed = run_checks(get_checks(), "smoke", out, [0, 1, 2], progress=False, echo=False, executor="ray",
                            ray_address=cluster.address)
    killer.join(timeout=1)
    assert not crashed and killed, "no worker was killed while a run was in flight"
    ray.shutdown()

    seq = tmp_path / "seq"
    _, crashed = run_checks(get_checks(), "smoke", seq, [0, 1, 2], progress=False, echo=False, executor="sequential")
    a, b = (json.loads((d / "report.json").read_text()) for d in (out, seq))
    assert a["execution"]["executor"] == "ray" and a["execution"]["jobs_trained"] == b["execution"]["jobs_trained"]
    assert {r["name"]: r["per_seed"] for r in a["results"]} == {r["name"]: r["per_seed"] for r in b["results"]}
    assert [r["verdict"] for r in a["results"]] == [r["verdict"] for r in b["results"]]


def test_ray_without_a_shared_filesystem_ships_the_run_folders(cluster, tmp_path):
    """Workers that cannot see --out train on their node and return the folders' files."""
    from gradsparse.executors import execute
    from gradsparse.runplan import RunPlan, RunSpec
    from test_runplan import TINY, spec

    plan = RunPlan()
    base = plan.add(spec("base", TINY, 0))
    from gradsparse.factory import finetune_start
    from test_runplan import _tiny_model

    opts = finetune_start(_tiny_model(), TINY, zeroth_bias=True)[1]
    plan.add(spec("ft", TINY.replace(steps=8, surgery=opts), 0, parent=base))
    shipped = execute(plan, tmp_path / "ray", executor="ray", ray_address=cluster.address, progress=False,
                      shared_fs=False)
    local = execute(plan, tmp_path / "seq", executor="sequential", progress=False)
    assert len(shipped.trained) == 2 and isinstance(plan.runs[base], RunSpec)
    for rid in plan.runs:
        assert (shipped.folders[rid] / "summary.json").is_file()
        assert (shipped.folders[rid] / "log.jsonl").read_bytes() == (local.folders[rid] / "log.jsonl").read_bytes()
