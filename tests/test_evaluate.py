"""Behaviour of the evaluation's parts: the CNNs and their augmentation, the baselines, reading
runs, the splits, the choices (validation only), pairing, novelty and targets."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from research import classifier
from research.classifier import (
    SMALL,
    WIDE,
    ClassicAugment,
    OnlineAugment,
    TrainRecipe,
    oversample,
    predict,
    train_as_users_train,
    train_classifier,
)
from research.digits import SEEN_SPLIT, DigitsSplit, load_digits_arrays, render, split_indices
from research.evaluate import (
    Generated,
    Options,
    RegimeData,
    Scores,
    Variant,
    _eligibility_text,
    accuracies,
    at_grid_edge,
    choice_phase,
    choose_mixing,
    choose_shipped,
    choose_steps,
    dev_pool,
    eval_splits,
    evaluate,
    evaluate_test_split,
    image_quality,
    kept_regimes,
    machine,
    markdown,
    paired,
    plot_accuracy,
    read_image_folder,
    read_run,
    run_tasks,
    shards_digest,
    targets,
    walk_kind,
)
from tailseed.pipeline.errors import UserError
from tailseed.pipeline.images import encode_png
from tailseed.pipeline.shards import write_index, write_shard


def bars(n: int, rng: np.random.Generator, classes: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """A separable toy set: class k has a bright vertical bar at its own column."""
    labels = rng.integers(0, classes, n)
    images = rng.integers(0, 40, (n, 32, 32, 3)).astype(np.uint8)
    for i, label in enumerate(labels):
        left = 3 + 3 * int(label)
        images[i, 4:28, left : left + 3] = 230
    return images, labels


# ------------------------------------------------------------------------------------------------
# The CNNs


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


@pytest.mark.parametrize("recipe", [SMALL, WIDE], ids=["small", "wide"])
def test_users_recipes_are_seeded_and_start_every_variant_from_the_same_weights(recipe):
    x, y = bars(40, np.random.default_rng(2))
    gx, gy = bars(10, np.random.default_rng(3))
    short = replace(recipe, steps=3, batch_size=8)
    a, _ = train_as_users_train(x, y, gx, gy, short, 7, 0.25, 0.5, num_classes=2)
    b, _ = train_as_users_train(x, y, gx, gy, short, 7, 0.25, 0.5, num_classes=2)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    untrained = replace(short, steps=0)
    m1, _ = train_as_users_train(x, y, None, None, untrained, 7, num_classes=2)
    m2, _ = train_as_users_train(x, y, gx, gy, untrained, 7, 0.5, 0.5, num_classes=2)
    for pa, pb in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(pa, pb)  # paired runs of one seed start from the same weights


def test_users_training_learns_and_reports_checkpoints():
    rng = np.random.default_rng(4)
    x, y = bars(80, rng)
    recipe = replace(SMALL, steps=60, batch_size=16)
    x_new, y_new = bars(40, rng)
    _, preds = train_as_users_train(
        x,
        y,
        None,
        None,
        recipe,
        0,
        num_classes=2,
        checkpoints={30: lambda m: predict(m, x_new), 60: lambda m: predict(m, x_new)},
    )
    assert sorted(preds) == [30, 60]
    assert (preds[60] == y_new).mean() >= 0.9


def test_cosine_schedule_decays_the_learning_rate_to_zero_and_refuses_early_checkpoints(
    monkeypatch,
):
    rates = []

    class Recording(torch.optim.Adam):
        def step(self, *args, **kwargs):
            rates.append(self.param_groups[0]["lr"])
            return super().step(*args, **kwargs)

    monkeypatch.setattr(classifier.torch.optim, "Adam", Recording)
    x, y = bars(20, np.random.default_rng(5))
    recipe = replace(SMALL, steps=8, batch_size=8, lr=1e-3, lr_schedule="cosine")
    train_as_users_train(x, y, None, None, recipe, 0, num_classes=2)
    expected = [1e-3 * 0.5 * (1 + np.cos(np.pi * t / 8)) for t in range(8)]
    assert np.allclose(rates, expected)  # full rate at the first update, near 0 at the last
    rates.clear()
    train_as_users_train(
        x, y, None, None, replace(recipe, lr_schedule="constant"), 0, num_classes=2
    )
    assert rates == [1e-3] * 8
    with pytest.raises(ValueError, match="checkpoints \\[4\\]"):
        train_as_users_train(
            x, y, None, None, recipe, 0, num_classes=2, checkpoints={4: len, 8: len}
        )
    with pytest.raises(ValueError, match="lr_schedule 'step'"):
        train_as_users_train(
            x, y, None, None, replace(recipe, lr_schedule="step"), 0, num_classes=2
        )


def test_online_augmentation_is_applied_to_every_batch(monkeypatch):
    calls = []

    class Spy(OnlineAugment):
        def __call__(self, x, generator):
            calls.append(x.clone())
            out = super().__call__(x, generator)
            calls.append(out.clone())
            return out

    x, y = bars(20, np.random.default_rng(5))
    recipe = replace(SMALL, steps=4, batch_size=8, augment=Spy())
    train_as_users_train(x, y, None, None, recipe, 0, num_classes=2)
    assert len(calls) == 8  # once per batch
    for before, after in zip(calls[::2], calls[1::2]):
        assert before.shape == after.shape == (8, 3, 32, 32)
        assert not torch.allclose(before, after)  # the images the model sees are moved
    calls.clear()
    train_as_users_train(x, y, None, None, replace(recipe, augment=None), 0, num_classes=2)
    assert calls == []


def test_online_augmentation_draws_from_its_generator_and_is_the_identity_at_zero():
    x = classifier.to_tensor(bars(6, np.random.default_rng(6))[0])
    aug = OnlineAugment()
    a = aug(x, torch.Generator().manual_seed(1))
    b = aug(x, torch.Generator().manual_seed(1))
    c = aug(x, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    still = OnlineAugment(degrees=0, scale=(1, 1), shift_px=0)
    assert torch.allclose(still(x, torch.Generator()), x, atol=1e-5)
    # a pure shift of 2 px moves the bar by 2 columns
    shift = OnlineAugment(degrees=0, scale=(1, 1), shift_px=2)
    img = torch.zeros(1, 1, 32, 32)
    img[0, 0, :, 10] = 1
    gen = torch.Generator().manual_seed(0)
    draws = torch.rand(4, generator=torch.Generator().manual_seed(0))
    moved = shift(img, gen)
    dx = float(-2 + 4 * draws[2])  # third and fourth draws are the x and y shifts
    column = float((moved[0, 0, 16] * torch.arange(32)).sum() / moved[0, 0, 16].sum())
    assert abs(column - (10 + dx)) < 0.1


def test_mixed_batches_hold_the_ratio_and_weights_reach_the_loss(monkeypatch):
    seen = []
    real_sampler = classifier.MixingSampler

    def spy(*args, **kwargs):
        sampler = real_sampler(*args, **kwargs)
        seen.append(sampler)
        return sampler

    monkeypatch.setattr(classifier, "MixingSampler", spy)
    losses = []
    real_ce = classifier.F.cross_entropy

    def ce(logits, target, reduction="mean"):
        out = real_ce(logits, target, reduction=reduction)
        losses.append(out.detach())
        return out

    monkeypatch.setattr(classifier.F, "cross_entropy", ce)
    x, y = bars(30, np.random.default_rng(7))
    gx, gy = bars(10, np.random.default_rng(8))
    recipe = replace(SMALL, steps=5, batch_size=8)
    train_as_users_train(x, y, gx, gy, recipe, 0, ratio=0.25, weight=0.5, num_classes=2)
    (sampler,) = seen
    assert sampler.ratio == 0.25 and float(sampler.generated_weights[0]) == 0.5
    assert all(b.generated.sum() == 2 for b in sampler)
    assert all(loss.shape == (8,) for loss in losses)  # per-sample losses, then weighted


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


# ------------------------------------------------------------------------------------------------
# Reading what was written


def test_a_runs_shards_are_read_as_digits_through_the_mixing_loader(tmp_path):
    rng = np.random.default_rng(4)
    classes = {0: "four", 1: "seven"}  # dataset class index -> name, as in classes.json
    written = {4: [], 7: []}
    for s in range(2):
        samples = []
        for i in range(3):
            cls = (s + i) % 2
            image = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
            written[4 if cls == 0 else 7].append(image)
            meta = json.dumps({"sources": ["a", "b"], "weights": [0.5, 0.5]}).encode()
            samples.append(
                {
                    "__key__": f"s{s}_{i}",
                    "png": encode_png(image),
                    "cls": str(cls).encode(),
                    "json": meta,
                }
            )
        write_shard(tmp_path / "shards", s, samples, {"samples": 3})
    write_index(tmp_path / "shards", 2)
    (tmp_path / "classes.json").write_text(json.dumps({str(k): v for k, v in classes.items()}))
    gen = read_run(tmp_path)
    for digit, images in written.items():
        assert np.array_equal(gen.of(digit), np.stack(images))
        assert len(gen.meta_of(digit)) == 3


def test_image_folder_maps_digit_words_to_labels(tmp_path):
    from PIL import Image

    for name, count in (("seven", 2), ("zero", 1)):
        (tmp_path / name).mkdir()
        for i in range(count):
            Image.fromarray(np.full((32, 32, 3), i, np.uint8)).save(tmp_path / name / f"{i}.png")
    images, labels, stems = read_image_folder(tmp_path)
    assert images.shape == (3, 32, 32, 3)
    assert labels.tolist() == [7, 7, 0] and stems == ["0", "1", "0"]


# ------------------------------------------------------------------------------------------------
# Splits


@pytest.mark.parametrize("split", [DigitsSplit(), SEEN_SPLIT], ids=["never-seen", "seen"])
def test_user_validation_and_test_are_disjoint_and_test_is_as_large_as_allowed(split):
    _, labels = load_digits_arrays()
    cut = split_indices(labels, split)
    ev = eval_splits(labels, split)
    assert not set(ev["user"]) & set(ev["val"])
    assert not set(ev["user"]) & set(ev["test"])
    assert not set(ev["val"]) & set(ev["test"])
    assert ev["user"] == cut["user"]
    assert set(cut["test"]) <= set(ev["test"])  # the card's test split stays in the test split
    for c in split.tail_classes:
        val = [i for i in ev["val"] if labels[i] == c]
        test = [i for i in ev["test"] if labels[i] == c]
        assert len(val) > 0
        # every tail image that neither the user, the model nor validation takes is a test image
        taken = set(ev["user"]) | set(cut["model_train"]) | set(ev["val"])
        assert len(test) == int((labels == c).sum()) - len(taken & set(np.flatnonzero(labels == c)))
    for c in set(range(10)) - set(split.tail_classes):
        assert any(labels[i] == c for i in ev["val"])
    assert eval_splits(labels, split) == ev  # seeded


def test_never_seen_validation_comes_from_spare_tail_and_model_head_images():
    split = DigitsSplit()
    _, labels = load_digits_arrays()
    cut = split_indices(labels, split)
    ev = eval_splits(labels, split)
    tail = set(split.tail_classes)
    assert {i for i in ev["val"] if labels[i] in tail} <= set(cut["spare"])
    assert {i for i in ev["val"] if labels[i] not in tail} <= set(cut["model_train"])


def test_the_development_pool_is_the_seen_models_training_images_that_no_split_holds():
    _, labels = load_digits_arrays()
    cut = split_indices(labels, SEEN_SPLIT)
    dev = dev_pool(labels, SEEN_SPLIT, SEEN_SPLIT.tail_classes)
    assert dev == sorted(cut["model_train"])
    assert np.isin(labels[dev], SEEN_SPLIT.tail_classes).sum() == 200  # 100 per tail class
    for name, idx in eval_splits(labels, SEEN_SPLIT).items():
        assert not set(dev) & set(idx), name
    # the never-seen model trained on 3 images per tail class: too few, steps on validation
    assert dev_pool(labels, DigitsSplit(), DigitsSplit().tail_classes) is None


# ------------------------------------------------------------------------------------------------
# Choices use validation only


def test_choices_refuse_anything_but_validation_scores():
    val = Scores("val", 90, 95, 94, 2)
    test = Scores("test", 99, 99, 99, 2)
    with pytest.raises(ValueError, match="validation"):
        choose_steps({300: val, 600: test})
    with pytest.raises(ValueError, match="validation"):
        choose_mixing({(0.1, 0.5): val}, test)
    with pytest.raises(ValueError, match="validation"):
        choose_shipped({"config": test})
    # the development pool (real data only) may choose steps, and nothing that adds images
    dev = Scores("dev", 90, 95, 96, 10)
    assert choose_steps({300: val, 600: dev}) == 600
    with pytest.raises(ValueError, match="validation only"):
        choose_mixing({(0.1, 0.5): dev}, val)
    with pytest.raises(ValueError, match="validation only"):
        choose_shipped({"config": dev})


def test_choose_steps_takes_the_fewest_within_tolerance_and_flags_the_grid_edge():
    def val(overall):
        return Scores("val", 0, 0, overall, 3)

    # the 3c53734 seen regime's wide curve, extended: 1600 is within 0.5 of 2400's best
    curve = {800: val(89.17), 1600: val(95.83), 2000: val(93.5), 2400: val(96.0)}
    assert choose_steps(curve, tolerance=0.5) == 1600
    assert choose_steps(curve, tolerance=0.1) == 2400
    assert choose_steps({300: val(96.3), 600: val(99.0), 900: val(98.3)}, tolerance=0.5) == 600
    grid = {"small": (300, 600, 900), "wide": (400, 800, 1200), "one": (700,)}
    assert at_grid_edge({"small": 600, "wide": 1200, "one": 700}, grid) == ["wide"]
    assert at_grid_edge({"small": 300, "wide": 800}, grid) == []


def test_choose_mixing_keeps_head_within_tolerance_and_choose_steps_prefers_fewer():
    ref = Scores("val", 80, 95, 93, 2)
    cands = {
        (0.1, 0.5): Scores("val", 85, 94.5, 93, 2),
        (0.2, 1.0): Scores("val", 95, 90.0, 91, 2),  # more rare, but costs 5 head points
        (0.2, 0.5): Scores("val", 85, 94.5, 93, 2),  # ties with the first on both: the first wins
    }
    assert choose_mixing(cands, ref) == (0.1, 0.5)
    cands[(0.2, 0.5)] = Scores("val", 85, 95.0, 93, 2)  # a tie on rare: the better head wins
    assert choose_mixing(cands, ref) == (0.2, 0.5)
    assert choose_steps({300: Scores("val", 0, 0, 90, 1), 600: Scores("val", 0, 0, 90, 1)}) == 300
    assert choose_steps({300: Scores("val", 0, 0, 90, 1), 600: Scores("val", 0, 0, 91, 1)}) == 600
    assert (
        choose_shipped(
            {"config": Scores("val", 90, 95, 0, 1), "filter_on": Scores("val", 91, 90, 0, 1)}
        )
        == "filter_on"
    )


def toy_data(n_user: int = 60) -> RegimeData:
    """A tiny regime of 3 classes (class 2 rare) with a sentinel test split."""
    rng = np.random.default_rng(9)
    ux, uy = bars(n_user, rng, classes=3)
    vx, vy = bars(30, rng, classes=3)
    tx, ty = bars(30, rng, classes=3)
    gx, gy = bars(30, rng, classes=3)
    keep = gy == 2
    generated = {
        ("gen", d): Generated(gx[keep], gy[keep], [{}] * int(keep.sum()), {}) for d in range(2)
    }
    data = RegimeData(ux, uy, vx, vy, tx, ty, [2], {}, int(keep.sum()), generated)
    return data


def tiny_options(**kw) -> Options:
    recipe = replace(SMALL, steps=4, batch_size=8)
    return Options(
        seeds=2,
        draws=2,
        val_seeds=1,
        first_seeds=2,
        jobs=1,
        recipes={"small": recipe, "wide": replace(WIDE, steps=4, batch_size=8)},
        step_candidates={"small": (2, 4), "wide": (2, 4)},
        mix_grid=((0.1, 0.5), (0.2, 1.0)),
        first_recipe=TrainRecipe(steps=4, batch_size=8),
        **kw,
    )


def test_the_choice_phase_sees_only_validation_images_and_the_selection_only_validation_scores(
    monkeypatch,
):
    import research.evaluate as ev

    data = toy_data()
    offered = []
    for name in ("choose_steps", "choose_mixing", "choose_shipped"):
        real = getattr(ev, name)

        def spy(*args, _real=real, **kw):
            offered.extend(s for a in args for s in (a.values() if isinstance(a, dict) else [a]))
            return _real(*args, **kw)

        monkeypatch.setattr(ev, name, spy)
    tasks_seen = []

    def runner(tasks, jobs, cache=None):
        tasks_seen.extend(tasks)
        for t in tasks:
            assert list(t.eval_x) == ["val"] and t.eval_x["val"] is data.val_x
            assert not any(x is data.test_x for x in (t.real_x, t.added_x))
        return run_tasks(tasks, jobs, cache)

    adders = {
        "oversample": Variant("oversample", "oversampling", "oversample"),
        "gen": Variant("gen", "generated", "generated"),
    }
    choices = choice_phase(data, tiny_options(), adders, ["gen"], runner=runner)
    assert tasks_seen and offered and all(s.split == "val" for s in offered)
    assert set(choices.mixing) == set(tiny_options().recipes)
    assert all(set(m) == {"oversample", "gen"} for m in choices.mixing.values())
    assert choices.shipped == "gen"
    assert set(choices.steps.values()) <= {2, 4}
    grid = tiny_options().step_candidates
    assert choices.steps_at_grid_edge == at_grid_edge(choices.steps, grid)
    assert choices.to_dict()["steps_at_grid_edge"] == choices.steps_at_grid_edge
    assert choices.step_pool == "val"  # no development pool: steps on validation too


def test_with_a_development_pool_steps_are_chosen_there_and_everything_else_on_validation(
    monkeypatch,
):
    import research.evaluate as ev

    data = toy_data()
    rng = np.random.default_rng(11)
    data.dev_x, data.dev_y = bars(24, rng, classes=3)
    offered = {}
    for name in ("choose_steps", "choose_mixing", "choose_shipped"):
        real = getattr(ev, name)

        def spy(*args, _real=real, _name=name, **kw):
            splits = {s.split for a in args for s in (a.values() if isinstance(a, dict) else [a])}
            offered.setdefault(_name, set()).update(splits)
            return _real(*args, **kw)

        monkeypatch.setattr(ev, name, spy)
    by_kind = {}

    def runner(tasks, jobs, cache=None):
        for t in tasks:
            assert t.added_x is None or t.added_x is not data.test_x
            by_kind.setdefault(t.key[0], []).append(t)
        return run_tasks(tasks, jobs, cache)

    adders = {"gen": Variant("gen", "generated", "generated")}
    choices = choice_phase(data, tiny_options(dev_seeds=2), adders, ["gen"], runner=runner)
    assert offered == {"choose_steps": {"dev"}, "choose_mixing": {"val"}, "choose_shipped": {"val"}}
    steps = by_kind["steps"]
    assert len(steps) == 2 * 2  # 2 recipes x dev_seeds
    assert all(list(t.eval_x) == ["dev"] and t.eval_x["dev"] is data.dev_x for t in steps)
    assert all(t.added_x is None and t.seed >= ev.DEV_SEED_OFFSET for t in steps)
    # real data at the chosen steps on validation: the reference the mixing choice holds head to
    refs = by_kind["reference"]
    assert {(t.key[1], t.recipe.steps) for t in refs} == set(choices.steps.items())
    for t in refs + by_kind["mix"]:
        assert list(t.eval_x) == ["val"] and t.eval_x["val"] is data.val_x
    assert all(r.split == "val" for r in choices.reference.values())
    assert choices.step_pool == "dev" and "step_scores_dev" in choices.to_dict()


def test_mixing_is_chosen_per_recipe_and_the_shipped_candidate_on_the_mean_over_recipes():
    """A scripted runner: on validation, candidate "a" is best with the small recipe by a little,
    "b" with the wide one by a lot; each recipe prefers another mixing setting."""
    data = toy_data()
    rare = data.val_y == 2

    def predictions(wrong_rare: int) -> np.ndarray:
        pred = data.val_y.copy()
        pred[np.flatnonzero(rare)[:wrong_rare]] = 0  # rare images called class 0
        return pred

    def wrong(key) -> int:
        if key[0] == "steps":
            return 3
        _, recipe, variant, ratio, weight, _ = key
        best = (0.1, 0.5) if recipe == "small" else (0.2, 1.0)
        by_variant = {"small": {"a": 0, "b": 1}, "wide": {"a": 4, "b": 0}}[recipe]
        return by_variant[variant] + (0 if (ratio, weight) == best else 2)

    def runner(tasks, jobs, cache=None):
        return {
            t.key: {step: {"val": predictions(wrong(t.key))} for step in t.checkpoints}
            for t in tasks
        }

    data.generated.update({(k, 0): data.generated[("gen", 0)] for k in ("a", "b")})
    adders = {k: Variant(k, k, "generated") for k in ("a", "b")}
    choices = choice_phase(data, tiny_options(), adders, ["a", "b"], runner=runner)
    assert choices.mixing["small"] == {"a": (0.1, 0.5), "b": (0.1, 0.5)}
    assert choices.mixing["wide"] == {"a": (0.2, 1.0), "b": (0.2, 1.0)}
    assert choices.shipped == "b"  # a: rare errors 0 + 4, b: 1 + 0
    assert choices.shipped_scores["b"].rare > choices.shipped_scores["a"].rare
    assert choices.to_dict()["mixing"]["wide"]["b"] == {"ratio": 0.2, "weight": 1.0}


def test_a_candidate_whose_images_miss_the_image_targets_does_not_ship_however_it_scores():
    val = {
        "a": Scores("val", 90.0, 97.0, 96.0, 2),
        "far": Scores("val", 96.0, 95.0, 95.0, 2),  # best rare accuracy, images out of class
        "b": Scores("val", 91.0, 96.0, 95.5, 2),
    }
    assert choose_shipped(val) == "far"
    assert choose_shipped(val, eligible=["a", "b"]) == "b"
    assert choose_shipped(val, eligible=[]) == "far"  # none eligible: the scores decide
    report = {
        "candidate_images_draw0": {
            "a": {"judged_in_class": 100.0, "near_copies": 0.0, "meets_image_targets": True},
            "far": {"judged_in_class": 87.5, "near_copies": 0.0, "meets_image_targets": False},
        }
    }
    text = " ".join(_eligibility_text(report))
    assert "far 87.5% in class, 0.0% near-copies (not eligible)" in text
    assert "a 100.0% in class, 0.0% near-copies," in text


def test_the_test_split_pairs_each_variant_run_with_real_data_of_the_same_seed():
    data = toy_data()
    variants = [
        Variant("real", "real + augmentation", "none"),
        Variant("oversample", "oversampling", "oversample"),
        Variant("classic", "classic", "classic", first_protocol_only=True),
        Variant("prompt", "plain prompts", "generated"),
        Variant("gen", "tailseed", "generated", shipped=True),
    ]
    data.generated.update({("prompt", d): data.generated[("gen", d)] for d in range(2)})
    options = tiny_options()
    recipes = {"small": options.recipes["small"]}
    per_recipe, first = evaluate_test_split(
        data, options, recipes, variants, {"small": {"oversample": (0.2, 1.0), "gen": (0.1, 0.5)}}
    )
    entry = per_recipe["small"]
    assert "classic" not in entry and "classic" in first
    runs = entry["gen"]["runs"]
    assert sorted(runs) == [f"seed{s}_draw{d}" for s in range(2) for d in range(2)]
    expected = [
        runs[f"seed{s}_draw{d}"]["rare"] - entry["real"]["runs"][f"seed{s}_drawNone"]["rare"]
        for s in range(2)
        for d in range(2)
    ]
    assert entry["gen"]["vs_real"]["rare"]["values"] == [round(v, 3) for v in expected]
    assert (
        entry["gen"]["vs_real"]["rare"]["pairs"] == 4
        and entry["oversample"]["vs_real"]["rare"]["pairs"] == 2
    )
    assert entry["gen"]["vs_prompt"]["rare"]["pairs"] == 4
    # the shipped variant against oversampling: each draw paired with the same seed
    over = [
        runs[f"seed{s}_draw{d}"]["rare"] - entry["oversample"]["runs"][f"seed{s}_drawNone"]["rare"]
        for s in range(2)
        for d in range(2)
    ]
    assert entry["gen"]["vs_oversample"]["rare"]["values"] == [round(v, 3) for v in over]
    assert entry["gen"]["mixing"] == {"ratio": 0.1, "weight": 0.5}


def test_cached_trainings_are_read_back_and_any_change_trains_again(tmp_path, monkeypatch):
    import research.evaluate as ev

    data = toy_data()
    recipe = replace(SMALL, steps=3, batch_size=8)
    val = {"val": data.val_x}
    task = ev._task(("t",), "users", recipe, 0, data, (None, None), 0.0, 1.0, val, (3,))
    first = run_tasks([task], 1, tmp_path)
    assert len(list(tmp_path.glob("*.npz"))) == 1
    calls = []
    real = ev.run_task

    def counted(t):
        calls.append(t)
        return real(t)

    monkeypatch.setattr(ev, "run_task", counted)
    again = run_tasks([task], 1, tmp_path)
    assert calls == [] and np.array_equal(again[("t",)][3]["val"], first[("t",)][3]["val"])
    run_tasks([replace(task, seed=1)], 1, tmp_path)
    assert len(calls) == 1 and len(list(tmp_path.glob("*.npz"))) == 2
    # two variants with the same added samples train once, without a cache too
    twins = run_tasks([replace(task, seed=2), replace(task, key=("u",), seed=2)], 1, None)
    assert len(calls) == 2 and np.array_equal(twins[("t",)][3]["val"], twins[("u",)][3]["val"])


def test_a_truncated_cache_entry_is_trained_again_and_rewritten(tmp_path, monkeypatch, capsys):
    import research.evaluate as ev

    data = toy_data()
    recipe = replace(SMALL, steps=3, batch_size=8)
    task = ev._task(
        ("t",), "users", recipe, 0, data, (None, None), 0.0, 1.0, {"val": data.val_x}, (3,)
    )
    first = run_tasks([task], 1, tmp_path)
    (entry,) = tmp_path.glob("*.npz")
    whole = entry.read_bytes()
    entry.write_bytes(whole[: len(whole) // 2])  # as a copy cut short leaves it
    calls = []
    real = ev.run_task

    def counted(t):
        calls.append(t)
        return real(t)

    monkeypatch.setattr(ev, "run_task", counted)
    again = run_tasks([task], 1, tmp_path)
    assert len(calls) == 1, "the unreadable entry must be trained again, not trusted or fatal"
    assert entry.name in capsys.readouterr().out
    assert np.array_equal(again[("t",)][3]["val"], first[("t",)][3]["val"])
    run_tasks([task], 1, tmp_path)  # the rewritten entry is whole: read back, not trained
    assert len(calls) == 1


def test_paired_differences_match_seed_and_draw():
    real = {(s, None): {"rare": 80.0 + s} for s in range(3)}
    variant = {(s, d): {"rare": 85.0 + s + d} for s in range(3) for d in range(2)}
    out = paired(variant, real, "rare")
    assert out["values"] == [5.0, 6.0] * 3 and out["pairs"] == 6
    assert out["mean"] == pytest.approx(5.5) and out["std"] == pytest.approx(
        np.std([5, 6] * 3, ddof=1)
    )
    other = {(s, d): {"rare": 84.0 + s + 2 * d} for s in range(3) for d in range(2)}
    assert paired(variant, other, "rare")["values"] == [1.0, 0.0] * 3  # same seed and same draw
    with pytest.raises(KeyError):
        paired({(5, 0): {"rare": 1.0}}, real, "rare")


# ------------------------------------------------------------------------------------------------
# Novelty, accuracies, targets, report


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
    added = {4: np.concatenate([oversample(sources, 20), np.zeros((20, 32, 32, 3), np.uint8)])}
    pair = {"sources": ["a", "b"], "weights": [0.9, 0.1]}
    fresh = {"sources": [], "weights": []}
    provenance = {4: [pair] * 20 + [fresh] * 20}
    quality = image_quality(added, {4: sources}, ConstantJudge(4), split, provenance)
    four = quality["per_class"]["four"]
    assert quality["near_copies"] == 0.5
    assert four["near_copy_threshold"] > 0
    assert quality["judged_in_class"] == 1.0
    assert quality["near_copies_by_walk"] == {
        "fresh seed": {"images": 20, "near_copies": 0},
        "pair, max weight >= 0.7": {"images": 20, "near_copies": 20},
    }


def test_accuracies_split_rare_and_head_in_points():
    labels = np.asarray([4, 4, 7, 7, 0, 1, 2, 3])
    predicted = np.asarray([4, 0, 7, 7, 0, 1, 2, 9])
    acc = accuracies(predicted, labels, [4, 7])
    assert {k: acc[k] for k in ("rare", "head", "overall", "four", "seven")} == {
        "rare": 75.0,
        "head": 75.0,
        "overall": 75.0,
        "four": 50.0,
        "seven": 100.0,
    }


def test_balanced_accuracy_and_rare_precision_count_head_images_called_rare():
    labels = np.asarray([4, 4, 7, 7, 0, 1, 2, 3])
    # a head image (a zero) called four: rare accuracy is unchanged, precision and balance drop
    predicted = np.asarray([4, 0, 7, 7, 4, 1, 2, 9])
    acc = accuracies(predicted, labels, [4, 7])
    assert acc["rare"] == 75.0 and acc["head"] == 50.0
    assert acc["balanced"] == pytest.approx(100 * 3.5 / 6)  # recalls .5, 1, 0, 1, 1, 0
    assert acc["rare_precision"] == 75.0  # four: 1 of the 2 called four; seven: 2 of 2
    none_called_seven = accuracies(np.asarray([4, 4, 4, 4, 0, 1, 2, 3]), labels, [4, 7])
    assert none_called_seven["rare_precision"] == 25.0  # four 2 of 4, seven: none called


def fake_regime(rare_diff: float, rare_std: float, head_diff: float, seen: bool) -> dict:
    def stat(mean, std=0.5):
        return {"mean": mean, "std": std, "pairs": 15, "values": []}

    acc = {"rare": {"mean": 90.0, "std": 1.0}, "head": {"mean": 95.0, "std": 0.5}}
    entry = {
        "real": {"label": "real + augmentation", "accuracy": acc},
        "oversample": {
            "label": "oversampling",
            "accuracy": acc,
            "vs_real": {"rare": stat(2.0), "head": stat(0.0)},
        },
        "prompt": {
            "label": "plain prompts + filter",
            "accuracy": acc,
            "vs_real": {"rare": stat(1.0), "head": stat(0.0)},
        },
        "tailseed": {
            "label": "tailseed as shipped",
            "accuracy": acc,
            "vs_real": {"rare": stat(rare_diff, rare_std), "head": stat(head_diff)},
            "vs_prompt": {"rare": stat(rare_diff - 1.0), "head": stat(0.0)},
            "vs_oversample": {"rare": stat(rare_diff - 2.0), "head": stat(-0.25)},
        },
    }
    q = {
        "judged_in_class": {"mean": 96.0, "std": 1.0},
        "near_copies": {"mean": 3.0, "std": 1.0},
        "median_distance_to_source": {"mean": 20.0, "std": 1.0},
    }
    return {
        "regime": "seen" if seen else "never-seen",
        "label": "seen" if seen else "never seen",
        "model": "m",
        "filter_stage": True,
        "data": {
            "user_images": 340,
            "real_per_rare_class": 10,
            "rare_classes": ["four", "seven"],
            "added_per_rare_class": 40,
            "val_images": 100,
            "val_rare_images": 40,
            "test_images": 400,
            "test_rare_images": 100,
            "test_head_images": 300,
        },
        "choices": {
            "steps": {"small": 600},
            "shipped": "config",
            "shipped_overrides": [],
            "mixing": {"tailseed": {"ratio": 0.2, "weight": 0.5}},
        },
        "variants": {
            "prompt": {"label": "plain prompts + filter"},
            "tailseed": {"label": "tailseed as shipped"},
        },
        "as_users_train": {"small": entry},
        "first_protocol": {"real": {"label": "real", "accuracy": acc}},
        "quality": {"tailseed": q},
    }


def test_targets_report_margins_per_regime_and_recipe(tmp_path):
    report = {
        "regimes": {
            "never-seen": fake_regime(-0.3, 0.5, 0.4, seen=False),
            "seen": fake_regime(4.0, 1.5, -1.5, seen=True),
        }
    }
    values = targets(report)
    never = [t for t in values if t["regime"] == "never-seen"]
    assert never[0]["margin"] == pytest.approx(0.2) and never[0]["met"]  # -0.3 >= -0.5
    assert never[1]["met"]  # head within one point
    seen = [t for t in values if t["regime"] == "seen"]
    assert seen[0]["margin"] == pytest.approx(1.0) and seen[0]["met"]  # 4 >= 3
    assert seen[1]["met"]  # 4 > 2 x 1.5
    assert seen[2]["met"]  # 3 over plain prompts
    assert not seen[3]["met"]  # head 1.5 points down
    gained = targets({"regimes": {"seen": fake_regime(4.0, 1.5, 2.2, seen=True)}})
    assert gained[3]["met"] and gained[3]["margin"] == pytest.approx(3.2)  # a head gain is no miss
    assert seen[4]["met"] and not seen[5]["met"]  # 96% judged; 3% near-copies
    text = markdown(
        {
            "options": {"seeds": 5, "draws": 3, "first_seeds": 5},
            "regimes": report["regimes"],
            "targets": values,
            "timings": {"total_s": 1.0},
        }
    )
    assert "never seen" in text and "| NO |" in text
    # seen: rare_diff 4.0, oversampling +2.0
    assert "as shipped minus oversampling (paired by seed): rare +2.0 ± 0.5, head -0.2" in text
    assert "grid's largest candidate" not in text
    report["regimes"]["seen"]["choices"]["steps_at_grid_edge"] = ["wide"]
    flagged = markdown(
        {
            "options": {"seeds": 5, "draws": 3, "first_seeds": 5},
            "regimes": report["regimes"],
            "targets": values,
            "timings": {"total_s": 1.0},
        }
    )
    assert "**Steps chosen at the grid's largest candidate** for wide" in flagged
    plot_accuracy(
        {"options": {"seeds": 5, "draws": 3}, "regimes": report["regimes"]}, tmp_path / "a.png"
    )
    assert (tmp_path / "a.png").stat().st_size > 0


def test_an_earlier_reports_other_regimes_are_kept_with_their_commit_if_the_protocol_matches():
    options = tiny_options(cache=Path("out/eval/cache"))
    earlier = {
        "code": {"commit": "a" * 40, "dirty": False},
        "options": json.loads(json.dumps(options.to_dict(), default=str)),
        "regimes": {
            "never-seen": fake_regime(-0.3, 0.5, 0.4, seen=False),
            "seen": fake_regime(4.0, 1.5, -1.5, seen=True),
        },
    }
    earlier["options"]["cache"] = "elsewhere/cache"  # where trainings are cached is no option
    kept = kept_regimes(earlier, options, ["seen"])
    assert list(kept) == ["never-seen"]
    assert kept["never-seen"]["code"]["commit"] == "a" * 40
    assert kept["never-seen"]["kept_from_an_earlier_run"]
    text = markdown(
        {
            "options": {"seeds": 2, "draws": 2, "first_seeds": 2},
            "regimes": kept,
            "targets": [],
            "timings": {"total_s": 1.0},
        }
    )
    assert "Run at commit aaaaaaa, kept from an earlier run" in text
    assert kept_regimes(earlier, options, ["never-seen", "seen"]) == {}
    with pytest.raises(UserError, match="other options"):
        kept_regimes(earlier, replace(options, seeds=3), ["seen"])


def test_a_kept_regime_whose_runs_are_gone_stops_the_job_before_it_trains_anything(tmp_path):
    """The contact sheet shows a kept regime's draw-0 images: without its run folders the job
    must say so up front (it used to fail after hours of training), and its embedded dataset is
    written again where missing, as the augment job would."""
    options = tiny_options(cache=tmp_path / "cache")
    kept = fake_regime(-0.3, 0.5, 0.4, seen=False)
    user = tmp_path / "digits" / "user"
    kept["config"] = "configs/default.yaml"
    kept["config_overrides"] = [f"dataset.path={user}"]
    gone = tmp_path / "runs" / "never-seen" / "tailseed-d0"
    kept["variants"] = {"tailseed": {"label": "tailseed as shipped", "kind": "generated"}}
    kept["runs"] = {"tailseed_d0": {"output_dir": str(gone), "shards_sha256": "0" * 16}}
    earlier = {
        "code": {"commit": "a" * 40, "dirty": False},
        "options": json.loads(json.dumps(options.to_dict(), default=str)),
        "regimes": {"never-seen": kept},
    }
    out = tmp_path / "out"
    with pytest.raises(UserError, match=f"{gone}.*--no-docs"):
        evaluate(["seen"], out, options, tmp_path / "docs", keep=earlier)
    assert not out.exists()  # nothing was run or written for the seen regime
    assert sorted(p.name for p in user.iterdir() if p.is_dir())[:2] == ["eight", "five"]


def test_walk_kind_groups_positions_for_the_near_copy_breakdown():
    assert walk_kind({"sources": [], "weights": []}) == "fresh seed"
    assert walk_kind({"sources": ["a", "b"], "weights": [0.8, 0.2]}) == "pair, max weight >= 0.7"
    assert walk_kind({"sources": ["a", "b"], "weights": [0.5, 0.5]}) == "pair, max weight < 0.7"
    assert walk_kind({"sources": list("abcde"), "weights": [0.2] * 5}) == "centroid"


def test_shards_digest_names_the_bytes_of_a_runs_shards(tmp_path):
    from tailseed.pipeline.shards import write_index, write_shard

    def write(index: int, payload: bytes) -> None:
        sample = {"__key__": f"k{index}", "png": payload, "cls": b"2", "json": b"{}"}
        write_shard(tmp_path, index, [sample], {"samples": 1})

    write(0, b"a")
    write(1, b"b")
    write_index(tmp_path, 2)
    first = shards_digest(tmp_path)
    assert first == shards_digest(tmp_path) and len(first) == 16
    write(1, b"c")  # one shard with other bytes
    assert shards_digest(tmp_path) != first


def test_the_report_names_the_machine_it_was_computed_on():
    m = machine()
    assert set(m) == {"machine", "cpu", "cpu_capability", "torch", "cpus"}
    text = markdown(
        {
            "options": {"seeds": 5, "draws": 3, "first_seeds": 5},
            "machine": m,
            "regimes": {},
            "targets": [],
            "timings": {"total_s": 1.0},
        }
    )
    assert f"torch {m['torch']}" in text and m["cpu_capability"] in text


def test_recipe_study_scores_only_on_images_no_evaluation_split_holds():
    from research import recipe_study
    from research.digits import SEEN_SPLIT, load_digits_arrays
    from research.evaluate import eval_splits

    _, labels = load_digits_arrays()
    dev = recipe_study.dev_indices(labels)
    splits = eval_splits(labels, SEEN_SPLIT)
    assert np.isin(labels[dev], SEEN_SPLIT.tail_classes).sum() == 200
    for name in ("user", "val", "test"):
        assert not set(dev) & set(splits[name])
