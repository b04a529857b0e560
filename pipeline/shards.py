"""The shard writer: plain, deterministic tar writing with a done-marker written last. No Ray."""

from __future__ import annotations

import io
import json
import os
import tarfile
import time
from pathlib import Path

TAR_MTIME = 0  # fixed, so the same samples give byte-identical tars on every run
MEMBER_ORDER = ("png", "cls", "json")  # webdataset groups consecutive members sharing a key


def shard_name(index: int) -> str:
    return f"{index:05d}.tar"


def stats_name(index: int) -> str:
    return f"{index:05d}_stats.json"


def atomic_write(path: Path, data: bytes) -> None:
    """Write to a temporary sibling, fsync, then rename: readers see the old file or the whole new one.

    TAILSEED_SLOW_WRITE_S (fault injection for the kill-and-resume test) pauses half-way through
    each file, so a test can kill the process while a shard is half written.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    pause = float(os.environ.get("TAILSEED_SLOW_WRITE_S", "0"))
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
    """Write shard `index` and then its stats file, each atomically; the stats file marks it done."""
    shards_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(shards_dir / shard_name(index), tar_bytes(samples))
    atomic_write(shards_dir / stats_name(index), dumps(stats))


def shard_done(shards_dir: Path, index: int) -> bool:
    return (shards_dir / stats_name(index)).is_file() and (shards_dir / shard_name(index)).is_file()


def read_stats(shards_dir: Path, index: int) -> dict:
    return json.loads((shards_dir / stats_name(index)).read_text())


def write_index(shards_dir: Path, num_shards: int) -> dict:
    """A wids-style index of the done shards: file names (relative) and sample counts."""
    shardlist = []
    for i in range(num_shards):
        if shard_done(shards_dir, i):
            shardlist.append(
                {"url": shard_name(i), "nsamples": int(read_stats(shards_dir, i)["samples"])}
            )
    index = {
        "__kind__": "wids-shard-index-v1",
        "wids_version": 1,
        "name": "tailseed",
        "shardlist": shardlist,
    }
    atomic_write(shards_dir / "index.json", dumps(index))
    return index
