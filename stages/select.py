"""Select: find the rare classes, set their quotas, and decode their few-shot source images."""

from __future__ import annotations

import string
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from tailseed.pipeline.datasets import Listing, read_bytes
from tailseed.pipeline.errors import UserError
from tailseed.pipeline.images import SkipSample, decode_image


@dataclass(frozen=True)
class SelectConfig:
    rare_below: int = 20  # a class with fewer listed images than this is rare
    # explicit rare classes (overrides rare_below): class names, or the label values of a dataset
    # with integer labels (3 or "3")
    classes: list[str | int] = field(default_factory=list)
    max_sources: int = 10  # few-shot images inverted per class (the first valid ones by key)
    quota_mode: str = (
        "fill_to"  # fill_to: bring each rare class up to `quota` images; add: add `quota`
    )
    quota: int = 50
    prompt_template: str = "a photo of a {}"
    prompt_overrides: dict[str, str] = field(default_factory=dict)  # class name -> its prompt
    min_side: int = 8  # source images with a shorter side are skipped as too_small

    def validate(self, where: str) -> None:
        if self.quota_mode not in ("fill_to", "add"):
            raise UserError(f"{where}.quota_mode: {self.quota_mode!r}; use fill_to or add")
        if self.quota < 0 or self.max_sources < 2:
            raise UserError(f"{where}: quota must be >= 0 and max_sources >= 2")
        try:
            parsed = list(string.Formatter().parse(self.prompt_template))
        except ValueError:
            parsed = []  # unbalanced braces
        fields = [f for _, f, _, _ in parsed if f is not None]
        if fields != [""]:
            raise UserError(
                f"{where}.prompt_template: {self.prompt_template!r} must have exactly one {{}} "
                f"(the class name) and no other {{...}} field"
            )


@dataclass
class ClassPlan:
    """One rare class: what it has, what it gets, and the decoded images its seeds come from."""

    class_index: int
    class_name: str
    prompt: str
    real_count: int
    to_generate: int
    source_keys: list[str]
    source_images: np.ndarray  # (S, H, W, 3) uint8 at the model's resolution
    skipped: Counter = field(default_factory=Counter)


def prompt_for(name: str, config: SelectConfig) -> str:
    return config.prompt_overrides.get(name, config.prompt_template.format(name))


def rare_classes(listing: Listing, config: SelectConfig) -> list[int]:
    counts = listing.counts()
    if config.classes:
        # a class by its name, or by the dataset's own label where dataset.class_names names it
        by_name = {listing.label_of(i): i for i in listing.classes}
        by_name.update({name: i for i, name in listing.classes.items()})
        wanted = [str(c) for c in config.classes]
        missing = [c for c in wanted if c not in by_name]
        if missing:
            raise UserError(
                f"select.classes: {missing[0]!r} is not a class of the dataset "
                f"(classes: {', '.join(sorted(listing.classes.values()))})"
            )
        return sorted({by_name[c] for c in wanted})
    return sorted(c for c, n in counts.items() if n < config.rare_below)


def quota_for(real: int, config: SelectConfig) -> int:
    return max(0, config.quota - real) if config.quota_mode == "fill_to" else config.quota


def select(
    listing: Listing, config: SelectConfig, image_size: int, image_column: str = "image"
) -> tuple[list[ClassPlan], dict[str, str]]:
    """Plans for the rare classes, and the rare classes left out with the reason why.

    Source images are decoded here, in key order, until `max_sources` valid ones are found; bad
    files are skipped and counted by reason. A class needs at least two valid images to walk
    between: an explicitly named class with fewer is an error, an automatically found one is
    left out and reported.
    """
    plans, left_out = [], {}
    counts = listing.counts()
    by_class: dict[int, list] = {}
    for rec in sorted(listing.records, key=lambda r: r.key):
        by_class.setdefault(rec.class_index, []).append(rec)
    for c in rare_classes(listing, config):
        name = listing.classes[c]
        keys, images, skipped = [], [], Counter()
        for rec in by_class.get(c, []):
            if len(keys) == config.max_sources:
                break
            try:
                images.append(
                    decode_image(read_bytes(rec.origin, image_column), image_size, config.min_side)
                )
                keys.append(rec.key)
            except SkipSample as skip:
                skipped[skip.reason] += 1
            except OSError:
                skipped["unreadable"] += 1
        quota = quota_for(counts[c], config)
        if len(keys) < 2:
            reason = f"{len(keys)} usable image(s); at least 2 are needed to walk between seeds"
            if config.classes:
                raise UserError(f"select.classes: class {name!r} has {reason}")
            left_out[name] = reason
            continue
        if quota == 0:
            left_out[name] = f"already has {counts[c]} images (quota {config.quota})"
            continue
        plans.append(
            ClassPlan(
                c, name, prompt_for(name, config), counts[c], quota, keys, np.stack(images), skipped
            )
        )
    return plans, left_out
