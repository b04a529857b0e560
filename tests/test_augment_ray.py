"""The augment job on a local Ray: same shards as in-process, readable by Ray Data's own reader."""

from __future__ import annotations

import yaml
from augment_helpers import shard_files, write_config

from jobs.augment import load_config, run


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

    tars = sorted(str(p) for p in (tmp_path / "ray" / "shards").glob("*.tar"))
    ds = ray_session.data.read_webdataset(tars, decoder=None)
    rows = ds.take_all()
    assert len(rows) == 12
    assert {
        int(r["cls"]) if not isinstance(r["cls"], bytes) else int(r["cls"].decode()) for r in rows
    } == {1, 2}
