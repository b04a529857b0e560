"""`make augment ... RAY_ADDRESS=http://...` against a real two-node Ray cluster on this machine.

The cluster runs in a process session of its own and is stopped by that session id (never
`ray stop`, which would stop every Ray of the user). Each node has one CPU and a small object store.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def own_ports() -> str:
    """Agent and metrics ports of a node: Ray's defaults collide with any other Ray on the machine
    (the test session's own), and the job server then finds no agent."""
    return (
        f"--dashboard-agent-listen-port {free_port()} --dashboard-agent-grpc-port {free_port()} "
        f"--metrics-export-port {free_port()} --runtime-env-agent-port {free_port()}"
    )


@pytest.fixture(scope="module")
def cluster():
    # Ray's unix sockets live under --temp-dir, and their paths must stay under 108 bytes
    tmp = Path(tempfile.mkdtemp(prefix="tsray", dir="/tmp"))
    gcs, dash = free_port(), free_port()
    # the test session's own Ray (another fixture) exports RAY_ADDRESS and friends: a fresh
    # cluster must not inherit them
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env = {
        **inherited,
        "PATH": f"{VENV_BIN}:{os.environ['PATH']}",
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
        "HF_HUB_OFFLINE": "1",
    }
    ray = str(VENV_BIN / "ray")
    script = (
        f"{ray} start --head --port {gcs} --num-cpus 1 --object-store-memory 100000000 "
        f"--dashboard-host 127.0.0.1 --dashboard-port {dash} --include-dashboard true --temp-dir {tmp} {own_ports()} && "
        f"{ray} start --address 127.0.0.1:{gcs} --num-cpus 1 --object-store-memory 100000000 {own_ports()} && sleep 100000"
    )
    proc = subprocess.Popen(
        ["bash", "-c", script],
        env=env,
        start_new_session=True,
        stdout=open(tmp / "cluster.log", "w"),
        stderr=subprocess.STDOUT,
    )
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            status = subprocess.run(
                [ray, "status", "--address", f"127.0.0.1:{gcs}"],
                env=env,
                capture_output=True,
                text=True,
            )
            if status.stdout.count("node_") >= 2:
                break
            assert proc.poll() is None, (tmp / "cluster.log").read_text()
            time.sleep(2)
        else:
            pytest.fail(
                "the two-node cluster did not come up:\n" + (tmp / "cluster.log").read_text()
            )
        yield {"address": address, "env": env}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the cluster's own process session, nothing else
        time.sleep(3)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        shutil.rmtree(tmp, ignore_errors=True)


def test_submitted_job_runs_on_both_nodes(cluster, tmp_path):
    out = tmp_path / "out"
    config = yaml.safe_load((REPO / "configs" / "default.yaml").read_text())
    config["output_dir"] = str(out)  # shared storage: every node writes its shards here
    config["select"]["quota"] = 18  # 8 generated per tail class: a short run
    config["generate"]["num_inference_steps"] = 10
    config["shards"]["samples_per_shard"] = 4
    config["invert"]["solver"]["num_inference_steps"] = 10
    config["invert"]["resources"] = {"num_actors": 1, "num_cpus": 0.75}
    # one 0.75-CPU generate actor fits per 1-CPU node: the pool spans both nodes
    config["generate"]["resources"] = {"num_actors": 2, "num_cpus": 0.75}
    path = REPO / "configs" / f".test-cluster-{os.getpid()}.yaml"
    path.write_text(yaml.safe_dump(config))
    try:
        result = subprocess.run(
            [
                "make",
                "-s",
                "augment",
                f"CONFIG={path.relative_to(REPO)}",
                f"RAY_ADDRESS={cluster['address']}",
            ],
            cwd=REPO,
            env=cluster["env"],
            capture_output=True,
            text=True,
            timeout=600,
        )
    finally:
        path.unlink()
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "SUCCEEDED" in result.stdout
    run = json.loads((out / "run.json").read_text())
    assert run["counts"]["samples"] == 16
    assert len(run["node_ids"]) == 2, run["node_ids"]  # the worker node did part of the work
    assert len(list((out / "shards").glob("*_stats.json"))) == 4


def test_unreachable_address_fails_fast_and_names_it(tmp_path):
    port = free_port()
    result = subprocess.run(
        [
            str(VENV_BIN / "tailseed"),
            "augment",
            "--config",
            "configs/default.yaml",
            "--ray-address",
            f"http://127.0.0.1:{port}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert f"http://127.0.0.1:{port}" in result.stderr and "no Ray job server" in result.stderr
