"""The shard writer, read back by independent readers (tarfile, webdataset)."""

from __future__ import annotations

import json
import tarfile

import numpy as np
import pytest
import webdataset as wds

from tailseed.pipeline.images import encode_png
from tailseed.pipeline.runner import pack, unpack
from tailseed.pipeline.shards import read_stats, shard_done, tar_bytes, write_index, write_shard


def samples(n: int) -> list[dict]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        image = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
        meta = json.dumps({"class_name": "a b.c/ü", "i": i})
        out.append(
            {
                "__key__": f"c0001_w{i:05d}_abc",
                "png": encode_png(image),
                "cls": b"1",
                "json": meta.encode(),
            }
        )
    return out


def test_same_samples_give_identical_bytes():
    assert tar_bytes(samples(3)) == tar_bytes(samples(3))


def test_keys_with_dots_are_refused():
    bad = samples(1)
    bad[0]["__key__"] = "a.b"
    with pytest.raises(ValueError, match="dot"):
        tar_bytes(bad)


def test_write_then_read_with_tarfile_and_webdataset(tmp_path):
    write_shard(tmp_path, 0, samples(4), {"samples": 4, "skipped": {}})
    assert shard_done(tmp_path, 0) and read_stats(tmp_path, 0)["samples"] == 4
    with tarfile.open(tmp_path / "00000.tar") as tar:
        members = tar.getmembers()
    assert [m.name for m in members[:3]] == [
        "c0001_w00000_abc.png",
        "c0001_w00000_abc.cls",
        "c0001_w00000_abc.json",
    ]
    assert all(m.mtime == 0 and m.uid == 0 and m.uname == "" for m in members)
    ds = (
        wds.WebDataset(str(tmp_path / "00000.tar"), shardshuffle=False)
        .decode("pil")
        .to_tuple("png", "cls", "json")
    )
    rows = list(ds)
    assert len(rows) == 4
    image, cls, meta = rows[2]
    assert image.size == (8, 8) and cls == 1 and meta["class_name"] == "a b.c/ü"
    index = write_index(tmp_path, 2)  # shard 1 is not done: not indexed
    size = (tmp_path / "00000.tar").stat().st_size  # widsindex reads the size of each shard
    assert index["shardlist"] == [{"url": "00000.tar", "nsamples": 4, "filesize": size}]


def test_pack_roundtrip_keeps_bytes_and_strings():
    batch = {
        "key": np.asarray(["a", "b"]),
        "png": np.asarray([b"\x00x\x00", b""], dtype=object),
        "seed": np.ones((2, 4, 2, 2), np.float32),
    }
    out = unpack(pack(batch))
    assert list(out["key"]) == ["a", "b"] and list(out["png"]) == [b"\x00x\x00", b""]
    assert np.array_equal(out["seed"], batch["seed"])


def test_the_writer_stage_does_not_import_torch():
    """The writer actor stays a small process: neither it nor the runner pulls in torch."""
    import subprocess
    import sys

    code = "import sys, stages.write, pipeline.runner; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


class _ThreadProbe:  # module level: the in-process runner needs no pickling
    def __call__(self, batch):
        import torch

        return {"threads": np.asarray([torch.get_num_threads()])}


class _PassThrough:
    def __call__(self, batch):
        return batch


def test_in_process_stages_each_run_with_their_own_threads():
    """Stages that share one process (the in-process runner, the benchmarks' floor) each run with
    the torch threads their resources give them, whatever the stage built after them set."""
    import torch  # noqa: F401 - the probe's threads are torch's

    from tailseed.pipeline.runner import LocalRunner, Resources, Stage

    stages = [
        Stage("model", _ThreadProbe, {}, Resources(num_cpus=1.5)),
        Stage("writer", _PassThrough, {}, Resources(num_cpus=0.25)),
    ]
    (result,) = list(LocalRunner().run({0: {"x": np.zeros(1)}}, stages))
    assert int(result.batch["threads"][0]) == 2
