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
import tarfile
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from augment_helpers import HUNG_S

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A port free now and not handed out before in this session: the OS gives a closed port
    back soon, and two of a node's components on one port stop `ray start` (seen in CI:
    the agent's gRPC port and the runtime-env agent's port were the same)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def own_ports() -> str:
    """Agent and metrics ports of a node: Ray's defaults collide with any other Ray on the machine
    (the test session's own), and the job server then finds no agent."""
    return (
        f"--dashboard-agent-listen-port {free_port()} --dashboard-agent-grpc-port {free_port()} "
        f"--metrics-export-port {free_port()} --runtime-env-agent-port {free_port()}"
    )


# Custom resources that pin the stages: inversion to the head node, generation to worker nodes.
HEAD_RESOURCE = "tailseed_test_head"
WORKER_RESOURCE = "tailseed_test_worker"


class Cluster:
    """A real Ray cluster on this machine: a head node with the job server and worker nodes, each
    `ray start --block` in a process session of its own, so that one node can be killed whole."""

    def __init__(self, tmp: Path):
        self.tmp, self.gcs, self.dash = tmp, free_port(), free_port()
        self.address = f"http://127.0.0.1:{self.dash}"
        # the test session's own Ray (another fixture) exports RAY_ADDRESS and friends: a fresh
        # cluster must not inherit them
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        self.env = {
            **inherited,
            "PATH": f"{VENV_BIN}:{os.environ['PATH']}",
            "RAY_AUTH_MODE": "disabled",
            "RAY_USAGE_STATS_ENABLED": "0",
            # a killed node is declared dead after about 3 s instead of Ray's default 15 s
            "RAY_health_check_period_ms": "1000",
            "RAY_health_check_failure_threshold": "3",
            "HF_HUB_OFFLINE": "1",
        }
        self.ray = str(VENV_BIN / "ray")
        self.nodes: list[subprocess.Popen] = []

    def _start(self, args: str, name: str, extra_env: dict | None = None) -> subprocess.Popen:
        proc = subprocess.Popen(
            ["bash", "-c", f"exec {self.ray} start --block {args} {own_ports()}"],
            env={**self.env, **(extra_env or {})},
            start_new_session=True,
            stdout=open(self.tmp / f"{name}.log", "w"),
            stderr=subprocess.STDOUT,
        )
        self.nodes.append(proc)
        return proc

    def start_head(self) -> None:
        self._start(
            f"--head --port {self.gcs} --num-cpus 1 --object-store-memory 100000000 "
            f"--resources '{json.dumps({HEAD_RESOURCE: 1})}' "
            f"--dashboard-host 127.0.0.1 --dashboard-port {self.dash} --include-dashboard true "
            f"--temp-dir {self.tmp}",
            "head",
        )
        self.wait_for_nodes(1)

    def start_worker(self, name: str, extra_env: dict | None = None) -> subprocess.Popen:
        """A worker node with one CPU and the worker resource; `extra_env` reaches the actors that
        run on it. Each node gets a temp dir of its own, as each machine of a real cluster has:
        nodes that share one unpack a job's working_dir into the same folder, and a node that
        sees the job for the first time deletes and unpacks it again (Ray's working_dir plugin
        overwrites), under the feet of the driver whose working directory it is."""
        temp_dir = self.tmp / f"n{len(self.nodes)}"
        return self._start(
            f"--address 127.0.0.1:{self.gcs} --num-cpus 1 --object-store-memory 100000000 "
            f"--resources '{json.dumps({WORKER_RESOURCE: 2})}' --temp-dir {temp_dir}",
            name,
            extra_env,
        )

    def alive_nodes(self) -> int:
        status = subprocess.run(
            [self.ray, "status", "--address", f"127.0.0.1:{self.gcs}"],
            env=self.env,
            capture_output=True,
            text=True,
        )
        active = status.stdout.split("Pending:")[0]  # node lines are listed under "Active:"
        return active.count("node_")

    def wait_for_nodes(self, count: int, timeout: float = HUNG_S) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.alive_nodes() == count:
                return
            time.sleep(1)
        logs = "\n".join(p.read_text()[-2000:] for p in sorted(self.tmp.glob("*.log")))
        pytest.fail(f"the cluster did not reach {count} alive nodes:\n{logs}")

    @staticmethod
    def kill(node: subprocess.Popen) -> None:
        """SIGKILL a node's whole process session: raylet, object store, its actors."""
        try:
            os.killpg(node.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        node.wait()

    def stop(self) -> None:
        for node in self.nodes:  # each node's own process session, nothing else on the machine
            try:
                os.killpg(node.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        time.sleep(3)
        for node in self.nodes:
            self.kill(node)


@pytest.fixture(scope="module")
def cluster():
    # Ray's unix sockets live under --temp-dir, and their paths must stay under 108 bytes
    tmp = Path(tempfile.mkdtemp(prefix="tsray", dir="/tmp"))
    c = Cluster(tmp)
    try:
        c.start_head()
        c.worker = c.start_worker("worker")
        c.wait_for_nodes(2)
        yield c
    finally:
        c.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def short_config(out: Path) -> Path:
    """The default config, shortened: 16 generated images in 4 shards. Inversion can only run on
    the head node and generation (with its writer) only on a worker node, through custom
    resources, so which node does what never depends on which is scheduled first."""
    config = yaml.safe_load((REPO / "configs" / "default.yaml").read_text())
    config["output_dir"] = str(out)  # shared storage: every node writes its shards here
    config["select"]["quota"] = 18  # 8 generated per tail class: a short run
    config["filter"] = {"enabled": False}  # the cluster's plumbing is under test, not the filter
    config["generate"]["num_inference_steps"] = 10
    config["shards"]["samples_per_shard"] = 4
    config["invert"]["solver"]["num_inference_steps"] = 10
    config["invert"]["resources"] = {
        "num_actors": 1,
        "num_cpus": 0.75,
        "custom": {HEAD_RESOURCE: 1},
    }
    # the writer takes the generator's custom resource too (1 more) and 0.25 CPU: both fit
    config["generate"]["resources"] = {
        "num_actors": 1,
        "num_cpus": 0.75,
        "custom": {WORKER_RESOURCE: 1},
    }
    path = REPO / "configs" / f".test-cluster-{os.getpid()}-{out.parent.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def make_augment(config: Path, cluster: Cluster, log: Path) -> subprocess.Popen:
    """`make augment CONFIG=... RAY_ADDRESS=...` in a process session of its own."""
    return subprocess.Popen(
        [
            "make",
            "-s",
            "augment",
            f"CONFIG={config.relative_to(REPO)}",
            f"RAY_ADDRESS={cluster.address}",
        ],
        cwd=REPO,
        env=cluster.env,
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def shard_keys(shards: Path) -> list[str]:
    keys = []
    for tar_path in sorted(shards.glob("*.tar")):
        with tarfile.open(tar_path) as tar:  # every tar must open
            keys += [m.name.split(".")[0] for m in tar if m.name.endswith(".png")]
    return keys


def test_submitted_job_runs_on_both_nodes(cluster, tmp_path):
    out = tmp_path / "out"
    path = short_config(out)
    try:
        proc = make_augment(path, cluster, tmp_path / "make.log")
        proc.wait(timeout=HUNG_S)
    finally:
        path.unlink()
    stdout = (tmp_path / "make.log").read_text()
    assert proc.returncode == 0, stdout[-6000:]
    assert "SUCCEEDED" in stdout
    run = json.loads((out / "run.json").read_text())
    assert run["counts"]["samples"] == 16
    assert len(run["node_ids"]) == 2, run["node_ids"]  # each node did its part of the work
    assert len(list((out / "shards").glob("*_stats.json"))) == 4


@pytest.mark.parametrize("after_kill", ["replace_node", "stop_job"])
def test_worker_node_killed_mid_run_then_resume(cluster, tmp_path, after_kill):
    """Kill a whole worker node while it is half way through writing a shard. Then either a
    replacement node joins while the job goes on ("replace_node": Ray may restart the lost actors
    there and finish), or the job is stopped at once ("stop_job": the run is left unfinished, and
    only the rerun can complete it). Either way a rerun of the same command ends with every shard
    complete, nothing lost or duplicated, and bytes equal to an uninterrupted run."""
    from tailseed.jobs.augment import run
    from tailseed.stages.augment_pipeline import load_config

    out = tmp_path / "out"
    shards = out / "shards"
    path = short_config(out)
    try:
        cluster.kill(cluster.worker)
        cluster.wait_for_nodes(1)
        # the node to be killed holds its first shard half written until it is killed; it is
        # the only node that can generate, so nothing else finishes the run meanwhile
        doomed = cluster.start_worker("doomed", {"TAILSEED_SLOW_WRITE_S": "900"})
        cluster.wait_for_nodes(2)
        proc = make_augment(path, cluster, tmp_path / "make1.log")
        # kill when a shard has sat half written for 2 s (the doomed node's), or at the latest
        # when the first shard is done: either way the doomed node holds part of the work
        seen: dict[str, float] = {}
        deadline = time.time() + HUNG_S
        while time.time() < deadline and proc.poll() is None:
            now = time.time()
            for tmp in shards.glob(".*.tar.*.tmp"):
                seen.setdefault(tmp.name, now)
            if any(now - t > 2 for n, t in seen.items() if (shards / n).exists()):
                break
            if list(shards.glob("*_stats.json")):
                break
            time.sleep(0.1)
        assert proc.poll() is None, (tmp_path / "make1.log").read_text()[-4000:]
        done_at_kill = len(list(shards.glob("*_stats.json")))
        cluster.kill(doomed)
        assert done_at_kill < 4, "the run had finished before the node was killed"
        if after_kill == "stop_job":
            stop_jobs(cluster, tmp_path / "make1.log")
            proc.wait(timeout=HUNG_S)
            assert proc.returncode != 0  # the job ended STOPPED, and make says so
            assert len(list(shards.glob("*_stats.json"))) < 4  # work is left for the rerun
        cluster.worker = cluster.start_worker("replacement")
        try:
            proc.wait(timeout=300)  # Ray may restart the actor on the new node, or give up
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stop_jobs(cluster, tmp_path / "make1.log")
        cluster.wait_for_nodes(2)
        again = make_augment(path, cluster, tmp_path / "make2.log")
        again.wait(timeout=HUNG_S)
        log2 = (tmp_path / "make2.log").read_text()
        assert again.returncode == 0, log2[-6000:]
        if after_kill == "stop_job":
            assert "written" in log2  # the rerun did the work that the stopped job left

        keys = shard_keys(shards)
        assert len(keys) == 16 == len(set(keys))
        assert len(list(shards.glob("*_stats.json"))) == 4
        assert not list(shards.glob(".*.tmp"))
        # the same run, uninterrupted and in-process, gives the same bytes
        reference = run(
            load_config(path, ["ray.in_process=true", f"output_dir={tmp_path / 'reference'}"])
        )
        assert reference["counts"]["samples"] == 16
        for tar_path in sorted(shards.glob("*.tar")):
            assert (
                tar_path.read_bytes()
                == (tmp_path / "reference" / "shards" / tar_path.name).read_bytes()
            )
    finally:
        path.unlink()


def stop_jobs(cluster: Cluster, log: Path) -> None:
    """`ray job stop` for every job that `make augment` reported submitting to `log`."""
    for job_id in submitted(log):
        subprocess.run(
            [cluster.ray, "job", "stop", "--address", cluster.address, job_id],
            env=cluster.env,
            capture_output=True,
            timeout=HUNG_S,
        )


def submitted(log: Path) -> list[str]:
    """The job ids that `make augment` printed."""
    return [
        line.split("submitted job ")[1].split()[0]
        for line in log.read_text().splitlines()
        if "submitted job " in line
    ]


def test_unreachable_address_fails_fast_and_names_it(tmp_path):
    port = free_port()
    result = subprocess.run(
        [
            str(VENV_BIN / "tailseed"),
            "augment",
            "--config",
            "configs/default.yaml",
            "--set",
            f"output_dir={tmp_path / 'out'}",
            "--ray-address",
            f"http://127.0.0.1:{port}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=HUNG_S,
    )
    assert result.returncode == 2
    assert f"http://127.0.0.1:{port}" in result.stderr and "no Ray job server" in result.stderr


@pytest.mark.parametrize(
    "overrides, named",
    [
        ([], "output_dir 'out/default' is relative"),
        (["output_dir=/tmp/x", "dataset.materialize=''", "dataset.path=my/data"], "dataset.path"),
        (["output_dir=/tmp/x", "model.path=MODEL_OUTSIDE_THE_REPO"], "model.path"),
    ],
)
def test_relative_paths_are_refused_before_submitting(overrides, named, tmp_path):
    """A job runs in a temporary copy of the repository on the cluster: relative output and
    dataset paths would point into it. Refused before any job server is contacted (the address
    below has none)."""
    outside = tmp_path / "my-model"  # a local model folder that the job would not carry
    outside.mkdir()
    overrides = [
        o.replace("MODEL_OUTSIDE_THE_REPO", os.path.relpath(outside, REPO)) for o in overrides
    ]
    sets = [arg for item in overrides for arg in ("--set", item)]
    result = subprocess.run(
        [str(VENV_BIN / "tailseed"), "augment", "--config", "configs/default.yaml", *sets]
        + ["--ray-address", f"http://127.0.0.1:{free_port()}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=HUNG_S,
    )
    assert result.returncode == 2, result.stderr
    assert named in result.stderr and "no Ray job server" not in result.stderr


def test_a_local_run_beside_a_running_cluster_starts_a_private_ray(cluster, tmp_path):
    """With a Ray cluster up on this machine (the fixture's), `make augment` without RAY_ADDRESS
    must not try to join it: it starts a Ray of its own and says so."""
    config = yaml.safe_load((REPO / "configs" / "default.yaml").read_text())
    config["output_dir"] = str(tmp_path / "out")
    config["select"]["quota"] = 14  # 4 generated per tail class
    config["filter"] = {"enabled": False}
    config["generate"]["num_inference_steps"] = 5
    config["invert"]["solver"]["num_inference_steps"] = 5
    config["ray"] = {"local_num_cpus": 2, "object_store_mb": 128}
    path = REPO / "configs" / f".test-local-{os.getpid()}.yaml"
    path.write_text(yaml.safe_dump(config))
    try:
        proc = subprocess.run(
            ["make", "-s", "augment", f"CONFIG={path.relative_to(REPO)}"],
            cwd=REPO,
            env={**cluster.env, "RAY_AUTH_MODE": "disabled"},
            capture_output=True,
            text=True,
            timeout=HUNG_S,
        )
    finally:
        path.unlink()
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "starting a private local Ray" in proc.stdout
    assert json.loads((tmp_path / "out" / "run.json").read_text())["counts"]["samples"] == 8
