"""The embedded dataset: scikit-learn's bundled digits rendered as 32x32 RGB ImageFolders.

The product only materialises what the embedded model's card names (its `split_indices`); how the
digits are split is research (`research/digits.py`), recorded in the card when the model is trained.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

CLASS_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
IMAGE_SIZE = 32


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """All 1797 bundled digits: images (N, 8, 8) float in [0, 16] and labels (N,) int."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images.astype(np.float32), digits.target.astype(np.int64)


def render(image8: np.ndarray) -> Image.Image:
    """One 8x8 digit in [0, 16] as a 32x32 RGB PIL image (white ink on black, bicubic upsampling)."""
    gray = Image.fromarray(np.clip(image8 * (255.0 / 16.0), 0, 255).astype(np.uint8), mode="L")
    return gray.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC).convert("RGB")


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
