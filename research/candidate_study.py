"""tailseed configurations of one regime, head to head, every training on this machine.

`make eval` compares every variant and candidate; on a machine other than the one that filled
research/eval_cache, each generated image differs in its last bits, so nothing generated is a
cache hit and a full run of the seen regime takes hours on 2 cores. This study measures what one
question needs: is `generic_far` (the tail classes prompted by the seen model's generic caption,
"a photo of a digit", walk seeds perturbed by 1.2 rad, filter and tone on: research/evaluate.py's
candidate, and configs/seen.yaml since this study) better than `named_perturbed` (the class's name
in the prompt, perturbation 0.3: configs/seen.yaml before it)? `python -m
research.candidate_study` (`--candidates` names others of research/evaluate.py's
`shipped_candidates`, for example `named_uncertain`, the latter with `filter.keep: uncertain`; the
rule below picks among all of them, and the test table pairs each with the first; `--regime
never-seen` compares candidates of the first embedded model, for example `config uncertain`;
`--candidates` also takes the evaluation's sample-and-filter baselines, `prompt` and, seen,
`generic`, to pair the shipped configuration with them):

1. Generation: draws 0..D-1 of each candidate through the product (`make_runs`).
2. Fixed before any training: each recipe's steps (small 1200, wide 3200) and its mixing (ratio
   0.1, weight 0.5 for both recipes), the ones the evaluation chose on the development pool and
   on validation for the configuration shipped then, named_perturbed (docs/eval.md, seen
   regime); every candidate uses them. They are also the never-seen regime's choices for its
   shipped configuration (docs/eval.md: 1200 and 3200 steps, ratio 0.1, weight 0.5).
   `--choose-mixing` instead chooses each candidate's mixing per recipe on validation, over the
   evaluation's MIX_GRID with its rule (`evaluate.choose_mixing`: the best rare accuracy among
   the settings within 1 point of real data's head accuracy; ties to head, then grid order),
   the step 3 trainings at every setting; step 4 then reads each candidate at its choice.
3. Validation (seeds 100-102, draw 0): rare and head accuracy of real data with augmentation and
   of each candidate; and each candidate's validation reach (`judge_shards.validation_reach`: how
   close its images bring the validation digits of each rare class, against the sources alone).
4. The decision, stated before the test split is read: the candidate with the best mean rare
   accuracy over the recipes on validation ships (configs/seen.yaml; configs/default.yaml for
   never-seen); among those within one rare validation prediction of the best (seen: 100 / (40
   x 3) / 2 recipes = 0.42 points; never-seen, 80 rare images: 0.21), the one
   whose images bring the validation digits closest (mean over the rare classes) ships. The
   candidate must also meet the issue's image targets (independent judge: >= 95% in class, <= 2%
   near-copies).
5. The test split, once: real data with augmentation and each candidate, seeds 0-4 x draws,
   paired differences against real data and between the candidates (same seed and draw).

Every training runs here unless its exact inputs were trained before on this machine (`--cache`,
default out/candidate_study/cache; pointing it at research/eval_cache reuses trainings made on
another CPU). Writes out/candidate_study/report.json and report.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from research.classifier import RECIPES
from research.digits import CLASS_NAMES, DigitsSplit, to_digit_space
from research.evaluate import (
    MIX_GRID,
    NAMED_PROMPTS,
    VAL_SEED_OFFSET,
    Variant,
    _pm,
    _task,
    accuracies,
    added_for,
    choose_mixing,
    embedded_regime,
    generic_prompts,
    image_quality,
    load_regime_data,
    make_runs,
    mean_scores,
    paired,
    read_run,
    run_tasks,
    shipped_candidates,
    users_test_tasks,
    write_report,
)
from research.evaluate import (
    variants as evaluate_variants,
)
from research.judge import train_judge
from research.judge_shards import validation_reach

STEPS = {"small": 1200, "wide": 3200}  # chosen on the development pool (docs/eval.md, seen)
MIXING = {"small": (0.1, 0.5), "wide": (0.1, 0.5)}  # validation's choice for the shipped config
# "named_perturbed" is configs/seen.yaml as it was up to 2026-12-07 (the study ran with it as the
# file's "config": same config hash, ce961dcc111a2922, and the same runs)
CANDIDATES = ("named_perturbed", "generic_far")  # the default of --candidates
# research/evaluate.py's baselines that --candidates may also name
BASELINES = ("prompt", "generic")
# one rare validation prediction, in the mean over two recipes: the seen regime's 40 rare
# validation images x 3 seeds (the never-seen regime's 80 give half of it: `tie_points`)
TIE_POINTS = 100 / (40 * 3) / 2


def study_candidates(card: dict, regime: str) -> dict[str, tuple[str, ...]]:
    """What --candidates may name: evaluate.shipped_candidates of the regime, and the evaluation's
    sample-and-filter baselines (BASELINES: "prompt", plain prompts + filter; seen: "generic",
    the generic prompt + filter), each as overrides of the regime's config."""
    seen = regime == "seen"
    out = shipped_candidates(
        True, True, generic_prompts(card) if seen else (), NAMED_PROMPTS if seen else ()
    )
    for v in evaluate_variants(card, regime, True):
        if v.key in BASELINES and v.key not in out:
            out[v.key] = v.overrides
    return out


def tie_points(rare_val_images: int, val_seeds: int, recipes: int) -> float:
    """One rare validation prediction, in points of the mean over seeds and recipes."""
    return 100 / (rare_val_images * val_seeds) / recipes


def reach(data, split: DigitsSplit, added: dict[int, np.ndarray]) -> dict:
    """Per rare digit, `validation_reach` of its added images, and the mean over the digits of the
    mean distance from a validation digit to its nearest source-or-added image."""
    out = {}
    for d, images in added.items():
        held = to_digit_space(data.val_x[data.val_y == d])
        sources = to_digit_space(data.user_x[data.user_y == d])
        out[CLASS_NAMES[d]] = validation_reach(held, sources, to_digit_space(images))
    out["mean_to_sources_or_added"] = float(
        np.mean([v["validation_to_sources_or_added"] for v in out.values()])
    )
    return out


def decide(
    val: dict[str, float],
    reached: dict[str, float],
    eligible: list[str],
    tie: float = TIE_POINTS,
) -> str:
    """The decision rule of step 4: `val` candidate -> mean rare validation accuracy over the
    recipes; `reached` candidate -> mean distance to the nearest source-or-added image."""
    keys = [k for k in val if k in eligible] or list(val)
    best = max(val[k] for k in keys)
    tied = [k for k in keys if val[k] >= best - tie - 1e-9]  # exactly one prediction: tied
    return min(tied, key=lambda k: (reached[k], keys.index(k)))


def markdown(report: dict) -> str:
    lines = [
        f"# Candidate study ({report['regime']} regime): " + " vs ".join(report["candidates"]),
        "",
        f"Steps {report['steps']}, mixing (ratio, weight) {report['mixing']} "
        + (
            "(chosen per recipe on validation, below); "
            if report.get("mixing_chosen_on_validation")
            else "(fixed before training); "
        )
        + f"{report['seeds']} seeds x {report['draws']} draws on the test split "
        f"({report['test_rare_images']} rare images). Trainings cache: {report['cache']} (a "
        "training whose exact inputs were trained before is read from it, made on whichever CPU "
        "made it).",
        "",
        "## Images (draw 0) and validation",
        "",
        "| candidate | judged in class | near-copies | median distance to source | validation digits: "
        "mean distance to nearest source -> source or added | validation rare (mean over recipes) | "
        "validation head |",
        "|---|---:|---:|---:|---|---:|---:|",
    ]
    for k in report["candidates"]:
        q, r, v = report["images"][k], report["reach"][k], report["validation"][k]
        to_src = np.mean([r[c]["validation_to_sources"] for c in report["rare"]])
        lines.append(
            f"| {k} | {q['judged_in_class'] * 100:.1f}% | {q['near_copies'] * 100:.1f}% | "
            f"{q['median_distance_to_source']:.1f} | {to_src:.2f} -> "
            f"{r['mean_to_sources_or_added']:.2f} | {v['rare']:.2f} | {v['head']:.2f} |"
        )
    real = report["validation"]["real"]
    lines += [
        f"| real + augmentation | | | | | {real['rare']:.2f} | {real['head']:.2f} |",
        "",
    ]
    if report.get("mixing_chosen_on_validation"):
        lines += [
            "Mixing on validation (rare / head, mean over the validation seeds; real data with "
            "augmentation: the table above, per recipe in the JSON):",
            "",
            "| candidate | recipe | "
            + " | ".join(f"{r}, {w}" for r, w in MIX_GRID)
            + " | chosen |",
            "|---|---|" + "---:|" * (len(MIX_GRID) + 1),
        ]
        for k, per in report["mixing_validation"].items():
            for name, by in per.items():
                cells = [f"{v['rare']:.2f} / {v['head']:.2f}" for v in by.values()]
                chosen = ", ".join(str(x) for x in report["mixing"][name][k])
                lines.append(f"| {k} | {name} | " + " | ".join(cells) + f" | {chosen} |")
        lines.append("")
    lines += [
        f"Decision (step 4, before the test split): **{report['decision']}**.",
        "",
        "## Test split, as users train",
        "",
        "| recipe | real+aug rare (abs.) | "
        + " | ".join(f"{k}: rare / head minus real+aug" for k in report["candidates"])
        + "".join(f" | {k} minus {report['candidates'][0]}: rare" for k in report["candidates"][1:])
        + " |",
        "|---|---:|" + "---:|" * (2 * len(report["candidates"]) - 1),
    ]
    for name, entry in report["test"].items():
        cells = [f"{entry['real']['rare']['mean']:.1f}"]
        for k in report["candidates"]:
            cells.append(f"{_pm(entry[k]['vs_real']['rare'])} / {_pm(entry[k]['vs_real']['head'])}")
        cells += [_pm(entry["between"][k]) for k in report["candidates"][1:]]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", f"Wall time: {report['seconds']:.0f} s.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m research.candidate_study", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--candidates",
        nargs="+",
        default=list(CANDIDATES),
        help="evaluate.shipped_candidates keys of the regime, or the evaluation's filtered "
        "baselines (prompt, generic); the test table pairs each with the first",
    )
    parser.add_argument(
        "--regime",
        choices=("seen", "never-seen"),
        default="seen",
        help="the embedded regime (STEPS and MIXING are both regimes' choices for the shipped "
        "configuration: docs/eval.md)",
    )
    parser.add_argument(
        "--recipes",
        nargs="+",
        choices=sorted(STEPS),
        default=sorted(STEPS),
        help="classifier recipes to train (the decision averages over them)",
    )
    parser.add_argument(
        "--choose-mixing",
        action="store_true",
        help="choose each candidate's mixing (ratio, weight) per recipe on validation over "
        "research/evaluate.py's MIX_GRID (its choose_mixing, against real data with "
        "augmentation), in place of the fixed MIXING",
    )
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument("--val-seeds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--runs", type=Path, default=Path("out/candidate_study/runs"))
    parser.add_argument("--cache", type=Path, default=Path("out/candidate_study/cache"))
    parser.add_argument("--out", type=Path, default=Path("out/candidate_study"))
    args = parser.parse_args(argv)
    t0 = time.perf_counter()

    regime, base, card, split = embedded_regime(args.regime)
    rare = sorted(split.tail_classes)
    overrides = study_candidates(card, args.regime)
    candidates = tuple(args.candidates)
    unknown = [k for k in candidates if k not in overrides]
    if unknown or len(candidates) < 2:
        parser.error(f"--candidates: two or more of {', '.join(overrides)}; not {unknown}")
    wanted = {f"tailseed_{k}": overrides[k] for k in candidates}
    runs = make_runs(regime, base, wanted, range(args.draws), args.runs, {})
    data = load_regime_data(base, card, rare, base.select.quota - 10)
    for key, run in runs.items():
        data.generated[key] = read_run(Path(run["output_dir"]))
    variants = {k: Variant(f"tailseed_{k}", k, "generated") for k in candidates}
    real = Variant("real", "real + augmentation", "none")
    recipes = {n: replace(RECIPES[n], steps=STEPS[n]) for n in args.recipes}

    # 1. images: the independent judge, near-copies, validation reach (draw 0)
    judge = train_judge(split)
    sources = {d: data.user_x[data.user_y == d] for d in rare}
    images, reached = {}, {}
    for k, v in variants.items():
        added = {d: data.generated[(v.key, 0)].of(d) for d in rare}
        images[k] = image_quality(added, sources, judge, split)
        reached[k] = reach(data, split, added)
    eligible = [
        k for k, q in images.items() if q["judged_in_class"] >= 0.95 and q["near_copies"] <= 0.02
    ]

    # 2. validation trainings: real data, and each candidate at the fixed mixing or, with
    # --choose-mixing, at every setting of MIX_GRID
    def settings_of(name: str) -> list[tuple[float, float]]:
        return list(MIX_GRID) if args.choose_mixing else [MIXING[name]]

    tasks = []
    for name, recipe in recipes.items():
        for v in [real, *variants.values()]:
            settings = [(0.0, 1.0)] if v is real else settings_of(name)
            added = added_for(v, data, 0)
            for ratio, weight in settings:
                for s in range(args.val_seeds):
                    seed = VAL_SEED_OFFSET + s
                    tasks.append(
                        _task(
                            ("val", name, v.key, seed, ratio, weight),
                            "users",
                            recipe,
                            seed,
                            data,
                            added,
                            ratio,
                            weight,
                            {"val": data.val_x},
                            (recipe.steps,),
                        )
                    )
    val_results = run_tasks(tasks, args.jobs, args.cache)

    def val_scores(name, v, ratio, weight):
        per = [
            accuracies(
                val_results[("val", name, v.key, VAL_SEED_OFFSET + s, ratio, weight)][
                    recipes[name].steps
                ]["val"],
                data.val_y,
                rare,
            )
            for s in range(args.val_seeds)
        ]
        return mean_scores("val", per)

    # each candidate's mixing per recipe (a single fixed setting is its own choice)
    reference = {n: val_scores(n, real, 0.0, 1.0) for n in recipes}
    by_setting = {
        n: {k: {m: val_scores(n, v, *m) for m in settings_of(n)} for k, v in variants.items()}
        for n in recipes
    }
    mixing = {
        n: {variants[k].key: choose_mixing(by, reference[n]) for k, by in per.items()}
        for n, per in by_setting.items()
    }
    mixing_val = {
        k: {
            n: {
                f"{r}, {w}": {"rare": sc.rare, "head": sc.head}
                for (r, w), sc in by_setting[n][k].items()
            }
            for n in recipes
        }
        for k in variants
    }

    # 3. the test split, each candidate at its mixing
    variants_all = [real, *variants.values()]
    results = run_tasks(
        users_test_tasks(data, recipes, variants_all, mixing, args.seeds, args.draws),
        args.jobs,
        args.cache,
    )

    def acc(key, split_name, y):
        step = recipes[key[1]].steps
        return accuracies(results[key][step][split_name], y, rare)

    validation = {
        "real": {
            "rare": float(np.mean([reference[n].rare for n in recipes])),
            "head": float(np.mean([reference[n].head for n in recipes])),
        }
    }
    for k, v in variants.items():
        at = [by_setting[n][k][mixing[n][v.key]] for n in recipes]
        validation[k] = {m: float(np.mean([getattr(a, m) for a in at])) for m in ("rare", "head")}
    tie = tie_points(int(np.isin(data.val_y, rare).sum()), args.val_seeds, len(recipes))
    decision = decide(
        {k: validation[k]["rare"] for k in candidates},
        {k: reached[k]["mean_to_sources_or_added"] for k in candidates},
        eligible,
        tie,
    )
    test = {}
    for name in recipes:
        runs_acc = {
            v.key: {
                (s, d): acc(("test", name, v.key, s, d), "test", data.test_y)
                for d in (range(args.draws) if v.kind == "generated" else [None])
                for s in range(args.seeds)
            }
            for v in [real, *variants.values()]
        }
        entry = {
            "real": {
                m: {"mean": float(np.mean([a[m] for a in runs_acc["real"].values()]))}
                for m in ("rare", "head")
            }
        }
        for k, v in variants.items():
            entry[k] = {
                "vs_real": {
                    m: paired(runs_acc[v.key], runs_acc["real"], m)
                    for m in ("rare", "head", "balanced", "rare_precision")
                }
            }
        first = variants[candidates[0]].key
        entry["between"] = {
            k: paired(runs_acc[variants[k].key], runs_acc[first], "rare") for k in candidates[1:]
        }
        test[name] = entry
    report = {
        "regime": regime.key,
        "candidates": list(candidates),
        "overrides": {k: list(overrides[k]) for k in candidates},
        "steps": {n: STEPS[n] for n in recipes},
        "mixing": {n: {k: list(mixing[n][v.key]) for k, v in variants.items()} for n in recipes},
        "mixing_chosen_on_validation": bool(args.choose_mixing),
        "mixing_validation": mixing_val,
        "seeds": args.seeds,
        "draws": args.draws,
        "cache": str(args.cache),
        "rare": [CLASS_NAMES[d] for d in rare],
        "test_rare_images": int(np.isin(data.test_y, rare).sum()),
        "runs": {f"{k}_d{d}": r["shards_sha256"] for (k, d), r in runs.items()},
        "images": images,
        "reach": reached,
        "eligible": eligible,
        "validation": validation,
        "tie_points": tie,
        "decision": decision,
        "test": test,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    write_report(args.out, report, markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
