"""Contact sheets: grids of images a person can look at before training on them."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def grid(images: list[np.ndarray], columns: int, scale: int = 1, gap: int = 2) -> Image.Image:
    """(H, W, 3) uint8 images -> one RGB grid, row-major, upscaled by `scale` (nearest)."""
    if not images:
        return Image.new("RGB", (1, 1))
    h, w = images[0].shape[:2]
    rows = (len(images) + columns - 1) // columns
    sheet = Image.new(
        "RGB", (columns * (w * scale + gap) + gap, rows * (h * scale + gap) + gap), (40, 40, 40)
    )
    for i, image in enumerate(images):
        tile = Image.fromarray(image).resize((w * scale, h * scale), Image.Resampling.NEAREST)
        sheet.paste(
            tile,
            (gap + (i % columns) * (w * scale + gap), gap + (i // columns) * (h * scale + gap)),
        )
    return sheet


def labelled(sections: list[tuple[str, Image.Image]], width: int | None = None) -> Image.Image:
    """Stack titled sections vertically (title text above each grid)."""
    width = width or max(img.width for _, img in sections)
    title_h = 14
    height = sum(img.height + title_h for _, img in sections)
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    y = 0
    for title, img in sections:
        draw.text((2, y + 1), title, fill=(0, 0, 0))
        sheet.paste(img, (0, y + title_h))
        y += img.height + title_h
    return sheet


def iter_shard_images(shards_dir: Path) -> Iterator[tuple[str, int, np.ndarray]]:
    """(key, class index, image) of every sample in the shards, in shard order."""
    for tar_path in sorted(shards_dir.glob("[0-9]*.tar")):
        with tarfile.open(tar_path) as tar:
            pending: dict[str, dict[str, bytes]] = {}
            for member in tar:
                key, ext = member.name.split(".", 1)
                pending.setdefault(key, {})[ext] = tar.extractfile(member).read()
            for key, parts in pending.items():
                if "png" in parts and "cls" in parts:
                    image = np.asarray(Image.open(io.BytesIO(parts["png"])).convert("RGB"))
                    yield key, int(parts["cls"]), image
