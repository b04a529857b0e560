"""Tone: give the kept images the tone of the user's real images, without touching their shape.

A generated image can carry a cue that no real image has: the embedded digits are gray (R=G=B)
with a third of their pixels exactly black, while the tiny model draws a faint tint and a faint
background. A classifier can learn that cue instead of the shape (docs/results.md#cue-study: a
probe on shape-free features tells tailseed's images from real ones 100% of the time). Two
options, both on by default (the evaluation's validation chose them in both regimes,
docs/results.md#tone-stage):
- `gray`: every channel becomes the rounded channel mean. "auto" does it when every real image
  read (up to `max_per_class` per class, every class) is gray, "always", or "never".
- `match_histogram`: each image's pixels, ranked by value (ties in pixel order), take the values
  of its class's real images at the same quantiles, channel by channel (one gray channel when the
  image was made gray): the image keeps its ranking, so its shape, and gets its class's histogram.
Every sample it changes gains a "tone" entry in its JSON saying what was done.

Unit in:  the columns of the stage before it (generate or filter): image (N, H, W, 3) uint8,
          ok (N,) bool, cls (N,) int64, meta (N,) str, and any others.
Unit out: the same columns; rows that are ok have their image toned and their meta extended.
The decision and the histograms are prepared once per run by `prepare` (in the driver, before
generation), saved as the output folder's `tone/tone.json` and reused by a rerun.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tailseed.pipeline.config import NOT_HASHED
from tailseed.pipeline.datasets import Listing
from tailseed.pipeline.errors import UserError
from tailseed.pipeline.runner import Resources, Stage
from tailseed.pipeline.shards import atomic_write, dumps

GRAY_SETTINGS = ("never", "auto", "always")  # not on/off: YAML reads those as booleans


@dataclass(frozen=True)
class ToneConfig:
    gray: str = "auto"  # when every real image read is gray; "always"; "never"
    match_histogram: bool = True  # each image gets its class's histogram, rank for rank
    max_per_class: int = 200  # real images per class decoded for the decision and the histograms
    resources: Resources = field(
        default_factory=lambda: Resources(num_cpus=0.25), metadata=NOT_HASHED
    )

    def validate(self, where: str) -> None:
        if self.gray not in GRAY_SETTINGS:
            raise UserError(f"{where}.gray is {self.gray!r}; one of {', '.join(GRAY_SETTINGS)}")
        if self.max_per_class < 1:
            raise UserError(f"{where}.max_per_class is {self.max_per_class}; at least 1")

    @property
    def enabled(self) -> bool:
        return self.gray != "never" or self.match_histogram


# The tone stage off: what every run did before the stage existed (the config hash's baseline).
TONE_OFF = ToneConfig(gray="never", match_histogram=False)


def is_gray(images: np.ndarray) -> bool:
    """Whether every (N, H, W, 3) image has R == G == B at every pixel."""
    return bool(np.all(images[..., :1] == images[..., 1:]))


def to_gray(images: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) uint8 -> the same shape, every channel the rounded channel mean."""
    g = np.round(images.astype(np.float64).mean(axis=3)).astype(np.uint8)
    return np.repeat(g[..., None], 3, axis=3)


def histograms(images: np.ndarray, channels: int) -> list[list[int]]:
    """Counts of each value 0-255 over every pixel of `images`, per channel (channels 3), or of
    channel 0 alone (channels 1: gray images)."""
    return [
        np.bincount(images[..., c].reshape(-1), minlength=256).astype(int).tolist()
        for c in range(channels)
    ]


def match_to(images: np.ndarray, counts: list[list[int]]) -> np.ndarray:
    """Each image's pixels, ranked by value within its channel (stable: ties in pixel order),
    take the reference's values at the same quantiles; one histogram in `counts` is applied to
    channel 0 and copied to the others (a gray image), three are applied channel by channel."""
    out = np.empty_like(images)
    pixels = images.shape[1] * images.shape[2]
    # the reference's sorted values at the quantile of every rank 0..pixels-1
    at_rank = []
    for hist in counts:
        cumulative = np.cumsum(np.asarray(hist, np.int64))
        total = int(cumulative[-1])
        positions = ((np.arange(pixels) + 0.5) / pixels * total).astype(np.int64)
        at_rank.append(np.searchsorted(cumulative, positions, side="right").astype(np.uint8))
    for i, image in enumerate(images):
        for c, values in enumerate(at_rank):
            flat = image[..., c].reshape(-1)
            toned = np.empty_like(flat)
            toned[np.argsort(flat, kind="stable")] = values
            out[i, ..., c] = toned.reshape(image.shape[:2])
        if len(at_rank) == 1:
            out[i, ..., 1:] = out[i, ..., :1]
    return out


def prepare(
    config: ToneConfig,
    listing: Listing,
    classes: list[int],
    image_size: int,
    image_column: str,
    folder: Path,
    log=print,
) -> dict:
    """Decide on gray and collect the histogram of every class in `classes` (the rare classes),
    once per run, into `folder`/tone.json (reused when there): what the tone stage reads."""
    from tailseed.stages.filter import real_images

    summary_path = folder / "tone.json"
    if summary_path.is_file():
        return json.loads(summary_path.read_text())
    images, labels, skipped = real_images(listing, image_size, image_column, config.max_per_class)
    all_gray = is_gray(images)
    gray = config.gray == "always" or (config.gray == "auto" and all_gray)
    summary = {
        "gray": gray,
        "gray_setting": config.gray,
        "real_images_gray": all_gray,
        "real_images": int(len(labels)),
        "real_images_skipped": dict(skipped),
        "match_histogram": config.match_histogram,
    }
    if config.match_histogram:
        missing = [c for c in classes if not np.any(labels == c)]
        if missing:
            raise UserError(
                f"tone.match_histogram: no readable real image of class {missing} to take a "
                "histogram from; turn tone.match_histogram off or fix those images"
            )
        summary["histograms"] = {
            str(c): histograms(to_gray(images[labels == c]), 1)
            if gray
            else histograms(images[labels == c], 3)
            for c in classes
        }
        summary["reference_images"] = {str(c): int(np.sum(labels == c)) for c in classes}
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(summary_path, dumps(summary))
    log(
        f"tone: {'gray' if gray else 'colour kept'} (gray: {config.gray}; the {len(labels)} real "
        f"images read are {'all' if all_gray else 'not all'} gray)"
        + ("; each class's histogram matched" if config.match_histogram else "")
    )
    return summary


class ToneStage:
    """Tones the images of the rows that are ok (schema in the module docstring)."""

    name = "tone"

    def __init__(self, gray: bool, histograms: dict[str, list[list[int]]] | None = None):
        self.gray = bool(gray)
        self.histograms = histograms or {}

    @staticmethod
    def spec(config, shards_dir: Path) -> Stage | None:
        """The runner's stage for an AugmentConfig, or None when tone is off. Its decision and
        histograms must have been prepared into the output folder's tone/ (see `prepare`)."""
        if not config.tone.enabled:
            return None
        summary = json.loads((shards_dir.parent / "tone" / "tone.json").read_text())
        kwargs = ToneStage.arguments(summary)
        return Stage(ToneStage.name, ToneStage, kwargs, config.tone.resources)

    @staticmethod
    def arguments(summary: dict) -> dict:
        """The stage's arguments from a run's tone/tone.json (KeyError when it is not one)."""
        return {"gray": summary["gray"], "histograms": summary.get("histograms")}

    def tone(self, images: np.ndarray, classes: np.ndarray) -> np.ndarray:
        """(N, H, W, 3) uint8 images of `classes` (N,) toned: made gray when the run's images
        were, each matched to its class's histogram where the run has one."""
        out = to_gray(images) if self.gray else np.array(images, copy=True)
        for i, cls in enumerate(classes):
            hist = self.histograms.get(str(int(cls)))
            if hist is not None:
                out[i : i + 1] = match_to(out[i : i + 1], hist)
        return out

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = np.asarray(batch["ok"], bool)
        if not (self.gray or self.histograms) or not ok.any():
            return batch
        images = np.array(batch["image"], copy=True)
        meta = list(batch["meta"])
        rows = np.flatnonzero(ok)
        images[rows] = self.tone(images[rows], np.asarray(batch["cls"])[rows])
        for i in rows:
            hist = self.histograms.get(str(int(batch["cls"][i])))
            sample = json.loads(str(meta[i]))
            sample["tone"] = {"gray": self.gray, "histogram": "class" if hist else None}
            meta[i] = json.dumps(sample, sort_keys=True, ensure_ascii=False)
        return {**batch, "image": images, "meta": np.asarray(meta)}
