"""The filter stage: the cross-fitted self-judge, near-copies of real images, best-of-pool per class."""

from __future__ import annotations

import json
import tarfile

import numpy as np
import pytest
from augment_helpers import shard_files, write_config
from PIL import Image

from tailseed.pipeline.datasets import list_dataset
from tailseed.pipeline.self_judge import (
    JudgeTraining,
    near_copy_threshold,
    rms_distances,
    train_self_judge,
    working_images,
)
from tailseed.stages.filter import FilterConfig, FilterStage, prepare


def _bars(n: int, column: int, seed: int) -> np.ndarray:
    """n noisy 16x16 images with a bright vertical bar at `column`: a class a CNN can learn."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 50, (n, 16, 16, 3), dtype=np.uint8)
    images[:, :, column : column + 3] = 220
    return images


def test_self_judge_is_cross_fitted_and_deterministic():
    images = np.concatenate([_bars(12, 2, 0), _bars(12, 10, 1)])
    labels = np.asarray([0] * 12 + [1] * 12)
    cfg = JudgeTraining(folds=3, steps=60, seed=0)
    judge = train_self_judge(images, labels, 2, cfg)
    assert len(judge.models) == 3
    assert judge.oof_accuracy > 0.9  # out-of-fold: each image judged by a model that never saw it
    fresh = np.concatenate([_bars(4, 2, 7), _bars(4, 10, 8)])
    scores = judge.score(fresh, np.asarray([0] * 4 + [1] * 4))
    wrong = judge.score(fresh, np.asarray([1] * 4 + [0] * 4))
    assert (scores > wrong).all()
    again = train_self_judge(images, labels, 2, cfg)
    for name, tensor in judge.state().items():
        assert (tensor == again.state()[name]).all()


def test_distances_and_threshold_do_not_depend_on_the_thread_count():
    """They land in every kept sample's JSON, so a run must write the same bytes whatever
    torch's thread count is when it computes them (a stage or an earlier run in the same
    process may have changed it): float32 cdist in its matrix-product form did not."""
    import torch

    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (80, 32, 32, 3), dtype=np.uint8)
    labels = np.repeat([0, 1], 40)
    candidates = working_images(rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8))
    refs = working_images(images)
    threads = torch.get_num_threads()
    seen = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            seen.append(
                (
                    near_copy_threshold(images, labels, 5.0),
                    rms_distances(candidates, refs).tobytes(),
                )
            )
    finally:
        torch.set_num_threads(threads)
    assert seen[1] == seen[0] and seen[2] == seen[0]


def test_a_copy_of_a_real_image_is_below_the_near_copy_threshold():
    images = np.concatenate([_bars(10, 2, 0), _bars(10, 10, 1)])
    labels = np.asarray([0] * 10 + [1] * 10)
    threshold = near_copy_threshold(images, labels, 5.0)
    assert threshold > 0
    refs = working_images(images)
    distances = rms_distances(working_images(np.concatenate([images[:1], _bars(1, 6, 9)])), refs)
    assert distances[0] == 0.0 < threshold < distances[1]


@pytest.fixture(scope="module")
def prepared(small_dataset, tmp_path_factory):
    folder = tmp_path_factory.mktemp("filter")
    listing = list_dataset(small_dataset)
    config = FilterConfig(enabled=True, pool_factor=2, judge_steps=30)
    summary = prepare(config, listing, 16, "image", folder, log=lambda _: None)
    return folder, summary, listing


def test_prepare_counts_what_it_skipped_and_is_reused(prepared, small_dataset):
    folder, summary, listing = prepared
    assert summary["real_images"] == 32  # 25 + 4 + 3 usable images; one broken file skipped
    assert summary["real_images_skipped"] == {"corrupt_image": 1}
    assert 0 <= summary["judge_out_of_fold_accuracy"] <= 1
    mtime = (folder / "judge.safetensors").stat().st_mtime_ns
    config = FilterConfig(enabled=True, pool_factor=2, judge_steps=30)
    assert prepare(config, listing, 16, "image", folder) == summary  # a rerun reuses it
    assert (folder / "judge.safetensors").stat().st_mtime_ns == mtime


def test_filter_stage_drops_near_copies_and_keeps_the_best_per_class(prepared, small_dataset):
    folder, summary, _ = prepared
    stage = FilterStage(
        str(folder / summary["judge"]),
        str(folder / summary["references"]),
        summary["class_indices"],
        summary["folds"],
        summary["near_copy_threshold"],
        2,
    )
    real = np.asarray(Image.open(small_dataset / "rare one" / "000.png").convert("RGB"))
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)
    images[0] = real  # an exact copy of a real image of its class
    batch = {
        "key": np.asarray([f"k{i}" for i in range(6)]),
        "image": images,
        "ok": np.asarray([True, True, True, True, False, True]),
        "cls": np.asarray([1, 1, 1, 1, 2, 2]),
        "slots": np.asarray([2, 2, 2, 2, 1, 1]),
        "meta": np.asarray([json.dumps({"key": f"k{i}"}) for i in range(6)]),
    }
    out = stage(batch)
    assert out["skip_reason"][0] == "near_copy" and not out["ok"][0]
    assert out["ok"][:4].sum() == 2 and list(out["skip_reason"][:4]).count("not_kept") == 1
    assert out["ok"][4:].tolist() == [False, True]  # a failed candidate is not revived
    assert out["skip_reason"][4] == ""  # ...and keeps its own reason (generation_failed)
    kept = [json.loads(m) for m, ok in zip(out["meta"], out["ok"]) if ok]
    for sample in kept:
        scores = sample["filter"]
        assert 0 <= scores["judge_score"] <= 1
        assert scores["nearest_real_distance"] >= scores["near_copy_threshold"]
    ranked = [
        json.loads(out["meta"][i])["filter"]["judge_score"] for i in (1, 2, 3) if out["ok"][i]
    ]
    dropped = [i for i in (1, 2, 3) if out["skip_reason"][i] == "not_kept"]
    judge_scores = stage.judge.score(
        images, np.asarray([stage.position[int(c)] for c in batch["cls"]])
    )
    assert min(ranked) >= judge_scores[dropped[0]] - 1e-6


@pytest.mark.slow
def test_augment_with_the_filter_end_to_end(tmp_path, tiny_model_dir, small_dataset):
    from tailseed.jobs.augment import run
    from tailseed.stages.augment_pipeline import load_config

    overrides = [
        "filter.enabled=true",
        "filter.pool_factor=2",
        "filter.judge_steps=30",
        "walk.perturb_angle=0.5",
    ]
    config = write_config(tmp_path / "c.yaml", tiny_model_dir, small_dataset, tmp_path / "a")
    report = run(load_config(config, overrides))
    dropped = report["counts"]["dropped_by_filter"]
    kept = report["counts"]["samples"]
    assert kept + sum(dropped.values()) == 2 * 12  # 12 planned images, 2 candidates each
    assert kept <= 12 and (kept == 12 or dropped.get("near_copy", 0) > 0)
    assert report["filter"]["near_copy_threshold"] > 0
    for tar_path in sorted((tmp_path / "a" / "shards").glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar:
                if member.name.endswith(".json"):
                    sample = json.loads(tar.extractfile(member).read())
                    assert sample["perturb_angle"] == 0.5
                    assert set(sample["filter"]) >= {"judge_score", "nearest_real_distance"}
    # the same config into another folder: the same judge, the same shards, byte for byte
    other = write_config(tmp_path / "c2.yaml", tiny_model_dir, small_dataset, tmp_path / "b")
    run(load_config(other, overrides))
    assert shard_files(tmp_path / "b") == shard_files(tmp_path / "a")
