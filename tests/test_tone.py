"""The tone stage: gray when the real images are, each class's histogram, rank for rank."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
from augment_helpers import write_config
from PIL import Image

from tailseed.pipeline.datasets import list_dataset
from tailseed.pipeline.errors import UserError
from tailseed.stages.tone import (
    ToneConfig,
    ToneStage,
    histograms,
    is_gray,
    match_to,
    prepare,
    to_gray,
)


@pytest.fixture(scope="module")
def gray_dataset(small_dataset, tmp_path_factory):
    """small_dataset's readable images saved as gray PNGs (mode L), the broken file left out."""
    root = tmp_path_factory.mktemp("gray")
    for png in sorted(small_dataset.glob("*/*.png")):
        if png.name == "broken.png":
            continue
        (root / png.parent.name).mkdir(exist_ok=True)
        Image.open(png).convert("L").save(root / png.parent.name / png.name)
    return root


def test_matched_images_keep_their_ranking_and_take_the_reference_histogram():
    rng = np.random.default_rng(0)
    reference = rng.integers(0, 256, (1, 8, 8, 3), dtype=np.uint8)
    images = rng.integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    out = match_to(images, histograms(reference, 3))
    for i in range(2):
        for c in range(3):
            src, got = images[i, ..., c].reshape(-1), out[i, ..., c].reshape(-1)
            # same pixel count as the reference: exactly its values
            assert np.array_equal(np.sort(got), np.sort(reference[0, ..., c].reshape(-1)))
            order = np.argsort(src, kind="stable")
            assert np.all(np.diff(got[order].astype(int)) >= 0)  # brighter stays brighter


def test_one_gray_histogram_gives_gray_images_with_its_shares():
    reference = np.zeros((4, 10, 10, 3), np.uint8)
    reference[:, :, 5:] = 255  # half black, half white
    rng = np.random.default_rng(1)
    images = to_gray(rng.integers(0, 256, (3, 10, 10, 3), dtype=np.uint8))
    out = match_to(images, histograms(reference, 1))
    assert is_gray(out) and not is_gray(rng.integers(0, 256, (1, 2, 2, 3), dtype=np.uint8))
    assert set(np.unique(out)) == {0, 255}
    assert all((im[..., 0] == 0).mean() == 0.5 for im in out)


def test_prepare_decides_gray_from_the_real_images(small_dataset, gray_dataset, tmp_path):
    quiet = {"log": lambda _: None}
    auto = ToneConfig(gray="auto", match_histogram=True)
    colour = prepare(
        auto, list_dataset(small_dataset), [1, 2], 16, "image", tmp_path / "c", **quiet
    )
    assert colour["real_images_gray"] is False and colour["gray"] is False
    assert colour["real_images_skipped"] == {"corrupt_image": 1}
    assert len(colour["histograms"]["1"]) == 3 and colour["reference_images"]["1"] == 4
    listing = list_dataset(gray_dataset)
    gray = prepare(auto, listing, [1, 2], 16, "image", tmp_path / "g", **quiet)
    assert gray["gray"] is True and len(gray["histograms"]["2"]) == 1
    assert sum(gray["histograms"]["2"][0]) == 3 * 16 * 16
    forced = prepare(
        ToneConfig(gray="always", match_histogram=False),
        list_dataset(small_dataset),
        [1],
        16,
        "image",
        tmp_path / "a",
        **quiet,
    )
    assert forced["gray"] is True and "histograms" not in forced
    # a rerun reuses the folder's decision
    assert prepare(ToneConfig(gray="never"), listing, [1], 16, "image", tmp_path / "g") == gray


def test_a_class_without_a_readable_image_is_named(small_dataset, tmp_path):
    with pytest.raises(UserError, match=r"class \[7\]"):
        prepare(
            ToneConfig(match_histogram=True),
            list_dataset(small_dataset),
            [1, 7],
            16,
            "image",
            tmp_path,
            log=lambda _: None,
        )


def test_an_unknown_gray_setting_is_refused(tmp_path, tiny_model_dir, small_dataset):
    from tailseed.stages.augment_pipeline import load_config

    config = write_config(tmp_path / "c.yaml", tiny_model_dir, small_dataset, tmp_path / "a")
    with pytest.raises(UserError, match=r"tone.gray is 'off'; one of never, auto, always"):
        load_config(config, ["tone.gray=off"])


def test_the_stage_tones_the_rows_that_are_ok_and_says_so():
    reference = np.zeros((1, 4, 4, 3), np.uint8)
    reference[0, 2:] = 200
    stage = ToneStage(gray=True, histograms={"1": histograms(reference, 1)})
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (3, 4, 4, 3), dtype=np.uint8)
    batch = {
        "key": np.asarray(["a", "b", "c"]),
        "image": images,
        "ok": np.asarray([True, False, True]),
        "cls": np.asarray([1, 1, 2]),
        "meta": np.asarray([json.dumps({"key": k}) for k in "abc"]),
    }
    out = stage(batch)
    assert np.array_equal(out["image"][1], images[1])  # a row not kept is left as it was
    assert set(np.unique(out["image"][0])) == {0, 200}  # its class's histogram
    assert is_gray(out["image"][[0, 2]]) and np.array_equal(out["image"][2], to_gray(images[2:])[0])
    tones = [json.loads(m).get("tone") for m in out["meta"]]
    assert tones == [{"gray": True, "histogram": "class"}, None, {"gray": True, "histogram": None}]


def test_tone_is_on_by_default_and_out_of_the_hash_only_when_off(
    tmp_path, tiny_model_dir, small_dataset
):
    from tailseed.pipeline.config import hashed_dict
    from tailseed.stages.augment_pipeline import load_config, output_hash, shard_stages

    config = write_config(tmp_path / "c.yaml", tiny_model_dir, small_dataset, tmp_path / "a")
    plain = load_config(config)
    assert plain.tone.enabled
    off = load_config(config, ["tone.gray=never", "tone.match_histogram=false"])
    assert "tone" not in [s.name for s in shard_stages(off, tmp_path / "a" / "shards")]
    # off is what a run was before the stage existed: its hash has no tone section, so a folder
    # written then keeps its hash; the default (on) is another output and another hash
    assert "tone" not in hashed_dict(off) and "tone" in hashed_dict(plain)
    assert output_hash(plain) != output_hash(off)
    assert output_hash(load_config(config, ["tone.gray=never"])) not in {
        output_hash(plain),
        output_hash(off),
    }


@pytest.mark.slow
def test_augment_with_tone_end_to_end(tmp_path, tiny_model_dir, gray_dataset):
    from tailseed.jobs.augment import run
    from tailseed.stages.augment_pipeline import load_config

    config = write_config(tmp_path / "c.yaml", tiny_model_dir, gray_dataset, tmp_path / "a")
    overrides = ["tone.gray=auto", "tone.match_histogram=true", "filter.enabled=true"]
    report = run(load_config(config, [*overrides, "filter.pool_factor=2", "filter.judge_steps=30"]))
    assert report["tone"]["gray"] is True
    summary = json.loads((tmp_path / "a" / "tone" / "tone.json").read_text())
    seen = 0
    for tar_path in sorted((tmp_path / "a" / "shards").glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}
        for name, data in members.items():
            if not name.endswith(".png"):
                continue
            sample = json.loads(members[name[: -len("png")] + "json"])
            cls = int(members[name[: -len("png")] + "cls"])
            image = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
            assert is_gray(image[None]) and sample["tone"] == {"gray": True, "histogram": "class"}
            # the image's values are its class's real values at the image's quantiles
            reference = np.asarray(summary["histograms"][str(cls)][0])
            assert set(np.unique(image)) <= set(np.flatnonzero(reference))
            seen += 1
    assert seen == report["counts"]["samples"] > 0
