"""How much of a rare class do 40 added images teach on their own? Rare classes from them alone.

Adding images to the user's 10 real ones measures what they add *beyond* those 10, which is
small for any images a classifier of the 10 already gets right. This probe asks the plainer
question: a classifier that sees a rare class *only* through the 40 images of one set, with the
user's real head classes beside them, how well does it recognise the real validation images of
that class? `python -m research.transfer_probe RUN [RUN ...]` trains, in the seen regime, the
small CNN as users train (augmentation in the loop, the evaluation's 1200 steps), one training
per seed on:

- the user's head images (40 per class) and, per rare class, one of:
  - `sources`: the user's 10 real images (the real data the shards are added to);
  - `real 40`: 40 real images from the development pool (the seen model's own training images
    in no evaluation split; the retrieval study's draw 0);
  - each RUN's 40 images per rare class (its shards, draw as made), with no real rare image;
  - with `--oracle RUN`: 40 of the run's walk candidates per rare class (its whole pool,
    regenerated as research/selection_study.py does, before any filter) drawn at random among
    those an *oracle* judge calls the class: the evaluation's SVC trained on the images the seen
    model and the user had (its model_train and user splits; no validation or test image). It
    asks what the model's images teach when the judge that keeps them knows the class as the
    model does, rather than from the user's 10 images.

It reports, on the validation split (20 images per rare class; the test split is not read),
rare and head accuracy and each rare class's recall, mean ± std over the seeds.
Writes out/transfer_probe/report.json and report.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

from research.classifier import SMALL, predict, train_as_users_train
from research.digits import CLASS_NAMES, DigitsSplit, load_digits_arrays, split_indices
from research.evaluate import (
    accuracies,
    dev_pool,
    embedded_regime,
    load_regime_data,
    read_run,
    write_report,
)
from research.retrieval_study import retrieved_draw

STEPS = 1200  # the evaluation's choice for the small CNN in both regimes (docs/eval.md)
SEED_OFFSET = 300  # training seeds 300.. : none of the evaluation's


def rare_sets(
    data, split: DigitsSplit, rare: list[int], runs: list[Path]
) -> dict[str, dict[int, np.ndarray]]:
    """Set name -> rare digit -> its images (N, 32, 32, 3) uint8."""
    images8, labels = load_digits_arrays()
    pool = dev_pool(labels, split, rare)
    sets = {"sources": {d: data.user_x[data.user_y == d] for d in rare}}
    if pool is not None:
        real = retrieved_draw(images8, labels, pool, rare, 40, 0)
        sets["real 40"] = {d: real.of(d) for d in rare}
    for run in runs:
        gen = read_run(run)
        sets[run.name] = {d: gen.of(d) for d in rare}
    return sets


def oracle_set(
    run: Path, split: DigitsSplit, rare: list[int], work: Path, per_class: int = 40, seed: int = 0
) -> dict[int, np.ndarray]:
    """Per rare digit, `per_class` of the run's walk candidates that the oracle judge calls that
    digit, drawn with numpy's default_rng(seed) (see the module docstring)."""
    from research.judge import judge_on
    from research.selection_study import candidates

    _, labels = load_digits_arrays()
    cut = split_indices(labels, split)
    oracle = judge_on(np.asarray(sorted(cut["model_train"] + cut["user"])))
    classes = {int(k): v for k, v in json.loads((run / "classes.json").read_text()).items()}
    rng = np.random.default_rng(seed)
    out = {}
    for class_index, name in sorted(classes.items()):
        digit = CLASS_NAMES.index(name)
        if digit not in rare:
            continue
        _, images = candidates(run, class_index, work / run.name / f"class_{class_index:04d}")
        of_class = np.flatnonzero(oracle.predict(images) == digit)
        if len(of_class) < per_class:
            raise ValueError(f"{run}: {len(of_class)} candidates of {name}, fewer than {per_class}")
        out[digit] = images[np.sort(rng.choice(of_class, per_class, replace=False))]
    return out


def training_set(
    user_x: np.ndarray, user_y: np.ndarray, rare: list[int], per_rare: dict[int, np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """The user's head images, and `per_rare` as the only images of the rare classes."""
    head = ~np.isin(user_y, rare)
    x = np.concatenate([user_x[head], *per_rare.values()])
    y = np.concatenate([user_y[head], *[np.full(len(v), d, np.int64) for d, v in per_rare.items()]])
    return x, y


def train_on(data, rare: list[int], per_rare: dict[int, np.ndarray], seed: int) -> dict:
    """Validation accuracies of the small CNN trained on the user's head images and `per_rare`."""
    x, y = training_set(data.user_x, data.user_y, rare, per_rare)
    model, _ = train_as_users_train(x, y, None, None, replace(SMALL, steps=STEPS), seed)
    return accuracies(predict(model, data.val_x), data.val_y, rare)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m research.transfer_probe", description=__doc__.splitlines()[0]
    )
    parser.add_argument("runs", nargs="*", type=Path, help="seen-regime augment output folders")
    parser.add_argument(
        "--oracle", nargs="*", type=Path, default=[], help="runs whose pools the oracle keeps from"
    )
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("out/transfer_probe"))
    args = parser.parse_args(argv)
    _, base, card, split = embedded_regime("seen")
    rare = sorted(split.tail_classes)
    data = load_regime_data(base, card, rare, base.select.quota - 10)
    report = {"regime": "seen", "steps": STEPS, "seeds": args.seeds, "sets": {}}
    sets = rare_sets(data, split, rare, args.runs)
    for run in args.oracle:
        sets[f"{run.name}, oracle-kept pool"] = oracle_set(
            run, split, rare, args.out / "candidates"
        )
    for name, per_rare in sets.items():
        runs = [train_on(data, rare, per_rare, SEED_OFFSET + s) for s in range(args.seeds)]
        keys = ["rare", "head", *[CLASS_NAMES[d] for d in rare]]  # and each rare class's recall
        report["sets"][name] = {
            "images_per_rare_class": {CLASS_NAMES[d]: len(v) for d, v in per_rare.items()},
            **{
                k: {
                    "mean": float(np.mean([r[k] for r in runs])),
                    "std": float(np.std([r[k] for r in runs], ddof=1)),
                }
                for k in keys
            },
        }
        print(name, {k: round(report["sets"][name][k]["mean"], 1) for k in keys}, flush=True)
    lines = [
        "# Rare classes from the added images alone (seen, validation)",
        "",
        f"Small CNN, {STEPS} steps, augmentation in the loop, seeds {SEED_OFFSET}-"
        f"{SEED_OFFSET + args.seeds - 1}; the user's head images plus each set as the only images"
        " of the rare classes.",
        "",
        "| rare images | per class | rare | head | "
        + " | ".join(f"{CLASS_NAMES[d]} recall" for d in rare)
        + " |",
        "|---|---:|---:|---:|" + "---:|" * len(rare),
    ]
    for name, entry in report["sets"].items():
        count = "/".join(str(v) for v in entry["images_per_rare_class"].values())
        lines.append(
            f"| {name} | {count} | {entry['rare']['mean']:.1f} ± {entry['rare']['std']:.1f} | "
            f"{entry['head']['mean']:.1f} ± {entry['head']['std']:.1f} | "
            + " | ".join(
                f"{entry[CLASS_NAMES[d]]['mean']:.1f} ± {entry[CLASS_NAMES[d]]['std']:.1f}"
                for d in rare
            )
            + " |"
        )
    write_report(args.out, report, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
