"""Listing a user's labelled dataset (ImageFolder, WebDataset tars, Parquet) without decoding images.

A listing is metadata only: one `Record` per image with its class and where its bytes live, plus
counts of what was skipped and why. Bytes are read later, only for the images that are used.
Nothing from a dataset is ever unpickled or executed: tar members other than images and
`.cls`/`.json`/`.txt` labels are counted and ignored.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tailseed.pipeline.errors import UserError
from tailseed.pipeline.images import IMAGE_EXTENSIONS
from tailseed.pipeline.seed_table import sanitize

LABEL_EXTENSIONS = (".cls", ".json", ".txt")


@dataclass(frozen=True)
class Record:
    key: str  # [A-Za-z0-9_-], at most 100 characters, unique within the dataset
    class_index: int
    origin: str  # a file path, or "<tar path>#<member>", or "<parquet path>#<row>"


@dataclass
class Listing:
    format: str
    classes: dict[int, str]  # class index -> class name
    records: list[Record]
    skipped: Counter = field(default_factory=Counter)
    # class index -> the dataset's own label (folder name, label value), where class names were
    # given by dataset.class_names; empty when the names are the labels
    labels: dict[int, str] = field(default_factory=dict)

    def label_of(self, class_index: int) -> str:
        return self.labels.get(class_index, self.classes[class_index])

    def integer_labels(self) -> bool:
        """Whether the classes are named by bare integers (the labels of a .cls or Parquet
        dataset, or folders named 0, 1, ...): their prompts would be "a photo of a 3"."""
        return bool(self.classes) and all(n.lstrip("-").isdigit() for n in self.classes.values())

    def counts(self) -> dict[int, int]:
        counts = {c: 0 for c in self.classes}
        for r in self.records:
            counts[r.class_index] += 1
        return counts


def safe_key(text: str, salt: str, prefix: str = "") -> str:
    """A key made of `text` with unsafe characters replaced, plus a short hash of `salt` for uniqueness."""
    stem = sanitize(text)[:60]
    digest = hashlib.sha1(salt.encode("utf-8", "surrogateescape")).hexdigest()[:8]
    return f"{prefix}{stem}_{digest}"


def detect_format(path: Path) -> str:
    if path.is_file() and path.suffix == ".tar":
        return "webdataset"
    if path.is_file() and path.suffix == ".parquet":
        return "parquet"
    if path.is_dir():
        files = [p for p in path.iterdir() if p.is_file()]
        if any(p.suffix == ".tar" for p in files):
            return "webdataset"
        if any(p.suffix == ".parquet" for p in files):
            return "parquet"
        return "imagefolder"
    raise UserError(
        f"dataset.path {path}: no such file or folder; point it at an ImageFolder, WebDataset tars or Parquet"
    )


def list_imagefolder(root: Path) -> Listing:
    """root/<class name>/<image>: classes are the sorted folder names, as torchvision's ImageFolder."""
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise UserError(
            f"dataset.path {root}: no class folders found; expected <root>/<class name>/<image files>"
        )
    classes = {i: d.name for i, d in enumerate(class_dirs)}
    listing = Listing("imagefolder", classes, [])
    for index, folder in enumerate(class_dirs):
        for p in sorted(folder.rglob("*")):
            if not p.is_file():
                continue
            if p.suffix.lower() not in IMAGE_EXTENSIONS:
                listing.skipped["not_an_image"] += 1
                continue
            rel = p.relative_to(root).as_posix()
            listing.records.append(Record(safe_key(p.stem, rel, f"c{index}_"), index, str(p)))
    return listing


def _parse_label(ext: str, payload: bytes, label_key: str) -> int | str:
    text = payload.decode("utf-8").strip()
    if ext == ".json":
        value = json.loads(text)
        if not isinstance(value, dict) or label_key not in value:
            raise ValueError(f"no {label_key!r} key")
        value = value[label_key]
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise ValueError(f"{label_key!r} is neither an integer nor a class name")
        return value
    return int(text)


# A label member larger than this is skipped and counted, never read: labels are a few bytes, and
# a huge member (a 3 GiB `.json` in a 3 MB gzip tar) would otherwise be read whole into memory.
LABEL_MAX_BYTES = 1 << 20


def expand_pattern(text: str) -> list[Path]:
    """A brace pattern of tar files (`shapes-{000..002}.tar`, as webdataset writes them) -> the
    files, each of which must exist; a plain path -> itself."""
    if "{" not in text:
        return [Path(text)]
    from braceexpand import braceexpand

    paths = [Path(p) for p in braceexpand(text)]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise UserError(
            f"dataset.path {text}: {len(missing)} of its {len(paths)} files do not exist "
            f"(the first: {missing[0]})"
        )
    return paths


def list_webdataset(path: Path | list[Path], label_key: str) -> Listing:
    """Tars whose samples hold an image member and a `.cls` (integer) or `.json` label: one tar, a
    folder of tars, or a list of tars (an expanded brace pattern)."""
    if isinstance(path, list):
        tars = path
    else:
        tars = [path] if path.is_file() else sorted(path.glob("*.tar"))
    samples: dict[tuple[str, str], dict[str, tarfile.TarInfo | int | str]] = {}
    skipped: Counter = Counter()
    for tar_path in tars:
        try:
            tar = tarfile.open(tar_path)
        except (tarfile.TarError, OSError) as exc:
            raise UserError(
                f"dataset tar {tar_path}: cannot be read ({exc}); remove or repair it"
            ) from exc
        with tar:
            for member in tar:
                if not member.isfile():
                    continue
                base = member.name.rsplit("/", 1)[-1]
                if "." not in base:
                    skipped["ignored_member"] += 1
                    continue
                stem, ext = base.split(".", 1)
                ext = "." + ext.lower()
                key = (str(tar_path), member.name[: len(member.name) - len(base)] + stem)
                entry = samples.setdefault(key, {})
                if ext in IMAGE_EXTENSIONS:
                    if "image" in entry:  # a second image for one key would replace the first
                        skipped["duplicate_member"] += 1
                        continue
                    entry["image"] = member.name
                elif ext in LABEL_EXTENSIONS and ext != ".txt":
                    if member.size > LABEL_MAX_BYTES:
                        skipped["label_too_large"] += 1
                        continue
                    try:
                        entry["label"] = _parse_label(
                            ext, tar.extractfile(member).read(), label_key
                        )
                    except (ValueError, UnicodeDecodeError):
                        skipped["bad_label"] += 1
                else:
                    skipped["ignored_member"] += 1  # pickles, tensors, anything else: never decoded
    labelled = []
    for (tar_path, sample_key), entry in sorted(samples.items()):
        if "image" not in entry:
            skipped["no_image"] += 1
        elif "label" not in entry:
            skipped["no_label"] += 1
        else:
            labelled.append((tar_path, sample_key, entry["image"], entry["label"]))
    classes, index_of = class_map([lab for *_, lab in labelled], path)
    listing = Listing("webdataset", classes, [], skipped)
    for tar_path, sample_key, member, label in labelled:
        index = index_of(label)
        rec_key = safe_key(sample_key.rsplit("/", 1)[-1], f"{tar_path}#{sample_key}", f"c{index}_")
        listing.records.append(Record(rec_key, index, f"{tar_path}#{member}"))
    return listing


def _is_label(value) -> bool:
    """A usable label: a class name (str) or a class index (int, not bool)."""
    return isinstance(value, int | str) and not isinstance(value, bool)


def class_map(labels: list, path: Path) -> tuple[dict[int, str], Callable[[int | str], int]]:
    """The class map of a dataset's labels, and label -> class index.

    Class names: sorted, indexed 0.. (as an ImageFolder's folders). Integers: kept as they are,
    each named by its own digits. A dataset that mixes both is an error naming it.
    """
    names = sorted({lab for lab in labels if isinstance(lab, str)})
    ints = sorted({lab for lab in labels if isinstance(lab, int) and not isinstance(lab, bool)})
    if names and ints:
        raise UserError(f"dataset {path}: labels mix integers and class names; use one kind")
    if names:
        lookup = {n: i for i, n in enumerate(names)}
        return dict(enumerate(names)), lookup.__getitem__
    return {i: str(i) for i in ints}, int


def list_parquet(path: Path, label_column: str, image_column: str) -> Listing:
    """Parquet files with an image column (bytes, or a struct with `bytes`) and a label column."""
    import pyarrow.parquet as pq

    files = [path] if path.is_file() else sorted(path.glob("*.parquet"))
    rows = []
    for f in files:
        schema = pq.read_schema(f)
        for col in (label_column, image_column):
            if col not in schema.names:
                raise UserError(
                    f"dataset parquet {f}: no column {col!r} (columns: {', '.join(schema.names)}); "
                    f"set dataset.label_column / dataset.image_column"
                )
        labels = pq.read_table(f, columns=[label_column]).column(0).to_pylist()
        rows += [(str(f), i, lab) for i, lab in enumerate(labels)]
    skipped: Counter = Counter()
    classes, index_of = class_map([lab for *_, lab in rows if _is_label(lab)], path)
    listing = Listing("parquet", classes, [], skipped)
    for f, row, lab in rows:
        if not _is_label(lab):
            skipped["no_label"] += 1
            continue
        index = index_of(lab)
        listing.records.append(
            Record(
                safe_key(f"{Path(f).stem}_{row}", f"{f}#{row}", f"c{index}_"), index, f"{f}#{row}"
            )
        )
    return listing


def list_dataset(
    path: Path,
    fmt: str = "auto",
    label_key: str = "label",
    label_column: str = "label",
    image_column: str = "image",
) -> Listing:
    """List any supported dataset; `fmt` is auto, imagefolder, webdataset or parquet."""
    if not path.exists():
        raise UserError(f"dataset.path {path}: no such file or folder")
    fmt = detect_format(path) if fmt == "auto" else fmt
    if fmt == "imagefolder":
        return list_imagefolder(path)
    if fmt == "webdataset":
        return list_webdataset(path, label_key)
    if fmt == "parquet":
        return list_parquet(path, label_column, image_column)
    raise UserError(f"dataset.format {fmt!r}: use auto, imagefolder, webdataset or parquet")


def read_bytes(origin: str, image_column: str = "image") -> bytes:
    """The raw bytes of one listed image."""
    if "#" in origin:
        container, _, inner = origin.rpartition("#")
        if container.endswith(".tar"):
            with tarfile.open(container) as tar:
                return tar.extractfile(inner).read()
        if container.endswith(".parquet"):
            return _parquet_cell(container, int(inner), image_column)
    return Path(origin).read_bytes()


def _parquet_cell(path: str, row: int, column: str) -> bytes:
    """One image cell of a Parquet file, reading only the row group that holds it (bytes, or a
    struct with `bytes`); a cell of another kind (text, a number) is a counted skip."""
    import pyarrow.parquet as pq

    from tailseed.pipeline.images import SkipSample

    parquet = pq.ParquetFile(path)
    start = 0
    for group in range(parquet.num_row_groups):
        rows = parquet.metadata.row_group(group).num_rows
        if row < start + rows:
            value = parquet.read_row_group(group, columns=[column]).column(0)[row - start].as_py()
            break
        start += rows
    else:
        raise SkipSample("missing_row", f"{path} has no row {row}")
    if isinstance(value, dict):
        value = value.get("bytes")
    if value is None:
        return b""
    if not isinstance(value, bytes):
        raise SkipSample("not_image_bytes", f"column {column!r} holds {type(value).__name__}")
    return value


def read_class_names(value: dict | str, config_dir: Path | None = None) -> dict[str, str]:
    """dataset.class_names as {label text: class name}: a mapping, or a file (.json or .yaml
    mapping; .txt: one name per line, line i naming label i)."""
    if isinstance(value, dict):
        names = {str(k): v for k, v in value.items()}
    else:
        import yaml

        path = Path(value)
        if not path.is_file():
            raise UserError(f"dataset.class_names {path}: no such file")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"dataset.class_names {path}: unreadable ({exc})") from None
        if path.suffix == ".txt":
            names = {str(i): line.strip() for i, line in enumerate(text.splitlines())}
        else:
            try:
                loaded = yaml.safe_load(text)  # JSON is YAML
            except yaml.YAMLError as exc:
                raise UserError(f"dataset.class_names {path}: not JSON or YAML ({exc})") from None
            if not isinstance(loaded, dict):
                raise UserError(
                    f"dataset.class_names {path}: expected a mapping of label -> name; or a .txt "
                    f"file with one name per line"
                )
            names = {str(k): v for k, v in loaded.items()}
    bad = [k for k, v in names.items() if not isinstance(v, str) or not v.strip()]
    if bad:
        raise UserError(f"dataset.class_names: label {bad[0]!r} has no name (a non-empty string)")
    return {k: v.strip() for k, v in names.items()}


def name_classes(listing: Listing, names: dict[str, str]) -> Listing:
    """The listing with its classes named by `names` (label text -> name); every label of the
    dataset needs a name, and two labels may not share one."""
    missing = [lab for lab in listing.classes.values() if lab not in names]
    if missing:
        raise UserError(
            f"dataset.class_names: no name for label {missing[0]!r} ({len(missing)} of the "
            f"dataset's {len(listing.classes)} labels have none); name every label"
        )
    renamed = {c: names[lab] for c, lab in listing.classes.items()}
    taken: dict[str, str] = {}
    for c, name in renamed.items():
        if name in taken:
            raise UserError(
                f"dataset.class_names: labels {taken[name]!r} and {listing.classes[c]!r} are both "
                f"named {name!r}; give each class its own name"
            )
        taken[name] = listing.classes[c]
    return Listing(listing.format, renamed, listing.records, listing.skipped, dict(listing.classes))
