"""Behaviour of the evaluation's parts: the CNN, the baselines, the shard reader, novelty, targets."""

from __future__ import annotations

import io
import json
import pickle
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.shards import write_index, write_shard
from research.classifier import (
    ClassicAugment,
    TrainRecipe,
    oversample,
    predict,
    train_classifier,
)
from research.digits import DigitsSplit, load_digits_arrays, render, split_indices
from research.evaluate import (
    Data,
    Variant,
    accuracies,
    generated_by_digit,
    image_quality,
    read_image_folder,
    read_shards,
    targets,
    walk_kind,
)


def bars(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A trivially separable toy set: class 0 has a bright left bar, class 1 a bright right bar."""
    labels = rng.integers(0, 2, n)
    images = rng.integers(0, 40, (n, 32, 32, 3)).astype(np.uint8)
    for i, label in enumerate(labels):
        cols = slice(4, 10) if label == 0 else slice(22, 28)
        images[i, 4:28, cols] = 230
    return images, labels


def png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------
# The CNN


def test_cnn_learns_a_separable_toy_set():
    rng = np.random.default_rng(0)
    x, y = bars(64, rng)
    model = train_classifier(x, y, TrainRecipe(steps=40, batch_size=16), seed=0, num_classes=2)
    x_new, y_new = bars(50, rng)
    assert (predict(model, x_new) == y_new).mean() == 1.0


def test_training_is_determined_by_its_seed():
    x, y = bars(32, np.random.default_rng(1))
    recipe = TrainRecipe(steps=3, batch_size=8)
    a, b, c = (train_classifier(x, y, recipe, seed=s, num_classes=2) for s in (5, 5, 6))
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    assert not torch.equal(next(a.parameters()), next(c.parameters()))


# ------------------------------------------------------------------------------------------------
# Baselines add exactly the requested count


def test_oversample_copies_each_image_equally_often():
    images = np.arange(10, dtype=np.uint8)[:, None, None, None] * np.ones((1, 4, 4, 3), np.uint8)
    out = oversample(images, 40)
    assert out.shape == (40, 4, 4, 3)
    assert np.bincount(out[:, 0, 0, 0], minlength=10).tolist() == [4] * 10


def test_classic_augment_gives_the_count_and_changes_the_images():
    images, _ = bars(10, np.random.default_rng(2))
    augment = ClassicAugment()
    out = augment(images, 40, torch.Generator().manual_seed(0))
    again = augment(images, 40, torch.Generator().manual_seed(0))
    assert out.shape == (40, 32, 32, 3) and out.dtype == np.uint8
    assert np.array_equal(out, again)
    assert not np.array_equal(out[:10], images)


def test_classic_augment_with_no_strength_is_the_identity():
    images, _ = bars(5, np.random.default_rng(3))
    still = ClassicAugment(degrees=0, scale=(1, 1), shear_degrees=0, pad=0, noise_std=0)
    out = still(images, 10, torch.Generator().manual_seed(0))
    assert np.abs(out.astype(int) - images[np.arange(10) % 5]).max() <= 1


# ------------------------------------------------------------------------------------------------
# Reading what was written


def test_shard_reader_returns_the_images_and_labels_written(tmp_path):
    rng = np.random.default_rng(4)
    classes = {0: "four", 1: "seven"}  # dataset class index -> name, as in classes.json
    written = {4: [], 7: []}
    for s in range(2):
        samples = []
        for i in range(3):
            cls = (s + i) % 2
            image = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
            written[4 if cls == 0 else 7].append(image)
            samples.append(
                {
                    "__key__": f"s{s}_{i}",
                    "png": png(image),
                    "cls": str(cls).encode(),
                    "json": b"{}",
                }
            )
        write_shard(tmp_path / "shards", s, samples, {"samples": 3})
    write_index(tmp_path / "shards", 2)
    (tmp_path / "classes.json").write_text(json.dumps({str(k): v for k, v in classes.items()}))
    read = generated_by_digit(tmp_path)
    assert sorted(read) == [4, 7]
    for digit, images in written.items():
        assert np.array_equal(read[digit], np.stack(images))


class Boom:
    def __reduce__(self):
        return (pytest.fail, ("a pickle member was unpickled",))


def test_shard_reader_never_unpickles(tmp_path):
    image = np.zeros((32, 32, 3), np.uint8)
    members = {
        "a.png": png(image),
        "a.cls": b"3",
        "a.json": b'{"k": 1}',
        "a.pyd": pickle.dumps(Boom()),
    }
    shards = tmp_path / "shards"
    shards.mkdir()
    with tarfile.open(shards / "00000.tar", "w") as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    (shards / "index.json").write_text(
        json.dumps({"shardlist": [{"url": "00000.tar", "nsamples": 1}]})
    )
    (sample,) = read_shards(shards)
    assert sample["cls"] == 3 and sample["meta"] == {"k": 1}
    assert "pyd" not in sample and sample["image"].shape == (32, 32, 3)


def test_image_folder_maps_digit_words_to_labels(tmp_path):
    for name, count in (("seven", 2), ("zero", 1)):
        (tmp_path / name).mkdir()
        for i in range(count):
            Image.fromarray(np.full((32, 32, 3), i, np.uint8)).save(tmp_path / name / f"{i}.png")
    images, labels = read_image_folder(tmp_path)
    assert images.shape == (3, 32, 32, 3)
    assert labels.tolist() == [7, 7, 0]


# ------------------------------------------------------------------------------------------------
# Novelty and accuracies on constructed examples


class ConstantJudge:
    """Says every image is `digit` (the SVC itself is research/judge.py's concern)."""

    def __init__(self, digit: int):
        self.digit = digit

    def predict(self, images: np.ndarray) -> np.ndarray:
        return np.full(len(images), self.digit)


def test_copies_of_sources_are_near_copies_and_blank_images_are_not():
    split = DigitsSplit()
    images8, labels = load_digits_arrays()
    user = [i for i in split_indices(labels, split)["user"] if labels[i] == 4]
    sources = np.stack([np.asarray(render(images8[i])) for i in user])
    data = Data(sources, np.full(len(user), 4), sources[:0], np.zeros(0, int), [4], 40)
    added = {4: np.concatenate([oversample(sources, 20), np.zeros((20, 32, 32, 3), np.uint8)])}
    card = {"split": {k: getattr(split, k) for k in split.__dataclass_fields__}}
    pair = {"sources": ["a", "b"], "weights": [0.9, 0.1]}
    fresh = {"sources": [], "weights": []}
    provenance = {4: [pair] * 20 + [fresh] * 20}
    quality = image_quality(added, data, ConstantJudge(4), card, provenance)
    four = quality["per_class"]["four"]
    assert quality["near_copies"] == 0.5
    assert four["near_copy_threshold"] > 0
    assert quality["judged_in_class"] == 1.0
    assert quality["near_copies_by_walk"] == {
        "fresh seed": {"images": 20, "near_copies": 0},
        "pair, max weight >= 0.7": {"images": 20, "near_copies": 20},
    }
    assert four["median_source_to_other_source"] > four["near_copy_threshold"] * 0.5


def test_accuracies_split_rare_and_head():
    labels = np.asarray([4, 4, 7, 7, 0, 1, 2, 3])
    predicted = np.asarray([4, 0, 7, 7, 0, 1, 2, 9])
    acc = accuracies(predicted, labels, [4, 7])
    assert acc == {"rare": 0.75, "head": 0.75, "overall": 0.75, "four": 0.5, "seven": 1.0}


def test_targets_report_margins():
    def entry(rare, rare_std, head, judged=None, copies=None):
        accuracy = {
            "rare": {"mean": rare, "std": rare_std},
            "head": {"mean": head, "std": 0.5},
        }
        out = {"accuracy": accuracy}
        if judged is not None:
            out["quality"] = {"judged_in_class": judged, "near_copies": copies}
        return out

    results = {
        "real_only": entry(50, 2, 95),
        "prompt": entry(60, 2, 95, judged=0.3, copies=0.0),
        "default": entry(70, 3, 94.5, judged=0.95, copies=0.1),
    }
    variants = [
        Variant("real_only", "real data only", "none", baseline=True),
        Variant("prompt", "plain prompts", "generated", baseline=True),
        Variant("default", "default", "generated"),
    ]
    values = targets(results, variants)
    assert values[0]["margin"] == 5.0 and values[0]["met"]  # 20 points over real only
    assert values[1]["met"] and values[2]["met"]  # 20 > 5 and 10 > 5
    assert values[3]["met"]  # head within one point
    assert values[4]["met"] and values[5]["margin"] == 35.0
    assert not values[6]["met"]  # 10% near-copies


def test_walk_kind_groups_positions_for_the_near_copy_breakdown():
    assert walk_kind({"sources": [], "weights": []}) == "fresh seed"
    assert walk_kind({"sources": ["a", "b"], "weights": [0.8, 0.2]}) == "pair, max weight >= 0.7"
    assert walk_kind({"sources": ["a", "b"], "weights": [0.5, 0.5]}) == "pair, max weight < 0.7"
    assert walk_kind({"sources": list("abcde"), "weights": [0.2] * 5}) == "centroid"
