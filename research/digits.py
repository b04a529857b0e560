"""How the embedded benchmark splits scikit-learn's bundled digits (model, user, test, spare), and
the 8x8 digit space the evaluation's judge works in."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

# the rendering and the class names are the product's; research code takes them from here too
from pipeline.embedded import CLASS_NAMES, IMAGE_SIZE, load_digits_arrays, render  # noqa: F401


@dataclass(frozen=True)
class DigitsSplit:
    """How the digits are divided; every field is recorded in the model card."""

    seed: int = 0
    tail_classes: tuple[int, ...] = (4, 7)  # "four" and "seven" are rare for the model
    test_per_class: int = 30  # balanced held-out test set, read only by evaluation
    user_head_per_class: int = 40  # the user's dataset: head classes
    user_tail_per_class: int = 10  # the user's dataset: few-shot tail classes, unseen by the model
    model_tail_per_class: int = 3  # the model's own training images of each tail class


def split_indices(labels: np.ndarray, split: DigitsSplit) -> dict[str, list[int]]:
    """Disjoint index lists: `model_train`, `user`, `test`, and `spare` (unused tail images).

    Each class's indices are shuffled once with the split's seed and then cut in a fixed order
    (test, user, model), so the cut is reproducible and the splits cannot overlap.
    """
    rng = np.random.default_rng(split.seed)
    out: dict[str, list[int]] = {"model_train": [], "user": [], "test": [], "spare": []}
    for c in range(len(CLASS_NAMES)):
        idx = rng.permutation(np.flatnonzero(labels == c)).tolist()
        tail = c in split.tail_classes
        n_user = split.user_tail_per_class if tail else split.user_head_per_class
        cut1 = split.test_per_class
        cut2 = cut1 + n_user
        out["test"] += idx[:cut1]
        out["user"] += idx[cut1:cut2]
        if tail:
            out["model_train"] += idx[cut2 : cut2 + split.model_tail_per_class]
            out["spare"] += idx[cut2 + split.model_tail_per_class :]
        else:
            out["model_train"] += idx[cut2:]
    return {k: sorted(v) for k, v in out.items()}


def to_digit_space(images: np.ndarray) -> np.ndarray:
    """RGB images (N, H, W, 3) uint8 -> scikit-learn's 8x8 digit space (N, 64) float in [0, 16]."""
    out = []
    for img in images:
        gray = Image.fromarray(img).convert("L").resize((8, 8), Image.Resampling.BOX)
        out.append(np.asarray(gray, dtype=np.float32).reshape(-1) * (16.0 / 255.0))
    return np.stack(out) if out else np.zeros((0, 64), np.float32)
