"""Judge the embedded model from plain prompts: per-class recognition, and near-copies of the tail.

`python -m research.model_report` writes out/model_report/report.json and .md, and the contact sheet
docs/tiny_digits_prompts.png. It uses the stock `StableDiffusionPipeline` call with the card's
guidance and steps, so what it measures is what a user of the model alone would get.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.contact import grid, labelled
from pipeline.models import EMBEDDED_MODEL, ModelSpec, load_pipeline
from research.digits import DigitsSplit, load_digits_arrays, to_digit_space
from research.judge import near_copy_threshold, nearest_distances, train_judge


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
        out[c] = np.clip(np.rint(result.images * 255), 0, 255).astype(np.uint8)
    return out


def report(model: Path, per_class: int, seed: int, out_dir: Path, picture: Path | None) -> dict:
    torch.set_num_threads(2)
    pipe, info = load_pipeline(ModelSpec(path=str(model)))
    card = info["card"]
    t0 = time.perf_counter()
    images = generate_per_class(pipe, card, per_class, seed)
    seconds = time.perf_counter() - t0
    judge = train_judge(DigitsSplit(**card["split"]))
    images8, labels = load_digits_arrays()
    splits = card["split_indices"]
    test = set(splits["test"])
    rows = []
    for c, name in enumerate(card["class_names"]):
        predicted = judge.predict(images[c])
        row = {
            "class": name,
            "train_count": card["train_counts"][c],
            "tail": name in card["tail_classes"],
            "recognised": float((predicted == c).mean()),
            "most_common_wrong": (
                card["class_names"][int(np.bincount(predicted[predicted != c]).argmax())]
                if (predicted != c).any()
                else None
            ),
        }
        if row["tail"]:
            space = to_digit_space(images[c])
            train_c = [i for i in splits["model_train"] if labels[i] == c]
            user_c = [i for i in splits["user"] if labels[i] == c]
            real_c = [i for i in range(len(labels)) if labels[i] == c and i not in test]
            threshold = near_copy_threshold(images8[real_c].reshape(len(real_c), -1))
            d_train = nearest_distances(space, images8[train_c].reshape(len(train_c), -1))
            d_user = nearest_distances(space, images8[user_c].reshape(len(user_c), -1))
            row.update(
                near_copy_threshold=threshold,
                near_copies_of_model_train=float((d_train < threshold).mean()),
                median_distance_to_model_train=float(np.median(d_train)),
                median_distance_to_user_images=float(np.median(d_user)),
            )
        rows.append(row)
    head = [r["recognised"] for r in rows if not r["tail"]]
    result = {
        "model": str(model),
        "model_hash": info["model_hash"],
        "per_class_images": per_class,
        "guidance_scale": card["guidance_scale"],
        "num_inference_steps": card["num_inference_steps"],
        "judge": f"SVC on {judge.train_size} real digits outside the test split",
        "generation_seconds": round(seconds, 1),
        "head_recognised_mean": float(np.mean(head)),
        "head_recognised_min": float(np.min(head)),
        "classes": rows,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [
        "| class | train images | recognised by judge | near-copies of the model's tail images |",
        "|---|---:|---:|---:|",
    ]
    for r in rows:
        copies = f"{r['near_copies_of_model_train']:.0%}" if r["tail"] else ""
        lines.append(
            f"| {r['class']}{' (tail)' if r['tail'] else ''} | {r['train_count']} | {r['recognised']:.0%} | {copies} |"
        )
    (out_dir / "report.md").write_text("\n".join(lines) + "\n")
    if picture is not None:
        sections = [
            (
                f"{name} ({card['train_counts'][c]} training images)",
                grid(list(images[c][:16]), 16, 2),
            )
            for c, name in enumerate(card["class_names"])
        ]
        picture.parent.mkdir(parents=True, exist_ok=True)
        labelled(sections).save(picture)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=EMBEDDED_MODEL)
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("out/model_report"))
    parser.add_argument("--picture", type=Path, default=Path("docs/tiny_digits_prompts.png"))
    args = parser.parse_args(argv)
    result = report(args.model, args.per_class, args.seed, args.out, args.picture)
    print((args.out / "report.md").read_text())
    print(
        f"head classes recognised: mean {result['head_recognised_mean']:.1%}, min {result['head_recognised_min']:.1%}"
    )


if __name__ == "__main__":
    main()
