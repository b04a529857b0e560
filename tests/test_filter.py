"""The filter stage: the cross-fitted self-judge, near-copies of real images, best-of-pool per class."""

from __future__ import annotations

import json
import tarfile

import numpy as np
import pytest
from augment_helpers import shard_files, write_config
from PIL import Image

from tailseed.pipeline.datasets import list_dataset
from tailseed.pipeline.errors import UserError
from tailseed.pipeline.self_judge import (
    JudgeTraining,
    near_copy_threshold,
    rms_distances,
    train_self_judge,
    working_images,
)
from tailseed.stages.filter import FilterConfig, FilterStage, prepare, spread, uncertain


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
        floor=0.0,  # random candidates: no floor, the near-copy test and the ranking alone
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


def test_augment_with_a_floor_writes_no_candidate_below_it_and_says_which_class_fell_short(
    tmp_path, tiny_model_dir, small_dataset, capsys
):
    """The tiny random model draws noise, which the judge cannot take for any class: at a floor of
    0.999 the classes get fewer images than their quota, every one written reaches the floor, and
    the run counts the rest and names the short classes."""
    from tailseed.jobs.augment import run
    from tailseed.stages.augment_pipeline import load_config

    overrides = ["filter.enabled=true", "filter.pool_factor=2", "filter.judge_steps=30"]
    config = write_config(tmp_path / "c.yaml", tiny_model_dir, small_dataset, tmp_path / "a")
    report = run(load_config(config, [*overrides, "filter.floor=0.999"]))
    counts = report["counts"]
    assert counts["samples"] + sum(counts["dropped_by_filter"].values()) == 2 * 12
    assert counts["dropped_by_filter"]["below_floor"] > 0
    short = [c for c, v in counts["augmented_classes"].items() if v["generated"] < 6]
    assert short  # 12 planned images: 6 for each of the two rare classes
    for tar_path in sorted((tmp_path / "a" / "shards").glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar:
                if member.name.endswith(".json"):
                    sample = json.loads(tar.extractfile(member).read())
                    assert sample["filter"]["judge_score"] >= 0.999
    said = capsys.readouterr().out
    for name in short:
        assert f"class {name!r}: " in said and "below filter.floor=0.999" in said


def test_spread_takes_passing_candidates_far_from_the_real_images_and_from_each_other():
    # four candidates on a line at the working resolution (1x1 pixel): the real images sit at 0
    images = np.asarray([0.1, 0.9, 0.85, 0.5, 1.0], np.float32)[:, None, None, None]
    images = np.repeat(images, 3, axis=3)  # (5, 1, 1, 3)
    nearest = images[:, 0, 0, 0].copy()  # distance to the real images at 0
    score = np.asarray([0.99, 0.95, 0.97, 0.92, 0.2])  # the last fails min_score
    rows = [0, 2, 1, 3, 4]  # ranked by score
    order = spread(rows, score, nearest, images, min_score=0.9)
    # the farthest passing one (0.9), then the one farthest from it and the reals (0.5), then 0.1
    # (0.1 from the reals, 0.4 from 0.5; 0.85 is 0.05 from 0.9), then 0.85; the failing one last
    assert order == [1, 3, 0, 2, 4]
    # with nothing passing, the ranked order stands
    assert spread(rows, score, nearest, images, min_score=1.0) == rows


def test_uncertain_takes_the_lowest_passing_scores_first_then_the_rest_best_first():
    score = np.asarray([0.99, 0.6, 0.97, 0.92, 0.2, 0.4, 0.6])
    rows = [0, 2, 3, 1, 6, 5, 4]  # ranked: best first, equal scores by key
    # passing (>= 0.5) from the lowest up, equal scores in their ranked order; then the failing
    # ones best first
    assert uncertain(rows, score, min_score=0.5) == [1, 6, 3, 2, 0, 5, 4]
    assert uncertain(rows, score, min_score=1.0) == rows  # nothing passes: the ranked order
    assert uncertain(rows, score, min_score=0.0) == [4, 5, 1, 6, 3, 2, 0]


def test_the_keep_rule_is_checked_and_recorded_only_when_not_the_default():
    with pytest.raises(UserError, match="keep"):
        FilterConfig(keep="random").validate("filter")
    with pytest.raises(UserError, match="min_score"):
        FilterConfig(min_score=1.5).validate("filter")
    from tailseed.pipeline.config import config_hash

    assert config_hash(FilterConfig()) == config_hash(FilterConfig(min_score=0.9))
    assert config_hash(FilterConfig()) != config_hash(FilterConfig(keep="spread"))
    assert config_hash(FilterConfig(keep="uncertain")) != config_hash(FilterConfig(keep="spread"))


def one_class_batch(prepared, n: int, slots: int, pool_factor: int, seed: int):
    """The prepared filter's FilterStage arguments (with `pool_factor`), and a batch of `n` random
    candidates of class 1 with `slots` to keep: (args, images, batch)."""
    folder, summary, _ = prepared
    args = (
        str(folder / summary["judge"]),
        str(folder / summary["references"]),
        summary["class_indices"],
        summary["folds"],
        summary["near_copy_threshold"],
        pool_factor,
    )
    images = np.random.default_rng(seed).integers(0, 256, (n, 16, 16, 3), dtype=np.uint8)
    batch = {
        "key": np.asarray([f"k{i}" for i in range(n)]),
        "image": images,
        "ok": np.ones(n, bool),
        "cls": np.ones(n, np.int64),
        "slots": np.full(n, slots),
        "meta": np.asarray([json.dumps({"key": f"k{i}"}) for i in range(n)]),
    }
    return args, images, batch


def test_filter_stage_with_spread_keeps_a_far_passing_candidate_over_a_better_scored_near_one(
    prepared, small_dataset
):
    args, images, batch = one_class_batch(prepared, n=6, slots=2, pool_factor=2, seed=5)
    best = FilterStage(*args, floor=0.0)  # random candidates: the keep rules alone, no floor
    loose = FilterStage(*args, keep="spread", min_score=0.0, floor=0.0)  # every candidate passes
    out = loose(dict(batch))
    by_rank = {json.loads(out["meta"][i])["filter"]["rank"]: i for i in np.flatnonzero(out["ok"])}
    working = working_images(images)
    nearest = rms_distances(working, loose.references)
    assert by_rank[0] == int(np.argmax(nearest))  # the farthest from every real image first
    gap = np.minimum(nearest, rms_distances(working, working[by_rank[0] : by_rank[0] + 1]))
    gap[by_rank[0]] = -1
    assert by_rank[1] == int(np.argmax(gap))  # then the farthest from the reals and the first
    meta = [json.loads(out["meta"][i])["filter"] for i in by_rank.values()]
    assert {m["keep"] for m in meta} == {"spread"} and {m["min_score"] for m in meta} == {0.0}
    plain = best(dict(batch))
    assert all("keep" not in json.loads(m).get("filter", {}) for m in plain["meta"])


def test_filter_stage_with_uncertain_keeps_the_lowest_scored_candidates_above_the_floor(
    prepared, small_dataset
):
    args, images, batch = one_class_batch(prepared, n=9, slots=3, pool_factor=3, seed=7)
    best = FilterStage(*args, floor=0.0)  # random candidates: the keep rules alone, no floor
    scores = best.judge.score(images, np.full(9, best.position[1]))
    threshold = float(np.median(scores))  # about half the candidates pass
    stage = FilterStage(*args, keep="uncertain", min_score=threshold, floor=0.0)
    out = stage(dict(batch))
    kept = np.flatnonzero(out["ok"])
    passing = np.flatnonzero(scores >= threshold)
    # the three lowest of the passing scores, ranked from the lowest up
    want = sorted(passing, key=lambda i: scores[i])[:3]
    by_rank = {json.loads(out["meta"][i])["filter"]["rank"]: int(i) for i in kept}
    assert [by_rank[r] for r in range(3)] == [int(i) for i in want]
    meta = [json.loads(out["meta"][i])["filter"] for i in kept]
    assert {m["keep"] for m in meta} == {"uncertain"} and {m["min_score"] for m in meta} == {
        threshold
    }
    # best keeps the three highest instead
    top = np.flatnonzero(best(dict(batch))["ok"])
    assert set(top) == set(np.argsort(-scores)[:3])


@pytest.mark.parametrize("keep", ["best", "uncertain"])
def test_filter_stage_never_writes_a_candidate_below_the_floor_even_with_slots_left(
    prepared, small_dataset, keep
):
    args, images, batch = one_class_batch(prepared, n=9, slots=4, pool_factor=3, seed=11)
    scores = FilterStage(*args, floor=0.0).judge.score(images, np.full(9, 1))
    floor = float(np.sort(scores)[-2])  # exactly two candidates reach it
    out = FilterStage(*args, keep=keep, min_score=0.0, floor=floor)(dict(batch))
    kept = np.flatnonzero(out["ok"])
    assert set(kept) == set(np.argsort(-scores)[:2])  # 2 of 4 slots: no other class fills them
    assert sorted(out["skip_reason"][~out["ok"]]) == ["below_floor"] * 7
    assert {json.loads(out["meta"][i])["filter"]["floor"] for i in kept} == {floor}
    # without a floor the four slots are filled from the same pool, and no floor is recorded
    filled = FilterStage(*args, keep=keep, min_score=0.0, floor=0.0)(dict(batch))
    assert filled["ok"].sum() == 4
    assert all(
        "floor" not in json.loads(filled["meta"][i])["filter"] for i in np.flatnonzero(filled["ok"])
    )


def test_filter_floor_is_validated_and_stays_out_of_the_config_hash_at_its_default():
    from tailseed.pipeline.config import config_hash

    with pytest.raises(UserError, match="filter.floor"):
        FilterConfig(floor=1.5).validate("filter")
    assert config_hash(FilterConfig(floor=0.0)) == config_hash(FilterConfig())
    assert config_hash(FilterConfig(floor=0.5)) != config_hash(FilterConfig())
