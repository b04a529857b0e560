"""An independent judge of generated digits: an SVC on scikit-learn's 8x8 digit space.

It never sees the held-out images (the test split, and the spare tail images where the split holds
them out as extra test images), and it is a different kind of model from the diffusion model and
from the CNN that evaluation trains, so it cannot share their blind spots by construction.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.svm import SVC

from research.digits import DigitsSplit, held_out_indices, load_digits_arrays, to_digit_space


@dataclass
class Judge:
    model: SVC
    train_size: int

    def predict(self, images: np.ndarray) -> np.ndarray:
        """(N, H, W, 3) uint8 -> (N,) predicted digit."""
        return self.model.predict(to_digit_space(images))


def judge_on(indices: np.ndarray) -> Judge:
    """An RBF SVC (gamma as in scikit-learn's digits example) on the digits at `indices`."""
    images8, labels = load_digits_arrays()
    train = np.asarray(indices)
    model = SVC(gamma=0.001, C=10.0).fit(images8[train].reshape(len(train), -1), labels[train])
    return Judge(model, len(train))


def train_judge(split: DigitsSplit | None = None) -> Judge:
    """The SVC of `judge_on` on every digit outside the held-out images: the test split, and the
    spare tail images when `split.spare_is_test`."""
    _, labels = load_digits_arrays()
    held_out = held_out_indices(labels, split or DigitsSplit())
    return judge_on(np.asarray([i for i in range(len(labels)) if i not in held_out]))


def nearest_distances(candidates: np.ndarray, references: np.ndarray) -> np.ndarray:
    """Euclidean distance from each candidate to its nearest reference, both (N, 64) digit space."""
    d = ((candidates[:, None, :] - references[None, :, :]) ** 2).sum(-1)
    return np.sqrt(d.min(axis=1))


def near_copy_threshold(class_images8: np.ndarray, percentile: float = 1.0) -> float:
    """The `percentile` of nearest-neighbour distances among real images of one class (N, 64)."""
    d = np.sqrt(((class_images8[:, None, :] - class_images8[None, :, :]) ** 2).sum(-1))
    np.fill_diagonal(d, np.inf)
    return float(np.percentile(d.min(axis=1), percentile))
