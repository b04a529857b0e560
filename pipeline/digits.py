"""The embedded dataset: scikit-learn's bundled digits, split three ways and rendered as 32x32 RGB."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

CLASS_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
IMAGE_SIZE = 32


@dataclass(frozen=True)
class DigitsSplit:
    """How the digits are divided; every field is recorded in the model card."""

    seed: int = 0
    tail_classes: tuple[int, ...] = (4, 7)  # "four" and "seven" are rare for the model
    test_per_class: int = 30  # balanced held-out test set, read only by evaluation
    user_head_per_class: int = 40  # the user's dataset: head classes
    user_tail_per_class: int = 10  # the user's dataset: few-shot tail classes, unseen by the model
    model_tail_per_class: int = 3  # the model's own training images of each tail class


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """All 1797 bundled digits: images (N, 8, 8) float in [0, 16] and labels (N,) int."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images.astype(np.float32), digits.target.astype(np.int64)


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


def render(image8: np.ndarray) -> Image.Image:
    """One 8x8 digit in [0, 16] as a 32x32 RGB PIL image (white ink on black, bicubic upsampling)."""
    gray = Image.fromarray(np.clip(image8 * (255.0 / 16.0), 0, 255).astype(np.uint8), mode="L")
    return gray.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC).convert("RGB")


def to_digit_space(images: np.ndarray) -> np.ndarray:
    """RGB images (N, H, W, 3) uint8 -> scikit-learn's 8x8 digit space (N, 64) float in [0, 16]."""
    out = []
    for img in images:
        gray = Image.fromarray(img).convert("L").resize((8, 8), Image.Resampling.BOX)
        out.append(np.asarray(gray, dtype=np.float32).reshape(-1) * (16.0 / 255.0))
    return np.stack(out) if out else np.zeros((0, 64), np.float32)


def materialize(root: Path, split_indices_by_name: dict[str, list[int]]) -> dict[str, Path]:
    """Write the user's dataset and the test split as ImageFolders of PNGs under `root`.

    `root/user/<class name>/<digit index>.png` is the dataset that the default run augments;
    `root/test/...` is the balanced held-out split that only evaluation reads. A marker file
    written last makes a rerun skip the work (and a half-written folder get redone).
    """
    images8, labels = load_digits_arrays()
    folders = {}
    for split in ("user", "test"):
        folder = root / split
        folders[split] = folder
        marker = folder / ".complete"
        if marker.is_file():
            continue
        for index in split_indices_by_name[split]:
            class_dir = folder / CLASS_NAMES[labels[index]]
            class_dir.mkdir(parents=True, exist_ok=True)
            render(images8[index]).save(class_dir / f"{index:04d}.png", format="PNG")
        marker.write_text("ok\n")
    return folders
