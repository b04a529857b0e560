"""How the embedded benchmark splits scikit-learn's bundled digits (model, user, val, test, spare), and
the 8x8 digit space the evaluation's judge works in."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from PIL import Image

# the rendering and the class names are the product's; research code takes them from here too
from tailseed.pipeline.embedded import CLASS_NAMES, IMAGE_SIZE, load_digits_arrays, render  # noqa: F401

SPLIT_NAMES = ("model_train", "user", "val", "test", "spare")


@dataclass(frozen=True)
class DigitsSplit:
    """How the digits are divided; every field is recorded in the model card.

    The defaults are the "never seen" regime of the first embedded model (models/tiny-digits): they
    must keep producing exactly the split recorded in its card.
    """

    seed: int = 0
    tail_classes: tuple[int, ...] = (4, 7)  # "four" and "seven" are rare for the model
    test_per_class: int = 30  # balanced held-out test set, read only by evaluation
    user_head_per_class: int = 40  # the user's dataset: head classes
    user_tail_per_class: int = 10  # the user's dataset: few-shot tail classes, unseen by the model
    model_tail_per_class: int = 3  # the model's own training images of each tail class
    val_per_class: int = 0  # validation split of every class, for choices; cut right after the user
    model_tail_named: int = -1  # tail model images whose caption names the class; -1: all of them
    spare_is_test: bool = False  # the spare tail images are extra held-out test images of the tail
    model_head_named: int = -1  # head model images whose caption names the class; -1: all of them


# The "seen, rarely named" regime (models/tiny-digits-seen): the model trains on many images of
# each tail class, but only `model_tail_named` of them carry a caption naming the class; the rest,
# and about half of each head class's images (all but `model_head_named` = 45 of 84-93), say the
# generic caption "a photo of a digit". The generic caption thus covers every class (the tail is
# 97 of its 551 images per tail class, 18%), as a generic caption does in a real text-to-image
# model's training data, and is no name of the tail.
# The digits have 174-183 images per class (four: 181, seven: 179). Cut per class in this order:
#   test 30 (as in the first model, so that the user split below is the same images) + user 10
#   (tail) / 40 (head) + val 20 + model 100 (tail) / the rest (head: 84-93) + spare (tail: the
#   rest, 21 fours and 19 sevens).
# Spare tail images are held out as extra test images (spare_is_test), so each tail class keeps
# test + spare = 51 (four) and 49 (seven) >= 40 images for evaluation; 100 model images of a tail
# class is the most that keeps seven (179) at >= 40 held out in steps of ten.
SEEN_SPLIT = DigitsSplit(
    val_per_class=20,
    model_tail_per_class=100,
    model_tail_named=3,
    spare_is_test=True,
    model_head_named=45,
)
# The first try at that regime (docs/model_seen.md): every head image named, so the generic
# caption labelled only tail images and acted as a name of {four, seven}; its plain tail prompts
# drew a four or a seven at random (51% / 45% in class, above the regime's 30%).
SEEN_TAIL_ONLY_SPLIT = replace(SEEN_SPLIT, model_head_named=-1)
NEVER_SEEN_SPLIT = DigitsSplit()
REGIME_SPLITS = {
    "never-seen": NEVER_SEEN_SPLIT,
    "seen": SEEN_SPLIT,
    "seen-tail-only": SEEN_TAIL_ONLY_SPLIT,
}


def _class_cuts(labels: np.ndarray, split: DigitsSplit) -> list[dict[str, list[int]]]:
    """Per class, the split's index lists in shuffled order (before sorting).

    Each class's indices are shuffled once with the split's seed and then cut in a fixed order:
    test, user, val, model, spare (head classes: the model takes all the rest, no spare).
    """
    rng = np.random.default_rng(split.seed)
    cuts = []
    for c in range(len(CLASS_NAMES)):
        idx = rng.permutation(np.flatnonzero(labels == c)).tolist()
        tail = c in split.tail_classes
        n_user = split.user_tail_per_class if tail else split.user_head_per_class
        bounds = np.cumsum([0, split.test_per_class, n_user, split.val_per_class]).tolist()
        n_model = split.model_tail_per_class if tail else len(idx) - bounds[-1]
        if bounds[-1] + n_model > len(idx) or n_model <= 0:
            raise ValueError(
                f"class {CLASS_NAMES[c]} has {len(idx)} images, too few for the split {split}"
            )
        bounds.append(bounds[-1] + n_model)
        cut = {
            name: idx[bounds[i] : bounds[i + 1]]
            for i, name in enumerate(("test", "user", "val", "model_train"))
        }
        cut["spare"] = idx[bounds[-1] :]
        cuts.append(cut)
    return cuts


def split_indices(labels: np.ndarray, split: DigitsSplit) -> dict[str, list[int]]:
    """Disjoint sorted index lists: `model_train`, `user`, `val` (empty when `val_per_class` is 0,
    as in the first model, whose card predates it), `test` and `spare` (unused tail images).

    The cut is reproducible (seeded) and the splits cannot overlap.
    """
    out: dict[str, list[int]] = {name: [] for name in SPLIT_NAMES}
    for cut in _class_cuts(labels, split):
        for name in out:
            out[name] += cut[name]
    return {k: sorted(v) for k, v in out.items()}


def named_indices(labels: np.ndarray, split: DigitsSplit, tail: bool = True) -> list[int]:
    """The tail (or head) classes' model images whose caption names their class (sorted).

    With `model_tail_named` (`model_head_named`) = -1 every such model image is named (the first
    model); otherwise the first that many of each class's model cut, in the split's shuffled order.
    """
    cuts = _class_cuts(labels, split)
    wanted = split.model_tail_named if tail else split.model_head_named
    field = "model_tail_named" if tail else "model_head_named"
    out: list[int] = []
    for c in range(len(CLASS_NAMES)):
        if (c in split.tail_classes) != tail:
            continue
        model = cuts[c]["model_train"]
        n = len(model) if wanted < 0 else wanted
        if n > len(model):
            raise ValueError(f"{field} {n} > {len(model)} model images of {CLASS_NAMES[c]}")
        out += model[:n]
    return sorted(out)


def tail_named_indices(labels: np.ndarray, split: DigitsSplit) -> list[int]:
    """The tail-class model images whose caption names their class (sorted)."""
    return named_indices(labels, split, tail=True)


def held_out_indices(labels: np.ndarray, split: DigitsSplit) -> set[int]:
    """Indices that nothing may train on: the test split, plus the spare tail images when the split
    holds them out as extra test images (`spare_is_test`)."""
    splits = split_indices(labels, split)
    held = set(splits["test"])
    if split.spare_is_test:
        held |= set(splits["spare"])
    return held


def to_digit_space(images: np.ndarray) -> np.ndarray:
    """RGB images (N, H, W, 3) uint8 -> scikit-learn's 8x8 digit space (N, 64) float in [0, 16]."""
    out = []
    for img in images:
        gray = Image.fromarray(img).convert("L").resize((8, 8), Image.Resampling.BOX)
        out.append(np.asarray(gray, dtype=np.float32).reshape(-1) * (16.0 / 255.0))
    return np.stack(out) if out else np.zeros((0, 64), np.float32)
