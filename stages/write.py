"""Write: one finished shard -> its tar, then its stats file (the done-marker), in the output folder."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.images import encode_png
from pipeline.shards import write_shard


@dataclass(frozen=True)
class ShardConfig:
    samples_per_shard: int = 32  # fixed: shard i always holds the same samples, whatever resumes


class WriteStage:
    """batch {key, image (N,H,W,3) uint8, ok, cls (int), meta (JSON str), shard (int, all equal)}
    -> PNG-encodes the images that are ok, writes `shards/NNNNN.tar` and `NNNNN_stats.json`;
    returns {shard, samples, skipped (JSON str)}."""

    def __init__(self, shards_dir: str):
        self.shards_dir = Path(shards_dir)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        shard = int(batch["shard"][0])
        samples, skipped = [], Counter()
        for key, image, ok, cls, meta in zip(
            batch["key"], batch["image"], batch["ok"], batch["cls"], batch["meta"]
        ):
            if not ok:
                skipped["generation_failed"] += 1
                continue
            samples.append(
                {
                    "__key__": str(key),
                    "png": encode_png(image),
                    "cls": str(int(cls)).encode(),
                    "json": str(meta).encode(),
                }
            )
        classes = Counter(int(c) for c, ok in zip(batch["cls"], batch["ok"]) if ok)
        stats = {
            "shard": shard,
            "samples": len(samples),
            "planned": int(len(batch["key"])),
            "skipped": dict(sorted(skipped.items())),
            "per_class": {str(k): v for k, v in sorted(classes.items())},
        }
        write_shard(self.shards_dir, shard, samples, stats)
        return {
            "shard": np.asarray([shard]),
            "samples": np.asarray([len(samples)]),
            "skipped": np.asarray([json.dumps(stats["skipped"])]),
        }
