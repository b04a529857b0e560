"""The shard writer: plain, deterministic tar writing with a done-marker written last. No Ray."""

from __future__ import annotations

import hashlib
import io
import json
import os
import secrets
import tarfile
import time
from pathlib import Path

TAR_MTIME = 0  # fixed, so the same samples give byte-identical tars on every run
MEMBER_ORDER = ("png", "cls", "json")  # webdataset groups consecutive members sharing a key


def shard_name(index: int) -> str:
    return f"{index:05d}.tar"


def stats_name(index: int) -> str:
    return f"{index:05d}_stats.json"


TMP_SUFFIX = ".tmp"


def temp_name(path: Path) -> Path:
    """A hidden temporary sibling of `path` that no other process or call shares:
    `.<name>.<pid>-<random>.tmp`."""
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}{TMP_SUFFIX}")


def atomic_write(path: Path, data: bytes) -> None:
    """Write to a temporary sibling, fsync, then rename: readers see the old file or the whole new one.
    On any failure (a full disk, an interrupt) the temporary file is removed.

    TAILSEED_SLOW_WRITE_S (fault injection for the kill-and-resume test) pauses half-way through
    each file, so a test can kill the process while a shard is half written.
    """
    tmp = temp_name(path)
    pause = float(os.environ.get("TAILSEED_SLOW_WRITE_S", "0"))
    try:
        with open(tmp, "wb") as fh:
            if pause > 0:
                fh.write(data[: len(data) // 2])
                fh.flush()
                time.sleep(pause)
                data = data[len(data) // 2 :]
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.filename is None:
            raise OSError(exc.errno, exc.strerror, str(path)) from exc  # say which file
        raise


def dumps(obj) -> bytes:
    """Canonical JSON bytes (sorted keys), so equal content is equal bytes."""
    return (json.dumps(obj, sort_keys=True, indent=1, ensure_ascii=False) + "\n").encode()


def tar_bytes(samples: list[dict[str, bytes]]) -> bytes:
    """Samples ({"__key__": str, "png": ..., "cls": ..., "json": ...}) -> tar bytes, members in
    sample order and MEMBER_ORDER, with fixed mtime, owner and mode."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for sample in samples:
            key = sample["__key__"]
            if "." in key or "/" in key:
                raise ValueError(f"sample key {key!r} contains a dot or slash")
            for ext in MEMBER_ORDER:
                if ext not in sample:
                    continue
                payload = sample[ext]
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                info.mtime = TAR_MTIME
                info.mode = 0o644
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                tar.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


def write_shard(shards_dir: Path, index: int, samples: list[dict[str, bytes]], stats: dict) -> None:
    """Write shard `index` and then its stats file, each atomically; the stats file marks it done
    and records what the tar must be (size, sha256, keys), so that done can be verified."""
    shards_dir.mkdir(parents=True, exist_ok=True)
    data = tar_bytes(samples)
    record = {
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "keys": [s["__key__"] for s in samples],
    }
    atomic_write(shards_dir / shard_name(index), data)
    atomic_write(shards_dir / stats_name(index), dumps({**stats, "tar": record}))


def shard_status(shards_dir: Path, index: int) -> tuple[bool, str]:
    """(done, why not): a shard is done only when its stats file reads, its tar exists and the
    tar's size and sha256 are those the stats file recorded when it was written."""
    stats_path, tar_path = shards_dir / stats_name(index), shards_dir / shard_name(index)
    if not stats_path.is_file():
        return False, "not written yet"
    try:
        record = json.loads(stats_path.read_text())["tar"]
        size, digest = int(record["bytes"]), str(record["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        return False, f"{stats_path.name} is unreadable or incomplete"
    if not tar_path.is_file():
        return False, f"{tar_path.name} is missing"
    if tar_path.stat().st_size != size:
        return False, f"{tar_path.name} has {tar_path.stat().st_size} bytes, its stats say {size}"
    sha = hashlib.sha256()
    with open(tar_path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            sha.update(block)
    if sha.hexdigest() != digest:
        return False, f"{tar_path.name} differs from what was written (sha256)"
    return True, ""


def shard_done(shards_dir: Path, index: int) -> bool:
    return shard_status(shards_dir, index)[0]


def read_stats(shards_dir: Path, index: int) -> dict:
    return json.loads((shards_dir / stats_name(index)).read_text())


def write_index(shards_dir: Path, num_shards: int) -> dict:
    """A wids-style index of the done shards: file names (relative) and sample counts."""
    shardlist = []
    for i in range(num_shards):
        if shard_done(shards_dir, i):
            stats = read_stats(shards_dir, i)
            shardlist.append(
                {
                    "url": shard_name(i),
                    "nsamples": int(stats["samples"]),
                    "filesize": int(stats["tar"]["bytes"]),
                }
            )
    index = {
        "__kind__": "wids-shard-index-v1",
        "wids_version": 1,
        "name": "tailseed",
        "shardlist": shardlist,
    }
    atomic_write(shards_dir / "index.json", dumps(index))
    return index
