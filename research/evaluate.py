"""The downstream evaluation: does training on tailseed's images recognise the rare classes better?

`python -m research.evaluate` (what `make eval` runs) trains the small CNN of `research/classifier.py`
on the embedded user's dataset (read from its PNG folders) plus the same number of added images per
rare class from each variant, over several training seeds, and tests it on the balanced held-out
test split. Variants: real data only; oversampling; classic augmentation; plain prompts (no
inversion); tailseed with DDIM-inversion seeds; tailseed with fixed-point seeds and slerp walks;
tailseed as configured (fixed-point seeds, NAO walks and centroids). The generated variants are
augment runs into out/eval/runs/<variant>/ (reused when already complete) and are read back from
their WebDataset shards. It also judges each variant's added images with an independent SVC and
measures their distance to the few-shot sources (near-copies).

Writes out/eval/eval.json, out/eval/eval.md, out/eval/contact_<variant>.png, and the committed
pictures docs/eval_rare_accuracy.png and docs/eval_contact_sheet.png. Every setting is fixed in
this file before any measurement and recorded in eval.json; nothing is tuned on the results.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from jobs.augment import AugmentConfig, code_hash, load_config, output_hash
from jobs.augment import run as run_augment
from pipeline.contact import grid, labelled
from pipeline.errors import UserError
from pipeline.models import describe_model
from research.classifier import ClassicAugment, TrainRecipe, oversample, predict, train_classifier
from research.digits import (
    CLASS_NAMES,
    DigitsSplit,
    load_digits_arrays,
    render,
    split_indices,
    to_digit_space,
)
from research.judge import near_copy_threshold, nearest_distances, train_judge

TRAINING_SEEDS = 5  # the issue asks for at least 5
NEAR_COPY_PERCENTILE = 1.0  # fixed by the issue before measuring
CLASSIC_SEED_OFFSET = 10_000  # classic augmentation draws from its own generator per training seed


@dataclass(frozen=True)
class Variant:
    """One way of adding images to the rare classes."""

    key: str
    label: str
    kind: str  # none | oversample | classic | generated
    overrides: tuple[str, ...] = ()  # augment config overrides (generated variants only)
    baseline: bool = False  # counts among the baselines of the targets


def variants(card: dict) -> list[Variant]:
    """The seven variants; plain prompts use the model card's own guidance and steps."""
    return [
        Variant("real_only", "real data only", "none", baseline=True),
        Variant("oversample", "oversampling", "oversample", baseline=True),
        Variant("classic", "classic augmentation", "classic", baseline=True),
        Variant(
            "prompt",
            "plain prompts",
            "generated",
            (
                "walk.method=prompt",
                f"generate.guidance_scale={card['guidance_scale']}",
                f"generate.num_inference_steps={card['num_inference_steps']}",
            ),
            baseline=True,
        ),
        Variant("ddim", "tailseed, DDIM seeds, NAO", "generated", ("invert.solver.method=ddim",)),
        Variant("slerp", "tailseed, FPI seeds, slerp", "generated", ("walk.method=slerp",)),
        Variant("default", "tailseed, FPI seeds, NAO (default)", "generated"),
    ]


def log(message: str) -> None:
    print(f"[eval] {message}", flush=True)


# ------------------------------------------------------------------------------------------------
# Reading data the way a user would: PNG class folders and WebDataset shards


def read_image_folder(root: Path) -> tuple[np.ndarray, np.ndarray]:
    """An ImageFolder of digit-word class folders -> images (N, H, W, 3) uint8, digit labels (N,)."""
    images, labels = [], []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        if folder.name not in CLASS_NAMES:
            raise UserError(f"{root}: class folder {folder.name!r} is not a digit word")
        for path in sorted(folder.glob("*.png")):
            images.append(np.asarray(Image.open(path).convert("RGB")))
            labels.append(CLASS_NAMES.index(folder.name))
    if not images:
        raise UserError(f"{root}: no PNG images in class folders")
    return np.stack(images), np.asarray(labels, dtype=np.int64)


def decode_sample(sample: dict) -> dict:
    """Decode only the members we trust (PNG, class index, JSON); never pickle or torch.load."""
    return {
        "key": sample["__key__"],
        "image": np.asarray(Image.open(io.BytesIO(sample["png"])).convert("RGB")),
        "cls": int(sample["cls"]),
        "meta": json.loads(sample["json"]),
    }


def read_shards(shards_dir: Path) -> list[dict]:
    """Every sample of a run's shards (listed by its index.json), read with `webdataset`."""
    import webdataset as wds

    index = json.loads((shards_dir / "index.json").read_text())
    urls = [str(shards_dir / s["url"]) for s in index["shardlist"]]
    samples = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False).map(decode_sample))
    expected = sum(s["nsamples"] for s in index["shardlist"])
    if len(samples) != expected:
        raise UserError(f"{shards_dir}: read {len(samples)} samples, index.json lists {expected}")
    return samples


def read_run(run_dir: Path) -> tuple[dict[int, np.ndarray], dict[int, list[dict]]]:
    """A run's generated images and their provenance JSON per digit label.

    The label is the shard's `.cls` (dataset class index) mapped through the run's classes.json
    to a class name, and the name to its digit.
    """
    classes = {int(k): v for k, v in json.loads((run_dir / "classes.json").read_text()).items()}
    images: dict[int, list[np.ndarray]] = {}
    metas: dict[int, list[dict]] = {}
    for sample in read_shards(run_dir / "shards"):
        digit = CLASS_NAMES.index(classes[sample["cls"]])
        images.setdefault(digit, []).append(sample["image"])
        metas.setdefault(digit, []).append(sample["meta"])
    return {d: np.stack(v) for d, v in sorted(images.items())}, metas


def generated_by_digit(run_dir: Path) -> dict[int, np.ndarray]:
    """A run's generated images per digit label."""
    return read_run(run_dir)[0]


def walk_kind(meta: dict) -> str:
    """Which kind of walk position a generated image came from (for the near-copy breakdown)."""
    sources = meta.get("sources") or []
    if len(sources) == 0:
        return "fresh seed"
    if len(sources) == 1:
        return "one source"
    if len(sources) > 2:
        return "centroid"
    return "pair, max weight >= 0.7" if max(meta["weights"]) >= 0.7 else "pair, max weight < 0.7"


# ------------------------------------------------------------------------------------------------
# The augment runs behind the generated variants


def run_config(base: Path, variant: Variant, runs_dir: Path) -> AugmentConfig:
    return load_config(
        base,
        [f"output_dir={runs_dir / variant.key}", "ray.in_process=true", *variant.overrides],
    )


def ensure_run(config: AugmentConfig) -> tuple[dict, bool]:
    """Run (or resume, or reuse) one augment run; returns its run.json and whether it was reused.

    A complete run is reused when its config hash and code hash match; a run made by other code
    is deleted and made again (its images would not be what this code generates).
    """
    run_json = config.out() / "run.json"
    if run_json.is_file():
        report = json.loads(run_json.read_text())
        same = (
            report.get("config_hash") == output_hash(config)
            and report.get("code_hash") == code_hash()
        )
        if report.get("status") == "complete" and same:
            return report, True
        if report.get("code_hash") != code_hash():
            shutil.rmtree(config.out())
    return run_augment(config), False


def code_version() -> dict:
    """The git commit of the working tree that ran the evaluation, and whether it had changes."""
    import subprocess

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain"))}
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}


# ------------------------------------------------------------------------------------------------
# Measurements


@dataclass
class Data:
    user_x: np.ndarray
    user_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    rare: list[int]  # digit labels of the rare classes
    added: int  # images added per rare class, for every variant
    generated: dict[str, dict[int, np.ndarray]] = field(default_factory=dict)
    provenance: dict[str, dict[int, list[dict]]] = field(default_factory=dict)


def added_images(variant: Variant, data: Data, seed: int, classic: ClassicAugment) -> dict:
    """The images a variant adds, per rare digit (exactly `data.added` each; none for real only)."""
    if variant.kind == "none":
        return {}
    out = {}
    for d in data.rare:
        real = data.user_x[data.user_y == d]
        if variant.kind == "oversample":
            out[d] = oversample(real, data.added)
        elif variant.kind == "classic":
            gen = torch.Generator().manual_seed(CLASSIC_SEED_OFFSET + seed * 10 + d)
            out[d] = classic(real, data.added, gen)
        else:
            out[d] = data.generated[variant.key][d]
        if len(out[d]) != data.added:
            raise RuntimeError(
                f"{variant.key}: {len(out[d])} images for digit {d}, not {data.added}"
            )
    return out


def accuracies(predicted: np.ndarray, labels: np.ndarray, rare: list[int]) -> dict[str, float]:
    is_rare = np.isin(labels, rare)
    correct = predicted == labels
    out = {
        "rare": float(correct[is_rare].mean()),
        "head": float(correct[~is_rare].mean()),
        "overall": float(correct.mean()),
    }
    for d in rare:
        out[CLASS_NAMES[d]] = float(correct[labels == d].mean())
    return out


def train_and_test(
    variant: Variant, data: Data, seeds: int, recipe: TrainRecipe, classic: ClassicAugment
) -> dict:
    per_seed = []
    for seed in range(seeds):
        added = added_images(variant, data, seed, classic)
        x = np.concatenate([data.user_x, *added.values()])
        y = np.concatenate([data.user_y, *(np.full(len(v), d) for d, v in added.items())])
        model = train_classifier(x, y, recipe, seed)
        per_seed.append(accuracies(predict(model, data.test_x), data.test_y, data.rare))
    summary = {}
    for name in per_seed[0]:
        values = np.asarray([r[name] for r in per_seed]) * 100
        summary[name] = {
            "mean": float(values.mean()),
            "std": float(values.std(ddof=1)),
            "per_seed": [round(float(v), 2) for v in values],
        }
    return summary


def rendered_real(images8: np.ndarray, indices: list[int]) -> np.ndarray:
    """Real digits as the user sees them: rendered to 32x32 RGB, (N, 32, 32, 3) uint8."""
    return np.stack([np.asarray(render(images8[i])) for i in indices])


def image_quality(
    added: dict[int, np.ndarray],
    data: Data,
    judge,
    card: dict,
    provenance: dict[int, list[dict]] | None = None,
) -> dict:
    """Judge share and novelty of a variant's added images, per rare class and pooled.

    Every distance is in scikit-learn's 8x8 digit space, with every image (generated, source,
    real) first taken through the same 32x32 -> 8x8 map, so no side is favoured by resampling.
    """
    images8, labels = load_digits_arrays()
    splits = split_indices(labels, DigitsSplit(**card["split"]))
    test = set(splits["test"])
    per_class, pooled_judged, pooled_dist, pooled_copy = {}, [], [], []
    by_walk: dict[str, list[int]] = {}
    for d in data.rare:
        images = added[d]
        judged = judge.predict(images) == d
        sources = to_digit_space(data.user_x[data.user_y == d])
        real = [i for i in range(len(labels)) if labels[i] == d and i not in test]
        threshold = near_copy_threshold(
            to_digit_space(rendered_real(images8, real)), NEAR_COPY_PERCENTILE
        )
        distance = nearest_distances(to_digit_space(images), sources)
        source_spread = [
            float(nearest_distances(sources[i : i + 1], np.delete(sources, i, 0))[0])
            for i in range(len(sources))
        ]
        per_class[CLASS_NAMES[d]] = {
            "judged_in_class": float(judged.mean()),
            "median_distance_to_source": float(np.median(distance)),
            "near_copy_threshold": threshold,
            "near_copies": float((distance < threshold).mean()),
            "median_source_to_other_source": float(np.median(source_spread)),
        }
        pooled_judged.append(judged)
        pooled_dist.append(distance)
        pooled_copy.append(distance < threshold)
        if provenance is not None:
            for meta, copy in zip(provenance[d], distance < threshold):
                counts = by_walk.setdefault(walk_kind(meta), [0, 0])
                counts[0] += 1
                counts[1] += int(copy)
    return {
        "judged_in_class": float(np.concatenate(pooled_judged).mean()),
        "median_distance_to_source": float(np.median(np.concatenate(pooled_dist))),
        "near_copies": float(np.concatenate(pooled_copy).mean()),
        "per_class": per_class,
        "near_copies_by_walk": {
            kind: {"images": n, "near_copies": c} for kind, (n, c) in sorted(by_walk.items())
        },
    }


# ------------------------------------------------------------------------------------------------
# Targets, report and pictures


def targets(results: dict, all_variants: list[Variant]) -> list[dict]:
    """The issue's targets for the default variant, each with its margin (positive: met)."""
    acc = {k: v["accuracy"] for k, v in results.items()}
    quality = {k: v.get("quality") for k, v in results.items()}
    best = acc["default"]
    out = []

    def add(name: str, value: float, need: float, unit: str, met: bool | None = None) -> None:
        margin = value - need
        out.append(
            {
                "target": name,
                "value": round(value, 2),
                "needed": round(need, 2),
                "margin": round(margin, 2),
                "unit": unit,
                "met": bool(margin >= 0 if met is None else met),
            }
        )

    add(
        "rare-class accuracy: default minus real only >= 15 points",
        best["rare"]["mean"] - acc["real_only"]["rare"]["mean"],
        15.0,
        "points",
    )
    for v in all_variants:
        if v.key == "default":
            continue
        gap = best["rare"]["mean"] - acc[v.key]["rare"]["mean"]
        spread = best["rare"]["std"] + acc[v.key]["rare"]["std"]
        kind = "baseline" if v.baseline else "ablation (reported, not a target)"
        add(
            f"rare-class accuracy: default minus {v.label} > sum of both std [{kind}]",
            gap,
            spread,
            "points",
            met=gap > spread,
        )
    head_diff = best["head"]["mean"] - acc["real_only"]["head"]["mean"]
    add(
        "head-class accuracy: within 1 point of real only (absolute difference <= 1)",
        -abs(head_diff),
        -1.0,
        f"points (default minus real only: {head_diff:+.2f})",
    )
    judged = quality["default"]["judged_in_class"] * 100
    add("judged in-class share of default >= 90%", judged, 90.0, "%")
    add(
        "judged in-class share: default minus plain prompts >= 30 points",
        judged - quality["prompt"]["judged_in_class"] * 100,
        30.0,
        "points",
    )
    add(
        "near-copies of a source in default < 5% (value is 5 minus the share)",
        5.0 - quality["default"]["near_copies"] * 100,
        0.0,
        "points",
        met=quality["default"]["near_copies"] * 100 < 5.0,
    )
    return out


def markdown(report: dict) -> str:
    lines = [
        f"# Rare-class evaluation ({report['seeds']} training seeds, mean ± std)",
        "",
        f"User dataset: {report['data']['user_images']} real images "
        f"({report['data']['real_per_rare_class']} per rare class: {', '.join(report['data']['rare_classes'])}); "
        f"every variant but real only adds {report['data']['added_per_rare_class']} per rare class. "
        f"Test: {report['data']['test_images']} balanced held-out images.",
        "",
        "| variant | rare acc. | head acc. | overall acc. | "
        + " | ".join(f"{c} acc." for c in report["data"]["rare_classes"])
        + " |",
        "|---|---:|---:|---:|" + "---:|" * len(report["data"]["rare_classes"]),
    ]
    for r in report["variants"].values():
        a = r["accuracy"]
        cells = [f"{a[n]['mean']:.1f} ± {a[n]['std']:.1f}" for n in ("rare", "head", "overall")]
        cells += [f"{a[c]['mean']:.1f} ± {a[c]['std']:.1f}" for c in report["data"]["rare_classes"]]
        lines.append(f"| {r['label']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Added images, judged by an SVC trained on real digits outside the test split; distance in "
        "8x8 digit space to the nearest few-shot source of the class; a near-copy is closer than "
        "the 1st percentile of nearest-neighbour distances among the class's real images.",
        "",
        "| variant | judged in class | "
        + " | ".join(f"{c} judged" for c in report["data"]["rare_classes"])
        + " | median distance to source | near-copies |",
        "|---|---:|" + "---:|" * len(report["data"]["rare_classes"]) + "---:|---:|",
    ]
    for r in report["variants"].values():
        q = r.get("quality")
        if q is None:
            continue
        per = " | ".join(
            f"{q['per_class'][c]['judged_in_class']:.0%}" for c in report["data"]["rare_classes"]
        )
        lines.append(
            f"| {r['label']} | {q['judged_in_class']:.1%} | {per} | "
            f"{q['median_distance_to_source']:.1f} | {q['near_copies']:.1%} |"
        )
    spread = {
        c: report["variants"]["default"]["quality"]["per_class"][c]
        for c in report["data"]["rare_classes"]
    }
    lines += [
        "",
        "For scale: median distance from a source to its nearest other source: "
        + ", ".join(f"{c} {s['median_source_to_other_source']:.1f}" for c, s in spread.items())
        + "; near-copy thresholds: "
        + ", ".join(f"{c} {s['near_copy_threshold']:.1f}" for c, s in spread.items())
        + ".",
        "",
        "## Targets (default variant)",
        "",
        "| target | value | needed | margin | met |",
        "|---|---:|---:|---:|---|",
    ]
    for t in report["targets"]:
        lines.append(
            f"| {t['target']} | {t['value']:.2f} | {t['needed']:.2f} | {t['margin']:+.2f} {t['unit']} | "
            f"{'yes' if t['met'] else 'NO'} |"
        )
    acc = {k: v["accuracy"] for k, v in report["variants"].items()}
    real_rare = acc["real_only"]["rare"]["mean"]
    walks = report["variants"]["default"]["quality"]["near_copies_by_walk"]
    lines += [
        "",
        "## Computed notes",
        "",
        f"- Headroom: real only already reaches {real_rare:.1f}% on the rare classes, so no variant "
        f"can gain more than {100 - real_rare:.1f} points there.",
        "- Head-class accuracy minus real only: "
        + ", ".join(
            f"{r['label']} {acc[k]['head']['mean'] - acc['real_only']['head']['mean']:+.1f}"
            for k, r in report["variants"].items()
            if k != "real_only"
        )
        + " points.",
        "- Near-copies of the default variant by walk position: "
        + ", ".join(f"{kind} {w['near_copies']}/{w['images']}" for kind, w in walks.items())
        + ".",
    ]
    lines += ["", f"Wall time: {report['timings']['total_s']:.0f} s.", ""]
    return "\n".join(lines)


def plot_accuracy(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r["label"] for r in report["variants"].values()]
    acc = [r["accuracy"] for r in report["variants"].values()]
    x = np.arange(len(labels))
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [3, 2]})
    for offset, name, colour in ((-0.27, "rare", "C3"), (0, "head", "C0"), (0.27, "overall", "C7")):
        left.bar(
            x + offset,
            [a[name]["mean"] for a in acc],
            0.27,
            yerr=[a[name]["std"] for a in acc],
            capsize=3,
            color=colour,
            label=f"{name} classes" if name != "overall" else "overall",
        )
    real_rare = report["variants"]["real_only"]["accuracy"]["rare"]["mean"]
    left.axhline(real_rare + 15, color="C3", ls="--", lw=1, label="real only rare + 15")
    left.set_xticks(x, labels, rotation=25, ha="right", fontsize=8)
    left.set_ylabel(f"test accuracy, % (mean ± std, {report['seeds']} seeds)")
    left.set_ylim(0, 110)
    left.legend(fontsize=8, loc="lower right")
    left.set_title("CNN test accuracy by training set")
    gen = [
        (r["label"], r["quality"]) for r in report["variants"].values() if r["kind"] == "generated"
    ]
    gx = np.arange(len(gen))
    right.bar(
        gx - 0.2,
        [q["judged_in_class"] * 100 for _, q in gen],
        0.4,
        color="C2",
        label="judged in class",
    )
    right.bar(
        gx + 0.2, [q["near_copies"] * 100 for _, q in gen], 0.4, color="C1", label="near-copies"
    )
    right.axhline(90, color="C2", ls="--", lw=1)
    right.axhline(5, color="C1", ls="--", lw=1)
    right.set_xticks(gx, [g for g, _ in gen], rotation=25, ha="right", fontsize=8)
    right.set_ylabel("% of generated rare-class images")
    right.set_ylim(0, 105)
    right.legend(fontsize=8)
    right.set_title("Generated images: independent judge, near-copies")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def contact_sheet(
    data: Data, shown: dict[str, tuple[str, dict[int, np.ndarray]]], per_variant: int
) -> Image.Image:
    """Per rare class: its real sources, then the first `per_variant` added images of each variant."""
    sections = []
    for d in data.rare:
        real = data.user_x[data.user_y == d]
        sections.append((f"{CLASS_NAMES[d]}: the {len(real)} real images", grid(list(real), 20, 2)))
        for label, added in shown.values():
            sections.append(
                (f"  {CLASS_NAMES[d]}, {label}", grid(list(added[d][:per_variant]), 20, 2))
            )
    return labelled(sections)


# ------------------------------------------------------------------------------------------------
# The job


def load_data(config: AugmentConfig, default_report: dict) -> Data:
    user_dir = Path(config.dataset.path)
    user_x, user_y = read_image_folder(user_dir)
    test_x, test_y = read_image_folder(user_dir.parent / "test")
    augmented = default_report["counts"]["augmented_classes"]
    rare = sorted(CLASS_NAMES.index(name) for name in augmented)
    added = {v["generated"] for v in augmented.values()}
    if len(added) != 1:
        raise UserError(f"the default run added unequal counts per rare class: {augmented}")
    return Data(user_x, user_y, test_x, test_y, rare, added.pop())


def evaluate(
    config_path: Path, out: Path, seeds: int, docs: Path | None, runs_dir: Path | None = None
) -> dict:
    started = time.perf_counter()
    timings: dict = {}
    base = load_config(config_path)
    card = describe_model(base.model)["card"]
    all_variants = variants(card)
    runs_dir = runs_dir or out / "runs"

    # 1. the augment runs behind the generated variants (reused when complete)
    run_reports, reused = {}, {}
    for v in all_variants:
        if v.kind != "generated":
            continue
        t0 = time.perf_counter()
        run_reports[v.key], reused[v.key] = ensure_run(run_config(config_path, v, runs_dir))
        timings[f"augment_{v.key}_s"] = round(time.perf_counter() - t0, 1)
        how = "reused (complete, same config hash)" if reused[v.key] else "made"
        log(f"augment run {v.key}: {how}, {timings[f'augment_{v.key}_s']:.0f}s")

    # 2. the data, from disk as a user would read it
    data = load_data(base, run_reports["default"])
    for v in all_variants:
        if v.kind == "generated":
            data.generated[v.key], data.provenance[v.key] = read_run(runs_dir / v.key)
            counts = {CLASS_NAMES[d]: len(data.generated[v.key].get(d, [])) for d in data.rare}
            if set(counts.values()) != {data.added}:
                raise UserError(f"run {v.key} added {counts}, not {data.added} per rare class")

    # 3. train and test the CNN per variant and seed; judge and measure the added images
    recipe, classic = TrainRecipe(), ClassicAugment()
    judge = train_judge(DigitsSplit(**card["split"]))
    results, shown = {}, {}
    for v in all_variants:
        t0 = time.perf_counter()
        accuracy = train_and_test(v, data, seeds, recipe, classic)
        timings[f"train_{v.key}_s"] = round(time.perf_counter() - t0, 1)
        entry = {"label": v.label, "kind": v.kind, "baseline": v.baseline, "accuracy": accuracy}
        if v.kind != "none":
            added = added_images(v, data, 0, classic)  # classic: the draw of training seed 0
            entry["quality"] = image_quality(added, data, judge, card, data.provenance.get(v.key))
            shown[v.key] = (v.label, added)
        if v.kind == "generated":
            entry["run"] = {
                "output_dir": str(runs_dir / v.key),
                "overrides": list(v.overrides),
                "config_hash": run_reports[v.key]["config_hash"],
                "reused_existing_run": reused[v.key],
                "versions": run_reports[v.key].get("versions"),
            }
        results[v.key] = entry
        log(
            f"{v.label}: rare {accuracy['rare']['mean']:.1f} ± {accuracy['rare']['std']:.1f}, "
            f"head {accuracy['head']['mean']:.1f} ± {accuracy['head']['std']:.1f} "
            f"({timings[f'train_{v.key}_s']:.0f}s)"
        )

    # 4. report, contact sheets, pictures
    timings["total_s"] = round(time.perf_counter() - started, 1)
    report = {
        "config": str(config_path),
        "code": code_version(),
        "seeds": seeds,
        "data": {
            "user_images": int(len(data.user_y)),
            "test_images": int(len(data.test_y)),
            "rare_classes": [CLASS_NAMES[d] for d in data.rare],
            "real_per_rare_class": int((data.user_y == data.rare[0]).sum()),
            "added_per_rare_class": data.added,
        },
        "settings": {
            "cnn": "DigitCNN: 3 conv blocks (16, 32, 64 channels) + linear, default init",
            "train_recipe": recipe.to_dict(),
            "optimizer": "Adam, cross-entropy, uniform shuffling, no class weights, no augmentation in the loop",
            "classic_augment": classic.to_dict(),
            "oversample": "each real image of a rare class copied equally often (4x for 10 -> 40)",
            "judge": f"RBF SVC (gamma 0.001, C 10) on {judge.train_size} real digits outside the test split",
            "near_copy": f"distance to nearest source < percentile {NEAR_COPY_PERCENTILE} of nearest-neighbour "
            "distances among the class's real non-test images, all in 8x8 digit space",
            "std": "sample standard deviation (ddof 1) over training seeds, in points",
            "combined_std": "sum of the two variants' standard deviations (the stricter reading)",
        },
        "variants": results,
        "timings": timings,
    }
    report["targets"] = targets(results, all_variants)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "eval.md").write_text(markdown(report))
    for key, (label, added) in shown.items():
        contact_sheet(data, {key: (label, added)}, data.added).save(out / f"contact_{key}.png")
    if docs is not None:
        plot_accuracy(report, docs / "eval_rare_accuracy.png")
        contact_sheet(data, shown, 20).save(docs / "eval_contact_sheet.png", optimize=True)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m research.evaluate", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--config", type=Path, default=Path("configs/default.yaml"))
    parser.add_argument("--out", type=Path, default=Path("out/eval"))
    parser.add_argument("--seeds", type=int, default=TRAINING_SEEDS)
    parser.add_argument(
        "--runs", type=Path, default=None, help="folder of the augment runs (default: OUT/runs)"
    )
    parser.add_argument(
        "--docs", type=Path, default=Path("docs"), help="where the committed pictures go"
    )
    parser.add_argument("--no-docs", action="store_true", help="do not write the docs pictures")
    args = parser.parse_args(argv)
    if args.seeds < 2:
        parser.error("--seeds: at least 2, for a standard deviation")
    try:
        evaluate(args.config, args.out, args.seeds, None if args.no_docs else args.docs, args.runs)
    except UserError as exc:
        print(f"tailseed eval: error: {exc}", file=sys.stderr)
        return 2
    print((args.out / "eval.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
