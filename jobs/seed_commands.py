"""`tailseed invert` (images and a prompt -> seeds Parquet) and `tailseed generate` (seeds -> PNGs)."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import numpy as np

from pipeline.errors import UserError
from pipeline.inversion import METHODS, InversionConfig

DEFAULT_MODEL = "models/tiny-digits"
# Used where the model has no tailseed card: the fixed-point paper's settings for real images.
FALLBACK_GUIDANCE = 2.0
FALLBACK_STEPS = 50


def add_parser(subparsers) -> None:
    """Register the `invert` and `generate` subcommands."""
    defaults = InversionConfig()
    inv = subparsers.add_parser(
        "invert",
        help="invert images into noise seeds (a seeds Parquet file)",
        description="Invert images into noise seeds with fixed-point inversion. Each image's key is "
        "its file stem with characters outside [A-Za-z0-9_-] replaced by '_'.",
    )
    inv.add_argument("images", nargs="+", metavar="IMAGE", help="image files (RGB, any size)")
    inv.add_argument("--model", default=DEFAULT_MODEL, help="diffusers folder or hub id")
    inv.add_argument("--prompt", required=True, help="the prompt that describes the images")
    inv.add_argument("--out", required=True, type=Path, help="seeds Parquet file to write")
    inv.add_argument("--class-index", type=int, default=None, help="class index of the images")
    inv.add_argument("--class-name", default=None, help="class name (default: from the card)")
    inv.add_argument("--guidance-scale", type=float, default=None, help="default: the model card's")
    inv.add_argument("--steps", type=int, default=None, help="DDIM steps; default: the card's")
    inv.add_argument("--method", choices=METHODS, default=defaults.method)
    inv.add_argument("--max-iters", type=int, default=defaults.max_iters)
    inv.add_argument("--tol", type=float, default=defaults.tol)
    inv.add_argument("--adjust-strength", type=float, default=defaults.adjust_strength)
    inv.add_argument("--adjust-guidance", type=float, default=defaults.adjust_guidance)
    inv.add_argument("--noise-seed", type=int, default=0, help="base seed of the adjustment noise")
    inv.add_argument("--batch-size", type=int, default=16)
    inv.add_argument("--device", default="auto")
    inv.set_defaults(func=run_invert)

    gen = subparsers.add_parser(
        "generate",
        help="generate images from a seeds (or walks) Parquet file",
        description="Regenerate DIR/<key>.png from each row's seed, prompt, guidance and steps.",
    )
    gen.add_argument("--model", default=DEFAULT_MODEL, help="diffusers folder or hub id")
    gen.add_argument("--seeds", required=True, type=Path, help="seeds or walks Parquet file")
    gen.add_argument("--out", required=True, type=Path, help="folder for <key>.png")
    gen.add_argument("--batch-size", type=int, default=16)
    gen.add_argument("--device", default="auto")
    gen.set_defaults(func=run_generate)


# ----------------------------------------------------------------------------------------------
# invert


def load_image(path: Path, size: int) -> np.ndarray:
    """An image file as (size, size, 3) uint8: converted to RGB and resized if square.

    Unreadable files and non-square images are rejected with a UserError naming the file.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            image = img.copy()
    except (OSError, UnidentifiedImageError) as exc:
        raise UserError(f"image {path}: cannot be read as an image ({exc})") from exc
    width, height = image.size
    if width != height:
        raise UserError(
            f"image {path}: is {width}x{height}; the model takes square {size}x{size} images, "
            f"crop it to a square first"
        )
    if image.mode != "RGB":
        # Transparent pixels become black, as the background of the embedded digits.
        if image.mode in ("RGBA", "LA", "P"):
            image = image.convert("RGBA")
            background = Image.new("RGBA", image.size, (0, 0, 0, 255))
            image = Image.alpha_composite(background, image)
        image = image.convert("RGB")
    if image.size != (size, size):
        print(
            f"tailseed invert: {path}: resized {width}x{height} -> {size}x{size}", file=sys.stderr
        )
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(image, dtype=np.uint8)


def noise_seed_for(key: str, base: int) -> int:
    """A per-image seed of the adjustment noise from its key, so it does not depend on the order."""
    digest = hashlib.sha256(f"{base}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


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
    from pipeline.inversion import Inverter
    from pipeline.models import ModelSpec, load_pipeline
    from pipeline.seed_table import make_key, write_seeds

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
            method=args.method,
            num_inference_steps=args.steps or card.get("num_inference_steps", FALLBACK_STEPS),
            guidance_scale=(
                args.guidance_scale
                if args.guidance_scale is not None
                else card.get("guidance_scale", FALLBACK_GUIDANCE)
            ),
            max_iters=args.max_iters,
            tol=args.tol,
            adjust_strength=args.adjust_strength,
            adjust_guidance=args.adjust_guidance,
        )
    except ValueError as exc:
        raise UserError(str(exc)) from exc
    class_index, class_name = _class_of(args, card)
    inverter = Inverter(pipe, config)
    images = np.stack([load_image(p, inverter.image_size) for p in paths])
    rows, failed = [], []
    for start in range(0, len(paths), args.batch_size):
        part = slice(start, start + args.batch_size)
        batch_keys = keys[part]
        out = inverter.invert(
            images[part],
            [args.prompt] * len(batch_keys),
            [noise_seed_for(k, args.noise_seed) for k in batch_keys],
        )
        for j, key in enumerate(batch_keys):
            if out["failed"][j]:
                failed.append(f"{paths[start + j]} (residual {out['residual'][j]:.3g})")
                continue
            rows.append(
                {
                    "key": key,
                    "class_index": class_index,
                    "class_name": class_name,
                    "prompt": args.prompt,
                    "seed": out["seed"][j],
                    "guidance_scale": float(config.guidance_scale),
                    "num_inference_steps": int(config.num_inference_steps),
                    "model": info["model"],
                    "model_hash": info["model_hash"],
                    "recon_psnr": float(out["recon_psnr"][j]),
                    "recon_latent_rmse": float(out["recon_latent_rmse"][j]),
                    "nfe": int(out["nfe"][j]),
                }
            )
            print(
                f"{key}: psnr {out['recon_psnr'][j]:.2f} dB, latent rmse "
                f"{out['recon_latent_rmse'][j]:.4f}, nfe {out['nfe'][j]}"
            )
    if rows:
        write_seeds(args.out, rows)
        print(f"wrote {len(rows)} seeds to {args.out}")
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


def run_generate(args) -> int:
    from PIL import Image

    from pipeline.inversion import Inverter
    from pipeline.models import ModelSpec, load_pipeline
    from pipeline.seed_table import read_seeds

    if not args.seeds.is_file():
        raise UserError(f"seeds file {args.seeds}: no such file")
    if args.batch_size < 1:
        raise UserError("--batch-size must be >= 1")
    rows = read_seeds(args.seeds)  # checks keys: valid and unique
    pipe, info = load_pipeline(ModelSpec(path=args.model, device=args.device))
    latent_shape = (
        int(pipe.unet.config.in_channels),
        int(pipe.unet.config.sample_size),
        int(pipe.unet.config.sample_size),
    )
    for r in rows:
        if tuple(r["shape"]) != latent_shape:
            raise UserError(
                f"seeds file {args.seeds}: row {r['key']!r} has a seed of shape {r['shape']}, "
                f"the model {args.model!r} takes {latent_shape}"
            )
    hashes = sorted({r["model_hash"] for r in rows} - {info["model_hash"]})
    if hashes:
        print(
            f"tailseed generate: warning: seeds were made with model hash {', '.join(hashes)}, "
            f"generating with {info['model_hash']}",
            file=sys.stderr,
        )
    args.out.mkdir(parents=True, exist_ok=True)
    # Rows that share sampler settings run together, in file order within each group.
    groups: dict[tuple[float, int], list[dict]] = {}
    for r in rows:
        groups.setdefault((float(r["guidance_scale"]), int(r["num_inference_steps"])), []).append(r)
    for (guidance, steps), group in groups.items():
        inverter = Inverter(
            pipe, InversionConfig(num_inference_steps=steps, guidance_scale=guidance)
        )
        for start in range(0, len(group), args.batch_size):
            part = group[start : start + args.batch_size]
            images = inverter.generate(
                np.stack([r["seed"] for r in part]), [r["prompt"] for r in part], guidance, steps
            )
            for r, image in zip(part, images):
                Image.fromarray(image).save(args.out / f"{r['key']}.png")
    print(f"wrote {len(rows)} images to {args.out}")
    return 0
