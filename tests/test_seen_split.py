"""The "seen, rarely named" regime: its split, its captions, and (once trained) its shipped card."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, replace

import numpy as np
import pytest

from research.digits import (
    CLASS_NAMES,
    SEEN_SPLIT,
    SEEN_TAIL_ONLY_SPLIT,
    SPLIT_NAMES,
    DigitsSplit,
    held_out_indices,
    load_digits_arrays,
    named_indices,
    split_indices,
    tail_named_indices,
)
from research.tokenizer import build_clip_tokenizer
from research.train_tiny_model import (
    CAPTION_WORDS,
    GENERIC_CAPTION,
    PROMPT_TEMPLATE,
    caption_counts,
    captions,
    regime_config,
)
from tailseed.pipeline.models import REPO_ROOT, ModelSpec, describe_model, read_card

SEEN_MODEL = REPO_ROOT / "models" / "tiny-digits-seen"
TAIL = (4, 7)


@pytest.fixture(scope="module")
def labels():
    return load_digits_arrays()[1]


def _counts(labels, indices):
    return np.bincount(labels[indices], minlength=len(CLASS_NAMES)).tolist()


def test_seen_split_is_disjoint_and_covers_every_digit(labels):
    splits = split_indices(labels, SEEN_SPLIT)
    assert set(splits) == set(SPLIT_NAMES)
    every = [i for name in SPLIT_NAMES for i in splits[name]]
    assert len(every) == len(set(every)) == len(labels)


def test_seen_split_is_seeded(labels):
    assert split_indices(labels, SEEN_SPLIT) == split_indices(labels, SEEN_SPLIT)
    other = split_indices(labels, replace(SEEN_SPLIT, seed=1))
    assert other["test"] != split_indices(labels, SEEN_SPLIT)["test"]


def test_seen_split_counts(labels):
    splits = split_indices(labels, SEEN_SPLIT)
    head = [c for c in range(10) if c not in TAIL]
    assert _counts(labels, splits["test"]) == [30] * 10
    assert _counts(labels, splits["val"]) == [20] * 10
    user = _counts(labels, splits["user"])
    assert [user[c] for c in TAIL] == [10, 10] and {user[c] for c in head} == {40}
    model = _counts(labels, splits["model_train"])
    assert [model[c] for c in TAIL] == [100, 100] and min(model[c] for c in head) >= 80
    spare = _counts(labels, splits["spare"])
    assert {spare[c] for c in head} == {0}
    # the tail classes keep at least 40 held-out images (test + spare) for evaluation
    held = _counts(labels, sorted(held_out_indices(labels, SEEN_SPLIT)))
    assert held == [30 + s for s in spare] and min(held[c] for c in TAIL) >= 40


def test_seen_user_and_test_splits_are_the_first_models(labels):
    seen, first = split_indices(labels, SEEN_SPLIT), split_indices(labels, DigitsSplit())
    assert seen["user"] == first["user"] and seen["test"] == first["test"]


def test_too_large_a_split_is_refused(labels):
    with pytest.raises(ValueError, match="too few"):
        split_indices(labels, replace(SEEN_SPLIT, model_tail_per_class=150))


def test_exactly_model_tail_named_captions_name_each_tail_class(labels):
    train_idx = np.asarray(split_indices(labels, SEEN_SPLIT)["model_train"])
    prompts = captions(labels, train_idx, SEEN_SPLIT)
    counts = caption_counts(labels, train_idx, prompts)
    for c, name in enumerate(CLASS_NAMES):
        mine = [p for i, p in zip(train_idx, prompts) if labels[i] == c]
        named = SEEN_SPLIT.model_tail_named if c in TAIL else SEEN_SPLIT.model_head_named
        assert counts[name] == {"named": named, "generic": len(mine) - named}
        assert mine.count(PROMPT_TEMPLATE.format(name)) == named
        assert mine.count(GENERIC_CAPTION) == len(mine) - named
    assert {counts[CLASS_NAMES[c]]["named"] for c in TAIL} == {3}
    named = tail_named_indices(labels, SEEN_SPLIT)
    assert set(named) <= set(train_idx.tolist()) and len(named) == 6
    one = tail_named_indices(labels, replace(SEEN_SPLIT, model_tail_named=1))
    assert len(one) == 2 and set(one) <= set(named)  # fewer named: a subset of the same order


def test_the_generic_caption_covers_every_class_and_is_no_name_of_the_tail(labels):
    train_idx = np.asarray(split_indices(labels, SEEN_SPLIT)["model_train"])
    counts = caption_counts(labels, train_idx, captions(labels, train_idx, SEEN_SPLIT))
    generic = sum(v["generic"] for v in counts.values())
    assert all(v["generic"] > 0 for v in counts.values())
    assert 0.15 < counts["four"]["generic"] / generic < 0.2
    assert 0.15 < counts["seven"]["generic"] / generic < 0.2


def test_the_first_seen_try_named_every_head_image(labels):
    assert split_indices(labels, SEEN_TAIL_ONLY_SPLIT) == split_indices(labels, SEEN_SPLIT)
    train_idx = np.asarray(split_indices(labels, SEEN_TAIL_ONLY_SPLIT)["model_train"])
    prompts = captions(labels, train_idx, SEEN_TAIL_ONLY_SPLIT)
    for c, name in enumerate(CLASS_NAMES):
        mine = [p for i, p in zip(train_idx, prompts) if labels[i] == c]
        if c not in TAIL:
            assert set(mine) == {PROMPT_TEMPLATE.format(name)}
    assert named_indices(labels, SEEN_TAIL_ONLY_SPLIT, tail=True) == tail_named_indices(
        labels, SEEN_SPLIT
    )


def test_model_head_named_on_the_command_line_changes_only_the_head_captions(monkeypatch):
    from research import train_tiny_model

    seen = []
    monkeypatch.setattr(train_tiny_model, "train", lambda cfg, out: seen.append((cfg, out)))
    train_tiny_model.main(["--regime", "seen", "--model-head-named", "60", "--out", "x"])
    train_tiny_model.main(["--regime", "seen"])
    (mixed, out), (plain, default_out) = seen
    assert mixed.split == replace(SEEN_SPLIT, model_head_named=60) and str(out) == "x"
    assert plain == regime_config("seen") and str(default_out) == "models/tiny-digits-seen"


def test_every_caption_word_is_one_token(labels):
    tokenizer = build_clip_tokenizer(CAPTION_WORDS, 16)
    for prompt in {GENERIC_CAPTION} | {PROMPT_TEMPLATE.format(n) for n in CLASS_NAMES}:
        assert len(tokenizer(prompt).input_ids) == len(prompt.split()) + 2  # + start and end


def test_the_judge_never_trains_on_held_out_images(labels):
    from research.judge import train_judge

    held = held_out_indices(labels, SEEN_SPLIT)
    assert train_judge(SEEN_SPLIT).train_size == len(labels) - len(held) == len(labels) - 340
    assert held_out_indices(labels, DigitsSplit()) == set(
        split_indices(labels, DigitsSplit())["test"]
    )


def test_seen_regime_config():
    cfg = regime_config("seen")
    assert cfg.split == SEEN_SPLIT and cfg.regime == "seen"
    assert replace(cfg, split=DigitsSplit(), regime="never-seen") == regime_config("never-seen")
    with pytest.raises(ValueError, match="unknown regime"):
        regime_config("sometimes")


@pytest.mark.skipif(not (SEEN_MODEL / "tailseed_card.json").is_file(), reason="not trained yet")
def test_shipped_seen_card_matches_its_split(labels):
    card = read_card(SEEN_MODEL)
    assert card["regime"] == "seen" and card["name"] == "tiny-digits-seen"
    split = DigitsSplit(**{**card["split"], "tail_classes": tuple(card["split"]["tail_classes"])})
    assert split == SEEN_SPLIT
    assert split_indices(labels, split) == card["split_indices"]
    assert card["train_counts"] == _counts(labels, card["split_indices"]["model_train"])
    train_idx = np.asarray(card["split_indices"]["model_train"])
    counts = caption_counts(labels, train_idx, captions(labels, train_idx, split))
    assert card["captions"]["per_class"] == counts
    assert card["captions"]["generic_caption"] == GENERIC_CAPTION
    assert card["captions"]["named_tail_indices"] == tail_named_indices(labels, split)
    config = json.loads(json.dumps(asdict(regime_config("seen"))))
    # the thread count is how it ran, not what it is (trained with --threads 1 on shared cores)
    skip = ("split", "threads")
    assert {k: v for k, v in card["training"].items() if k not in skip} == {
        k: v for k, v in config.items() if k not in skip
    }
    assert card["training_seconds"]["total"] > 0 and "torch" in card["versions"]


@pytest.mark.skipif(not (SEEN_MODEL / "model_index.json").is_file(), reason="not trained yet")
def test_shipped_seen_model_loads_offline_and_is_small():
    from diffusers import StableDiffusionPipeline

    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    pipe = StableDiffusionPipeline.from_pretrained(SEEN_MODEL)
    info = describe_model(ModelSpec(path=str(SEEN_MODEL)))
    assert info["image_size"] == 32 and info["latent_shape"] == [4, 8, 8]
    assert pipe.scheduler.config.prediction_type == "epsilon"
    size = sum(p.stat().st_size for p in SEEN_MODEL.rglob("*.safetensors"))
    assert size <= 25 * 1024**2
