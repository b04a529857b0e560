"""Example datasets in the three formats a user brings, for the README's "Your own dataset".

`python -m research.own_data_examples --out data/examples` writes:

- `shapes/`: an ImageFolder of coloured shapes (circle, square: 30 each; triangle: 8), a domain the
  embedded digits model does not know; its run shows the reconstruction-health warning.
- `digits-tars/`: the embedded user split (data/digits/user) as WebDataset tars whose samples carry
  an integer label in `.cls` (0-9), as many tar datasets do.
- `digits-parquet/digits.parquet`: the same images as Parquet (image bytes, integer label column).
- `digit_names.txt`: one class name per line, line i naming label i (`dataset.class_names`).

Everything is drawn from fixed seeds: the same command writes the same files.
"""

from __future__ import annotations

import argparse
import io
import sys
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CLASS_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
SHAPE_COUNTS = {"circle": 30, "square": 30, "triangle": 8}


def shape_image(kind: str, rng: np.random.Generator, size: int = 32) -> Image.Image:
    """One shape of a random colour, size and place on a random dark background."""
    background = tuple(int(v) for v in rng.integers(0, 80, 3))
    colour = tuple(int(v) for v in rng.integers(120, 256, 3))
    img = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(img)
    r = rng.uniform(6, 12)
    cx, cy = rng.uniform(r + 1, size - r - 1, 2)
    if kind == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
    elif kind == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=colour)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    return img


def write_shapes(root: Path, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for kind, count in SHAPE_COUNTS.items():
        (root / kind).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            shape_image(kind, rng).save(root / kind / f"{kind}_{i:03d}.png")


def user_digits(user: Path) -> list[tuple[str, int, bytes]]:
    """(stem, label, PNG bytes) of the embedded user split's ImageFolder, sorted by stem."""
    if not user.is_dir():
        raise SystemExit(f"{user}: missing; run `make augment` once (it writes the embedded data)")
    items = []
    for label, name in enumerate(CLASS_NAMES):
        for png in sorted((user / name).glob("*.png")):
            items.append((png.stem, label, png.read_bytes()))
    return sorted(items)


def write_tars(root: Path, items: list[tuple[str, int, bytes]], per_tar: int = 120) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for t in range(0, len(items), per_tar):
        with tarfile.open(root / f"digits-{t // per_tar:03d}.tar", "w") as tar:
            for stem, label, data in items[t : t + per_tar]:
                for suffix, payload in ((".png", data), (".cls", str(label).encode())):
                    info = tarfile.TarInfo(f"{stem}{suffix}")
                    info.size, info.mtime = len(payload), 0
                    tar.addfile(info, io.BytesIO(payload))


def write_parquet(path: Path, items: list[tuple[str, int, bytes]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table(
        {
            "image": [data for _, _, data in items],
            "label": [label for _, label, _ in items],
            "id": [stem for stem, _, _ in items],
        }
    )
    pq.write_table(table, path, row_group_size=64)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m research.own_data_examples")
    parser.add_argument("--out", type=Path, default=Path("data/examples"))
    parser.add_argument("--user", type=Path, default=Path("data/digits/user"))
    args = parser.parse_args(argv)
    write_shapes(args.out / "shapes")
    items = user_digits(args.user)
    write_tars(args.out / "digits-tars", items)
    write_parquet(args.out / "digits-parquet" / "digits.parquet", items)
    (args.out / "digit_names.txt").write_text("\n".join(CLASS_NAMES) + "\n")
    print(f"wrote {args.out}/shapes, digits-tars, digits-parquet, digit_names.txt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
