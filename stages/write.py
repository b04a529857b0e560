"""Write: one finished shard -> its tar, then its stats file (the done-marker), in the output folder.

Unit in:  shard (N,) int64 (all equal), key (N,) str, image (N, H, W, 3) uint8, ok (N,) bool,
          cls (N,) int64, meta (N,) str, optional skip_reason (N,) str (why a row that is not ok
          is skipped; "" or absent: generation_failed); other columns are ignored.
Unit out: shard (1,), samples (1,) int64, skipped (1,) str (JSON: reason -> count).
Config section `shards` (what it writes), stage `write` (what it does).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from tailseed.pipeline.errors import UserError
from tailseed.pipeline.images import encode_png
from tailseed.pipeline.runner import Stage
from tailseed.pipeline.shards import write_shard


@dataclass(frozen=True)
class ShardsConfig:
    samples_per_shard: int = 40  # fixed: shard i always holds the same samples, whatever resumes

    def validate(self, where: str) -> None:
        if self.samples_per_shard < 1:
            raise UserError(f"{where}.samples_per_shard is {self.samples_per_shard}; at least 1")


class WriteStage:
    """PNG-encodes a shard's images that are ok and writes `shards/NNNNN.tar`, then
    `NNNNN_stats.json` (schema in the module docstring). No model: it never imports torch."""

    name = "write"

    @staticmethod
    def spec(config, shards_dir: Path) -> Stage:
        """The runner's stage for an AugmentConfig: beside the model actors, no GPU and a quarter
        CPU at most (it is a PNG encoder)."""
        model = config.generate.resources
        resources = replace(model, num_gpus=0.0, num_cpus=min(model.num_cpus, 0.25))
        return Stage(
            WriteStage.name, WriteStage, {"shards_dir": str(shards_dir.resolve())}, resources
        )

    def __init__(self, shards_dir: str):
        self.shards_dir = Path(shards_dir)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        shard = int(batch["shard"][0])
        samples, skipped = [], Counter()
        reasons = batch.get("skip_reason", np.full(len(batch["key"]), ""))
        for key, image, ok, cls, meta, reason in zip(
            batch["key"], batch["image"], batch["ok"], batch["cls"], batch["meta"], reasons
        ):
            if not ok:
                skipped[str(reason) or "generation_failed"] += 1
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
