"""Model loading: the one place that calls `from_pretrained`, with errors a person can act on."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from tailseed.pipeline.errors import UserError
from tailseed.pipeline.inversion import check_epsilon_prediction

REPO_ROOT = Path(__file__).resolve().parents[1]
EMBEDDED_MODEL = REPO_ROOT / "models" / "tiny-digits"
CARD_NAME = "tailseed_card.json"
CACHE_DIR_ENV = "TAILSEED_CACHE_DIR"  # folder of tailseed's caches; default ~/.cache/tailseed
HASH_CACHE_NAME = "model_hashes.json"


class ModelError(UserError):
    """A model that cannot be used, with a one-line message saying what was expected and where."""


@dataclass(frozen=True)
class ModelSpec:
    """Which checkpoint to load and how. `path` is a local folder or a hub id."""

    path: str = "models/tiny-digits"
    revision: str | None = None  # only a revision the user pins; never invented
    dtype: str = "float32"  # float16 on CUDA for real checkpoints
    device: str = "auto"  # auto: cuda if available, else cpu


def _require_epsilon(scheduler_config, spec: ModelSpec) -> None:
    try:
        check_epsilon_prediction(scheduler_config, f"model {spec.path!r}")
    except ValueError as exc:
        raise ModelError(str(exc)) from None


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """float16/bfloat16 only on CUDA: CPU half-precision convolutions are slow or missing."""
    table = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if dtype not in table:
        raise ModelError(f"model.dtype: unknown dtype {dtype!r}; use one of {sorted(table)}")
    return table[dtype] if device.type == "cuda" else torch.float32


def _local_folder(path: str) -> Path | None:
    """The folder `path` names (relative to the working directory or the repo), or None for a hub id."""
    for candidate in (Path(path), REPO_ROOT / path):
        if candidate.exists():
            return candidate
    first = Path(path).parts[0] if Path(path).parts else ""
    looks_local = (
        path.startswith((".", "/", "~"))
        or path.count("/") != 1
        or Path(path).suffix
        or any((base / first).is_dir() for base in (Path("."), REPO_ROOT))  # models/nothere
    )
    if looks_local:
        raise ModelError(
            f"model {path!r}: no such folder. Expected a diffusers StableDiffusionPipeline folder "
            f"(with model_index.json) or a hub id like 'owner/name'."
        )
    return None


def check_model_folder(folder: Path) -> None:
    """Refuse folders that are not a Stable-Diffusion-family diffusers pipeline."""
    index = folder / "model_index.json"
    if not folder.is_dir() or not index.is_file():
        raise ModelError(
            f"model folder {folder}: not a diffusers pipeline (no model_index.json). Expected the "
            f"output of StableDiffusionPipeline.save_pretrained."
        )
    try:
        components = json.loads(index.read_text())
    except json.JSONDecodeError as exc:
        raise ModelError(
            f"model folder {folder}: model_index.json is not valid JSON ({exc})"
        ) from exc
    missing = [
        c for c in ("unet", "vae", "text_encoder", "tokenizer", "scheduler") if c not in components
    ]
    if missing:
        raise ModelError(
            f"model folder {folder}: model_index.json lacks {', '.join(missing)}; expected a "
            f"Stable-Diffusion-family pipeline (unet, vae, text_encoder, tokenizer, scheduler)."
        )


def _weight_files(folder: Path) -> list[Path]:
    """The .safetensors and .bin files under `folder`, sorted."""
    return sorted(
        p for p in folder.rglob("*") if p.suffix in (".safetensors", ".bin") and p.is_file()
    )


def _hash_files(folder: Path, files: list[Path]) -> str:
    """sha256 over the files' paths relative to `folder` and their bytes, in order; 16 hex."""
    digest = hashlib.sha256()
    for p in files:
        digest.update(str(p.relative_to(folder)).encode())
        with p.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def _fingerprint(folder: Path, files: list[Path]) -> list[list]:
    """Per file: relative path, resolved target, size and st_mtime_ns of the target (no reads)."""
    rows = []
    for p in files:
        target = p.resolve()  # hub cache snapshots are symlinks into blobs/
        st = target.stat()
        rows.append([str(p.relative_to(folder)), str(target), st.st_size, st.st_mtime_ns])
    return rows


def _hash_cache_file() -> Path | None:
    """$TAILSEED_CACHE_DIR/model_hashes.json, by default under ~/.cache/tailseed; None if no home."""
    try:
        folder = os.environ.get(CACHE_DIR_ENV) or Path("~/.cache/tailseed").expanduser()
    except RuntimeError:  # no home directory to expand ~ to
        return None
    return Path(folder) / HASH_CACHE_NAME


def _read_hash_cache(path: Path) -> dict:
    """The cache's entries by folder; {} if the file is missing, unreadable or not ours."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return {}
    if not isinstance(data, dict) or data.get("version") != 1:
        return {}
    entries = data.get("entries")
    return entries if isinstance(entries, dict) else {}


def _write_hash_cache(path: Path, entries: dict) -> None:
    """Replace the cache file atomically; a cache that cannot be written is skipped silently."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump({"version": 1, "entries": entries}, fh, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def model_hash(folder: Path) -> str:
    """sha256 over the weight files of a pipeline folder (names and bytes, in sorted order), 16 hex.

    Cached by the folder's resolved path in `_hash_cache_file()`: a hit needs the same fingerprint
    (each weight file's relative path, resolved target, size and mtime); anything else rehashes.
    """
    files = _weight_files(folder)
    fingerprint = _fingerprint(
        folder, files
    )  # taken before hashing: a file changed meanwhile misses
    key = str(folder.resolve())
    cache = _hash_cache_file()
    entries = _read_hash_cache(cache) if cache is not None else {}
    entry = entries.get(key)
    if (
        isinstance(entry, dict)
        and entry.get("files") == fingerprint
        and isinstance(entry.get("hash"), str)
    ):
        return entry["hash"]
    value = _hash_files(folder, files)
    if cache is not None:
        entries = {k: v for k, v in entries.items() if Path(k).is_dir()}  # forget deleted folders
        entries[key] = {"hash": value, "files": fingerprint}
        _write_hash_cache(cache, entries)
    return value


def read_card(folder: Path) -> dict:
    """The tailseed model card if the folder has one, else {}."""
    card = folder / CARD_NAME
    return json.loads(card.read_text()) if card.is_file() else {}


def cached_snapshot(repo_id: str, revision: str | None = None) -> Path | None:
    """The local Hugging Face cache's snapshot of a hub id at `revision` (never downloaded), or
    None when the cache does not hold it; each caller says what to do in its own words."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        return None


def resolve_folder(spec: ModelSpec) -> Path:
    """The checked pipeline folder of `spec`: a local folder, or the local Hugging Face cache's
    snapshot of a hub id (never downloaded)."""
    folder = _local_folder(spec.path)
    if folder is None:
        folder = cached_snapshot(spec.path, spec.revision)
        if folder is None:
            raise ModelError(
                f"model {spec.path!r}: not in the local Hugging Face cache. Download it on a machine "
                f"with network access (huggingface-cli download {spec.path}) or point model.path at "
                f"a local folder."
            )
    check_model_folder(folder)
    return folder


def _quiet_libraries() -> None:
    """diffusers' and transformers' progress bars ("Loading weights", "Loading pipeline
    components") are never shown: a command draws its own. Their logs are held at ERROR unless a
    caller raised them (`--verbose` sets INFO before any model is loaded)."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for library in (diffusers_logging, transformers_logging):
        library.disable_progress_bar()
        if library.get_verbosity() >= logging.WARNING:
            library.set_verbosity_error()


def load_pipeline(spec: ModelSpec, with_hash: bool = True):
    """Load a StableDiffusionPipeline on the spec's device and dtype; refuse v-prediction models.

    Returns (pipeline, info) where info has `model` (as given), `model_hash` (None unless
    `with_hash`: hashing reads every weight file, which model actors need not repeat), `folder`,
    `card`.
    """
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    device = resolve_device(spec.device)
    dtype = resolve_dtype(spec.dtype, device)
    folder = resolve_folder(spec)
    _quiet_libraries()
    try:
        with warnings.catch_warnings():
            # newer diffusers renames torch_dtype to dtype; older ones only know torch_dtype
            warnings.simplefilter("ignore", FutureWarning)
            pipe = StableDiffusionPipeline.from_pretrained(
                str(folder),
                torch_dtype=dtype,
                safety_checker=None,
                requires_safety_checker=False,
            )
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(
            f"model {spec.path!r}: could not be loaded as a StableDiffusionPipeline: {first}"
        ) from exc
    _require_epsilon(pipe.scheduler.config, spec)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    info = {
        "model": spec.path,
        "model_hash": model_hash(folder) if with_hash else None,
        "folder": str(folder),
        "card": read_card(folder),
    }
    return pipe, info


def describe_model(spec: ModelSpec) -> dict:
    """What the driver needs to know about a model without loading its weights.

    Checks the folder (or the local hub cache for a hub id) and refuses v-prediction before any
    work starts. Returns `model`, `folder`, `model_hash`, `image_size`, `latent_shape`, `card`.
    """
    folder = resolve_folder(spec)
    check_model_folder(folder)

    def config(name: str, file: str) -> dict:
        path = folder / name / file
        if not path.is_file():
            raise ModelError(f"model folder {folder}: missing {name}/{file}")
        return json.loads(path.read_text())

    scheduler = config("scheduler", "scheduler_config.json")
    _require_epsilon(scheduler, spec)
    unet = config("unet", "config.json")
    vae = config("vae", "config.json")
    factor = 2 ** (len(vae["block_out_channels"]) - 1)
    size = int(unet["sample_size"]) * factor
    return {
        "model": spec.path,
        "folder": str(folder),
        "model_hash": model_hash(folder),
        "image_size": size,
        "latent_shape": [int(unet["in_channels"]), size // factor, size // factor],
        "card": read_card(folder),
    }
