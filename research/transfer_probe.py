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
  - with `--fidelity`, the same 40 real images after the model has had them: `real 40, VAE round
    trip` (encoded and decoded by the model's VAE) and `real 40, inverted and regenerated` (each
    inverted into a seed as the regime's config inverts a source, with its prompt and solver, and
    regenerated from that seed as its walks are). Between `real 40` and the run sets, they say
    where what the images teach is lost: in the VAE, in the diffusion model's rendering of a seed,
    or in which seeds the walks reach.

It reports, on the validation split (20 images per rare class; the test split is not read),
rare and head accuracy, each rare class's recall and the mean cross-entropy on the rare images
(`rare loss`, which resolves differences below one image), mean ± std over the seeds.
Writes out/transfer_probe/report.json and report.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

from research.classifier import SMALL, predict, to_tensor, train_as_users_train
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


def fidelity_sets(
    base, real: dict[int, np.ndarray], batch: int = 20
) -> dict[str, dict[int, np.ndarray]]:
    """`real` (digit -> images) through the regime's model: the VAE's round trip, and inversion
    followed by regeneration (the config's prompt, solver and generation settings)."""
    import torch

    from tailseed.pipeline.inversion import (
        Inverter,
        Sampler,
        decode,
        encode,
        images_to_tensor,
        tensor_to_images,
    )
    from tailseed.pipeline.models import load_pipeline
    from tailseed.pipeline.seed_table import noise_seed
    from tailseed.stages.select import prompt_for

    pipe, _ = load_pipeline(base.model, with_hash=False)
    solver = base.invert.solver
    inverter, sampler = Inverter(pipe, solver), Sampler(pipe)
    guidance = base.generate.guidance_scale or solver.guidance_scale
    steps = base.generate.num_inference_steps or solver.num_inference_steps
    vae, regen = {}, {}
    for digit, images in real.items():
        prompt = prompt_for(CLASS_NAMES[digit], base.select)
        vae_parts, regen_parts = [], []
        for start in range(0, len(images), batch):
            part = images[start : start + batch]
            with torch.inference_mode():
                z = encode(pipe.vae, images_to_tensor(part, pipe.unet.device))
                vae_parts.append(tensor_to_images(decode(pipe.vae, z)))
            seeds = [noise_seed(f"real40-{digit}-{start + i}", 0) for i in range(len(part))]
            out = inverter.invert(part, [prompt] * len(part), seeds)
            if out["failed"].any():
                raise RuntimeError(f"{int(out['failed'].sum())} real images did not invert")
            regen_parts.append(sampler.generate(out["seed"], [prompt] * len(part), guidance, steps))
        vae[digit], regen[digit] = np.concatenate(vae_parts), np.concatenate(regen_parts)
    return {"real 40, VAE round trip": vae, "real 40, inverted and regenerated": regen}


def training_set(
    user_x: np.ndarray, user_y: np.ndarray, rare: list[int], per_rare: dict[int, np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """The user's head images, and `per_rare` as the only images of the rare classes."""
    head = ~np.isin(user_y, rare)
    x = np.concatenate([user_x[head], *per_rare.values()])
    y = np.concatenate([user_y[head], *[np.full(len(v), d, np.int64) for d, v in per_rare.items()]])
    return x, y


def true_class_loss(model, images: np.ndarray, labels: np.ndarray) -> float:
    """Mean cross-entropy (nats) of `model` on `images` of `labels`: a measure that moves when the
    classifier grows more or less sure of the right class, below the resolution of accuracy on a
    few images (one of the 40 rare validation images is 2.5 points)."""
    import torch

    model.eval()
    with torch.no_grad():
        logits = model(to_tensor(images))
        return float(torch.nn.functional.cross_entropy(logits, torch.from_numpy(labels)))


def train_on(data, rare: list[int], per_rare: dict[int, np.ndarray], seed: int) -> dict:
    """Validation accuracies of the small CNN trained on the user's head images and `per_rare`,
    and its loss on the rare validation images (`rare_loss`)."""
    x, y = training_set(data.user_x, data.user_y, rare, per_rare)
    model, _ = train_as_users_train(x, y, None, None, replace(SMALL, steps=STEPS), seed)
    is_rare = np.isin(data.val_y, rare)
    return {
        **accuracies(predict(model, data.val_x), data.val_y, rare),
        "rare_loss": true_class_loss(model, data.val_x[is_rare], data.val_y[is_rare]),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m research.transfer_probe", description=__doc__.splitlines()[0]
    )
    parser.add_argument("runs", nargs="*", type=Path, help="seen-regime augment output folders")
    parser.add_argument(
        "--oracle", nargs="*", type=Path, default=[], help="runs whose pools the oracle keeps from"
    )
    parser.add_argument(
        "--fidelity", action="store_true", help="add the real 40 after the VAE and inversion"
    )
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("out/transfer_probe"))
    args = parser.parse_args(argv)
    _, base, card, split = embedded_regime("seen")
    rare = sorted(split.tail_classes)
    data = load_regime_data(base, card, rare, base.select.quota - 10)
    report = {"regime": "seen", "steps": STEPS, "seeds": args.seeds, "sets": {}}
    sets = rare_sets(data, split, rare, args.runs)
    if args.fidelity:
        sets.update(fidelity_sets(base, sets["real 40"]))
    for run in args.oracle:
        sets[f"{run.name}, oracle-kept pool"] = oracle_set(
            run, split, rare, args.out / "candidates"
        )
    for name, per_rare in sets.items():
        runs = [train_on(data, rare, per_rare, SEED_OFFSET + s) for s in range(args.seeds)]
        # and each rare class's recall, and the loss on the rare validation images
        keys = ["rare", "head", *[CLASS_NAMES[d] for d in rare], "rare_loss"]
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
        print(name, {k: round(report["sets"][name][k]["mean"], 3) for k in keys}, flush=True)
    lines = [
        "# Rare classes from the added images alone (seen, validation)",
        "",
        f"Small CNN, {STEPS} steps, augmentation in the loop, seeds {SEED_OFFSET}-"
        f"{SEED_OFFSET + args.seeds - 1}; the user's head images plus each set as the only images"
        " of the rare classes.",
        "",
        "| rare images | per class | rare | head | "
        + " | ".join(f"{CLASS_NAMES[d]} recall" for d in rare)
        + " | rare loss |",
        "|---|---:|---:|---:|" + "---:|" * (len(rare) + 1),
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
            + f" | {entry['rare_loss']['mean']:.3f} ± {entry['rare_loss']['std']:.3f} |"
        )
    write_report(args.out, report, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
