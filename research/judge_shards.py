"""Judge a run's generated digits with the evaluation's independent SVC: in-class share, near-copies.

`python -m research.judge_shards out/seen-filter [--regime seen]` reads the run's shards (tarfile:
PNG and class only) and reports per class the share the SVC of research/judge.py (trained outside
the regime's held-out images) recognises as the intended digit, the share of near-copies of the
user's real images of the class (closer than the 1st percentile of real within-class
nearest-neighbour distances, in scikit-learn's 8x8 digit space), and the median distance to the
nearest real image of the user's split.
"""

from __future__ import annotations

import argparse
import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from research.digits import (
    CLASS_NAMES,
    REGIME_SPLITS,
    load_digits_arrays,
    render,
    split_indices,
    to_digit_space,
)
from research.judge import near_copy_threshold, nearest_distances, train_judge


def read_run(out: Path) -> tuple[np.ndarray, np.ndarray]:
    """A run's generated images (N, H, W, 3) uint8 and their digits (N,)."""
    classes = json.loads((out / "classes.json").read_text())
    digit_of = {int(k): CLASS_NAMES.index(v) for k, v in classes.items()}
    images, digits = [], []
    for tar_path in sorted((out / "shards").glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar:
                data = tar.extractfile(member).read()
                if member.name.endswith(".png"):
                    images.append(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
                elif member.name.endswith(".cls"):
                    digits.append(digit_of[int(data)])
    return np.stack(images), np.asarray(digits)


def judge_run(out: Path, regime: str) -> dict:
    split = REGIME_SPLITS[regime]
    judge = train_judge(split)
    images8, labels = load_digits_arrays()
    cut = split_indices(labels, split)
    user, val = np.asarray(cut["user"]), np.asarray(cut["val"], dtype=np.int64)
    images, digits = read_run(out)
    predicted, features = judge.predict(images), to_digit_space(images)
    report = {
        "run": str(out),
        "regime": regime,
        "judged_in_class": float((predicted == digits).mean()),
    }
    for d in sorted(set(digits.tolist())):
        chosen = digits == d
        sources = images8[user[labels[user] == d]].reshape(-1, 64)
        distance = nearest_distances(features[chosen], sources)
        threshold = near_copy_threshold(images8[labels == d].reshape(-1, 64))
        report[CLASS_NAMES[d]] = {
            "images": int(chosen.sum()),
            "judged_in_class": round(float((predicted[chosen] == d).mean()), 3),
            "near_copies": round(float((distance < threshold).mean()), 3),
            "median_distance_to_sources": round(float(np.median(distance)), 1),
            **validation_reach(
                roundtrip(images8, val[labels[val] == d]),
                roundtrip(images8, user[labels[user] == d]),
                features[chosen],
            ),
        }
    return report


def roundtrip(images8: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """Real digits as a run's images are measured: rendered to 32x32 RGB, back to digit space (the
    round trip alone moves a digit by about 8, so real and generated are compared after the same)."""
    if len(indices) == 0:
        return np.zeros((0, 64), np.float32)
    return to_digit_space(np.stack([np.asarray(render(images8[i])) for i in indices]))


def validation_reach(held: np.ndarray, sources: np.ndarray, added: np.ndarray) -> dict:
    """How close the added images come to real digits of the class that no run saw (the regime's
    validation images, (M, 64) in digit space after `roundtrip`, as are the sources), against the
    sources alone: the mean distance from each held image to its nearest source, to its nearest
    source-or-added image, and the share of held images whose nearest is an added image. Images that fill the sources' gaps bring the
    second below the first; near-copies of the sources cannot. Empty when the regime has no
    validation split."""
    if len(held) == 0:
        return {}
    to_sources = nearest_distances(held, sources)
    to_added = nearest_distances(held, added) if len(added) else np.full(len(held), np.inf)
    return {
        "validation_images": int(len(held)),
        "validation_to_sources": round(float(to_sources.mean()), 2),
        "validation_to_sources_or_added": round(float(np.minimum(to_sources, to_added).mean()), 2),
        "validation_nearest_is_added": round(float((to_added < to_sources).mean()), 3),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="augment output folders")
    parser.add_argument("--regime", choices=sorted(REGIME_SPLITS), default="seen")
    args = parser.parse_args(argv)
    for out in args.runs:
        print(json.dumps(judge_run(out, args.regime)))


if __name__ == "__main__":
    main()
