"""How much can any 40 added images per rare class give? Real ones, retrieved, as the ceiling.

The issue's seen-regime target asks tailseed's shards to raise rare-class accuracy by 3 points
over real data with augmentation. Whether any augmentation can do that on this benchmark is a
question about the benchmark, answered here with the best images a generator could hope to
make: *real* digits of the rare classes, unseen by every classifier, in the styles the test
split holds (Geng et al. 2024's retrieval baseline). `python -m research.retrieval_study` runs,
in the seen regime (configs/seen.yaml and its model's card; the evaluation's splits, recipes,
steps, mixing grid, seeds and cache):

1. The retrieved variant: per rare class, `--per-class` real images (default 40, the shards'
   quota) drawn without replacement from the development pool (the seen model's own training
   images of the class, in no evaluation split), one seeded draw per "generation draw".
2. Choices on validation only, exactly as the evaluation makes them (`choice_phase`): the steps
   (on the development pool, real data only: the evaluation's cached trainings) and each
   recipe's mixing (ratio, weight) for oversampling and the retrieved images.
3. The test split, once (`evaluate_test_split`): real data with augmentation, oversampling and the
   retrieved images, 5 training seeds x 3 draws, paired differences as in docs/eval.md.

The development pool chose the steps from real data only; the retrieved images come from it too.
Steps are a property of the recipe on real data, so this flatters nothing the test split reads.

Writes out/retrieval_study/report.json and report.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from research.digits import CLASS_NAMES, load_digits_arrays
from research.evaluate import (
    Generated,
    Options,
    Variant,
    _pm,
    choice_phase,
    dev_pool,
    embedded_regime,
    evaluate_test_split,
    load_regime_data,
    paired,
    rendered,
    write_report,
)

# draw d takes its images with numpy's default_rng(RETRIEVAL_SEED + d)
RETRIEVAL_SEED = 0
PER_CLASS = 40  # the shards' quota: configs/seen.yaml fills each tail class from 10 to 50


def retrieved_draw(
    images8: np.ndarray,
    labels: np.ndarray,
    pool: list[int],
    rare: list[int],
    per_class: int,
    draw: int,
) -> Generated:
    """`per_class` real images of each rare class from `pool`, drawn without replacement."""
    rng = np.random.default_rng(RETRIEVAL_SEED + draw)
    chosen: list[int] = []
    for d in rare:
        of_class = [i for i in pool if labels[i] == d]
        if len(of_class) < per_class:
            raise ValueError(
                f"{CLASS_NAMES[d]}: {len(of_class)} pool images, fewer than {per_class}"
            )
        chosen += sorted(rng.choice(of_class, per_class, replace=False).tolist())
    return Generated(
        rendered(images8, chosen), labels[chosen].astype(np.int64), [{}] * len(chosen), {}
    )


def markdown(report: dict) -> str:
    lines = [
        "# Retrieval study: real images added in place of generated ones (seen regime)",
        "",
        f"{report['per_class']} real images per rare class from the development pool, "
        f"{report['options']['draws']} draws x {report['options']['seeds']} training seeds; "
        "rare accuracy minus real data with augmentation, paired, on the test split "
        f"({report['test_rare_images']} rare images: one image is "
        f"{100 / report['test_rare_images']:.2f} points). Steps {report['steps']}; mixing chosen "
        "on validation.",
        "",
        "| recipe | real+aug (abs.) | oversampling: rare | retrieved: rare | retrieved: head | retrieved minus oversampling | mixing (ratio, weight) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, entry in report["as_users_train"].items():
        real = entry["real"]["accuracy"]["rare"]["mean"]
        over = entry["oversample"]["vs_real"]["rare"]
        ret = entry["retrieved"]
        mix = ret["mixing"]
        lines.append(
            f"| {name} | {real:.1f} | {_pm(over)} | {_pm(ret['vs_real']['rare'])} | "
            f"{_pm(ret['vs_real']['head'])} | {_pm(report['retrieved_vs_oversample'][name])} | "
            f"({mix['ratio']}, {mix['weight']}) |"
        )
    lines += ["", f"Wall time: {report['seconds']:.0f} s.", ""]
    return "\n".join(lines)


def paired_by_seed(variant: dict, reference: dict) -> dict:
    """Rare accuracy, variant minus reference, over the variant's runs of a test table entry
    (`evaluate_test_split`), each paired with the reference's run of the same training seed."""

    def runs(entry: dict) -> dict:
        out = {}
        for name, accuracy in entry["runs"].items():
            seed, draw = name.removeprefix("seed").split("_draw")
            out[(int(seed), None if draw == "None" else int(draw))] = accuracy
        return out

    return paired(runs(variant), runs(reference), "rare")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m research.retrieval_study", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--per-class", type=int, default=PER_CLASS)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--cache", type=Path, default=Path("research/eval_cache"))
    parser.add_argument("--out", type=Path, default=Path("out/retrieval_study"))
    args = parser.parse_args(argv)
    t0 = time.perf_counter()

    regime, base, card, split = embedded_regime("seen")
    rare = sorted(split.tail_classes)
    data = load_regime_data(base, card, rare, args.per_class)
    images8, labels = load_digits_arrays()
    pool = dev_pool(labels, split, rare)
    if pool is None:
        raise RuntimeError("the seen split has no development pool")
    for draw in range(args.draws):
        data.generated[("retrieved", draw)] = retrieved_draw(
            images8, labels, pool, rare, args.per_class, draw
        )

    options = Options(seeds=args.seeds, draws=args.draws, jobs=args.jobs, cache=args.cache)
    oversample = Variant("oversample", "oversampling", "oversample")
    retrieved = Variant("retrieved", "retrieved real images", "generated")
    adders = {"oversample": oversample, "retrieved": retrieved}
    choices = choice_phase(data, options, adders, ["retrieved"], eligible=["retrieved"])
    recipes = {k: replace(r, steps=choices.steps[k]) for k, r in options.recipes.items()}
    variants = [Variant("real", "real + augmentation", "none"), oversample, retrieved]
    per_recipe, first = evaluate_test_split(data, options, recipes, variants, choices.mixing)
    report = {
        "regime": regime.key,
        "per_class": args.per_class,
        "options": {"seeds": args.seeds, "draws": args.draws},
        "steps": choices.steps,
        "mixing_val": choices.to_dict()["mixing"],
        "mixing_scores_val": choices.to_dict()["mixing_scores_val"],
        "test_rare_images": int(np.isin(data.test_y, rare).sum()),
        "as_users_train": per_recipe,
        "first_protocol": first,
        "retrieved_vs_oversample": {
            n: paired_by_seed(e["retrieved"], e["oversample"]) for n, e in per_recipe.items()
        },
        "seconds": round(time.perf_counter() - t0, 1),
    }
    write_report(args.out, report, markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
