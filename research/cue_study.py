"""Can a classifier tell tailseed's images from real ones, and does that cost rare accuracy?

Every image the evaluation adds is of a rare class, so anything that marks an image as generated
is also a label cue a classifier can learn instead of the digit's shape. `python -m
research.cue_study` measures, in the seen regime (configs/seen.yaml, the shipped configuration,
generation draws 0-2 as the evaluation makes them):

1. The cue. A logistic regression, 5-fold cross-validated, tells real images (the user's dataset,
   every class) from generated ones (the draw's images) from features that carry no shape: each
   image's histogram of pixel values, and its mean channel differences |R-G| and |R-B| (the real
   digits are gray, R=G=B). Chance is the share of the larger group.
2. What removing it changes. The evaluation's protocol (augmentation in the loop, the added images
   mixed in at the ratio and weight the evaluation's validation chose for the shipped tailseed)
   with the images added as they are, made gray (the channel mean), and made gray with each
   image's values matched rank for rank to the real images of its class (so that its histogram
   is theirs: a black background where the real digits have one). Scored on the development pool
   (the seen model's training images, in no split of the evaluation; 200 rare), paired with real
   data and augmentation by training seed, over seeds x draws. The diffusion model trained on the
   development pool, so its images may resemble those; that flatters every form of them alike.
   `--score-on dev,val,test` also scores on the evaluation's validation split (40 rare, which
   the diffusion model never saw) and on its test split, read only to report a form already
   chosen on the development pool or validation.

Writes out/cue_study/report.json and report.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from research.classifier import RECIPES
from research.digits import SEEN_SPLIT, load_digits_arrays
from research.evaluate import (
    Task,
    _mean_std,
    _pm,
    accuracies,
    dev_pool,
    eval_splits,
    load_config,
    make_runs,
    read_image_folder,
    read_run,
    regimes,
    rendered,
    run_tasks,
    write_report,
)

# training seeds: none of the evaluation's (test 0-4, validation 100-102) nor recipe_study's
SEED_OFFSET = 300
DRAWS = 3
# the mixing (ratio, weight) that the evaluation's validation chose for the shipped tailseed,
# seen regime (docs/eval.md), and the steps it chose on the development pool
MIXING = {"small": (0.1, 1.0), "wide": (0.2, 0.5)}
STEPS = {"small": 1200, "wide": 3200}
FORMS = ("as generated", "gray", "gray, histogram of its class")
HIST_BINS = [0, 1, 3, 6, 11, 21, 60, 120, 200, 235, 255, 256]


def gray(images: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) uint8 -> the same with every channel the rounded channel mean."""
    g = np.round(images.astype(np.float64).mean(axis=3)).astype(np.uint8)
    return np.repeat(g[..., None], 3, axis=3)


def match_histogram(images: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Each (gray) image's pixels, ranked by value, take the reference pool's value quantiles in
    the same order: the image keeps its shape and gets the reference's histogram."""
    pool = np.sort(reference[..., 0].reshape(-1))
    out = np.empty_like(images)
    for i, image in enumerate(gray(images)):
        flat = image[..., 0].reshape(-1)
        quantiles = (np.arange(flat.size) + 0.5) / flat.size
        values = np.empty_like(flat)
        values[np.argsort(flat, kind="stable")] = pool[(quantiles * pool.size).astype(int)]
        out[i] = np.repeat(values.reshape(image.shape[:2])[..., None], 3, axis=2)
    return out


def cue_features(images: np.ndarray) -> np.ndarray:
    """Per image: its value histogram (as shares) and mean |R-G|, |R-B|; nothing of its shape."""
    x = images.astype(np.int64)
    hist = np.stack([np.histogram(im[..., 0], bins=HIST_BINS)[0] for im in x]) / x[0, ..., 0].size
    tint = np.stack(
        [
            np.abs(x[..., 0] - x[..., 1]).mean(axis=(1, 2)),
            np.abs(x[..., 0] - x[..., 2]).mean(axis=(1, 2)),
        ],
        axis=1,
    )
    return np.concatenate([hist, tint], axis=1)


def probe(real: np.ndarray, generated: np.ndarray) -> dict:
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    x = np.concatenate([cue_features(real), cue_features(generated)])
    y = np.r_[np.zeros(len(real)), np.ones(len(generated))]
    folds = StratifiedKFold(5, shuffle=True, random_state=0)
    acc = cross_val_score(LogisticRegression(max_iter=5000), x, y, cv=folds).mean()
    return {
        "accuracy": round(float(acc) * 100, 1),
        "chance": round(max(y.mean(), 1 - y.mean()) * 100, 1),
    }


def image_stats(images: np.ndarray) -> dict:
    x = images.astype(np.int64)
    return {
        "exact_black_pct": round(float((x[..., 0] == 0).mean() * 100), 1),
        "mean_abs_r_minus_b": round(float(np.abs(x[..., 0] - x[..., 2]).mean()), 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m research.cue_study", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--recipes", default="small", help="comma-separated: small, wide")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("out/cue_study"))
    parser.add_argument("--cache", type=Path, default=None, help="default: OUT/cache")
    parser.add_argument(
        "--score-on", default="dev", help="comma-separated: dev (the default), val, test"
    )
    args = parser.parse_args(argv)
    recipes = args.recipes.split(",")
    if unknown := set(recipes) - set(RECIPES):
        parser.error(f"--recipes: unknown {sorted(unknown)}; known: {sorted(RECIPES)}")
    splits = args.score_on.split(",")
    if unknown := set(splits) - {"dev", "val", "test"}:
        parser.error(f"--score-on: unknown {sorted(unknown)}; known: dev, val, test")
    t0 = time.perf_counter()
    regime = regimes()["seen"]
    base = load_config(regime.config, list(regime.overrides))
    runs = make_runs(regime, base, {"tailseed": ()}, range(DRAWS), args.out / "runs", {})

    images8, labels = load_digits_arrays()
    rare = list(SEEN_SPLIT.tail_classes)
    user_x, user_y, _ = read_image_folder(Path(base.dataset.path))
    dev = dev_pool(labels, SEEN_SPLIT, rare)
    if dev is None:
        raise RuntimeError("the seen split has no development pool")
    indices = {"dev": dev} | {
        k: v for k, v in eval_splits(labels, SEEN_SPLIT).items() if k != "user"
    }
    scored = {k: (rendered(images8, indices[k]), labels[indices[k]]) for k in splits}

    added: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {form: [] for form in FORMS}
    cue: list[dict] = []
    for draw in range(DRAWS):
        g = read_run(Path(runs[("tailseed", draw)]["output_dir"]))
        keep = np.isin(g.labels, rare)
        x, y = g.images[keep], g.labels[keep]
        matched = x.copy()
        for d in rare:
            matched[y == d] = match_histogram(x[y == d], user_x[user_y == d])
        added["as generated"].append((x, y))
        added["gray"].append((gray(x), y))
        added["gray, histogram of its class"].append((matched, y))
        cue.append(
            {form: probe(user_x, added[form][-1][0]) for form in FORMS}
            | {"stats": {form: image_stats(added[form][-1][0]) for form in FORMS}}
        )

    tasks = []
    for name in recipes:
        recipe = replace(RECIPES[name], steps=STEPS[name])
        ratio, weight = MIXING[name]
        for i in range(args.seeds):
            seed = SEED_OFFSET + i
            eval_x, checkpoints = {k: v[0] for k, v in scored.items()}, (recipe.steps,)
            tasks.append(
                Task(
                    (name, "real", 0, seed),
                    "users",
                    recipe,
                    seed,
                    user_x,
                    user_y,
                    None,
                    None,
                    0.0,
                    1.0,
                    eval_x,
                    checkpoints,
                )
            )
            for form in FORMS:
                for draw, (x, y) in enumerate(added[form]):
                    tasks.append(
                        Task(
                            (name, form, draw, seed),
                            "users",
                            recipe,
                            seed,
                            user_x,
                            user_y,
                            x,
                            y,
                            ratio,
                            weight,
                            eval_x,
                            checkpoints,
                        )
                    )
    results = run_tasks(tasks, args.jobs, args.cache or args.out / "cache")

    rows = []
    seeds = [SEED_OFFSET + i for i in range(args.seeds)]
    for name in recipes:
        for split, (_, truth) in scored.items():
            acc = {
                key[1:]: accuracies(pred[STEPS[name]][split], truth, rare)
                for key, pred in results.items()
                if key[0] == name
            }
            reference = [acc[("real", 0, s)] for s in seeds]
            row = {
                "recipe": name,
                "steps": STEPS[name],
                "mixing": list(MIXING[name]),
                "split": split,
                "images": len(truth),
                "rare_images": int(np.isin(truth, rare).sum()),
                "real_rare": _mean_std([a["rare"] for a in reference]),
                "real_head": _mean_std([a["head"] for a in reference]),
            }
            for form in FORMS:
                for metric in ("rare", "head", "balanced"):
                    row[f"{form}: {metric}"] = _mean_std(
                        [
                            acc[(form, d, s)][metric] - acc[("real", 0, s)][metric]
                            for d in range(DRAWS)
                            for s in seeds
                        ]
                    )
            # the last form against the first, paired by seed and draw
            row["matched minus as generated: rare"] = _mean_std(
                [
                    acc[(FORMS[-1], d, s)]["rare"] - acc[(FORMS[0], d, s)]["rare"]
                    for d in range(DRAWS)
                    for s in seeds
                ]
            )
            rows.append(row)

    report = {
        "regime": "seen",
        "config": str(regime.config),
        "draws": DRAWS,
        "seeds": [SEED_OFFSET + i for i in range(args.seeds)],
        "scored_on": splits,
        "real_stats": image_stats(user_x),
        "cue_per_draw": cue,
        "rows": rows,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    write_report(args.out, report, markdown(report))
    return 0


def markdown(report: dict) -> str:
    lines = [
        f"Real images (user dataset): {report['real_stats']['exact_black_pct']}% exact-black pixels,"
        f" mean |R-B| {report['real_stats']['mean_abs_r_minus_b']}.",
        "",
        "| added images | exact-black pixels (%) | mean abs(R-B) | real vs generated, probe accuracy"
        " (%, chance) |",
        "|---|---:|---:|---:|",
    ]
    for form in FORMS:
        per = [c[form] for c in report["cue_per_draw"]]
        stats = [c["stats"][form] for c in report["cue_per_draw"]]
        lines.append(
            f"| {form} | {np.mean([s['exact_black_pct'] for s in stats]):.1f}"
            f" | {np.mean([s['mean_abs_r_minus_b'] for s in stats]):.2f}"
            f" | {np.mean([p['accuracy'] for p in per]):.1f} ({per[0]['chance']:.1f}) |"
        )
    lines += [
        "",
        f"Paired with real + augmentation by seed, {len(report['seeds'])} seeds x"
        f" {report['draws']} draws; the last column: gray with its class's histogram minus as"
        " generated, paired by seed and draw.",
        "",
        "| recipe | scored on (rare images) | real+aug rare | added images | rare minus real+aug"
        " | head | balanced | matched minus as generated, rare |",
        "|---|---|---:|---|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        for form in FORMS:
            last = _pm(r["matched minus as generated: rare"]) if form == FORMS[-1] else ""
            lines.append(
                f"| {r['recipe']} {r['steps']} | {r['split']} ({r['rare_images']})"
                f" | {r['real_rare']['mean']:.1f} ± {r['real_rare']['std']:.1f} | {form}"
                f" | {_pm(r[f'{form}: rare'])} | {_pm(r[f'{form}: head'])}"
                f" | {_pm(r[f'{form}: balanced'])} | {last} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
