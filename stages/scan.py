"""Scan: list a labelled dataset and count images per class (metadata only, no decoding)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tailseed.pipeline.config import hashed_unless
from tailseed.pipeline.datasets import Listing, list_dataset, name_classes, read_class_names
from tailseed.pipeline.errors import UserError

EMBEDDED = "embedded-digits"


@dataclass(frozen=True)
class ScanConfig:
    path: str = "data/digits/user"  # an ImageFolder, a folder of WebDataset tars, or Parquet
    format: str = "auto"  # auto | imagefolder | webdataset | parquet
    label_key: str = "label"  # WebDataset .json members: the key holding the label
    label_column: str = "label"  # Parquet: the label column (integers or class names)
    image_column: str = "image"  # Parquet: image bytes (or a struct with `bytes`)
    materialize: str = ""  # "embedded-digits": write the embedded dataset to `path` if missing
    # names for the dataset's labels, used in prompts and in the output: a mapping {label: name}
    # (e.g. {3: three}), or a file (.json / .yaml mapping, or .txt with one name per line, line i
    # naming label i). Empty: the labels are the names.
    class_names: dict[int | str, str] | str = field(
        default_factory=dict, metadata=hashed_unless({})
    )

    def validate(self, where: str) -> None:
        if self.materialize not in ("", EMBEDDED):
            raise UserError(f"{where}.materialize: {self.materialize!r}; use '' or '{EMBEDDED}'")


def scan(config: ScanConfig) -> Listing:
    """The dataset's classes, images per class and what was skipped while listing."""
    listing = _list(config)
    if config.class_names:
        return name_classes(listing, read_class_names(config.class_names))
    return listing


def _list(config: ScanConfig) -> Listing:
    if "{" in config.path:  # a brace pattern of tar files
        from tailseed.pipeline.datasets import expand_pattern, list_webdataset

        return list_webdataset(expand_pattern(config.path), config.label_key)
    path = Path(config.path)
    if not path.exists():
        raise UserError(
            f"dataset.path {path}: no such file or folder. Point dataset.path at an ImageFolder "
            f"(<root>/<class name>/<images>), a folder of WebDataset tars, or Parquet files."
        )
    return list_dataset(
        path, config.format, config.label_key, config.label_column, config.image_column
    )
