"""The seeds and walks Parquet tables of DESIGN.md's "Contracts": schemas, keys, writing and reading.

A run writes a class's walks in parts of bounded rows (walks/class_NNNN/part_NNNNN.parquet), each
a walks table of its own. A seeds row is one inverted image: its key, class, prompt, the seed as a flat float32 list with its
shape, the sampler settings that regenerate it, the model and the reconstruction measures. A walks
row is the same for a generated sample's seed, plus the source keys, weights and walk method.
Writing is deterministic: the same rows give the same bytes (fixed schema, no timestamps, no pandas
metadata, one row group, fixed compression).
"""

from __future__ import annotations

import errno
import json
import os
import re
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tailseed.pipeline.config import stable_hash
from tailseed.pipeline.errors import UserError

KEY_MAX = 100
_KEY_RE = re.compile(r"[A-Za-z0-9_-]{1,100}")
_NOT_KEY = re.compile(r"[^A-Za-z0-9_-]")

SEEDS_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("class_index", pa.int64()),  # null where the image has no class
        pa.field("class_name", pa.string()),
        pa.field("prompt", pa.string(), nullable=False),
        pa.field("seed", pa.list_(pa.float32()), nullable=False),  # flat, C-order
        pa.field("shape", pa.list_(pa.int64()), nullable=False),  # e.g. [4, 8, 8]
        pa.field("guidance_scale", pa.float64(), nullable=False),
        pa.field("num_inference_steps", pa.int64(), nullable=False),
        pa.field("model", pa.string(), nullable=False),  # as given: a relative path or a hub id
        pa.field("model_hash", pa.string(), nullable=False),
        pa.field("recon_psnr", pa.float64()),  # dB, regenerated vs original image
        pa.field("recon_latent_rmse", pa.float64()),  # regenerated vs unadjusted VAE latent
        pa.field("nfe", pa.int64()),  # UNet evaluations spent on the seed (DESIGN's NFE)
    ],
    metadata={"tailseed.table": "seeds/1"},
)
WALKS_SCHEMA = pa.schema(
    list(SEEDS_SCHEMA)
    + [
        pa.field("sources", pa.list_(pa.string()), nullable=False),  # keys of the source seeds
        pa.field("weights", pa.list_(pa.float64()), nullable=False),  # one per source
        pa.field("method", pa.string(), nullable=False),  # e.g. "slerp", "nao_path", "centroid"
    ],
    metadata={"tailseed.table": "walks/1"},
)
_OPTIONAL = {"class_index", "class_name", "recon_psnr", "recon_latent_rmse", "nfe"}


def sanitize(text: str) -> str:
    """`text` with every character outside [A-Za-z0-9_-] replaced by "_" (the one key alphabet)."""
    return _NOT_KEY.sub("_", text)


def make_key(stem: str) -> str:
    """A file stem as a key: every character outside [A-Za-z0-9_-] becomes "_"; at most 100 chars."""
    if not stem:
        raise UserError("cannot make a key from an empty file name")
    return sanitize(stem)[:KEY_MAX]


def is_key(key: str) -> bool:
    return isinstance(key, str) and _KEY_RE.fullmatch(key) is not None


def check_keys(keys: Sequence[str], where: str = "rows") -> None:
    """Keys must match [A-Za-z0-9_-]{1,100} and be unique; otherwise a UserError naming them."""
    bad = [k for k in keys if not is_key(k)]
    if bad:
        raise UserError(f"{where}: invalid key {bad[0]!r}: keys are 1-100 of [A-Za-z0-9_-]")
    dup = sorted(k for k, n in Counter(keys).items() if n > 1)
    if dup:
        raise UserError(f"{where}: duplicate key(s) {', '.join(dup[:5])}; keys must be unique")


def noise_seed(key: str, salt) -> int:
    """The seed of an image's adjustment noise, from its key and a salt (the config hash in a run,
    `--noise-seed` on the command line), so that it does not depend on batch order or size."""
    return int(stable_hash([key, salt], 8), 16)


def seed_row(
    key: str,
    class_index: int | None,
    class_name: str | None,
    prompt: str,
    inverted: dict,
    guidance_scale: float,
    num_inference_steps: int,
    model: str,
    model_hash: str,
) -> dict:
    """One seeds row (SEEDS_SCHEMA) from an inversion result: `inverted` holds the image's seed
    (C, h, w) float32 and its measures (recon_psnr, recon_latent_rmse, nfe), as `Inverter.invert`
    returns them per image; guidance and steps are those the seed solves for."""
    return {
        "key": key,
        "class_index": class_index,
        "class_name": class_name,
        "prompt": prompt,
        "seed": inverted["seed"],
        "guidance_scale": float(guidance_scale),
        "num_inference_steps": int(num_inference_steps),
        "model": model,
        "model_hash": model_hash,
        "recon_psnr": float(inverted["recon_psnr"]),
        "recon_latent_rmse": float(inverted["recon_latent_rmse"]),
        "nfe": int(inverted["nfe"]),
    }


def provenance(row: dict, inversion: dict, config_hash: str, knobs: dict) -> str:
    """A generated sample's `<key>.json`: a walks row's provenance (without the seed itself), the
    inversion settings, the knobs that made it beyond its row (e.g. the seed perturbation angle)
    and the config hash, as canonical JSON. The walk position is in `weights`, the generation
    guidance in `guidance_scale`."""
    return json.dumps(
        {
            "key": row["key"],
            "class_index": int(row["class_index"]),
            "class_name": row["class_name"],
            "prompt": row["prompt"],
            "sources": list(row["sources"]),
            "weights": [float(w) for w in row["weights"]],
            "method": row["method"],
            "guidance_scale": float(row["guidance_scale"]),
            "num_inference_steps": int(row["num_inference_steps"]),
            "model": row["model"],
            "model_hash": row["model_hash"],
            "inversion": inversion,
            **knobs,
            "config_hash": config_hash,
        },
        sort_keys=True,
        ensure_ascii=False,
    )


def _column(rows: Sequence[dict], name: str) -> list:
    if name in _OPTIONAL:
        return [r.get(name) for r in rows]
    missing = [i for i, r in enumerate(rows) if name not in r]
    if missing:
        raise ValueError(f"row {missing[0]}: missing column {name!r}")
    return [r[name] for r in rows]


def _finite_or_none(x) -> float | None:
    return None if x is None or not np.isfinite(x) else float(x)


def _table(rows: Sequence[dict], schema: pa.Schema) -> pa.Table:
    """Rows (dicts; `seed` any array, flattened; `shape` taken from it if absent) -> a Table."""
    check_keys(_column(rows, "key"))
    cols: dict[str, list] = {}
    for field in schema:
        if field.name == "seed":
            cols["seed"] = [np.asarray(r["seed"], dtype=np.float32).ravel() for r in rows]
        elif field.name == "shape":
            cols["shape"] = [[int(n) for n in r.get("shape", np.shape(r["seed"]))] for r in rows]
        elif field.name in ("recon_psnr", "recon_latent_rmse"):
            cols[field.name] = [_finite_or_none(x) for x in _column(rows, field.name)]
        else:
            cols[field.name] = _column(rows, field.name)
    for seed, shape in zip(cols["seed"], cols["shape"]):
        if int(np.prod(shape)) != seed.size:
            raise ValueError(f"seed of {seed.size} values does not have shape {shape}")
    arrays = [pa.array(cols[f.name], type=f.type) for f in schema]
    return pa.Table.from_arrays(arrays, schema=schema)


def _write(table: pa.Table, path: str | Path) -> None:
    """Write to a temporary sibling and rename: a killed write leaves no half file behind."""
    from tailseed.pipeline.shards import temp_name

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    try:
        pq.write_table(
            table,
            str(tmp),
            compression="zstd",
            row_group_size=max(1, table.num_rows),
            write_statistics=False,
            store_schema=True,
        )
        pause = float(os.environ.get("TAILSEED_SLOW_WRITE_S", "0"))
        if pause > 0:  # fault injection: a test kills the process while the file is not renamed
            time.sleep(pause)
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and (exc.errno is None or exc.filename is None):
            code = exc.errno or (errno.ENOSPC if "No space left" in str(exc) else None)
            raise OSError(code, exc.strerror or str(exc), str(path)) from exc  # say which file
        raise


def _read(
    path: str | Path, schema: pa.Schema, what: str, start: int = 0, stop: int | None = None
) -> list[dict]:
    try:
        table = pq.read_table(str(path))
    except (OSError, pa.ArrowInvalid) as exc:
        raise UserError(f"{what} {path}: not a readable Parquet file ({exc})") from exc
    missing = [f.name for f in schema if f.name not in table.column_names]
    if missing:
        raise UserError(f"{what} {path}: missing column(s) {', '.join(missing)}")
    stop = table.num_rows if stop is None else min(stop, table.num_rows)
    table = table.slice(start, max(0, stop - start))
    rows = table.select([f.name for f in schema]).to_pylist()
    check_keys([r["key"] for r in rows], where=f"{what} {path}")
    for r in rows:
        _check_row(r, f"{what} {path}: row {r['key']!r}")
        r["shape"] = tuple(r["shape"])
        r["seed"] = np.asarray(r["seed"], dtype=np.float32).reshape(r["shape"])
    return rows


def _check_row(r: dict, where: str) -> None:
    """A row that would generate garbage (or crash) is refused when read, naming the row."""
    seed, shape = r["seed"], r["shape"]
    if not shape or any(n < 1 for n in shape) or int(np.prod(shape)) != len(seed):
        raise UserError(f"{where}: a seed of {len(seed)} values cannot have shape {list(shape)}")
    if not np.isfinite(np.asarray(seed, dtype=np.float32)).all():
        raise UserError(f"{where}: the seed has NaN or infinite values")
    if r["num_inference_steps"] < 1:
        raise UserError(f"{where}: num_inference_steps is {r['num_inference_steps']}; at least 1")
    if not np.isfinite(r["guidance_scale"]):
        raise UserError(f"{where}: guidance_scale is {r['guidance_scale']}; it must be finite")


def seeds_table(rows: Iterable[dict]) -> pa.Table:
    return _table(list(rows), SEEDS_SCHEMA)


def walks_table(rows: Iterable[dict]) -> pa.Table:
    return _table(list(rows), WALKS_SCHEMA)


def write_seeds(path: str | Path, rows: Iterable[dict]) -> None:
    """Write seeds rows (dicts with SEEDS_SCHEMA's columns; the optional ones may be absent)."""
    _write(seeds_table(rows), path)


def write_walks(path: str | Path, rows: Iterable[dict]) -> None:
    """Write walks rows (SEEDS_SCHEMA's columns plus sources, weights, method)."""
    _write(walks_table(rows), path)


def read_seeds(path: str | Path) -> list[dict]:
    """Rows of a seeds Parquet file as dicts; `seed` is a float32 array of the row's `shape`.

    A walks file reads as seeds too (its extra columns are dropped), so `generate` takes either.
    """
    return _read(path, SEEDS_SCHEMA, "seeds file")


def read_walks(path: str | Path, start: int = 0, stop: int | None = None) -> list[dict]:
    """Rows of a walks Parquet file, as `read_seeds` plus sources, weights, method; rows start ..
    stop - 1 only, when given (the others are never converted)."""
    return _read(path, WALKS_SCHEMA, "walks file", start, stop)


def parquet_files(path: str | Path) -> list[Path]:
    """A Parquet file, or the Parquet files of a folder in name order (a run's walks of one class,
    walks/class_NNNN/, are its parts part_NNNNN.parquet)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.parquet"))
        if not files:
            raise UserError(f"{path}: a folder without Parquet files")
        return files
    if not path.is_file():
        raise UserError(f"seeds file {path}: no such file")
    return [path]
