"""The augment job end to end on a tiny model: output contract, determinism, resume after kill -9."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from augment_helpers import shard_files, start_augment, wait_for, write_config
from PIL import Image

from tailseed.jobs.augment import run
from tailseed.pipeline.errors import UserError
from tailseed.stages.augment_pipeline import load_config

pytestmark = [pytest.mark.slow]

KEY = re.compile(r"^[A-Za-z0-9_-]{1,100}$")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, tiny_model_dir, small_dataset):
    tmp = tmp_path_factory.mktemp("run")
    config = write_config(tmp / "c.yaml", tiny_model_dir, small_dataset, tmp / "out")
    report = run(load_config(config))
    return config, tmp / "out", report


def test_output_contract(first_run):
    _, out, report = first_run
    assert report["status"] == "complete"
    assert json.loads((out / "classes.json").read_text()) == {
        "0": "head",
        "1": "rare one",
        "2": "rare.two",
    }
    counts = report["counts"]
    assert counts["samples"] == 12 and counts["shards"] == 3
    assert counts["skipped_sources"] == {"rare one": {"corrupt_image": 1}}
    index = json.loads((out / "shards" / "index.json").read_text())
    assert [s["url"] for s in index["shardlist"]] == ["00000.tar", "00001.tar", "00002.tar"]
    assert sum(s["nsamples"] for s in index["shardlist"]) == 12
    for s in range(3):
        stats = json.loads((out / "shards" / f"{s:05d}_stats.json").read_text())
        assert stats["samples"] == 4 and stats["skipped"] == {}
    assert sorted(p.name for p in out.glob("contact_class_*.png")) == [
        "contact_class_0001.png",
        "contact_class_0002.png",
    ]
    assert "node_ids" in report and report["versions"]["torch"]


def test_shards_read_by_webdataset_and_a_dataloader(first_run):
    import torch

    _, out, _ = first_run
    urls = [str(out / "shards" / f"{s:05d}.tar") for s in range(3)]
    ds = (
        wds.WebDataset(urls, shardshuffle=False)
        .decode("pil")
        .to_tuple("__key__", "png", "cls", "json")
    )
    rows = list(ds)
    keys = [r[0] for r in rows]
    assert len(keys) == 12 == len(set(keys)) and all(KEY.match(k) for k in keys)
    assert {r[2] for r in rows} == {1, 2}
    for key, image, cls, meta in rows:
        assert image.size == (16, 16)
        assert meta["class_index"] == cls and meta["key"] == key and len(meta["sources"]) >= 2
        assert meta["model_hash"] and meta["config_hash"]
    tensors = wds.WebDataset(urls, shardshuffle=False).decode("torchrgb").to_tuple("png", "cls")
    batches = list(torch.utils.data.DataLoader(tensors.batched(4), batch_size=None, num_workers=0))
    assert sum(len(b[1]) for b in batches) == 12 and batches[0][0].shape == (4, 3, 16, 16)


def test_seeds_and_walks_parquet(first_run):
    _, out, _ = first_run
    seeds = pq.read_table(out / "seeds" / "class_0001.parquet").to_pylist()
    assert len(seeds) == 4  # the broken file is skipped, the 4 good ones inverted
    assert all(
        len(r["seed"]) == 4 * 8 * 8 and r["shape"] == [4, 8, 8] and r["nfe"] > 0 for r in seeds
    )
    parts = sorted((out / "walks" / "class_0002").glob("*.parquet"))
    assert [p.name for p in parts] == ["part_00000.parquet"]  # 6 rows: one part of 1024
    walks = pq.read_table(parts[0]).to_pylist()
    assert len(walks) == 6
    source_keys = {
        r["key"] for r in pq.read_table(out / "seeds" / "class_0002.parquet").to_pylist()
    }
    assert all(set(w["sources"]) <= source_keys and w["method"] for w in walks)


def test_generate_cli_regenerates_a_shard_sample(first_run, tmp_path):
    """A generated sample is auditable: `tailseed generate` on its walk row, toned with the run's
    tone/tone.json, gives the image in the shard."""
    from tailseed.stages.tone import ToneStage

    _, out, _ = first_run
    walks = out / "walks" / "class_0001"  # a class's folder of parts
    model = str(json.loads((out / "run.json").read_text())["config"]["model"]["path"])

    def generate(folder: Path, *extra: str) -> subprocess.CompletedProcess:
        argv = ["generate", "--model", model, "--seeds", str(walks), "--out", str(folder), *extra]
        done = subprocess.run(
            [sys.executable, "-m", "tailseed.jobs.cli", *argv],
            cwd=REPO,
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, done.stderr
        return done

    tone_json = out / "tone" / "tone.json"
    assert f"--tone {tone_json}" in generate(tmp_path / "plain").stderr  # the run was toned
    generate(tmp_path / "toned", "--tone", str(tone_json))
    with tarfile.open(out / "shards" / "00000.tar") as tar:
        name = next(m.name for m in tar if m.name.endswith(".png") and m.name.startswith("c0001"))
        in_shard = np.asarray(Image.open(io.BytesIO(tar.extractfile(name).read())), dtype=int)
    plain, toned = (np.asarray(Image.open(tmp_path / d / name)) for d in ("plain", "toned"))
    # --tone is the run's tone stage applied to the image as generated
    summary = json.loads(tone_json.read_text())
    stage = ToneStage(**ToneStage.arguments(summary))
    assert np.array_equal(stage.tone(plain[None], [1])[0], toned)
    # equal to the shard's image up to batch-composition rounding, which histogram matching can
    # turn into a neighbouring rank's value
    diff = np.abs(in_shard - toned.astype(int))
    assert np.mean(diff <= 2) >= 0.99


def test_rerun_is_a_no_op_and_a_second_folder_is_byte_identical(
    first_run, tmp_path, tiny_model_dir, small_dataset
):
    config, out, _ = first_run
    before = shard_files(out)
    run(load_config(config))
    assert shard_files(out) == before
    other = write_config(tmp_path / "c.yaml", tiny_model_dir, small_dataset, tmp_path / "out2")
    run(load_config(other))
    assert shard_files(tmp_path / "out2") == before
    for name in ("class_0001/part_00000.parquet", "class_0002/part_00000.parquet"):
        assert (tmp_path / "out2" / "walks" / name).read_bytes() == (
            out / "walks" / name
        ).read_bytes()


def test_walks_in_small_parts_give_the_same_shards(
    first_run, tmp_path, tiny_model_dir, small_dataset
):
    """walk.chunk_rows bounds the rows per part (and the seeds in memory), not what is made; a
    rerun with another part size rewrites the parts and leaves the done shards alone."""
    _, out, _ = first_run
    other = write_config(
        tmp_path / "c.yaml", tiny_model_dir, small_dataset, tmp_path / "out", walk__chunk_rows=4
    )
    run(load_config(other))
    assert shard_files(tmp_path / "out") == shard_files(out)
    for c in ("class_0001", "class_0002"):
        parts = sorted((tmp_path / "out" / "walks" / c).glob("*.parquet"))
        sizes = [pq.ParquetFile(p).metadata.num_rows for p in parts]
        assert len(parts) == 2 and max(sizes) <= 4 and sum(sizes) == 6
        small = [r for p in parts for r in pq.read_table(p).to_pylist()]
        assert small == pq.read_table(out / "walks" / c / "part_00000.parquet").to_pylist()
    again = write_config(
        tmp_path / "c2.yaml", tiny_model_dir, small_dataset, tmp_path / "out", walk__chunk_rows=5
    )
    run(load_config(again))
    parts = sorted((tmp_path / "out" / "walks" / "class_0001").glob("*.parquet"))
    assert [pq.ParquetFile(p).metadata.num_rows for p in parts] == [5, 1]
    assert shard_files(tmp_path / "out") == shard_files(out)


def test_a_different_config_into_the_same_folder_stops(first_run):
    config, out, _ = first_run
    with pytest.raises(UserError, match="different config"):
        run(load_config(config, ["walk.method=lerp"]))


def test_a_folder_made_by_other_code_stops(first_run, tmp_path):
    import shutil

    config, out, _ = first_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    run_json = json.loads((copy / "run.json").read_text())
    run_json["code_hash"] = "0" * 16
    (copy / "run.json").write_text(json.dumps(run_json))
    with pytest.raises(UserError, match="different version of tailseed's code"):
        run(load_config(config, [f"output_dir={copy}"]))


def test_dry_run_does_no_work(tmp_path, tiny_model_dir, small_dataset, capsys):
    config = write_config(tmp_path / "c.yaml", tiny_model_dir, small_dataset, tmp_path / "out")
    result = run(load_config(config), dry_run=True)
    assert result["estimate"]["images"] == 12 and result["estimate"]["invert_max"] > 0
    assert not (tmp_path / "out").exists()
    printed = capsys.readouterr().out
    assert "rare class 1 'rare one'" in printed and "+6 to generate" in printed
    # the space and a measured time, labelled as the estimate it is
    assert re.search(r"space: walks [0-9.]+ MB, shards at most [0-9.]+ MB", printed)
    assert re.search(r"time \(estimate, UNet evaluations only.*\): inversion <= \d+ s", printed)
    assert "measured: fastest of 3 UNet passes on cpu float32" in printed
    per_nfe = result["seconds_per_nfe"]
    assert 0 < per_nfe["invert"] < 10 and 0 < per_nfe["generate"] < 10
    quiet = run(load_config(config), dry_run=True, timing=False)
    assert quiet["seconds_per_nfe"] is None
    assert "time: not measured (--no-timing)" in capsys.readouterr().out


def test_kill_minus_nine_while_walk_parts_are_written_then_resume(
    tmp_path, tiny_model_dir, small_dataset, first_run
):
    """Really kill the job after a class's first walk part and while its second is unrenamed."""
    _, first_out, _ = first_run
    config = write_config(
        tmp_path / "c.yaml", tiny_model_dir, small_dataset, tmp_path / "out", walk__chunk_rows=2
    )
    walks = tmp_path / "out" / "walks" / "class_0001"
    proc = start_augment(config, {**os.environ, "TAILSEED_SLOW_WRITE_S": "2"})
    wait_for(
        lambda: (walks / "part_00000.parquet").exists() and any(walks.glob(".part_00001.*.tmp")),
        proc,
        "walk part 1 half written",
    )
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (walks / "part_00001.parquet").exists()
    run(load_config(config))
    assert not list((tmp_path / "out").rglob("*.tmp"))
    assert shard_files(tmp_path / "out") == shard_files(first_out)
    for c in ("class_0001", "class_0002"):
        parts = sorted((tmp_path / "out" / "walks" / c).glob("*.parquet"))
        assert [pq.ParquetFile(p).metadata.num_rows for p in parts] == [2, 2, 2]
        rows = [r for p in parts for r in pq.read_table(p).to_pylist()]
        assert rows == pq.read_table(first_out / "walks" / c / "part_00000.parquet").to_pylist()


def test_kill_minus_nine_mid_shard_then_resume(tmp_path, tiny_model_dir, small_dataset, first_run):
    """Really kill the job after shard 0 is done and while shard 1's tar is half written."""
    config = write_config(tmp_path / "c.yaml", tiny_model_dir, small_dataset, tmp_path / "out")
    out = tmp_path / "out" / "shards"
    env = {**os.environ, "TAILSEED_SLOW_WRITE_S": "3"}
    proc = start_augment(config, env)
    wait_for(
        lambda: (out / "00000_stats.json").exists() and any(out.glob(".00001.tar.*.tmp")),
        proc,
        "shard 1 half written",
    )
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "00001_stats.json").exists() and not (out / "00002.tar").exists()
    report = run(load_config(config))
    assert report["counts"]["samples"] == 12
    keys = []
    for s in range(3):
        with tarfile.open(out / f"{s:05d}.tar") as tar:  # each tar is whole: it opens and lists
            keys += [m.name.split(".")[0] for m in tar if m.name.endswith(".png")]
    assert len(keys) == 12 == len(set(keys))
    assert shard_files(tmp_path / "out") == shard_files(first_run[1])  # as if never interrupted


def test_index_json_is_read_by_wids(first_run):
    import wids

    _, out, _ = first_run
    ds = wids.ShardListDataset(str(out / "shards" / "index.json"))
    assert len(ds) == 12
    sample = ds[5]
    assert sample[".cls"] is not None and sample["__key__"]
    info = subprocess.run(
        [
            str(Path(sys.executable).parent / "widsindex"),
            "info",
            str(out / "shards" / "index.json"),
        ],
        capture_output=True,
        text=True,
    )
    assert info.returncode == 0, info.stderr[-2000:]
    assert "first shard: 00000.tar" in info.stdout


def test_prompt_method_generates_from_fresh_seeds_without_inversion(
    tmp_path, tiny_model_dir, small_dataset
):
    config = write_config(
        tmp_path / "c.yaml", tiny_model_dir, small_dataset, tmp_path / "out", walk__method="prompt"
    )
    report = run(load_config(config))
    assert report["counts"]["samples"] == 12
    assert not (tmp_path / "out" / "seeds").exists()
    walks = pq.read_table(tmp_path / "out" / "walks" / "class_0001" / "part_00000.parquet")
    walks = walks.to_pylist()
    assert {w["method"] for w in walks} == {"prompt"} and all(w["sources"] == [] for w in walks)
    norms = [np.linalg.norm(w["seed"]) / np.sqrt(len(w["seed"])) for w in walks]
    assert 0.7 < np.mean(norms) < 1.3  # standard normal seeds
