"""How much of the evaluation's spread over training seeds is the classifier recipe's own noise?

`python -m research.recipe_study` trains the evaluation's classifier recipes on the seen regime's
user dataset (models/tiny-digits-seen's card split) with real data only and with the rare classes
oversampled, both with augmentation in the loop, under a constant learning rate (the evaluation's
recipes) and under a cosine decay to zero, over many training seeds. No generated image is
involved, so the images it scores on can be ones the diffusion model trained on: the model's own
training images (`model_train`: 200 rare, about 900 head), which no classifier of the evaluation
trains on and which neither its validation nor its test split contains. The test split is never
read here.

It reports, per recipe and schedule, the mean and std over seeds of rare and head accuracy, and
the paired (same seed) difference oversampling minus real data: the noise floor that the issue's
"more than twice the paired std" target has to clear.

Writes out/recipe_study/report.json and report.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from research.classifier import RECIPES, oversample
from research.digits import SEEN_SPLIT, load_digits_arrays, split_indices
from research.evaluate import (
    Task,
    _mean_std,
    _ms,
    _pm,
    accuracies,
    dev_pool,
    rendered,
    run_tasks,
    write_report,
)

SEED_OFFSET = 200  # none of the evaluation's seeds (test 0-4, validation 100-102)
RATIO, WEIGHT = 0.2, 1.0  # oversampling's mixing as validation chose it for the wide CNN (seen)
ADDED_PER_CLASS = 40  # the quota of the evaluation's adding variants
STEPS = {"small": (600, 1200), "wide": (800, 1600, 2400)}


def dev_indices(labels: np.ndarray) -> list[int]:
    """The seen model's training images: what this study scores on, the evaluation's development
    pool (`dev_pool`, which leaves out any image of the evaluation's user, validation or test
    split). It refuses to run if that pool is not every one of the model's training images."""
    dev = dev_pool(labels, SEEN_SPLIT, SEEN_SPLIT.tail_classes)
    if dev is None or dev != sorted(split_indices(labels, SEEN_SPLIT)["model_train"]):
        raise RuntimeError(
            "the development pool is not the seen model's training images: some are in an "
            "evaluation split, or too few are of a rare class"
        )
    return dev


def runs_of(schedule: str, steps: tuple[int, ...]) -> list[tuple[int, tuple[int, ...]]]:
    """(total steps, steps read) of each training run: a constant-rate run is read at every step
    count; a cosine run decays to its own end and is read there only."""
    return [(max(steps), steps)] if schedule == "constant" else [(s, (s,)) for s in steps]


def study_tasks(seeds: int) -> tuple[list[Task], dict]:
    images8, labels = load_digits_arrays()
    user = split_indices(labels, SEEN_SPLIT)["user"]
    user_x, user_y = rendered(images8, user), labels[user]
    dev = dev_indices(labels)
    dev_x, dev_y = rendered(images8, dev), labels[dev]
    rare = list(SEEN_SPLIT.tail_classes)
    over_x = np.concatenate([oversample(user_x[user_y == d], ADDED_PER_CLASS) for d in rare])
    over_y = np.repeat(np.asarray(rare, dtype=np.int64), ADDED_PER_CLASS)
    adders = {"real": (None, None, 0.0, 1.0), "oversample": (over_x, over_y, RATIO, WEIGHT)}
    tasks = []
    for name, steps in STEPS.items():
        for schedule in ("constant", "cosine"):
            for total, checkpoints in runs_of(schedule, steps):
                recipe = replace(RECIPES[name], steps=total, lr_schedule=schedule)
                for adder, (ax, ay, ratio, weight) in adders.items():
                    for i in range(seeds):
                        key = (name, schedule, total, adder, SEED_OFFSET + i)
                        tasks.append(
                            Task(
                                key,
                                "users",
                                recipe,
                                SEED_OFFSET + i,
                                user_x,
                                user_y,
                                ax,
                                ay,
                                ratio,
                                weight,
                                {"dev": dev_x},
                                tuple(checkpoints),
                            )
                        )
    data = {
        "dev_y": dev_y,
        "rare": rare,
        "dev_size": len(dev),
        "dev_rare": int(np.isin(dev_y, rare).sum()),
    }
    return tasks, data


def summarise(results: dict, data: dict, seeds: int) -> list[dict]:
    rows = []
    for name, steps in STEPS.items():
        for schedule in ("constant", "cosine"):
            for total, step in [(t, s) for t, read in runs_of(schedule, steps) for s in read]:
                acc = {
                    adder: [
                        accuracies(
                            results[(name, schedule, total, adder, SEED_OFFSET + i)][step]["dev"],
                            data["dev_y"],
                            data["rare"],
                        )
                        for i in range(seeds)
                    ]
                    for adder in ("real", "oversample")
                }
                row = {"recipe": name, "schedule": schedule, "steps": step}
                for adder, per_seed in acc.items():
                    for metric in ("rare", "head"):
                        row[f"{adder}_{metric}"] = _mean_std([a[metric] for a in per_seed])
                for metric in ("rare", "head"):
                    row[f"paired_{metric}"] = _mean_std(
                        [o[metric] - r[metric] for o, r in zip(acc["oversample"], acc["real"])]
                    )
                rows.append(row)
    return rows


def markdown(report: dict) -> str:
    lines = [
        "| recipe | lr schedule | steps | real+aug rare | real+aug head | oversampling rare"
        " | oversampling minus real+aug, rare (paired) | head (paired) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['recipe']} | {r['schedule']} | {r['steps']} | {_ms(r['real_rare'])}"
            f" | {_ms(r['real_head'])} | {_ms(r['oversample_rare'])} | {_pm(r['paired_rare'])}"
            f" | {_pm(r['paired_head'])} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m research.recipe_study", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("out/recipe_study"))
    parser.add_argument("--cache", type=Path, default=Path("out/eval/cache"))
    args = parser.parse_args(argv)
    if args.seeds < 2:
        parser.error("--seeds: at least 2, for a standard deviation")
    t0 = time.perf_counter()
    tasks, data = study_tasks(args.seeds)
    results = run_tasks(tasks, args.jobs, args.cache)
    report = {
        "seeds": [SEED_OFFSET + i for i in range(args.seeds)],
        "scored_on": f"seen split model_train: {data['dev_size']} images, {data['dev_rare']} rare",
        "oversampling": {"per_class": ADDED_PER_CLASS, "ratio": RATIO, "weight": WEIGHT},
        "rows": summarise(results, data, args.seeds),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    write_report(args.out, report, markdown(report))
    print(
        f"{report['scored_on']}; seeds {report['seeds'][0]}-{report['seeds'][-1]}; {report['seconds']} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
