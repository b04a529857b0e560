"""`tailseed invert` (images and a prompt -> seeds Parquet) and `tailseed generate` (seeds -> PNGs)."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np

from tailseed.jobs import console
from tailseed.pipeline.errors import UserError

# ----------------------------------------------------------------------------------------------
# invert


def load_image(path: Path, size: int) -> np.ndarray:
    """An image file as (size, size, 3) uint8, by the one rule every command uses
    (`pipeline.images.decode_image`: RGB, centre-cropped to a square, resized), with a note on
    stderr when it was cropped or resized. An unusable file is a UserError naming it."""
    from PIL import Image

    from tailseed.pipeline.images import SkipSample, decode_image

    try:
        data = path.read_bytes()
        image = decode_image(data, size)
    except OSError as exc:
        raise UserError(f"image {path}: cannot be read ({exc})") from exc
    except SkipSample as skip:
        raise UserError(f"image {path}: {skip.reason.replace('_', ' ')} ({skip.detail})") from None
    with Image.open(path) as img:
        width, height = img.size
    if (width, height) != (size, size):
        how = "centre-cropped and resized" if width != height else "resized"
        if console.verbosity() != console.QUIET:  # a note, not a warning: --quiet drops it
            print(
                f"tailseed invert: {path}: {how} {width}x{height} -> {size}x{size}",
                file=sys.stderr,
            )
    return image


def _class_of(args, card: dict) -> tuple[int | None, str | None]:
    names = card.get("class_names") or []
    index, name = args.class_index, args.class_name
    if index is not None and name is None and 0 <= index < len(names):
        name = names[index]
    if name is not None and index is None and name in names:
        index = names.index(name)
    if index is not None and name is not None and names and index < len(names):
        if names[index] != name:
            raise UserError(
                f"--class-index {index} is {names[index]!r} in the model card, not {name!r}"
            )
    return index, name


def run_invert(args) -> int:
    from tailseed.pipeline.inversion import InversionConfig, Inverter
    from tailseed.pipeline.models import ModelSpec, load_pipeline
    from tailseed.pipeline.seed_table import make_key, noise_seed, seed_row, write_seeds

    if args.out.is_dir():
        raise UserError(f"--out {args.out}: is a folder; name the seeds Parquet file to write")
    paths = [Path(p) for p in args.images]
    keys = [make_key(p.stem) for p in paths]
    first: dict[str, Path] = {}
    for key, path in zip(keys, paths):
        if key in first:
            raise UserError(f"images {first[key]} and {path} have the same key {key!r}; rename one")
        first[key] = path
    if args.batch_size < 1:
        raise UserError("--batch-size must be >= 1")
    pipe, info = load_pipeline(ModelSpec(path=args.model, device=args.device))
    card = info["card"]
    try:
        config = InversionConfig(
            **{f.name: getattr(args, f.name) for f in dataclasses.fields(InversionConfig)}
        )
    except ValueError as exc:
        raise UserError(str(exc)) from exc
    class_index, class_name = _class_of(args, card)
    inverter = Inverter(pipe, config)
    images = np.stack([load_image(p, inverter.image_size) for p in paths])
    rows, failed = [], []
    with console.StageBar("invert", total=len(paths)) as bar:
        for unit, start in enumerate(range(0, len(paths), args.batch_size)):
            part = slice(start, start + args.batch_size)
            batch_keys = keys[part]
            n = len(batch_keys)
            out = inverter.invert(
                images[part],
                [args.prompt] * n,
                [noise_seed(k, args.noise_seed) for k in batch_keys],
                bar.batch(unit, n),
            )
            bar.finished(unit, n)
            for j, key in enumerate(batch_keys):
                if out["failed"][j]:
                    failed.append(f"{paths[start + j]} (residual {out['residual'][j]:.3g})")
                    continue
                inverted = {name: values[j] for name, values in out.items()}
                rows.append(
                    seed_row(
                        key,
                        class_index,
                        class_name,
                        args.prompt,
                        inverted,
                        config.guidance_scale,
                        config.num_inference_steps,
                        info["model"],
                        info["model_hash"],
                    )
                )
                console.log(
                    f"{key}: psnr {out['recon_psnr'][j]:.2f} dB, latent rmse "
                    f"{out['recon_latent_rmse'][j]:.4f}, nfe {out['nfe'][j]}",
                    prefix="",
                )
    if rows:
        write_seeds(args.out, rows)
        console.log(f"wrote {len(rows)} seeds to {args.out}", console.SUMMARY, prefix="")
    if failed:
        print(
            f"tailseed invert: {len(failed)} image(s) failed to invert (not written): "
            + "; ".join(failed),
            file=sys.stderr,
        )
        return 1
    return 0


# ----------------------------------------------------------------------------------------------
# generate


def _tone_of(path: Path | None, seeds: Path):
    """The tone stage of a run's tone/tone.json, or None. Without --tone, seeds inside a run
    whose shards were toned get a notice: the images written are then as generated."""
    import json

    from tailseed.stages.tone import ToneStage

    if path is None:
        # a run's walks/class_NNNN/ or one of its parts: the run folder is 2 or 3 levels up
        for folder in seeds.resolve().parents[:3]:
            candidate = folder / "tone" / "tone.json"
            if candidate.is_file():
                print(
                    f"tailseed generate: note: that run's shards were toned; --tone {candidate} "
                    "tones these images the same way",
                    file=sys.stderr,
                )
                break
        return None
    try:
        summary = json.loads(path.read_text())
        return ToneStage(**ToneStage.arguments(summary))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(
            f"--tone {path}: not a run's tone/tone.json ({exc}); pass the file the run wrote"
        ) from exc


def _class_index(row: dict) -> int:
    """A walks row's class index; -1 (no class histogram: gray only) where it has none."""
    return -1 if row.get("class_index") is None else int(row["class_index"])


def run_generate(args) -> int:
    from PIL import Image

    from tailseed.pipeline.inversion import Sampler
    from tailseed.pipeline.models import ModelSpec, load_pipeline
    from tailseed.pipeline.seed_table import check_keys, parquet_files, read_seeds

    files = parquet_files(args.seeds)  # a seeds or walks file, or a run's walks/class_NNNN/
    if args.batch_size < 1:
        raise UserError("--batch-size must be >= 1")
    # 1. check every row before any model work, one file at a time (a run's walks may be large)
    keys, shapes, hashes = [], {}, set()
    for path in files:
        for r in read_seeds(path):  # checks keys: valid and unique within the file
            keys.append(r["key"])
            shapes.setdefault(tuple(r["shape"]), (path, r["key"]))
            hashes.add(r["model_hash"])
    check_keys(keys, where=str(args.seeds))
    tone = _tone_of(args.tone, args.seeds)
    pipe, info = load_pipeline(ModelSpec(path=args.model, device=args.device))
    latent_shape = (
        int(pipe.unet.config.in_channels),
        int(pipe.unet.config.sample_size),
        int(pipe.unet.config.sample_size),
    )
    for shape, (path, key) in shapes.items():
        if shape != latent_shape:
            raise UserError(
                f"seeds file {path}: row {key!r} has a seed of shape {shape}, "
                f"the model {args.model!r} takes {latent_shape}"
            )
    other = sorted(hashes - {info["model_hash"]})
    if other:
        print(
            f"tailseed generate: warning: seeds were made with model hash {', '.join(other)}, "
            f"generating with {info['model_hash']}",
            file=sys.stderr,
        )
    args.out.mkdir(parents=True, exist_ok=True)
    sampler = Sampler(pipe)
    # 2. per file, rows that share sampler settings run together, in file order within each group
    with console.StageBar("generate", total=len(keys)) as bar:
        unit = 0
        for path in files:
            groups: dict[tuple[float, int], list[dict]] = {}
            for r in read_seeds(path):
                settings = (float(r["guidance_scale"]), int(r["num_inference_steps"]))
                groups.setdefault(settings, []).append(r)
            for (guidance, steps), group in groups.items():
                for start in range(0, len(group), args.batch_size):
                    part = group[start : start + args.batch_size]
                    images = sampler.generate(
                        np.stack([r["seed"] for r in part]),
                        [r["prompt"] for r in part],
                        guidance,
                        steps,
                        bar.batch(unit, len(part)),
                    )
                    bar.finished(unit, len(part))
                    unit += 1
                    if tone is not None:
                        images = tone.tone(images, [_class_index(r) for r in part])
                    for r, image in zip(part, images):
                        Image.fromarray(image).save(args.out / f"{r['key']}.png")
    console.log(f"wrote {len(keys)} images to {args.out}", console.SUMMARY, prefix="")
    return 0
