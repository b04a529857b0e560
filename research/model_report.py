"""Judge an embedded model from plain prompts: per-class recognition, and near-copies of the tail.

`python -m research.model_report [--model models/tiny-digits]` writes out/model_report/report.json
and .md, and the contact sheet docs/tiny_digits_prompts.png. For another model the defaults follow
its card's name: `--model models/tiny-digits-seen` writes out/model_report_seen/ and
docs/tiny_digits_seen_prompts.png. It uses the stock `StableDiffusionPipeline` call with the card's
guidance and steps, so what it measures is what a user of the model alone would get.

For a model whose card has a generic caption (the "seen, rarely named" regime) it also samples the
generic caption ("a photo of a digit") and the unconditional model (the empty prompt), and reports
the share of each class among them as the judge sees it: the two properties of that regime are
that plain prompts of the tail classes are judged in class at most 30% of the time, while the tail
classes are present in the model's generic samples.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from research.digits import DigitsSplit, held_out_indices, load_digits_arrays, to_digit_space
from research.judge import near_copy_threshold, nearest_distances, train_judge
from tailseed.pipeline.contact import grid, labelled
from tailseed.pipeline.models import EMBEDDED_MODEL, ModelSpec, load_pipeline, read_card

PLAIN_PROMPT_TARGET = 0.30  # the seen regime: tail plain prompts judged in class at most this often
GENERIC_SEED_OFFSET = 1000  # seeds of the generic samples: seed + offset (+ batch number)
UNCONDITIONAL_SEED_OFFSET = 2000


def _to_uint8(images: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(images * 255), 0, 255).astype(np.uint8)


def generate_per_class(pipe, card: dict, per_class: int, seed: int) -> dict[int, np.ndarray]:
    out = {}
    for c, name in enumerate(card["class_names"]):
        gen = torch.Generator().manual_seed(seed + c)
        result = pipe(
            [card["prompt_template"].format(name)] * per_class,
            guidance_scale=card["guidance_scale"],
            num_inference_steps=card["num_inference_steps"],
            generator=gen,
            output_type="np",
        )
        out[c] = _to_uint8(result.images)
    return out


def generate(
    pipe, prompt: str, n: int, guidance: float, steps: int, seed: int, batch: int = 100
) -> np.ndarray:
    """`n` images of one prompt, in batches of `batch` (batch k seeded with seed + k)."""
    out = []
    for k, start in enumerate(range(0, n, batch)):
        result = pipe(
            [prompt] * min(batch, n - start),
            guidance_scale=guidance,
            num_inference_steps=steps,
            generator=torch.Generator().manual_seed(seed + k),
            output_type="np",
        )
        out.append(_to_uint8(result.images))
    return np.concatenate(out) if out else np.zeros((0, 32, 32, 3), np.uint8)


def default_paths(card: dict) -> tuple[Path, Path]:
    """(report folder, contact sheet) for a model card: tiny-digits -> out/model_report and
    docs/tiny_digits_prompts.png; tiny-digits-seen -> out/model_report_seen and
    docs/tiny_digits_seen_prompts.png."""
    name = card.get("name", "tiny-digits")
    suffix = name.removeprefix("tiny-digits").strip("-").replace("-", "_")
    out = Path("out") / ("model_report" + (f"_{suffix}" if suffix else ""))
    return out, Path("docs") / f"{name.replace('-', '_')}_prompts.png"


def _shares(predicted: np.ndarray, n_classes: int) -> list[float]:
    return (np.bincount(predicted, minlength=n_classes) / max(len(predicted), 1)).tolist()


def generic_section(
    pipe, card: dict, judge, prompt: str, n: int, guidance: float, seed: int, tail_train: dict
) -> tuple[dict, np.ndarray]:
    """Sample `prompt` n times; the judged share of every class, and of the tail samples the share
    that are near-copies of the model's own training images of their class."""
    t0 = time.perf_counter()
    images = generate(pipe, prompt, n, guidance, card["num_inference_steps"], seed)
    seconds = time.perf_counter() - t0
    predicted = judge.predict(images)
    names = card["class_names"]
    section = {
        "prompt": prompt,
        "samples": n,
        "guidance_scale": guidance,
        "seed": seed,
        "generation_seconds": round(seconds, 1),
        "judged_share": dict(zip(names, _shares(predicted, len(names)))),
        "tail_near_copies_of_model_train": {},
    }
    for c, (train8, threshold) in tail_train.items():
        mine = images[predicted == c]
        if len(mine):
            d = nearest_distances(to_digit_space(mine), train8)
            section["tail_near_copies_of_model_train"][names[c]] = float((d < threshold).mean())
    return section, images


def report(
    model: Path,
    per_class: int,
    seed: int,
    out_dir: Path,
    picture: Path | None,
    generic_samples: int = 500,
    threads: int = 2,
) -> dict:
    torch.set_num_threads(threads)
    pipe, info = load_pipeline(ModelSpec(path=str(model)))
    card = info["card"]
    t0 = time.perf_counter()
    images = generate_per_class(pipe, card, per_class, seed)
    seconds = time.perf_counter() - t0
    split = DigitsSplit(**card["split"])
    judge = train_judge(split)
    images8, labels = load_digits_arrays()
    splits = card["split_indices"]
    held_out = held_out_indices(labels, split)
    names = card["class_names"]
    rows, tail_train = [], {}
    for c, name in enumerate(names):
        predicted = judge.predict(images[c])
        row = {
            "class": name,
            "train_count": card["train_counts"][c],
            "tail": name in card["tail_classes"],
            "recognised": float((predicted == c).mean()),
            "most_common_wrong": (
                names[int(np.bincount(predicted[predicted != c]).argmax())]
                if (predicted != c).any()
                else None
            ),
        }
        if row["tail"]:
            space = to_digit_space(images[c])
            train_c = [i for i in splits["model_train"] if labels[i] == c]
            user_c = [i for i in splits["user"] if labels[i] == c]
            real_c = [i for i in range(len(labels)) if labels[i] == c and i not in held_out]
            threshold = near_copy_threshold(images8[real_c].reshape(len(real_c), -1))
            train8 = images8[train_c].reshape(len(train_c), -1)
            tail_train[c] = (train8, threshold)
            d_train = nearest_distances(space, train8)
            d_user = nearest_distances(space, images8[user_c].reshape(len(user_c), -1))
            row.update(
                near_copy_threshold=threshold,
                near_copies_of_model_train=float((d_train < threshold).mean()),
                median_distance_to_model_train=float(np.median(d_train)),
                median_distance_to_user_images=float(np.median(d_user)),
            )
        rows.append(row)
    head = [r["recognised"] for r in rows if not r["tail"]]
    held = "the test split" + (" and the spare tail images" if split.spare_is_test else "")
    result = {
        "model": str(model),
        "model_name": card.get("name"),
        "regime": card.get("regime", "never-seen"),
        "model_hash": info["model_hash"],
        "per_class_images": per_class,
        "seed": seed,
        "guidance_scale": card["guidance_scale"],
        "num_inference_steps": card["num_inference_steps"],
        "judge": f"SVC on {judge.train_size} real digits outside {held}",
        "generation_seconds": round(seconds, 1),
        "head_recognised_mean": float(np.mean(head)),
        "head_recognised_min": float(np.min(head)),
        "classes": rows,
    }
    captions = card.get("captions", {})
    generic_caption = captions.get("generic_caption")
    has_generic = generic_caption and any(
        v["generic"] for v in captions.get("per_class", {}).values()
    )
    sample_rows = []
    if has_generic and generic_samples > 0:
        total = sum(card["train_counts"])
        generic_counts = [captions["per_class"][n]["generic"] for n in names]
        result["training_share"] = {n: card["train_counts"][c] / total for c, n in enumerate(names)}
        result["training_share_under_generic_caption"] = {
            n: generic_counts[c] / sum(generic_counts) for c, n in enumerate(names)
        }
        tail = {r["class"]: r["recognised"] for r in rows if r["tail"]}
        result["plain_prompts"] = {
            "tail_recognised": tail,
            "target_at_most": PLAIN_PROMPT_TARGET,
            "met": all(v <= PLAIN_PROMPT_TARGET for v in tail.values()),
        }
        sections = {}
        for key, prompt, guidance, offset in (
            ("generic", generic_caption, card["guidance_scale"], GENERIC_SEED_OFFSET),
            # the empty prompt with guidance 1 is the unconditional model (the same result as any
            # guidance, since its conditional and unconditional predictions are the same), at half
            # the cost
            ("unconditional", "", 1.0, UNCONDITIONAL_SEED_OFFSET),
        ):
            sections[key], samples = generic_section(
                pipe, card, judge, prompt, generic_samples, guidance, seed + offset, tail_train
            )
            sample_rows.append((key, prompt, samples))
        result.update(sections)
        result["tail_present_in_generic_samples"] = {
            n: result["generic"]["judged_share"][n] for n in card["tail_classes"]
        }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(result, indent=1) + "\n")
    (out_dir / "report.md").write_text(markdown(result))
    if picture is not None:
        named_counts = captions.get("per_class", {})
        sheet = []
        for c, name in enumerate(names):
            title = f"{name} ({card['train_counts'][c]} training images"
            if named_counts.get(name, {}).get("generic"):
                title += f", {named_counts[name]['named']} of them named"
            sheet.append((title + ")", grid(list(images[c][:16]), 16, 2)))
        for key, prompt, samples in sample_rows:
            sheet.append((f'{key} samples ("{prompt}")', grid(list(samples[:16]), 16, 2)))
        picture.parent.mkdir(parents=True, exist_ok=True)
        labelled(sheet).save(picture)
    return result


def markdown(result: dict) -> str:
    lines = [
        "| class | train images | recognised by judge | near-copies of the model's tail images |",
        "|---|---:|---:|---:|",
    ]
    for r in result["classes"]:
        copies = f"{r['near_copies_of_model_train']:.0%}" if r["tail"] else ""
        lines.append(
            f"| {r['class']}{' (tail)' if r['tail'] else ''} | {r['train_count']} | {r['recognised']:.0%} | {copies} |"
        )
    if "generic" in result:
        g, u = result["generic"], result["unconditional"]
        plain = result["plain_prompts"]
        lines += [
            "",
            "Plain prompts of the tail classes judged in class: "
            + ", ".join(f"{k} {v:.0%}" for k, v in plain["tail_recognised"].items())
            + f" (target at most {plain['target_at_most']:.0%}: {'met' if plain['met'] else 'missed'}).",
            "",
            f'| class | share of model training images | share of "{g["prompt"]}" captions |'
            f' judged share of {g["samples"]} "{g["prompt"]}" samples |'
            f" judged share of {u['samples']} unconditional samples |",
            "|---|---:|---:|---:|---:|",
        ]
        for name in result["training_share"]:
            lines.append(
                f"| {name} | {result['training_share'][name]:.1%}"
                f" | {result['training_share_under_generic_caption'][name]:.1%}"
                f" | {g['judged_share'][name]:.1%} | {u['judged_share'][name]:.1%} |"
            )
        for key, s in (("generic", g), ("unconditional", u)):
            copies = ", ".join(
                f"{k} {v:.0%}" for k, v in s["tail_near_copies_of_model_train"].items()
            )
            lines.append("")
            lines.append(
                f"Near-copies of the model's training images among the tail-judged {key} samples: {copies or 'none judged tail'}."
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=EMBEDDED_MODEL)
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument(
        "--generic", type=int, default=500, help="generic and unconditional samples"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="1 is faster on busy shared cores")
    parser.add_argument("--out", type=Path, help="default: from the card (out/model_report[_seen])")
    parser.add_argument("--picture", type=Path, help="default: docs/<card name>_prompts.png")
    args = parser.parse_args(argv)
    out, picture = default_paths(read_card(args.model))
    out, picture = args.out or out, args.picture or picture
    result = report(args.model, args.per_class, args.seed, out, picture, args.generic, args.threads)
    print((out / "report.md").read_text())
    print(
        f"head classes recognised: mean {result['head_recognised_mean']:.1%}, min {result['head_recognised_min']:.1%}"
    )


if __name__ == "__main__":
    main()
