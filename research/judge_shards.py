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
    user = np.asarray(split_indices(labels, split)["user"])
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
        }
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="augment output folders")
    parser.add_argument("--regime", choices=sorted(REGIME_SPLITS), default="seen")
    args = parser.parse_args(argv)
    for out in args.runs:
        print(json.dumps(judge_run(out, args.regime)))


if __name__ == "__main__":
    main()
