"""The augment job on a local Ray: same shards as in-process, readable by Ray Data's own reader."""

from __future__ import annotations

import pytest
import yaml
from augment_helpers import HUNG_S, shard_files, start_augment, wait_for, write_config

from tailseed.jobs.augment import run
from tailseed.stages.augment_pipeline import load_config

pytestmark = [pytest.mark.slow]


def test_ray_run_matches_in_process_and_reads_back(
    ray_session, tmp_path, tiny_model_dir, small_dataset
):
    local = write_config(tmp_path / "local.yaml", tiny_model_dir, small_dataset, tmp_path / "local")
    on_ray = write_config(tmp_path / "ray.yaml", tiny_model_dir, small_dataset, tmp_path / "ray")
    data = yaml.safe_load(on_ray.read_text())
    data["ray"] = {"in_process": False}
    data["invert"]["resources"] = {"num_actors": 1, "num_cpus": 0.5}
    data["generate"]["resources"] = {"num_actors": 2, "num_cpus": 0.5}
    on_ray.write_text(yaml.safe_dump(data))

    report = run(load_config(on_ray))
    run(load_config(local))
    assert report["counts"]["samples"] == 12
    assert report["node_ids"] == [ray_session.get_runtime_context().get_node_id()]
    assert shard_files(tmp_path / "ray") == shard_files(tmp_path / "local")

    # the folder itself, as the README reads it (its stats and index JSON files lie beside)
    folder = str(tmp_path / "ray" / "shards")
    ds = ray_session.data.read_webdataset(folder, decoder=None, file_extensions=["tar"])
    rows = ds.take_all()
    assert len(rows) == 12
    assert {
        int(r["cls"]) if not isinstance(r["cls"], bytes) else int(r["cls"].decode()) for r in rows
    } == {1, 2}


def test_kill_minus_nine_of_an_actor_then_resume(
    ray_session, tmp_path, tiny_model_dir, small_dataset
):
    """Kill the model actor mid-run (a shard half written); the run or its rerun ends complete."""
    import os
    import signal
    import tarfile

    import psutil

    config = write_config(tmp_path / "c.yaml", tiny_model_dir, small_dataset, tmp_path / "out")
    data = yaml.safe_load(config.read_text())
    data["ray"] = {"in_process": False, "local_num_cpus": 2, "object_store_mb": 128}
    config.write_text(yaml.safe_dump(data))
    shards = tmp_path / "out" / "shards"
    # a Ray of its own, whose workers are this job's children (not the test session's Ray)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {
        "TAILSEED_SLOW_WRITE_S": "3"
    }
    proc = start_augment(config, env)

    def kill_an_actor_mid_shard() -> bool:
        # a shard done and another half written (writers may run in parallel: any pair will do)
        if not (any(shards.glob("*_stats.json")) and any(shards.glob(".*.tar.*.tmp"))):
            return False
        for child in psutil.Process(proc.pid).children(recursive=True):
            try:
                if "MapWorker" in " ".join(child.cmdline()) or "MapWorker" in child.name():
                    os.kill(child.pid, signal.SIGKILL)
                    return True
            except psutil.Error:
                continue
        return False

    # as long as the run lives: on a loaded machine its first shard can take many minutes
    wait_for(kill_an_actor_mid_shard, proc, "an actor caught while a shard was half written")
    # Ray may retry on a new actor and finish, or the run may fail: both resume
    proc.wait(timeout=HUNG_S)
    report = run(load_config(config))
    assert report["counts"]["samples"] == 12
    keys = []
    for s in range(3):
        with tarfile.open(shards / f"{s:05d}.tar") as tar:
            keys += [m.name.split(".")[0] for m in tar if m.name.endswith(".png")]
    assert len(keys) == 12 == len(set(keys))


def test_asking_for_more_gpus_than_the_cluster_has_says_so(
    ray_session, tmp_path, tiny_model_dir, small_dataset
):
    from tailseed.pipeline.errors import UserError

    config = write_config(tmp_path / "c.yaml", tiny_model_dir, small_dataset, tmp_path / "out")
    overrides = [
        "ray.in_process=false",
        "invert.resources.num_gpus=1",
        "invert.resources.num_actors=2",
    ]
    with pytest.raises(
        UserError,
        match=r"invert.resources: 2 actor\(s\) x 1 GPU = 2 GPU, but the Ray cluster has 0",
    ):
        run(load_config(config, overrides))


def test_runner_keeps_model_free_stages_small_and_frees_each_pool(ray_session):
    """A stage that does not use torch runs in an actor that never imports it (the shard writer
    stays a small process), and an execution's actor pool has given its CPUs back when `run`
    returns, so that the next stage's pool never shares the machine with it."""
    import numpy as np

    from tailseed.pipeline.runner import RayRunner, Resources, Stage

    class Probe:  # defined here, so that Ray ships it by value
        def __call__(self, batch):
            import sys

            return {"torch_loaded": np.asarray(["torch" in sys.modules])}

    runner = RayRunner()  # joins the test session's Ray (and filters stderr until shut down)
    stage = Stage("probe", Probe, {}, Resources(num_actors=2, num_cpus=0.5))
    try:
        results = list(runner.run({0: {"x": np.zeros(1)}, 1: {"x": np.ones(1)}}, [stage]))
    finally:
        runner.shutdown()  # leaves the session's Ray running: this runner did not start it
    assert [bool(r.batch["torch_loaded"][0]) for r in results] == [False, False]
    free = ray_session.available_resources().get("CPU", 0.0)
    assert free == ray_session.cluster_resources()["CPU"]
