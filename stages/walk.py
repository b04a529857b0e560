"""Walk: new seeds for a rare class from walks between its inverted seeds, each with its provenance."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.config import stable_hash
from pipeline.errors import UserError
from pipeline.walks import sample_walks

METHODS = ("nao", "slerp", "lerp")


@dataclass(frozen=True)
class WalkConfig:
    method: str = "nao"  # nao (norm-aware paths and centroids) | slerp | lerp
    seed: int = 0  # which pairs and positions are drawn; same seed, same walks

    def validate(self, where: str) -> None:
        if self.method not in METHODS:
            raise UserError(f"{where}.method: {self.method!r}; use one of {', '.join(METHODS)}")


def walk_key(
    class_index: int, position: int, sources, weights, method: str, config_hash: str
) -> str:
    """Content-derived key: class, walk position and a hash of sources, weights, method and config."""
    digest = stable_hash(
        [list(sources), [round(float(w), 6) for w in weights], method, config_hash], 10
    )
    return f"c{class_index:04d}_w{position:05d}_{digest}"


def make_walks(
    class_index: int,
    class_name: str,
    seeds: np.ndarray,
    keys: list[str],
    count: int,
    config: WalkConfig,
    config_hash: str,
) -> list[dict]:
    """`count` new seeds for one class as rows: key, seed (C,h,w) float32, sources, weights, method."""
    if count == 0:
        return []
    if len(keys) < 2:
        raise UserError(
            f"class {class_name!r}: {len(keys)} usable seed(s) ({', '.join(keys)}); at least 2 are needed"
        )
    walked = sample_walks(
        seeds, keys, count, method=config.method, seed=config.seed, class_name=class_name
    )
    rows = []
    for position, w in enumerate(walked):
        rows.append(
            {
                "key": walk_key(class_index, position, w.sources, w.weights, w.method, config_hash),
                "seed": np.asarray(w.seed, dtype=np.float32),
                "sources": list(w.sources),
                "weights": [float(x) for x in w.weights],
                "method": w.method,
            }
        )
    return rows
